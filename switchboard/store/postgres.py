"""The PostgreSQL store: the Store interface over postgres_engine.py, for a lab that
outgrows one SQLite file (docs/deployment.md, "PostgreSQL").

As the SQLite store does, each method hands a function of a record family's module
(postgres_jobs, postgres_chains, postgres_runs, postgres_placement, postgres_supervisors,
postgres_artifacts, postgres_files, postgres_tests, postgres_views) to a write or a read.
Unlike SQLite's one writer, every request is its own transaction and writes run side by
side: rows are locked where two writers could race for them, a supervisor's row before its
runs' and jobs' rows. A supervisor's event batches are still stored in the order they are
handed over (apply_events).

Artifact bytes are in the database too, in chunks (postgres_chunks): replicas share no
data dir; each keeps a cache of them in its own (switchboard.artifact_blobs).
Several processes may serve one database (docs/deployment.md, "Several replicas"): the
leader lease, the fences on singleton work's and connections' writes, and the commands
between replicas are postgres_replicas.py's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Sequence
from pathlib import Path
from typing import TypeVar

from protocol.messages import Hello, RunRef, StopJob, Stream, SupervisorEvent
from protocol.spec import JobSpec
from protocol.state import Phase
from switchboard import metrics
from switchboard.event_checks import fresh_events
from switchboard.gangs import RoleNeed
from switchboard.health import DeviceFacts
from switchboard.lease import LEASE_TTL_S, Claim
from switchboard.lograte import RateLimitedLog
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
from switchboard.scheduler import (
    LabDevice,
    ReservationWanted,
    awaiting_checks,
    free_devices,
    reservation_refusal,
    reserved_devices,
)
from switchboard.sealing import Keyring
from switchboard.store import postgres_artifacts as artifacts
from switchboard.store import postgres_chains as chains
from switchboard.store import postgres_chunks as chunks
from switchboard.store import postgres_devices as lab
from switchboard.store import postgres_files as files
from switchboard.store import postgres_groups as groups
from switchboard.store import postgres_jobs as jobs_sql
from switchboard.store import postgres_placement as placement
from switchboard.store import postgres_replicas as replicas
from switchboard.store import postgres_reservations as reservations
from switchboard.store import postgres_runs as runs
from switchboard.store import postgres_supervisors as supervisors
from switchboard.store import postgres_tests as tests
from switchboard.store import postgres_views as views
from switchboard.store.base import Store
from switchboard.store.errors import BatchOutOfOrder
from switchboard.store.fencing import CHANNEL, JOBS_QUEUED, LEADER_TERM, SESSION, Fenced
from switchboard.store.postgres_engine import Connection, PostgresEngine
from switchboard.store.sqlite_groups import NotAllPlaced
from switchboard.store.sqlite_jobs import new_jobs
from switchboard.store.sqlite_secrets import log_resealed, sealed_again
from switchboard.store.sqlite_tests import add_report
from switchboard.store.token_cache import TokenCache

T = TypeVar("T")

#: A replica that was superseded may try many writes at once as it wakes: each is counted
#: (switchboard_fenced_writes_total), one line per kind and interval is logged.
_fenced_log = RateLimitedLog(logging.getLogger("switchboard.store"))

#: Sealed secrets read at a time when sealing them again at open.
_RESEAL_PAGE = 1000


class PostgresStore(Store):
    """`dsn`: a libpq URI (postgresql://user@host/db). `keyring` and `max_run_output` as
    for SQLiteStore. The schema is created in an empty database, and a database of another
    version refused (store/postgres_schema.py). Several processes may serve one database
    (docs/deployment.md, "Several replicas"): `replica_id` names this one (default: host,
    pid and a random part, so a restart is a new replica), `notify` sends NOTIFY hints to
    the others (off behind a pooler in transaction mode: `pooled`, store/postgres_engine.py,
    which also turns it off). `lease_ttl_s`: the leader lease's
    (switchboard.lease); a transaction left idle for half of it is ended by the server, so
    that a replica paused in the middle of one does not hold the lease row's lock, which a
    takeover waits for, past the lease."""

    shared = True

    def __init__(
        self,
        dsn: str,
        *,
        keyring: Keyring | None = None,
        max_run_output: int | None = None,
        max_connections: int = 10,
        replica_id: str | None = None,
        notify: bool = True,
        checked_classes: frozenset[str] = frozenset(),
        lease_ttl_s: float = LEASE_TTL_S,
        pooled: bool = False,
    ) -> None:
        self.dsn = dsn
        self.replica_id = replica_id or (
            f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        )
        self.notify = notify and not pooled
        #: Device classes with a health check (switchboard.checks): an `unknown` device
        #: of one waits for its check (postgres_devices.lab_devices).
        self.checked_classes = checked_classes
        self._engine = PostgresEngine(
            dsn,
            max_connections=max_connections,
            idle_in_transaction_s=lease_ttl_s / 2,
            pooled=pooled,
        )
        self._keyring = keyring or Keyring.ephemeral()
        self._keyring_given = keyring is not None
        self.max_run_output = max_run_output
        self.supervisor_writes = 0
        self._tokens = TokenCache()
        #: Per supervisor, the lock its event batches take in the order they are handed over.
        self._batches: dict[str, asyncio.Lock] = {}
        #: Gaps in the job change log a reader waits on (postgres_views.job_changes).
        self._change_gaps: dict[int, frozenset[str]] = {}

    # --- plumbing --------------------------------------------------------------------

    async def open(self) -> None:
        await self._engine.open()
        if self._keyring_given:
            await self._reseal()

    async def close(self) -> None:
        await self._engine.close()

    async def _write(
        self, fn: Callable[[Connection], Awaitable[T]], *, checks_session: bool = False
    ) -> T:
        """One transaction; the metrics it staged count once it has committed. Singleton
        work's writes and a connection's are fenced (store.fencing): refused, raising
        Fenced, once the lease term or the session they run under has moved on.
        `checks_session`: `fn` locks the supervisor's row itself and checks the session
        there (replicas.check_session), saving a round trip on the hottest writes."""
        term, session = LEADER_TERM.get(), None if checks_session else SESSION.get()
        if term is not None or session is not None:
            unfenced = fn

            async def fenced(conn: Connection) -> T:
                await replicas.fence(conn, term, session)
                return await unfenced(conn)

            fn = fenced
        with metrics.staged_in_task():
            started = time.perf_counter()
            try:
                value = await self._engine.write(fn)
            except Fenced as refused:
                metrics.FENCED_WRITES.labels(refused.fence).inc()
                _fenced_log.warning(refused.fence, "write refused: %s", refused)
                raise
            metrics.STORE_COMMIT_SECONDS.observe(time.perf_counter() - started)
            metrics.staged_commit()
        return value

    async def _read(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        return await self._engine.read(fn)

    def on_write(self, listener: Callable[[], None]) -> None:
        self._engine.on_write(listener)

    async def _write_supervisor(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        try:
            return await self._write(fn)
        finally:
            self.supervisor_writes += 1

    async def _write_credentials(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        self._tokens.forget()
        try:
            return await self._write(fn)
        finally:
            self._tokens.forget()

    async def _reseal(self) -> None:
        """Seal again with the current key what an older key of the keyring sealed, a page
        per transaction (sqlite_secrets.reseal)."""
        keyring = self._keyring
        resealed, unreadable, after = 0, Counter[str](), ""

        async def page(conn: Connection) -> int:
            nonlocal resealed, after
            rows = await conn.fetch(
                "SELECT job_id, sealed FROM job_secrets WHERE job_id > $1"
                ' AND substring(sealed from 2 for 8) != $2 ORDER BY job_id COLLATE "C"'
                " LIMIT $3 FOR UPDATE SKIP LOCKED",
                after,
                keyring.current_id,
                _RESEAL_PAGE,
            )
            for job_id, sealed in rows:
                again = sealed_again(keyring, job_id, sealed, unreadable)
                if again is not None:
                    await conn.execute(
                        "UPDATE job_secrets SET sealed = $1 WHERE job_id = $2", again, job_id
                    )
                    resealed += 1
            if rows:
                after = rows[-1][0]
            return len(rows)

        while await self._write(page) == _RESEAL_PAGE:
            pass
        log_resealed(resealed, unreadable)

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

        async def write(conn: Connection) -> None:
            await supervisors.add_token(
                conn, token_id, role, name, digest, supervisor_id, replace_bound, now
            )

        await (self._write_credentials if replace_bound else self._write)(write)

    async def find_token(self, digest: bytes) -> TokenView | None:
        cached = self._tokens.get(digest)
        if cached is not None:
            return cached
        generation = self._tokens.generation
        token = await self._read(lambda conn: supervisors.find_token(conn, digest))
        if token is not None:
            self._tokens.put(digest, token, generation)
        return token

    async def list_tokens(self) -> list[TokenView]:
        return await self._read(supervisors.list_tokens)

    async def revoke_token(self, token_id: str) -> bool:
        now = time.time()
        return await self._write_credentials(
            lambda conn: supervisors.revoke_token(conn, token_id, now)
        )

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

    # --- artifact bytes (postgres_chunks; switchboard.artifact_blobs uses these) ------

    async def add_artifact_bytes(
        self, digest: str, size: int, uploaded_by: str | None, quota: int | None, path: Path
    ) -> ArtifactAdded:
        """add_artifact, with the bytes of `path` (whole, hashing to `digest`) stored in
        the same transaction ("full": neither)."""
        try:
            return await self._write(
                lambda conn: chunks.add_with_chunks(conn, digest, size, uploaded_by, quota, path)
            )
        except chunks.QuotaFull as full:
            return full.added

    async def artifact_has_bytes(self, digest: str, size: int) -> bool:
        return await self._read(lambda conn: chunks.has_chunks(conn, digest, size))

    async def import_artifact_bytes(self, digest: str, path: Path) -> bool:
        return await self._write(lambda conn: chunks.import_chunks(conn, digest, path))

    async def read_artifact_bytes(
        self, digest: str, write: Callable[[bytes], Awaitable[None]]
    ) -> int:
        return await self._read(lambda conn: chunks.read_chunks(conn, digest, write))

    async def touch_artifact(self, digest: str) -> bool:
        return await self._write(lambda conn: chunks.touch(conn, digest, time.time()))

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
        batch = new_jobs(self._keyring, jobs)
        notify = self.notify

        async def write(conn: Connection) -> list[Submitted]:
            made = await chains.insert_with_chains(
                conn,
                batch,
                lambda ready: jobs_sql.insert_jobs(
                    conn, ready, actor, max_queued, owner=owner, max_per_owner=max_queued_per_owner
                ),
            )
            if notify and made:
                await _jobs_queued(conn)
            return made

        return await self._write(write)

    async def resolve_chains(self, limit: int = 1000) -> ChainPass:
        due, waiting = await self._read(chains.waiting)
        if not due:
            return ChainPass(0, 0, waiting)
        return await self._write(lambda conn: chains.sweep(conn, limit))

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
        assert not any(spec.chained_inputs() for _, spec in jobs)
        batch = new_jobs(self._keyring, jobs)
        keyring, checked = self._keyring, self.checked_classes
        me, notify = self.replica_id, self.notify

        async def write(conn: Connection) -> tuple[list[Submitted], list[Assignment]]:
            clear = await placement.no_job_ready(conn, time.time())  # before: older jobs
            made = await jobs_sql.insert_jobs(
                conn, batch, actor, max_queued, owner=owner, max_per_owner=max_queued_per_owner
            )
            assigned = []
            if clear and placements:
                slots = await _lock_owned(conn, set(placements.values()), me)
                now = time.time()  # (after the locks: see assign)
                for submitted in made:
                    supervisor_id = placements.get(submitted.id)
                    if (
                        supervisor_id is not None
                        and slots.get(supervisor_id, 0) > 0
                        and submitted.phase == Phase.QUEUED.value
                    ):
                        run = await placement.assign_run(
                            conn, submitted.id, supervisor_id, now, keyring, checked
                        )
                        if run is not None:
                            assigned.append(run)
                            slots[supervisor_id] -= 1
            if notify and len(assigned) < len(made):
                await _jobs_queued(conn)
            return made, assigned

        return await self._write(write)

    async def get_job(self, job_id: str) -> JobView | None:
        return await self._read(lambda conn: jobs_sql.load_job(conn, job_id))

    async def list_jobs(self, where: JobFilter) -> list[tuple[int, JobSummary]]:
        return await self._read(lambda conn: jobs_sql.list_jobs(conn, where))

    async def job_events(self, job_id: str) -> list[JobEvent] | None:
        return await self._read(lambda conn: jobs_sql.job_events(conn, job_id))

    async def delete_job(self, job_id: str) -> str:
        return await self._write(lambda conn: jobs_sql.delete_job(conn, job_id))

    async def request_cancel(self, job_id: str, actor: str = "") -> CancelResult | None:
        return await self._write(lambda conn: jobs_sql.cancel_job(conn, job_id, actor))

    async def expire(self, run_grace_s: float) -> Expired:
        now = time.time()

        async def write(conn: Connection) -> Expired:
            ended = await jobs_sql.expire_queued(conn, now)
            return Expired(await runs.expire_runs(conn, run_grace_s, now), ended)

        return await self._write(write)

    # --- placement -------------------------------------------------------------------

    async def placement_snapshot(
        self, queue_limit: Callable[[list[SupervisorView]], int]
    ) -> PlacementSnapshot:
        # One read-only transaction: a pass sees a single snapshot of the store.
        async def read(conn: Connection) -> PlacementSnapshot:
            fleet = await supervisors.load_supervisors(conn, None)
            limit = queue_limit(fleet)
            devices = await lab.lab_devices(conn, checked=self.checked_classes) if fleet else []
            return PlacementSnapshot(
                fleet=fleet,
                resources_in_use=await placement.resources_in_use(conn) if fleet else {},
                busy_keys=await placement.busy_keys(conn),
                queue=await placement.queued_jobs(conn, limit) if limit > 0 else [],
                next_backoff_end=await placement.next_backoff_end(conn),
                devices_free=free_devices(devices),
                checks=awaiting_checks(devices),
                devices_reserved=reserved_devices(devices),
                lab=devices,
            )

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
        keyring, checked, me = self._keyring, self.checked_classes, self.replica_id

        async def write(conn: Connection) -> list[Assignment]:
            made = []
            # Supervisors' rows are locked in id order (as each assignment takes them), so
            # two replicas assigning to the same supervisors never wait on each other in a
            # circle.
            slots = await _lock_owned(conn, {s for _, s in pairs}, me)
            # The runs' time is read once the locks are held: a run that ended on these
            # supervisors meanwhile (its events hold the supervisor's row) ended before it,
            # so a device it gave back is never recorded as held by two runs at once.
            now = time.time()
            for job_id, supervisor_id in pairs:
                if slots.get(supervisor_id, 0) <= 0:
                    continue  # its connection is another replica's now, or its slots are
                run = await placement.assign_run(conn, job_id, supervisor_id, now, keyring, checked)
                if run is not None:
                    made.append(run)
                    slots[supervisor_id] -= 1
            return made

        return await self._write(write)

    # --- runs and their output -------------------------------------------------------

    async def run_phase(self, job_id: str, attempt: int) -> Phase | None:
        return await self._read(lambda conn: runs.run_phase(conn, job_id, attempt))

    async def read_output(
        self, job_id: str, attempt: int, stream: Stream, start: int = 0, end: int | None = None
    ) -> bytes:
        return await self._read(
            lambda conn: runs.read_output(conn, job_id, attempt, stream, start, end)
        )

    def apply_events(
        self,
        supervisor_id: str,
        events: Sequence[SupervisorEvent],
        after_seq: int = 0,
        waited: Callable[[str], bool] | None = None,
    ) -> asyncio.Task[EventsApplied]:
        # (`waited` is not used: the waiters' pass over the change log finds the endings.)
        # Started now: the task takes the supervisor's lock before anything else, and the
        # lock wakes waiters in order, so batches are stored in the order handed over.
        lock = self._batches.setdefault(supervisor_id, asyncio.Lock())
        return asyncio.ensure_future(self._apply(lock, supervisor_id, events, after_seq))

    async def _apply(
        self,
        lock: asyncio.Lock,
        supervisor_id: str,
        events: Sequence[SupervisorEvent],
        after_seq: int,
    ) -> EventsApplied:
        session = SESSION.get()
        if session is not None and session[0] != supervisor_id:
            session = None  # not this supervisor's connection: _write fences as usual

        async def write(conn: Connection) -> EventsApplied:
            row = await conn.fetchrow(
                "SELECT last_seq, session, connected FROM supervisors WHERE id = $1 FOR UPDATE",
                supervisor_id,
            )
            if session is not None:
                replicas.check_session(session, row)
            assert row is not None, "a connected supervisor has its row"
            stored = row["last_seq"]
            if stored < after_seq:
                raise BatchOutOfOrder(
                    f"events of {supervisor_id} up to seq {after_seq} are not stored"
                    f" (stored: {stored}): the batch after them is not stored either"
                )
            batch = runs.EventBatch(conn, supervisor_id, self.max_run_output)
            for event in fresh_events(stored, events, batch.problems):
                stored = event.seq
                await batch.apply(event)
            await batch.finish()
            await conn.execute(
                "UPDATE supervisors SET last_seq = $1, last_seen = $2 WHERE id = $3",
                stored,
                time.time(),
                supervisor_id,
            )
            return EventsApplied(stored, batch.ended, batch.unwanted, batch.problems, batch.reports)

        async with lock:
            return await self._write(write, checks_session=session is not None)

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
        return await self._read(views.stored_output_bytes)

    async def ended_jobs(
        self, *, ended_before: float | None = None, with_output: bool = False, limit: int
    ) -> list[str]:
        return await self._read(
            lambda conn: views.ended_jobs(conn, ended_before, with_output, limit)
        )

    async def drop_output(self, job_id: str, max_rows: int, reason: str | None = None) -> int:
        return await self._write(lambda conn: views.drop_output(conn, job_id, max_rows, reason))

    # --- supervisors -----------------------------------------------------------------

    async def supervisor_connected(
        self, hello: Hello, *, token_id: str | None = None, enrol: Enrolment | None = None
    ) -> Connected:
        now = time.time()
        return await self._write_supervisor(
            lambda conn: supervisors.connected(conn, hello, token_id, enrol, now, self.replica_id)
        )

    async def unenroll(self, supervisor_id: str) -> list[str] | None:
        now = time.time()
        return await self._write_credentials(
            lambda conn: supervisors.unenroll(conn, supervisor_id, now)
        )

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
        me = self.replica_id

        async def write(conn: Connection) -> None:
            await replicas.register(conn, me)
            await supervisors.forget_connections(conn, now, me)

        await self._write_supervisor(write)

    # --- replicas on one database ------------------------------------------------------

    async def claim_lease(self, ttl_s: float) -> tuple[Claim, dict[str, int] | None]:
        me = self.replica_id
        # Every replica every few seconds: no reader of jobs is woken for it.
        return await self._engine.write(
            lambda conn: replicas.claim_lease(conn, me, ttl_s), quiet=True
        )

    async def leave(self) -> None:
        me = self.replica_id
        await self._write(lambda conn: replicas.leave(conn, me))

    async def reap_replicas(self, dead_after_s: float) -> list[str]:
        now = time.time()
        return await self._write_supervisor(lambda conn: replicas.reap(conn, dead_after_s, now))

    async def send_commands(self, commands: Sequence[tuple[str, StopJob]]) -> None:
        now, notify = time.time(), self.notify
        await self._write(lambda conn: replicas.add_commands(conn, commands, now, notify))

    async def take_commands(self, supervisor_ids: Collection[str]) -> list[SupervisorCommand]:
        ids = sorted(supervisor_ids)
        # Looked for every second: a read, unless there are some to take.
        if not ids or not await self._read(lambda conn: replicas.commands_waiting(conn, ids)):
            return []
        now = time.time()
        return await self._write(lambda conn: replicas.take_commands(conn, ids, now))

    async def ask_power(self, supervisor_id: str, device_id: str, action: str) -> int | None:
        now, notify = time.time(), self.notify
        return await self._write(
            lambda conn: replicas.ask_power(conn, supervisor_id, device_id, action, now, notify)
        )

    async def answer_power(self, seq: int, answer: str) -> bool:
        notify = self.notify
        return await self._write(lambda conn: replicas.answer_power(conn, seq, answer, notify))

    async def power_answer(self, seq: int) -> tuple[bool, str | None]:
        return await self._read(lambda conn: replicas.power_answer(conn, seq))

    async def forget_command(self, seq: int) -> None:
        await self._write(lambda conn: replicas.forget_command(conn, seq))

    async def list_supervisors(self) -> list[SupervisorView]:
        return await self._read(lambda conn: supervisors.load_supervisors(conn, None))

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

    # --- the dashboard's views -------------------------------------------------------

    async def job_changes(self, after_rev: int, limit: int) -> list[JobChange]:
        return await self._read(
            lambda conn: views.job_changes(conn, after_rev, limit, self._change_gaps)
        )

    async def latest_job_change(self) -> int:
        return await self._read(views.latest_job_change)

    async def prune_job_changes(self, keep: int) -> None:
        await self._write(lambda conn: views.prune_job_changes(conn, keep))

    async def overview(self, now: float, minutes: int, failures: int) -> Overview:
        return await self._read(lambda conn: views.overview(conn, now, minutes, failures))

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

    async def lab_devices(self) -> list[LabDevice]:
        checked = self.checked_classes
        return await self._read(lambda conn: lab.lab_devices(conn, checked=checked))

    async def device_counts(self) -> dict[tuple[str, str], int]:
        return await self._read(lab.health_counts)

    async def device_facts(self) -> list[DeviceFacts]:
        return await self._read(lab.device_facts)

    async def create_checks(self, checks: Sequence[tuple[str, JobSpec, str]], actor: str) -> None:
        batch = new_jobs(self._keyring, [(job_id, spec) for job_id, spec, _ in checks])
        now = time.time()

        async def write(conn: Connection) -> None:
            # Not held to the queue's limits: there is at most one check per device.
            await jobs_sql.insert_jobs(conn, batch, actor, max_queued=2**62)
            await lab.start_checks(conn, [(job_id, device) for job_id, _, device in checks], now)

        await self._write_supervisor(write)

    # The health-check loop asks these twice a second: a read says whether there is
    # anything to write, so an idle lab costs no write.

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
        batch = new_jobs(
            self._keyring, [(i, r.spec) for i, r in zip(job_ids, group.roles, strict=True)]
        )
        roles = [(r.role, r.essential, job) for r, job in zip(group.roles, batch, strict=True)]

        async def write(conn: Connection) -> GroupView:
            now = time.time()
            await groups.create_group(
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
            found = await groups.get_group(conn, group_id)
            assert found is not None
            return found

        return await self._write(write)

    async def get_group(self, group_id: str) -> GroupView | None:
        return await self._read(lambda conn: groups.get_group(conn, group_id))

    async def list_groups(self, limit: int = 100) -> list[GroupView]:
        return await self._read(lambda conn: groups.list_groups(conn, limit))

    async def waiting_groups(self, limit: int = 100) -> list[tuple[str, list[RoleNeed]]]:
        return await self._read(lambda conn: groups.waiting_groups(conn, limit))

    async def assign_group(
        self, group_id: str, pairs: Sequence[tuple[str, str]]
    ) -> list[Assignment]:
        keyring, checked = self._keyring, self.checked_classes
        me, notify = self.replica_id, self.notify

        async def write(conn: Connection) -> list[Assignment]:
            # Its hosts may be connected to any replica: a StartJob for a socket held by
            # another goes to it as a command, in this transaction.
            supervisor_ids = {s for _, s in pairs}
            here = await placement.lock_hosts(conn, supervisor_ids, me)
            slots = await placement.free_slots(conn, here)
            wanted = Counter(s for _, s in pairs)
            if here.keys() != supervisor_ids or any(slots[s] < n for s, n in wanted.items()):
                # All or none: a host of it went away (or was drained), or its slots were
                # taken since the pass looked.
                raise NotAllPlaced(group_id)
            now = time.time()
            made = await groups.assign_group(conn, group_id, pairs, now, keyring, checked)
            elsewhere = [
                (r.supervisor_id, r.job_id, r.attempt) for r in made if not here[r.supervisor_id]
            ]
            if elsewhere:
                await replicas.add_starts(conn, elsewhere, now, notify)
            return made

        try:
            return await self._write(write)
        except NotAllPlaced:
            return []  # rolled back: nothing is held

    async def sweep_groups(self, limit: int = 500) -> GroupSweep:
        if not await self._read(groups.groups_to_sweep):
            return GroupSweep([], [], await self._read(groups.groups_open))
        return await self._write(lambda conn: groups.sweep(conn, time.time(), limit))

    async def create_reservation(
        self,
        reservation_id: str,
        wanted: ReservationWanted,
        duration_s: float,
        owner: str | None,
        actor: str,
        ttl_s: float,
    ) -> ReservationView | str:
        now = time.time()

        async def write(conn: Connection) -> ReservationView | str:
            refusal = reservation_refusal(wanted, await lab.lab_devices(conn))
            if refusal is not None:
                return refusal
            return await reservations.create(
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


async def _lock_owned(conn: Connection, supervisor_ids: set[str], me: str) -> dict[str, int]:
    """Lock the rows of these supervisors (placement.lock_hosts); of those whose connection
    this replica holds, and not drained, the free slots. A job's run is given only to a
    supervisor whose socket is here (its StartJob is sent on it), never to one drained,
    even through another replica since this one last looked, and never past its slots
    (another replica may have given it a job group's run since this one looked)."""
    hosts = await placement.lock_hosts(conn, supervisor_ids, me)
    owned = [s for s, here in hosts.items() if here]
    return await placement.free_slots(conn, owned) if owned else {}


async def _jobs_queued(conn: Connection) -> None:
    """Tell the other replicas (when this commits) that jobs wait: their dispatchers place
    them on the supervisors they hold."""
    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, JOBS_QUEUED)
