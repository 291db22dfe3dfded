"""The connection state machine (protocol/connection.py), cell by cell, with no socket.

EXPECTED is written out by hand from docs/protocol.md §4 and §10, independently of TABLE:
every (state, sender, message kind) cell is driven through a real Connection of the
receiving side (and the sending side's own check), so an edit of one cell of the table
fails here rather than passing a test that merely reads the table back. Then the
sequencing rules: duplicates, acks, resends, the events held until the first Welcome,
StatusReply ordering, and version negotiation.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from protocol import codec
from protocol.connection import (
    KINDS,
    TABLE,
    Acknowledged,
    Allow,
    Connection,
    Drop,
    Goodbye,
    NotAllowedToSend,
    Refuse,
    Role,
    State,
    table_markdown,
)
from protocol.exceptions import CloseCode
from protocol.messages import (
    Ack,
    ConsoleAttach,
    ConsoleClosed,
    ConsoleData,
    ConsoleDetach,
    ConsoleInput,
    Heartbeat,
    HeldRun,
    Hello,
    JobErrorReport,
    JobExit,
    JobFiles,
    JobStateChanged,
    Output,
    Power,
    PowerResult,
    ProtocolErrorMessage,
    ServerHeartbeat,
    StartJob,
    StatusReply,
    StatusRequest,
    StopJob,
    Welcome,
)
from protocol.sequencing import EventBacklog
from protocol.spec import NoopBackend
from protocol.state import Phase

pytestmark = pytest.mark.unit

SUP, SB = Role.SUPERVISOR, Role.SWITCHBOARD
HELLO_, WELCOME_, EST, CLOSED = (
    State.AWAITING_HELLO,
    State.AWAITING_WELCOME,
    State.ESTABLISHED,
    State.CLOSED,
)

# One message of each kind each side sends.
SAMPLES = {
    SUP: {
        "hello": Hello(supervisor_id="h", name="h", versions=["1.6"]),
        "state": JobStateChanged(seq=1, job_id="j", attempt=1, phase=Phase.RUNNING),
        "error": JobErrorReport(seq=1, job_id="j", attempt=1, kind="internal_error"),
        "output": Output(seq=1, job_id="j", attempt=1, stream="stdout", offset=0, data=b"x"),
        "exit": JobExit(seq=1, job_id="j", attempt=1, exit_code=0),
        "files": JobFiles(seq=1, job_id="j", attempt=1),
        "status": StatusReply(request_id=1),
        "power_result": PowerResult(request_id=1, ok=True, exit_code=0),
        "console_data": ConsoleData(session=1, offset=0, data=b"> "),
        "console_closed": ConsoleClosed(session=1, reason="gone"),
        "heartbeat": Heartbeat(at=1.0),
        "protocol_error": ProtocolErrorMessage(code=1011, reason="bye"),
    },
    SB: {
        "welcome": Welcome(version="1.6", session=1, last_seq=0),
        "start_job": StartJob(job_id="j", attempt=1, backend=NoopBackend()),
        "stop_job": StopJob(job_id="j", attempt=1),
        "ack": Ack(seq=0),
        "status_request": StatusRequest(request_id=1),
        "power": Power(request_id=1, device_id="board-1", action="status"),
        "console_attach": ConsoleAttach(session=1, device_id="board-1"),
        "console_input": ConsoleInput(session=1, data=b"ping\r"),
        "console_detach": ConsoleDetach(session=1),
        "heartbeat": ServerHeartbeat(at=1.0),
        "protocol_error": ProtocolErrorMessage(code=1011, reason="bye"),
    },
}

# Outcomes: "ok" (accepted, state unchanged), "-> <state>" (accepted, then that state),
# a close code (protocol_error + close), "drop" (ignored).
_SUP_ALL = list(SAMPLES[SUP])
_SB_ALL = list(SAMPLES[SB])


def _all(kinds: list[str], outcome: object, **cells: object) -> dict[str, object]:
    return {kind: cells.get(kind, outcome) for kind in kinds}


EXPECTED: dict[tuple[State, Role], dict[str, object]] = {
    (HELLO_, SUP): _all(_SUP_ALL, 4000, hello="-> awaiting_welcome"),
    (HELLO_, SB): _all(_SB_ALL, 4000, protocol_error="-> closed"),
    (WELCOME_, SUP): _all(_SUP_ALL, 4002, protocol_error="-> closed"),
    (WELCOME_, SB): _all(_SB_ALL, 4000, welcome="-> established", protocol_error="-> closed"),
    (EST, SUP): _all(_SUP_ALL, "ok", hello=4002, protocol_error="-> closed"),
    (EST, SB): _all(_SB_ALL, "ok", welcome=4002, protocol_error="-> closed"),
    (CLOSED, SUP): _all(_SUP_ALL, "drop"),
    (CLOSED, SB): _all(_SB_ALL, "drop"),
}

CELLS = [(state, sender, kind) for (state, sender), row in EXPECTED.items() for kind in row]


def _switchboard_side(state: State) -> Connection:
    """A switchboard's Connection brought to `state` the way a real one gets there."""
    conn = Connection(SB)
    if state is HELLO_:
        return conn
    assert isinstance(conn.receive(codec.encode(SAMPLES[SUP]["hello"])), Hello)
    if state is EST:
        conn.welcome(
            session=1, stored_seq=0, heartbeat_interval_s=5, heartbeat_timeout_s=20, enrolled=False
        )
    if state is CLOSED:
        conn.fail(CloseCode.NORMAL, "done")
    assert conn.state is state
    return conn


