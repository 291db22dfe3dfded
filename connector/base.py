"""The contract between one Supervisor and whatever coordinates it.

A connector delivers StartJob / StopJob to its supervisor and carries the supervisor's
reports back. The supervisor only ever calls the report methods below; it never knows
whether a switchboard, a terminal (LocalConnector) or a test sits on the other side.
"""

from __future__ import annotations

import abc
import time

from protocol.exceptions import JobErrorKind
from protocol.limits import clip_message
from protocol.messages import (
    JobErrorReport,
    JobExit,
    JobStateChanged,
    Output,
    RunRef,
    Stream,
    SupervisorEvent,
)
from protocol.state import Phase
from supervisor.metrics import BACKEND_ERRORS


class SupervisorConnector(abc.ABC):
    """How a supervisor talks to a coordinator."""

    @abc.abstractmethod
    async def run(self) -> int:
        """The main loop. Returns when the supervisor should shut down, with an exit status
        for the process (0 = asked to stop; the local connector returns the job's exit code).
        """

    @abc.abstractmethod
    async def send_event(self, event: SupervisorEvent) -> None:
        """Deliver one event. The connector assigns `event.seq`. May wait while too much
        is still unacknowledged: that wait is the backpressure on a job's output."""

    # The report methods a supervisor calls; each builds one event.

    async def update_job_state(
        self,
        run: RunRef,
        phase: Phase,
        *,
        stage: str | None = None,
        message: str | None = None,
    ) -> None:
        await self.send_event(
            JobStateChanged(
                seq=0,
                job_id=run.job_id,
                attempt=run.attempt,
                phase=phase,
                stage=stage,
                message=clip_message(message),
                at=time.time(),
            )
        )

    async def report_job_error(self, run: RunRef, kind: JobErrorKind, description: str) -> None:
        BACKEND_ERRORS.labels(JobErrorKind(kind).value).inc()
        await self.send_event(
            JobErrorReport(
                seq=0,
                job_id=run.job_id,
                attempt=run.attempt,
                kind=kind,
                description=clip_message(description) or "",
            )
        )

    async def send_output(self, run: RunRef, stream: Stream, offset: int, data: bytes) -> None:
        await self.send_event(
            Output(
                seq=0,
                job_id=run.job_id,
                attempt=run.attempt,
                stream=stream,
                offset=offset,
                data=data,
            )
        )

    async def report_exit(
        self,
        run: RunRef,
        *,
        exit_code: int | None,
        signal: int | None = None,
        reason: str = "exited",
        message: str | None = None,
    ) -> None:
        await self.send_event(
            JobExit(
                seq=0,
                job_id=run.job_id,
                attempt=run.attempt,
                exit_code=exit_code,
                signal=signal,
                reason=reason,
                message=clip_message(message),
            )
        )
