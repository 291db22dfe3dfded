"""Which PostgreSQL driver the store should use: asyncpg or psycopg 3 (async, with and
without pipeline mode), on our loop (uvloop), on the store's hottest work.

`python -m bench.pg_driver [--quick] [--json FILE]` starts a private cluster
(tests/postgres.py), and for each driver runs WORKERS connections at once, each repeating
a cycle shaped like the switchboard's:

- claim (sqlite_placement.assign_run): take the next queued job with
  `FOR UPDATE SKIP LOCKED` reading its spec, mark it assigned, insert its run and the
  run's first phase; one transaction.
- acknowledge (sqlite_runs.EventBatch): a batch of a supervisor's events: its last
  sequence number, two pieces of output, the run's and the job's new phase and the phase
  row; one transaction.

Every variant gets a new database with the same queued jobs; repetitions take the
variants in turn, so a shared machine's load falls on all of them. Reported per variant:
transactions per second, the latency of one transaction (p50, p99), and the CPU time of
this process (the client: driver and loop) per transaction. The server runs on the same
machine, so CPU the client saves is also CPU left to the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import asyncpg
import psycopg
import uvloop

from bench.stats import Summary, machine, percentile
from tests.postgres import Cluster, private_cluster

SCHEMA = """
CREATE TABLE jobs (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    spec BYTEA NOT NULL,
    phase TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    unschedulable TEXT,
    queued_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX jobs_ready ON jobs (priority DESC, seq)
    WHERE phase = 'queued' AND unschedulable IS NULL;
CREATE TABLE supervisors (id TEXT PRIMARY KEY, last_seq BIGINT NOT NULL DEFAULT 0);
CREATE TABLE runs (
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    supervisor_id TEXT,
    phase TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    output_bytes BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, attempt)
);
CREATE TABLE run_phases (
    id BIGSERIAL PRIMARY KEY,
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    phase TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL
);
CREATE INDEX run_phases_by_run ON run_phases (job_id, attempt, id);
CREATE TABLE output (
    id BIGSERIAL PRIMARY KEY,
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    stream TEXT NOT NULL,
    "offset" BIGINT NOT NULL,
    data BYTEA NOT NULL
);
CREATE UNIQUE INDEX output_by_run ON output (job_id, attempt, stream, "offset");
"""

CLAIM = (
    "SELECT id, attempts, spec FROM jobs WHERE phase = 'queued' AND unschedulable IS NULL"
    " ORDER BY priority DESC, seq LIMIT 1 FOR UPDATE SKIP LOCKED"
)
ASSIGN = "UPDATE jobs SET phase = 'assigned', attempts = $1, updated_at = $2 WHERE id = $3"
NEW_RUN = (
    "INSERT INTO runs (job_id, attempt, supervisor_id, phase, created_at)"
    " VALUES ($1, $2, $3, 'assigned', $4)"
)
PHASE_ROW = "INSERT INTO run_phases (job_id, attempt, phase, at) VALUES ($1, $2, $3, $4)"
LAST_SEQ = "UPDATE supervisors SET last_seq = $1 WHERE id = $2"
OUTPUT = 'INSERT INTO output (job_id, attempt, stream, "offset", data) VALUES ($1, $2, $3, $4, $5)'
RUN_PHASE = (
    "UPDATE runs SET phase = $1, started_at = $2, output_bytes = $3"
    " WHERE job_id = $4 AND attempt = $5"
)
JOB_PHASE = "UPDATE jobs SET phase = $1, updated_at = $2 WHERE id = $3"

SPEC = json.dumps({"name": "bench", "backend": {"kind": "noop"}, "pad": "x" * 900}).encode()
CHUNK = b"o" * 200


def _psycopg(sql: str) -> str:
    """The same statement with psycopg's placeholders ($n -> %s, in order)."""
    for n in range(9, 0, -1):
        sql = sql.replace(f"${n}", "%s")
    return sql


@dataclass(frozen=True)
class Sizes:
    jobs: int = 6000  # cycles per variant per repetition (2 transactions each)
    workers: int = 8  # connections at once
    reps: int = 3


QUICK = Sizes(jobs=300, workers=4, reps=1)


