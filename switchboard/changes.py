""" "Something was stored": one signal, from the store's write listener to whoever follows
the store (output followers, the live feed), instead of each writer remembering to tell.

The store calls its listeners after every write (committed or not), so no code path that
stores can forget to signal. A follower takes `count` before it reads the store, then
waits for a count above it: a write that lands between its read and its wait is not missed.
The wait is bounded, so a follower also notices what another process stored.
"""

from __future__ import annotations

import asyncio
import contextlib

from switchboard.store.base import Store


class Changes:
    def __init__(self, store: Store) -> None:
        #: Writes seen so far.
        self.count = 0
        self._waiters: set[asyncio.Future[None]] = set()
        store.on_write(self._stored)

    def _stored(self) -> None:
        self.count += 1
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, after: int, timeout_s: float) -> None:
        """Until a write beyond the first `after` (at once if there was one), or `timeout_s`."""
        if self.count > after:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, timeout_s)
        finally:
            self._waiters.discard(waiter)  # timed out: don't let idle followers pile up
