"""Switchboard replicas on PostgreSQL beside one process on SQLite, in the same run: no-op
jobs end to end (single POSTs and batches) on SQLite, on PostgreSQL with one replica and
with two; the idle round trip on PostgreSQL; and failover: how long after a replica is
killed every supervisor it held is connected to the other, and the first job submitted
after the kill has succeeded.

The PostgreSQL server is a private cluster (tests/postgres.py) with its durable defaults
(fsync and synchronous commit on), as the SQLite store is durable: a job counts as done
when the Ack of its `succeeded` reaches the fleet. With two replicas the simulated fleet
is split between them (a replica places jobs on the supervisors it holds) and the client
threads alternate between them.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import uvloop

from bench.bed import NOOP, Bed, testbed
from bench.dispatch import BATCH_THREADS, SINGLE_THREADS, measure_latency
from bench.e2e import Api
from bench.fleet import FleetProcess
from bench.procs import cpu_seconds, raise_fd_limit, tree_cpu_seconds
from bench.stats import Summary
from tests.harness import Process, Switchboard, start_supervisor
from tests.postgres import Cluster, private_cluster

#: Real supervisor processes of the failover measurement, each with both addresses.
FAILOVER_SUPERVISORS = 6


@dataclass
class Replica:
    switchboard: Switchboard
    api: Api

    @property
    def pid(self) -> int:
        return self.switchboard.process.proc.pid


def _secret_key(directory: Path) -> Path:
    key = directory / "replicas.key"
    key.write_text(base64.urlsafe_b64encode(os.urandom(32)).decode() + "\n")
    key.chmod(0o600)
    return key


@contextlib.contextmanager
def replicas(
    cluster: Cluster, count: int, *extra: str, settings: dict[str, str] | None = None
) -> Iterator[list[Replica]]:
    """`count` replicas on a new database of `cluster`, one secret key for all;
    `settings`: PostgreSQL settings of that database (its sessions start with them)."""
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="sb-bench-pg-") as tmp:
        root = Path(tmp)
        name = f"bench_{os.getpid()}_{time.monotonic_ns()}"
        dsn = cluster.new_database(name)
        for setting, value in (settings or {}).items():
            cluster.psql(f'ALTER DATABASE "{name}" SET {setting} = {value}')
        key = _secret_key(root)
        made: list[Replica] = []
        try:
            for n in range(count):
                server = Switchboard(
                    root / f"data-{n}",
                    database=dsn,
                    extra_args=(
                        *("--replica-id", f"r{n}", "--secret-key-file", str(key)),
                        *("--max-run-output", "0", *extra),
                    ),
                )
                made.append(Replica(server, Api(server.port, server.admin_token)))
            yield made
        finally:
            for replica in made:
                replica.switchboard.stop()


def _connect_fleet(fleet: FleetProcess, targets: list[Replica], total: int, max_jobs: int) -> None:
    """`total` simulated supervisors, split between the replicas; until all are listed."""
    token = targets[0].switchboard.create_token("supervisor")
    share = -(-total // len(targets))
    for n, replica in enumerate(targets):
        fleet.call(
            "connect",
            url=f"{replica.switchboard.ws_url}/ws/supervisor",
            token=token,
            count=min(share, total - n * share),
            prefix=f"r{n}-fleet",
            max_jobs=max_jobs,
        )
    deadline = time.monotonic() + 120
    while sum(s["connected"] for s in targets[0].api.call("GET", "/api/v1/supervisors")) < total:
        if time.monotonic() > deadline:
            raise TimeoutError("the fleet is not listed as connected")
        time.sleep(0.05)


def _server_pid(cluster: Cluster) -> int:
    """The PostgreSQL server's first process (the postmaster: every backend its child)."""
    return int((cluster.root / "data" / "postmaster.pid").read_text().split()[0])


