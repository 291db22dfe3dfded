"""The embedded store: one SQLite file in WAL mode.

One writer thread owns the only write connection. Write requests queue up while a
transaction runs and the next transaction takes all of them at once (group commit); each
request's future resolves only after COMMIT, so whatever a caller acknowledges on the
strength of it is durable. Each request runs inside a SAVEPOINT, so one failing request
doesn't undo the others of its group.

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
    JobErrorReport,
    JobExit,
    JobStateChanged,
    Output,
    Stream,
    SupervisorEvent,
)
from protocol.spec import JobSpec, RestartPolicy
from protocol.state import ACTIVE, Phase, can_transition, is_terminal
from switchboard.jobstate import job_after_run
from switchboard.models import (
    ActiveRun,
    Assignment,
    JobView,
    PhaseEntry,
    QueuedJob,
    RunKey,
    RunView,
    SupervisorView,
    TokenView,
)
from switchboard.retry import restart_delay
from switchboard.store.base import CancelResult, Connected, EventsApplied, Store

log = logging.getLogger("switchboard.store")

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    name TEXT NOT NULL,
    hash BLOB NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS artifacts (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS supervisors (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    backends TEXT NOT NULL DEFAULT '[]',
    resources TEXT NOT NULL DEFAULT '{}',
    max_jobs INTEGER NOT NULL DEFAULT 1,
    software TEXT NOT NULL DEFAULT '',
    session INTEGER NOT NULL DEFAULT 0,
    last_seq INTEGER NOT NULL DEFAULT 0,
    connected INTEGER NOT NULL DEFAULT 0,
    first_seen REAL NOT NULL,
    connected_at REAL,
    last_seen REAL
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    spec BLOB NOT NULL,
    phase TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    exit_code INTEGER,
    reason TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    restarts INTEGER NOT NULL DEFAULT 0,
    -- a restarted job waits in the queue until then (its backoff), and the delay it got
    not_before REAL,
    backoff_s REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_phase ON jobs (phase, priority DESC, seq);
CREATE TABLE IF NOT EXISTS runs (
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    supervisor_id TEXT,
    phase TEXT NOT NULL,
    stage TEXT,
    message TEXT,
    exit_code INTEGER,
    signal INTEGER,
    reason TEXT,
    error_kind TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    PRIMARY KEY (job_id, attempt)
);
CREATE INDEX IF NOT EXISTS runs_by_supervisor ON runs (supervisor_id, phase);
CREATE INDEX IF NOT EXISTS runs_by_phase ON runs (phase, supervisor_id);
CREATE TABLE IF NOT EXISTS run_phases (
    id INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    phase TEXT NOT NULL,
    stage TEXT,
    message TEXT,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS run_phases_by_run ON run_phases (job_id, attempt, id);
CREATE TABLE IF NOT EXISTS output (
    id INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    stream TEXT NOT NULL,
    offset INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS output_by_run ON output (job_id, attempt, stream, offset);
"""

#: How long a job refused because its supervisor was busy waits before it is placed again.
BUSY_RETRY_S = 0.5

_ACTIVE_PHASES = tuple(p.value for p in ACTIVE)
_ACTIVE_SQL = ",".join("?" * len(_ACTIVE_PHASES))

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
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            for fn, future in group:
                self.conn.execute("SAVEPOINT request")
                try:
                    value = fn(self.conn)
                except BaseException as exc:
                    self.conn.execute("ROLLBACK TO request")
                    self.conn.execute("RELEASE request")
                    results.append((future, None, exc))
                else:
                    self.conn.execute("RELEASE request")
                    results.append((future, value, None))
            self.conn.execute("COMMIT")
        except BaseException as exc:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            results = [(future, None, exc) for _, future in group]
        for future, value, exc in results:
            future.get_loop().call_soon_threadsafe(_resolve, future, value, exc)


def _resolve(future: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)


