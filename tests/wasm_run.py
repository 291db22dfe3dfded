"""A run of the wasm backend driven by hand: a real RunContext and OutputPump whose stages,
running report and output chunks are recorded."""

from __future__ import annotations

import asyncio
from pathlib import Path

from protocol.limits import MAX_OUTPUT_CHUNK
from protocol.messages import RunRef, StartJob, Stream
from protocol.spec import Parameter
from protocol.spec import WasmBackend as WasmSpec
from supervisor.backends.base import Outcome, RunContext
from supervisor.backends.wasm import WasmBackend
from supervisor.output import OutputPump


class Run:
    """A RunContext whose stages, running report and output chunks are recorded."""

    def __init__(
        self,
        spec: WasmSpec,
        work_dir: Path,
        *,
        name: str = "job",
        params: dict[str, str] | None = None,
    ) -> None:
        self.stages: list[str] = []
        self.running = asyncio.Event()
        self.chunks: list[tuple[Stream, int, bytes]] = []
        self._more_output = asyncio.Event()
        self.output = OutputPump(self._send)
        start = StartJob(
            job_id="job-1",
            attempt=1,
            backend=spec,
            name=name,
            parameters={k: Parameter(value=v, secret=True) for k, v in (params or {}).items()},
        )
        self.ctx = RunContext(
            RunRef("job-1", 1), start, work_dir, self.output, self._stage, self._running
        )

    async def _send(self, stream: Stream, offset: int, data: bytes) -> None:
        self.chunks.append((stream, offset, data))
        self._more_output.set()

    async def _stage(self, stage: str, message: str | None) -> None:
        self.stages.append(stage)

    async def _running(self) -> None:
        self.running.set()

    def data(self, stream: Stream) -> bytes:
        """The stream's bytes, checking that chunks are in order and contiguous."""
        out = b""
        for s, offset, chunk in self.chunks:
            if s == stream:
                assert offset == len(out), "chunks must be contiguous"
                assert 0 < len(chunk) <= MAX_OUTPUT_CHUNK
                out += chunk
        return out

    async def wait_for_output(self, needle: bytes) -> None:
        async with asyncio.timeout(10):
            while needle not in self.data("stdout"):
                self._more_output.clear()
                await self._more_output.wait()


async def finish(backend: WasmBackend, run: Run) -> Outcome:
    outcome = await asyncio.wait_for(backend.run(run.ctx), 20)
    await run.output.close()
    return outcome
