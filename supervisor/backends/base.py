"""What a backend implements, and what the supervisor hands it for each run.

A backend knows how to run one kind of job (Wasm, Docker, noop). It never sees a
connector: it reports stages, output and the outcome to the supervisor through the
RunContext, and the supervisor's bookkeeping (supervisor.jobs) turns those into events.
"""

from __future__ import annotations

import abc
import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from protocol.exceptions import JobError, JobErrorKind
from protocol.messages import CollectLimits, RunRef, StartJob, Stream
from supervisor.output import OutputPump

T = TypeVar("T")


class Outcome(msgspec.Struct, frozen=True):
    """How the program ended. `reason` as in protocol.messages.JobExit."""

    exit_code: int | None
    signal: int | None = None
    reason: str = "exited"
    message: str | None = None


class RunContext:
    """One run as a backend sees it."""

    def __init__(
        self,
        run: RunRef,
        start: StartJob,
        work_dir: Path,
        output: OutputPump,
        report_stage: Callable[[str, str | None], Awaitable[None]],
        report_running: Callable[[], Awaitable[None]],
        stop_flag: threading.Event | None = None,
    ) -> None:
        self.run = run
        self.start = start
        self.work_dir = work_dir
        self.output = output
        self._report_stage = report_stage
        self._report_running = report_running
        #: Set (on the loop) when the run must stop; `stop_reason` and `grace_s` say why
        #: and how long the program gets before it is forced.
        self.stop_requested = asyncio.Event()
        #: The same signal for code running in a worker thread.
        self.stop_flag = stop_flag or threading.Event()
        self.stop_reason: str | None = None
        #: None: the backend's own default (e.g. the spec's stop grace).
        self.grace_s: float | None = None
        #: Set once the program has started (`running` reported, or a re-adopted run):
        #: only then are its output files collected.
        self.program_started = False
        #: The most the run's output directory may hold (its total output cap, the
        #: supervisor's own included: supervisor.jobs sets it).
        self.out_max_bytes = (start.collect_limits or CollectLimits()).max_total_bytes

    @property
    def env(self) -> dict[str, str]:
        """The job's parameters as environment variables (secret ones included: the
        program needs them; never log this mapping)."""
        return {name: p.value for name, p in self.start.parameters.items()}

    async def stage(self, stage: str, message: str | None = None) -> None:
        """Report an initializing stage (fetching, compiling, creating, starting...)."""
        await self._report_stage(stage, message)

    async def running(self) -> None:
        """Report that the program has started."""
        self.program_started = True
        await self._report_running()

    def write(self, stream: Stream, data: bytes) -> None:
        """Program output; safe from worker threads (may block them: backpressure)."""
        self.output.write(stream, data)

    async def unless_stopped(self, work: Coroutine[Any, Any, T]) -> T | None:
        """Await `work` unless a stop comes first; then cancel it and return None. (Work
        running in a worker thread finishes anyway; its result is dropped.)"""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self.stop_requested.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not task.done():
                task.cancel()
        return task.result() if task.done() else None

    @property
    def stopped_reason(self) -> str:
        """The exit reason of a run ended by a stop (docs/protocol.md §5.1 `exit`): a
        stop_job's `unwanted` or `shutdown` is no exit reason, the program was canceled."""
        return "timeout" if self.stop_reason == "timeout" else "canceled"

    def request_stop(self, reason: str, grace_s: float | None) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self.grace_s = grace_s
        self.stop_requested.set()
        self.stop_flag.set()


class Backend(abc.ABC):
    """Runs jobs of one backend kind."""

    #: The `kind` of backend spec this backend runs ("wasm", "docker", "noop").
    kind: str

    async def prepare(self) -> None:
        """Check the backend works (engine reachable, ...) before the supervisor connects."""

    def resource_counts(self) -> dict[str, int]:
        """Named resources this backend offers (e.g. devices per class), for the Hello."""
        return {}

    def admit(self, start: StartJob) -> None:
        """Refuse at once (raise JobError) what can't run here or can't run now, and reserve
        what the run will use (devices). Synchronous and cheap: called by the supervisor
        before it holds the run; run() and resume() release what was reserved."""

    @abc.abstractmethod
    async def run(self, ctx: RunContext) -> Outcome:
        """Run the program to its end and say how it ended.

        Must honor `ctx.stop_requested` promptly (the supervisor also uses it for the run
        timeout). Raises protocol.JobError for problems with the job itself (image not
        found or invalid); any other exception is reported as an internal error.
        """

    async def recover(self) -> list[StartJob]:
        """Runs that survived a restart of this process (e.g. containers still there), each
        as the StartJob it came from. The supervisor holds them again and calls resume()."""
        return []

    async def resume(self, ctx: RunContext) -> Outcome:
        """Carry a recovered run to its end, like run(): its output is sent again from the
        start of each stream (the switchboard keeps only what it lacks), and a run that
        ended while the supervisor was down is reported with its real outcome."""
        raise JobError(JobErrorKind.CANNOT_RESUME, f"the {self.kind} backend can't resume runs")

    async def close(self) -> None:
        """Release what the backend holds (threads, engine clients)."""
