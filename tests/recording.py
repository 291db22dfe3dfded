"""A SupervisorConnector that keeps every event in a list (for driving a supervisor in
tests without a switchboard). It is a complete implementation of the contract."""

from __future__ import annotations

import asyncio

from connector.base import Supervisor, SupervisorConnector
from protocol.messages import JobStateChanged, Output, SupervisorEvent
from protocol.state import is_terminal


class RecordingConnector(SupervisorConnector):
    def __init__(self, supervisor: Supervisor) -> None:
        self.events: list[SupervisorEvent] = []
        self._seq = 0
        self._changed = asyncio.Event()
        supervisor.attach(self)

    async def run(self) -> int:
        return 0

    async def send_event(self, event: SupervisorEvent) -> None:
        self._seq += 1
        event.seq = self._seq
        self.events.append(event)
        self._changed.set()

    def phases(self, job_id: str, attempt: int = 1) -> list[str]:
        return [
            e.phase.value
            for e in self.events
            if isinstance(e, JobStateChanged) and (e.job_id, e.attempt) == (job_id, attempt)
        ]

    def output(self, job_id: str, stream: str = "stdout", attempt: int = 1) -> bytes:
        chunks = [
            e
            for e in self.events
            if isinstance(e, Output)
            and (e.job_id, e.attempt, e.stream) == (job_id, attempt, stream)
        ]
        data = b""
        for chunk in chunks:
            assert chunk.offset == len(data), "output chunks must be contiguous"
            data += chunk.data
        return data

    async def wait_ended(self, job_id: str, attempt: int = 1, limit_s: float = 30.0) -> str:
        async def ended() -> str:
            while True:
                phases = self.phases(job_id, attempt)
                if phases and is_terminal(phases[-1]):
                    return phases[-1]
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(ended(), limit_s)

    async def wait_output(
        self, job_id: str, needle: bytes, stream: str = "stdout", limit_s: float = 30.0
    ) -> None:
        """Wait until the run's output on `stream` contains `needle`."""
        async with asyncio.timeout(limit_s):
            while needle not in self.output(job_id, stream):
                self._changed.clear()
                await self._changed.wait()
