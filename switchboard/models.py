"""Records the switchboard keeps and shows: jobs, runs, supervisors, tokens.

These Structs are both what the store returns and what the REST API sends, so the
OpenAPI schema is generated from the same definitions the code uses.
"""

from __future__ import annotations

import msgspec

from protocol.spec import JobSpec
from protocol.state import Phase


class PhaseEntry(msgspec.Struct, frozen=True):
    """One recorded phase change of a run."""

    phase: Phase
    at: float
    stage: str | None = None
    message: str | None = None


class RunView(msgspec.Struct):
    """One attempt at a job."""

    attempt: int
    supervisor_id: str | None
    phase: Phase
    created_at: float
    stage: str | None = None
    message: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    reason: str | None = None
    error_kind: str | None = None
    error: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    phases: list[PhaseEntry] = []
    #: Bytes of output stored for the run, all streams together (0 once retention has
    #: removed it: the job's events say so).
    output_bytes: int = 0
    #: The streams cut at the switchboard's per-run output cap: each ends with a line
    #: saying so, and what the program wrote after it was dropped.
    output_truncated: list[str] = []


class JobView(msgspec.Struct):
    """A job as the API shows it (secret parameter values replaced)."""

    id: str
    name: str
    phase: Phase
    spec: JobSpec
    created_at: float
    updated_at: float
    priority: int = 0
    exit_code: int | None = None
    reason: str | None = None
    cancel_requested: bool = False
    #: Set while no registered supervisor could ever run the job, saying why.
    unschedulable: str | None = None
    #: The id and name of the token that submitted it (None: submitted before jobs had
    #: owners). Only an operator or admin may cancel or delete another token's job.
    owner: str | None = None
    owner_name: str | None = None
    runs: list[RunView] = []


class JobSummary(msgspec.Struct):
    """A job as a list shows it (no spec, no runs)."""

    id: str
    name: str
    phase: Phase
    priority: int
    created_at: float
    updated_at: float
    labels: dict[str, str] = {}
    attempts: int = 0
    supervisor_id: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    unschedulable: str | None = None
    #: The id of the token that submitted it.
    owner: str | None = None


class JobPage(msgspec.Struct):
    """One page of a job list; pass `next_cursor` back as `cursor` for the next one."""

    items: list[JobSummary]
    next_cursor: str | None = None


class JobEvent(msgspec.Struct, frozen=True):
    """One entry of a job's audit trail."""

    at: float
    kind: str
    message: str
    attempt: int | None = None
    actor: str | None = None


class SupervisorView(msgspec.Struct):
    """A supervisor as the switchboard knows it. `labels` is what selectors match: the
    labels it advertises, overridden by the labels an operator set (`operator_labels`)."""

    id: str
    name: str
    connected: bool
    labels: dict[str, str] = {}
    operator_labels: dict[str, str] = {}
    #: What the supervisor itself advertises (operator labels win over these).
    advertised_labels: dict[str, str] = {}
    drained: bool = False
    backends: list[str] = []
    resources: dict[str, int] = {}
    max_jobs: int = 1
    running: int = 0
    session: int = 0
    software: str = ""
    connected_at: float | None = None
    last_seen: float | None = None


class TokenView(msgspec.Struct):
    """A token as listed (never its secret)."""

    id: str
    role: str
    name: str
    created_at: float
    revoked: bool = False
    #: A supervisor token may be bound to one supervisor id.
    supervisor_id: str | None = None


class QueuedJob(msgspec.Struct, frozen=True):
    """What the scheduler needs to know about a job waiting for a supervisor."""

    id: str
    seq: int
    priority: int
    spec: JobSpec
    #: When the job (last) entered the queue (epoch seconds): the base of its aging.
    queued_at: float = 0.0
    #: The job's concurrency key, if any: at most one job per key runs at a time.
    concurrency_key: str | None = None
    #: Why no registered supervisor could run it, as last noted on the job (None: it could).
    unschedulable: str | None = None


class Assignment(msgspec.Struct, frozen=True):
    """A run the store has just created for a job on a supervisor."""

    job_id: str
    attempt: int
    supervisor_id: str
    #: With its secret values, for the StartJob.
    spec: JobSpec


class RunKey(msgspec.Struct, frozen=True):
    job_id: str
    attempt: int


class ActiveRun(msgspec.Struct, frozen=True):
    """A run the switchboard believes a supervisor holds."""

    job_id: str
    attempt: int
    phase: Phase
    cancel_requested: bool
    #: With its secret values if the run is `assigned` (its StartJob may be sent again).
    spec: JobSpec
    #: Why those values could not be opened (then `spec` holds them replaced).
    secrets_unreadable: str | None = None


class SupervisorCounts(msgspec.Struct):
    """Registered supervisors: connected and taking runs, gone, or connected but drained."""

    online: int
    offline: int
    draining: int


class QueueDepth(msgspec.Struct):
    priority: int
    count: int


class FinishedMinute(msgspec.Struct):
    """Jobs that ended in one minute (`minute`: its start, epoch seconds); `failed` counts
    every ending but success."""

    minute: float
    succeeded: int
    failed: int


class Overview(msgspec.Struct):
    """The dashboard's front page, aggregated by the server."""

    supervisors: SupervisorCounts
    queue: list[QueueDepth]
    running: int
    finished: list[FinishedMinute]
    recent_failures: list[JobSummary]


class SupervisorSession(msgspec.Struct):
    """One connection of a supervisor: when it began, when and why it ended."""

    session: int
    connected_at: float
    disconnected_at: float | None = None
    reason: str | None = None


class JobChange(msgspec.Struct, frozen=True):
    """One entry of the change log the live feed reads (`rev` grows with every change)."""

    rev: int
    job_id: str
    deleted: bool = False
