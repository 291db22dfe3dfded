"""Reservations in the SQLite store (on disk): the sweep is bounded per pass, grants all or
nothing, and the placing transaction never gives a reserved device to a job that does not
name its reservation."""

from __future__ import annotations

import pytest

from protocol.messages import DeviceInfo, Hello
from protocol.spec import JobSpec, NoopBackend
from switchboard.scheduler import ReservationWanted
from switchboard.store.sqlite import SQLiteStore

pytestmark = pytest.mark.unit


def _hello(*ids: str) -> Hello:
    devices = [DeviceInfo(id=i, class_="simboard") for i in ids]
    return Hello(supervisor_id="h1", name="h1", versions=["1.4"], devices=devices)


def _spec(reservation: str | None = None) -> JobSpec:
    return JobSpec(
        name="flash", backend=NoopBackend(), resources={"simboard": 1}, reservation=reservation
    )


async def _reserve(store: SQLiteStore, rid: str, count: int = 1, ttl_s: float = 60.0) -> None:
    made = await store.create_reservation(
        rid, ReservationWanted(rid, count, "simboard"), 60.0, None, "test", ttl_s
    )
    assert not isinstance(made, str), made


async def test_one_sweep_handles_at_most_its_limit_and_says_there_is_more(
    store: SQLiteStore,
) -> None:
    await store.supervisor_connected(_hello("board-a"))
    for n in range(7):  # never refreshed: all past their TTL at once
        await _reserve(store, f"r-{n}", ttl_s=-1.0)
    passes = []
    while True:
        swept = await store.sweep_reservations(limit=3)
        passes.append(len(swept.ended))
        if not swept.more:
            break
    assert passes == [3, 3, 1]
    for n in range(7):
        ended = await store.get_reservation(f"r-{n}")
        assert ended is not None and ended.state == "expired", ended
    # Nothing left to do: a pass writes nothing.
    writes = store.supervisor_writes
    assert (await store.sweep_reservations(limit=3)).ended == []
    assert store.supervisor_writes == writes


async def test_a_reservation_is_granted_all_its_devices_or_none(store: SQLiteStore) -> None:
    await store.supervisor_connected(_hello("board-a", "board-b"))
    await store.create_jobs([("busy", _spec())], "ci", 10)
    [run] = await store.assign([("busy", "h1")])
    await _reserve(store, "r-both", count=2)
    swept = await store.sweep_reservations(limit=10)
    assert swept.granted == []
    waiting = await store.get_reservation("r-both")
    assert waiting is not None and waiting.state == "waiting" and waiting.devices == []
    assert all(d.reservation is None for d in await store.list_devices())
    # A smaller one fits beside the run: it gets the free board, all of what it asks.
    await _reserve(store, "r-one", count=1)
    swept = await store.sweep_reservations(limit=10)
    assert [rid for rid, _ in swept.granted] == ["r-one"]
    held = await store.get_reservation("r-one")
    free = "board-b" if run.devices == ("board-a",) else "board-a"
    assert held is not None and held.state == "held" and held.devices == [free]


async def test_a_reserved_device_goes_only_to_a_job_naming_its_reservation(
    store: SQLiteStore,
) -> None:
    await store.supervisor_connected(_hello("board-a"))
    await _reserve(store, "r-1")
    await store.sweep_reservations(limit=10)
    await store.create_jobs([("plain", _spec()), ("mine", _spec("r-1"))], "ci", 10)
    # Even told to (a stale plan), the placing transaction refuses the plain job the board.
    assert await store.assign([("plain", "h1")]) == []
    [run] = await store.assign([("mine", "h1")])
    assert run.devices == ("board-a",)
    # Released: queued jobs naming it are canceled, and the board is anyone's again.
    await store.create_jobs([("later", _spec("r-1"))], "ci", 10)
    released = await store.release_reservation("r-1", "done")
    assert released is not None and released.state == "released"
    later = await store.get_job("later")
    assert later is not None and later.phase == "canceled"
