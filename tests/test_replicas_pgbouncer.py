"""Switchboard replicas on PostgreSQL through PgBouncer in transaction pooling mode (a
private PgBouncer, tests/pgbouncer.py, before the private cluster of tests/postgres.py,
5 server connections per database): with `--database-pooler` two replicas run jobs end
to end, a cancel through the other replica arrives (the sweep: no NOTIFY), a killed
leader is replaced, and nothing in their logs speaks of prepared statements; without it
the start is refused, saying to set it; and, roughly, what it costs in no-op jobs per
second against a direct connection (docs/deployment.md, "PgBouncer")."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from switchboard.store.postgres_engine import PostgresEngine, connect
from tests.harness import (
    Switchboard,
    run_cli,
    start_supervisor,
    wait_connected,
    wait_for,
    wait_job,
    wait_running,
)
from tests.pgbouncer import SETUP_HINT, Bouncer, missing, private_bouncer, version
from tests.postgres import (
    Cluster,
    postgres_fixture,  # noqa: F401 - one cluster per session
)
from tests.replicas import leading, replica_id, sql, start_replicas, stop

pytestmark = pytest.mark.postgres

_names = itertools.count()

#: Server connections PgBouncer keeps per database and user (the replicas' pools hold
#: up to 10 client connections each).
POOL_SIZE = 5

#: What PgBouncer 1.18 says when a prepared statement asyncpg made on one server session
#: is used on another.
PREPARED = "prepared statement"

#: The two timeouts a transaction has.
SHOW = (
    "SELECT current_setting('statement_timeout'),"
    " current_setting('idle_in_transaction_session_timeout')"
)


@pytest.fixture(name="bouncer")
def bouncer_fixture(postgres: Cluster) -> Iterator[Bouncer]:
    reason = missing()
    if reason is not None:
        pytest.fail(f"{reason}: {SETUP_HINT}")
    with private_bouncer(postgres, pool_size=POOL_SIZE) as bouncer:
        yield bouncer


def _database(postgres: Cluster, bouncer: Bouncer) -> tuple[str, str]:
    """A new database: its URI direct, and through the bouncer."""
    name = f"pgbouncer_{next(_names)}"
    return postgres.new_database(name), bouncer.dsn(name)


def _serve_refused(tmp_path: Path, dsn: str, *extra: str) -> str:
    """What `switchboard serve --database dsn` says as it refuses to start."""
    done = run_cli(
        *("-m", "switchboard", "serve", "--port", "0", "--data-dir", str(tmp_path / "data")),
        *("--database", dsn, *extra),
        check=False,
        timeout=60,
    )
    assert done.returncode != 0, done.stdout
    return done.stderr.decode()


def test_two_replicas_through_pgbouncer_run_cancel_and_fail_over(
    tmp_path, postgres: Cluster, bouncer: Bouncer, monkeypatch
):
    print(version())
    direct, pooled = _database(postgres, bouncer)
    # Every switchboard command started here (serve, token create) goes through it.
    monkeypatch.setenv("SWITCHBOARD_DATABASE_POOLER", "1")
    a, b = start_replicas(tmp_path, pooled, 2)
    on_a = start_supervisor(a, tmp_path, name="on-a", backend="noop", labels={"at": "a"})
    on_b = start_supervisor(b, tmp_path, name="on-b", backend="noop", labels={"at": "b"})
    try:
        client_a, client_b = a.client(), b.client()
        for client in (client_a, client_b):
            wait_connected(client, "on-a")
            wait_connected(client, "on-b")
        # Jobs submitted through each replica, placed on either one's supervisor.
        ids = []
        for n in range(40):
            client = (client_a, client_b)[n % 2]
            spec = {
                "name": f"job-{n}",
                "backend": {"kind": "noop", "output": f"out {n}\n"},
                "selector": {"match_labels": {"at": "ab"[(n // 2) % 2]}},
            }
            response = client.post("/api/v1/jobs", json=spec)
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
        for n, job_id in enumerate(ids):
            job = wait_job((client_b, client_a)[n % 2], job_id)
            assert job["phase"] == "succeeded", job
            assert client_a.get(f"/api/v1/jobs/{job_id}/output").content == f"out {n}\n".encode()
        # The replicas' 20 client connections shared 5 server sessions.
        servers = sql(
            direct,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()",
        )[0][0]
        assert servers <= POOL_SIZE, servers

        # A cancel through a reaches the supervisor held by b: b finds it by its sweep.
        spec = {
            "name": "long",
            "backend": {"kind": "noop", "delay_s": 300},
            "selector": {"match_labels": {"at": "b"}},
        }
        job_id = client_a.post("/api/v1/jobs", json=spec).json()["id"]
        wait_running(client_a, job_id)
        asked = time.monotonic()
        assert client_a.post(f"/api/v1/jobs/{job_id}/cancel").status_code < 300
        assert wait_job(client_a, job_id, timeout=10)["phase"] == "canceled"
        print(f"a cancel through the other replica took {time.monotonic() - asked:.2f} s")

        # A killed leader is replaced (its lease, a row, expires: 10 s, claimed every 2 s).
        leader = wait_for(lambda: [r for r in (a, b) if leading(r)], "a leader")[0]
        other = b if leader is a else a
        leader.process.kill()
        killed = time.monotonic()
        wait_for(lambda: leading(other), "the other replica leads", timeout=25)
        took = time.monotonic() - killed
        print(f"a new leader {took:.1f} s after the leader was killed")
        assert took <= 20, took
        holder = sql(direct, "SELECT holder FROM switchboard_lease")[0][0]
        assert holder == replica_id(other)
        # The survivor still serves: a job through it runs on its supervisor.
        client = other.client()
        spec = {"name": "after", "backend": {"kind": "noop"}}
        job_id = client.post("/api/v1/jobs", json=spec).json()["id"]
        assert wait_job(client, job_id)["phase"] == "succeeded"
    finally:
        stop(on_a, on_b, a, b)
    for replica in (a, b):
        log = replica.process.log_path.read_text(errors="replace")
        assert PREPARED not in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
    assert PREPARED not in bouncer.log(), bouncer.log()


def test_the_timeouts_hold_in_each_transaction_through_pgbouncer(
    postgres: Cluster, bouncer: Bouncer
):
    """Set with SET LOCAL in each transaction (no startup parameters through the pooler):
    what a read and a write see, on a pool larger than the bouncer's."""
    _, pooled = _database(postgres, bouncer)

    async def run() -> set[tuple[str, str]]:
        engine = PostgresEngine(
            pooled, max_connections=8, statement_timeout_s=7, idle_in_transaction_s=3, pooled=True
        )
        await engine.open()
        try:

            async def seen(conn) -> tuple[str, str]:
                return tuple(await conn.fetchrow(SHOW))

            found = await asyncio.gather(
                *(engine.read(seen) for _ in range(20)), *(engine.write(seen) for _ in range(20))
            )
            return set(found)
        finally:
            await engine.close()

    async def after() -> set[tuple[str, str]]:
        """What transactions of another client see on the bouncer's server sessions."""
        conn = await connect(pooled, pooled=True)
        try:
            seen = set()
            for _ in range(2 * POOL_SIZE):
                async with conn.transaction():
                    seen.add(tuple(await conn.fetchrow(SHOW)))
            return seen
        finally:
            await conn.close()

    assert asyncio.run(run()) == {("7s", "3s")}
    # Nothing stayed in the shared sessions: the server's own settings (none).
    assert asyncio.run(after()) == {("0", "0")}


