"""The embedded store: one SQLite file in WAL mode.

One writer thread owns the only write connection. Write requests queue up while a
transaction runs and the next transaction takes all of them at once (group commit); each
request's future resolves only after COMMIT, so whatever a caller acknowledges on the
strength of it is durable. In a group, each request runs inside a SAVEPOINT, so one
failing request doesn't undo the others.

Reads run in a small pool of threads, each with its own read-only connection (WAL lets
them read while the writer writes).

`synchronous=NORMAL` in WAL mode survives the process being killed at any moment (the WAL
is in the OS's hands once written); only a power cut can take the last transactions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from protocol.limits import MAX_OUTPUT_CHUNK
from protocol.messages import (
    Hello,
    Stream,
    SupervisorEvent,
)
from protocol.spec import JobSpec
from protocol.state import Phase, can_transition
from switchboard import datadir, lifecycle, metrics
from switchboard.models import (
    ActiveRun,
    Assignment,
    JobChange,
    JobEvent,
    JobSummary,
    JobView,
    Overview,
    PhaseEntry,
    QueuedJob,
    RunKey,
    RunView,
    SupervisorSession,
    SupervisorView,
    TokenView,
)
from switchboard.sealing import Keyring, SecretsUnreadable, split_secrets
from switchboard.store import sqlite_artifacts as artifacts
from switchboard.store import sqlite_retention as retention
from switchboard.store import sqlite_views as views
from switchboard.store.base import (
    ArtifactAdded,
    ArtifactDeleted,
    ArtifactView,
    BatchOutOfOrder,
    CancelResult,
    Connected,
    ConnectRefused,
    Counts,
    Enrolment,
    EventsApplied,
    Expired,
    JobFilter,
    PlacementSnapshot,
    RunOnSupervisor,
    Store,
    Submitted,
)
from switchboard.store.schema import ACTIVE_PHASES, ACTIVE_SQL, apply_schema
from switchboard.store.sqlite_jobs import (
    NewJob,
    cancel_job,
    delete_job,
    end_queued_job,
    insert_jobs,
    job_events,
    list_jobs,
    record_events,
)
from switchboard.store.sqlite_runs import EventBatch, record_phase, set_run_phase
from switchboard.store.sqlite_secrets import reseal, seal_legacy_secrets, spec_to_start

log = logging.getLogger("switchboard.store")

T = TypeVar("T")


_spec_decoder = msgspec.json.Decoder(JobSpec)
_encoder = msgspec.json.Encoder()


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    if readonly:
        conn.execute("PRAGMA query_only=ON")
    else:
        # What is deleted (dropped sealed secrets among it) is overwritten with zeros where
        # that costs no extra write.
        conn.execute("PRAGMA secure_delete=FAST")
    return conn


class _Writer(threading.Thread):
    """The one thread that writes; commits whatever requests have gathered as one group."""

    MAX_GROUP = 512

    def __init__(self, path: Path) -> None:
        super().__init__(name="sqlite-writer", daemon=True)
        self.conn = _connect(path, readonly=False)
        self.requests: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def run(self) -> None:
        while True:
            first = self.requests.get()
            if first is None:
                break
            group = [first]
            while len(group) < self.MAX_GROUP:
                try:
                    item = self.requests.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self.requests.put(None)  # finish this group, then stop
                    break
                group.append(item)
            self._commit_group(group)
        self.conn.close()

    def _commit_group(self, group: list[Any]) -> None:
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        started = time.perf_counter()
        # A request alone needs no savepoint: undoing the transaction undoes just it.
        alone = len(group) == 1
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            for fn, future in group:
                if not alone:
                    self.conn.execute("SAVEPOINT request")
                mark = metrics.staged_mark()
                try:
                    value = fn(self.conn)
                except BaseException as exc:
                    if alone:
                        raise
                    metrics.staged_drop(mark)
                    self.conn.execute("ROLLBACK TO request")
                    self.conn.execute("RELEASE request")
                    results.append((future, None, exc))
                else:
                    if not alone:
                        self.conn.execute("RELEASE request")
                    results.append((future, value, None))
            self.conn.execute("COMMIT")
            metrics.STORE_COMMIT_SECONDS.observe(time.perf_counter() - started)
            metrics.staged_commit()
        except BaseException as exc:
            metrics.staged_drop()
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            results = [(future, None, exc) for _, future in group]
        for future, value, exc in results:
            future.get_loop().call_soon_threadsafe(_resolve, future, value, exc)


def _token_valid(conn: sqlite3.Connection, token_id: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM tokens WHERE id = ? AND revoked_at IS NULL", (token_id,)
    ).fetchone()
    return row is not None


def _enrol(conn: sqlite3.Connection, supervisor_id: str, enrol: Enrolment, now: float) -> None:
    """Store `enrol` as the supervisor's credential: a supervisor token bound to it. Only
    an id with no host credential (no valid token bound to it) may be enrolled."""
    held = conn.execute(
        "SELECT 1 FROM tokens WHERE supervisor_id = ? AND revoked_at IS NULL LIMIT 1",
        (supervisor_id,),
    ).fetchone()
    if held is not None:
        raise ConnectRefused("enrolled")
    if conn.execute("SELECT 1 FROM tokens WHERE hash = ?", (enrol.digest,)).fetchone():
        raise ConnectRefused("credential_taken")
    conn.execute(
        "INSERT INTO tokens (id, role, name, hash, created_at, supervisor_id)"
        " VALUES (?, 'supervisor', ?, ?, ?, ?)",
        (enrol.token_id, enrol.name, enrol.digest, now, supervisor_id),
    )


def _resolve(future: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)


#: How long a valid token's lookup is reused, and how many are kept. Revocations through
#: this process take effect at once; the time bounds one made by another process.
TOKEN_CACHE_S = 10.0
TOKEN_CACHE_SIZE = 10_000


class SQLiteStore(Store):
    """`keyring` seals secret parameter values (switchboard/sealing.py). Without one, the
    store seals them with a key of its own that dies with it (tests; the token bootstrap,
    which stores no jobs), and leaves stored secrets as they are when it opens.
    `max_run_output`: the bytes of output one run may store, all streams together (None:
    no cap); see EventBatch."""

    def __init__(
        self,
        path: Path,
        *,
        readers: int = 4,
        keyring: Keyring | None = None,
        max_run_output: int | None = None,
    ) -> None:
        self.path = path
        self._readers = readers
        self._keyring = keyring or Keyring.ephemeral()
        self._keyring_given = keyring is not None
        self.max_run_output = max_run_output
        self._writer: _Writer | None = None
        self._read_pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._read_conns: list[sqlite3.Connection] = []
        #: Bumped by every write to a supervisor's record (see Store.supervisor_writes).
        self.supervisor_writes = 0
        #: (supervisor_writes, the listing it was read at): see list_supervisors.
        self._fleet: tuple[int, list[SupervisorView]] | None = None
        #: Called after each write request has finished (the live feed wakes on them).
        self._write_listeners: list[Callable[[], None]] = []
        #: digest -> (valid token, when it was read); see find_token.
        self._tokens: dict[bytes, tuple[TokenView, float]] = {}
        self._token_generation = 0
        self._conns_lock = threading.Lock()

    # --- plumbing --------------------------------------------------------------------

    async def open(self) -> None:
        # Private from the start: SQLite makes the -wal and -shm files with the database
        # file's mode, so it is created 0600 before SQLite opens it.
        datadir.private_dir(self.path.parent)
        datadir.private_file(self.path)
        for suffix in ("-wal", "-shm", "-journal"):
            datadir.tighten_if_present(self.path.with_name(self.path.name + suffix))
        setup = _connect(self.path, readonly=False)
        try:
            self._upgrade_and_reseal(setup)
        finally:
            setup.close()
        self._writer = _Writer(self.path)
        self._writer.start()
        self._read_pool = ThreadPoolExecutor(self._readers, thread_name_prefix="sqlite-read")

    def _upgrade_and_reseal(self, conn: sqlite3.Connection) -> None:
        keyring = self._keyring if self._keyring_given else None
        found = 0

        def upgrade(conn: sqlite3.Connection, version: int) -> None:
            nonlocal found
            found = seal_legacy_secrets(conn, keyring)

        conn.execute("PRAGMA secure_delete=ON")  # the specs rewritten lose their old values
        apply_schema(conn, upgrade)
        if found:
            # Values an older version kept in clear may linger in free pages and the WAL:
            # rewrite the file once, and empty the WAL.
            log.warning(
                "moved the secret values of %d jobs out of their stored specs; rewriting the"
                " database once to leave no trace of them",
                found,
            )
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if keyring is None:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            resealed, unreadable = reseal(conn, keyring)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if resealed:
            log.info("sealed the secret values of %d jobs again with the current key", resealed)
        if unreadable:
            log.warning(
                "%d jobs hold secret values sealed with a key this switchboard does not have"
                " (key ids %s): they will be rejected when placed; start the switchboard with"
                " the key file they were sealed with to run them",
                sum(unreadable.values()),
                ", ".join(sorted(unreadable)),
            )

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.requests.put(None)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        if self._read_pool is not None:
            self._read_pool.shutdown(wait=True)
            self._read_pool = None
        with self._conns_lock:
            for conn in self._read_conns:
                conn.close()
            self._read_conns.clear()

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._hand_to_writer(fn)

    def _hand_to_writer(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue a write request now (requests are applied in the order handed over); the
        future resolves once it is committed."""
        assert self._writer is not None, "store is not open"
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._writer.requests.put((fn, future))
        future.add_done_callback(self._tell_listeners)
        return future

    def _tell_listeners(self, _: asyncio.Future[Any]) -> None:
        for listener in self._write_listeners:
            listener()

    def on_write(self, listener: Callable[[], None]) -> None:
        self._write_listeners.append(listener)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        assert self._read_pool is not None, "store is not open"
        return await asyncio.get_running_loop().run_in_executor(
            self._read_pool, self._with_read_conn, fn
        )

    def _with_read_conn(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path, readonly=True)
            self._local.conn = conn
            with self._conns_lock:
                self._read_conns.append(conn)
        return fn(conn)

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
            if replace_bound and supervisor_id is not None:
                conn.execute(
                    "UPDATE tokens SET revoked_at = ?"
                    " WHERE supervisor_id = ? AND revoked_at IS NULL",
                    (now, supervisor_id),
                )
            conn.execute(
                "INSERT INTO tokens (id, role, name, hash, created_at, supervisor_id)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (token_id, role, name, digest, now, supervisor_id),
            )

        if not replace_bound:
            await self._write(write)
            return
        self._forget_tokens()  # it revokes the tokens bound to the supervisor
        try:
            await self._write(write)
        finally:
            self._forget_tokens()

    async def find_token(self, digest: bytes) -> TokenView | None:
        # Every request looks its token up: valid tokens are remembered for a while. Any
        # revocation in this process forgets them all at once (and a lookup that raced
        # with one is not remembered), so a revoked token fails on its very next request.
        cached = self._tokens.get(digest)
        if cached is not None and time.monotonic() - cached[1] < TOKEN_CACHE_S:
            return cached[0]
        generation = self._token_generation

        def read(conn: sqlite3.Connection) -> TokenView | None:
            row = conn.execute(
                "SELECT id, role, name, created_at, 0, supervisor_id FROM tokens"
                " WHERE hash = ? AND revoked_at IS NULL",
                (digest,),
            ).fetchone()
            return TokenView(*row) if row else None

        token = await self._read(read)
        if token is not None and generation == self._token_generation:
            if len(self._tokens) >= TOKEN_CACHE_SIZE:
                self._tokens.clear()
            self._tokens[digest] = (token, time.monotonic())
        return token

    def _forget_tokens(self) -> None:
        self._token_generation += 1
        self._tokens.clear()

    async def list_tokens(self) -> list[TokenView]:
        def read(conn: sqlite3.Connection) -> list[TokenView]:
            rows = conn.execute(
                "SELECT id, role, name, created_at, revoked_at IS NOT NULL, supervisor_id"
                " FROM tokens ORDER BY created_at, id"
            ).fetchall()
            return [TokenView(r[0], r[1], r[2], r[3], bool(r[4]), r[5]) for r in rows]

        return await self._read(read)

    async def revoke_token(self, token_id: str) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            if conn.execute("SELECT 1 FROM tokens WHERE id = ?", (token_id,)).fetchone() is None:
                return False
            conn.execute(
                "UPDATE tokens SET revoked_at = coalesce(revoked_at, ?) WHERE id = ?",
                (time.time(), token_id),
            )
            return True

        self._forget_tokens()
        try:
            return await self._write(write)
        finally:
            self._forget_tokens()

    # --- switchboard-wide state ------------------------------------------------------

    async def dispatch_paused(self) -> bool:
        def read(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT value FROM switchboard_state WHERE key = 'dispatch_paused'"
            ).fetchone()
            return row is not None and row[0] == "1"

        return await self._read(read)

    async def set_dispatch_paused(self, paused: bool) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO switchboard_state (key, value) VALUES ('dispatch_paused', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                ("1" if paused else "0",),
            )

        await self._write(write)

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

    def _sealed(self, jobs: Sequence[tuple[str, JobSpec]]) -> list[NewJob]:
        """The jobs as they are written: secret values out of the specs, sealed."""
        batch = []
        for job_id, spec in jobs:
            stored, values = split_secrets(spec)
            sealed = self._keyring.seal(job_id, values) if values else None
            batch.append(NewJob(job_id, stored, sealed))
        return batch

    async def create_jobs(
        self,
        jobs: Sequence[tuple[str, JobSpec]],
        actor: str,
        max_queued: int,
        *,
        owner: str | None = None,
        max_queued_per_owner: int | None = None,
    ) -> list[Submitted]:
        batch = self._sealed(jobs)
        return await self._write(
            lambda conn: insert_jobs(
                conn, batch, actor, max_queued, owner=owner, max_per_owner=max_queued_per_owner
            )
        )

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
        batch = self._sealed(jobs)
        keyring = self._keyring

        def write(conn: sqlite3.Connection) -> tuple[list[Submitted], list[Assignment]]:
            clear = _no_job_ready(conn, time.time())  # before the insert: older jobs only
            made = insert_jobs(
                conn, batch, actor, max_queued, owner=owner, max_per_owner=max_queued_per_owner
            )
            assigned = []
            if clear:
                now = time.time()  # after the submission's own record
                for submitted in made:
                    supervisor_id = placements.get(submitted.id)
                    if supervisor_id is not None and submitted.phase == Phase.QUEUED.value:
                        run = _assign_run(conn, submitted.id, supervisor_id, now, keyring)
                        if run is not None:
                            assigned.append(run)
            return made, assigned

        return await self._write(write)

    async def list_jobs(self, where: JobFilter) -> list[tuple[int, JobSummary]]:
        return await self._read(lambda conn: list_jobs(conn, where))

    async def job_events(self, job_id: str) -> list[JobEvent] | None:
        return await self._read(lambda conn: job_events(conn, job_id))

    async def delete_job(self, job_id: str) -> str:
        return await self._write(lambda conn: delete_job(conn, job_id))

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
                return PlacementSnapshot(
                    fleet=fleet,
                    resources_in_use=_resources_in_use(conn) if fleet else {},
                    busy_keys=_busy_keys(conn),
                    queue=_queued_jobs(conn, limit) if limit > 0 else [],
                    next_backoff_end=_next_backoff_end(conn),
                )
            finally:
                conn.execute("COMMIT")

        return await self._read(read)

    async def set_unschedulable(self, reasons: dict[str, str | None]) -> None:
        def write(conn: sqlite3.Connection) -> None:
            for job_id, reason in reasons.items():
                conn.execute(
                    "UPDATE jobs SET unschedulable = ? WHERE id = ? AND phase = 'queued'",
                    (reason, job_id),
                )

        await self._write(write)

    async def expire(self, run_grace_s: float) -> Expired:
        now = time.time()

        def write(conn: sqlite3.Connection) -> Expired:
            jobs = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM jobs WHERE queue_deadline <= ? AND phase = 'queued'", (now,)
                ).fetchall()
            ]
            for job_id in jobs:
                end_queued_job(conn, job_id, lifecycle.queue_timed_out(now))
            # A run is due once it has been running for its timeout (or assigned for it, if
            # it never got to running), plus the grace the supervisor has to report it.
            rows = conn.execute(
                "SELECT r.job_id, r.attempt, r.supervisor_id FROM runs r"
                " JOIN jobs j ON j.id = r.job_id"
                f" WHERE r.phase IN ({ACTIVE_SQL}) AND j.timeout_s IS NOT NULL"
                " AND coalesce(r.started_at, r.created_at) + j.timeout_s + ? <= ?",
                (*ACTIVE_PHASES, run_grace_s, now),
            ).fetchall()
            runs = []
            for job_id, attempt, supervisor_id in rows:
                event = lifecycle.run_timed_out(attempt, now)
                set_run_phase(conn, job_id, attempt, Phase.TIMED_OUT, None, event.message, now)
                record_events(conn, job_id, [event])
                runs.append(RunOnSupervisor(job_id, attempt, supervisor_id))
            return Expired(runs, jobs)

        return await self._write(write)

    async def queue_length(self) -> int:
        def read(conn: sqlite3.Connection) -> int:
            return conn.execute("SELECT count(*) FROM jobs WHERE phase = 'queued'").fetchone()[0]

        return await self._read(read)

    async def counts(self) -> Counts:
        def read(conn: sqlite3.Connection) -> Counts:
            jobs = dict(conn.execute("SELECT phase, count(*) FROM jobs GROUP BY phase"))
            queued = conn.execute(
                "SELECT CASE WHEN unschedulable IS NOT NULL THEN 'unschedulable'"
                " WHEN not_before > ? THEN 'backoff' ELSE 'ready' END, count(*)"
                " FROM jobs WHERE phase = 'queued' GROUP BY 1",
                (time.time(),),
            )
            drained = conn.execute("SELECT id FROM supervisors WHERE connected AND drained")
            return Counts(jobs, dict(queued), [row[0] for row in drained])

        return await self._read(read)

    async def get_job(self, job_id: str) -> JobView | None:
        return await self._read(lambda conn: _load_job(conn, job_id))

    async def queued_jobs(
        self, limit: int, *, after: tuple[int, int] | None = None, marked: bool = False
    ) -> list[QueuedJob]:
        return await self._read(lambda conn: _queued_jobs(conn, limit, after, marked))

    async def assign(self, pairs: Sequence[tuple[str, str]]) -> list[Assignment]:
        keyring = self._keyring

        def write(conn: sqlite3.Connection) -> list[Assignment]:
            now = time.time()
            made = (
                _assign_run(conn, job_id, supervisor_id, now, keyring)
                for job_id, supervisor_id in pairs
            )
            return [run for run in made if run is not None]

        return await self._write(write)

    async def request_cancel(self, job_id: str, actor: str = "") -> CancelResult | None:
        return await self._write(lambda conn: cancel_job(conn, job_id, actor))

    async def run_phase(self, job_id: str, attempt: int) -> Phase | None:
        def read(conn: sqlite3.Connection) -> Phase | None:
            row = conn.execute(
                "SELECT phase FROM runs WHERE job_id = ? AND attempt = ?", (job_id, attempt)
            ).fetchone()
            return Phase(row[0]) if row else None

        return await self._read(read)

    async def read_output(
        self, job_id: str, attempt: int, stream: Stream, start: int = 0, end: int | None = None
    ) -> bytes:
        def read(conn: sqlite3.Connection) -> bytes:
            stop = end if end is not None else 1 << 62
            rows = conn.execute(
                "SELECT offset, data FROM output WHERE job_id = ? AND attempt = ? AND stream = ?"
                " AND offset < ? AND offset > ? AND offset + length(data) > ? ORDER BY offset",
                # No stored chunk is longer than MAX_OUTPUT_CHUNK: a lower bound for the index.
                (job_id, attempt, stream, stop, start - MAX_OUTPUT_CHUNK - 1, start),
            ).fetchall()
            parts = []
            for offset, data in rows:
                lo = max(start - offset, 0)
                hi = min(stop - offset, len(data))
                parts.append(data[lo:hi])
            return b"".join(parts)

        return await self._read(read)

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

        def write(conn: sqlite3.Connection) -> Connected:
            if token_id is not None and not _token_valid(conn, token_id):
                raise ConnectRefused("token_revoked")
            if enrol is not None:
                _enrol(conn, hello.supervisor_id, enrol, now)
            conn.execute(
                "INSERT INTO supervisors (id, name, first_seen) VALUES (?, ?, ?)"
                " ON CONFLICT (id) DO NOTHING",
                (hello.supervisor_id, hello.name, now),
            )
            conn.execute(
                "UPDATE supervisors SET name = ?, labels = ?, backends = ?, resources = ?,"
                " max_jobs = ?, software = ?, session = session + 1, connected = 1,"
                " connected_at = ?, last_seen = ? WHERE id = ?",
                (
                    hello.name,
                    json.dumps(hello.labels),
                    json.dumps(hello.backends),
                    json.dumps(hello.resources),
                    hello.max_jobs,
                    hello.software,
                    now,
                    now,
                    hello.supervisor_id,
                ),
            )
            session, last_seq = conn.execute(
                "SELECT session, last_seq FROM supervisors WHERE id = ?", (hello.supervisor_id,)
            ).fetchone()
            views.record_session_start(conn, hello.supervisor_id, session, now)
            return Connected(session, last_seq)

        try:
            return await self._write(write)
        finally:
            self.supervisor_writes += 1  # after the commit: readers see the change

    async def unenroll(self, supervisor_id: str) -> list[str] | None:
        def write(conn: sqlite3.Connection) -> list[str] | None:
            bound = [
                row[0]
                for row in conn.execute(
                    "SELECT id FROM tokens WHERE supervisor_id = ? AND revoked_at IS NULL",
                    (supervisor_id,),
                )
            ]
            known = conn.execute(
                "SELECT 1 FROM supervisors WHERE id = ?"
                " UNION ALL SELECT 1 FROM tokens WHERE supervisor_id = ? LIMIT 1",
                (supervisor_id, supervisor_id),
            ).fetchone()
            if known is None:
                return None
            conn.execute(
                "UPDATE tokens SET revoked_at = ? WHERE supervisor_id = ? AND revoked_at IS NULL",
                (time.time(), supervisor_id),
            )
            return bound

        self._forget_tokens()
        try:
            return await self._write(write)
        finally:
            self._forget_tokens()

    async def active_runs(self, supervisor_id: str) -> list[ActiveRun]:
        keyring = self._keyring

        def read(conn: sqlite3.Connection) -> list[ActiveRun]:
            rows = conn.execute(
                "SELECT r.job_id, r.attempt, r.phase, j.cancel_requested, j.spec, s.sealed"
                " FROM runs r JOIN jobs j ON j.id = r.job_id"
                " LEFT JOIN job_secrets s ON s.job_id = r.job_id"
                f" WHERE r.supervisor_id = ? AND r.phase IN ({ACTIVE_SQL})",
                (supervisor_id, *ACTIVE_PHASES),
            ).fetchall()
            return [_active_run(row, keyring) for row in rows]

        return await self._read(read)

    async def supervisor_disconnected(
        self, supervisor_id: str, session: int, reason: str = "disconnected"
    ) -> None:
        now = time.time()

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE supervisors SET connected = 0, last_seen = ? WHERE id = ? AND session = ?",
                (now, supervisor_id, session),
            )
            views.record_session_end(conn, supervisor_id, session, now, reason)

        try:
            await self._write(write)
        finally:
            self.supervisor_writes += 1  # after the commit: readers see the change

    async def forget_connections(self) -> None:
        def write(conn: sqlite3.Connection) -> None:
            now = time.time()
            conn.execute(
                "UPDATE supervisors SET connected = 0, last_seen = ? WHERE connected = 1", (now,)
            )
            views.record_session_end(conn, None, None, now, "the switchboard restarted")

        try:
            await self._write(write)
        finally:
            self.supervisor_writes += 1  # after the commit: readers see the change

    async def lose_runs(self, grace_s: float) -> list[RunKey]:
        now = time.time()

        def write(conn: sqlite3.Connection) -> list[RunKey]:
            rows = conn.execute(
                "SELECT r.job_id, r.attempt FROM runs r JOIN supervisors s"
                " ON s.id = r.supervisor_id WHERE s.connected = 0 AND s.last_seen < ?"
                f" AND r.phase IN ({ACTIVE_SQL})",
                (now - grace_s, *ACTIVE_PHASES),
            ).fetchall()
            message = lifecycle.lost_message(grace_s)
            for job_id, attempt in rows:
                set_run_phase(conn, job_id, attempt, Phase.LOST, None, message, now)
            return [RunKey(job_id, attempt) for job_id, attempt in rows]

        return await self._write(write)

    async def list_supervisors(self) -> list[SupervisorView]:
        return await self._read(self._fleet_views)

    def _fleet_views(self, conn: sqlite3.Connection) -> list[SupervisorView]:
        """Every supervisor. Each dispatch pass lists them; their records change only with a
        supervisor write (counted), their load with every run: the records are re-read only
        when one was written, the load is counted each time. Runs on a reader thread."""
        # Sampled before the first read: every write counted by then is in what this
        # connection reads, so the listing may be remembered under this count.
        writes = self.supervisor_writes
        counts = _running_counts(conn)
        cached = self._fleet
        if cached is not None and cached[0] == writes:
            return [
                view
                if view.running == counts.get(view.id, 0)
                else msgspec.structs.replace(view, running=counts.get(view.id, 0))
                for view in cached[1]
            ]
        views = _load_supervisors(conn, None, counts)
        self._fleet = (writes, views)
        return views

    async def supervisor_sessions(self, supervisor_id: str, limit: int) -> list[SupervisorSession]:
        return await self._read(lambda conn: views.supervisor_sessions(conn, supervisor_id, limit))

    async def job_changes(self, after_rev: int, limit: int) -> list[JobChange]:
        return await self._read(lambda conn: views.job_changes(conn, after_rev, limit))

    async def latest_job_change(self) -> int:
        return await self._read(views.latest_job_change)

    async def prune_job_changes(self, keep: int) -> None:
        await self._write(lambda conn: views.prune_job_changes(conn, keep))

    async def overview(self, now: float, minutes: int, failures: int) -> Overview:
        return await self._read(lambda conn: views.overview(conn, now, minutes, failures))

    async def get_supervisor(self, supervisor_id: str) -> SupervisorView | None:
        found = await self._read(lambda conn: _load_supervisors(conn, supervisor_id))
        return found[0] if found else None

    async def set_drained(self, supervisor_id: str, drained: bool) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE supervisors SET drained = ? WHERE id = ?", (int(drained), supervisor_id)
            )
            return cursor.rowcount > 0

        try:
            return await self._write(write)
        finally:
            self.supervisor_writes += 1  # after the commit: readers see the change

    async def set_operator_labels(self, supervisor_id: str, labels: dict[str, str]) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE supervisors SET operator_labels = ? WHERE id = ?",
                (json.dumps(labels), supervisor_id),
            )
            return cursor.rowcount > 0

        try:
            return await self._write(write)
        finally:
            self.supervisor_writes += 1  # after the commit: readers see the change

    # --- events ----------------------------------------------------------------------

    def apply_events(
        self, supervisor_id: str, events: Sequence[SupervisorEvent], after_seq: int = 0
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
            batch = EventBatch(conn, supervisor_id, self.max_run_output)
            for event in events:
                if event.seq <= stored:
                    continue  # already stored: a resend after a reconnect
                stored = event.seq
                batch.apply(event)
            batch.finish()
            conn.execute(
                "UPDATE supervisors SET last_seq = ?, last_seen = ? WHERE id = ?",
                (stored, time.time(), supervisor_id),
            )
            return EventsApplied(stored, batch.ended, batch.unwanted)

        return self._hand_to_writer(write)

    async def end_run(self, key: RunKey, phase: str, message: str) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT phase FROM runs WHERE job_id = ? AND attempt = ?",
                (key.job_id, key.attempt),
            ).fetchone()
            if row is None or not can_transition(row[0], phase):
                return False
            set_run_phase(conn, key.job_id, key.attempt, Phase(phase), None, message, time.time())
            return True

        return await self._write(write)


