"""The loop that places queued jobs on connected supervisors.

It wakes on events (a job submitted, a run ended, a supervisor became ready) and on a
slow timer as a safety net; each pass asks the pure scheduler for decisions, records them
in one transaction, then sends the StartJobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from switchboard.scheduler import Candidate, plan
from switchboard.sessions import Hub, start_message
from switchboard.store.base import Store

log = logging.getLogger("switchboard.dispatcher")

#: Queued jobs considered per pass.
QUEUE_WINDOW = 1000
#: Safety-net period between passes when nothing wakes the dispatcher.
IDLE_PERIOD_S = 2.0


class Dispatcher:
    def __init__(self, store: Store, hub: Hub) -> None:
        self.store = store
        self.hub = hub
        self._wake = asyncio.Event()
        hub.on_capacity_change(self.wake)

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        pause = IDLE_PERIOD_S
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), pause)
            self._wake.clear()
            try:
                pause = IDLE_PERIOD_S
                if await self.dispatch_once():
                    self.wake()  # capacity may remain for jobs past this pass's window
                else:
                    # Idle: wake again when the next restart backoff ends, if that is sooner.
                    backoff_end = await self.store.next_backoff_end()
                    if backoff_end is not None:
                        pause = min(pause, max(0.0, backoff_end - time.time()) + 0.001)
            except Exception:  # keep dispatching; the next pass retries
                log.exception("dispatch pass failed")

    async def dispatch_once(self) -> int:
        """One pass; returns how many runs were started."""
        sessions = self.hub.ready_sessions()
        if not sessions:
            return 0
        counts = await self.store.running_counts()
        candidates = [
            Candidate(
                id=s.id,
                backends=s.hello.backends,
                labels=s.hello.labels,
                free=s.hello.max_jobs - counts.get(s.id, 0),
                resources=s.hello.resources,
                running=counts.get(s.id, 0),
            )
            for s in sessions
        ]
        if all(c.free <= 0 for c in candidates):
            return 0
        decisions = plan(await self.store.queued_jobs(QUEUE_WINDOW), candidates)
        if not decisions:
            return 0
        for made in await self.store.assign(decisions):
            start = start_message(made.job_id, made.attempt, made.spec)
            await self.hub.send_start(made.supervisor_id, start)
        return len(decisions)