def test_without_the_setting_pgbouncer_is_refused_at_start(
    tmp_path, postgres: Cluster, monkeypatch
):
    """PgBouncer's default refuses the store's startup parameters; told to ignore them it
    drops them (and runs prepared statements on sessions that never saw them): either
    way `serve` stops at once, naming --database-pooler."""
    with private_bouncer(postgres, pool_size=POOL_SIZE) as bouncer:
        _, pooled = _database(postgres, bouncer)
        said = _serve_refused(tmp_path, pooled)
        assert "unsupported startup parameter" in said, said
        assert "--database-pooler" in said, said
    ignoring = "ignore_startup_parameters = statement_timeout, idle_in_transaction_session_timeout"
    with private_bouncer(postgres, pool_size=POOL_SIZE, extra=(ignoring,)) as bouncer:
        _, pooled = _database(postgres, bouncer)
        said = _serve_refused(tmp_path, pooled)
        assert "did not keep the idle_in_transaction_session_timeout" in said, said
        assert "--database-pooler" in said, said
        # With it, the same database and bouncer serve.
        monkeypatch.setenv("SWITCHBOARD_DATABASE_POOLER", "1")
        replica = Switchboard(tmp_path / "data-ok", database=pooled)
        assert leading(replica) or wait_for(lambda: leading(replica), "it leads")
        replica.stop()