# --- helpers that run inside a transaction ---------------------------------------------


def _load_supervisors(
    conn: sqlite3.Connection, only: str | None, counts: dict[str, int] | None = None
) -> list[SupervisorView]:
    if counts is None:
        counts = _running_counts(conn)
    sql = (
        "SELECT id, name, connected, labels, backends, resources, max_jobs, session,"
        " software, connected_at, last_seen, drained, operator_labels FROM supervisors"
    )
    rows = (
        conn.execute(sql + " WHERE id = ?", (only,))
        if only is not None
        else conn.execute(sql + " ORDER BY id")
    ).fetchall()
    found = []
    for r in rows:
        advertised, operator_labels = json.loads(r[3]), json.loads(r[12])
        found.append(
            SupervisorView(
                id=r[0],
                name=r[1],
                connected=bool(r[2]),
                labels={**advertised, **operator_labels},
                operator_labels=operator_labels,
                advertised_labels=advertised,
                drained=bool(r[11]),
                backends=json.loads(r[4]),
                resources=json.loads(r[5]),
                max_jobs=r[6],
                running=counts.get(r[0], 0),
                session=r[7],
                software=r[8],
                connected_at=r[9],
                last_seen=r[10],
            )
        )
    return found


def _running_counts(conn: sqlite3.Connection) -> dict[str, int]:
    rows = conn.execute(
        f"SELECT supervisor_id, count(*) FROM runs WHERE phase IN ({ACTIVE_SQL})"
        " GROUP BY supervisor_id",
        ACTIVE_PHASES,
    ).fetchall()
    return dict(rows)


