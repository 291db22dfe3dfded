"""Records the switchboard keeps and shows: jobs, runs, supervisors, tokens, and what the
store returns and takes besides them (results of its writes, filters).

These Structs are both what the store returns and what the REST API sends, so the
OpenAPI schema is generated from the same definitions the code uses. The store's
interface is switchboard/store/base.py; its refusals, switchboard/store/errors.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NamedTuple

import msgspec
from msgspec import Meta

from protocol.messages import EventProblem, RunRef
from protocol.spec import JobSpec, Name, RoleName, Selector
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
    #: The devices granted to the run (the hardware lab, docs/lab.md), in the order its
    #: StartJob names them.
    devices: list[str] = []
    #: Role -> device, for the devices its spec's `devices` asked for with a role.
    device_roles: dict[str, str] = {}


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
    #: Set while no registered supervisor could ever run the job, or while it waits for
    #: `waiting_for`, saying why.
    unschedulable: str | None = None
    #: The earlier job this one waits for: its inputs name that job's output files.
    waiting_for: str | None = None
    #: The job group it is a role of (GET /api/v1/groups/{id}), if any.
    group: str | None = None
    #: The id and name of the token that submitted it (None: submitted before jobs had
    #: owners). Only an operator or admin may cancel or delete another token's job.
    owner: str | None = None
    owner_name: str | None = None
    runs: list[RunView] = []
    #: The test cases of its latest run with a JUnit report, counted by result (None: no
    #: run has one). GET /api/v1/jobs/{id}/tests lists them.
    tests: TestCounts | None = None
    #: The output files of its latest run that kept any (None: no run has).
    #: GET /api/v1/jobs/{id}/files lists them.
    files: FilesSummary | None = None


class JobCreated(msgspec.Struct):
    """A submitted job: `queued`, or `rejected` when its concurrency policy dropped it.
    With `?wait=`, `job` is the job as GET /api/v1/jobs/{id} shows it once it ended, or
    when the wait was over (its phase says which)."""

    id: str
    phase: str
    reason: str | None = None
    job: JobView | None = None


class BatchCreated(msgspec.Struct):
    jobs: list[JobCreated]


class CancelAccepted(msgspec.Struct):
    id: str
    phase: str


class FilesSummary(msgspec.Struct, frozen=True):
    """A run's output files counted: kept, their bytes, and refused."""

    attempt: int
    count: int
    bytes: int
    refused: int


#: What became of an output file the spec names as a JUnit report: waiting to be parsed,
#: its cases stored, or refused (`report_error` says why).
ReportStatus = Literal["pending", "stored", "refused"]


class RunFile(msgspec.Struct, frozen=True):
    """One output file a run kept (an artifact)."""

    path: str
    size: int
    digest: str
    media_type: str
    #: Set for a file the spec names as a JUnit report.
    report: ReportStatus | None = None
    report_error: str | None = None


class RunFileRefused(msgspec.Struct, frozen=True):
    """One output file a run did not keep, and why."""

    path: str
    reason: str


class RunFiles(msgspec.Struct, frozen=True):
    """The output files of one run: kept, in path order, and refused. `attempt` is null
    when no run has files; `refused_unlisted` counts refusals the supervisor did not list."""

    attempt: int | None
    files: list[RunFile] = []
    refused: list[RunFileRefused] = []
    refused_unlisted: int = 0


class PendingReport(msgspec.Struct, frozen=True):
    """A kept output file the spec names as a JUnit report, to parse once stored."""

    job_id: str
    attempt: int
    path: str
    digest: str


#: What one test case came to, as its JUnit report says.
TestResult = Literal["passed", "failed", "error", "skipped"]
#: Every result, in the order counts are shown.
TEST_RESULTS: tuple[TestResult, ...] = ("passed", "failed", "error", "skipped")


class TestCase(msgspec.Struct, frozen=True):
    """One test case of a JUnit report (switchboard.reports.junit parses them)."""

    __test__ = False  # not a pytest class, whatever its name

    #: The innermost <testsuite> holding it ("" if none has a name).
    suite: str
    classname: str
    name: str
    result: TestResult
    #: Seconds, as the report says (None: it doesn't, or not as a number).
    duration_s: float | None = None
    #: Why it failed, erred or was skipped: the element's message and text, clipped.
    message: str | None = None


class TestCounts(msgspec.Struct, frozen=True):
    """Test cases by result; `total` is all of them."""

    __test__ = False

    passed: int = 0
    failed: int = 0
    error: int = 0
    skipped: int = 0
    total: int = 0


