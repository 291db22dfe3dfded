"""Reservations of the lab's devices (docs/lab.md): one loop that, every half second,
expires the waiting reservations their client stopped refreshing and the leases that
ended, releases those whose token was revoked, and grants the waiting ones that may have
all their devices now (scheduler.grant_reservations: all or none). One pass handles at
most `limit` of each kind (the next follows at once when it was cut short), so however
many reservations there are, no pass grows without bound and no task is kept per
reservation."""

from __future__ import annotations

import asyncio
import logging

from switchboard import metrics
from switchboard.dispatcher import Dispatcher
from switchboard.ids import new_job_id
from switchboard.store.base import Store
from switchboard.store.fencing import Fenced

log = logging.getLogger("switchboard.reservations")


def new_reservation_id() -> str:
    """`r-` and a job-style id (sorts by when it was made)."""
    return f"r-{new_job_id()}"


class ReservationSweep:
    def __init__(
        self, store: Store, dispatcher: Dispatcher, *, period_s: float = 0.5, limit: int = 500
    ) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.period_s = period_s
        self.limit = limit

    async def run(self) -> None:
        more = False
        while True:
            if not more:
                await asyncio.sleep(self.period_s)
            try:
                more = await self.once()
            except Fenced:  # another replica leads now: this work stops (store.fencing)
                return
            except Exception:  # keep sweeping; the next pass retries
                more = False
                log.exception("a reservation pass failed")

    async def once(self) -> bool:
        """One pass; True if a limit cut it short."""
        swept = await self.store.sweep_reservations(self.limit)
        for ended in swept.ended:
            log.info("reservation %s %s: %s", ended.id, ended.state, ended.reason)
        for reservation_id, waited in swept.granted:
            metrics.RESERVATION_WAIT_SECONDS.observe(waited)
            log.info("reservation %s held, after waiting %.1f s", reservation_id, waited)
        if swept.ended or swept.granted:
            # Devices freed may take waiting jobs; devices held may take the jobs naming them.
            self.dispatcher.wake()
        return swept.more
