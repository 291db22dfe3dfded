"""Singleton work under the leader lease: run it only while this replica leads.

Several switchboard replicas may serve one PostgreSQL database (docs/deployment.md,
"Several replicas"). Work that must run once for the whole lab (the clock's timeouts and
lost hosts, retention, the lab's sweeps, reaping dead replicas' sessions) runs on the
replica holding the lease (switchboard.lease), in tasks started when it takes the lease
and cancelled when it stops holding it. Those tasks run with the lease's term in their
context (store.fencing), so each of their writes is refused once the term has ended, even
if the task has not been cancelled yet (a replica that was paused and wakes up).

Every few seconds this replica claims the lease, which also says it is alive and which
supervisor sessions the store still gives it: a connection it no longer owns is closed.
On a store one process serves (SQLite) the lease is held for good from the start: the
tasks start at once and nothing is claimed.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from switchboard import lease, metrics
from switchboard.store.base import Store
from switchboard.store.fencing import LEADER_TERM

log = logging.getLogger("switchboard.leader")

SingletonWork = Callable[[], Coroutine[Any, Any, None]]
#: Given the sessions the store says this replica owns (supervisor id -> session), as
#: read from the monotonic time given on.
OwnedSessions = Callable[[dict[str, int], float], None]


class Leadership:
    def __init__(
        self,
        store: Store,
        work: dict[str, SingletonWork],
        *,
        ttl_s: float = lease.LEASE_TTL_S,
        claim_every_s: float = lease.CLAIM_EVERY_S,
        on_owned: OwnedSessions = lambda owned, as_of: None,
    ) -> None:
        self.store = store
        self.work = work
        self.ttl_s = ttl_s
        self.claim_every_s = claim_every_s
        self.on_owned = on_owned
        #: The term held (None: not leading; 0: a store one process serves).
        self.term: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._acting_until = 0.0
        self._claim_failing = False

    @property
    def leading(self) -> bool:
        return self.term is not None

    async def run(self) -> None:
        """Claim the lease every few seconds for as long as the switchboard serves; run
        the singleton work while it is held. Cancelling this stops the work."""
        try:
            if not self.store.shared:
                self._gain(0)
                await asyncio.Event().wait()  # held for good
            while True:
                await self._claim()
                await asyncio.sleep(self._next_claim_in())
        finally:
            self._stop_work()

    async def _claim(self) -> None:
        started = time.monotonic()
        try:
            claim, owned = await asyncio.wait_for(
                self.store.claim_lease(self.ttl_s), timeout=max(self.claim_every_s, 1.0)
            )
        except Exception as exc:  # the database is unreachable, slow: try again soon
            if not self._claim_failing:
                log.warning("claiming the leader lease failed: %s", exc or type(exc).__name__)
            self._claim_failing = True
            claim, owned = None, None
        else:
            self._claim_failing = False
        if owned is not None:
            self.on_owned(owned, started)
        if claim is not None:
            if not claim.hold:
                if self.leading:
                    self._lose(f"replica term {claim.term} leads now")
            elif claim.taken or claim.term != self.term:
                if self.leading:
                    self._lose("its lease lapsed before it was renewed")
                self._gain(claim.term)
            if claim.hold:
                self._acting_until = lease.acting_until(started, self.ttl_s)
        if self.leading and time.monotonic() >= self._acting_until:
            self._lose("the lease could not be renewed in time")

    def _next_claim_in(self) -> float:
        if not self.leading:
            return self.claim_every_s
        return max(0.0, min(self.claim_every_s, self._acting_until - time.monotonic()))

    def _gain(self, term: int) -> None:
        self.term = term
        metrics.LEADER.set(1)
        if self.store.shared:
            metrics.LEASE_CHANGES.labels("gained").inc()
            log.warning("this switchboard leads (lease term %d): it runs the singleton work", term)
        context = contextvars.copy_context()
        context.run(LEADER_TERM.set, term if self.store.shared else None)
        self._tasks = [
            asyncio.create_task(start(), name=name, context=context)
            for name, start in self.work.items()
        ]

    def _lose(self, why: str) -> None:
        log.warning("this switchboard no longer leads (term %s): %s", self.term, why)
        metrics.LEADER.set(0)
        metrics.LEASE_CHANGES.labels("lost").inc()
        self.term = None
        self._stop_work()

    def _stop_work(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
