"""The lab's devices in the SQLite store (on disk): the inventory each supervisor's hello
declares, health and its history, the devices granted to runs and who holds what."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from protocol.exceptions import JobErrorKind
from protocol.messages import DeviceInfo, Hello, JobErrorReport, JobStateChanged, RunRef
from protocol.spec import JobSpec, NoopBackend
from protocol.state import Phase
from switchboard.store.schema import SCHEMA_VERSION
from switchboard.store.sqlite import SQLiteStore

pytestmark = pytest.mark.unit

V14 = ["1.4", "1.3"]


def _hello(
    sup: str, *ids: str, versions: list[str] = V14, cls: str = "simboard", max_jobs: int = 1
) -> Hello:
    devices = [DeviceInfo(id=i, class_=cls, labels={"slot": i[-1]}, console=True) for i in ids]
    return Hello(supervisor_id=sup, name=sup, versions=versions, devices=devices, max_jobs=max_jobs)


def _spec(n: int = 1) -> JobSpec:
    return JobSpec(name="flash", backend=NoopBackend(), resources={"simboard": n})


async def test_the_inventory_is_what_the_last_hello_declares(store: SQLiteStore) -> None:
    await store.supervisor_connected(_hello("h1", "board-a", "board-b"))
    listed = await store.list_devices()
    assert [(d.id, d.class_, d.supervisor_id, d.health) for d in listed] == [
        ("board-a", "simboard", "h1", "unknown"),
        ("board-b", "simboard", "h1", "unknown"),
    ]
    assert listed[0].labels == {"slot": "a"} and listed[0].console and not listed[0].power
    await store.set_device_health("board-a", "maintenance", "op (t1)", "re-soldering")
    # Declared again: known devices keep their health; one no longer declared leaves.
    await store.supervisor_connected(_hello("h1", "board-a", "board-c"))
    listed = await store.list_devices()
    assert [(d.id, d.health) for d in listed] == [
        ("board-a", "maintenance"),
        ("board-c", "unknown"),
    ]
    # A 1.3 hello declares no devices (its supervisor can't be granted any): none stay.
    await store.supervisor_connected(_hello("h1", "board-a", versions=["1.3"]))
    assert await store.list_devices() == []
    await store.supervisor_connected(_hello("h1", "board-a", "board-c"))
    await store.set_device_health("board-a", "maintenance", "op (t1)", "re-soldering")
    # Another host declaring a device id that is taken does not get it.
    connected = await store.supervisor_connected(_hello("h2", "board-a", "board-d"))
    assert connected.devices_refused == ("board-a",)
    hosts = {d.id: d.supervisor_id for d in await store.list_devices()}
    assert hosts == {"board-a": "h1", "board-c": "h1", "board-d": "h2"}
    # Filters.
    assert [d.id for d in await store.list_devices(supervisor_id="h2")] == ["board-d"]
    assert [d.id for d in await store.list_devices(health="maintenance")] == ["board-a"]
    assert await store.list_devices(class_="nrf52840dk") == []
    assert await store.device_counts() == {
        ("maintenance", "simboard"): 1,
        ("unknown", "simboard"): 2,
    }


async def test_every_change_of_health_is_in_the_history(store: SQLiteStore) -> None:
    await store.supervisor_connected(_hello("h1", "board-a"))
    await store.set_device_health("board-a", "bad", "alice (t1)", "no UART output")
    await store.set_device_health("board-a", "bad", "alice (t1)", "still")  # no change
    view = await store.set_device_health("board-a", "good", "bob (t2)", "cable replaced")
    assert view is not None and view.health == "good" and view.health_reason == "cable replaced"
    assert [(c.from_, c.to, c.actor, c.reason) for c in view.history] == [
        ("bad", "good", "bob (t2)", "cable replaced"),
        ("unknown", "bad", "alice (t1)", "no UART output"),
        (None, "unknown", "supervisor h1", "declared"),
    ]
    assert await store.set_device_health("nope", "bad", "x", "y") is None
    assert await store.get_device("nope") is None


async def test_runs_are_granted_placeable_free_devices_and_hold_them(store: SQLiteStore) -> None:
    await store.supervisor_connected(_hello("h1", "board-a", "board-b", "board-c"))
    await store.set_device_health("board-a", "bad", "op", "fails selftest")
    await store.set_device_health("board-c", "retired", "op", "end of life")
    await store.create_jobs([("j1", _spec()), ("j2", _spec())], "ci", 10)
    [first] = await store.assign([("j1", "h1")])
    assert first.devices == ("board-b",)  # never the bad one
    # The only good board is held: the second job is not placed (it stays queued).
    assert await store.assign([("j2", "h1")]) == []
    assert (await store.get_job("j2")).phase == "queued"  # type: ignore[union-attr]
    assert (await store.get_device("board-b")).holder == "j1#1"  # type: ignore[union-attr]
    [active] = await store.active_runs("h1")
    assert active.devices == ("board-b",)  # an assigned run's StartJob is sent with them
    free = (await store.placement_snapshot(lambda fleet: 0)).devices_free
    assert free == {"h1": {"simboard": 0}}
    # The run ends: the board is free again, for the next job.
    await store.end_run(RunRef("j1", 1), Phase.LOST.value, "gone")
    assert (await store.get_device("board-b")).holder is None  # type: ignore[union-attr]
    [second] = await store.assign([("j2", "h1")])
    assert second.devices == ("board-b",)


async def test_a_version_7_data_dir_gets_the_lab_tables(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    old = SQLiteStore(path)
    await old.open()
    await old.create_jobs([("j1", _spec())], "ci", 10)
    await old.close()
    conn = sqlite3.connect(path)
    conn.executescript(
        "DROP TABLE devices; DROP TABLE device_health_history; DROP TABLE run_devices;"
        " DROP TABLE device_checks; PRAGMA user_version = 7;"
    )
    conn.close()
    upgraded = SQLiteStore(path, upgrade=True)
    await upgraded.open()
    try:
        await upgraded.supervisor_connected(_hello("h1", "board-a"))
        [run] = await upgraded.assign([("j1", "h1")])
        assert run.devices == ("board-a",)
    finally:
        await upgraded.close()
    (version,) = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()
    assert version == SCHEMA_VERSION


async def test_a_check_runs_before_any_other_job_and_decides_the_health(
    store: SQLiteStore,
) -> None:
    # Two slots: both checks run at once (a store counts a host's free slots).
    await store.supervisor_connected(_hello("h1", "board-a", "board-b", max_jobs=2))
    check = JobSpec(name="check", backend=NoopBackend(), resources={"simboard": 1}, priority=5)
    await store.create_checks([("c-a", check, "board-a"), ("c-b", check, "board-b")], "sb")
    facts = {f.id: f for f in await store.device_facts()}
    assert facts["board-a"].checking and facts["board-b"].checking
    assert (await store.get_device("board-a")).checking == "c-a"  # type: ignore[union-attr]
    # A regular job gets neither board while they wait for their checks...
    await store.create_jobs([("j1", _spec())], "ci", 10)
    assert await store.assign([("j1", "h1")]) == []
    snapshot = await store.placement_snapshot(lambda fleet: 10)
    assert snapshot.devices_free == {"h1": {"simboard": 0}}
    assert snapshot.checks == {"h1": frozenset({"board-a", "board-b"})}
    assert {j.id: j.device for j in snapshot.queue} == {
        "c-a": "board-a",
        "c-b": "board-b",
        "j1": None,
    }
    # ...and each check gets exactly its own board.
    [run_a] = await store.assign([("c-a", "h1")])
    [run_b] = await store.assign([("c-b", "h1")])
    assert (run_a.devices, run_b.devices) == (("board-a",), ("board-b",))
    await store.end_run(RunRef("c-a", 1), Phase.LOST.value, "host gone")
    await store.request_cancel("c-b")
    await store.end_run(RunRef("c-b", 1), Phase.CANCELED.value, "canceled")
    done = sorted(await store.finish_checks())
    assert done == [("board-a", "c-a", "error", "unknown"), ("board-b", "c-b", "fail", "bad")]
    a = await store.get_device("board-a")
    assert a is not None and a.checking is None and a.check_result == "error"
    assert a.check_job == "c-a" and a.health == "unknown"  # unchanged: no history row
    b = await store.get_device("board-b")
    assert b is not None and b.health == "bad" and b.check_result == "fail"
    assert (b.history[0].actor, b.history[0].job_id) == ("health check", "c-b")
    assert b.history[0].reason == "health check failed (canceled)"
    # The checked board (unknown, placeable) takes the waiting job; the bad one never.
    [run] = await store.assign([("j1", "h1")])
    assert run.devices == ("board-a",)
    assert await store.finish_checks() == []


async def test_a_run_lost_with_its_host_puts_its_board_in_doubt(store: SQLiteStore) -> None:
    await store.supervisor_connected(_hello("h1", "board-a"))
    await store.set_device_health("board-a", "good", "op", "checked by hand")
    await store.create_jobs([("j1", _spec())], "ci", 10)
    await store.assign([("j1", "h1")])
    await store.end_run(RunRef("j1", 1), Phase.LOST.value, "host gone")
    assert await store.devices_after_lost_runs() == ["board-a"]
    device = await store.get_device("board-a")
    assert device is not None and device.health == "unknown"
    assert device.history[0].reason == "run of job j1 lost with its host"
    assert await store.devices_after_lost_runs() == []
    # Runs since the last check are counted (checks left out).
    [facts] = await store.device_facts()
    assert facts.runs_since_check == 1


async def test_a_board_of_a_checked_class_waits_for_its_first_check(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "db.sqlite3", checked_classes=frozenset({"simboard"}))
    await store.open()
    try:
        await store.supervisor_connected(_hello("h1", "board-a"))
        await store.create_jobs([("j1", _spec())], "ci", 10)
        # No check job queued yet, and still the board serves no job while unknown.
        assert await store.assign([("j1", "h1")]) == []
        await store.set_device_health("board-a", "good", "op", "checked by hand")
        [run] = await store.assign([("j1", "h1")])
        assert run.devices == ("board-a",)
    finally:
        await store.close()


async def test_a_board_that_leaves_the_inventory_takes_its_queued_check_with_it(
    store: SQLiteStore,
) -> None:
    await store.supervisor_connected(_hello("h1", "board-a", "board-b"))
    check = JobSpec(name="check", backend=NoopBackend(), resources={"simboard": 1})
    await store.create_checks([("c-a", check, "board-a")], "sb")
    await store.supervisor_connected(_hello("h1", "board-b"))  # board-a unplugged for good
    job = await store.get_job("c-a")
    assert job is not None and job.phase == "canceled"
    assert job.reason is not None and "board-a left the inventory" in job.reason
    assert await store.finish_checks() == []  # nothing to give a health to
    [left] = await store.device_facts()
    assert left.id == "board-b" and not left.checking


async def test_a_job_refused_for_want_of_its_board_goes_to_another(store: SQLiteStore) -> None:
    await store.supervisor_connected(_hello("h1", "board-a", "board-b"))
    for board in ("board-a", "board-b"):
        await store.set_device_health(board, "good", "op", "checked")
    await store.create_jobs([("j1", _spec())], "ci", 10)
    [first] = await store.assign([("j1", "h1")])
    assert first.devices == ("board-a",)
    # Its supervisor can't give it board-a (unplugged): refused, as busy.
    refusal = JobErrorReport(
        seq=1,
        job_id="j1",
        attempt=1,
        kind=JobErrorKind.MAX_CONCURRENT_JOBS,
        description="device 'board-a' granted: not present on the host (/dev/ttyACM0)",
    )
    rejected = JobStateChanged(seq=2, job_id="j1", attempt=1, phase=Phase.REJECTED)
    await store.apply_events("h1", [refusal, rejected])
    assert (await store.get_job("j1")).phase == "queued"  # type: ignore[union-attr]
    # Its next run gets the other board, and board-a's health is in doubt.
    [second] = await store.assign([("j1", "h1")])
    assert (second.attempt, second.devices) == (2, ("board-b",))
    assert await store.devices_after_lost_runs() == ["board-a"]
    a = await store.get_device("board-a")
    assert a is not None and a.health == "unknown"
    assert a.history[0].reason == "run of job j1 refused: max_concurrent_jobs"


async def test_a_recovery_sets_the_health_only_of_a_board_still_bad_from_its_check(
    store: SQLiteStore,
) -> None:
    await store.supervisor_connected(_hello("h1", "board-a", "board-b"))
    check = JobSpec(name="check", backend=NoopBackend(), resources={"simboard": 1})
    await store.create_checks([("c-a", check, "board-a"), ("c-b", check, "board-b")], "sb")
    for job, board in (("c-a", "board-a"), ("c-b", "board-b")):
        [run] = await store.assign([(job, "h1")])
        assert run.devices == (board,)
        await store.end_run(RunRef(job, 1), Phase.FAILED.value, "selftest failed")
    assert len(await store.finish_checks()) == 2
    # An operator takes board-b meanwhile: the recovery leaves it alone.
    await store.set_device_health("board-b", "maintenance", "op (t1)", "looking at it")
    actor = "switchboard (recovery)"
    assert await store.recovery_health("board-a", "c-a", "unknown", actor, "cycled")
    assert not await store.recovery_health("board-b", "c-b", "unknown", actor, "cycled")
    assert not await store.recovery_health("board-a", "c-a", "maintenance", actor, "again")
    assert not await store.recovery_health("board-x", "c-a", "unknown", actor, "none such")
    a = await store.get_device("board-a")
    assert a is not None and a.health == "unknown"
    change = a.history[0]
    assert (change.from_, change.to, change.actor, change.reason, change.job_id) == (
        "bad",
        "unknown",
        actor,
        "cycled",
        "c-a",
    )
    b = await store.get_device("board-b")
    assert b is not None and b.health == "maintenance"