class StoredTestCase(msgspec.Struct, frozen=True):
    """A test case as stored for a run: which run and report it came from, and the case.
    `id` orders a run's cases (report order) and pages a listing (`after`)."""

    id: int
    attempt: int
    report: str
    suite: str
    classname: str
    name: str
    result: TestResult
    duration_s: float | None = None
    message: str | None = None


class TestCasePage(msgspec.Struct):
    """One page of a run's test cases, in report order. `attempt`: the run listed (None:
    no run of the job has a report). A full page carries `next_after`: pass it as `after`
    for the next one."""

    __test__ = False

    attempt: int | None
    items: list[StoredTestCase]
    next_after: int | None = None


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
    #: The protocol version of its last connection, "MAJOR.MINOR" ("": not known).
    protocol: str = ""


class HealthChange(msgspec.Struct, frozen=True):
    """One change of a device's health (docs/lab.md): from what to what, when, who made
    it (`actor`: a token's name, a supervisor, or the switchboard) and why, and the job
    that caused it, if one did."""

    at: float
    to: str
    actor: str
    reason: str = ""
    #: None: the device was first declared.
    from_: str | None = msgspec.field(default=None, name="from")
    job_id: str | None = None


class PowerCall(msgspec.Struct, frozen=True):
    """One power command asked for a device (docs/lab.md "Power"): when, by whom, which
    action and how it went (`result`: one of POWER_RESULTS), the command's exit status,
    why it did not succeed, and the run holding the device then, if one did."""

    at: float
    actor: str
    action: str
    result: str
    exit_code: int | None = None
    reason: str = ""
    job_id: str | None = None


#: How a power call went: the command succeeded, ran and failed (or was killed past its
#: deadline on the host), the device has no command for it, its supervisor is not
#: connected (or too old for power), or no answer came in time.
POWER_RESULTS = ("ok", "failed", "no_power", "not_connected", "timed_out")


class PowerReply(msgspec.Struct, frozen=True):
    """What became of a power request sent to a supervisor (`result`: one of
    POWER_RESULTS): whether its command exited 0, its exit status and output, and why not.
    Also what a replica holding the supervisor's socket writes back for another that asked
    (switchboard.relay)."""

    result: str
    ok: bool = False
    exit_code: int | None = None
    output: str = ""
    reason: str = ""


#: The kinds of command one replica leaves for the replica holding a supervisor's socket.
COMMAND_KINDS = ("stop", "start", "power")


class SupervisorCommand(msgspec.Struct, frozen=True):
    """A command left for the replica holding a supervisor's socket (switchboard.relay):
    a StopJob (`stop`: the run and why), the StartJob of a stored run (`start`: the run),
    or a power request (`power`: the device and action; its answer is written back under
    `seq` for the replica that asked)."""

    seq: int
    supervisor_id: str
    kind: str
    job_id: str = ""
    attempt: int = 0
    reason: str = ""
    device_id: str = ""
    action: str = ""


class DeviceView(msgspec.Struct):
    """A device of the lab's inventory as the switchboard knows it."""

    id: str
    #: Its class: the resource jobs ask for.
    class_: str = msgspec.field(name="class")
    #: The supervisor (host) that declares it.
    supervisor_id: str
    labels: dict[str, str] = {}
    console: bool = False
    power: bool = False
    health: str = "unknown"
    health_reason: str = ""
    health_at: float = 0.0
    #: The last health check: "pass" or "fail", when, and the job that ran it.
    check_result: str | None = None
    check_at: float | None = None
    check_job: str | None = None
    #: The run holding it now, as "JOB#ATTEMPT" (None: free).
    holder: str | None = None
    #: Its health-check job that has not ended yet (it serves nothing else until then).
    checking: str | None = None
    #: The held reservation it belongs to (only jobs naming it are given it).
    reservation: str | None = None
    first_seen: float = 0.0
    #: The last time its supervisor declared it (its last hello).
    last_declared: float = 0.0
    #: Newest first (only in a single device's view).
    history: list[HealthChange] = []
    #: Its latest power calls, newest first (only in a single device's view).
    power_history: list[PowerCall] = []


#: Roles one job group may have.
MAX_GROUP_ROLES = 16