def _supervisor_side(state: State) -> Connection:
    conn = Connection(SUP, backlog=EventBacklog())
    if state is HELLO_:
        return conn
    conn.send(SAMPLES[SUP]["hello"])
    if state is EST:
        assert isinstance(conn.receive(codec.encode(SAMPLES[SB]["welcome"])), Welcome)
    if state is CLOSED:
        conn.fail(CloseCode.NORMAL, "done")
    assert conn.state is state
    return conn


def _side(role: Role, state: State) -> Connection:
    return _switchboard_side(state) if role is SB else _supervisor_side(state)


def test_the_table_has_every_cell_and_the_kinds_are_the_wire_unions() -> None:
    assert set(TABLE) == set(State)
    assert KINDS == {SUP: tuple(SAMPLES[SUP]), SB: tuple(SAMPLES[SB])}
    for state in State:
        assert set(TABLE[state]) == set(Role)
        for sender in Role:
            assert tuple(TABLE[state][sender]) == KINDS[sender]
    assert set(EXPECTED) == set(itertools.product(State, Role))


@pytest.mark.parametrize(
    ("state", "sender", "kind"), CELLS, ids=[f"{s}-{r}-{k}" for s, r, k in CELLS]
)
def test_receiving(state: State, sender: Role, kind: str) -> None:
    """The receiving side's Connection does what the cell says."""
    expected = EXPECTED[(state, sender)][kind]
    conn = _side(SB if sender is SUP else SUP, state)
    received = conn.receive(codec.encode(SAMPLES[sender][kind]))
    if isinstance(expected, int):
        assert isinstance(received, Goodbye), received
        assert received.code == expected and conn.state is CLOSED
        said = codec.decode_from_switchboard(received.frame)
        assert said == ProtocolErrorMessage(code=expected, reason=received.reason)
    elif expected == "drop":
        assert received is None and conn.state is CLOSED
    else:
        assert (not isinstance(received, Goodbye) and received is not None) or kind == "status"
        after = state if expected == "ok" else State(expected.removeprefix("-> "))
        assert conn.state is after


@pytest.mark.parametrize(
    ("state", "sender", "kind"), CELLS, ids=[f"{s}-{r}-{k}" for s, r, k in CELLS]
)
def test_sending(state: State, sender: Role, kind: str) -> None:
    """The sending side checks its own messages against the same cell: what the peer
    would refuse is a bug here (raised), what a closed connection would drop is dropped."""
    expected = EXPECTED[(state, sender)][kind]
    conn = _side(sender, state)
    if isinstance(expected, int):
        with pytest.raises(NotAllowedToSend):
            conn.send(SAMPLES[sender][kind])
    elif expected == "drop":
        assert conn.send(SAMPLES[sender][kind]) is None
    else:
        assert conn.send(SAMPLES[sender][kind]) == codec.encode(SAMPLES[sender][kind])