def test_an_upgrade_through_the_pooler_is_refused(tmp_path, bouncer: Bouncer, postgres: Cluster):
    _, pooled = _database(postgres, bouncer)
    said = _serve_refused(tmp_path, pooled, "--database-pooler", "--upgrade")
    assert "--upgrade is refused with --database-pooler" in said, said
    assert "server's own address" in said, said


#: No-op jobs per measured run, and the threads submitting them.
MEASURED_JOBS = 300
SUBMITTERS = 4


def _jobs_per_s(tmp_path: Path, name: str, dsn: str) -> float:
    """No-op jobs per second through one switchboard on `dsn` with one supervisor
    (MEASURED_JOBS, submitted by SUBMITTERS threads, from the first submission to the
    last one done)."""
    server = Switchboard(tmp_path / f"data-{name}", database=dsn)
    sup = start_supervisor(server, tmp_path, name=f"sup-{name}", backend="noop", max_jobs=8)
    try:
        wait_connected(server.client(), f"sup-{name}")
        spec = {"name": "noop", "backend": {"kind": "noop"}}

        def submit(count: int) -> list[str]:
            with server.client() as client:
                return [client.post("/api/v1/jobs", json=spec).json()["id"] for _ in range(count)]

        started = time.monotonic()
        with ThreadPoolExecutor(SUBMITTERS) as pool:
            batches = list(pool.map(submit, [MEASURED_JOBS // SUBMITTERS] * SUBMITTERS))
        with server.client() as client:
            for job_id in itertools.chain.from_iterable(batches):
                assert wait_job(client, job_id)["phase"] == "succeeded"
        return MEASURED_JOBS / (time.monotonic() - started)
    finally:
        stop(sup, server)


def test_what_the_pooler_costs(tmp_path, postgres: Cluster, bouncer: Bouncer, monkeypatch):
    """Rough: no-op jobs per second through PgBouncer (transaction mode, --database-pooler)
    against a direct connection, in the same run, and --database-pooler on a direct
    connection (what the lost statement cache costs without the hop); docs/deployment.md
    quotes the ratios. The machine is shared: when the first pair (direct, then pooled)
    misses the bound, a second pair is measured, and the better pair judged."""
    uncached, _ = _database(postgres, bouncer)
    pairs = []
    for attempt in range(2):
        direct, _ = _database(postgres, bouncer)  # each server on a database of its own
        _, pooled = _database(postgres, bouncer)
        monkeypatch.delenv("SWITCHBOARD_DATABASE_POOLER", raising=False)
        rate_direct = _jobs_per_s(tmp_path, f"direct-{attempt}", direct)
        monkeypatch.setenv("SWITCHBOARD_DATABASE_POOLER", "1")
        if attempt == 0:
            rate_uncached = _jobs_per_s(tmp_path, "uncached", uncached)
        rate_pooled = _jobs_per_s(tmp_path, f"pooled-{attempt}", pooled)
        pairs.append((rate_direct, rate_pooled))
        print(
            f"{MEASURED_JOBS} no-op jobs: direct {rate_direct:.0f}/s, direct with"
            f" --database-pooler {rate_uncached:.0f}/s ({rate_uncached / rate_direct:.2f}),"
            f" through PgBouncer {rate_pooled:.0f}/s ({rate_pooled / rate_direct:.2f} of direct)"
        )
        if rate_pooled / rate_direct > 0.25:
            break
    assert max(pooled / direct for direct, pooled in pairs) > 0.25, pairs
