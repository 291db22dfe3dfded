"""The recovery of failing boards as the checks loop runs it (switchboard/recoveries.py), on
a real SQLite store: the loop's call returns at once (each power cycle runs in a task of its
own), a cycled board is checked again, one still failing after its attempts goes to
maintenance, and so does one whose power cycle did not succeed; an operator's word wins.

The power cycle here is a coroutine the test answers by hand: a unit test starts no
supervisor to run the board's command (tests/test_lab_docker_checks.py does, end to end)."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from protocol.messages import DeviceInfo, Hello, RunRef
from protocol.spec import JobSpec, NoopBackend
from protocol.state import Phase
from switchboard.health import HealthCheck
from switchboard.models import DeviceView
from switchboard.power import PowerAnswer
from switchboard.recoveries import Recoveries
from switchboard.store.sqlite import SQLiteStore

pytestmark = pytest.mark.unit

CHECK = JobSpec(name="selftest", backend=NoopBackend(), resources={"simboard": 1})
_jobs = itertools.count(1)


class Cycles:
    """Power cycles asked for, each answered when the test says."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []
        self.answers: asyncio.Queue[PowerAnswer] = asyncio.Queue()

    async def __call__(self, device: DeviceView, check_job: str) -> PowerAnswer:
        self.asked.append((device.id, check_job))
        return await self.answers.get()

    def answer(self, result: str = "ok", reason: str = "") -> None:
        self.answers.put_nowait(
            PowerAnswer("board-a", "cycle", result, ok=result == "ok", reason=reason)
        )


async def _fail_check(store: SQLiteStore, device: str = "board-a") -> tuple[str, str, str, str]:
    """Run a check of `device` that fails; what finish_checks says of it."""
    job = f"c{next(_jobs)}"
    await store.create_checks([(job, CHECK, device)], "switchboard")
    [run] = await store.assign([(job, "h1")])
    assert run.devices == (device,)
    await store.end_run(RunRef(job, 1), Phase.FAILED.value, "selftest: FAIL")
    [done] = await store.finish_checks()
    assert done == (device, job, "fail", "bad")
    return done


async def _settled(recoveries: Recoveries) -> None:
    for _ in range(100):
        if not recoveries.under_way:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the recovery did not end")


async def _lab(
    store: SQLiteStore, attempts: int | None = 2, power: bool = True
) -> tuple[Recoveries, Cycles, list[int]]:
    await store.supervisor_connected(
        Hello(
            supervisor_id="h1",
            name="h1",
            versions=["1.5", "1.4"],
            devices=[DeviceInfo(id="board-a", class_="simboard", power=power)],
        )
    )
    cycles = Cycles()
    woken: list[int] = []
    checks = {"simboard": HealthCheck(spec=CHECK, recovery_attempts=attempts)}
    return Recoveries(store, checks, cycles, lambda: woken.append(1)), cycles, woken


async def test_a_failing_board_is_cycled_then_checked_until_its_attempts_end(
    store: SQLiteStore,
) -> None:
    recoveries, cycles, woken = await _lab(store)
    device, job, result, health = await _fail_check(store)
    recoveries.after_check(device, job, result, health)  # returns at once: not a coroutine
    await asyncio.sleep(0.05)
    assert cycles.asked == [("board-a", job)]  # asked, not answered: the board stays bad
    assert (await store.get_device("board-a")).health == "bad"  # type: ignore[union-attr]
    cycles.answer()
    await _settled(recoveries)
    view = await store.get_device("board-a")
    assert view is not None and view.health == "unknown" and woken == [1]
    assert (view.history[0].actor, view.history[0].job_id) == ("switchboard (recovery)", job)
    assert view.history[0].reason.startswith("power-cycled (1 of 2)")

    second = await _fail_check(store)
    recoveries.after_check(*second)
    cycles.answer()
    await _settled(recoveries)
    assert recoveries.cycles == {"board-a": 2}
    third = await _fail_check(store)
    recoveries.after_check(*third)
    await _settled(recoveries)
    assert len(cycles.asked) == 2  # no third cycle: maintenance
    view = await store.get_device("board-a")
    assert view is not None and view.health == "maintenance"
    assert view.health_reason == (
        f"health check still failing after 2 power cycle(s) (last check {third[1]})"
    )
    assert recoveries.cycles == {}


async def test_a_passed_check_ends_the_series(store: SQLiteStore) -> None:
    recoveries, cycles, _ = await _lab(store)
    recoveries.after_check(*await _fail_check(store))
    cycles.answer()
    await _settled(recoveries)
    assert recoveries.cycles == {"board-a": 1}
    recoveries.after_check("board-a", "c-pass", "pass", "good")
    assert recoveries.cycles == {}


async def test_a_cycle_that_did_not_succeed_is_maintenance(store: SQLiteStore) -> None:
    recoveries, cycles, _ = await _lab(store)
    device, job, result, health = await _fail_check(store)
    recoveries.after_check(device, job, result, health)
    cycles.answer("timed_out", "no answer from h1 in 40 s")
    await _settled(recoveries)
    view = await store.get_device("board-a")
    assert view is not None and view.health == "maintenance"
    assert view.health_reason == (
        f"power cycle 1 of 2 after failed health check {job} did not succeed"
        " (timed_out: no answer from h1 in 40 s)"
    )


async def test_an_operator_wins_and_boards_without_power_or_attempts_stay_bad(
    store: SQLiteStore,
) -> None:
    recoveries, cycles, _ = await _lab(store)
    device, job, result, health = await _fail_check(store)
    recoveries.after_check(device, job, result, health)
    await asyncio.sleep(0.05)
    await store.set_device_health("board-a", "retired", "op (t1)", "cracked")
    cycles.answer()
    await _settled(recoveries)
    assert (await store.get_device("board-a")).health == "retired"  # type: ignore[union-attr]

    for attempts, power in ((None, True), (2, False)):
        recoveries, cycles, _ = await _lab(store, attempts, power)
        await store.set_device_health("board-a", "unknown", "op (t1)", "back")
        recoveries.after_check(*await _fail_check(store))
        await _settled(recoveries)
        assert cycles.asked == []
        assert (await store.get_device("board-a")).health == "bad"  # type: ignore[union-attr]
