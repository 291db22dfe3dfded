"""Two PostgreSQL stores on one database, as two switchboard replicas hold them: the leader
lease and its term fence, sessions owned by one replica under their epoch, what a replica
forgets at start, the leader reaping a dead replica's sessions, runs given only to
supervisors whose socket is here, and commands left for the replica holding a socket.
On the private cluster of tests/postgres.py."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import asyncpg
import pytest

from protocol.messages import StopJob
from protocol.state import Phase
from switchboard.leader import Leadership
from switchboard.store.fencing import LEADER_TERM, SESSION, SessionSuperseded, StaleTerm
from switchboard.store.postgres import PostgresStore
from switchboard.store.sqlite import SQLiteStore
from tests.postgres import (
    Cluster,
    postgres_fixture,  # noqa: F401 - one cluster per session
)
from tests.test_store_contract import SPEC, hello, state

pytestmark = pytest.mark.postgres

_names = itertools.count()


@pytest.fixture
async def database(postgres: Cluster) -> str:
    return postgres.new_database(f"replicas_{next(_names)}")


@pytest.fixture
async def pair(database: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    a = PostgresStore(database, max_connections=3, replica_id="a")
    b = PostgresStore(database, max_connections=3, replica_id="b")
    await a.open()
    await b.open()
    await a.forget_connections()
    await b.forget_connections()
    yield a, b
    await a.close()
    await b.close()


async def _as(term: int | None, session: tuple[str, int] | None, work):
    """Run `work()` with the fences a leader's task or a connection's would carry."""

    async def fenced():
        LEADER_TERM.set(term)
        SESSION.set(session)
        return await work()

    return await asyncio.create_task(fenced())


async def test_one_replica_leads_and_a_stale_term_writes_nothing(pair):
    a, b = pair
    took, _ = await a.claim_lease(0.5)
    other, _ = await b.claim_lease(0.5)
    assert took.hold and took.term == 1
    assert not other.hold and other.term == 1
    await asyncio.sleep(0.6)  # a does not renew: its lease lapses
    taken, _ = await b.claim_lease(10)
    assert taken.hold and taken.taken and taken.term == 2
    # a, paused through all that, wakes up and writes under term 1: refused.
    with pytest.raises(StaleTerm):
        await _as(1, None, lambda: a.set_dispatch_paused(True))
    assert not await b.dispatch_paused()
    await _as(2, None, lambda: b.set_dispatch_paused(True))
    assert await b.dispatch_paused()
    again, _ = await a.claim_lease(10)
    assert not again.hold and again.term == 2


async def test_a_superseded_session_writes_nothing(pair):
    a, b = pair
    first = await a.supervisor_connected(hello("s1"))
    await a.create_job("j1", SPEC)
    (run,) = await a.assign([("j1", "s1")])
    assert run.job_id == "j1"
    second = await b.supervisor_connected(hello("s1"))  # it reconnected through b
    assert second.session == first.session + 1
    events = [state(1, Phase.RUNNING)]
    with pytest.raises(SessionSuperseded):
        await _as(None, ("s1", first.session), lambda: a.apply_events("s1", events))
    assert await a.run_phase("j1", 1) == Phase.ASSIGNED
    applied = await _as(None, ("s1", second.session), lambda: b.apply_events("s1", events))
    assert applied.stored_seq == 1
    assert await a.run_phase("j1", 1) == Phase.RUNNING
    # a's disconnect of its old session leaves b's connection be.
    await a.supervisor_disconnected("s1", first.session, "closed")
    assert (await b.get_supervisor("s1")).connected


async def test_runs_go_only_to_supervisors_whose_socket_is_here(pair):
    a, b = pair
    await a.supervisor_connected(hello("s1"))
    await b.supervisor_connected(hello("s2"))
    await a.create_job("j1", SPEC)
    await a.create_job("j2", SPEC)
    assert await b.assign([("j1", "s1")]) == []  # s1's socket is a's
    made = await a.assign([("j1", "s1"), ("j2", "s2")])
    assert [r.job_id for r in made] == ["j1"]
    assert [r.job_id for r in await b.assign([("j2", "s2")])] == ["j2"]
    # Drained through a, s2 is given nothing more by b, whatever b saw before.
    await a.create_job("j3", SPEC)
    assert await a.set_drained("s2", True)
    assert await b.assign([("j3", "s2")]) == []


async def test_a_replica_forgets_only_its_own_connections(pair, database):
    a, b = pair
    await a.supervisor_connected(hello("s1"))
    await b.supervisor_connected(hello("s2"))
    again = PostgresStore(database, max_connections=2, replica_id="a")  # a restarted
    await again.open()
    try:
        await again.forget_connections()
        assert not (await b.get_supervisor("s1")).connected
        assert (await b.get_supervisor("s2")).connected
    finally:
        await again.close()


async def test_the_leader_reaps_the_sessions_of_a_silent_replica(pair):
    a, b = pair
    await a.supervisor_connected(hello("s1"))
    await b.supervisor_connected(hello("s2"))
    await b.claim_lease(10)
    assert await b.reap_replicas(0.5) == []
    await asyncio.sleep(0.7)
    _, owned = await b.claim_lease(10)  # b renews its liveness; a is silent
    assert owned == {"s2": 1}
    assert await b.reap_replicas(0.5) == ["s1"]
    s1 = await b.get_supervisor("s1")
    assert not s1.connected
    records = await b.connection_records("s1", 1)
    assert records[0].reason == "its switchboard replica stopped answering"
    # a wakes up: the session it held is over, its writes are refused.
    with pytest.raises(SessionSuperseded):
        await _as(None, ("s1", 1), lambda: a.apply_events("s1", [state(1, Phase.RUNNING)]))
    _, owned = await a.claim_lease(10)
    assert owned == {}


async def test_commands_are_left_for_the_replica_holding_the_socket(pair, database):
    a, b = pair
    await a.supervisor_connected(hello("s1"))
    hints: list[str] = []
    listener = await asyncpg.connect(database)
    await listener.add_listener("switchboard", lambda *args: hints.append(args[3]))
    try:
        stops = [StopJob(job_id=f"j{n}", attempt=1, reason="canceled") for n in range(3)]
        await b.send_commands([("s1", stop) for stop in stops])
        for _ in range(50):
            if hints:
                break
            await asyncio.sleep(0.02)
        assert hints == ["s1"]  # a hint per supervisor, not per command
    finally:
        await listener.close()
    assert await b.take_commands(["s2"]) == []
    taken = await a.take_commands(["s1"])
    assert [(c.supervisor_id, c.kind, c.job_id, c.attempt, c.reason) for c in taken] == [
        ("s1", "stop", stop.job_id, stop.attempt, stop.reason) for stop in stops
    ]
    assert await a.take_commands(["s1"]) == []
    # Commands left for a supervisor are dropped when it connects again: its reconcile
    # settles what they said.
    await b.send_commands([("s1", stops[0])])
    await b.supervisor_connected(hello("s1"))
    assert await b.take_commands(["s1"]) == []


async def test_a_power_request_is_answered_through_its_row(pair, database):
    a, b = pair
    # Not connected anywhere: nothing to leave it for.
    assert await b.ask_power("s1", "board-1", "cycle") is None
    await a.supervisor_connected(hello("s1"))
    seq = await b.ask_power("s1", "board-1", "cycle")
    assert seq is not None
    assert await b.power_answer(seq) == (True, None)
    # A reconnect keeps it (the replica the supervisor is on now takes it)...
    await a.supervisor_connected(hello("s1"))
    (taken,) = await a.take_commands(["s1"])
    assert (taken.seq, taken.kind, taken.device_id, taken.action) == (
        seq,
        "power",
        "board-1",
        "cycle",
    )
    # ...taken once: it stays, for its answer, but is not taken again.
    assert await a.take_commands(["s1"]) == []
    hints: list[str] = []
    listener = await asyncpg.connect(database)
    await listener.add_listener("switchboard", lambda *args: hints.append(args[3]))
    try:
        assert await a.answer_power(seq, '{"result": "ok", "ok": true}')
        for _ in range(50):
            if hints:
                break
            await asyncio.sleep(0.02)
        assert hints == [f"={seq}"]
    finally:
        await listener.close()
    assert await b.power_answer(seq) == (True, '{"result": "ok", "ok": true}')
    await b.forget_command(seq)
    assert await b.power_answer(seq) == (False, None)
    # An answer for an asker that gave up goes nowhere.
    assert not await a.answer_power(seq, '{"result": "ok"}')


class _Work:
    """Singleton work that notes the term it runs under, and whether it is running."""

    def __init__(self) -> None:
        self.terms: list[int | None] = []
        self.running = False

    async def run(self) -> None:
        self.running = True
        self.terms.append(LEADER_TERM.get())
        try:
            await asyncio.Event().wait()
        finally:
            self.running = False


async def _until(check, what: str, within_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.02)


async def test_singleton_work_runs_on_the_leader_only_and_moves_when_it_dies(pair):
    a, b = pair
    work_a, work_b = _Work(), _Work()
    lead_a = Leadership(a, {"w": work_a.run}, ttl_s=1.0, claim_every_s=0.2)
    lead_b = Leadership(b, {"w": work_b.run}, ttl_s=1.0, claim_every_s=0.2)
    run_a = asyncio.create_task(lead_a.run())
    await _until(lambda: work_a.running, "a leads")
    run_b = asyncio.create_task(lead_b.run())
    try:
        await asyncio.sleep(0.5)
        assert not work_b.running and lead_b.term is None
        assert work_a.terms == [1]
        run_a.cancel()  # a dies (without leaving): its lease lapses
        await _until(lambda: not work_a.running, "a's work stops with it")
        await _until(lambda: work_b.running, "b takes over", within_s=1.0 + 0.2 + 2)
        assert work_b.terms == [2] and lead_b.term == 2
    finally:
        run_a.cancel()
        run_b.cancel()
        await asyncio.gather(run_a, run_b, return_exceptions=True)


async def test_a_leader_that_cannot_renew_steps_down_on_its_own_clock(database):
    lonely = PostgresStore(database, max_connections=2, replica_id="lonely")
    await lonely.open()
    work = _Work()
    leadership = Leadership(lonely, {"w": work.run}, ttl_s=1.0, claim_every_s=0.2)
    running = asyncio.create_task(leadership.run())
    try:
        await _until(lambda: work.running, "it leads")
        lost = asyncio.get_running_loop().time()
        await lonely.close()  # the database is out of reach from now on
        await _until(lambda: not work.running, "it steps down", within_s=3)
        # Before its lease could expire on the database's clock (1 s after its last claim).
        assert asyncio.get_running_loop().time() - lost < 1.0
        assert leadership.term is None
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_on_a_store_one_process_serves_the_work_runs_at_once_unfenced(tmp_path):
    store = SQLiteStore(tmp_path / "db.sqlite3")
    await store.open()
    work = _Work()
    running = asyncio.create_task(Leadership(store, {"w": work.run}).run())
    try:
        await _until(lambda: work.running, "it runs", within_s=2)
        assert work.terms == [None]  # nothing to fence: no write of it checks a term
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await store.close()
