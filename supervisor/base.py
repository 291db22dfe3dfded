"""The Supervisor contract: what one host can do for a coordinator."""

from __future__ import annotations

import abc
import typing

import msgspec

from protocol.messages import HeldRun, StartJob, StopJob

if typing.TYPE_CHECKING:
    from connector.base import SupervisorConnector


class Capabilities(msgspec.Struct, frozen=True):
    """What a supervisor advertises in its Hello."""

    backends: list[str]
    labels: dict[str, str] = {}
    resources: dict[str, int] = {}
    max_jobs: int = 1


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
