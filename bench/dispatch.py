"""Dispatch throughput and idle latency of no-op jobs, end to end: submitted over REST to a
real switchboard process, run by the simulated fleet (bench.fleet) in another process.

A job counts as done when the Ack covering its terminal `succeeded` event reaches the
fleet: the switchboard acknowledges only what it has committed, so every state of the job
is durable by then. Times are CLOCK_MONOTONIC readings of this process and the fleet's
(the same clock on one machine). Afterwards the REST API must list every job as succeeded.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from bench.bed import NOOP, Bed
from bench.e2e import Api
from bench.procs import cpu_seconds
from bench.stats import Summary, percentile

#: Client threads, each with its own keep-alive connection.
SINGLE_THREADS = 4
BATCH_THREADS = 2
#: Quiet time before each latency job, so that every job meets an idle system.
IDLE_GAP_S = 0.01


def _count_succeeded(api: Api, since: float) -> int:
    """Jobs created after `since` (epoch s) that the REST API lists as succeeded."""
    count, cursor = 0, ""
    while True:
        page = api.call(
            "GET", f"/api/v1/jobs?phase=succeeded&limit=500&created_after={since}{cursor}"
        )
        count += len(page["items"])
        if not page.get("next_cursor"):
            return count
        cursor = f"&cursor={page['next_cursor']}"


def _throughput_once(
    bed: Bed, pool: ThreadPoolExecutor, n_jobs: int, batch: int | None
) -> dict[str, float]:
    api, fleet = bed.api, bed.fleet
    fleet.call("reset_runs")
    pids = {"switchboard": bed.pid, "fleet": fleet.pid}
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    since = time.time()
    started = time.monotonic()
    if batch is None:
        ids = list(pool.map(lambda _: api.call("POST", "/api/v1/jobs", NOOP)["id"], range(n_jobs)))
    else:
        sizes = [min(batch, n_jobs - first) for first in range(0, n_jobs, batch)]
        pages = pool.map(lambda k: api.call("POST", "/api/v1/jobs/batch", [NOOP] * k), sizes)
        ids = [job["id"] for page in pages for job in page["jobs"]]
    submitted = time.monotonic()
    fleet.call("wait_done", count=n_jobs, limit_s=60 + n_jobs / 50)
    cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    marks = fleet.call("marks", job_ids=ids)
    if any(m["phase"] != "succeeded" or m["done_acked"] is None for m in marks.values()):
        raise RuntimeError("a no-op job did not succeed")
    last = max(m["done_acked"] for m in marks.values())
    listed = _count_succeeded(api, since)
    if listed != n_jobs:
        raise RuntimeError(f"{n_jobs} jobs acknowledged as succeeded, the API lists {listed}")
    return {
        "jobs_per_s": n_jobs / (last - started),
        "submit_per_s": n_jobs / (submitted - started),
        "switchboard_cpu_ms_per_job": cpu["switchboard"] / n_jobs * 1000,
        "fleet_cpu_ms_per_job": cpu["fleet"] / n_jobs * 1000,
    }


def _requests_per_s(bed: Bed, pool: ThreadPoolExecutor, n: int) -> float:
    """GET /api/v1/health (no token, no store) from the same client threads as the single
    POSTs: what one request costs this server before any of the job's work."""
    started = time.monotonic()
    list(pool.map(lambda _: bed.api.call("GET", "/api/v1/health"), range(n)))
    return n / (time.monotonic() - started)


def measure_throughput(bed: Bed, n_jobs: int, reps: int, batch: int) -> dict[str, Summary]:
    """jobs/s with single POSTs from SINGLE_THREADS threads and with batches of `batch`
    from BATCH_THREADS threads, alternating, `reps` times each, after a warm-up."""
    results: dict[str, list[float]] = {}
    with (
        ThreadPoolExecutor(BATCH_THREADS) as batches,
        ThreadPoolExecutor(SINGLE_THREADS) as singles,
    ):
        _throughput_once(bed, batches, min(n_jobs, 100), batch)  # warm-up: caches, pages
        for _ in range(reps):
            for mode, pool, size in (("batch", batches, batch), ("single", singles, None)):
                for key, value in _throughput_once(bed, pool, n_jobs, size).items():
                    results.setdefault(f"dispatch_{mode}_{key}", []).append(value)
            rate = _requests_per_s(bed, singles, n_jobs)
            results.setdefault("floor_http_health_per_s", []).append(rate)
    units = {"jobs_per_s": "jobs/s", "submit_per_s": "jobs/s", "health_per_s": "req/s"}
    return {
        key: Summary.of(values, next((u for k, u in units.items() if key.endswith(k)), "ms"))
        for key, values in results.items()
    }


