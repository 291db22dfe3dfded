"""Submit and wait, beside the peer: the closed loop (client threads, each submitting a
no-op job and waiting for its result) and the idle round trip, against a switchboard
(a real `switchboard serve`, four real noop supervisors) and against Celery + Redis
(bench.celery_peer), in the same run, repetitions alternating so both share the
machine's moods. Each driver is a process of its own, so neither side's figures carry
the other's client."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench import celery_peer
from bench.procs import cpu_seconds
from bench.stats import Summary
from tests.harness import Switchboard, start_supervisor, wait_connected

SUPERVISORS = 4
SLOTS_PER_SUPERVISOR = 8


@contextlib.contextmanager
def switchboard() -> Iterator[tuple[Switchboard, dict[str, str]]]:
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        server = Switchboard(Path(tmp) / "data")
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


def _switchboard_driver(env: dict[str, str], args: list[str]) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "bench.sb_driver", *args], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"switchboard driver {args}: {done.stderr[-1000:]}")
    return json.loads(done.stdout)


def measure_peer(threads: int, seconds: float, trips: int, reps: int) -> dict[str, Summary]:
    loop_args = ["loop", "--threads", str(threads), "--seconds", str(seconds)]
    idle_args = ["idle", "--trips", str(trips)]
    figures: dict[str, list[float]] = {}
    units: dict[str, str] = {"switchboard_loop_cpu_ms_per_job": "ms"}

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
            before = cpu_seconds(pid)
            result = _switchboard_driver(env, loop_args)
            cpu_ms = (cpu_seconds(pid) - before) / result["jobs"] * 1e3
            figures.setdefault("switchboard_loop_cpu_ms_per_job", []).append(cpu_ms)
            note("switchboard_loop", result)
            note("celery_idle", celery_peer.run_driver(python, work, celery_env, idle_args))
            note("switchboard_idle", _switchboard_driver(env, idle_args))
    return {f"peer_{key}": Summary.of(values, units[key]) for key, values in figures.items()}
