"""What the blocking and the asyncio client share, with no I/O of their own: which answers
are retried and after how long, what a refusal becomes, how a spec and its parameters are
sent, and how a long wait is cut into the switchboard's waits."""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import httpx
import msgspec

from protocol.spec import JobSpec, Parameter
from protocol.state import TERMINAL
from switchboard.client.errors import ApiError, BadRequest, JobFailed, WaitTimeout, api_error
from switchboard.models import JobPage, JobSummary, JobView

T = TypeVar("T")

#: Answers worth asking again after a pause: the queue is full (429), the switchboard is
#: not ready or at its connection cap (503). Nothing was done, so a POST may be retried.
RETRY_STATUSES = frozenset({429, 503})
#: The longest wait asked of the switchboard in one request (its --max-wait default); a
#: longer wait is several. A switchboard with a smaller --max-wait refuses it: then halved.
WAIT_SLICE_S = 60.0
#: How much longer than its wait a waiting request may take to be answered.
WAIT_MARGIN_S = 10.0
#: How long a quick look at a job may take (a timed-out wait's last sight of it).
LOOK_S = 5.0
#: Jobs one listing may wait for, and one batch may hold (the switchboard's limits).
MAX_WAIT_IDS = 500
MAX_BATCH = 1000
#: With more jobs pending than one listing may wait for, each 500 are waited for in turn
#: this long, so a job ending outside the current 500 is seen within a round.
ROUND_S = 1.0

JSON_BODY = {"content-type": "application/json"}
#: Following a stream: its bytes may be minutes apart (the run's own pace), so no read
#: timeout; a dead switchboard is noticed by the connection breaking.
FOLLOW_TIMEOUT = httpx.Timeout(30.0, read=None)
#: Pieces a file is uploaded in.
FILE_CHUNK = 1024 * 1024

Params = Mapping[str, "str | Parameter"]
SpecLike = JobSpec | Mapping[str, Any] | bytes


@dataclass(frozen=True)
class Retry:
    """Asking again: a request refused with 429 or 503, or that could not connect, is tried
    up to `attempts` times, with full-jitter exponential backoff from `first_s` up to
    `max_s` (a Retry-After header, up to `max_s`, wins). A wait retries until its deadline
    instead, however many tries that takes (a restarting switchboard)."""

    attempts: int = 5
    first_s: float = 0.1
    max_s: float = 5.0

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to pause before try `attempt + 2` (attempt counts from 0)."""
        told = retry_after_s(retry_after)
        if told is not None:
            return min(told, self.max_s)
        ceiling = min(self.max_s, self.first_s * 2 ** min(attempt, 32))
        return random.uniform(0, ceiling)


def retry_after_s(header: str | None) -> float | None:
    """A Retry-After header in seconds (delta-seconds or an HTTP date); None if absent or
    unreadable."""
    if not header:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(header).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def refusal(method: str, path: str, status: int, body: bytes) -> ApiError:
    """What a 4xx/5xx answer becomes, from the switchboard's error body when it has one."""
    try:
        fields = msgspec.json.decode(body)
        kind, message = str(fields["error"]), str(fields["message"])
        field = fields.get("field")
    except (msgspec.DecodeError, KeyError, TypeError, AttributeError):
        kind, message, field = "error", body[:200].decode(errors="replace"), None
    text = f"{method} {path} failed with HTTP {status}: {kind}: {message}"
    return api_error(text, status, kind, message, field if isinstance(field, str) else None)


def spec_body(spec: SpecLike, params: Params | None = None) -> bytes:
    """The JSON of a submission: the spec (a JobSpec, the dict of one, or its JSON), with
    `params` added to its parameters (a plain value, or a Parameter for a secret one)."""
    if isinstance(spec, bytes):
        if not params:
            return spec
        decoded: dict[str, Any] = msgspec.json.decode(spec, type=dict[str, Any])
        return spec_body(decoded, params)
    if isinstance(spec, JobSpec):
        if params:
            merged = {**spec.parameters, **{k: _parameter(v) for k, v in params.items()}}
            spec = msgspec.structs.replace(spec, parameters=merged)
        return msgspec.json.encode(spec)
    body = dict(spec)
    if params:
        given = {k: msgspec.to_builtins(_parameter(v)) for k, v in params.items()}
        body["parameters"] = {**body.get("parameters", {}), **given}
    return msgspec.json.encode(body)


