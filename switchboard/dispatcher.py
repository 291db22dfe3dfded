"""The loop that places queued jobs on connected supervisors.

It wakes on events (a job submitted, a run ended, a supervisor connected, drained or
resumed, dispatch resumed) and on a slow timer as a safety net; each pass asks the pure
scheduler for decisions, records them in one transaction, then sends the StartJobs.

A pass also notes, for jobs it could not place, whether any registered supervisor could
*ever* run them, so a job whose selector matches nothing says so instead of waiting
silently. That check reruns only when the fleet changes or new jobs arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from switchboard.models import QueuedJob, SupervisorView
from switchboard.scheduler import (
    Candidate,
    FleetMember,
    plan,
    remaining,
    unsatisfiable_reason,
)
from switchboard.sessions import Hub, start_message
from switchboard.store.base import Store

log = logging.getLogger("switchboard.dispatcher")

#: Queued jobs read at a time, and the most pages of them one pass reads.
QUEUE_WINDOW = 1000
MAX_WINDOWS = 20
#: Safety-net period between passes when nothing wakes the dispatcher.
IDLE_PERIOD_S = 5.0


class Dispatcher:
    def __init__(self, store: Store, hub: Hub, *, aging_s: float = 60.0) -> None:
        self.store = store
        self.hub = hub
        self.aging_s = aging_s
        self.paused = False
        #: True while `run` is looping (readiness).
        self.running = False
        self._wake = asyncio.Event()
        #: job id -> the fleet it was last checked against (for `unschedulable`).
        self._checked: dict[str, tuple] = {}
        #: The fleet the last pass saw: when it changes, jobs marked unschedulable are
        #: checked again (they are left out of the queue's pages until then).
        self._last_fleet: tuple | None = None
        self._new_jobs = False
        hub.on_capacity_change(self.wake)

    def wake(self) -> None:
        self._wake.set()

    def jobs_submitted(self) -> None:
        """New jobs are queued: place them, or say why they can never be placed."""
        self._new_jobs = True
        self._wake.set()

    async def set_paused(self, paused: bool) -> None:
        """Pause or resume placing jobs (runs already placed go on); survives restarts."""
        await self.store.set_dispatch_paused(paused)
        self.paused = paused
        self.wake()

    async def run(self) -> None:
        self.paused = await self.store.dispatch_paused()
        self.running = True
        try:
            await self._loop()
        finally:
            self.running = False

    async def _loop(self) -> None:
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
        if self.paused:
            return 0
        fleet = await self.store.list_supervisors()
        ready = {s.id for s in self.hub.ready_sessions()}
        candidates = await self._candidates(fleet, ready)
        fleet_changed = self._last_fleet != self._fleet_key(fleet)
        news = self._new_jobs or fleet_changed
        self._new_jobs = False
        if not any(c.free > 0 for c in candidates) and not news:
            return 0
        waiting: list[QueuedJob] = []
        if fleet_changed:
            # Jobs nobody could run may have found a taker: look at them again.
            waiting += await self.store.queued_jobs(QUEUE_WINDOW * MAX_WINDOWS, marked=True)
        decisions: list[tuple[str, str]] = []
        busy = await self.store.busy_keys() if candidates else set()
        after: tuple[int, int] | None = None
        # Page through the queue while slots remain, so jobs that fit nowhere now never
        # hide the ones behind them, however many there are (up to MAX_WINDOWS pages).
        for _ in range(MAX_WINDOWS):
            jobs = await self.store.queued_jobs(QUEUE_WINDOW, after=after)
            placed = []
            if candidates:
                placed = plan(
                    jobs, candidates, now=time.time(), aging_s=self.aging_s, busy_keys=busy
                )
            decisions += placed
            chosen = {job_id for job_id, _ in placed}
            waiting += [j for j in jobs if j.id not in chosen]
            if len(jobs) < QUEUE_WINDOW:
                break
            candidates = remaining(candidates, jobs, placed)
            if not any(c.free > 0 for c in candidates):
                break
            busy |= {j.concurrency_key for j in jobs if j.id in chosen and j.concurrency_key}
            after = (jobs[-1].priority, jobs[-1].seq)
        await self._note_unschedulable(waiting, fleet)
        if not decisions:
            return 0
        for made in await self.store.assign(decisions):
            start = start_message(made.job_id, made.attempt, made.spec)
            await self.hub.send_start(made.supervisor_id, start)
        return len(decisions)

    async def _candidates(self, fleet: list[SupervisorView], ready: set[str]) -> list[Candidate]:
        """Connected, undrained supervisors with what they have free right now."""
        usable = [s for s in fleet if s.id in ready and not s.drained]
        in_use = await self.store.resources_in_use() if usable else {}
        candidates = []
        for s in usable:
            held = in_use.get(s.id, {})
            candidates.append(
                Candidate(
                    id=s.id,
                    backends=s.backends,
                    labels=s.labels,
                    free=s.max_jobs - s.running,
                    resources={k: n - held.get(k, 0) for k, n in s.resources.items()},
                    running=s.running,
                )
            )
        return candidates

    def _fleet_key(self, fleet: list[SupervisorView]) -> tuple:
        return tuple(
            (s.id, tuple(sorted(s.labels.items())), tuple(s.backends), tuple(s.resources.items()))
            for s in fleet
        )

    async def _note_unschedulable(
        self, waiting: list[QueuedJob], fleet: list[SupervisorView]
    ) -> None:
        """Say on each waiting job whether no registered supervisor could ever run it."""
        key = self._fleet_key(fleet)
        self._last_fleet = key
        members = [
            FleetMember(
                id=s.id,
                backends=s.backends,
                labels=s.labels,
                resources=s.resources,
                max_jobs=s.max_jobs,
            )
            for s in fleet
        ]
        reasons: dict[str, str | None] = {}
        for job in waiting:
            if self._checked.get(job.id) == key:
                continue
            self._checked[job.id] = key
            reason = unsatisfiable_reason(job.spec, members)
            if reason != job.unschedulable:  # written on change only (it is a job change)
                reasons[job.id] = reason
        if len(self._checked) > 2 * QUEUE_WINDOW * MAX_WINDOWS:  # forget jobs that left
            waiting_ids = {j.id for j in waiting}
            self._checked = {k: v for k, v in self._checked.items() if k in waiting_ids}
        if reasons:
            await self.store.set_unschedulable(reasons)