@pytest.mark.parametrize("version", ["1.0", "1.5"])
def test_console_messages_and_streams_need_1_6(version: str) -> None:
    """A device console's output stream and the console messages are 1.6: a peer that
    negotiated less may not send them (protocol_error 1007, naming the version)."""
    console_output = Output(
        seq=1, job_id="j", attempt=1, stream="console:board-1", offset=0, data=b"x"
    )
    for sent in (console_output, SAMPLES[SUP]["console_data"], SAMPLES[SUP]["console_closed"]):
        conn = Connection(SB)
        conn.receive(codec.encode(Hello(supervisor_id="h", name="h", versions=[version])))
        conn.welcome(
            session=1, stored_seq=0, heartbeat_interval_s=5, heartbeat_timeout_s=20, enrolled=False
        )
        goodbye = conn.receive(codec.encode(sent))
        assert isinstance(goodbye, Goodbye) and goodbye.code == CloseCode.INVALID_PAYLOAD
        assert "1.6" in goodbye.reason and version in goodbye.reason, goodbye.reason
    for sent in (SAMPLES[SB]["console_attach"], SAMPLES[SB]["console_input"]):
        conn = Connection(SUP, backlog=EventBacklog())
        conn.send(Hello(supervisor_id="h", name="h", versions=[version]))
        conn.receive(codec.encode(Welcome(version=version, session=1, last_seq=0)))
        goodbye = conn.receive(codec.encode(sent))
        assert isinstance(goodbye, Goodbye) and goodbye.code == CloseCode.INVALID_PAYLOAD
    # The same on 1.6, and plain streams on any version, are accepted.
    conn = _switchboard_side(EST)
    assert conn.receive(codec.encode(console_output)) == console_output


def test_a_bad_frame_is_a_protocol_error_and_the_close_in_any_live_state() -> None:
    for state in (HELLO_, WELCOME_, EST):
        conn = _switchboard_side(state)
        goodbye = conn.receive(b'{"type":"state","seq":"one"}')
        assert isinstance(goodbye, Goodbye) and goodbye.code == CloseCode.INVALID_PAYLOAD
        assert "$.seq" in goodbye.reason and conn.state is CLOSED
        assert conn.receive(codec.encode(SAMPLES[SUP]["heartbeat"])) is None


def test_fail_once_and_the_close_reason_fits_a_close_frame() -> None:
    conn = _switchboard_side(EST)
    goodbye = conn.fail(CloseCode.TOO_SLOW, "é" * 200, retry_after_s=2.0)
    assert goodbye is not None and len(goodbye.close_reason.encode()) <= 123
    assert codec.decode_from_switchboard(goodbye.frame) == ProtocolErrorMessage(
        code=4005, reason="é" * 200, retry_after_s=2.0
    )
    assert conn.fail(CloseCode.NORMAL, "again") is None


# --- version negotiation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "agreed"),
    [
        (["1.0"], "1.0"),
        (["1.1", "1.0"], "1.1"),
        (["1.2"], "1.2"),
        (["1.3", "1.2"], "1.3"),
        (["1.4", "1.3"], "1.4"),
        (["1.5", "1.4"], "1.5"),
        (["1.6", "1.5"], "1.6"),
        (["1.9", "junk"], "1.6"),
        (["2.0"], None),
    ],
)
def test_version_negotiation(offered: list[str], agreed: str | None) -> None:
    conn = Connection(SB)
    received = conn.receive(codec.encode(Hello(supervisor_id="h", name="h", versions=offered)))
    if agreed is None:
        assert isinstance(received, Goodbye) and received.code == CloseCode.UNSUPPORTED_VERSION
        return
    assert isinstance(received, Hello)
    frame = conn.welcome(
        session=3, stored_seq=9, heartbeat_interval_s=5, heartbeat_timeout_s=20, enrolled=False
    )
    assert frame is not None
    welcome = codec.decode_from_switchboard(frame)
    assert isinstance(welcome, Welcome) and welcome.version == agreed and welcome.last_seq == 9


# --- the switchboard: duplicates, acks, when to reconcile --------------------------------


def _event(seq: int, job: str = "j") -> JobStateChanged:
    return JobStateChanged(seq=seq, job_id=job, attempt=1, phase=Phase.RUNNING)


def _established(hello_last_seq: int = 0, stored_seq: int = 0) -> Connection:
    conn = Connection(SB)
    hello = Hello(supervisor_id="h", name="h", versions=["1.1"], last_seq=hello_last_seq)
    conn.receive(codec.encode(hello))
    conn.welcome(
        session=1,
        stored_seq=stored_seq,
        heartbeat_interval_s=5,
        heartbeat_timeout_s=20,
        enrolled=False,
    )
    return conn