@dataclass
class Figures:
    variant: str
    txn_per_s: Summary  # per repetition
    latency_ms: Summary  # per transaction, all repetitions
    cpu_us_per_txn: Summary  # per repetition


# --- the cycle, once per driver ------------------------------------------------------------


class Cycle:
    """One connection's claim and acknowledge transactions."""

    name = ""

    async def connect(self, dsn: str) -> None: ...

    async def close(self) -> None: ...

    async def claim(self, supervisor: str) -> tuple[str, int] | None: ...

    async def acknowledge(self, supervisor: str, seq: int, job_id: str, attempt: int) -> None: ...


class AsyncpgCycle(Cycle):
    name = "asyncpg"

    async def connect(self, dsn: str) -> None:
        self.conn: asyncpg.Connection = await asyncpg.connect(dsn)

    async def close(self) -> None:
        await self.conn.close()

    async def claim(self, supervisor: str) -> tuple[str, int] | None:
        now = time.time()
        async with self.conn.transaction():
            row = await self.conn.fetchrow(CLAIM)
            if row is None:
                return None
            job_id, attempt = row["id"], row["attempts"] + 1
            await self.conn.execute(ASSIGN, attempt, now, job_id)
            await self.conn.execute(NEW_RUN, job_id, attempt, supervisor, now)
            await self.conn.execute(PHASE_ROW, job_id, attempt, "assigned", now)
        return job_id, attempt

    async def acknowledge(self, supervisor: str, seq: int, job_id: str, attempt: int) -> None:
        now = time.time()
        async with self.conn.transaction():
            await self.conn.execute(LAST_SEQ, seq, supervisor)
            await self.conn.execute(OUTPUT, job_id, attempt, "stdout", 0, CHUNK)
            await self.conn.execute(OUTPUT, job_id, attempt, "stdout", len(CHUNK), CHUNK)
            await self.conn.execute(PHASE_ROW, job_id, attempt, "running", now)
            await self.conn.execute(RUN_PHASE, "running", now, 2 * len(CHUNK), job_id, attempt)
            await self.conn.execute(JOB_PHASE, "running", now, job_id)


CLAIM_ONE = (
    "WITH next AS (" + CLAIM + "),"
    " assigned AS (UPDATE jobs j SET phase = 'assigned', attempts = j.attempts + 1,"
    " updated_at = $2 FROM next WHERE j.id = next.id RETURNING j.id, j.attempts, j.spec),"
    " run AS (INSERT INTO runs (job_id, attempt, supervisor_id, phase, created_at)"
    " SELECT id, attempts, $1, 'assigned', $2 FROM assigned),"
    " phase AS (INSERT INTO run_phases (job_id, attempt, phase, at)"
    " SELECT id, attempts, 'assigned', $2 FROM assigned)"
    " SELECT id, attempts, spec FROM assigned"
)
ACK_ONE = (
    "WITH s AS (UPDATE supervisors SET last_seq = $1 WHERE id = $2),"
    ' o AS (INSERT INTO output (job_id, attempt, stream, "offset", data)'
    " VALUES ($3, $4, 'stdout', 0, $5), ($3, $4, 'stdout', $6, $5)),"
    " p AS (INSERT INTO run_phases (job_id, attempt, phase, at) VALUES ($3, $4, 'running', $7)),"
    " r AS (UPDATE runs SET phase = 'running', started_at = $7, output_bytes = $8"
    " WHERE job_id = $3 AND attempt = $4)"
    " UPDATE jobs SET phase = 'running', updated_at = $7 WHERE id = $3"
)


class AsyncpgOneStatementCycle(AsyncpgCycle):
    """Each transaction written as one statement (data-modifying CTEs): one round trip,
    whatever the driver. The bound on what fewer round trips can give; the store's event
    batches decide between statements in Python, so it can't be written so throughout."""

    name = "asyncpg 1 statement"

    async def claim(self, supervisor: str) -> tuple[str, int] | None:
        row = await self.conn.fetchrow(CLAIM_ONE, supervisor, time.time())
        return None if row is None else (row["id"], row["attempts"])

    async def acknowledge(self, supervisor: str, seq: int, job_id: str, attempt: int) -> None:
        now = time.time()
        size = len(CHUNK)
        await self.conn.execute(
            ACK_ONE, seq, supervisor, job_id, attempt, CHUNK, size, now, 2 * size
        )


