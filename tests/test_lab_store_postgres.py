"""The hardware lab's store tests (tests/test_devices_store.py and
tests/test_reservations_store.py) on the PostgreSQL store: the same tests, imported, with
a `store` on the private cluster of the session (tests/postgres.py); and what only
PostgreSQL has to answer for: replicas granting devices side by side."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest

from protocol.messages import DeviceInfo, Hello
from protocol.spec import JobSpec, NoopBackend
from switchboard.scheduler import ReservationWanted
from switchboard.store.postgres import PostgresStore
from tests.postgres import (
    Cluster,
    postgres_fixture,  # noqa: F401 - one cluster per session
)
from tests.test_devices_store import *  # noqa: F403 - the lab's tests, run here again
from tests.test_devices_store import _hello, _spec
from tests.test_reservations_store import *  # noqa: F403
from tests.test_store_contract_postgres import _empty

pytestmark = pytest.mark.postgres

# What only an SQLite data dir has (its schema's upgrade from an older file).
del test_a_version_7_data_dir_gets_the_lab_tables  # noqa: F821

_names = itertools.count()


@pytest.fixture(scope="module")
def database(postgres: Cluster) -> str:
    return postgres.new_database(f"lab_{next(_names)}")


@pytest.fixture
async def store(database: str) -> AsyncIterator[PostgresStore]:
    await _empty(database)
    made = PostgresStore(database, max_connections=4)
    await made.open()
    yield made
    await made.close()


async def test_a_board_of_a_checked_class_waits_for_its_first_check(database: str) -> None:
    await _empty(database)
    store = PostgresStore(database, max_connections=2, checked_classes=frozenset({"simboard"}))
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


async def test_two_replicas_placing_at_once_never_grant_one_board_twice(database: str) -> None:
    """Two stores on one database (two replicas) assign 40 jobs for 4 boards at the same
    moment: each board is granted to one run only, and a reservation swept meanwhile never
    gets a board a run holds."""
    await _empty(database)
    a = PostgresStore(database, max_connections=4)
    b = PostgresStore(database, max_connections=4)
    await a.open()
    await b.open()
    try:
        boards = [f"board-{n}" for n in range(4)]
        hello = Hello(
            supervisor_id="h1",
            name="h1",
            versions=["1.4"],
            max_jobs=64,
            devices=[DeviceInfo(id=i, class_="simboard") for i in boards],
        )
        await a.supervisor_connected(hello)
        for board in boards:
            await a.set_device_health(board, "good", "op", "fine")
        spec = JobSpec(name="flash", backend=NoopBackend(), resources={"simboard": 1})
        ids = [f"j{n}" for n in range(40)]
        await a.create_jobs([(i, spec) for i in ids], "ci", 100)
        made = await a.create_reservation(
            "r1", ReservationWanted("r1", 1, "simboard"), 60.0, None, "test", 60.0
        )
        assert not isinstance(made, str), made
        results = await asyncio.gather(
            *((a if n % 2 else b).assign([(i, "h1") for i in ids[n::4]]) for n in range(4)),
            b.sweep_reservations(100),
        )
        runs = [run for batch in results[:4] for run in batch]  # type: ignore[union-attr]
        granted = [d for run in runs for d in run.devices]
        held = (await a.get_reservation("r1")).devices  # type: ignore[union-attr]
        assert len(granted) == len(set(granted)), granted
        assert not set(granted) & set(held), (granted, held)
        assert len(granted) + len(held) <= len(boards)
        assert len(runs) >= 1
    finally:
        await a.close()
        await b.close()
