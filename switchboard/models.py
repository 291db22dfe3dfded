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
    runs: list[RunView] = []


class SupervisorView(msgspec.Struct):
    id: str
    name: str
    connected: bool
    labels: dict[str, str] = {}
    backends: list[str] = []
    resources: dict[str, int] = {}
    max_jobs: int = 1
    running: int = 0
    session: int = 0
    software: str = ""
    connected_at: float | None = None
    last_seen: float | None = None


class TokenView(msgspec.Struct):
    id: str
    role: str
    name: str
    created_at: float
    revoked: bool = False


class QueuedJob(msgspec.Struct, frozen=True):
    """What the scheduler needs to know about a job waiting for a supervisor."""

    id: str
    seq: int
    priority: int
    spec: JobSpec


class Assignment(msgspec.Struct, frozen=True):
    """A run the store has just created for a job on a supervisor."""

    job_id: str
    attempt: int
    supervisor_id: str
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
    spec: JobSpec
