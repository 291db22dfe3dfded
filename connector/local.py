"""Run one job from a spec file on a local supervisor, with no switchboard.

State changes go to stderr as they happen, the job's stdout and stderr to ours, byte for
byte, and the output files the spec keeps are named there too (the supervisor copied them
to `--outputs-dir`, or only listed them); the process exits with the job's exit code (or a
conventional code when the job did not exit by itself: 124 timed out, 130 canceled, 125
refused or failed to start).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import BinaryIO, TextIO

from protocol.exceptions import JobError
from protocol.messages import (
    JobErrorReport,
    JobExit,
    JobFiles,
    JobStateChanged,
    Output,
    StopJob,
    SupervisorEvent,
    start_job,
)
from protocol.spec import JobSpec
from protocol.state import Phase, is_terminal

from .base import Supervisor, SupervisorConnector

LOCAL_JOB_ID = "local"

_PHASE_EXIT = {Phase.TIMED_OUT: 124, Phase.CANCELED: 130, Phase.REJECTED: 125}


class LocalConnector(SupervisorConnector):
    def __init__(
        self,
        supervisor: Supervisor,
        spec: JobSpec,
        *,
        stdout: BinaryIO | None = None,
        stderr: BinaryIO | None = None,
        status: TextIO | None = None,
    ) -> None:
        self.supervisor = supervisor
        self.spec = spec
        self._stdout = stdout or sys.stdout.buffer
        self._stderr = stderr or sys.stderr.buffer
        self._status = status or sys.stderr
        self._seq = 0
        self._exit: JobExit | None = None
        self._phase: Phase | None = None
        self._done = asyncio.Event()
        supervisor.attach(self)

    async def send_event(self, event: SupervisorEvent) -> None:
        self._seq += 1
        event.seq = self._seq
        match event:
            case Output(stream=stream, data=data):
                out = self._stderr if stream == "stderr" else self._stdout
                out.write(data)
                out.flush()
            case JobStateChanged(phase=phase, stage=stage, message=message):
                detail = "".join(
                    [f" ({stage})" if stage else "", f": {message}" if message else ""]
                )
                self._say(f"{phase.value}{detail}")
                self._phase = phase
                if is_terminal(phase):
                    self._done.set()
            case JobErrorReport(kind=kind, description=description):
                self._say(f"error {kind.value}: {description}")
            case JobFiles(files=files, refused=refused, refused_unlisted=unlisted):
                # No switchboard to upload to: the supervisor copied them (--outputs-dir)
                # or only looked at them; either way they are named here.
                for kept in files:
                    self._say(f"output {kept.path}: {kept.size} bytes, {kept.digest}")
                for not_kept in refused:
                    self._say(f"output {not_kept.path} not kept: {not_kept.reason}")
                if unlisted:
                    self._say(f"{unlisted} more output file(s) not kept")
            case JobExit():
                self._exit = event

    def _say(self, text: str) -> None:
        self._status.write(f"[job] {text}\n")
        self._status.flush()

    async def run(self) -> int:
        await self.supervisor.recover()
        start = start_job(LOCAL_JOB_ID, 1, self.spec)
        loop = asyncio.get_running_loop()
        stop = StopJob(job_id=LOCAL_JOB_ID, attempt=1, reason="canceled", grace_s=5.0)
        loop.add_signal_handler(
            signal.SIGINT, lambda: loop.create_task(self.supervisor.stop_job(stop))
        )
        try:
            try:
                await self.supervisor.start_job(start)
            except JobError as exc:
                self._say(f"refused: {exc}")
                return _PHASE_EXIT[Phase.REJECTED]
            await self._done.wait()
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            await self.supervisor.shutdown(grace_s=5.0)
        return self.exit_status()

    def exit_status(self) -> int:
        """The job's exit code, or a conventional one if it didn't exit by itself."""
        if self._phase in _PHASE_EXIT:
            return _PHASE_EXIT[self._phase]
        if self._exit is not None and self._exit.exit_code is not None:
            return self._exit.exit_code & 0xFF
        return 0 if self._phase == Phase.SUCCEEDED else 1