class SQLiteStore(Store):
    def __init__(self, path: Path, *, readers: int = 4) -> None:
        self.path = path
        self._readers = readers
        self._writer: _Writer | None = None
        self._read_pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._read_conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()

    # --- plumbing --------------------------------------------------------------------

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        setup = _connect(self.path, readonly=False)
        setup.executescript(SCHEMA)
        setup.close()
        self._writer = _Writer(self.path)
        self._writer.start()
        self._read_pool = ThreadPoolExecutor(self._readers, thread_name_prefix="sqlite-read")

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
        assert self._writer is not None, "store is not open"
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._writer.requests.put((fn, future))
        return await future

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

    async def add_token(self, token_id: str, role: str, name: str, digest: bytes) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO tokens (id, role, name, hash, created_at) VALUES (?, ?, ?, ?, ?)",
                (token_id, role, name, digest, time.time()),
            )

        await self._write(write)

    async def find_token(self, digest: bytes) -> TokenView | None:
        def read(conn: sqlite3.Connection) -> TokenView | None:
            row = conn.execute(
                "SELECT id, role, name, created_at FROM tokens"
                " WHERE hash = ? AND revoked_at IS NULL",
                (digest,),
            ).fetchone()
            return TokenView(*row) if row else None

        return await self._read(read)

    # --- artifacts -------------------------------------------------------------------

    async def add_artifact(self, digest: str, size: int) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO artifacts (digest, size, created_at) VALUES (?, ?, ?)",
                (digest, size, time.time()),
            )

        await self._write(write)

    async def has_artifact(self, digest: str) -> bool:
        def read(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT 1 FROM artifacts WHERE digest = ?", (digest,)).fetchone()
            return row is not None

        return await self._read(read)

    # --- jobs ------------------------------------------------------------------------

    async def create_job(self, job_id: str, spec: JobSpec) -> None:
        now = time.time()

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO jobs (id, name, spec, phase, priority, created_at, updated_at)"
                " VALUES (?, ?, ?, 'queued', ?, ?, ?)",
                (job_id, spec.name, _encoder.encode(spec), spec.priority, now, now),
            )

        await self._write(write)

    async def get_job(self, job_id: str) -> JobView | None:
        return await self._read(lambda conn: _load_job(conn, job_id))

    async def queued_jobs(self, limit: int) -> list[QueuedJob]:
        def read(conn: sqlite3.Connection) -> list[QueuedJob]:
            rows = conn.execute(
                "SELECT id, seq, priority, spec FROM jobs WHERE phase = 'queued'"
                " AND (not_before IS NULL OR not_before <= ?)"
                " ORDER BY priority DESC, seq LIMIT ?",
                (time.time(), limit),
            ).fetchall()
            return [QueuedJob(r[0], r[1], r[2], _spec_decoder.decode(r[3])) for r in rows]

        return await self._read(read)

    async def next_backoff_end(self) -> float | None:
        def read(conn: sqlite3.Connection) -> float | None:
            (when,) = conn.execute(
                "SELECT min(not_before) FROM jobs WHERE phase = 'queued' AND not_before > ?",
                (time.time(),),
            ).fetchone()
            return when

        return await self._read(read)

    async def assign(self, pairs: Sequence[tuple[str, str]]) -> list[Assignment]:
        now = time.time()

        def write(conn: sqlite3.Connection) -> list[Assignment]:
            made = []
            for job_id, supervisor_id in pairs:
                row = conn.execute(
                    "SELECT attempts, spec FROM jobs"
                    " WHERE id = ? AND phase = 'queued' AND cancel_requested = 0",
                    (job_id,),
                ).fetchone()
                if row is None:
                    continue
                attempt = row[0] + 1
                conn.execute(
                    "UPDATE jobs SET phase = 'assigned', attempts = ?, updated_at = ? WHERE id = ?",
                    (attempt, now, job_id),
                )
                conn.execute(
                    "INSERT INTO runs (job_id, attempt, supervisor_id, phase, created_at)"
                    " VALUES (?, ?, ?, 'assigned', ?)",
                    (job_id, attempt, supervisor_id, now),
                )
                _record_phase(conn, job_id, attempt, Phase.ASSIGNED, None, None, now)
                spec = _spec_decoder.decode(row[1])
                made.append(Assignment(job_id, attempt, supervisor_id, spec))
            return made

        return await self._write(write)

    async def request_cancel(self, job_id: str) -> CancelResult | None:
        now = time.time()

        def write(conn: sqlite3.Connection) -> CancelResult | None:
            row = conn.execute(
                "SELECT phase, attempts FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if row is None:
                return None
            phase, attempts = Phase(row[0]), row[1]
            if is_terminal(phase):
                return CancelResult(phase.value)
            if phase == Phase.QUEUED:
                conn.execute(
                    "UPDATE jobs SET phase = 'canceled', cancel_requested = 1, reason = ?,"
                    " updated_at = ? WHERE id = ?",
                    ("canceled while queued", now, job_id),
                )
                return CancelResult(Phase.CANCELED.value)
            conn.execute(
                "UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?",
                (now, job_id),
            )
            run = conn.execute(
                "SELECT supervisor_id FROM runs WHERE job_id = ? AND attempt = ?",
                (job_id, attempts),
            ).fetchone()
            return CancelResult(phase.value, run[0] if run else None, attempts)

        return await self._write(write)

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

    # --- supervisors -----------------------------------------------------------------

    async def supervisor_connected(self, hello: Hello) -> Connected:
        now = time.time()

        def write(conn: sqlite3.Connection) -> Connected:
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
            return Connected(session, last_seq)

        return await self._write(write)

    async def active_runs(self, supervisor_id: str) -> list[ActiveRun]:
        def read(conn: sqlite3.Connection) -> list[ActiveRun]:
            rows = conn.execute(
                "SELECT r.job_id, r.attempt, r.phase, j.cancel_requested, j.spec"
                " FROM runs r JOIN jobs j ON j.id = r.job_id"
                f" WHERE r.supervisor_id = ? AND r.phase IN ({_ACTIVE_SQL})",
                (supervisor_id, *_ACTIVE_PHASES),
            ).fetchall()
            return [
                ActiveRun(r[0], r[1], Phase(r[2]), bool(r[3]), _spec_decoder.decode(r[4]))
                for r in rows
            ]

        return await self._read(read)

    async def supervisor_disconnected(self, supervisor_id: str, session: int) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE supervisors SET connected = 0, last_seen = ? WHERE id = ? AND session = ?",
                (time.time(), supervisor_id, session),
            )

        await self._write(write)

    async def forget_connections(self) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE supervisors SET connected = 0, last_seen = ? WHERE connected = 1",
                (time.time(),),
            )

        await self._write(write)

    async def lose_runs(self, grace_s: float) -> list[RunKey]:
        now = time.time()

        def write(conn: sqlite3.Connection) -> list[RunKey]:
            rows = conn.execute(
                "SELECT r.job_id, r.attempt FROM runs r JOIN supervisors s"
                " ON s.id = r.supervisor_id WHERE s.connected = 0 AND s.last_seen < ?"
                f" AND r.phase IN ({_ACTIVE_SQL})",
                (now - grace_s, *_ACTIVE_PHASES),
            ).fetchall()
            message = f"supervisor silent for over {grace_s:g}s"
            for job_id, attempt in rows:
                _set_run_phase(conn, job_id, attempt, Phase.LOST, None, message, now)
            return [RunKey(job_id, attempt) for job_id, attempt in rows]

        return await self._write(write)

    async def list_supervisors(self) -> list[SupervisorView]:
        def read(conn: sqlite3.Connection) -> list[SupervisorView]:
            counts = _running_counts(conn)
            rows = conn.execute(
                "SELECT id, name, connected, labels, backends, resources, max_jobs, session,"
                " software, connected_at, last_seen FROM supervisors ORDER BY id"
            ).fetchall()
            return [
                SupervisorView(
                    id=r[0],
                    name=r[1],
                    connected=bool(r[2]),
                    labels=json.loads(r[3]),
                    backends=json.loads(r[4]),
                    resources=json.loads(r[5]),
                    max_jobs=r[6],
                    running=counts.get(r[0], 0),
                    session=r[7],
                    software=r[8],
                    connected_at=r[9],
                    last_seen=r[10],
                )
                for r in rows
            ]

        return await self._read(read)

    async def running_counts(self) -> dict[str, int]:
        return await self._read(_running_counts)

    # --- events ----------------------------------------------------------------------

    async def apply_events(
        self, supervisor_id: str, events: Sequence[SupervisorEvent]
    ) -> EventsApplied:
        def write(conn: sqlite3.Connection) -> EventsApplied:
            (stored,) = conn.execute(
                "SELECT last_seq FROM supervisors WHERE id = ?", (supervisor_id,)
            ).fetchone()
            ended: list[RunKey] = []
            unwanted: list[RunKey] = []
            for event in events:
                if event.seq <= stored:
                    continue  # already stored: a resend after a reconnect
                stored = event.seq
                verdict = _apply_event(conn, supervisor_id, event)
                if verdict == "ended":
                    ended.append(RunKey(event.job_id, event.attempt))
                elif verdict == "unwanted":
                    unwanted.append(RunKey(event.job_id, event.attempt))
            conn.execute(
                "UPDATE supervisors SET last_seq = ?, last_seen = ? WHERE id = ?",
                (stored, time.time(), supervisor_id),
            )
            return EventsApplied(stored, ended, unwanted)

        return await self._write(write)

    async def end_run(self, key: RunKey, phase: str, message: str) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT phase FROM runs WHERE job_id = ? AND attempt = ?",
                (key.job_id, key.attempt),
            ).fetchone()
            if row is None or not can_transition(row[0], phase):
                return False
            _set_run_phase(conn, key.job_id, key.attempt, Phase(phase), None, message, time.time())
            return True

        return await self._write(write)