class PsycopgCycle(Cycle):
    """psycopg 3 async, a round trip per statement (statements are prepared server-side
    after psycopg's default threshold, as asyncpg prepares them at once)."""

    name = "psycopg"
    pipeline = False

    async def connect(self, dsn: str) -> None:
        self.conn: psycopg.AsyncConnection[Any] = await psycopg.AsyncConnection.connect(dsn)

    async def close(self) -> None:
        await self.conn.close()

    async def claim(self, supervisor: str) -> tuple[str, int] | None:
        now = time.time()
        async with self.conn.transaction():
            row = await (await self.conn.execute(CLAIM)).fetchone()
            if row is None:
                return None
            job_id, attempt = row[0], row[1] + 1
            if self.pipeline:
                # What follows needs no answer before the next statement: one round trip.
                async with self.conn.pipeline():
                    await self._assign(job_id, attempt, supervisor, now)
            else:
                await self._assign(job_id, attempt, supervisor, now)
        return job_id, attempt

    async def _assign(self, job_id: str, attempt: int, supervisor: str, now: float) -> None:
        await self.conn.execute(_psycopg(ASSIGN), (attempt, now, job_id))
        await self.conn.execute(_psycopg(NEW_RUN), (job_id, attempt, supervisor, now))
        await self.conn.execute(_psycopg(PHASE_ROW), (job_id, attempt, "assigned", now))

    async def acknowledge(self, supervisor: str, seq: int, job_id: str, attempt: int) -> None:
        now = time.time()
        if self.pipeline:
            async with self.conn.pipeline(), self.conn.transaction():
                await self._events(supervisor, seq, job_id, attempt, now)
        else:
            async with self.conn.transaction():
                await self._events(supervisor, seq, job_id, attempt, now)

    async def _events(
        self, supervisor: str, seq: int, job_id: str, attempt: int, now: float
    ) -> None:
        c = self.conn
        await c.execute(_psycopg(LAST_SEQ), (seq, supervisor))
        await c.execute(_psycopg(OUTPUT), (job_id, attempt, "stdout", 0, CHUNK))
        await c.execute(_psycopg(OUTPUT), (job_id, attempt, "stdout", len(CHUNK), CHUNK))
        await c.execute(_psycopg(PHASE_ROW), (job_id, attempt, "running", now))
        await c.execute(_psycopg(RUN_PHASE), ("running", now, 2 * len(CHUNK), job_id, attempt))
        await c.execute(_psycopg(JOB_PHASE), ("running", now, job_id))


class PsycopgPipelineCycle(PsycopgCycle):
    name = "psycopg pipeline"
    pipeline = True


VARIANTS: tuple[type[Cycle], ...] = (
    AsyncpgCycle,
    PsycopgCycle,
    PsycopgPipelineCycle,
    AsyncpgOneStatementCycle,
)


# --- running it ----------------------------------------------------------------------------


def _database_dsn(cluster: Cluster, name: str) -> str:
    return f"postgresql://{cluster.user}@127.0.0.1:{cluster.port}/{name}"


async def _fresh_database(cluster: Cluster, name: str, jobs: int, workers: int) -> str:
    """A new database `name` with the schema, `jobs` queued jobs and the supervisors."""
    admin = await asyncpg.connect(cluster.dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = _database_dsn(cluster, name)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA)
        now = time.time()
        await conn.copy_records_to_table(
            "jobs",
            records=[(f"job-{i:07d}", "bench", SPEC, "queued", now, now) for i in range(jobs)],
            columns=["id", "name", "spec", "phase", "queued_at", "updated_at"],
        )
        await conn.executemany(
            "INSERT INTO supervisors (id) VALUES ($1)", [(f"s{w}",) for w in range(workers)]
        )
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    return dsn


