"""Docker backend overhead per container.
`python -m bench.docker_overhead [--runs N] [--docker-host URL] [--json PATH]`

Measures, on one engine and one image (`sb-busybox`, command `true`), the wall-clock time of:
- supervisor: BackendSupervisor.start_job(StartJob) until the run's exit status is reported
  (JobExit event), the container created, attached, started, waited for, inspected and
  removed along the way;
- docker run: `docker -H HOST run --rm --network none sb-busybox true` as a subprocess (the
  floor: what an operator would do by hand; it too waits for the removal).
The two alternate run by run, so that a noisy neighbour hits both alike. The result is the
ratio of the medians (goal: <= 1.0).

Without --docker-host a private dockerd is started (tests.docker_engine; needs root, dockerd
and a static busybox, as the tests do) and stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import uvloop

from bench.stats import Summary, machine, table
from protocol.messages import JobExit, StartJob, SupervisorEvent
from protocol.spec import DockerBackend as DockerSpec
from supervisor.artifacts import FileArtifactSource
from supervisor.backends.docker import DockerBackend
from supervisor.jobs import BackendSupervisor
from tests.docker_engine import BUSYBOX_IMAGE, import_busybox, private_engine
from tests.recording import RecordingConnector

#: The issue's goal for supervisor / docker run.
GOAL_RATIO = 1.0
WARMUP = 3


class ExitWaiter(RecordingConnector):
    """Records events and wakes whoever waits for a run's exit status."""

    def __init__(self, supervisor: BackendSupervisor) -> None:
        super().__init__(supervisor)
        self.waiting: dict[str, asyncio.Future[JobExit]] = {}

    async def send_event(self, event: SupervisorEvent) -> None:
        await super().send_event(event)
        if isinstance(event, JobExit):
            future = self.waiting.pop(event.job_id, None)
            if future is not None and not future.done():
                future.set_result(event)


async def measure(host: str, runs: int) -> dict[str, Summary]:
    work = Path(tempfile.mkdtemp(prefix="sb-bench-"))
    backend = DockerBackend(
        FileArtifactSource([]), supervisor_id="sb-bench", docker_host=host, work_dir=work
    )
    supervisor = BackendSupervisor(backend, max_jobs=1, work_dir=work / "supervisor")
    events = ExitWaiter(supervisor)
    await supervisor.recover()
    spec = DockerSpec(image=BUSYBOX_IMAGE, command=["true"])
    cli = ["docker", "-H", host, "run", "--rm", "--network", "none", BUSYBOX_IMAGE, "true"]
    loop = asyncio.get_running_loop()

    async def supervisor_run(n: int) -> float:
        job_id = f"bench-{n}"
        exited: asyncio.Future[JobExit] = loop.create_future()
        events.waiting[job_id] = exited
        started = time.perf_counter()
        await supervisor.start_job(StartJob(job_id=job_id, attempt=1, backend=spec))
        ended = await exited
        took = time.perf_counter() - started
        if ended.exit_code != 0:
            raise RuntimeError(f"the benchmark job failed: {ended}")
        await supervisor.wait_idle()
        events.events.clear()
        return took * 1000

    def docker_run() -> float:
        started = time.perf_counter()
        subprocess.run(cli, check=True, capture_output=True)
        return (time.perf_counter() - started) * 1000

    try:
        for n in range(WARMUP):
            await supervisor_run(-1 - n)
            await asyncio.to_thread(docker_run)
        ours, floor = [], []
        for n in range(runs):
            if n % 2:  # alternate which one goes first
                ours.append(await supervisor_run(n))
                floor.append(await asyncio.to_thread(docker_run))
            else:
                floor.append(await asyncio.to_thread(docker_run))
                ours.append(await supervisor_run(n))
    finally:
        await supervisor.shutdown(grace_s=1.0)
        shutil.rmtree(work, ignore_errors=True)
    return {"supervisor_ms": Summary.of(ours, "ms"), "docker_run_ms": Summary.of(floor, "ms")}


@contextlib.contextmanager
def engine_at(host: str | None) -> Iterator[str]:
    if host is not None:
        api = docker.APIClient(base_url=host, version="auto")
        try:
            api.inspect_image(BUSYBOX_IMAGE)
        except docker.errors.ImageNotFound:
            import_busybox(api)
        finally:
            api.close()
        yield host
        return
    with private_engine() as engine:
        yield engine.host


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.docker_overhead")
    parser.add_argument("--runs", type=int, default=20, help="measured runs of each (20)")
    parser.add_argument("--docker-host", help="an engine to use (default: start a private one)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if shutil.which("docker") is None:
        print("bench: the docker CLI is needed for the `docker run` floor", file=sys.stderr)
        return 2
    with engine_at(args.docker_host) as host:
        results = uvloop.run(measure(host, args.runs))
    ratio = results["supervisor_ms"].median / results["docker_run_ms"].median
    print(
        table(
            [
                ("supervisor: StartJob -> exit reported", results["supervisor_ms"]),
                ("docker run --rm (floor)", results["docker_run_ms"]),
            ]
        )
    )
    verdict = "meets" if ratio <= GOAL_RATIO else "misses"
    print(f"\nsupervisor / docker run, medians: {ratio:.2f} ({verdict} the goal <= {GOAL_RATIO})")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "results": {k: v.as_dict() for k, v in results.items()},
                    "ratio": ratio,
                    "goal_ratio": GOAL_RATIO,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