def test_duplicates_are_handed_over_but_not_counted_fresh() -> None:
    conn = _established(stored_seq=5)
    fresh, after = conn.hand_over([_event(3), _event(5), _event(6), _event(7)])
    assert [e.seq for e in fresh] == [6, 7] and after == 5
    fresh, after = conn.hand_over([_event(7), _event(8)])
    assert [e.seq for e in fresh] == [8] and after == 7


def test_ack_and_reconcile_once_everything_before_the_hello_is_stored() -> None:
    conn = _established(hello_last_seq=10, stored_seq=4)
    assert not conn.reconcile_due()
    assert codec.decode_from_switchboard(conn.acknowledge(9) or b"") == Ack(seq=9)
    assert not conn.reconcile_due()
    conn.acknowledge(10)
    assert conn.reconcile_due()
    assert not conn.reconcile_due()  # once


def test_a_hello_with_nothing_unstored_reconciles_at_once() -> None:
    assert _established(hello_last_seq=3, stored_seq=7).reconcile_due()


def test_a_status_reply_waits_for_the_events_before_it() -> None:
    conn = _established()
    request = codec.decode_from_switchboard(conn.status_request() or b"")
    assert isinstance(request, StatusRequest)
    conn.receive(codec.encode(_event(5, "before")))
    reply = StatusReply(request_id=request.request_id, runs=[HeldRun("x", 1, Phase.RUNNING)])
    assert conn.receive(codec.encode(reply)) == reply
    conn.receive(codec.encode(_event(6, "after")))
    assert conn.status_due() is None  # seq 5 is not stored yet
    conn.acknowledge(5)
    assert conn.status_due() == reply
    assert conn.status_newer() == {("after", 1)}
    assert conn.status_due() is None  # once


def test_events_received_while_a_reply_is_checked_are_newer_than_it() -> None:
    """The store is read after the reply is given, and the events that arrive meanwhile
    are stored meanwhile: a run whose first events came then looks started in what is
    read, though the reply (rightly) did not list it. It must count as newer."""
    conn = _established()
    request = codec.decode_from_switchboard(conn.status_request() or b"")
    assert isinstance(request, StatusRequest)
    reply = StatusReply(request_id=request.request_id)
    conn.receive(codec.encode(reply))
    assert conn.status_due() == reply
    conn.receive(codec.encode(_event(1, "started-since")))
    conn.acknowledge(1)
    assert conn.status_newer() == {("started-since", 1)}
    conn.status_checked()
    conn.receive(codec.encode(_event(2, "later")))
    request = codec.decode_from_switchboard(conn.status_request() or b"")
    assert isinstance(request, StatusRequest)
    conn.receive(codec.encode(StatusReply(request_id=request.request_id)))
    conn.acknowledge(2)
    assert conn.status_due() is not None
    assert conn.status_newer() == frozenset()  # each reply counts from its own arrival


def test_one_reply_is_checked_at_a_time() -> None:
    """A reply due while another is being checked waits for that check to end, and
    counts its own newer runs meanwhile."""
    conn = _established()
    conn.status_request()
    conn.receive(codec.encode(StatusReply(request_id=1)))
    assert conn.status_due() is not None
    conn.status_request()
    conn.receive(codec.encode(StatusReply(request_id=2)))
    conn.receive(codec.encode(_event(1, "during")))
    conn.acknowledge(1)
    assert conn.status_due() is None  # the first is still being checked
    conn.status_checked()
    assert conn.status_due() == StatusReply(request_id=2)
    assert conn.status_newer() == {("during", 1)}


def test_a_status_reply_to_an_older_request_is_ignored() -> None:
    conn = _established()
    conn.status_request()
    conn.status_request()
    assert conn.receive(codec.encode(StatusReply(request_id=1))) is None
    assert conn.status_due() is None
    assert conn.receive(codec.encode(StatusReply(request_id=2))) == StatusReply(request_id=2)
    assert conn.status_due() is not None


# --- the supervisor: backlog, resends, acks, status replies in order -----------------------


def _welcomed(backlog: EventBacklog, last_seq: int) -> Connection:
    conn = Connection(SUP, backlog=backlog)
    conn.send(SAMPLES[SUP]["hello"])
    welcome = Welcome(version="1.1", session=1, last_seq=last_seq)
    assert conn.receive(codec.encode(welcome)) == welcome
    return conn