# --- latency -----------------------------------------------------------------------------


def _latency_once(bed: Bed, n_jobs: int) -> dict[str, list[float]]:
    """One job at a time on an idle system: ms from just before the POST to each mark."""
    api = bed.api
    starts: dict[str, tuple[float, float]] = {}
    bed.fleet.call("watch", on=True)
    try:
        for _ in range(n_jobs):
            time.sleep(IDLE_GAP_S)
            t0 = time.monotonic()
            job_id = api.call("POST", "/api/v1/jobs", NOOP)["id"]
            starts[job_id] = (t0, time.monotonic())
            bed.wait_word("done", job_id, 30)
    finally:
        bed.fleet.call("watch", on=False)
    marks = bed.fleet.call("marks", job_ids=list(starts))
    out: dict[str, list[float]] = {"response": [], "dispatch": [], "running": [], "succeeded": []}
    for job_id, (t0, answered) in starts.items():
        m = marks[job_id]
        if m["phase"] != "succeeded":
            raise RuntimeError(f"latency job {job_id} ended {m['phase']}")
        out["response"].append((answered - t0) * 1000)
        out["dispatch"].append((m["start_received"] - t0) * 1000)
        out["running"].append((m["running_acked"] - t0) * 1000)
        out["succeeded"].append((m["done_acked"] - t0) * 1000)
    return out


def measure_latency(bed: Bed, n_jobs: int, reps: int) -> dict[str, Summary]:
    """p50 and p99 of each rep's `n_jobs` sequential jobs; summaries over the reps."""
    _latency_once(bed, min(n_jobs, 10))  # warm-up
    per_rep: dict[str, list[float]] = {}
    for _ in range(reps):
        for name, values in _latency_once(bed, n_jobs).items():
            ordered = sorted(values)
            for q, label in ((0.5, "p50"), (0.99, "p99")):
                key = f"latency_{name}_{label}_ms"
                per_rep.setdefault(key, []).append(percentile(ordered, q))
    return {key: Summary.of(values, "ms") for key, values in per_rep.items()}


class LiveWatcher(threading.Thread):
    """Reads GET /api/v1/live (server-sent events) and notes when each job is first
    shown with phase `succeeded`."""

    def __init__(self, port: int, token: str) -> None:
        super().__init__(name="live-watcher", daemon=True)
        self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self._token = token
        self.seen: dict[str, float] = {}
        self.changed = threading.Condition()
        self.ready = threading.Event()
        self.stopping = False

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self._token}"}
        try:
            self._conn.request("GET", "/api/v1/live", headers=headers)
            response = self._conn.getresponse()
            self.ready.set()
            kind = ""
            while line := response.readline():
                text = line.decode().rstrip("\r\n")
                if text.startswith("event:"):
                    kind = text[6:].strip()
                elif text.startswith("data:") and kind == "job":
                    job = json.loads(text[5:])
                    if job["phase"] == "succeeded":
                        with self.changed:
                            self.seen.setdefault(job["id"], time.monotonic())
                            self.changed.notify_all()
                elif not text:
                    kind = ""
        except Exception:
            if not self.stopping:  # stop() closes the socket under the reader: expected
                raise
        finally:
            self.ready.set()

    def wait_seen(self, job_id: str, timeout_s: float) -> float:
        with self.changed:
            if not self.changed.wait_for(lambda: job_id in self.seen, timeout_s):
                raise TimeoutError(f"job {job_id} not shown as succeeded on /api/v1/live")
            return self.seen[job_id]

    def stop(self) -> None:
        self.stopping = True
        if self._conn.sock is not None:
            self._conn.sock.shutdown(2)
        self._conn.close()


def measure_live(bed: Bed, n_jobs: int) -> dict[str, Summary]:
    """Submit -> succeeded as a dashboard sees it on the live stream (one job at a time)."""
    watcher = LiveWatcher(bed.switchboard.port, bed.switchboard.admin_token)
    watcher.start()
    watcher.ready.wait(30)
    times: list[float] = []
    try:
        for _ in range(n_jobs):
            time.sleep(IDLE_GAP_S)
            t0 = time.monotonic()
            job_id = bed.api.call("POST", "/api/v1/jobs", NOOP)["id"]
            times.append((watcher.wait_seen(job_id, 30) - t0) * 1000)
    finally:
        watcher.stop()
    return {"latency_live_succeeded_ms": Summary.of(times, "ms")}