# --- helpers that run inside a transaction ---------------------------------------------


def _running_counts(conn: sqlite3.Connection) -> dict[str, int]:
    rows = conn.execute(
        f"SELECT supervisor_id, count(*) FROM runs WHERE phase IN ({_ACTIVE_SQL})"
        " GROUP BY supervisor_id",
        _ACTIVE_PHASES,
    ).fetchall()
    return dict(rows)


def _record_phase(
    conn: sqlite3.Connection,
    job_id: str,
    attempt: int,
    phase: Phase,
    stage: str | None,
    message: str | None,
    at: float,
) -> None:
    conn.execute(
        "INSERT INTO run_phases (job_id, attempt, phase, stage, message, at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (job_id, attempt, phase.value, stage, message, at),
    )


def _set_run_phase(
    conn: sqlite3.Connection,
    job_id: str,
    attempt: int,
    phase: Phase,
    stage: str | None,
    message: str | None,
    at: float,
) -> None:
    """Move a run (already checked) and its job to `phase`."""
    terminal = is_terminal(phase)
    conn.execute(
        "UPDATE runs SET phase = ?, stage = ?, message = coalesce(?, message),"
        " started_at = CASE WHEN ? = 'running' THEN ? ELSE started_at END,"
        " ended_at = CASE WHEN ? THEN ? ELSE ended_at END"
        " WHERE job_id = ? AND attempt = ?",
        (phase.value, stage, message, phase.value, at, terminal, at, job_id, attempt),
    )
    _record_phase(conn, job_id, attempt, phase, stage, message, at)
    job = conn.execute(
        "SELECT attempts, cancel_requested, restarts, backoff_s, spec FROM jobs WHERE id = ?",
        (job_id,),
    ).fetchone()
    if job is None or job[0] != attempt:
        return  # an old attempt: the job has moved on
    _, cancel_requested, restarts, backoff_s, spec_json = job
    run = conn.execute(
        "SELECT error_kind, exit_code, error FROM runs WHERE job_id = ? AND attempt = ?",
        (job_id, attempt),
    ).fetchone()
    policy = (_spec_decoder.decode(spec_json).restart if terminal else None) or RestartPolicy()
    decision = job_after_run(
        phase,
        error_kind=run[0],
        cancel_requested=bool(cancel_requested),
        restart=policy,
        restarts_done=restarts,
    )
    reason = message or run[2] if terminal else None
    not_before = None
    if decision.phase == Phase.QUEUED and not decision.restart:
        not_before = at + BUSY_RETRY_S  # refused as busy: don't hammer the same supervisor
    if decision.restart:
        restarts += 1
        backoff_s = restart_delay(policy.backoff, restarts, backoff_s)
        not_before = at + backoff_s
        reason = f"restart {restarts} of {policy.max_restarts} in {backoff_s:.2f}s: {reason}"
    conn.execute(
        "UPDATE jobs SET phase = ?, exit_code = ?, reason = coalesce(?, reason), updated_at = ?,"
        " restarts = ?, backoff_s = ?, not_before = ? WHERE id = ?",
        (
            decision.phase.value,
            run[1],
            reason,
            time.time(),
            restarts,
            backoff_s,
            not_before,
            job_id,
        ),
    )


