"""`python -m bench.wait_latency`: a client's submit -> result round trip on an idle system,
waiting at the switchboard (`?wait=`, switchboard.client) versus polling.

A real switchboard process and one real noop supervisor process (tests.harness); no-op
jobs one after another, 10 ms of quiet before each. Per job, from just before the submit
to the client holding the ended job:
- `run`: `Client.run`, one request (`POST /api/v1/jobs?wait=`);
- `submit+wait`: `Client.submit`, then `Job.wait` (`GET /api/v1/jobs/{id}?wait=`);
- `poll N ms`: `Client.submit`, then `GET /api/v1/jobs/{id}` every N ms until it ended.
The floor is `GET /api/v1/health` (no token, no store): one HTTP round trip of this
client to this server. All through the same `Client` (httpx, one kept-alive connection).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.stats import Summary
from protocol.spec import JobSpec, NoopBackend
from protocol.state import TERMINAL
from switchboard.client import Client
from tests.harness import Switchboard, start_supervisor, wait_connected

QUIET_S = 0.01
SPEC = JobSpec(name="wait-bench", backend=NoopBackend())


def _poll(client: Client, every_s: float) -> Callable[[], None]:
    def once() -> None:
        job = client.submit(SPEC)
        while client.get_job(job.id).phase not in TERMINAL:
            time.sleep(every_s)

    return once


def measure(jobs: int) -> dict[str, Summary]:
    with tempfile.TemporaryDirectory(prefix="switchboard-bench-") as tmp:
        work = Path(tmp)
        switchboard = Switchboard(work / "data")
        try:
            supervisor = start_supervisor(switchboard, work, name="wait-noop", backend="noop")
            try:
                with switchboard.client() as raw:
                    wait_connected(raw, "wait-noop")
                with Client(switchboard.url, switchboard.admin_token) as client:
                    ways: dict[str, Callable[[], object]] = {
                        "health (floor)": lambda: client.get("/api/v1/health"),
                        "run": lambda: client.run(SPEC, timeout=60),
                        "submit+wait": lambda: client.submit(SPEC).wait(timeout=60),
                        "poll 10 ms": _poll(client, 0.01),
                        "poll 50 ms": _poll(client, 0.05),
                        "poll 200 ms": _poll(client, 0.2),
                    }
                    for way in ways.values():  # warm up: connections, first placement
                        way()
                    times: dict[str, list[float]] = {name: [] for name in ways}
                    for _ in range(jobs):  # interleaved: drift hits every way alike
                        for name, way in ways.items():
                            time.sleep(QUIET_S)
                            start = time.perf_counter()
                            way()
                            times[name].append((time.perf_counter() - start) * 1e3)
                return {name: Summary.of(values, "ms") for name, values in times.items()}
            finally:
                supervisor.stop()
        finally:
            switchboard.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100, help="jobs per way (default 100)")
    args = parser.parse_args()
    results = measure(args.jobs)
    floor = results["health (floor)"].median
    print(f"{'way':<16} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'p50/floor':>10}")
    for name, summary in results.items():
        print(
            f"{name:<16} {summary.median:8.2f} {summary.p90:8.2f} {summary.p99:8.2f}"
            f" {summary.median / floor:10.1f}"
        )


if __name__ == "__main__":
    main()
