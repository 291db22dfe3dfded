"""End-to-end throughput: a real switchboard process and one real wasm supervisor process
(tests.harness), jobs submitted over REST all at once, timed until the last one ends.

The client shares the machine with what it measures, so it is kept cheap: stdlib
http.client on keep-alive connections costs ~0.2 ms of CPU per request where
httpx.AsyncClient costs ~2 ms (measured on the 2-core machine this was written on).
"""

from __future__ import annotations

import http.client
import json
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.procs import cpu_seconds
from bench.stats import Summary
from tests.harness import TERMINAL, Switchboard, start_supervisor, wait_connected, wait_job

#: Threads (each with one keep-alive connection) submitting and checking jobs.
CLIENT_THREADS = 4
#: Between polls of the last job (polls load the switchboard too).
POLL_S = 0.05


class Api:
    """A minimal JSON client for the switchboard's REST API, one connection per thread."""

    def __init__(self, port: int, token: str) -> None:
        self._port = port
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._local = threading.local()

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        for attempt in (1, 2):  # a kept-alive connection the server closed: once more
            conn = self._conn()
            try:
                conn.request(method, path, body=data, headers=self._headers)
                response = conn.getresponse()
                payload = response.read()
            except (ConnectionError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
                continue
            if response.status >= 300:
                raise RuntimeError(f"{method} {path}: HTTP {response.status} {payload[:200]!r}")
            return json.loads(payload) if payload else None
        raise AssertionError("unreachable")

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection("127.0.0.1", self._port)
        return conn


def measure_e2e(wasm: bytes, n_jobs: int, reps: int, max_jobs: int) -> dict[str, Summary]:
    with tempfile.TemporaryDirectory(prefix="switchboard-bench-") as tmp:
        work = Path(tmp)
        switchboard = Switchboard(work / "data")
        try:
            supervisor = start_supervisor(switchboard, work, name="bench-wasm", max_jobs=max_jobs)
            try:
                pids = {
                    "switchboard": switchboard.process.proc.pid,
                    "supervisor": supervisor.proc.pid,
                }
                return _measure(switchboard, pids, wasm, n_jobs, reps)
            finally:
                supervisor.stop()
        finally:
            switchboard.stop()


def _measure(
    switchboard: Switchboard, pids: dict[str, int], wasm: bytes, n_jobs: int, reps: int
) -> dict[str, Summary]:
    with switchboard.client() as client:
        wait_connected(client, "bench-wasm")
        response = client.post("/api/v1/artifacts", content=wasm)
        response.raise_for_status()
        spec = {"name": "stamp", "backend": {"kind": "wasm", "module": response.json()["digest"]}}
        warm = client.post("/api/v1/jobs", json=spec).json()["id"]  # the supervisor compiles
        if wait_job(client, warm)["phase"] != "succeeded":
            raise RuntimeError("the warm-up job failed")
    api = Api(switchboard.port, switchboard.admin_token)
    rates, submit_rates, extra_attempts = [], [], 0
    cpu: dict[str, list[float]] = {name: [] for name in pids}
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        for _ in range(reps):
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            rate, submit_rate, extra = _batch(api, pool, spec, n_jobs)
            for name, pid in pids.items():
                cpu[name].append((cpu_seconds(pid) - before[name]) / n_jobs * 1e3)
            rates.append(rate)
            submit_rates.append(submit_rate)
            extra_attempts += extra
    return {
        "e2e_jobs_per_s": Summary.of(rates, "jobs/s"),
        "e2e_submit_per_s": Summary.of(submit_rates, "jobs/s"),
        "e2e_switchboard_cpu_ms_per_job": Summary.of(cpu["switchboard"], "ms"),
        "e2e_supervisor_cpu_ms_per_job": Summary.of(cpu["supervisor"], "ms"),
        "e2e_extra_attempts": Summary.of([float(extra_attempts)], "count"),
    }


def _batch(api: Api, pool: ThreadPoolExecutor, spec: dict, n_jobs: int) -> tuple[float, float, int]:
    """Submit `n_jobs`, wait for all to end. Returns (jobs/s from the first POST to the last
    job's end as the switchboard recorded it, POSTs/s, runs beyond one per job)."""
    t0 = time.time()
    ids = list(pool.map(lambda _: api.call("POST", "/api/v1/jobs", spec)["id"], range(n_jobs)))
    submit_rate = n_jobs / (time.time() - t0)
    # Jobs end about in submission order: wait for the last, then check every one.
    _wait_ended(api, ids[-1])
    jobs = list(pool.map(lambda job_id: _wait_ended(api, job_id), ids))
    failed = [j["id"] for j in jobs if j["phase"] != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {n_jobs} jobs did not succeed, e.g. {failed[0]}")
    end = max(j["runs"][-1]["ended_at"] or j["updated_at"] for j in jobs)
    extra = sum(len(j["runs"]) - 1 for j in jobs)
    return n_jobs / (end - t0), submit_rate, extra


def _wait_ended(api: Api, job_id: str, limit_s: float = 600.0) -> dict:
    deadline = time.monotonic() + limit_s
    while True:
        job = api.call("GET", f"/api/v1/jobs/{job_id}")
        if job["phase"] in TERMINAL:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} did not end: {job}")
        time.sleep(POLL_S)
