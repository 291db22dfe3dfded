"""Commands between switchboard replicas sharing one database.

A StopJob (a cancel, a timeout) may be decided by any replica, but only the replica
holding the supervisor's socket can send it. When the socket is not here, the command is
left in the database as a row (Store.send_commands); the replica holding the socket takes
the rows for its supervisors and sends them. It looks when a NOTIFY hint says some wait
(the hint names the supervisor, never the command; many hints wake one look), and on a
sweep every `sweep_s` whether hints come or not: they may be lost with the listening
connection, or off (`serve --no-notify`, behind a pooler in transaction mode, where LISTEN
does not work). The same channel carries a hint that jobs were queued elsewhere, which
wakes this replica's dispatcher (it places jobs on the supervisors whose sockets it holds);
without hints, each sweep wakes it instead.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable
from typing import Any

from protocol.messages import StopJob
from switchboard import metrics
from switchboard.store.base import Store
from switchboard.store.fencing import CHANNEL, JOBS_QUEUED

log = logging.getLogger("switchboard.relay")


class Sockets:
    """What the relay needs of the hub: which supervisors' sockets are here, and sending
    a StopJob on one of them."""

    def __init__(self, connected: Callable[[], list[str]], stop: Callable[[str, StopJob], bool]):
        self.connected = connected
        self.stop = stop


class CommandRelay:
    def __init__(
        self,
        store: Store,
        sockets: Sockets,
        *,
        dsn: str | None,
        sweep_s: float,
        on_jobs_queued: Callable[[], None],
        on_sweep: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.sockets = sockets
        #: Where to LISTEN (None: no hints, the sweep alone).
        self.dsn = dsn
        self.sweep_s = sweep_s
        self.on_jobs_queued = on_jobs_queued
        self.on_sweep = on_sweep
        self._due = asyncio.Event()
        self._outgoing: list[tuple[str, StopJob]] = []
        self._flushing: asyncio.Task[None] | None = None
        self._listener: Any = None
        self._listen_failing = False

    # --- leaving commands for other replicas ---------------------------------------------

    def send(self, supervisor_id: str, stop: StopJob) -> None:
        """Leave a StopJob for the replica holding the supervisor's socket (never waits:
        the commands queued meanwhile are written together)."""
        self._outgoing.append((supervisor_id, stop))
        if self._flushing is None:
            # A context of its own: the commands of many callers go out together, under
            # none's fence (store.fencing).
            self._flushing = asyncio.create_task(
                self._flush(), name="commands out", context=contextvars.Context()
            )

    async def _flush(self) -> None:
        try:
            while self._outgoing:
                batch, self._outgoing = self._outgoing, []
                try:
                    await self.store.send_commands(batch)
                except Exception:
                    # The supervisor's reconcile settles it when it is next connected (its
                    # run's cancel or timeout is stored); said once per failed batch.
                    log.exception("leaving %d StopJobs for other replicas failed", len(batch))
                    continue
                metrics.SUPERVISOR_COMMANDS.labels("queued").inc(len(batch))
        finally:
            self._flushing = None

    # --- taking the commands left for the sockets here -------------------------------------

    async def run(self) -> None:
        try:
            while True:
                if self.dsn is not None and self._listener is None:
                    await self._listen()
                try:
                    await asyncio.wait_for(self._due.wait(), timeout=self.sweep_s)
                except TimeoutError:
                    pass
                self._due.clear()
                if self._listener is None:
                    self.on_sweep()  # no hint says jobs were queued elsewhere: look anyway
                try:
                    await self.deliver()
                except Exception:
                    log.exception("taking the commands for this replica's supervisors failed")
                if self._listener is not None and self._listener.is_closed():
                    self._listener = None  # listen again on the next turn
        finally:
            if self._listener is not None:
                await self._listener.close(timeout=2)

    async def deliver(self) -> int:
        """Send the commands left for supervisors whose sockets are here; how many."""
        here = self.sockets.connected()
        if not here:
            return 0
        taken = await self.store.take_commands(here)
        for supervisor_id, stop in taken:
            if self.sockets.stop(supervisor_id, stop):
                metrics.SUPERVISOR_COMMANDS.labels("delivered").inc()
        return len(taken)

    async def _listen(self) -> None:
        import asyncpg  # only with a PostgreSQL store

        assert self.dsn is not None
        try:
            listener = await asyncpg.connect(self.dsn, timeout=self.sweep_s * 5)
            await listener.add_listener(CHANNEL, self._hint)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            if not self._listen_failing:
                log.warning("listening for other replicas' hints failed (sweeping on): %s", exc)
            self._listen_failing = True
            return
        self._listen_failing = False
        self._listener = listener
        self._due.set()  # what was left while not listening

    def _hint(self, connection: Any, pid: int, channel: str, payload: object) -> None:
        if payload == JOBS_QUEUED:
            self.on_jobs_queued()
        else:
            self._due.set()
