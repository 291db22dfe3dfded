"""Job bookkeeping shared by every backend: which runs are held, how many may run at once,
which requests are refused with which error kind, and the order of the reports.

For one run the reports always go: initializing (one per stage) -> running -> [terminating]
-> output flushed -> [error] -> [the kept output files] -> exit status -> terminal phase.
Phase changes are checked against protocol.state, so a backend can't report something the
switchboard would refuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import OrderedDict
from pathlib import Path

from connector.base import Capabilities, Supervisor
from protocol.exceptions import JobError, JobErrorKind
from protocol.messages import (
    CollectLimits,
    DeviceInfo,
    HeldRun,
    Power,
    PowerResult,
    RefusedFile,
    RunRef,
    StartJob,
    StopJob,
    Stream,
)
from protocol.state import InvalidTransition, Phase, check_transition, is_terminal
from supervisor.backends.base import Backend, Outcome, RunContext
from supervisor.console import Consoles, Listener
from supervisor.inputs import InputCache, place_inputs, remove_run_dir
from supervisor.metrics import RUNNING_JOBS, job_error, output_files, run_ended
from supervisor.output import OutputPump
from supervisor.outputs import (
    OUT_DIR,
    Kept,
    OutputSink,
    caps_for,
    keep_outputs,
    make_out_dir,
    rules_for,
)
from supervisor.power import PowerSwitches

log = logging.getLogger("supervisor.jobs")

#: Error kinds that mean "this supervisor can't run this job" rather than "it broke".
_REJECTING_KINDS = frozenset(
    {
        JobErrorKind.MAX_CONCURRENT_JOBS,  # e.g. its device is busy: the job is queued again
        JobErrorKind.IMAGE_NOT_FOUND,
        JobErrorKind.IMAGE_INVALID,
        JobErrorKind.IMAGE_NOT_COMPATIBLE,
        JobErrorKind.INPUT_INVALID,
    }
)

#: How many ended runs are remembered, so a late repeat of their StartJob is refused
#: instead of running the program a second time.
REMEMBER_ENDED = 10_000


class _Run:
    """One held run."""

    def __init__(self, ref: RunRef, start: StartJob) -> None:
        self.ref = ref
        self.start = start
        self.phase = Phase.ASSIGNED
        self.ctx: RunContext | None = None
        self.task: asyncio.Task[None] | None = None
        #: Set once the program has ended: a stop then comes too late (the run is only
        #: keeping its files and reporting its end, and ends as the program did).
        self.program_ended = False


class BackendSupervisor(Supervisor):
    """A Supervisor that runs every job on one backend."""

    def __init__(
        self,
        backend: Backend,
        *,
        max_jobs: int = 1,
        labels: dict[str, str] | None = None,
        resources: dict[str, int] | None = None,
        devices: list[DeviceInfo] | None = None,
        work_dir: Path | None = None,
        inputs: InputCache | None = None,
        inputs_max_bytes: int = 4096 * 1024 * 1024,
        outputs: OutputSink | None = None,
        outputs_limits: CollectLimits | None = None,
        power: PowerSwitches | None = None,
        consoles: Consoles | None = None,
    ) -> None:
        self.backend = backend
        #: The host's serial consoles (None: it has none).
        self.consoles = consoles
        #: The host's power switches (None: it has none, every power request is refused).
        self.power_switches = power
        #: Where runs' inputs come from (None: this supervisor refuses runs with inputs).
        self.inputs = inputs
        self.inputs_max_bytes = inputs_max_bytes
        #: Where runs' kept output files go (None: every one is refused, with the reason).
        self.outputs = outputs
        #: This supervisor's own caps on what a run keeps (None: the StartJob's only).
        self.outputs_limits = outputs_limits
        self.max_jobs = max_jobs
        self.labels = dict(labels or {})
        self.resources = dict(resources or {})
        self.devices = list(devices or [])
        self.work_dir = work_dir or Path.cwd() / "supervisor-work"
        self._runs: dict[RunRef, _Run] = {}
        self._ended: OrderedDict[RunRef, Phase] = OrderedDict()
        self._idle = asyncio.Event()
        self._idle.set()

    # --- Supervisor contract ---------------------------------------------------------

    def capabilities(self) -> Capabilities:
        return Capabilities(
            backends=[self.backend.kind],
            labels=self.labels,
            resources=self.resources,
            max_jobs=self.max_jobs,
            devices=self.devices,
        )

    async def power(self, request: Power) -> PowerResult:
        if self.power_switches is None:
            return await super().power(request)
        return await self.power_switches.run(request)

    def attach_console(self, device_id: str, key: object, listener: Listener) -> str | None:
        if self.consoles is None:
            return super().attach_console(device_id, key, listener)
        return self.consoles.attach(device_id, key, listener)

    def detach_console(self, device_id: str, key: object) -> None:
        if self.consoles is not None:
            self.consoles.detach(device_id, key)

    def write_console(self, device_id: str, data: bytes) -> int:
        return self.consoles.write(device_id, data) if self.consoles is not None else 0

    async def _send_console(self, run: RunRef, stream: Stream, offset: int, data: bytes) -> None:
        assert self.connector is not None
        await self.connector.send_output(run, stream, offset, data)

    async def _delivered(self) -> None:
        assert self.connector is not None
        await self.connector.delivered()

    def held_runs(self) -> list[HeldRun]:
        return [HeldRun(r.ref.job_id, r.ref.attempt, r.phase) for r in self._runs.values()]

    async def recover(self) -> None:
        await self.backend.prepare()
        if self.consoles is not None:
            self.consoles.open()
        adopted: dict[RunRef, StartJob] = {}
        for start in await self.backend.recover():
            ref = RunRef(start.job_id, start.attempt)
            if ref in self._runs:
                continue
            run = _Run(ref, start)
            run.phase = Phase.RUNNING  # it was running when this process went away
            run.ctx = self._new_context(run)
            run.ctx.program_started = True
            self._runs[ref] = run
            RUNNING_JOBS.set(len(self._runs))
            self._idle.clear()
            adopted[ref] = start
            run.task = asyncio.get_running_loop().create_task(
                self._drive(run, resume=True), name=f"resumed run {ref}"
            )
            log.info("re-adopted run %s#%d", ref.job_id, ref.attempt)
        if self.consoles is not None:
            # What the consoles printed before the restart is on disk: a re-adopted run's
            # stream goes on, an ended run's is sent once connected.
            self.consoles.recover(set(adopted), self._send_console, self._delivered)
            for ref, start in adopted.items():
                self.consoles.claim(ref, start.devices, self._send_console)

    async def start_job(self, start: StartJob) -> None:
        ref = RunRef(start.job_id, start.attempt)
        if ref in self._runs:
            return  # a repeat: acknowledged by doing nothing, the run goes on
        try:
            self._admit(ref, start)
        except JobError as exc:
            job_error(exc.kind)  # the connector reports the refusal; it is counted here
            raise
        run = _Run(ref, start)
        run.ctx = self._new_context(run)
        self._runs[ref] = run
        RUNNING_JOBS.set(len(self._runs))
        self._idle.clear()
        if self.consoles is not None:
            # From now on its devices' consoles are the run's streams `console:<device>`.
            self.consoles.claim(ref, start.devices, self._send_console)
        run.task = asyncio.get_running_loop().create_task(self._drive(run), name=f"run {ref}")

    def _admit(self, ref: RunRef, start: StartJob) -> None:
        """Raise JobError if this run may not start here now; else reserve what it uses."""
        if ref in self._ended:
            raise JobError(
                JobErrorKind.JOB_ALREADY_EXISTS,
                f"run {ref.job_id}#{ref.attempt} already ended here ({self._ended[ref].value})",
            )
        if any(r.ref.job_id == ref.job_id for r in self._runs.values()):
            raise JobError(
                JobErrorKind.ALREADY_RUNNING, f"another attempt of job {ref.job_id} is running"
            )
        if start.backend.kind != self.backend.kind:
            raise JobError(
                JobErrorKind.IMAGE_NOT_COMPATIBLE,
                f"this supervisor runs {self.backend.kind} jobs, not {start.backend.kind}",
            )
        if len(self._runs) >= self.max_jobs:
            raise JobError(
                JobErrorKind.MAX_CONCURRENT_JOBS, f"already running {self.max_jobs} job(s)"
            )
        self.backend.admit(start)

    async def stop_job(self, stop: StopJob) -> None:
        run = self._runs.get(RunRef(stop.job_id, stop.attempt))
        if run is None or run.ctx is None or run.ctx.stop_reason is not None:
            return  # unknown, or a repeat: harmless
        if run.program_ended:
            return  # too late: the program has ended, its files are being kept
        run.ctx.request_stop(stop.reason, stop.grace_s)
        if run.phase in (Phase.INITIALIZING, Phase.RUNNING):
            await self._transition(run, Phase.TERMINATING, message=f"stop: {stop.reason}")

    async def shutdown(self, grace_s: float | None = 10.0) -> None:
        for run in list(self._runs.values()):
            if run.ctx is not None:
                run.ctx.request_stop("shutdown", grace_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), (grace_s or 10.0) + 5.0)
        for run in list(self._runs.values()):
            if run.task is not None:
                run.task.cancel()
        if self.consoles is not None:
            await self.consoles.close()
        await self.backend.close()

    async def wait_idle(self) -> None:
        """Wait until no run is held."""
        await self._idle.wait()

    # --- one run ---------------------------------------------------------------------

    def _new_context(self, run: _Run) -> RunContext:
        connector = self.connector
        assert connector is not None, "attach a connector before starting jobs"

        async def send_chunk(stream: Stream, offset: int, data: bytes) -> None:
            await connector.send_output(run.ref, stream, offset, data)

        stop_flag = threading.Event()
        ctx = RunContext(
            run.ref,
            run.start,
            self.work_dir / "runs" / f"{run.ref.job_id}.{run.ref.attempt}",
            OutputPump(send_chunk, stop=stop_flag),
            stop_flag=stop_flag,
            report_stage=lambda stage, msg: self._transition(
                run, Phase.INITIALIZING, stage=stage, message=msg
            ),
            report_running=lambda: self._transition(run, Phase.RUNNING),
        )
        ctx.out_max_bytes = caps_for(run.start.collect_limits, self.outputs_limits).max_total_bytes
        return ctx

    async def _drive(self, run: _Run, resume: bool = False) -> None:
        connector = self.connector
        ctx = run.ctx
        assert connector is not None and ctx is not None
        ref = run.ref
        output = ctx.output
        work_dir = ctx.work_dir
        timer = None
        if run.start.timeout_s is not None:
            timer = asyncio.get_running_loop().call_later(run.start.timeout_s, self._time_out, run)
        outcome: Outcome
        error: JobError | None = None
        try:
            if resume:
                outcome = await self.backend.resume(ctx)
            else:
                await self._transition(run, Phase.INITIALIZING, stage="accepted")
                if run.start.inputs and not await self._place_inputs(ctx):
                    outcome = Outcome(exit_code=None, reason=ctx.stopped_reason)
                else:
                    if run.start.collect:
                        await asyncio.to_thread(make_out_dir, work_dir)
                    outcome = await self.backend.run(ctx)
        except JobError as exc:
            error = exc
            outcome = Outcome(exit_code=None, reason="error", message=str(exc))
        except asyncio.CancelledError:
            output.abort()
            raise
        except Exception as exc:  # a backend bug must not take the supervisor down
            log.exception("backend failed on run %s", ref)
            error = JobError(JobErrorKind.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
            outcome = Outcome(exit_code=None, reason="error", message=str(error))
        finally:
            if timer is not None:
                timer.cancel()
            run.program_ended = True
        try:
            await output.close()
            if self.consoles is not None:
                # Its consoles' last bytes go before its end is reported.
                await self.consoles.release(ref, self._delivered)
            if error is not None:
                job_error(error.kind)
                await connector.report_job_error(ref, error.kind, error.description)
            if run.start.collect and ctx.program_started:
                try:
                    kept = await self._keep_outputs(run, outcome)
                except Exception as exc:  # a bug here must not keep the run from ending
                    log.exception("collecting the outputs of run %s failed", ref)
                    output_files(kept=0, refused=1)
                    why = f"the supervisor failed collecting outputs: {type(exc).__name__}"
                    kept = Kept([], [RefusedFile(".", why)], 0)
                await connector.report_files(ref, kept.files, kept.refused, kept.refused_unlisted)
            # The program is done: its scratch space goes before its end is reported.
            if work_dir.exists():  # one stat here; the removal goes to a thread
                await asyncio.to_thread(remove_run_dir, work_dir)
            await connector.report_exit(
                ref,
                exit_code=outcome.exit_code,
                signal=outcome.signal,
                reason=outcome.reason,
                message=outcome.message,
            )
            await self._transition(run, _final_phase(ctx, outcome, error), message=outcome.message)
        finally:
            self._forget(run)

    async def _place_inputs(self, ctx: RunContext) -> bool:
        """Place the run's inputs in its input directory (stage `fetching`); False if a
        stop came first. Raises JobError(input_invalid) if one can't be placed."""
        inputs = ctx.start.inputs
        if self.inputs is None:
            raise JobError(
                JobErrorKind.INPUT_INVALID, "this supervisor has no artifact source for inputs"
            )
        await ctx.stage("fetching", f"{len(inputs)} input(s)")
        try:
            placed = await ctx.unless_stopped(
                place_inputs(
                    inputs, ctx.work_dir, self.inputs, self.inputs_max_bytes, ctx.stop_flag
                )
            )
        except JobError as exc:
            log.warning("run %s#%d: %s", ctx.run.job_id, ctx.run.attempt, exc.description)
            raise
        return placed is not None

    async def _keep_outputs(self, run: _Run, outcome: Outcome) -> Kept:
        """Collect and keep the run's output files that its rules name for this ending.
        The run stays in its phase meanwhile (running or terminating)."""
        assert run.ctx is not None
        root = run.ctx.work_dir / OUT_DIR
        patterns = rules_for(run.start.collect, outcome.reason, outcome.exit_code)
        if self.outputs is None:
            if not patterns:
                return Kept([], [], 0)
            why = "this supervisor has nowhere to keep output files"
            log.warning("run %s#%d: %s", run.ref.job_id, run.ref.attempt, why)
            output_files(kept=0, refused=len(patterns))
            return Kept([], [RefusedFile(p, why) for p in patterns], 0)
        caps = caps_for(run.start.collect_limits, self.outputs_limits)
        name = f"{run.ref.job_id}#{run.ref.attempt}"
        return await keep_outputs(root, patterns, caps, self.outputs, name)

    def _time_out(self, run: _Run) -> None:
        if run.ctx is not None and run.ctx.stop_reason is None:
            run.ctx.request_stop("timeout", 0.0)
            asyncio.get_running_loop().create_task(
                self._transition(run, Phase.TERMINATING, message="run timeout")
            )

    async def _transition(
        self,
        run: _Run,
        phase: Phase,
        *,
        stage: str | None = None,
        message: str | None = None,
    ) -> None:
        if is_terminal(run.phase):
            return  # a late report (e.g. a timeout racing the program's exit)
        try:
            check_transition(run.phase, phase)
        except InvalidTransition:
            if phase == run.phase or (phase, run.phase) == (Phase.RUNNING, Phase.TERMINATING):
                return  # a repeat, or a start report overtaken by a stop: not news
            raise
        run.phase = phase
        assert self.connector is not None
        await self.connector.update_job_state(run.ref, phase, stage=stage, message=message)

    def _forget(self, run: _Run) -> None:
        self._runs.pop(run.ref, None)
        RUNNING_JOBS.set(len(self._runs))
        run_ended(run.phase)
        self._ended[run.ref] = run.phase
        while len(self._ended) > REMEMBER_ENDED:
            self._ended.popitem(last=False)
        if not self._runs:
            self._idle.set()


def _final_phase(ctx: RunContext, outcome: Outcome, error: JobError | None) -> Phase:
    """The terminal phase of a run, from why it was stopped and how the program ended."""
    if ctx.stop_reason == "timeout":
        return Phase.TIMED_OUT
    if ctx.stop_reason is not None:
        return Phase.CANCELED
    if error is not None:
        return Phase.REJECTED if error.kind in _REJECTING_KINDS else Phase.FAILED
    if outcome.reason == "exited" and outcome.exit_code == 0:
        return Phase.SUCCEEDED
    return Phase.FAILED
