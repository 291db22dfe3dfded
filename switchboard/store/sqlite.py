"""The embedded store: one SQLite file in WAL mode (the engine: sqlite_engine.py).

This class is the Store interface over the engine: each method hands a function of the
record family's module (sqlite_jobs, sqlite_runs, sqlite_placement, sqlite_supervisors,
sqlite_tokens, sqlite_artifacts, sqlite_output, sqlite_retention, sqlite_tests,
sqlite_views) to the writer or to a reader, and keeps what lives in this process: the
token cache and the fleet listing remembered between supervisor writes.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TypeVar

import msgspec

from protocol.messages import Hello, RunRef, Stream, SupervisorEvent
from protocol.spec import JobSpec
from protocol.state import Phase
from switchboard import scheduler
from switchboard.event_checks import fresh_events
from switchboard.gangs import RoleNeed
from switchboard.health import DeviceFacts
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
    SupervisorView,
    TestCase,
    TestCasePage,
    TestCounts,
    TestResult,
    TokenView,
)
from switchboard.sealing import Keyring
from switchboard.store import sqlite_artifacts as artifacts
from switchboard.store import sqlite_chains, sqlite_details, sqlite_groups, sqlite_jobs
from switchboard.store import sqlite_devices as lab
from switchboard.store import sqlite_files as files
from switchboard.store import sqlite_output as output
from switchboard.store import sqlite_placement as placement
from switchboard.store import sqlite_reservations as reservations
from switchboard.store import sqlite_retention as retention
from switchboard.store import sqlite_runs as runs
from switchboard.store import sqlite_supervisors as supervisors
from switchboard.store import sqlite_tests as tests
from switchboard.store import sqlite_tokens as tokens
from switchboard.store import sqlite_views as views
from switchboard.store.base import Store
from switchboard.store.errors import BatchOutOfOrder
from switchboard.store.schema import TERMINAL_PHASES
from switchboard.store.sqlite_engine import SQLiteEngine
from switchboard.store.sqlite_secrets import upgrade_and_reseal
from switchboard.store.sqlite_tests import add_report
from switchboard.store.token_cache import TokenCache

T = TypeVar("T")


class SQLiteStore(Store):
    """`keyring` seals secret parameter values (switchboard/sealing.py). Without one, the
    store seals them with a key of its own that dies with it (tests; the token bootstrap,
    which stores no jobs), and leaves stored secrets as they are when it opens.
    `max_run_output`: the bytes of output one run may store, all streams together (None:
    no cap); see EventBatch. `upgrade`: bring a database an older release made up to this
    schema at open, backing it up first (store/migrations.py); without it, one is refused."""

    def __init__(
        self,
        path: Path,
        *,
        readers: int = 4,
        keyring: Keyring | None = None,
        max_run_output: int | None = None,
        upgrade: bool = False,
        checked_classes: frozenset[str] = frozenset(),
    ) -> None:
        self.path = path
        self._upgrade = upgrade
        self._engine = SQLiteEngine(path, readers)
        self._keyring = keyring or Keyring.ephemeral()
        self._keyring_given = keyring is not None
        self.max_run_output = max_run_output
        #: The device classes that have a health check: their devices of unknown health
        #: wait for it (sqlite_devices.lab_devices).
        self.checked_classes = checked_classes
        #: Bumped by every write to a supervisor's record (see Store.supervisor_writes).
        self.supervisor_writes = 0
        #: (supervisor_writes, the listing it was read at): see list_supervisors.
        self._fleet: tuple[int, list[SupervisorView]] | None = None
        self._tokens = TokenCache()

    # --- plumbing --------------------------------------------------------------------

    async def open(self) -> None:
        keyring = self._keyring if self._keyring_given else None
        self._engine.open(lambda conn: upgrade_and_reseal(conn, keyring, upgrade=self._upgrade))

    async def close(self) -> None:
        await self._engine.close()

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._engine.write(fn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._engine.read(fn)

    def on_write(self, listener: Callable[[], None]) -> None:
        self._engine.on_write(listener)

    async def _write_supervisor(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A write to a supervisor's record: counted once committed (readers see it)."""
        try:
            return await self._write(fn)
        finally:
            self.supervisor_writes += 1

    async def _write_credentials(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A write that may revoke tokens: the cache forgets them before and after it."""
        self._tokens.forget()
        try:
            return await self._write(fn)
        finally:
            self._tokens.forget()

    # --- tokens ----------------------------------------------------------------------

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
        now = time.time()

        def write(conn: sqlite3.Connection) -> None:
            tokens.add_token(conn, token_id, role, name, digest, supervisor_id, replace_bound, now)

        # A rotation revokes the tokens bound to the supervisor.
        await (self._write_credentials if replace_bound else self._write)(write)

    async def find_token(self, digest: bytes) -> TokenView | None:
        cached = self._tokens.get(digest)
        if cached is not None:
            return cached
        generation = self._tokens.generation
        token = await self._read(lambda conn: tokens.find_token(conn, digest))
        if token is not None:
            self._tokens.put(digest, token, generation)
        return token

    async def list_tokens(self) -> list[TokenView]:
        return await self._read(tokens.list_tokens)

    async def revoke_token(self, token_id: str) -> bool:
        now = time.time()
        return await self._write_credentials(lambda conn: tokens.revoke_token(conn, token_id, now))

    # --- switchboard-wide state ------------------------------------------------------

    async def dispatch_paused(self) -> bool:
        return await self._read(views.dispatch_paused)

    async def set_dispatch_paused(self, paused: bool) -> None:
        await self._write(lambda conn: views.set_dispatch_paused(conn, paused))

    # --- artifacts -------------------------------------------------------------------

    async def add_artifact(
        self, digest: str, size: int, uploaded_by: str | None = None, quota: int | None = None
    ) -> ArtifactAdded:
        return await self._write(
            lambda conn: artifacts.add_artifact(conn, digest, size, uploaded_by, quota)
        )

    async def get_artifact(self, digest: str) -> ArtifactView | None:
        return await self._read(lambda conn: artifacts.get_artifact(conn, digest))

    async def delete_artifact(
        self, digest: str, *, unused_before: float | None = None
    ) -> ArtifactDeleted:
        return await self._write(
            lambda conn: artifacts.delete_artifact(conn, digest, unused_before)
        )

    async def unused_artifacts(self, unused_before: float, limit: int) -> list[str]:
        return await self._read(lambda conn: artifacts.unused_artifacts(conn, unused_before, limit))

    async def stored_artifact_bytes(self) -> int:
        return await self._read(artifacts.stored_artifact_bytes)

    # --- jobs ------------------------------------------------------------------------

    async def create_jobs(
        self,
        jobs: Sequence[tuple[str, JobSpec]],
        actor: str,
        max_queued: int,
        *,
        owner: str | None = None,
        max_queued_per_owner: int | None = None,
    ) -> list[Submitted]:
        batch = sqlite_jobs.new_jobs(self._keyring, jobs)

        def write(conn: sqlite3.Connection) -> list[Submitted]:
            return sqlite_chains.insert_with_chains(
                conn,
                batch,
                lambda ready: sqlite_jobs.insert_jobs(
                    conn, ready, actor, max_queued, owner=owner, max_per_owner=max_queued_per_owner
                ),
            )

        return await self._write(write)

    async def resolve_chains(self, limit: int = 1000) -> ChainPass:
        due, waiting = await self._read(sqlite_chains.waiting)
        if not due:
            return ChainPass(0, 0, waiting)
        return await self._write(lambda conn: sqlite_chains.sweep(conn, limit))

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
        # Chained jobs wait for their inputs: never placed at submission (Dispatcher.submit).
        assert not any(spec.chained_inputs() for _, spec in jobs)
        batch = sqlite_jobs.new_jobs(self._keyring, jobs)
        keyring, checked = self._keyring, self.checked_classes

        def write(conn: sqlite3.Connection) -> tuple[list[Submitted], list[Assignment]]:
            clear = placement.no_job_ready(conn, time.time())  # before the insert: older jobs
            made = sqlite_jobs.insert_jobs(
                conn, batch, actor, max_queued, owner=owner, max_per_owner=max_queued_per_owner
            )
            assigned = []
            if clear:
                now = time.time()  # after the submission's own record
                for submitted in made:
                    supervisor_id = placements.get(submitted.id)
                    if supervisor_id is not None and submitted.phase == Phase.QUEUED.value:
                        run = placement.assign_run(
                            conn, submitted.id, supervisor_id, now, keyring, checked
                        )
                        if run is not None:
                            assigned.append(run)
            return made, assigned

        return await self._write(write)

    async def get_job(self, job_id: str) -> JobView | None:
        return await self._read(lambda conn: sqlite_jobs.load_job(conn, job_id))

    async def get_job_detail(self, job_id: str) -> JobView | None:
        return await self._read(lambda conn: _job_detail(conn, job_id))  # one hop

    async def ended_job_details(self, job_ids: list[str]) -> tuple[list[JobView], list[str]]:
        def read(conn: sqlite3.Connection) -> tuple[list[JobView], list[str]]:
            phases = sqlite_jobs.phases_of(conn, job_ids)
            ended = [i for i, p in phases.items() if p in TERMINAL_PHASES]
            missing = [job_id for job_id in job_ids if job_id not in phases]
            return list(sqlite_details.job_details(conn, ended).values()), missing

        return await self._read(read)  # one hop to the read pool

    async def list_jobs(self, where: JobFilter) -> list[tuple[int, JobSummary]]:
        return await self._read(lambda conn: sqlite_jobs.list_jobs(conn, where))

    async def job_events(self, job_id: str) -> list[JobEvent] | None:
        return await self._read(lambda conn: sqlite_jobs.job_events(conn, job_id))

    async def delete_job(self, job_id: str) -> str:
        return await self._write(lambda conn: sqlite_jobs.delete_job(conn, job_id))

    async def request_cancel(self, job_id: str, actor: str = "") -> CancelResult | None:
        return await self._write(lambda conn: sqlite_jobs.cancel_job(conn, job_id, actor))

    async def expire(self, run_grace_s: float) -> Expired:
        now = time.time()

        def write(conn: sqlite3.Connection) -> Expired:
            ended = sqlite_jobs.expire_queued(conn, now)
            return Expired(runs.expire_runs(conn, run_grace_s, now), ended)

        return await self._write(write)

    # --- placement -------------------------------------------------------------------

    async def placement_snapshot(
        self, queue_limit: Callable[[list[SupervisorView]], int]
    ) -> PlacementSnapshot:
        # One read (one trip to a reader thread) in one read transaction: a pass sees a
        # single moment of the store, and idle latency pays one thread hop, not five.
        def read(conn: sqlite3.Connection) -> PlacementSnapshot:
            conn.execute("BEGIN")
            try:
                fleet = self._fleet_views(conn)
                limit = queue_limit(fleet)
                devices = lab.lab_devices(conn, checked=self.checked_classes) if fleet else []
                return PlacementSnapshot(
                    fleet=fleet,
                    resources_in_use=placement.resources_in_use(conn) if fleet else {},
                    busy_keys=placement.busy_keys(conn),
                    queue=placement.queued_jobs(conn, limit) if limit > 0 else [],
                    next_backoff_end=placement.next_backoff_end(conn),
                    devices_free=scheduler.free_devices(devices),
                    checks=scheduler.awaiting_checks(devices),
                    devices_reserved=scheduler.reserved_devices(devices),
                    lab=devices,
                )
            finally:
                conn.execute("COMMIT")

        return await self._read(read)

    async def set_unschedulable(self, reasons: dict[str, str | None]) -> None:
        await self._write(lambda conn: placement.set_unschedulable(conn, reasons))

    async def queue_length(self) -> int:
        return await self._read(placement.queue_length)

    async def counts(self) -> Counts:
        return await self._read(placement.counts)

    async def queued_jobs(
        self, limit: int, *, after: tuple[int, int] | None = None, marked: bool = False
    ) -> list[QueuedJob]:
        return await self._read(lambda conn: placement.queued_jobs(conn, limit, after, marked))

    async def assign(self, pairs: Sequence[tuple[str, str]]) -> list[Assignment]:
        keyring, checked = self._keyring, self.checked_classes

        def write(conn: sqlite3.Connection) -> list[Assignment]:
            now = time.time()
            made = (
                placement.assign_run(conn, job_id, supervisor_id, now, keyring, checked)
                for job_id, supervisor_id in pairs
            )
            return [run for run in made if run is not None]

        return await self._write(write)

    # --- runs and their output -------------------------------------------------------

    async def run_phase(self, job_id: str, attempt: int) -> Phase | None:
        return await self._read(lambda conn: runs.run_phase(conn, job_id, attempt))

    async def read_output(
        self, job_id: str, attempt: int, stream: Stream, start: int = 0, end: int | None = None
    ) -> bytes:
        return await self._read(
            lambda conn: output.read_output(conn, job_id, attempt, stream, start, end)
        )

    def apply_events(
        self,
        supervisor_id: str,
        events: Sequence[SupervisorEvent],
        after_seq: int = 0,
        waited: Callable[[str], bool] | None = None,
    ) -> asyncio.Future[EventsApplied]:
        def write(conn: sqlite3.Connection) -> EventsApplied:
            (stored,) = conn.execute(
                "SELECT last_seq FROM supervisors WHERE id = ?", (supervisor_id,)
            ).fetchone()
            if stored < after_seq:
                raise BatchOutOfOrder(
                    f"events of {supervisor_id} up to seq {after_seq} are not stored"
                    f" (stored: {stored}): the batch after them is not stored either"
                )
            batch = runs.EventBatch(conn, supervisor_id, self.max_run_output)
            for event in fresh_events(stored, events, batch.problems):
                stored = event.seq
                batch.apply(event)
            batch.finish()
            conn.execute(
                "UPDATE supervisors SET last_seq = ?, last_seen = ? WHERE id = ?",
                (stored, time.time(), supervisor_id),
            )
            # The waited-for jobs it ended, read now: their waiters answer with these,
            # without a read of their own once this commits.
            ids = [r.job_id for r in batch.ended if waited is not None and waited(r.job_id)]
            ended = sqlite_details.job_details(conn, ids, ended_only=True) if ids else {}
            return EventsApplied(
                stored,
                batch.ended,
                batch.unwanted,
                batch.problems,
                batch.reports,
                list(ended.values()),
            )

        return self._engine.write(write)

    async def end_run(self, key: RunRef, phase: str, message: str) -> bool:
        return await self._write(lambda conn: runs.end_run(conn, key, Phase(phase), message))

    async def lose_runs(self, grace_s: float) -> list[RunRef]:
        now = time.time()
        return await self._write(lambda conn: runs.lose_runs(conn, grace_s, now))

    # --- test reports ----------------------------------------------------------------

    async def add_test_cases(
        self, job_id: str, attempt: int, report_path: str, cases: Sequence[TestCase]
    ) -> bool:
        return await add_report(self._write, tests, job_id, attempt, report_path, cases)

    async def test_cases(
        self,
        job_id: str,
        *,
        result: TestResult | None = None,
        attempt: int | None = None,
        limit: int = 100,
        after: int | None = None,
    ) -> TestCasePage | None:
        return await self._read(
            lambda conn: tests.test_cases(conn, job_id, result, attempt, limit, after)
        )

    async def test_summary(self, job_id: str) -> TestCounts | None:
        return await self._read(lambda conn: tests.test_summary(conn, job_id))

    # --- output files ----------------------------------------------------------------

    async def run_files(self, job_id: str, attempt: int | None = None) -> RunFiles | None:
        return await self._read(lambda conn: files.run_files(conn, job_id, attempt))

    async def run_file(
        self, job_id: str, path: str, attempt: int | None = None
    ) -> tuple[int, RunFile] | None:
        return await self._read(lambda conn: files.run_file(conn, job_id, attempt, path))

    async def files_summary(self, job_id: str) -> FilesSummary | None:
        return await self._read(lambda conn: files.files_summary(conn, job_id))

    async def pending_reports(self, limit: int = 10_000) -> list[PendingReport]:
        return await self._read(lambda conn: files.pending_reports(conn, limit))

    async def set_report_status(
        self, job_id: str, attempt: int, path: str, status: ReportStatus, error: str | None
    ) -> None:
        await self._write(lambda conn: files.set_report(conn, job_id, attempt, path, status, error))

    # --- retention -------------------------------------------------------------------

    async def stored_output_bytes(self) -> int:
        return await self._read(retention.stored_output_bytes)

    async def ended_jobs(
        self, *, ended_before: float | None = None, with_output: bool = False, limit: int
    ) -> list[str]:
        return await self._read(
            lambda conn: retention.ended_jobs(conn, ended_before, with_output, limit)
        )

    async def drop_output(self, job_id: str, max_rows: int, reason: str | None = None) -> int:
        return await self._write(lambda conn: retention.drop_output(conn, job_id, max_rows, reason))

    # --- supervisors -----------------------------------------------------------------

    async def supervisor_connected(
        self, hello: Hello, *, token_id: str | None = None, enrol: Enrolment | None = None
    ) -> Connected:
        now = time.time()
        return await self._write_supervisor(
            lambda conn: supervisors.connected(conn, hello, token_id, enrol, now)
        )

    async def unenroll(self, supervisor_id: str) -> list[str] | None:
        now = time.time()
        return await self._write_credentials(lambda conn: tokens.unenroll(conn, supervisor_id, now))

    async def active_runs(self, supervisor_id: str) -> list[ActiveRun]:
        keyring = self._keyring
        return await self._read(lambda conn: placement.active_runs(conn, supervisor_id, keyring))

    async def active_run_refs(self, supervisor_ids: Collection[str]) -> dict[str, set[RunRef]]:
        ids = list(supervisor_ids)
        return await self._read(lambda conn: placement.active_run_refs(conn, ids))

    async def supervisor_disconnected(
        self, supervisor_id: str, session: int, reason: str = "disconnected"
    ) -> None:
        now = time.time()
        await self._write_supervisor(
            lambda conn: supervisors.disconnected(conn, supervisor_id, session, now, reason)
        )

    async def forget_connections(self) -> None:
        now = time.time()
        await self._write_supervisor(lambda conn: supervisors.forget_connections(conn, now))

    async def list_supervisors(self) -> list[SupervisorView]:
        return await self._read(self._fleet_views)

    def _fleet_views(self, conn: sqlite3.Connection) -> list[SupervisorView]:
        """Every supervisor. Each dispatch pass lists them; their records change only with a
        supervisor write (counted), their load with every run: the records are re-read only
        when one was written, the load is counted each time. Runs on a reader thread."""
        # Sampled before the first read: every write counted by then is in what this
        # connection reads, so the listing may be remembered under this count.
        writes = self.supervisor_writes
        counts = supervisors.running_counts(conn)
        cached = self._fleet
        if cached is not None and cached[0] == writes:
            return [
                view
                if view.running == counts.get(view.id, 0)
                else msgspec.structs.replace(view, running=counts.get(view.id, 0))
                for view in cached[1]
            ]
        fleet = supervisors.load_supervisors(conn, None, counts)
        self._fleet = (writes, fleet)
        return fleet

    async def get_supervisor(self, supervisor_id: str) -> SupervisorView | None:
        found = await self._read(lambda conn: supervisors.load_supervisors(conn, supervisor_id))
        return found[0] if found else None

    async def connection_records(self, supervisor_id: str, limit: int) -> list[ConnectionRecord]:
        return await self._read(
            lambda conn: supervisors.connection_records(conn, supervisor_id, limit)
        )

    async def set_drained(self, supervisor_id: str, drained: bool) -> bool:
        return await self._write_supervisor(
            lambda conn: supervisors.set_drained(conn, supervisor_id, drained)
        )

    async def set_operator_labels(self, supervisor_id: str, labels: dict[str, str]) -> bool:
        return await self._write_supervisor(
            lambda conn: supervisors.set_operator_labels(conn, supervisor_id, labels)
        )

    # --- the hardware lab ------------------------------------------------------------

    async def list_devices(
        self,
        *,
        class_: str | None = None,
        health: str | None = None,
        supervisor_id: str | None = None,
    ) -> list[DeviceView]:
        return await self._read(lambda conn: lab.list_devices(conn, class_, health, supervisor_id))

    async def get_device(self, device_id: str) -> DeviceView | None:
        return await self._read(lambda conn: lab.get_device(conn, device_id))

    async def set_device_health(
        self, device_id: str, health: str, actor: str, reason: str
    ) -> DeviceView | None:
        now = time.time()
        return await self._write_supervisor(
            lambda conn: lab.set_health(conn, device_id, health, actor, reason, now)
        )

    async def recovery_health(
        self, device_id: str, check_job: str, health: str, actor: str, reason: str
    ) -> bool:
        now = time.time()
        return await self._write_supervisor(
            lambda conn: lab.recovery_health(conn, device_id, check_job, health, actor, reason, now)
        )

    async def record_power_call(self, device_id: str, call: PowerCall) -> PowerCall:
        return await self._write(lambda conn: lab.record_power_call(conn, device_id, call))

    async def lab_devices(self) -> list[scheduler.LabDevice]:
        checked = self.checked_classes
        return await self._read(lambda conn: lab.lab_devices(conn, checked=checked))

    async def device_counts(self) -> dict[tuple[str, str], int]:
        return await self._read(lab.health_counts)

    async def device_facts(self) -> list[DeviceFacts]:
        return await self._read(lab.device_facts)

    async def create_checks(self, checks: Sequence[tuple[str, JobSpec, str]], actor: str) -> None:
        batch = sqlite_jobs.new_jobs(self._keyring, [(job_id, spec) for job_id, spec, _ in checks])
        now = time.time()

        def write(conn: sqlite3.Connection) -> None:
            # Not held to the queue's limits: there is at most one check per device.
            sqlite_jobs.insert_jobs(conn, batch, actor, max_queued=2**62)
            lab.start_checks(conn, [(job_id, device) for job_id, _, device in checks], now)

        await self._write_supervisor(write)

    # The health-check loop asks these twice a second: a read says whether there is
    # anything to write, so an idle lab costs no write (and no supervisor write, which
    # would spoil the dispatcher's spare slots).

    async def finish_checks(self) -> list[tuple[str, str, str, str]]:
        if not await self._read(lab.checks_to_finish):
            return []
        now = time.time()
        return await self._write_supervisor(lambda conn: lab.finish_checks(conn, now))

    async def devices_after_lost_runs(self) -> list[str]:
        if not await self._read(lab.lost_holders):
            return []
        now = time.time()
        return await self._write_supervisor(lambda conn: lab.runs_lost(conn, now))

    # --- reservations of devices --------------------------------------------------------

    # --- job groups ------------------------------------------------------------------

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
        batch = sqlite_jobs.new_jobs(
            self._keyring, [(i, r.spec) for i, r in zip(job_ids, group.roles, strict=True)]
        )
        roles = [(r.role, r.essential, job) for r, job in zip(group.roles, batch, strict=True)]

        def write(conn: sqlite3.Connection) -> GroupView:
            now = time.time()
            sqlite_groups.create_group(
                conn,
                group_id,
                group.name,
                group.priority,
                roles,
                actor,
                max_queued,
                now,
                owner=owner,
                max_per_owner=max_queued_per_owner,
            )
            found = sqlite_groups.get_group(conn, group_id)
            assert found is not None
            return found

        return await self._write(write)

    async def get_group(self, group_id: str) -> GroupView | None:
        return await self._read(lambda conn: sqlite_groups.get_group(conn, group_id))

    async def list_groups(self, limit: int = 100) -> list[GroupView]:
        return await self._read(lambda conn: sqlite_groups.list_groups(conn, limit))

    async def waiting_groups(self, limit: int = 100) -> list[tuple[str, list[RoleNeed]]]:
        return await self._read(lambda conn: sqlite_groups.waiting_groups(conn, limit))

    async def assign_group(
        self, group_id: str, pairs: Sequence[tuple[str, str]]
    ) -> list[Assignment]:
        keyring, checked = self._keyring, self.checked_classes

        def write(conn: sqlite3.Connection) -> list[Assignment]:
            return sqlite_groups.assign_group(conn, group_id, pairs, time.time(), keyring, checked)

        try:
            return await self._write(write)
        except sqlite_groups.NotAllPlaced:
            return []  # rolled back: nothing is held

    async def sweep_groups(self, limit: int = 500) -> GroupSweep:
        if not await self._read(sqlite_groups.groups_to_sweep):
            return GroupSweep([], [], await self._read(sqlite_groups.groups_open))
        return await self._write(lambda conn: sqlite_groups.sweep(conn, time.time(), limit))

    async def create_reservation(
        self,
        reservation_id: str,
        wanted: scheduler.ReservationWanted,
        duration_s: float,
        owner: str | None,
        actor: str,
        ttl_s: float,
    ) -> ReservationView | str:
        now = time.time()

        def write(conn: sqlite3.Connection) -> ReservationView | str:
            refusal = scheduler.reservation_refusal(wanted, lab.lab_devices(conn))
            if refusal is not None:
                return refusal
            return reservations.create(
                conn, reservation_id, wanted, duration_s, owner, actor, ttl_s, now
            )

        return await self._write(write)

    async def get_reservation(self, reservation_id: str) -> ReservationView | None:
        return await self._read(lambda conn: reservations.get(conn, reservation_id))

    async def list_reservations(self, owner: str | None = None) -> list[ReservationView]:
        return await self._read(lambda conn: reservations.list_open(conn, owner))

    async def refresh_reservation(
        self, reservation_id: str, ttl_s: float
    ) -> ReservationView | None:
        now = time.time()
        return await self._write(
            lambda conn: reservations.refresh(conn, reservation_id, ttl_s, now)
        )

    async def extend_reservation(
        self, reservation_id: str, by_s: float, max_s: float
    ) -> ReservationView | str | None:
        now = time.time()
        return await self._write(
            lambda conn: reservations.extend(conn, reservation_id, by_s, max_s, now)
        )

    async def release_reservation(self, reservation_id: str, why: str) -> ReservationView | None:
        now = time.time()
        return await self._write_supervisor(
            lambda conn: reservations.release(conn, reservation_id, why, now)
        )

    async def sweep_reservations(self, limit: int) -> ReservationSweep:
        now, checked = time.time(), self.checked_classes
        if not await self._read(lambda conn: reservations.sweep_due(conn, now, checked)):
            return ReservationSweep([], [], False)
        return await self._write_supervisor(
            lambda conn: reservations.sweep(conn, now, limit, checked)
        )

    async def reservation_counts(self) -> dict[str, int]:
        return await self._read(reservations.counts)

    # --- the dashboard's views -------------------------------------------------------

    async def job_changes(self, after_rev: int, limit: int) -> list[JobChange]:
        return await self._read(lambda conn: views.job_changes(conn, after_rev, limit))

    async def ended_among_changes(
        self,
        after_rev: int,
        limit: int,
        among: Callable[[list[JobChange]], list[str]],
    ) -> tuple[list[JobChange], list[JobView]]:
        def read(conn: sqlite3.Connection) -> tuple[list[JobChange], list[JobView]]:
            changes = views.job_changes(conn, after_rev, limit)
            ids = among(changes) if changes else []
            ended = sqlite_details.job_details(conn, ids, ended_only=True) if ids else {}
            return changes, list(ended.values())

        return await self._read(read)  # one hop to the read pool

    async def latest_job_change(self) -> int:
        return await self._read(views.latest_job_change)

    async def prune_job_changes(self, keep: int) -> None:
        await self._write(lambda conn: views.prune_job_changes(conn, keep))

    async def overview(self, now: float, minutes: int, failures: int) -> Overview:
        return await self._read(lambda conn: views.overview(conn, now, minutes, failures))


def _job_detail(conn: sqlite3.Connection, job_id: str) -> JobView | None:
    """The job with its test and file counts, as GET /api/v1/jobs/{id} shows it."""
    return sqlite_details.job_details(conn, [job_id]).get(job_id)