def _active_run(row: tuple, keyring: Keyring) -> ActiveRun:
    """A run a supervisor holds. One still `assigned` may need its StartJob again, so its
    secret values are opened (or why they can't be is noted); the others' are left shut."""
    job_id, attempt, phase, cancel_requested, raw, sealed = row
    spec, unreadable = _spec_decoder.decode(raw), None
    if phase == Phase.ASSIGNED:
        try:
            spec = spec_to_start(job_id, spec, sealed, keyring)
        except SecretsUnreadable as exc:
            unreadable = str(exc)
    return ActiveRun(job_id, attempt, Phase(phase), bool(cancel_requested), spec, unreadable)


def _assign_run(
    conn: sqlite3.Connection, job_id: str, supervisor_id: str, now: float, keyring: Keyring
) -> Assignment | None:
    """The job's next run, on that supervisor, with its secret values opened for the
    StartJob; None if the job is no longer queued, or if its secret values can't be
    opened (it is rejected: it could never run with this switchboard's keys)."""
    row = conn.execute(
        "SELECT j.attempts, j.spec, s.sealed FROM jobs j"
        " LEFT JOIN job_secrets s ON s.job_id = j.id"
        " WHERE j.id = ? AND j.phase = 'queued' AND j.cancel_requested = 0",
        (job_id,),
    ).fetchone()
    if row is None:
        return None
    try:
        spec = spec_to_start(job_id, row[1], row[2], keyring)
    except SecretsUnreadable as exc:
        _reject_unreadable(conn, job_id, str(exc), now)
        return None
    attempt = row[0] + 1
    conn.execute(
        "UPDATE jobs SET phase = 'assigned', attempts = ?, updated_at = ?,"
        " queue_deadline = NULL, unschedulable = NULL WHERE id = ?",
        (attempt, now, job_id),
    )
    conn.execute(
        "INSERT INTO runs (job_id, attempt, supervisor_id, phase, created_at)"
        " VALUES (?, ?, ?, 'assigned', ?)",
        (job_id, attempt, supervisor_id, now),
    )
    record_phase(conn, job_id, attempt, Phase.ASSIGNED, None, None, now)
    return Assignment(job_id, attempt, supervisor_id, spec)


