"""The dashboard's reads stay cheap with a big store: 10,000 jobs and 500 supervisors. Each
read's median is compared with the median of /api/v1/health (the floor: a request that
touches no data) measured in the same run, so a noisy machine moves both."""

from __future__ import annotations

import statistics
import time

import httpx
import pytest

from protocol.spec import JobSpec, NoopBackend
from tests.big_store import big_switchboard

pytestmark = pytest.mark.process

JOBS = 10_000
SUPERVISORS = 500
#: How many times the floor a dashboard read may take. The reads do real work (an index
#: scan, a page of JSON), so they are slower than the floor; an unindexed scan or a read
#: of every job would be hundreds of times slower.
MAX_RATIO = 60


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    jobs = [
        (
            f"job-{i // 1000}-{i % 1000}",
            JobSpec(
                name=f"build {i // 1000}-{i % 1000}",
                labels={"team": f"t{i % 7}"},
                priority=i % 5,
                backend=NoopBackend(),
            ),
        )
        for i in range(JOBS)
    ]
    server = big_switchboard(tmp_path_factory.mktemp("big") / "data", SUPERVISORS, jobs)
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
