"""Every exception the protocol package raises (InvalidTransition is defined in `state`,
beside the phases it names and the rules that raise it).

    SwitchboardProtocolError      base of everything here
    ├── FrameError                a peer sent something that is not a valid message
    │                             (malformed JSON, unknown type, bad field, too big);
    │                             carries the close code and reason to send back
    ├── MessageTooBig             a message this side would send is over the frame
    │                             limit (the peer would refuse it with close 1009)
    ├── InvalidTransition         a phase change the rules in `state` refuse
    └── JobError                  a supervisor refuses or fails a job; carries one of the
                                  JobErrorKind values, reported to the switchboard as is

FrameError is the remote peer's fault; InvalidTransition may be either side's (the
caller knows which); JobError is an expected outcome, not a bug.
"""

from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    """WebSocket close codes used by the protocol (docs/protocol.md lists when each is sent)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    #: The first message was not a Hello, or came too late.
    HANDSHAKE_FAILED = 4000
    #: No protocol version in common.
    UNSUPPORTED_VERSION = 4001
    #: A message that is valid but not allowed at this point (e.g. a second Hello).
    UNEXPECTED_MESSAGE = 4002
    #: A newer connection of the same supervisor replaced this one.
    REPLACED = 4003
    #: The peer stopped answering heartbeats.
    HEARTBEAT_TIMEOUT = 4004
    #: The peer did not take the messages sent to it in time (it stopped reading).
    TOO_SLOW = 4005
    #: The token is not (or no longer) valid for this supervisor.
    UNAUTHORIZED = 4401


class SwitchboardProtocolError(Exception):
    """Base class of the protocol package's exceptions."""


class FrameError(SwitchboardProtocolError):
    """A frame from the peer could not be accepted.

    `code` is the WebSocket close code to answer with, `reason` a short text naming what
    was wrong (it goes into the close frame, so it stays under 123 bytes).
    """

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason} (close code {int(self.code)})"

    def close_reason(self) -> str:
        """The reason cut to fit a close frame (123 bytes of UTF-8)."""
        data = self.reason.encode()
        if len(data) <= 123:
            return self.reason
        return data[:120].decode(errors="ignore") + "..."


class MessageTooBig(SwitchboardProtocolError):
    """A message that must not be sent: encoded, it is larger than the frame limit.

    `what` names it for people ("the job's start_job message"); `size` is its size in
    bytes and `limit` the limit."""

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(what, size, limit)
        self.what = what
        self.size = size
        self.limit = limit

    def __str__(self) -> str:
        return (
            f"{self.what} would be {self.size} bytes, over the protocol's limit of "
            f"{self.limit} bytes per message"
        )


class ProblemCode(enum.StrEnum):
    """What the switchboard did with an acknowledged event it could not take as sent
    (docs/protocol.md §6.5). Every one is acknowledged: resending would change nothing."""

    #: Stored, but its seq skipped numbers: the events in between never arrived.
    SEQ_GAP = "seq_gap"
    #: Dropped: a phase only the switchboard decides (queued, assigned, lost, exhausted).
    PHASE_NOT_REPORTABLE = "phase_not_reportable"
    #: Dropped: a phase change the run's phase does not allow (§7.1), e.g. running twice.
    INVALID_TRANSITION = "invalid_transition"
    #: Dropped: the run had already ended (nothing about a run follows its terminal state).
    RUN_ENDED = "run_ended"
    #: Dropped: the run is not assigned to this supervisor (or does not exist); a stop_job
    #: with reason `unwanted` follows.
    UNKNOWN_RUN = "unknown_run"
    #: Dropped: output starting past the stream's stored length (bytes in between missing).
    OUTPUT_GAP = "output_gap"
    #: Stored in part or not at all: the run reached the switchboard's output cap.
    OUTPUT_CAPPED = "output_capped"


class JobErrorKind(enum.StrEnum):
    """Why a supervisor refused or failed a job."""

    #: A different attempt of this job is running here.
    ALREADY_RUNNING = "already_running"
    #: The run is already being stopped.
    ALREADY_STOPPING = "already_stopping"
    #: This run already ran (and ended) on this supervisor; it is not started twice.
    JOB_ALREADY_EXISTS = "job_already_exists"
    #: The run can't be resumed (e.g. its container is gone after a restart).
    CANNOT_RESUME = "cannot_resume"
    #: No such run on this supervisor.
    JOB_NOT_FOUND = "job_not_found"
    #: The supervisor is running as many jobs as it may.
    MAX_CONCURRENT_JOBS = "max_concurrent_jobs"
    #: The image or module could not be found or fetched.
    IMAGE_NOT_FOUND = "image_not_found"
    #: The image or module is broken (bad digest, not a valid module or tarball).
    IMAGE_INVALID = "image_invalid"
    #: The image or module is valid but this supervisor can't run it.
    IMAGE_NOT_COMPATIBLE = "image_not_compatible"
    #: (1.3) An input could not be placed: not found or fetched, wrong content, too large,
    #: or a tar archive that is not one or has members that would land outside its
    #: directory (absolute paths, `..`, links pointing out, devices).
    INPUT_INVALID = "input_invalid"
    #: Anything else that went wrong inside the supervisor.
    INTERNAL_ERROR = "internal_error"


#: Error kinds after which the switchboard may simply place the job again (the job itself
#: is fine; this supervisor was busy).
TRANSIENT_ERROR_KINDS: frozenset[JobErrorKind] = frozenset(
    {JobErrorKind.MAX_CONCURRENT_JOBS, JobErrorKind.ALREADY_RUNNING}
)


class JobError(SwitchboardProtocolError):
    """A supervisor refuses or fails a job, with a kind the switchboard understands."""

    def __init__(self, kind: JobErrorKind, description: str) -> None:
        super().__init__(kind, description)
        self.kind = JobErrorKind(kind)
        self.description = description

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.description}"
