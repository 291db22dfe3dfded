"""The store interface: every read and write the switchboard makes goes through here.

The embedded implementation is SQLite (store.sqlite); a PostgreSQL one can implement the
same methods, and must pass the same contract tests (tests/test_store_contract.py). No
policy lives behind this interface: what a job becomes is decided by switchboard.lifecycle
and placement by switchboard.scheduler; a store reads the facts they need and writes what
they decide. Its refusals are the exceptions of store.errors; what it returns besides the
records, switchboard.models. Every method that changes state returns only after the
change is durable, which is what lets the switchboard acknowledge a supervisor's events.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Collection, Sequence

import msgspec

from protocol.messages import Hello, RunRef, StopJob, Stream, SupervisorEvent
from protocol.spec import JobSpec
from protocol.state import TERMINAL, Phase
from switchboard.gangs import RoleNeed
from switchboard.health import DeviceFacts
from switchboard.lease import Claim
from switchboard.models import (
    ActiveRun,
    ArtifactAdded,
    ArtifactDeleted,
    ArtifactView,
    Assignment,
    CancelResult,
    ChainPass,
    Connected,
    ConnectionRecord,
    Counts,
    DeviceView,
    Enrolment,
    EventsApplied,
    Expired,
    FilesSummary,
    GroupSpec,
    GroupSweep,
    GroupView,
    JobChange,
    JobEvent,
    JobFilter,
    JobSummary,
    JobView,
    Overview,
    PendingReport,
    PlacementSnapshot,
    PowerCall,
    QueuedJob,
    ReportStatus,
    ReservationSweep,
    ReservationView,
    RunFile,
    RunFiles,
    Submitted,
    SupervisorCommand,
    SupervisorView,
    TestCase,
    TestCasePage,
    TestCounts,
    TestResult,
    TokenView,
)
from switchboard.scheduler import LabDevice, ReservationWanted

#: Jobs looked up per query by ended_among_changes.
LOOKUP_CHUNK = 500


class Store(abc.ABC):
    #: Grows with every change to a supervisor's record (connect, disconnect, drain, labels):
    #: a reader of supervisors can tell nothing changed without reading them all.
    supervisor_writes: int = 0
    #: True if several switchboard processes may serve this store at once (replicas on
    #: PostgreSQL: docs/deployment.md, "Several replicas"); False: this process alone
    #: (SQLite), which then holds the leader lease for good and needs no commands.
    shared: bool = False
    #: This process among the replicas serving the store.
    replica_id: str = "embedded"

    # lifecycle
    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def on_write(self, listener: Callable[[], None]) -> None:
        """Call `listener` (on the event loop) after every write, committed or not."""

    # tokens
    @abc.abstractmethod
    async def add_token(
        self,
        token_id: str,
        role: str,
        name: str,
        digest: bytes,
        supervisor_id: str | None = None,
        *,
        replace_bound: bool = False,
    ) -> None:
        """Store a token. With `replace_bound`, every other token bound to `supervisor_id`
        is revoked in the same transaction (a rotation)."""

    @abc.abstractmethod
    async def find_token(self, digest: bytes) -> TokenView | None:
        """The unrevoked token whose hash is `digest`."""

    @abc.abstractmethod
    async def list_tokens(self) -> list[TokenView]: ...

    @abc.abstractmethod
    async def revoke_token(self, token_id: str) -> bool:
        """Revoke a token (again is fine); False if there is no such token."""

    # switchboard-wide state
    @abc.abstractmethod
    async def dispatch_paused(self) -> bool: ...

    @abc.abstractmethod
    async def set_dispatch_paused(self, paused: bool) -> None: ...

    # artifacts (the index; their bytes: switchboard.artifact_blobs)
    @abc.abstractmethod
    async def add_artifact(
        self, digest: str, size: int, uploaded_by: str | None = None, quota: int | None = None
    ) -> ArtifactAdded:
        """Index an upload, unless it would take all artifacts together past `quota` bytes
        (None: no quota). The same bytes again count as a use."""

    @abc.abstractmethod
    async def get_artifact(self, digest: str) -> ArtifactView | None: ...

    @abc.abstractmethod
    async def delete_artifact(
        self, digest: str, *, unused_before: float | None = None
    ) -> ArtifactDeleted:
        """Forget an artifact, unless a job that has not ended names it, or a job that
        exists kept it as a run's output file (checked in the
        same transaction as submissions are, so none can slip in between). With
        `unused_before`, only if nobody uploaded it or submitted or ended a job naming it
        since then."""

    @abc.abstractmethod
    async def unused_artifacts(self, unused_before: float, limit: int) -> list[str]:
        """Artifacts no job that has not ended names, no existing job kept as an output
        file, and that nobody uploaded or named in a job (submitted or ended) since
        `unused_before`; least recently used first."""

    @abc.abstractmethod
    async def stored_artifact_bytes(self) -> int:
        """The bytes of all artifacts together."""

    # jobs
    @abc.abstractmethod
    async def create_jobs(
        self,
        jobs: Sequence[tuple[str, JobSpec]],
        actor: str,
        max_queued: int,
        *,
        owner: str | None = None,
        max_queued_per_owner: int | None = None,
    ) -> list[Submitted]:
        """Queue jobs, all or none, applying their concurrency policies, owned by the token
        `owner`. Raises QueueFull if that would put more than `max_queued` jobs in the
        queue, QueueQuotaFull if more than `max_queued_per_owner` of `owner`'s,
        ArtifactMissing if one names an artifact that is not stored. Secret parameter
        values are stored sealed, apart from the spec, until the job ends."""

    @abc.abstractmethod
    async def create_and_assign(
        self,
        jobs: Sequence[tuple[str, JobSpec]],
        actor: str,
        max_queued: int,
        placements: dict[str, str],
        *,
        owner: str | None = None,
        max_queued_per_owner: int | None = None,
    ) -> tuple[list[Submitted], list[Assignment]]:
        """Queue jobs as create_jobs does and, in the same transaction, give each job of
        `placements` (job id -> supervisor id) its first run there, provided no other job
        was waiting ready to run (it would come first) and the job was queued (not
        rejected by its concurrency policy). The assignments made are returned."""

    async def create_job(self, job_id: str, spec: JobSpec, actor: str = "") -> Submitted:
        (made,) = await self.create_jobs([(job_id, spec)], actor, max_queued=1 << 62)
        return made

    @abc.abstractmethod
    async def resolve_chains(self, limit: int = 1000) -> ChainPass:
        """Resolve the inputs of chained jobs whose awaited jobs have ended (at most
        `limit` of them): placeable once resolved, rejected if an input never came
        (switchboard.chains)."""

    @abc.abstractmethod
    async def get_job(self, job_id: str) -> JobView | None: ...

    async def get_job_detail(self, job_id: str) -> JobView | None:
        """The job with `tests` and `files` filled in (test_summary, files_summary), as
        GET /api/v1/jobs/{id} shows it; a store may read them in one go."""
        job = await self.get_job(job_id)
        if job is None:
            return None
        tests = await self.test_summary(job_id)
        files = await self.files_summary(job_id)
        return msgspec.structs.replace(job, tests=tests, files=files)

    async def ended_job_details(self, job_ids: list[str]) -> tuple[list[JobView], list[str]]:
        """Of the jobs (at most LOOKUP_CHUNK), those in a terminal phase as get_job_detail
        shows them, and the ids of those that do not exist; a store may read it in one go."""
        where = JobFilter(ids=job_ids, limit=len(job_ids))
        phases = {summary.id: summary.phase for _, summary in await self.list_jobs(where)}
        ended = []
        for job_id, phase in phases.items():
            if phase in TERMINAL and (job := await self.get_job_detail(job_id)) is not None:
                ended.append(job)
        return ended, [job_id for job_id in job_ids if job_id not in phases]

    @abc.abstractmethod
    async def list_jobs(self, where: JobFilter) -> list[tuple[int, JobSummary]]:
        """Jobs matching `where`, newest first, each with its seq (for the cursor)."""

    @abc.abstractmethod
    async def job_events(self, job_id: str) -> list[JobEvent] | None:
        """A job's audit trail, oldest first; None if there is no such job."""

    @abc.abstractmethod
    async def delete_job(self, job_id: str) -> str:
        """Delete an ended job with its runs, output, test cases and events: "deleted",
        "absent", or
        "active" (refused: cancel it first)."""

    @abc.abstractmethod
    async def placement_snapshot(
        self, queue_limit: Callable[[list[SupervisorView]], int]
    ) -> PlacementSnapshot:
        """Everything one dispatch pass starts from, read at one moment. The first page
        of the queue holds `queue_limit(fleet)` jobs (it may size the page by the free
        slots it sees; it runs wherever the store reads, so it must only compute)."""

    @abc.abstractmethod
    async def set_unschedulable(self, reasons: dict[str, str | None]) -> None:
        """Record, per queued job, why no registered supervisor could ever run it (None:
        some could)."""

    @abc.abstractmethod
    async def expire(self, run_grace_s: float) -> Expired:
        """End queued jobs past their queue timeout and runs past their timeout (plus
        `run_grace_s`, the supervisor's own chance to report it) as `timed_out`."""

    @abc.abstractmethod
    async def queue_length(self) -> int: ...

    @abc.abstractmethod
    async def counts(self) -> Counts: ...

    @abc.abstractmethod
    async def queued_jobs(
        self, limit: int, *, after: tuple[int, int] | None = None, marked: bool = False
    ) -> list[QueuedJob]:
        """Queued jobs ready to run, highest priority first, oldest first within a priority;
        `after` (priority, seq) of the last job of the previous page. Jobs marked
        unschedulable are left out, or (`marked`) are the only ones returned."""

    @abc.abstractmethod
    async def assign(self, pairs: Sequence[tuple[str, str]]) -> list[Assignment]:
        """For each (job id, supervisor id), create the job's next run on that supervisor,
        in one transaction. Jobs no longer queued are left out of the result. Each spec
        comes with its secret values opened, for the StartJob; a job whose values can't be
        opened is rejected instead (and left out)."""

    @abc.abstractmethod
    async def request_cancel(self, job_id: str, actor: str = "") -> CancelResult | None:
        """Cancel a job: a queued one ends at once; an active one is marked so its run is
        stopped. None if there is no such job."""

    @abc.abstractmethod
    async def run_phase(self, job_id: str, attempt: int) -> Phase | None:
        """The phase of one run (None if there is no such run)."""

    @abc.abstractmethod
    async def read_output(
        self, job_id: str, attempt: int, stream: Stream, start: int = 0, end: int | None = None
    ) -> bytes:
        """Bytes [start, end) of a run's stream (as much as is stored)."""

    # test reports (parsed by switchboard.reports)
    @abc.abstractmethod
    async def add_test_cases(
        self, job_id: str, attempt: int, report_path: str, cases: Sequence[TestCase]
    ) -> bool:
        """Store the test cases of one report of a run (`report_path`: the output file it
        was), replacing those the same report stored before. A report of 100,000 cases may
        be written in several short transactions (the writer is never held long), but
        readers see its cases, and its counts, all at once. False, storing nothing, if
        there is no such run (or its job is deleted meanwhile)."""

    @abc.abstractmethod
    async def test_cases(
        self,
        job_id: str,
        *,
        result: TestResult | None = None,
        attempt: int | None = None,
        limit: int = 100,
        after: int | None = None,
    ) -> TestCasePage | None:
        """A page of one run's test cases in report order (`attempt`, or the latest run
        with a report), only those with `result` if given, after the case whose id is
        `after`. None if there is no such job."""

    @abc.abstractmethod
    async def test_summary(self, job_id: str) -> TestCounts | None:
        """The test cases of the job's latest run that has a report, counted by result
        (None: no run of the job has one)."""

    # output files (stored by apply_events, from `files` events)
    @abc.abstractmethod
    async def run_files(self, job_id: str, attempt: int | None = None) -> RunFiles | None:
        """The output files of run `attempt` (None: the latest run that has any), kept
        and refused. None if there is no such job or run."""

    @abc.abstractmethod
    async def run_file(
        self, job_id: str, path: str, attempt: int | None = None
    ) -> tuple[int, RunFile] | None:
        """One kept file of run `attempt` (None: the latest run with files), with the
        attempt it belongs to; None if there is none."""

    @abc.abstractmethod
    async def files_summary(self, job_id: str) -> FilesSummary | None:
        """The files of the job's latest run that has any, counted (None: none has)."""

    @abc.abstractmethod
    async def pending_reports(self, limit: int = 10_000) -> list[PendingReport]:
        """Output files named as reports and not parsed yet (a restart came first)."""

    @abc.abstractmethod
    async def set_report_status(
        self, job_id: str, attempt: int, path: str, status: ReportStatus, error: str | None
    ) -> None:
        """Record what became of an output file the spec names as a JUnit report."""

    # retention (the policy: switchboard.retention)
    @abc.abstractmethod
    async def stored_output_bytes(self) -> int:
        """The bytes of output every run stores, together."""

    @abc.abstractmethod
    async def ended_jobs(
        self, *, ended_before: float | None = None, with_output: bool = False, limit: int
    ) -> list[str]:
        """Ended jobs, the one that ended first first: those that ended before
        `ended_before` (if given) and, `with_output`, only those that still hold output."""

    @abc.abstractmethod
    async def drop_output(self, job_id: str, max_rows: int, reason: str | None = None) -> int:
        """Delete up to `max_rows` stored pieces of an ended job's output, in one short
        transaction; the bytes freed (0: none was left, or the job has not ended). The call
        that deletes the last piece records `reason` (if given) in the job's events."""

    # supervisors
    @abc.abstractmethod
    async def supervisor_connected(
        self, hello: Hello, *, token_id: str | None = None, enrol: Enrolment | None = None
    ) -> Connected:
        """Record a (re)connect: a new session generation and the stored seq. In the same
        transaction, when given: check that token `token_id` is still valid, and store
        `enrol` as the supervisor's credential if it has none. Raises ConnectRefused (and
        records nothing) otherwise."""

    @abc.abstractmethod
    async def unenroll(self, supervisor_id: str) -> list[str] | None:
        """Revoke every token bound to the supervisor (its host credentials); the ids of
        those revoked, or None if the id is neither a known supervisor nor bound to one."""

    @abc.abstractmethod
    async def active_runs(self, supervisor_id: str) -> list[ActiveRun]:
        """The runs the switchboard believes a supervisor holds; those still `assigned`
        come with their secret values opened (their StartJob may be sent again)."""

    @abc.abstractmethod
    async def active_run_refs(self, supervisor_ids: Collection[str]) -> dict[str, set[RunRef]]:
        """Which runs the switchboard believes each of these supervisors holds, by identity
        only (a cheap read: no specs, no secrets); every id asked for is a key. Many at
        once, for the status checks of a fleet (switchboard.coalesce)."""

    @abc.abstractmethod
    async def supervisor_disconnected(
        self, supervisor_id: str, session: int, reason: str = "disconnected"
    ) -> None:
        """Record a disconnect (and why, in the connection history), unless a newer session
        has already replaced `session`."""

    @abc.abstractmethod
    async def forget_connections(self) -> None:
        """At startup of a switchboard process: none of the connections this process (its
        replica id) is recorded as holding is connected, and their grace period starts
        now. On a store one process serves, that is every connection."""

    # replicas sharing the store (a store one process serves needs none of these)
    async def claim_lease(self, ttl_s: float) -> tuple[Claim, dict[str, int] | None]:
        """Renew this replica's liveness and claim the leader lease (switchboard.lease);
        with it, the sessions this replica owns (supervisor id -> session; None: not
        tracked). A store one process serves: held for good, term 0."""
        return Claim(True, 0, None), None

    async def leave(self) -> None:
        """This replica stops: release the lease if it holds it, and stop counting it."""

    async def reap_replicas(self, dead_after_s: float) -> list[str]:
        """Disconnect the supervisors whose replica has been silent past `dead_after_s`
        (the leader's work); their ids."""
        return []

    async def send_commands(self, commands: Sequence[tuple[str, StopJob]]) -> None:
        """Leave StopJobs for the replicas holding these supervisors' sockets."""
        raise NotImplementedError("one process serves this store: it holds every socket")

    async def take_commands(self, supervisor_ids: Collection[str]) -> list[SupervisorCommand]:
        """Take the commands left for these supervisors (whose sockets this replica holds):
        StopJobs and StartJobs once, power requests marked taken (answer_power)."""
        return []

    async def ask_power(self, supervisor_id: str, device_id: str, action: str) -> int | None:
        """Leave a power request for the replica holding the supervisor's socket: the seq
        its answer comes under (power_answer); None if the supervisor is not connected."""
        raise NotImplementedError("one process serves this store: it holds every socket")

    async def answer_power(self, seq: int, answer: str) -> bool:
        """Write the answer (JSON) to power request `seq`; False if nobody waits for it."""
        raise NotImplementedError("one process serves this store: it holds every socket")

    async def power_answer(self, seq: int) -> tuple[bool, str | None]:
        """Whether power request `seq` is still there, and its answer once written."""
        raise NotImplementedError("one process serves this store: it holds every socket")

    async def forget_command(self, seq: int) -> None:
        """Drop power request `seq` (answered, or given up on)."""

    @abc.abstractmethod
    async def lose_runs(self, grace_s: float) -> list[RunRef]:
        """End as `lost` every active run of a supervisor disconnected for over `grace_s`."""

    @abc.abstractmethod
    async def list_supervisors(self) -> list[SupervisorView]: ...

    @abc.abstractmethod
    async def connection_records(self, supervisor_id: str, limit: int) -> list[ConnectionRecord]:
        """The supervisor's latest connections, newest first."""

    # the dashboard's views
    @abc.abstractmethod
    async def job_changes(self, after_rev: int, limit: int) -> list[JobChange]:
        """Changes to jobs committed after `after_rev`, oldest first."""

    async def ended_among_changes(
        self,
        after_rev: int,
        limit: int,
        among: Callable[[list[JobChange]], list[str]],
    ) -> tuple[list[JobChange], list[JobView]]:
        """The changes job_changes returns, and of the jobs `among` names from them (a
        pure function, called once with the changes, if there are any), those in a
        terminal phase now, each as get_job_detail shows it. A store may answer both in
        one read."""
        changes = await self.job_changes(after_rev, limit)
        ids = among(changes) if changes else []
        ended = []
        for start in range(0, len(ids), LOOKUP_CHUNK):
            chunk = ids[start : start + LOOKUP_CHUNK]
            ended += (await self.ended_job_details(chunk))[0]
        return changes, ended

    @abc.abstractmethod
    async def latest_job_change(self) -> int:
        """The rev of the newest change (0 if none): where a new follower starts."""

    @abc.abstractmethod
    async def prune_job_changes(self, keep: int) -> None:
        """Forget all but the newest `keep` changes."""

    @abc.abstractmethod
    async def overview(self, now: float, minutes: int, failures: int) -> Overview:
        """Counts for the dashboard: supervisors, queue by priority, running, jobs ended per
        minute over the last `minutes`, and the latest `failures` failed jobs."""

    @abc.abstractmethod
    async def get_supervisor(self, supervisor_id: str) -> SupervisorView | None: ...

    @abc.abstractmethod
    async def set_drained(self, supervisor_id: str, drained: bool) -> bool:
        """Drain (or resume) a supervisor; False if it is unknown."""

    @abc.abstractmethod
    async def set_operator_labels(self, supervisor_id: str, labels: dict[str, str]) -> bool:
        """Replace a supervisor's operator labels; False if it is unknown."""

    # the hardware lab (docs/lab.md)
    @abc.abstractmethod
    async def list_devices(
        self,
        *,
        class_: str | None = None,
        health: str | None = None,
        supervisor_id: str | None = None,
    ) -> list[DeviceView]:
        """The lab's devices (those of one class, health or supervisor), by id."""

    @abc.abstractmethod
    async def get_device(self, device_id: str) -> DeviceView | None:
        """A device with its latest health changes, newest first."""

    @abc.abstractmethod
    async def set_device_health(
        self, device_id: str, health: str, actor: str, reason: str
    ) -> DeviceView | None:
        """Set a device's health (switchboard.health says which may be set), kept in its
        history with `actor` and `reason`; None if there is no such device. Counted as a
        supervisor write: what may be placed where changes."""

    @abc.abstractmethod
    async def recovery_health(
        self, device_id: str, check_job: str, health: str, actor: str, reason: str
    ) -> bool:
        """Set the health of a device in recovery (switchboard.recovery), kept in its history
        with `actor`, `reason` and the failed check `check_job`, only if nothing changed it
        since that check: it is still `bad` and its last check is still `check_job` (an
        operator's word wins). Whether it was set; a supervisor write."""

    @abc.abstractmethod
    async def record_power_call(self, device_id: str, call: PowerCall) -> PowerCall:
        """Keep a power call in the device's history and, when a run holds the device, in
        that run's job events (its timeline); the call as kept (with that run's job)."""

    @abc.abstractmethod
    async def lab_devices(self) -> list[LabDevice]:
        """Every device as placement sees it (health, held or not)."""

    @abc.abstractmethod
    async def device_counts(self) -> dict[tuple[str, str], int]:
        """(health, class) -> how many devices."""

    @abc.abstractmethod
    async def device_facts(self) -> list[DeviceFacts]:
        """What deciding which devices need a health check looks at, for every device."""

    @abc.abstractmethod
    async def create_checks(self, checks: Sequence[tuple[str, JobSpec, str]], actor: str) -> None:
        """Queue health-check jobs, (job id, spec, the device it checks) each, in one
        transaction: from then on the device waits for its check and serves nothing else."""

    @abc.abstractmethod
    async def finish_checks(self) -> list[tuple[str, str, str, str]]:
        """Give each device whose check job has ended the health its ending says
        (health.check_outcome); (device, job, result, health) for each."""

    @abc.abstractmethod
    async def devices_after_lost_runs(self) -> list[str]:
        """Put in doubt (health.after_run) the devices granted to regular runs that ended by
        an infrastructure error since their health was set: lost with their host, or
        refused because their supervisor could not give them the device; the ids of those
        changed."""

    # reservations of devices (docs/lab.md)
    @abc.abstractmethod
    async def create_reservation(
        self,
        reservation_id: str,
        wanted: ReservationWanted,
        duration_s: float,
        owner: str | None,
        actor: str,
        ttl_s: float,
    ) -> ReservationView | str:
        """A new waiting reservation by token `owner`, expiring `ttl_s` from now unless
        refreshed; why not (a string) if no inventory could ever serve it
        (scheduler.reservation_refusal)."""

    @abc.abstractmethod
    async def get_reservation(self, reservation_id: str) -> ReservationView | None:
        """A reservation, whatever its state."""

    @abc.abstractmethod
    async def list_reservations(self, owner: str | None = None) -> list[ReservationView]:
        """The reservations not ended (those of one token), oldest first."""

    @abc.abstractmethod
    async def refresh_reservation(
        self, reservation_id: str, ttl_s: float
    ) -> ReservationView | None:
        """Its client is still there: a waiting one expires `ttl_s` from now."""

    @abc.abstractmethod
    async def extend_reservation(
        self, reservation_id: str, by_s: float, max_s: float
    ) -> ReservationView | str | None:
        """Lengthen its lease by `by_s`, never past `max_s` from its grant (why not: a
        string); None if unknown."""

    @abc.abstractmethod
    async def release_reservation(self, reservation_id: str, why: str) -> ReservationView | None:
        """Release it now: its devices are free, queued jobs naming it are canceled.
        Counted as a supervisor write: what may be placed where changes."""

    @abc.abstractmethod
    async def sweep_reservations(self, limit: int) -> ReservationSweep:
        """One pass, at most `limit` of each kind: expire the waiting reservations not
        refreshed in time and the leases that ended, release those whose token was
        revoked, grant the waiting ones that may have all their devices now (all or
        none). Writes nothing when there is nothing to do."""

    @abc.abstractmethod
    async def reservation_counts(self) -> dict[str, int]:
        """state -> how many reservations."""

    # job groups (docs/lab.md, "Job groups")

    @abc.abstractmethod
    async def create_group(
        self,
        group_id: str,
        group: GroupSpec,
        job_ids: Sequence[str],
        actor: str,
        max_queued: int,
        *,
        owner: str | None = None,
        max_queued_per_owner: int | None = None,
    ) -> GroupView:
        """Queue a group's jobs (one per role, under `job_ids`, all or none: QueueFull,
        QueueQuotaFull), held for the group's placement (the queue of single jobs leaves
        them out)."""

    @abc.abstractmethod
    async def get_group(self, group_id: str) -> GroupView | None:
        """A group with its roles' jobs as they are now."""

    @abc.abstractmethod
    async def list_groups(self, limit: int = 100) -> list[GroupView]:
        """The newest groups first."""

    @abc.abstractmethod
    async def waiting_groups(self, limit: int = 100) -> list[tuple[str, list[RoleNeed]]]:
        """The groups waiting to be placed, by priority then age, each with its roles
        still queued."""

    @abc.abstractmethod
    async def assign_group(
        self, group_id: str, pairs: Sequence[tuple[str, str]]
    ) -> list[Assignment]:
        """A run for every (job id, supervisor id) of the group, with its devices, in one
        transaction; none at all (an empty list, nothing written) if one can't be had:
        supervisors' and devices' rows are looked at before the jobs'."""

    @abc.abstractmethod
    async def sweep_groups(self, limit: int = 500) -> GroupSweep:
        """Stop the groups an essential role of which ended without succeeding (their
        other jobs canceled: the runs to stop are returned), close those whose roles
        have all ended. Writes nothing when there is nothing to do."""

    @abc.abstractmethod
    def apply_events(
        self,
        supervisor_id: str,
        events: Sequence[SupervisorEvent],
        after_seq: int = 0,
        waited: Callable[[str], bool] | None = None,
    ) -> Awaitable[EventsApplied]:
        """Store a batch of a supervisor's events in one transaction, skipping those
        already stored (seq at or below the stored seq). The batch is handed over when
        this is called, not when it is awaited: batches are stored in the order of the
        calls. `after_seq`: the highest seq of the batches handed over before this one;
        if they are not all stored (one failed), this one is refused too
        (BatchOutOfOrder), so no event is ever skipped. `waited`: whether someone waits
        for a job (safe to call from any thread); the jobs it names that the batch ended
        may come back in `ended_jobs`, read in the same transaction."""

    @abc.abstractmethod
    async def end_run(self, key: RunRef, phase: str, message: str) -> bool:
        """Finalize an active run from the switchboard's side (e.g. the host lost it)."""