def _parameter(value: str | Parameter) -> Parameter:
    return value if isinstance(value, Parameter) else Parameter(value=value)


def encode(body: Any) -> bytes:
    return msgspec.json.encode(body)


def decode(kind: type[T], content: bytes) -> T:
    """An answer as the Struct the API sends (the same the switchboard encodes)."""
    return msgspec.json.decode(content, type=kind)


def ended(job: JobView) -> bool:
    return job.phase in TERMINAL


def checked(job: JobView, check: bool) -> JobView:
    """The ended job; JobFailed if `check` and it did not succeed."""
    if check and job.phase.value != "succeeded":
        raise JobFailed(job)
    return job


class Deadline:
    """The end of a wait (None: never), and the next slice of it to ask for."""

    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s
        self._at = None if timeout_s is None else time.monotonic() + timeout_s

    def left(self) -> float:
        return float("inf") if self._at is None else self._at - time.monotonic()

    def over(self) -> bool:
        return self.left() <= 0

    def slice(self, most: float) -> float:
        return max(0.0, min(self.left(), most))


class WaitSlice:
    """The longest wait a client asks of the switchboard in one request: a minute, or half
    of what a switchboard with a shorter --max-wait last refused."""

    def __init__(self) -> None:
        self.s = WAIT_SLICE_S

    def shorten(self, refused: BadRequest, asked_s: float) -> None:
        """After a 400 to a wait of `asked_s`: ask for half as long from now on, or raise it
        if it is not about the wait."""
        if refused.field != "wait" or asked_s <= 0.5:
            raise refused
        self.s = asked_s / 2


class JobWaiting:
    """One job's wait: the next request, and what its answer means."""

    def __init__(self, job_id: str, deadline: Deadline, last: JobView | None) -> None:
        self.path = f"/api/v1/jobs/{job_id}"
        self.job_id = job_id
        self.deadline = deadline
        self.last = last

    def next_request(self, most_s: float) -> tuple[dict[str, Any], float]:
        """Its params and timeout; WaitTimeout once the deadline passed."""
        if self.deadline.over():
            raise self.timed_out()
        wait = self.deadline.slice(most_s)
        return {"wait": wait}, wait + WAIT_MARGIN_S

    def answered(self, content: bytes) -> JobView | None:
        """The job if it ended."""
        self.last = decode(JobView, content)
        return self.last if ended(self.last) else None

    def timed_out(self) -> WaitTimeout:
        return WaitTimeout(self.job_id, self.last, self.deadline.timeout_s or 0.0)


class HasSummary(Protocol):
    id: str
    summary: JobSummary | None


J = TypeVar("J", bound=HasSummary)


class Completion(Generic[J]):
    """as_completed's bookkeeping: the jobs not seen ending yet, which of them the next
    waiting request names and for how long, and what its answer ended."""

    def __init__(self, jobs: Iterable[J], deadline: Deadline) -> None:
        self.pending = {job.id: job for job in jobs}
        self.deadline = deadline
        self._turn = 0

    def next_request(self, most_s: float) -> tuple[dict[str, Any], float]:
        """The listing's params and its timeout; WaitTimeout once the deadline passed."""
        if self.deadline.over():
            raise WaitTimeout(next(iter(self.pending)), None, self.deadline.timeout_s or 0.0)
        ids = list(self.pending)
        windows = -(-len(ids) // MAX_WAIT_IDS)
        start = self._turn % windows * MAX_WAIT_IDS
        self._turn += 1
        wait = self.deadline.slice(most_s if windows == 1 else min(most_s, ROUND_S))
        return {"ids": ",".join(ids[start : start + MAX_WAIT_IDS]), "wait": wait}, (
            wait + WAIT_MARGIN_S
        )

    def ended(self, content: bytes) -> list[J]:
        """The jobs the answer lists (they ended), each with its summary."""
        found = []
        for summary in decode(JobPage, content).items:
            job = self.pending.pop(summary.id, None)
            if job is not None:
                job.summary = summary
                found.append(job)
        return found


def chunks(items: list[T], size: int) -> list[list[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