def _reject_unreadable(conn: sqlite3.Connection, job_id: str, why: str, now: float) -> None:
    end = lifecycle.secrets_unreadable(why, now)
    end_queued_job(conn, job_id, end)
    metrics.secrets_unreadable("placement")
    log.warning("job %s rejected: %s", job_id, end.reason)


def _no_job_ready(conn: sqlite3.Connection, now: float) -> bool:
    """True if no queued job waits ready to be placed (the dispatcher's queue is empty)."""
    row = conn.execute(
        "SELECT 1 FROM jobs WHERE phase = 'queued' AND unschedulable IS NULL"
        " AND (not_before IS NULL OR not_before <= ?) LIMIT 1",
        (now,),
    ).fetchone()
    return row is None


def _busy_keys(conn: sqlite3.Connection) -> frozenset[str]:
    rows = conn.execute(
        "SELECT DISTINCT concurrency_key FROM jobs WHERE concurrency_key IS NOT NULL"
        f" AND phase IN ({ACTIVE_SQL})",
        ACTIVE_PHASES,
    )
    return frozenset(r[0] for r in rows)


#: The resources each active run holds, from the covering index alone (see the schema).
RESOURCES_IN_USE = (
    "SELECT r.supervisor_id, j.resources FROM runs r"
    " JOIN jobs j INDEXED BY jobs_resources ON j.id = r.job_id"
    f" WHERE r.phase IN ({ACTIVE_SQL}) AND j.resources != '{{}}'"
)


