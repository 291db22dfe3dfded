"""The peer a Python user would pick instead: Celery with Redis, on this machine, in this
run. Installed by the bench itself, only for the bench: Redis from Debian's
`redis-server` (started on a free loopback port, no persistence) and Celery in a virtualenv
of its own (`.bench-venvs/celery`, pinned below), so nothing of it is a dependency of the
product.

The measure is the closed loop of bench.closed_loop, run by the same driver script in
Celery's virtualenv: client threads, each `noop.delay().get()` one after the other; and
the idle round trip, one client alone. The worker runs `-c 2` (prefork), as many
processes as the machine has cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench import closed_loop

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".bench-venvs" / "celery"
#: What the peer is: pinned, so figures from two runs compare.
PACKAGES = ("celery[redis]==5.5.3",)
WORKER_CONCURRENCY = 2

TASKS = """
import os
from celery import Celery

url = os.environ["BENCH_REDIS_URL"]
app = Celery("bench_tasks", broker=url, backend=url)
app.conf.update(
    broker_connection_retry_on_startup=True,
    result_expires=300,
    worker_prefetch_multiplier=4,
    task_ignore_result=False,
)


@app.task
def noop():
    return 0
"""

#: Run in Celery's virtualenv: the closed loop's driver with `noop.delay().get()` as the
#: round trip (closed_loop.py is copied beside it: it imports nothing of ours).
DRIVER = """
import sys
import bench_tasks
import closed_loop

def round_trip():
    result = bench_tasks.noop.delay().get(timeout=60)
    if result != 0:
        raise RuntimeError(f"noop returned {result!r}")

closed_loop.main(round_trip, sys.argv[1:])
"""


class PeerMissing(Exception):
    """Celery or Redis could not be set up here (the reason says why)."""


def ensure_installed() -> Path:
    """Celery's virtualenv (made once) and Redis (apt-get, as root). Returns its python."""
    python = VENV / "bin" / "python"
    marker = VENV / ".installed"
    if not marker.exists() or marker.read_text() != " ".join(PACKAGES):
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *PACKAGES],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise PeerMissing(f"pip could not install {PACKAGES}: {done.stderr[-500:]}")
        marker.write_text(" ".join(PACKAGES))
    if shutil.which("redis-server") is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise PeerMissing("redis-server is not installed (apt-get install redis-server)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for args in (["update", "-q"], ["install", "-y", "-q", "redis-server"]):
            subprocess.run(["apt-get", *args], check=True, capture_output=True, env=env)
    return python


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise PeerMissing(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s:g} s")


@contextlib.contextmanager
def _process(args: list[str], log: Path, **kwargs: object) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, **kwargs)  # type: ignore[call-overload]
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def peer() -> Iterator[tuple[Path, Path, dict[str, str]]]:
    """Redis and a Celery worker running; yields (Celery's python, the driver's directory,
    the environment the driver needs)."""
    python = ensure_installed()
    with tempfile.TemporaryDirectory(prefix="bench-celery-") as tmp:
        work = Path(tmp)
        (work / "bench_tasks.py").write_text(TASKS)
        (work / "driver.py").write_text(DRIVER)
        shutil.copy(Path(closed_loop.__file__), work / "closed_loop.py")
        port = _free_port()
        env = dict(os.environ, BENCH_REDIS_URL=f"redis://127.0.0.1:{port}/0", PYTHONPATH=tmp)
        redis = [
            "redis-server",
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", tmp,
        ]  # fmt: skip
        with _process(redis, work / "redis.log"):
            _wait_port(port, "redis-server")
            worker = [
                str(python), "-m", "celery", "-A", "bench_tasks", "worker",
                "-c", str(WORKER_CONCURRENCY), "--pool", "prefork", "-l", "warning",
                "--without-gossip", "--without-mingle", "--without-heartbeat",
            ]  # fmt: skip
            with _process(worker, work / "worker.log", cwd=tmp, env=env):
                _warm_up(python, work, env)
                yield python, work, env


def _warm_up(python: Path, work: Path, env: dict[str, str]) -> None:
    """Until the worker answers (it takes a few seconds to start its processes)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            run_driver(python, work, env, ["idle", "--trips", "5"])
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                log = (work / "worker.log").read_text(errors="replace")[-2000:]
                raise PeerMissing(f"the Celery worker never answered; its log:\n{log}") from None
            time.sleep(0.5)


def run_driver(python: Path, work: Path, env: dict[str, str], args: list[str]) -> dict:
    done = subprocess.run(
        [str(python), "driver.py", *args], cwd=work, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"celery driver {args}: {done.stderr[-1000:]}")
    return json.loads(done.stdout)
