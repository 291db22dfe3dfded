"""Reads asked by many connections at once, made as one: while a read is under way, the
questions that arrive wait for the next read, which asks them all. A fleet's status checks
come in bursts (every connection's heartbeat goes out in the same pass), and one query for
a burst costs the store and the event loop far less than one per supervisor."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from typing import Generic, TypeVar

T = TypeVar("T")


class CoalescedRead(Generic[T]):
    """`get(key)` answers from `read(keys)`, which answers every key it is given."""

    def __init__(self, read: Callable[[Collection[str]], Awaitable[dict[str, T]]]) -> None:
        self._read = read
        self._waiting: dict[str, list[asyncio.Future[T]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def get(self, key: str) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(future)
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_all())
        return await future

    async def _read_all(self) -> None:
        try:
            while self._waiting:
                asked, self._waiting = self._waiting, {}
                try:
                    answers = await self._read(asked.keys())
                except Exception as exc:  # each asker gets the failure, none waits for ever
                    for futures in asked.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
                    continue
                for key, futures in asked.items():
                    for future in futures:
                        if not future.done():  # an asker may have given up (cancelled)
                            future.set_result(answers[key])
        finally:
            self._reader = None