def _resources_in_use(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    used: dict[str, dict[str, int]] = {}
    for supervisor_id, resources in conn.execute(RESOURCES_IN_USE, ACTIVE_PHASES):
        held = used.setdefault(supervisor_id, {})
        for name, count in json.loads(resources).items():
            held[name] = held.get(name, 0) + count
    return used


def _queued_jobs(
    conn: sqlite3.Connection,
    limit: int,
    after: tuple[int, int] | None = None,
    marked: bool = False,
) -> list[QueuedJob]:
    page = ""
    args: list[object] = [time.time()]
    if after is not None:
        page = " AND (priority < ? OR (priority = ? AND seq > ?))"
        args += [after[0], after[0], after[1]]
    rows = conn.execute(
        "SELECT id, seq, priority, spec, queued_at, concurrency_key, unschedulable"
        " FROM jobs WHERE phase = 'queued'"
        f" AND unschedulable IS {'NOT NULL' if marked else 'NULL'}"
        f" AND (not_before IS NULL OR not_before <= ?){page}"
        " ORDER BY priority DESC, seq LIMIT ?",
        (*args, limit),
    ).fetchall()
    return [QueuedJob(r[0], r[1], r[2], _spec_decoder.decode(r[3]), r[4], r[5], r[6]) for r in rows]


def _next_backoff_end(conn: sqlite3.Connection) -> float | None:
    (when,) = conn.execute(
        "SELECT min(not_before) FROM jobs WHERE phase = 'queued' AND not_before > ?",
        (time.time(),),
    ).fetchone()
    return when


def _load_job(conn: sqlite3.Connection, job_id: str) -> JobView | None:
    row = conn.execute(
        "SELECT j.id, j.name, j.phase, j.spec, j.created_at, j.updated_at, j.priority,"
        " j.exit_code, j.reason, j.cancel_requested, j.unschedulable, j.owner, t.name"
        " FROM jobs j LEFT JOIN tokens t ON t.id = j.owner WHERE j.id = ?",
        (job_id,),
    ).fetchone()
    if row is None:
        return None
    phases: dict[int, list[PhaseEntry]] = {}
    for attempt, phase, stage, message, at in conn.execute(
        "SELECT attempt, phase, stage, message, at FROM run_phases WHERE job_id = ? ORDER BY id",
        (job_id,),
    ):
        phases.setdefault(attempt, []).append(PhaseEntry(Phase(phase), at, stage, message))
    runs = [
        RunView(
            attempt=r[0],
            supervisor_id=r[1],
            phase=Phase(r[2]),
            created_at=r[3],
            stage=r[4],
            message=r[5],
            exit_code=r[6],
            signal=r[7],
            reason=r[8],
            error_kind=r[9],
            error=r[10],
            started_at=r[11],
            ended_at=r[12],
            phases=phases.get(r[0], []),
            output_bytes=r[13],
            output_truncated=r[14].split(",") if r[14] else [],
        )
        for r in conn.execute(
            "SELECT attempt, supervisor_id, phase, created_at, stage, message, exit_code, signal,"
            " reason, error_kind, error, started_at, ended_at, output_bytes, output_truncated"
            " FROM runs WHERE job_id = ? ORDER BY attempt",
            (job_id,),
        )
    ]
    return JobView(
        id=row[0],
        name=row[1],
        phase=Phase(row[2]),
        spec=_spec_decoder.decode(row[3]),
        created_at=row[4],
        updated_at=row[5],
        priority=row[6],
        exit_code=row[7],
        reason=row[8],
        cancel_requested=bool(row[9]),
        unschedulable=row[10],
        owner=row[11],
        owner_name=row[12],
        runs=runs,
    )
