"""CoalescedRead: questions that arrive while a read is under way are asked together."""

from __future__ import annotations

import asyncio
from collections.abc import Collection

import pytest

from switchboard.coalesce import CoalescedRead

pytestmark = pytest.mark.unit


class _Store:
    def __init__(self) -> None:
        self.reads: list[list[str]] = []
        self.gate = asyncio.Event()
        self.fail = False

    async def read(self, keys: Collection[str]) -> dict[str, str]:
        self.reads.append(sorted(keys))
        await self.gate.wait()
        if self.fail:
            raise RuntimeError("the store is down")
        return {key: key.upper() for key in keys}


async def test_questions_during_a_read_share_the_next_read():
    store = _Store()
    reads = CoalescedRead(store.read)
    first = asyncio.ensure_future(reads.get("a"))
    await asyncio.sleep(0)  # the first read is under way
    later = [asyncio.ensure_future(reads.get(k)) for k in ("b", "c", "b")]
    await asyncio.sleep(0)
    store.gate.set()
    assert await first == "A"
    assert await asyncio.gather(*later) == ["B", "C", "B"]
    assert store.reads == [["a"], ["b", "c"]]


async def test_a_failed_read_fails_its_askers_and_the_next_read_goes_on():
    store = _Store()
    reads = CoalescedRead(store.read)
    store.fail = True
    store.gate.set()
    with pytest.raises(RuntimeError, match="down"):
        await reads.get("a")
    store.fail = False
    assert await reads.get("b") == "B"


async def test_an_asker_that_gives_up_does_not_stop_the_others():
    store = _Store()
    reads = CoalescedRead(store.read)
    gone = asyncio.ensure_future(reads.get("a"))
    stays = asyncio.ensure_future(reads.get("a"))
    await asyncio.sleep(0)
    gone.cancel()
    store.gate.set()
    assert await stays == "A"
    assert gone.cancelled()
