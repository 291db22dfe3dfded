"""Submit and wait, beside the peer: the closed loop (client threads, each submitting a
no-op job and waiting for its result) and the idle round trip, against a switchboard
(a real `switchboard serve`, four real noop supervisors) and against Celery + Redis
(bench.celery_peer), in the same run, repetitions alternating so both share the
machine's moods. Each driver is a process of its own, so neither side's figures carry
the other's client. The switchboard's loop runs twice: with the client library (one
`Client` shared by the threads, `Client.run`: what a user writes; concurrent calls share
requests) and with stdlib http.client (each trip alone in one request: the switchboard's
cost for a lone job). Then many clients wait at once, each on a job that does not end
(it waits for a supervisor that never comes): the switchboard's CPU and RSS with them
waiting, beside the same switchboard idle without them."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench import celery_peer
from bench.e2e import Api
from bench.procs import cpu_seconds, raise_fd_limit, rss_bytes
from bench.stats import Summary
from tests.harness import Switchboard, start_supervisor, wait_connected
from tests.scrape import sample_value

SUPERVISORS = 4
SLOTS_PER_SUPERVISOR = 8
#: HTTP connections the switchboard takes (the waiting clients need one each).
MAX_CONNECTIONS = 2000
#: Seconds each waiting client asks to wait (longer than the measurement).
WAITERS_WAIT_S = 60
#: A job that never ends while it is waited for: no supervisor has this label.
NOWHERE = {
    "name": "waited-for",
    "backend": {"kind": "noop"},
    "selector": {"match_labels": {"placement": "nowhere"}},
}


@contextlib.contextmanager
def switchboard() -> Iterator[tuple[Switchboard, dict[str, str]]]:
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        raise_fd_limit()  # the switchboard, started now, inherits it
        server = Switchboard(
            Path(tmp) / "data", extra_args=("--max-connections", str(MAX_CONNECTIONS))
        )
        supervisors = []
        try:
            with server.client() as client:
                for i in range(SUPERVISORS):
                    name = f"peer-noop-{i}"
                    supervisors.append(
                        start_supervisor(
                            server,
                            Path(tmp),
                            name=name,
                            backend="noop",
                            max_jobs=SLOTS_PER_SUPERVISOR,
                        )
                    )
                    wait_connected(client, name)
            env = dict(os.environ, SWITCHBOARD_URL=server.url, SWITCHBOARD_TOKEN=server.admin_token)
            yield server, env
        finally:
            for supervisor in supervisors:
                supervisor.stop()
            server.stop()


def _switchboard_driver(env: dict[str, str], args: list[str], via: str = "stdlib") -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "bench.sb_driver", "--via", via, *args],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"switchboard driver {args}: {done.stderr[-1000:]}")
    return json.loads(done.stdout)


def _waiting(server: Switchboard) -> float:
    with server.client() as client:
        return sample_value(client.get("/metrics").text, "switchboard_job_waiters")


def measure_waiters(
    server: Switchboard, env: dict[str, str], count: int, window_s: float, reps: int
) -> dict[str, Summary]:
    """`count` clients, each waiting on a job of its own that does not end: the
    switchboard's CPU (share of a core over `window_s`, `reps` windows) and RSS with them
    waiting and, before they come, idle (the same process, the same supervisors)."""
    pid = server.process.proc.pid
    api = Api(server.port, server.admin_token)
    ids = [
        job["id"]
        for start in range(0, count, 1000)
        for job in api.call("POST", "/api/v1/jobs/batch", [NOWHERE] * min(1000, count - start))[
            "jobs"
        ]
    ]

    def cpu_pct() -> float:
        before, began = cpu_seconds(pid), time.monotonic()
        time.sleep(window_s)
        return 100 * (cpu_seconds(pid) - before) / (time.monotonic() - began)

    idle = [cpu_pct() for _ in range(reps)]
    rss_idle = rss_bytes(pid)
    command = [sys.executable, "-m", "bench.wait_driver", "--wait", str(WAITERS_WAIT_S), *ids]
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout is not None
        driver.stdout.readline()  # "sent"
        deadline = time.monotonic() + 60
        while _waiting(server) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"waiters: fewer than {count} waiting after 60 s")
            time.sleep(0.2)
        waiting = [cpu_pct() for _ in range(reps)]
        rss_waiting = rss_bytes(pid)
        for job_id in ids:  # every waiter is answered as its job ends
            api.call("POST", f"/api/v1/jobs/{job_id}/cancel")
        answer = json.loads(driver.communicate(timeout=120)[0])
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    if answer["phases"] != {"canceled": count}:
        raise RuntimeError(f"waiters: answered {answer}, not {count} canceled")
    return {
        "peer_waiters_cpu_pct": Summary.of(waiting, "%core"),
        # What the waiting costs: with them less without them, window by window.
        "peer_waiters_cost_cpu_pct": Summary.of(
            [w - i for w, i in zip(waiting, idle, strict=True)], "%core"
        ),
        "peer_waiters_idle_cpu_pct": Summary.of(idle, "%core"),
        "peer_waiters_rss_mib": Summary.of([rss_waiting / 2**20], "MiB"),
        "peer_waiters_idle_rss_mib": Summary.of([rss_idle / 2**20], "MiB"),
        "peer_waiters_rss_kib_per_waiter": Summary.of(
            [(rss_waiting - rss_idle) / 1024 / count], "KiB"
        ),
    }


def measure_peer(
    threads: int, seconds: float, trips: int, reps: int, waiters: int, waiters_window_s: float
) -> dict[str, Summary]:
    loop_args = ["loop", "--threads", str(threads), "--seconds", str(seconds)]
    idle_args = ["idle", "--trips", str(trips)]
    figures: dict[str, list[float]] = {}
    units: dict[str, str] = {
        "switchboard_loop_cpu_ms_per_job": "ms",
        "client_loop_cpu_ms_per_job": "ms",
    }

    def note(prefix: str, result: dict) -> None:
        for key, value in result.items():
            unit = "jobs/s" if key.endswith("_per_s") else "ms" if key.endswith("_ms") else None
            if unit is not None:
                figures.setdefault(f"{prefix}_{key}", []).append(value)
                units[f"{prefix}_{key}"] = unit

    with celery_peer.peer() as (python, work, celery_env), switchboard() as (server, env):
        pid = server.process.proc.pid
        for _ in range(reps):
            note("celery_loop", celery_peer.run_driver(python, work, celery_env, loop_args))
            for prefix, via in (("switchboard", "stdlib"), ("client", "client")):
                before = cpu_seconds(pid)
                result = _switchboard_driver(env, loop_args, via)
                cpu_ms = (cpu_seconds(pid) - before) / result["jobs"] * 1e3
                figures.setdefault(f"{prefix}_loop_cpu_ms_per_job", []).append(cpu_ms)
                note(f"{prefix}_loop", result)
            note("celery_idle", celery_peer.run_driver(python, work, celery_env, idle_args))
            note("switchboard_idle", _switchboard_driver(env, idle_args))
            note("client_idle", _switchboard_driver(env, idle_args, "client"))
        summaries = {
            f"peer_{key}": Summary.of(values, units[key]) for key, values in figures.items()
        }
        summaries.update(measure_waiters(server, env, waiters, waiters_window_s, reps))
    return summaries