def _throughput_once(
    targets: list[Replica],
    fleet: FleetProcess,
    pool: ThreadPoolExecutor,
    n_jobs: int,
    batch: int | None,
    server: int | None = None,
) -> dict[str, float]:
    """jobs/s and the replicas' CPU per job; with `server` (the PostgreSQL server's
    pid), that server's CPU per job too."""
    fleet.call("reset_runs")
    pids = [r.pid for r in targets]
    cpu_before = sum(cpu_seconds(pid) for pid in pids)
    server_before = tree_cpu_seconds(server) if server is not None else 0.0
    started = time.monotonic()

    def one(index: int) -> list[str]:
        api = targets[index % len(targets)].api
        if batch is None:
            return [api.call("POST", "/api/v1/jobs", NOOP)["id"]]
        size = min(batch, n_jobs - index * batch)
        return [job["id"] for job in api.call("POST", "/api/v1/jobs/batch", [NOOP] * size)["jobs"]]

    calls = n_jobs if batch is None else -(-n_jobs // batch)
    ids = [job_id for chunk in pool.map(one, range(calls)) for job_id in chunk]
    fleet.call("wait_done", count=n_jobs, limit_s=60 + n_jobs / 20)
    cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
    marks = fleet.call("marks", job_ids=ids)
    if any(m["phase"] != "succeeded" or m["done_acked"] is None for m in marks.values()):
        raise RuntimeError("a no-op job did not succeed")
    last = max(m["done_acked"] for m in marks.values())
    out = {"jobs_per_s": n_jobs / (last - started), "cpu_ms_per_job": cpu / n_jobs * 1000}
    if server is not None:
        out["server_cpu_ms_per_job"] = (tree_cpu_seconds(server) - server_before) / n_jobs * 1000
    return out


def _throughput(
    name: str,
    targets: list[Replica],
    fleet: FleetProcess,
    n_jobs: int,
    reps: int,
    batch: int,
    server: int | None = None,
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    with (
        ThreadPoolExecutor(BATCH_THREADS) as batches,
        ThreadPoolExecutor(SINGLE_THREADS) as singles,
    ):
        _throughput_once(targets, fleet, batches, min(n_jobs, 100), batch)  # warm-up
        for _ in range(reps):
            for mode, pool, size in (("batch", batches, batch), ("single", singles, None)):
                once = _throughput_once(targets, fleet, pool, n_jobs, size, server)
                for key, value in once.items():
                    out.setdefault(f"replicas_{name}_{mode}_{key}", []).append(value)
    return out


def _sqlite(sizes_jobs: int, reps: int, batch: int, supervisors: int, max_jobs: int) -> dict:
    with testbed() as bed:
        bed.connect(supervisors, max_jobs=max_jobs)
        target = Replica(bed.switchboard, bed.api)
        return _throughput("sqlite", [target], bed.fleet, sizes_jobs, reps, batch)


def _postgres_bed(replica: Replica, fleet: FleetProcess, token: str) -> Bed:
    return Bed(replica.switchboard, fleet, replica.api, token)


def _failover(cluster: Cluster, work: Path) -> dict[str, float]:
    """Kill the replica every supervisor is connected to: seconds until all are connected
    to the other, and until a job submitted at the kill has succeeded there."""
    with replicas(cluster, 2) as (a, b):  # the default settings
        sups: list[Process] = []
        try:
            for n in range(FAILOVER_SUPERVISORS):
                sups.append(
                    start_supervisor(
                        a.switchboard,
                        work,
                        name=f"fo-{n}-{time.monotonic_ns()}",
                        backend="noop",
                        extra_args=("--switchboard", b.switchboard.ws_url),
                    )
                )
            names = {f"fo-{n}" for n in range(FAILOVER_SUPERVISORS)}

            def held_by(replica: Replica, since: float) -> int:
                listed = replica.api.call("GET", "/api/v1/supervisors")
                return sum(
                    1
                    for s in listed
                    if s["name"].rsplit("-", 1)[0] in names
                    and s["connected"]
                    and (s.get("connected_at") or 0) > since
                )

            deadline = time.monotonic() + 60
            while held_by(a, 0) < FAILOVER_SUPERVISORS:
                if time.monotonic() > deadline:
                    raise TimeoutError("the supervisors did not connect")
                time.sleep(0.05)
            killed_at, t0 = time.time(), time.monotonic()
            os.kill(a.pid, signal.SIGKILL)
            job_id = b.api.call("POST", "/api/v1/jobs", NOOP)["id"]
            moved = job_done = None
            deadline = time.monotonic() + 60
            while moved is None or job_done is None:
                if time.monotonic() > deadline:
                    raise TimeoutError("failover did not complete in 60 s")
                if moved is None and held_by(b, killed_at) >= FAILOVER_SUPERVISORS:
                    moved = time.monotonic() - t0
                if job_done is None:
                    phase = b.api.call("GET", f"/api/v1/jobs/{job_id}")["phase"]
                    if phase == "succeeded":
                        job_done = time.monotonic() - t0
                    elif phase in ("failed", "canceled", "rejected", "lost", "timed_out"):
                        raise RuntimeError(f"the job after the kill ended {phase}")
                time.sleep(0.02)
            return {"reconnected_s": moved, "first_job_s": job_done}
        finally:
            for sup in sups:
                sup.stop()


def measure_replicas(
    n_jobs: int,
    reps: int,
    batch: int,
    supervisors: int,
    max_jobs: int,
    latency_jobs: int,
    failovers: int,
) -> dict[str, Summary]:
    results: dict[str, list[float]] = _sqlite(n_jobs, reps, batch, supervisors, max_jobs)
    latency: dict[str, dict[str, Summary]] = {}
    with private_cluster(durable=True) as cluster:
        results["floor_pg_wal_flush_ms"] = [_wal_flush_ms(cluster) for _ in range(reps)]
        results["floor_pg_round_trip_ms"] = [_round_trip_ms(cluster.dsn) for _ in range(reps)]
        server = _server_pid(cluster)
        for count in (1, 2):
            with replicas(cluster, count) as targets:
                fleet = FleetProcess()
                try:
                    _connect_fleet(fleet, targets, supervisors, max_jobs)
                    results |= _throughput(
                        f"pg{count}", targets, fleet, n_jobs, reps, batch, server
                    )
                    if count == 1:
                        latency["pg1"] = _idle(targets[0], fleet, latency_jobs, reps)
                finally:
                    fleet.close()
        # The same idle round trip with commits that don't wait for the WAL flush (an
        # operator's choice, docs/deployment.md): what the rest of the path costs.
        with replicas(cluster, 1, settings={"synchronous_commit": "off"}) as targets:
            fleet = FleetProcess()
            try:
                _connect_fleet(fleet, targets, 4, max_jobs)
                latency["pg1_async"] = _idle(targets[0], fleet, latency_jobs, reps)
            finally:
                fleet.close()
        with tempfile.TemporaryDirectory(prefix="sb-bench-fo-") as work:
            for _ in range(failovers):
                for key, value in _failover(cluster, Path(work)).items():
                    results.setdefault(f"replicas_failover_{key}", []).append(value)
    units = {"jobs_per_s": "jobs/s", "_s": "s"}
    out = {
        key: Summary.of(values, next((u for k, u in units.items() if key.endswith(k)), "ms"))
        for key, values in results.items()
    }
    for bed, summaries in latency.items():
        for name in ("succeeded_p50_ms", "succeeded_p99_ms"):
            out[f"replicas_{bed}_idle_{name}"] = summaries[f"latency_{name}"]
    return out


def _idle(replica: Replica, fleet: FleetProcess, n_jobs: int, reps: int) -> dict[str, Summary]:
    token = replica.switchboard.create_token("supervisor")
    return measure_latency(_postgres_bed(replica, fleet, token), n_jobs, reps)


def _round_trip_ms(dsn: str, n: int = 1000) -> float:
    """One statement's round trip to the server (`SELECT 1` on a connection of asyncpg on
    uvloop, as the store's), median of `n`, in ms: what each statement of a transaction
    costs in waiting, before any work."""

    async def measure() -> float:
        conn = await asyncpg.connect(dsn)
        try:
            times = []
            for _ in range(n // 10):
                await conn.fetchval("SELECT 1")  # warm-up
            for _ in range(n):
                began = time.perf_counter()
                await conn.fetchval("SELECT 1")
                times.append(time.perf_counter() - began)
            return statistics.median(times) * 1000
        finally:
            await conn.close()

    return uvloop.run(measure())


def _wal_flush_ms(cluster: Cluster, n: int = 200) -> float:
    """What one flush of the WAL takes on the cluster's disk: an 8 kB write then fdatasync
    (Linux's default wal_sync_method), in a file beside the cluster's data, median of
    `n`, in ms (what PostgreSQL's pg_test_fsync measures as "fdatasync", without its
    fifteen other seconds-long tests). A durable commit waits for one."""
    path = cluster.root / "flush.probe"
    block = os.urandom(8192)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        times = []
        for _ in range(n):
            began = time.perf_counter()
            os.pwrite(fd, block, 0)
            os.fdatasync(fd)
            times.append(time.perf_counter() - began)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return statistics.median(times) * 1000
