"""What the client raises. Every one is a ClientError, whose message says what happened in
one line (the CLI prints it as is)."""

from __future__ import annotations

from switchboard.models import JobView


class ClientError(Exception):
    """The switchboard said no, or couldn't be reached; the message says why."""


class ConnectionFailed(ClientError):
    """The switchboard could not be reached (or the connection broke) after the retries."""


class ApiError(ClientError):
    """The switchboard refused a request: its status, the error kind and message of its
    answer (`{"error", "message", "field"}`), and the field it named, if any."""

    def __init__(self, text: str, status: int, kind: str, message: str, field: str | None):
        super().__init__(text)
        self.status = status
        self.kind = kind
        self.message = message
        self.field = field


class BadRequest(ApiError):
    """400: an invalid request or spec (`field` names what is wrong)."""


class Unauthorized(ApiError):
    """401: no token, or one the switchboard does not know (revoked, mistyped)."""


class Forbidden(ApiError):
    """403: the token's role may not do this (e.g. cancel another token's job)."""


class NotFound(ApiError):
    """404: no such job (or artifact, supervisor, token)."""


class Conflict(ApiError):
    """409: not now (e.g. deleting a job that has not ended)."""


class TooManyRequests(ApiError):
    """429, still after the retries: the queue, or the token's share of it, is full."""


class Unavailable(ApiError):
    """503, still after the retries: the switchboard is not ready, or at its connection cap."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    429: TooManyRequests,
    503: Unavailable,
}


def api_error(text: str, status: int, kind: str, message: str, field: str | None) -> ApiError:
    """The ApiError subclass for the status."""
    return _BY_STATUS.get(status, ApiError)(text, status, kind, message, field)


class JobFailed(ClientError):
    """The job ended, but not `succeeded`: its phase, its exit code (None when the program
    gave none: canceled, timed out, lost, rejected) and the job itself."""

    def __init__(self, job: JobView):
        code = "no exit code" if job.exit_code is None else f"exit code {job.exit_code}"
        why = f": {job.reason}" if job.reason else ""
        super().__init__(f"job {job.id} ended {job.phase.value} ({code}){why}")
        self.job = job
        self.phase = job.phase
        self.exit_code = job.exit_code


class WaitTimeout(ClientError, TimeoutError):
    """The job had not ended when the wait was over; `job` is how it was last seen (None if
    the switchboard could not be reached all that time)."""

    def __init__(self, job_id: str, job: JobView | None, timeout_s: float):
        seen = f", last seen {job.phase.value}" if job is not None else ""
        super().__init__(f"job {job_id} had not ended after {timeout_s:g}s{seen}")
        self.job_id = job_id
        self.job = job