def test_events_before_the_first_welcome_are_numbered_after_its_last_seq() -> None:
    backlog = EventBacklog()
    backlog.report(_event(0, "a"))
    backlog.report(_event(0, "b"))
    assert [e.job_id for e in backlog.held] == ["a", "b"] and len(backlog) == 0
    conn = _welcomed(backlog, 7)
    assert [seq for seq, _ in conn.outgoing(10)] == [8, 9]
    assert not backlog.holding


def test_nothing_goes_out_before_the_welcome() -> None:
    backlog = EventBacklog()
    backlog.resume(0)
    backlog.report(_event(0))
    conn = Connection(SUP, backlog=backlog)
    assert conn.outgoing(10) == []
    conn.send(SAMPLES[SUP]["hello"])
    assert conn.outgoing(10) == []


def test_acks_forget_and_a_reconnect_resends_what_is_not_stored() -> None:
    backlog = EventBacklog()
    first = _welcomed(backlog, 0)
    for job in "abc":
        backlog.report(_event(0, job))
    assert [seq for seq, _ in first.outgoing(10)] == [1, 2, 3]
    assert [first.sent(seq) for seq in (1, 2, 3)] == [False, False, False]
    assert first.outgoing(10) == []
    acked = first.receive(codec.encode(Ack(seq=2)))
    assert isinstance(acked, Acknowledged) and acked.dropped == 2 and acked.freed_bytes > 0
    second = _welcomed(backlog, 2)  # a reconnect: the switchboard had stored up to 2
    assert [seq for seq, _ in second.outgoing(10)] == [3]
    assert second.sent(3) is True  # a resend


def test_a_status_reply_goes_out_after_the_events_numbered_before_it() -> None:
    backlog = EventBacklog()
    conn = _welcomed(backlog, 0)
    for job in "ab":
        backlog.report(_event(0, job))
    conn.sent(1)  # 1 went out, 2 not yet
    conn.status_reply(StatusRequest(request_id=4), [HeldRun("b", 1, Phase.RUNNING)])
    backlog.report(_event(0, "c"))
    out = conn.outgoing(10)
    assert [seq for seq, _ in out] == [2, None, 3]
    reply = codec.decode_from_supervisor(out[1][1])
    assert isinstance(reply, StatusReply) and reply.request_id == 4 and reply.running == 1


def test_a_status_reply_with_nothing_pending_goes_out_at_once() -> None:
    conn = _welcomed(EventBacklog(), 0)
    conn.status_reply(StatusRequest(request_id=1), [])
    assert [seq for seq, _ in conn.outgoing(10)] == [None]


def test_a_status_reply_does_not_wait_for_events_acknowledged_on_an_earlier_connection() -> None:
    """A switchboard restored from an older copy welcomes with a last_seq below events it
    acknowledged before: those are not held any more and never go out again, so the
    reply must not wait for them (docs/protocol.md §6.6)."""
    backlog = EventBacklog()
    first = _welcomed(backlog, 0)
    for job in "abc":
        backlog.report(_event(0, job))
    for seq in (1, 2, 3):
        first.sent(seq)
    first.receive(codec.encode(Ack(seq=3)))
    restored = _welcomed(backlog, 1)  # it has stored only seq 1
    restored.status_reply(StatusRequest(request_id=1), [])
    assert [seq for seq, _ in restored.outgoing(10)] == [None]
    backlog.report(_event(0, "d"))
    assert [seq for seq, _ in restored.outgoing(10)] == [4]  # numbering goes on


def test_a_hello_ahead_of_the_store_is_settled_by_a_status_reply() -> None:
    """Events the Hello counts but the store lacks may still come (resent) or never (the
    store restored from an older copy): the first reply settles it, once."""
    conn = _established(hello_last_seq=10, stored_seq=4)
    assert conn.behind_hello() and not conn.reconcile_due()
    request = codec.decode_from_switchboard(conn.status_request() or b"")
    assert isinstance(request, StatusRequest)
    reply = StatusReply(request_id=request.request_id, runs=[])
    conn.receive(codec.encode(reply))
    assert conn.status_due() == reply
    assert conn.reconcile_by_status()
    assert not conn.reconcile_by_status()  # once
    conn.status_checked()
    conn.acknowledge(11)
    assert not conn.reconcile_due()  # settled by the reply already


# --- the contract --------------------------------------------------------------------------


def test_the_rules_are_of_the_three_kinds() -> None:
    for senders in TABLE.values():
        for cells in senders.values():
            assert all(isinstance(rule, Allow | Refuse | Drop) for rule in cells.values())


def test_docs_show_the_table() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    assert table_markdown() in doc
