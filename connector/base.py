"""The two contracts of a supervisor process: `Supervisor` (what one host can do for a
coordinator) and `SupervisorConnector` (how it talks to that coordinator).

A connector delivers StartJob / StopJob to its supervisor and carries the supervisor's
reports back. The supervisor only ever calls the report methods below; it never knows
whether a switchboard, a terminal (LocalConnector) or a test sits on the other side.
Both live here, next to each other, so that neither package has to import the other's
contract: `supervisor` implements Supervisor, `connector` implements SupervisorConnector.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable

import msgspec

from protocol.exceptions import JobErrorKind
from protocol.limits import MAX_FILES_PER_EVENT, clip_message
from protocol.messages import (
    DeviceInfo,
    HeldRun,
    JobErrorReport,
    JobExit,
    JobFiles,
    JobStateChanged,
    Output,
    OutputFile,
    Power,
    PowerResult,
    RefusedFile,
    RunRef,
    StartJob,
    StopJob,
    Stream,
    SupervisorEvent,
)
from protocol.state import Phase


class Capabilities(msgspec.Struct, frozen=True):
    """What a supervisor advertises in its Hello."""

    backends: list[str]
    labels: dict[str, str] = {}
    resources: dict[str, int] = {}
    max_jobs: int = 1
    #: The host's devices (protocol 1.4): its inventory.
    devices: list[DeviceInfo] = []


class Supervisor(abc.ABC):
    """A host that runs jobs.

    `start_job` and `stop_job` return quickly: they either refuse at once by raising
    protocol.JobError, or accept and report every later step through the connector.
    """

    connector: SupervisorConnector | None = None

    def attach(self, connector: SupervisorConnector) -> None:
        """Called by the connector that will deliver this supervisor's requests."""
        self.connector = connector

    @abc.abstractmethod
    async def start_job(self, start: StartJob) -> None:
        """Start a run. Repeating it for a run already held is acknowledged, not run again.
        Raises JobError to refuse."""

    @abc.abstractmethod
    async def stop_job(self, stop: StopJob) -> None:
        """Stop a run (idempotent; a stop for an unknown run is harmless)."""

    @abc.abstractmethod
    def held_runs(self) -> list[HeldRun]:
        """The runs held now and the last phase reported for each (for reconciliation)."""

    @abc.abstractmethod
    async def recover(self) -> None:
        """Re-adopt work that survived a restart of this process (before connecting)."""

    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """Backends, labels, resources and the concurrency limit."""

    @abc.abstractmethod
    async def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop every run (each gets `grace_s`) and release resources."""

    def attach_console(
        self, device_id: str, key: object, listener: Callable[[int, bytes], None]
    ) -> str | None:
        """(1.6) Call `listener(offset, data)` with what the device's serial console prints
        from now on, until detach_console(device_id, key); returns why not (None: done)."""
        return f"device {device_id} has no console on this host"

    def detach_console(self, device_id: str, key: object) -> None:
        """(1.6) Stop calling the listener attached under `key`."""

    def write_console(self, device_id: str, data: bytes) -> int:
        """(1.6) Write to the device's console what it takes now (best effort): how many
        bytes it took."""
        return 0

    async def power(self, request: Power) -> PowerResult:
        """(1.5) Run a device's power command and say how it went; a supervisor with no
        power switches refuses every one."""
        return PowerResult(
            request_id=request.request_id,
            reason=f"device {request.device_id} has no power commands on this host",
        )


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

    async def delivered(self) -> None:
        """Wait until every event reported so far is acknowledged (a connector that
        keeps no backlog: at once)."""

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

    async def report_files(
        self,
        run: RunRef,
        files: list[OutputFile],
        refused: list[RefusedFile],
        refused_unlisted: int = 0,
    ) -> None:
        """The run's kept and refused output files, in as many `files` events as it takes
        (at most MAX_FILES_PER_EVENT of each per event; at least one)."""
        step = MAX_FILES_PER_EVENT
        starts = range(0, max(len(files), len(refused), 1), step)
        for start in starts:
            await self.send_event(
                JobFiles(
                    seq=0,
                    job_id=run.job_id,
                    attempt=run.attempt,
                    files=files[start : start + step],
                    refused=refused[start : start + step],
                    refused_unlisted=refused_unlisted if start == starts[-1] else 0,
                )
            )
