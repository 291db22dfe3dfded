"""The status check of a live connection (SupervisorConnection._status_due) against the
events that keep arriving while it reads the store: the real connection code, the real
protocol Connection and an SQLite store on disk. What the socket would do is done by hand
at the one moment that matters, inside the check's first read of the store: the reader
receives events and the applier stores them, as both go on concurrently with the check
when a stored batch (the acknowledger) made the reply due."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from protocol import codec
from protocol.connection import Connection, Role
from protocol.messages import Event, HeldRun, RunRef, StatusReply, StatusRequest
from protocol.state import Phase
from switchboard.config import Settings
from switchboard.outbox import Outbox
from switchboard.supervisor_connection import SupervisorConnection
from tests.store_setup import HELLO, SPEC, state

pytestmark = pytest.mark.unit


class _Fleet:
    """The hub, as far as one connection needs it."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.settings = Settings()
        self.writing: set[Outbox] = set()
        self.current = True

    def is_current(self, connection: SupervisorConnection) -> bool:
        return self.current

    def wake_dispatcher(self) -> None:
        pass

    async def stored_run_refs(self, supervisor_id: str) -> set[RunRef]:
        return (await self.store.active_run_refs([supervisor_id]))[supervisor_id]

    async def start_frame(self, job_id: str, attempt: int, spec: Any) -> bytes | None:
        raise AssertionError("no StartJob is sent here")


async def _connected(store: Any) -> SupervisorConnection:
    """s1 connected and reconciled, with runs `held` and `gone` running (stored, seq 1-2),
    and `fresh` assigned: its StartJob is on its way, no report came back yet."""
    for job_id in ("held", "gone", "fresh"):
        await store.create_job(job_id, SPEC)
    await store.supervisor_connected(HELLO)
    await store.assign([("held", "s1"), ("gone", "s1"), ("fresh", "s1")])
    protocol = Connection(Role.SWITCHBOARD)
    protocol.receive(codec.encode(HELLO))
    protocol.welcome(
        session=1, stored_seq=0, heartbeat_interval_s=5, heartbeat_timeout_s=20, enrolled=False
    )
    assert protocol.reconcile_due()  # reconciled with the Hello, as serve() does
    connection = SupervisorConnection(_Fleet(store), None, protocol, HELLO, 1)  # type: ignore[arg-type]
    connection.ready = True
    await _arrive(connection, [state(1, Phase.RUNNING, "held"), state(2, Phase.RUNNING, "gone")])
    return connection


async def _arrive(connection: SupervisorConnection, events: list[Event]) -> None:
    """Events read from the socket, then stored and acknowledged (the reader, the applier
    and the acknowledger in one go)."""
    for event in events:
        assert connection.protocol.receive(codec.encode(event)) == event
    _, after = connection.protocol.hand_over(events)
    applied = await connection.fleet.store.apply_events("s1", events, after_seq=after)
    connection.protocol.acknowledge(applied.stored_seq)


def _reply(connection: SupervisorConnection, runs: list[HeldRun]) -> None:
    request = codec.decode_from_switchboard(connection.protocol.status_request() or b"")
    assert isinstance(request, StatusRequest)
    reply = StatusReply(request_id=request.request_id, runs=runs, running=len(runs))
    assert connection.protocol.receive(codec.encode(reply)) == reply


def _during_first_read(store: Any, act: Callable[[], Awaitable[None]]) -> None:
    """Run `act` inside the status check's first read of the store, once."""
    read = store.active_run_refs
    done = []

    async def active_run_refs(supervisor_ids: Any) -> Any:
        if not done:
            done.append(True)
            await act()
        return await read(supervisor_ids)

    store.active_run_refs = active_run_refs


async def _phase(store: Any, job_id: str) -> Phase:
    return (await store.get_job(job_id)).runs[0].phase


async def test_a_run_that_starts_while_the_check_reads_is_not_taken_for_lost(store):
    """The reply was built before `fresh` was held (its StartJob was on its way, or read
    just after the StatusRequest), so it rightly does not list it; `fresh` starts and its
    first events are stored while the check reads. What the check reads shows it started:
    it must count as newer than the reply, not as a run the supervisor no longer holds.
    `gone`, absent from the reply with nothing since, is lost as before."""
    connection = await _connected(store)
    _reply(connection, [HeldRun("held", 1, Phase.RUNNING)])
    _during_first_read(
        store,
        lambda: _arrive(
            connection,
            [
                state(3, Phase.INITIALIZING, "fresh", stage="accepted"),
                state(4, Phase.RUNNING, "fresh"),
            ],
        ),
    )
    await connection._status_due()
    assert await _phase(store, "fresh") == Phase.RUNNING
    assert await _phase(store, "gone") == Phase.LOST
    assert await _phase(store, "held") == Phase.RUNNING


async def test_a_connection_replaced_while_the_check_reads_ends_nothing(store):
    """The newer connection's Hello reconciles; this one's reply is no longer the news."""
    connection = await _connected(store)
    _reply(connection, [HeldRun("held", 1, Phase.RUNNING)])
    fleet = connection.fleet
    assert isinstance(fleet, _Fleet)

    async def replaced() -> None:
        fleet.current = False

    _during_first_read(store, replaced)
    await connection._status_due()
    assert await _phase(store, "gone") == Phase.RUNNING
