"""In-process measurements: a BackendSupervisor on a WasmBackend, driven by a connector that
only records when things happened, next to bare wasmtime-py doing the same work."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import wasmtime

from connector.base import Supervisor, SupervisorConnector
from protocol.exceptions import JobError, JobErrorKind
from protocol.messages import JobStateChanged, Output, StartJob, SupervisorEvent
from protocol.spec import WasmBackend as WasmSpec
from protocol.state import Phase, is_terminal
from supervisor.artifacts import MemoryArtifactSource as MemoryArtifacts
from supervisor.backends.wasm import WasmBackend
from supervisor.jobs import BackendSupervisor


class TimingConnector(SupervisorConnector):
    """Keeps, per job, the time_ns at which each stage/phase was first reported, the stdout
    bytes and the terminal phase; calls `on_end` when a run reaches a terminal phase."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.marks: defaultdict[str, dict[str, int]] = defaultdict(dict)
        self.stdout: defaultdict[str, bytearray] = defaultdict(bytearray)
        self.final: dict[str, Phase] = {}
        self.on_end: Callable[[str], None] = lambda job_id: None
        supervisor.attach(self)

    async def run(self) -> int:
        return 0

    async def send_event(self, event: SupervisorEvent) -> None:
        now = time.time_ns()
        if isinstance(event, JobStateChanged):
            self.marks[event.job_id].setdefault(event.stage or event.phase.value, now)
            if is_terminal(event.phase):
                self.final[event.job_id] = event.phase
                self.on_end(event.job_id)
        elif isinstance(event, Output) and event.stream == "stdout":
            self.stdout[event.job_id] += event.data


class Bench:
    """One WasmBackend supervisor and its connector, for a whole measurement."""

    def __init__(self, artifacts: MemoryArtifacts, max_jobs: int, work_dir: Path) -> None:
        self.backend = WasmBackend(artifacts)
        self.supervisor = BackendSupervisor(self.backend, max_jobs=max_jobs, work_dir=work_dir)
        self.connector = TimingConnector(self.supervisor)
        self._count = 0

    def new_start(self, digest: str) -> StartJob:
        self._count += 1
        spec = WasmSpec(module=digest)
        return StartJob(job_id=f"bench-{self._count}", attempt=1, backend=spec, name="stamp")

    async def timed_run(self, digest: str) -> dict[str, float]:
        """One run alone: ms from the start_job call to each reported stage and to guest
        entry (the guest's own clock reading, from its stdout)."""
        start = self.new_start(digest)
        ended = asyncio.get_running_loop().create_future()
        self.connector.on_end = ended.set_result
        t0 = time.time_ns()
        await self.supervisor.start_job(start)
        await ended
        if self.connector.final[start.job_id] != Phase.SUCCEEDED:
            raise RuntimeError(f"run {start.job_id} ended {self.connector.final[start.job_id]}")
        marks = {k: (v - t0) / 1e6 for k, v in self.connector.marks.pop(start.job_id).items()}
        marks["guest"] = (int(self.connector.stdout.pop(start.job_id)) - t0) / 1e6
        return marks

    async def throughput(self, digest: str, n: int) -> tuple[float, float, int]:
        """Start `n` runs as fast as the supervisor's slots allow, wait for all to end.
        Returns (jobs/s, process CPU ms per job (all threads), how many start_job calls
        were refused for lack of a slot)."""
        slots = asyncio.Semaphore(self.supervisor.max_jobs)
        self.connector.on_end = lambda _job_id: slots.release()
        refused = 0
        cpu0, t0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            await slots.acquire()
            start = self.new_start(digest)
            while True:
                try:
                    await self.supervisor.start_job(start)
                    break
                except JobError as exc:  # a slot is released a moment before it is free
                    if exc.kind != JobErrorKind.MAX_CONCURRENT_JOBS:
                        raise
                    refused += 1
                    await asyncio.sleep(0)
        await self.supervisor.wait_idle()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        failed = sum(p != Phase.SUCCEEDED for p in self.connector.final.values())
        if failed:
            raise RuntimeError(f"{failed} runs did not succeed")
        self.connector.final.clear()
        self.connector.marks.clear()
        self.connector.stdout.clear()
        return n / elapsed, cpu / n * 1e3, refused

    async def close(self) -> None:
        await self.supervisor.wait_idle()
        await self.backend.close()


class BareWasmtime:
    """The floor: wasmtime-py alone, same process, same module, nothing around it. The
    engine has epoch interruption on, like any runner that must be able to stop a guest
    (it makes compiling slower, not starting)."""

    def __init__(self, wasm: bytes) -> None:
        config = wasmtime.Config()
        config.epoch_interruption = True
        self.engine = wasmtime.Engine(config)
        self.linker = wasmtime.Linker(self.engine)
        self.linker.define_wasi()
        self.module = wasmtime.Module(self.engine, wasm)

    def timed_run(self, wasm: bytes | None = None) -> float:
        """ms from the start of the work to guest entry. With `wasm`, compiling it is
        part of the work; without, the precompiled module runs."""
        out = bytearray()

        def write(data: bytes) -> int:
            out.extend(data)
            return len(data)

        t0 = time.time_ns()
        module = self.module if wasm is None else wasmtime.Module(self.engine, wasm)
        store = wasmtime.Store(self.engine)
        store.set_epoch_deadline(1)  # nothing advances this engine's epoch
        wasi = wasmtime.WasiConfig()
        wasi.argv = ["stamp"]
        wasi.stdout_custom = write
        store.set_wasi(wasi)
        start = self.linker.instantiate(store, module).exports(store)["_start"]
        assert isinstance(start, wasmtime.Func)
        try:
            start(store)
        except wasmtime.ExitTrap as exc:
            if exc.code != 0:
                raise
        store.close()
        return (int(out) - t0) / 1e6

    def throughput(self, n: int) -> float:
        """Sequential runs per second on this thread."""
        t0 = time.perf_counter()
        for _ in range(n):
            self.timed_run()
        return n / (time.perf_counter() - t0)


def new_work_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="switchboard-bench-"))