class GroupRoleSpec(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One role of a job group: its name, its job's spec, and whether the group stops
    when it ends without succeeding (`essential`)."""

    role: RoleName
    spec: JobSpec
    essential: bool = True


class GroupSpec(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A job group as submitted (POST /api/v1/groups): roles placed all or none."""

    name: Name
    roles: Annotated[list[GroupRoleSpec], Meta(min_length=1, max_length=MAX_GROUP_ROLES)]
    #: Waiting groups are placed by priority (higher first), then age.
    priority: Annotated[int, Meta(ge=-1000, le=1000)] = 0

    def __post_init__(self) -> None:
        names = [r.role for r in self.roles]
        if len(set(names)) != len(names):
            raise ValueError("two roles have the same name")


class GroupRoleView(msgspec.Struct):
    """A role of a group: its job as it is now (phase None: the job was deleted)."""

    role: str
    job_id: str
    essential: bool
    phase: Phase | None = None
    reason: str | None = None
    supervisor_id: str | None = None
    devices: list[str] = []


class GroupView(msgspec.Struct):
    """A job group as the API shows it; `state` is derived from its roles (gangs.py)."""

    id: str
    name: str
    state: str
    created_at: float
    priority: int = 0
    #: When all its roles were placed (None: still waiting).
    placed_at: float | None = None
    #: When its last role ended.
    ended_at: float | None = None
    #: Why its roles were stopped (an essential role ended without succeeding).
    reason: str | None = None
    owner: str | None = None
    roles: list[GroupRoleView] = []


class GroupSweep(NamedTuple):
    """What a sweep of the open groups did: runs to stop (their jobs were canceled),
    the groups stopped with why, and whether some group is still open."""

    stops: list[RunOnSupervisor]
    stopped: list[tuple[str, str]]
    open: bool


class ReservationView(msgspec.Struct):
    """A reservation of devices (docs/lab.md): waiting -> held -> released or expired."""

    id: str
    state: str
    #: Who asked: the token's name and id.
    actor: str
    #: The token that asked (the holder: it, or an operator, may release and extend).
    owner: str | None
    count: int
    #: The devices' class (None: any), and a selector over their labels.
    class_: str | None = msgspec.field(name="class", default=None)
    selector: Selector = msgspec.field(default_factory=Selector)
    priority: int = 0
    #: How long the lease lasts once granted.
    duration_s: float = 0.0
    created_at: float = 0.0
    refreshed_at: float = 0.0
    granted_at: float | None = None
    #: Waiting: when it expires unless refreshed; held: when the lease ends.
    expires_at: float = 0.0
    ended_at: float | None = None
    end_reason: str = ""
    #: The devices it holds (or held), by id.
    devices: list[str] = []


class ReservationEnded(NamedTuple):
    """A reservation a sweep ended: its id, the state it ended in, and why."""

    id: str
    state: str
    reason: str


class ReservationSweep(NamedTuple):
    """What one pass over the reservations did."""

    ended: list[ReservationEnded]
    #: (reservation id, seconds it waited) for each granted.
    granted: list[tuple[str, float]]
    #: True if a limit cut the pass short (the next pass goes on at once).
    more: bool


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
    #: The device it checks, for a health-check job (docs/lab.md).
    device: str | None = None


class Assignment(msgspec.Struct, frozen=True):
    """A run the store has just created for a job on a supervisor."""

    job_id: str
    attempt: int
    supervisor_id: str
    #: With its secret values, for the StartJob.
    spec: JobSpec
    #: The devices granted to the run (hardware lab; docs/lab.md), by id.
    devices: tuple[str, ...] = ()


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
    #: The devices granted to the run, by id.
    devices: tuple[str, ...] = ()


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


class ConnectionRecord(msgspec.Struct):
    """One past or present connection of a supervisor: its session generation, when it
    began, when and why it ended."""

    session: int
    connected_at: float
    disconnected_at: float | None = None
    reason: str | None = None


class JobChange(msgspec.Struct, frozen=True):
    """One entry of the change log the live feed reads (`rev` grows with every change)."""

    rev: int
    job_id: str
    deleted: bool = False


# --- what the store returns and takes besides the records above ---------------------


class Connected(msgspec.Struct, frozen=True):
    """What the store says when a supervisor (re)connects."""

    session: int
    last_seq: int
    #: Devices of its hello not taken into the inventory: another supervisor declares them.
    devices_refused: tuple[str, ...] = ()


class EventsApplied(msgspec.Struct, frozen=True):
    """The result of storing a batch of events."""

    #: Highest seq now stored for the supervisor (acknowledge up to here).
    stored_seq: int
    #: Runs that reached a terminal phase in this batch (capacity freed).
    ended: list[RunRef] = []
    #: Runs whose events were refused (the switchboard no longer wants them: stop them).
    unwanted: list[RunRef] = []
    #: What went wrong with events of the batch (told in its Ack, counted, logged).
    problems: list[EventProblem] = []
    #: Test reports among the output files kept by this batch, to parse.
    reports: list[PendingReport] = []
    #: Jobs someone waits for (apply_events' `waited`) that this batch ended, each as
    #: GET /api/v1/jobs/{id} shows it (a store may leave this empty: the waiters' pass
    #: over the change log finds them too).
    ended_jobs: list[JobView] = []


class CancelResult(msgspec.Struct, frozen=True):
    """What a cancel request found. `supervisor_id`/`attempt` name a run to stop."""

    phase: str
    supervisor_id: str | None = None
    attempt: int | None = None


class RunOnSupervisor(msgspec.Struct, frozen=True):
    """A run to stop on a supervisor (after a cancel, a replace, a timeout)."""

    job_id: str
    attempt: int
    supervisor_id: str


class Submitted(msgspec.Struct, frozen=True):
    """What became of one submitted job; `stops` are runs of the jobs it replaced."""

    id: str
    phase: str
    reason: str | None = None
    stops: list[RunOnSupervisor] = []


class ArtifactStored(msgspec.Struct):
    """An uploaded artifact: its content digest (`sha256:...`) and size."""

    digest: str
    size: int


class ArtifactView(msgspec.Struct, frozen=True):
    """An artifact as the store indexes it (the bytes: switchboard.artifact_blobs)."""

    digest: str
    size: int
    created_at: float
    #: The id of the token that uploaded it first (None: not known).
    uploaded_by: str | None = None
    #: When a job last named it, or it was uploaded again.
    last_used: float | None = None


class ArtifactAdded(msgspec.Struct, frozen=True):
    """What became of an upload: "added", "exists" (the same bytes were there), or
    "full" (refused: past the quota); and the bytes all artifacts take now."""

    outcome: str
    stored_bytes: int


class ArtifactDeleted(msgspec.Struct, frozen=True):
    """What a delete found: "deleted", "absent", "in_use" (refused: `needed_by` names
    jobs that have not ended and name it), "always_kept" (the empty artifact, refused), or
    "used_lately" (retention's delete only)."""

    outcome: str
    needed_by: list[str] = []


class Enrolment(msgspec.Struct, frozen=True):
    """A credential to store for a supervisor as it connects with a registration token."""

    token_id: str
    #: SHA-256 of the credential (the supervisor made it; the switchboard never sees it).
    digest: bytes
    name: str


class LabelTerm(msgspec.Struct, frozen=True):
    """One term of a job-label filter: `op` is "=", "!=", "exists" or "!exists"."""

    key: str
    op: str
    value: str = ""


class JobFilter(msgspec.Struct, frozen=True):
    phases: list[str] = []
    labels: list[LabelTerm] = []
    supervisor_id: str | None = None
    created_after: float | None = None
    created_before: float | None = None
    #: Only jobs older than this (a page's cursor: the last seq it showed).
    before_seq: int | None = None
    #: Only these jobs (the live feed's changed ones).
    ids: list[str] = []
    #: Search: name contains it (case-insensitive) or id starts with it.
    text: str | None = None
    #: Only jobs submitted by this token (its id).
    owner: str | None = None
    limit: int = 50


class Expired(msgspec.Struct, frozen=True):
    """What the clock ended: runs past their timeout and jobs past their queue timeout."""

    runs: list[RunOnSupervisor] = []
    jobs: list[str] = []


class Counts(msgspec.Struct, frozen=True):
    """Counts for the metrics: jobs by phase, queued jobs by state ("ready", "backoff",
    "unschedulable"), and the connected supervisors that are drained."""

    jobs: dict[str, int]
    queued: dict[str, int]
    drained: list[str]


class PlacementSnapshot(msgspec.Struct, frozen=True):
    """What a dispatch pass starts from, in one read of the store."""

    #: Every registered supervisor, `running` counting its active runs.
    fleet: list[SupervisorView]
    #: Per supervisor, the resources its active runs hold.
    resources_in_use: dict[str, dict[str, int]]
    #: Concurrency keys held by a job with an active run.
    busy_keys: frozenset[str]
    #: The first page of the queue (see Store.queued_jobs).
    queue: list[QueuedJob]
    #: When the earliest job waiting out a restart backoff may run (epoch seconds).
    next_backoff_end: float | None
    #: Per supervisor that declares devices, {class: devices of it free to be given a run}
    #: (scheduler.free_devices).
    devices_free: dict[str, dict[str, int]] = {}
    #: Per supervisor, its devices whose health check may start now.
    checks: dict[str, frozenset[str]] = {}
    #: Per supervisor, reservation -> {class: its devices there free for a run}
    #: (scheduler.reserved_devices).
    devices_reserved: dict[str, dict[str, dict[str, int]]] = {}
    #: Every device (scheduler.LabDevice; typed loosely: the scheduler imports this
    #: module), for jobs asking for devices one by one and for job groups.
    lab: list[Any] = []


class ChainPass(NamedTuple):
    """What a sweep of chained jobs did: jobs whose inputs it resolved (now placeable),
    jobs it rejected (an input that never came), and how many still wait."""

    resolved: int
    rejected: int
    waiting: int