async def _worker(cycle: Cycle, supervisor: str, latencies: list[float]) -> int:
    """Claim and acknowledge until the queue is empty; the transactions done."""
    done = 0
    seq = 0
    clock = time.perf_counter
    while True:
        started = clock()
        claimed = await cycle.claim(supervisor)
        if claimed is None:
            return done
        middle = clock()
        seq += 1
        await cycle.acknowledge(supervisor, seq, *claimed)
        ended = clock()
        latencies += (middle - started, ended - middle)
        done += 2


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _run_variant(
    cluster: Cluster, variant: type[Cycle], sizes: Sizes, rep: int
) -> tuple[float, float, list[float]]:
    """One repetition of one variant: (txn/s, CPU seconds per txn, latencies)."""
    name = f"bench_{variant.__name__.lower()}_{rep}"  # a new database per run
    dsn = await _fresh_database(cluster, name, sizes.jobs, sizes.workers)
    cycles = [variant() for _ in range(sizes.workers)]
    for cycle in cycles:
        await cycle.connect(dsn)
    # Warm up: prepared statements, caches (a few jobs, not counted).
    for w, cycle in enumerate(cycles):
        for _ in range(10):
            claimed = await cycle.claim(f"s{w}")
            assert claimed is not None
            await cycle.acknowledge(f"s{w}", 0, *claimed)
    latencies: list[float] = []
    cpu = _cpu()
    started = time.perf_counter()
    counts = await asyncio.gather(*(_worker(c, f"s{w}", latencies) for w, c in enumerate(cycles)))
    elapsed = time.perf_counter() - started
    cpu = _cpu() - cpu
    for cycle in cycles:
        await cycle.close()
    txns = sum(counts)
    return txns / elapsed, cpu / txns, latencies


async def measure(cluster: Cluster, sizes: Sizes) -> list[Figures]:
    rates: dict[str, list[float]] = {v.name: [] for v in VARIANTS}
    cpus: dict[str, list[float]] = {v.name: [] for v in VARIANTS}
    lats: dict[str, list[float]] = {v.name: [] for v in VARIANTS}
    for rep in range(sizes.reps):
        turn = rep % len(VARIANTS)
        order = VARIANTS[turn:] + VARIANTS[:turn]
        for variant in order:
            rate, cpu, latencies = await _run_variant(cluster, variant, sizes, rep)
            rates[variant.name].append(rate)
            cpus[variant.name].append(cpu * 1e6)
            lats[variant.name] += [s * 1e3 for s in latencies]
            print(
                f"  rep {rep + 1}: {variant.name:17s} {rate:8.0f} txn/s"
                f"  {cpu * 1e6:6.0f} µs CPU/txn"
                f"  p50 {percentile(sorted(latencies), 0.5) * 1e3:.2f} ms",
                file=sys.stderr,
            )
    return [
        Figures(
            name,
            Summary.of(rates[name], "txn/s"),
            Summary.of(lats[name], "ms"),
            Summary.of(cpus[name], "µs"),
        )
        for name in rates
    ]


def _table(figures: list[Figures]) -> str:
    lines = [
        "| driver | txn/s | p50 ms | p99 ms | client CPU µs/txn |",
        "|---|---|---|---|---|",
    ]
    for f in figures:
        lines.append(
            f"| {f.variant} | {f.txn_per_s.median:,.0f} | {f.latency_ms.median:.2f}"
            f" | {f.latency_ms.p99:.2f} | {f.cpu_us_per_txn.median:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pg_driver", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few hundred jobs, one pass")
    parser.add_argument("--jobs", type=int, help="cycles per variant per repetition")
    parser.add_argument("--workers", type=int, help="connections at once")
    parser.add_argument("--fsync-off", action="store_true", help="a cluster without fsync")
    parser.add_argument("--json", help="write the figures and the machine here")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    if args.jobs:
        sizes = Sizes(jobs=args.jobs, workers=sizes.workers, reps=sizes.reps)
    if args.workers:
        sizes = Sizes(jobs=sizes.jobs, workers=args.workers, reps=sizes.reps)
    with private_cluster(durable=not args.fsync_off) as cluster:
        figures = uvloop.run(measure(cluster, sizes))
    print(_table(figures))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "sizes": asdict(sizes),
                    "fsync": not args.fsync_off,
                    "machine": machine(),
                    "figures": [
                        {
                            "variant": f.variant,
                            "txn_per_s": f.txn_per_s.as_dict(),
                            "latency_ms": f.latency_ms.as_dict(),
                            "cpu_us_per_txn": f.cpu_us_per_txn.as_dict(),
                        }
                        for f in figures
                    ],
                },
                out,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
