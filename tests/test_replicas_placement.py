"""Three replicas placing at once on one PostgreSQL database never double book: thousands of
no-op jobs, half of them asking for a board, submitted through all three replicas to 100
simulated supervisors (bench.fleet: the real protocol over real sockets, each supervisor
with two slots and two boards) split between them. The fleet watches every StartJob: none
beyond a supervisor's slots, no board granted while another run holds it; the database
has one run per job, and every job succeeded."""

from __future__ import annotations

import asyncio
import base64
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import pytest

from bench.e2e import Api
from bench.fleet import DEVICE_CLASS, FleetProcess
from tests.harness import Switchboard, scaled
from tests.postgres import (
    Cluster,
    postgres_fixture,  # noqa: F401 - one cluster per session
)

pytestmark = [pytest.mark.postgres, pytest.mark.process, pytest.mark.timeout(600)]

#: Jobs in all (the contract asks 10,000; SWITCHBOARD_PLACEMENT_JOBS changes it).
JOBS = int(os.environ.get("SWITCHBOARD_PLACEMENT_JOBS", "10000"))
SUPERVISORS = 100
SLOTS = 2
BOARDS = 2
BATCH = 100


def _noop(n: int) -> dict:
    spec: dict = {"name": f"n{n}", "backend": {"kind": "noop"}}
    if n % 2:
        spec["resources"] = {DEVICE_CLASS: 1}
    return spec


async def _database_facts(dsn: str) -> tuple[int, int, dict[str, int]]:
    conn = await asyncpg.connect(dsn)
    try:
        twice = await conn.fetchval(
            "SELECT count(*) FROM (SELECT job_id FROM runs GROUP BY job_id HAVING count(*) > 1) t"
        )
        shared = await conn.fetchval(
            "SELECT count(*) FROM run_devices a JOIN run_devices b ON a.device_id = b.device_id"
            " AND (a.job_id, a.attempt) < (b.job_id, b.attempt)"
            " JOIN runs ra ON ra.job_id = a.job_id AND ra.attempt = a.attempt"
            " JOIN runs rb ON rb.job_id = b.job_id AND rb.attempt = b.attempt"
            " WHERE ra.created_at < rb.ended_at AND rb.created_at < ra.ended_at"
        )
        rows = await conn.fetch("SELECT phase, count(*) FROM jobs GROUP BY phase")
        phases = {r[0]: r[1] for r in rows}
        return twice, shared, phases
    finally:
        await conn.close()


async def _key_overlaps(dsn: str) -> int:
    """Pairs of runs of one concurrency key that were active at the same time."""
    conn = await asyncpg.connect(dsn)
    try:
        overlaps: int = await conn.fetchval(
            "SELECT count(*) FROM runs ra JOIN jobs ja ON ja.id = ra.job_id"
            " JOIN jobs jb ON jb.concurrency_key = ja.concurrency_key AND jb.id > ja.id"
            " JOIN runs rb ON rb.job_id = jb.id"
            " WHERE ra.created_at < rb.ended_at AND rb.created_at < ra.ended_at"
        )
        return overlaps
    finally:
        await conn.close()


def _replicas(tmp_path: Path, dsn: str) -> list[Switchboard]:
    key = tmp_path / "replicas.key"
    key.write_text(base64.urlsafe_b64encode(os.urandom(32)).decode() + "\n")
    key.chmod(0o600)
    return [
        Switchboard(
            tmp_path / f"data-{name}",
            database=dsn,
            extra_args=("--replica-id", name, "--secret-key-file", str(key)),
        )
        for name in "abc"
    ]


def test_three_replicas_never_double_book(tmp_path: Path, postgres: Cluster) -> None:
    dsn = postgres.new_database("placement")
    replicas = _replicas(tmp_path, dsn)
    fleet = FleetProcess()
    try:
        token = replicas[0].create_token("supervisor")
        share = -(-SUPERVISORS // len(replicas))
        for n, replica in enumerate(replicas):
            fleet.call(
                "connect",
                url=f"{replica.ws_url}/ws/supervisor",
                token=token,
                count=min(share, SUPERVISORS - n * share),
                prefix=f"{'abc'[n]}-host",
                max_jobs=SLOTS,
                devices=BOARDS,
            )
        apis = [Api(r.port, r.admin_token) for r in replicas]

        def submit(first: int) -> int:
            api = apis[(first // BATCH) % len(apis)]
            body = [_noop(n) for n in range(first, min(first + BATCH, JOBS))]
            return len(api.call("POST", "/api/v1/jobs/batch", body)["jobs"])

        with ThreadPoolExecutor(len(apis)) as pool:
            assert sum(pool.map(submit, range(0, JOBS, BATCH))) == JOBS
        fleet.call("wait_done", count=JOBS, limit_s=scaled(400), timeout_s=scaled(450))
        counters = fleet.call("counters")
        assert counters["error_count"] == 0, counters
        assert counters["over_capacity"] == 0, counters
        assert counters["double_grants"] == 0, counters
        assert counters["starts"] == JOBS, counters  # no job's run started twice
        twice, shared, phases = asyncio.run(_database_facts(dsn))
        assert twice == 0 and shared == 0, (twice, shared)
        assert phases == {"succeeded": JOBS}, phases
    finally:
        fleet.close()
        for replica in replicas:
            replica.stop()


def test_three_replicas_run_one_job_of_a_key_at_a_time(tmp_path: Path, postgres: Cluster) -> None:
    """Jobs of a few concurrency keys, submitted through all three replicas at once: each
    replica places on its own supervisors, and no two jobs of one key ever run together."""
    dsn = postgres.new_database("keys")
    replicas = _replicas(tmp_path, dsn)
    fleet = FleetProcess()
    jobs, keys = 600, 20
    try:
        token = replicas[0].create_token("supervisor")
        for n, replica in enumerate(replicas):
            fleet.call(
                "connect",
                url=f"{replica.ws_url}/ws/supervisor",
                token=token,
                count=6,
                prefix=f"{'abc'[n]}-host",
                max_jobs=SLOTS,
            )
        apis = [Api(r.port, r.admin_token) for r in replicas]

        def submit(n: int) -> str:
            spec = {
                "name": f"k{n}",
                "backend": {"kind": "noop"},
                "concurrency": {"key": f"key-{n % keys}"},
            }
            return str(apis[n % len(apis)].call("POST", "/api/v1/jobs", spec)["id"])

        with ThreadPoolExecutor(len(apis) * 2) as pool:
            assert len(set(pool.map(submit, range(jobs)))) == jobs
        fleet.call("wait_done", count=jobs, limit_s=scaled(200), timeout_s=scaled(250))
        counters = fleet.call("counters")
        assert counters["error_count"] == 0 and counters["starts"] == jobs, counters
        assert asyncio.run(_key_overlaps(dsn)) == 0
        _, _, phases = asyncio.run(_database_facts(dsn))
        assert phases == {"succeeded": jobs}, phases
    finally:
        fleet.close()
        for replica in replicas:
            replica.stop()
