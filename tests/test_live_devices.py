"""The live feed's device events (switchboard.live) over an SQLite store on disk: every
device once, then each change of health, and a device its supervisor no longer declares."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import pytest

from protocol.messages import DeviceInfo, Hello
from switchboard import live
from switchboard.changes import Changes
from switchboard.config import Settings
from switchboard.hub import Hub
from switchboard.live import LiveFeed, Subscriber
from switchboard.store.sqlite import SQLiteStore

pytestmark = pytest.mark.unit


def _hello(*ids: str) -> Hello:
    devices = [DeviceInfo(id=i, class_="simboard") for i in ids]
    return Hello(supervisor_id="h1", name="h1", versions=["1.4"], devices=devices)


async def _device_events(subscriber: Subscriber, wanted: int) -> list[tuple[str, dict]]:
    """The next `wanted` device events (others skipped), within 10 s."""
    found: list[tuple[str, dict]] = []
    async with asyncio.timeout(10):
        while len(found) < wanted:
            event = await subscriber.next(1.0)
            if event is not None and event.kind.startswith("device"):
                found.append((event.kind, json.loads(event.data)))
    return found


async def test_device_events_follow_the_inventory_and_its_health(
    store: SQLiteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Passes as often as a write asks (not at most once a second): a short test.
    monkeypatch.setattr(live, "SUPERVISORS_EVERY_S", 0.0)
    await store.supervisor_connected(_hello("board-a", "board-b"))
    feed = LiveFeed(store, Hub(store, Settings(data_dir=tmp_path)), Changes(store))
    subscriber = feed.subscribe()
    task = asyncio.create_task(feed.run())
    try:
        first = await _device_events(subscriber, 2)
        assert [(kind, data["id"], data["health"]) for kind, data in first] == [
            ("device", "board-a", "unknown"),
            ("device", "board-b", "unknown"),
        ]
        await store.set_device_health("board-b", "maintenance", "op (t1)", "new cable")
        [(kind, data)] = await _device_events(subscriber, 1)
        assert (kind, data["id"], data["health"], data["health_reason"]) == (
            "device",
            "board-b",
            "maintenance",
            "new cable",
        )
        # Declared no more: it leaves the inventory, and dashboards drop it (the one declared
        # again is news too: when it was last declared).
        await store.supervisor_connected(_hello("board-a"))
        [again, removed] = await _device_events(subscriber, 2)
        assert (again[0], again[1]["id"]) == ("device", "board-a")
        assert removed == ("device_removed", {"id": "board-b"})
        # Nothing changed: no event.
        await store.set_device_health("board-a", "unknown", "op (t1)", "same")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(_device_events(subscriber, 1), 1.5)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        feed.close()
