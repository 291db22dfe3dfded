"""The dashboard's reads stay cheap with a big store: 10,000 jobs and 500 supervisors. Each
read's median is compared with the median of /api/v1/health (the floor: a request that
touches no data) measured in the same run, so a noisy machine moves both."""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import pytest

from protocol.messages import Hello
from protocol.spec import JobSpec, NoopBackend
from switchboard.store.sqlite import SQLiteStore
from tests.harness import Switchboard

JOBS = 10_000
SUPERVISORS = 500
#: How many times the floor a dashboard read may take. The reads do real work (an index
#: scan, a page of JSON), so they are slower than the floor; an unindexed scan or a read
#: of every job would be hundreds of times slower.
MAX_RATIO = 60


async def _seed(path) -> None:
    store = SQLiteStore(path)
    await store.open()
    try:
        for n in range(SUPERVISORS):
            hello = Hello(
                supervisor_id=f"host-{n:03d}",
                name=f"host-{n:03d}",
                versions=["1.0"],
                backends=["noop"],
                labels={"rack": str(n % 20)},
            )
            await store.supervisor_connected(hello)
        await store.forget_connections()
        for batch in range(JOBS // 1000):
            jobs = [
                (
                    f"job-{batch}-{i}",
                    JobSpec(
                        name=f"build {batch}-{i}",
                        labels={"team": f"t{i % 7}"},
                        priority=i % 5,
                        backend=NoopBackend(),
                    ),
                )
                for i in range(1000)
            ]
            await store.create_jobs(jobs, actor="seed", max_queued=JOBS)
    finally:
        await store.close()


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    data = tmp_path_factory.mktemp("big") / "data"
    data.mkdir()
    asyncio.run(_seed(data / "switchboard.sqlite3"))
    server = Switchboard(data)
    yield server
    server.stop()


def _median_ms(client: httpx.Client, path: str, **params: str) -> float:
    times = []
    for _ in range(15):
        started = time.perf_counter()
        response = client.get(path, params=params)
        times.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
    return statistics.median(times) * 1000


def test_dashboard_reads_stay_cheap_with_a_big_store(big):
    client = big.client()
    overview = client.get("/api/v1/overview").json()
    assert overview["supervisors"]["offline"] == SUPERVISORS
    assert sum(q["count"] for q in overview["queue"]) == JOBS
    floor = _median_ms(client, "/api/v1/health")
    reads = {
        "overview": _median_ms(client, "/api/v1/overview"),
        "first page": _median_ms(client, "/api/v1/jobs"),
        "filtered page": _median_ms(client, "/api/v1/jobs", label="team=t3", phase="queued"),
        "search": _median_ms(client, "/api/v1/jobs", q="build 7-99"),
        "supervisors": _median_ms(client, "/api/v1/supervisors"),
    }
    report = ", ".join(f"{k} {v:.1f} ms ({v / floor:.0f}x)" for k, v in reads.items())
    print(f"\nfloor (health) {floor:.2f} ms; {report}")
    for name, ms in reads.items():
        assert ms <= MAX_RATIO * max(floor, 1.0), f"{name}: {report}"