def _apply_event(conn: sqlite3.Connection, supervisor_id: str, event: SupervisorEvent) -> str:
    """Apply one new event. Returns "ended" if its run ended, "unwanted" if the
    switchboard does not (or no longer) want the run, else ""."""
    row = conn.execute(
        "SELECT phase, supervisor_id FROM runs WHERE job_id = ? AND attempt = ?",
        (event.job_id, event.attempt),
    ).fetchone()
    if row is None or row[1] != supervisor_id:
        log.warning(
            "event %d from %s names run %s#%d, not assigned to it",
            event.seq,
            supervisor_id,
            event.job_id,
            event.attempt,
        )
        return "unwanted"
    phase = Phase(row[0])
    match event:
        case Output(stream=stream, offset=offset, data=data):
            # Chunks are contiguous: the one with the highest offset ends the stream (an
            # index lookup, where max(offset + length) would scan every chunk).
            last = conn.execute(
                "SELECT offset + length(data) FROM output"
                " WHERE job_id = ? AND attempt = ? AND stream = ? ORDER BY offset DESC LIMIT 1",
                (event.job_id, event.attempt, stream),
            ).fetchone()
            length = last[0] if last else 0
            if offset > length:
                log.error(
                    "output gap on %s#%d %s: have %d bytes, got offset %d",
                    event.job_id,
                    event.attempt,
                    stream,
                    length,
                    offset,
                )
            elif offset + len(data) > length:
                # Append only what is new: a chunk sent again (a recovered run replays its
                # output from the start) may overlap what is stored.
                conn.execute(
                    "INSERT INTO output (job_id, attempt, stream, offset, data)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (event.job_id, event.attempt, stream, length, data[length - offset :]),
                )
            return ""
        case JobErrorReport(kind=kind, description=description):
            if is_terminal(phase):
                return ""  # e.g. a late refusal of a repeated StartJob: the record stands
            conn.execute(
                "UPDATE runs SET error_kind = ?, error = ? WHERE job_id = ? AND attempt = ?",
                (kind.value, description, event.job_id, event.attempt),
            )
            return ""
        case JobExit():
            conn.execute(
                "UPDATE runs SET exit_code = ?, signal = ?, reason = ?,"
                " message = coalesce(?, message) WHERE job_id = ? AND attempt = ?",
                (
                    event.exit_code,
                    event.signal,
                    event.reason,
                    event.message,
                    event.job_id,
                    event.attempt,
                ),
            )
            return ""
        case JobStateChanged(phase=new, stage=stage, message=message, at=at):
            if not can_transition(phase, new) or new in (Phase.LOST, Phase.EXHAUSTED):
                log.warning(
                    "run %s#%d: refused %s -> %s from %s",
                    event.job_id,
                    event.attempt,
                    phase.value,
                    new.value,
                    supervisor_id,
                )
                return "unwanted" if is_terminal(phase) else ""
            at = at or time.time()
            _set_run_phase(conn, event.job_id, event.attempt, new, stage, message, at)
            return "ended" if is_terminal(new) else ""
    return ""


def _load_job(conn: sqlite3.Connection, job_id: str) -> JobView | None:
    row = conn.execute(
        "SELECT id, name, phase, spec, created_at, updated_at, priority, exit_code, reason,"
        " cancel_requested FROM jobs WHERE id = ?",
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
        )
        for r in conn.execute(
            "SELECT attempt, supervisor_id, phase, created_at, stage, message, exit_code, signal,"
            " reason, error_kind, error, started_at, ended_at FROM runs WHERE job_id = ?"
            " ORDER BY attempt",
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
        runs=runs,
    )
