"""The supervisor connection as a state machine without I/O: frames in, messages out.

One `Connection` per WebSocket, on each side: role SWITCHBOARD on the switchboard, role
SUPERVISOR in a supervisor. The code that owns the socket (a pump) hands every frame it
reads to `receive` and sends only frames the Connection gave it (`send`, `welcome`,
`fail`, ...). Whether a message may come or go at this point of the connection is decided
in one place, the table `TABLE`: connection state x sending side x message kind -> what
happens. A message the table refuses ends the connection the one way every refusal does
(`fail`: a protocol_error naming the problem, then the close with its code). The
sequencing rules of events live here too (with the parts in protocol.sequencing): the
supervisor resends what the Welcome says is not stored, the switchboard filters
duplicates, acknowledges what is stored, and reconciles once it has stored everything the
supervisor had sent before its Hello.

States, in order (a connection never goes back):

    awaiting_hello -> awaiting_welcome -> established -> closed
           \\________________\\________________________/

`closed` is reached by a protocol_error either way (sent with `fail`, or received) or
when the socket is gone (`lost`); nothing is accepted or sent after it.
"""

from __future__ import annotations

import enum
import typing
from collections import deque
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import msgspec

from . import codec
from .exceptions import CloseCode, FrameError, SwitchboardProtocolError
from .limits import console_device
from .messages import (
    Ack,
    ConsoleAttach,
    ConsoleClosed,
    ConsoleData,
    ConsoleDetach,
    ConsoleInput,
    Event,
    EventProblem,
    FromSupervisor,
    FromSwitchboard,
    HeldRun,
    Hello,
    Output,
    ProtocolErrorMessage,
    StatusReply,
    StatusRequest,
    Welcome,
)
from .sequencing import EventBacklog, InboundSequence
from .versions import ACK_PROBLEMS_MINOR, CONSOLE_MINOR, minor_of, negotiate_version


class Role(enum.StrEnum):
    """Which side of the connection: also who sends a message."""

    SUPERVISOR = "supervisor"
    SWITCHBOARD = "switchboard"


class State(enum.StrEnum):
    AWAITING_HELLO = "awaiting_hello"
    AWAITING_WELCOME = "awaiting_welcome"
    ESTABLISHED = "established"
    CLOSED = "closed"


class Allow(NamedTuple):
    """The message may come (or go); the connection then is in `then` (None: unchanged)."""

    then: State | None = None


class Refuse(NamedTuple):
    """The message may not come at this point: protocol_error + close with `code`."""

    code: CloseCode
    reason: str


class Drop(NamedTuple):
    """Ignored: the connection is closed, nothing more is read or sent."""


Rule = Allow | Refuse | Drop


def _tag(cls: type) -> str:
    tag: str = cls.__struct_config__.tag  # type: ignore[attr-defined]
    return tag


#: Message kinds (the wire's `type` tags) each side sends, from the unions in messages.py.
KINDS: dict[Role, tuple[str, ...]] = {
    Role.SUPERVISOR: tuple(_tag(t) for t in typing.get_args(FromSupervisor)),
    Role.SWITCHBOARD: tuple(_tag(t) for t in typing.get_args(FromSwitchboard)),
}
_KIND: dict[type, str] = {
    t: _tag(t) for t in (*typing.get_args(FromSupervisor), *typing.get_args(FromSwitchboard))
}


def _row(sender: Role, cells: dict[str, Rule], otherwise: Rule) -> dict[str, Rule]:
    unknown = cells.keys() - set(KINDS[sender])
    assert not unknown, f"{sender} sends no {unknown}"
    return {kind: cells.get(kind, otherwise) for kind in KINDS[sender]}


#: The messages of the interactive console (1.6): refused on an older connection.
_CONSOLE_MESSAGES = (ConsoleAttach, ConsoleInput, ConsoleDetach, ConsoleData, ConsoleClosed)

_GIVES_UP = Allow(State.CLOSED)  # a protocol_error: its sender closes next
_FIRST_HELLO = Refuse(CloseCode.HANDSHAKE_FAILED, "the first message must be hello")
_BEFORE_HELLO = Refuse(CloseCode.HANDSHAKE_FAILED, "nothing but protocol_error before hello")
_EXPECTED_WELCOME = Refuse(CloseCode.HANDSHAKE_FAILED, "expected welcome")
_BEFORE_WELCOME = Refuse(CloseCode.UNEXPECTED_MESSAGE, "nothing may follow hello before welcome")

#: state -> sender -> message kind -> rule. The only place that says which message may
#: come when; docs/protocol.md §4.2 shows it (a test checks they agree).
TABLE: dict[State, dict[Role, dict[str, Rule]]] = {
    State.AWAITING_HELLO: {
        Role.SUPERVISOR: _row(
            Role.SUPERVISOR, {"hello": Allow(State.AWAITING_WELCOME)}, _FIRST_HELLO
        ),
        # The switchboard speaks only to refuse (e.g. no hello in time).
        Role.SWITCHBOARD: _row(Role.SWITCHBOARD, {"protocol_error": _GIVES_UP}, _BEFORE_HELLO),
    },
    State.AWAITING_WELCOME: {
        Role.SUPERVISOR: _row(
            Role.SUPERVISOR,
            {
                "hello": Refuse(CloseCode.UNEXPECTED_MESSAGE, "second hello"),
                "protocol_error": _GIVES_UP,
            },
            _BEFORE_WELCOME,
        ),
        Role.SWITCHBOARD: _row(
            Role.SWITCHBOARD,
            {"welcome": Allow(State.ESTABLISHED), "protocol_error": _GIVES_UP},
            _EXPECTED_WELCOME,
        ),
    },
    State.ESTABLISHED: {
        Role.SUPERVISOR: _row(
            Role.SUPERVISOR,
            {
                "hello": Refuse(CloseCode.UNEXPECTED_MESSAGE, "hello after the handshake"),
                "protocol_error": _GIVES_UP,
            },
            Allow(),
        ),
        Role.SWITCHBOARD: _row(
            Role.SWITCHBOARD,
            {
                "welcome": Refuse(CloseCode.UNEXPECTED_MESSAGE, "second welcome"),
                "protocol_error": _GIVES_UP,
            },
            Allow(),
        ),
    },
    State.CLOSED: {role: _row(role, {}, Drop()) for role in Role},
}


class NotAllowedToSend(SwitchboardProtocolError):
    """This side tried to send a message the table does not allow now: a bug on this side
    (the peer would close the connection for it)."""


class Goodbye(NamedTuple):
    """How this side ends the connection: send `frame` (a protocol_error saying `reason`),
    then close with `code` and `close_reason` (the reason cut to fit a close frame)."""

    frame: bytes
    code: CloseCode
    reason: str
    close_reason: str


class Acknowledged(NamedTuple):
    """An Ack arrived (supervisor side): `dropped` events and `freed_bytes` of the backlog
    are forgotten; `problems`: what the switchboard did not take as sent."""

    seq: int
    dropped: int
    freed_bytes: int
    problems: list[EventProblem]


#: What `receive` gives the pump: a message to act on, an Ack applied, a Goodbye to send
#: (the frame was refused), or None (nothing to do).
Received = FromSupervisor | FromSwitchboard | Acknowledged | Goodbye | None


class Connection:
    """One side of one supervisor connection. See the module docstring."""

    # A switchboard holds one per connected supervisor: no per-instance dict.
    __slots__ = (
        "_checking",
        "_decode",
        "_inbound",
        "_received_seq",
        "_reconciled",
        "_replies",
        "_reply",
        "_reply_upto",
        "_request_id",
        "_sent_upto",
        "_status_pending",
        "_stored_seq",
        "_touched",
        "backlog",
        "hello",
        "peer",
        "role",
        "state",
        "version",
    )

    def __init__(self, role: Role, *, backlog: EventBacklog | None = None) -> None:
        if (role is Role.SUPERVISOR) != (backlog is not None):
            raise ValueError("a supervisor's connection needs its backlog, and only it")
        self.role = role
        self.peer = Role.SWITCHBOARD if role is Role.SUPERVISOR else Role.SUPERVISOR
        self.state = State.AWAITING_HELLO
        self._decode = {
            Role.SWITCHBOARD: codec.decode_from_supervisor,
            Role.SUPERVISOR: codec.decode_from_switchboard,
        }[role]
        #: The version both speak (from the Hello on the switchboard, the Welcome in a
        #: supervisor); None until then.
        self.version: str | None = None
        #: The Hello (switchboard side, once received).
        self.hello: Hello | None = None
        # supervisor side: the backlog, and the highest seq sent on this connection.
        self.backlog = backlog
        self._sent_upto = 0
        #: StatusReplies waiting for the events numbered before them to go out first.
        #: (None until the first: most connections never hold one, and a deque is large.)
        self._replies: deque[tuple[int, bytes]] | None = None
        # switchboard side: the duplicate filter, the highest seq stored and received,
        # whether reconciliation was due yet, the StatusRequest waiting for its reply, a
        # reply waiting for the events before it to be stored (with the runs that had
        # events after it: the reply is out of date for them), and the same for the reply
        # being checked (None: none is).
        self._inbound = InboundSequence(0)
        self._stored_seq = 0
        self._received_seq = 0
        self._reconciled = False
        self._request_id = 0
        self._status_pending: int | None = None
        self._reply: StatusReply | None = None
        self._reply_upto = 0
        self._touched: set[tuple[str, int]] | None = None
        self._checking: set[tuple[str, int]] | None = None

    # --- the table ---------------------------------------------------------------------

    def rule(self, sender: Role, kind: str) -> Rule:
        return TABLE[self.state][sender][kind]

    def _enter(self, rule: Allow) -> None:
        if rule.then is not None:
            self.state = rule.then

    def receive(self, frame: bytes | str) -> Received:
        """Take one frame from the peer."""
        if self.state is State.CLOSED:
            return None
        try:
            message = self._decode(frame)
        except FrameError as exc:
            return self.fail(exc.code, exc.reason)
        rule = TABLE[self.state][self.peer][_KIND[type(message)]]
        if isinstance(rule, Refuse):
            return self.fail(rule.code, rule.reason)
        if isinstance(rule, Drop):
            return None
        if (too_new := self._too_new(message)) is not None:
            return self.fail(CloseCode.INVALID_PAYLOAD, too_new)
        self._enter(rule)
        match message:
            case Event(seq=seq):
                if seq > self._received_seq:
                    self._received_seq = seq
                run = (message.job_id, message.attempt)
                if self._touched is not None:
                    self._touched.add(run)
                if self._checking is not None:
                    self._checking.add(run)
            case Hello():
                return self._hello(message)
            case Welcome():
                assert self.backlog is not None
                self.version = message.version
                self.backlog.resume(message.last_seq)
                self._sent_upto = message.last_seq  # what is above it is sent (again)
            case Ack(seq=seq):
                assert self.backlog is not None
                before = self.backlog.size_bytes
                dropped = self.backlog.acknowledge(seq)
                freed = before - self.backlog.size_bytes
                return Acknowledged(seq, dropped, freed, message.problems)
            case StatusReply(request_id=request_id):
                if request_id != self._status_pending:
                    return None  # an answer to a request superseded since: out of date
                self._status_pending = None
                # It speaks of the time it was sent: after the events received before it.
                self._reply, self._reply_upto = message, self._received_seq
                self._touched = set()
        return message

    def _too_new(self, message: msgspec.Struct) -> str | None:
        """Why `message` may not come on this connection: it is of a protocol minor
        newer than the one negotiated (None: it may)."""
        if self.version is None or self._speaks(CONSOLE_MINOR):
            return None
        if isinstance(message, Output) and console_device(message.stream) is not None:
            return (
                f"output stream {message.stream!r}: device console streams need protocol"
                f" 1.{CONSOLE_MINOR}, this connection speaks {self.version}"
            )
        if isinstance(message, _CONSOLE_MESSAGES):
            return (
                f"{_KIND[type(message)]} needs protocol 1.{CONSOLE_MINOR},"
                f" this connection speaks {self.version}"
            )
        return None

    def may_send(self, kind: str) -> bool:
        """True if this side may send a message of `kind` now; False once closed (what is
        not sent is settled by the next connection). Raises NotAllowedToSend for a message
        the table refuses here."""
        rule = TABLE[self.state][self.role][kind]
        if isinstance(rule, Refuse):
            raise NotAllowedToSend(f"{self.role} may not send {kind} while {self.state}")
        if isinstance(rule, Drop):
            return False
        self._enter(rule)
        return True

    def send(self, message: msgspec.Struct) -> bytes | None:
        """The encoded message, or None if the connection is closed (dropped)."""
        if not self.may_send(_KIND[type(message)]):
            return None
        return codec.encode(message)

    def fail(
        self, code: CloseCode, reason: str, retry_after_s: float | None = None
    ) -> Goodbye | None:
        """End the connection: a protocol_error saying why, then the close. None if it is
        already closed (the first reason stands)."""
        if self.state is State.CLOSED:
            return None
        self.state = State.CLOSED
        message = ProtocolErrorMessage(code=int(code), reason=reason, retry_after_s=retry_after_s)
        close_reason = FrameError(code, reason).close_reason()
        return Goodbye(codec.encode(message), code, reason, close_reason)

    def lost(self) -> None:
        """The socket is gone: nothing more is read or sent."""
        self.state = State.CLOSED

    # --- switchboard side --------------------------------------------------------------

    def _hello(self, hello: Hello) -> Hello | Goodbye | None:
        try:
            self.version = negotiate_version(hello.versions)
        except FrameError as exc:
            return self.fail(exc.code, exc.reason)
        self.hello = hello
        return hello

    def welcome(
        self,
        *,
        session: int,
        stored_seq: int,
        heartbeat_interval_s: float,
        heartbeat_timeout_s: float,
        enrolled: bool,
    ) -> bytes | None:
        """Accept the Hello: the Welcome, with the version negotiated and the highest seq
        stored (the supervisor resends what is above it)."""
        assert self.version is not None, "welcome before a hello"
        self._inbound = InboundSequence(stored_seq)
        self._stored_seq = stored_seq
        return self.send(
            Welcome(
                version=self.version,
                session=session,
                last_seq=stored_seq,
                heartbeat_interval_s=heartbeat_interval_s,
                heartbeat_timeout_s=heartbeat_timeout_s,
                enrolled=enrolled,
            )
        )

    def hand_over(self, batch: Sequence[Event]) -> tuple[list[Event], int]:
        """Events about to be given to the store: (those not given before, the highest seq
        given before). The store applies only events above that seq, so a resent event is
        never applied twice; the fresh ones are what is counted as new."""
        after = self._inbound.stored_seq
        fresh = []
        for event in batch:
            if self._inbound.is_new(event.seq):
                self._inbound.stored(event.seq)
                fresh.append(event)
        return fresh, after

    def acknowledge(self, stored_seq: int, problems: Sequence[EventProblem] = ()) -> bytes | None:
        """The Ack for everything up to `stored_seq`, now durable, naming the `problems`
        with those events to a peer whose version has the field (older ones are not told:
        the switchboard's log and metric still are)."""
        self._stored_seq = max(self._stored_seq, stored_seq)
        told = list(problems) if problems and self._speaks(ACK_PROBLEMS_MINOR) else []
        return self.send(Ack(seq=stored_seq, problems=told))

    def _speaks(self, minor: int) -> bool:
        return self.version is not None and minor_of(self.version) >= minor

    def reconcile_due(self) -> bool:
        """True once, when every event the supervisor had sent before its Hello is stored:
        only then is the store's view of its runs as fresh as the Hello's list."""
        assert self.hello is not None
        if self._reconciled or self._stored_seq < self.hello.last_seq:
            return False
        self._reconciled = True
        return True

    @property
    def stored_seq(self) -> int:
        """The highest seq of the supervisor's events known to be stored."""
        return self._stored_seq

    def behind_hello(self) -> bool:
        """True while less is stored than the Hello says the supervisor numbered: either
        the rest is on its way (resent), or the store lost it (restored from an older copy)
        and it never comes. A StatusReply tells them apart (`reconcile_by_status`)."""
        assert self.hello is not None
        return self._stored_seq < self.hello.last_seq

    def reconcile_by_status(self) -> bool:
        """A StatusReply is due (`status_due`) before reconciliation was: True once, then
        reconcile with the reply's runs instead of the Hello's. The supervisor sent the
        reply after every event it had, so whatever of the Hello's `last_seq` is still not
        stored never will be (docs/protocol.md §6.6)."""
        if self._reconciled:
            return False
        self._reconciled = True
        return True

    def status_due(self) -> StatusReply | None:
        """The latest StatusReply, once every event received before it is stored: the
        store's view of the supervisor's runs is then as of the reply, except for the runs
        with events since (`status_newer`). Given once, and not while another is being
        checked: from now until `status_checked`, this reply is being checked."""
        if self._checking is not None:
            return None
        if self._reply is None or self._stored_seq < self._reply_upto:
            return None
        reply, self._checking = self._reply, self._touched or set()
        self._reply, self._touched = None, None
        return reply

    def status_newer(self) -> frozenset[tuple[str, int]]:
        """The runs (job_id, attempt) with events received since the reply being checked:
        the reply is out of date for them (leave them be). Ask after reading the store,
        not before: events keep arriving and being stored while it is read, and each was
        received before it could be stored."""
        assert self._checking is not None, "no StatusReply is being checked"
        return frozenset(self._checking)

    def status_checked(self) -> None:
        """The reply `status_due` gave is settled: the next one may be given."""
        self._checking = None

    def status_request(self) -> bytes | None:
        """A StatusRequest; its reply supersedes any earlier one's (which is then ignored)."""
        self._request_id += 1
        frame = self.send(StatusRequest(request_id=self._request_id))
        if frame is not None:
            self._status_pending = self._request_id
        return frame

    # --- supervisor side ---------------------------------------------------------------

    def outgoing(self, limit: int) -> list[tuple[int | None, bytes]]:
        """What to send next, oldest first: up to `limit` events not sent on this connection
        yet (with their seq), and each StatusReply (seq None) right after the events
        numbered before it was made, so the switchboard never reads a reply that is ahead
        of the events that explain it."""
        assert self.backlog is not None
        if not isinstance(TABLE[self.state][self.role]["state"], Allow):
            return []  # events may not go out (yet, or any more)
        events = self.backlog.frames_after(self._sent_upto, limit)
        replies = self._replies
        if not replies:  # None or empty
            return events  # type: ignore[return-value]
        out: list[tuple[int | None, bytes]] = []
        for seq, frame in events:
            while replies and replies[0][0] < seq:
                out.append((None, replies.popleft()[1]))
            out.append((seq, frame))
        # A reply waits only for events still held: those numbered before it and no longer
        # held were acknowledged (stored) on an earlier connection, even if this switchboard
        # has lost them since (restored from an older copy, docs/protocol.md §6.6).
        every_event_out = len(events) < limit
        last = events[-1][0] if events else self._sent_upto
        while replies and (every_event_out or replies[0][0] <= last):
            out.append((None, replies.popleft()[1]))
        return out

    def sent(self, seq: int) -> bool:
        """Event `seq` was sent; True if it had been sent before (a resend)."""
        assert self.backlog is not None
        self._sent_upto = seq
        return self.backlog.sent(seq)

    def status_reply(self, request: StatusRequest, runs: Iterable[HeldRun]) -> None:
        """Answer a StatusRequest with the runs held now: the reply waits in `outgoing` for
        the events numbered so far (a run leaves `runs` only once its end is numbered)."""
        assert self.backlog is not None
        held = list(runs)
        frame = self.send(StatusReply(request_id=request.request_id, runs=held, running=len(held)))
        if frame is not None:
            if self._replies is None:
                self._replies = deque()
            self._replies.append((self.backlog.last_seq, frame))


def _describe(rule: Rule) -> str:
    match rule:
        case Allow(then=None):
            return "accepted"
        case Allow(then=then):
            return f"accepted, then `{then}`"
        case Refuse(code=code, reason=reason):
            return f"protocol_error + close {int(code)} ({reason})"
    return "ignored"


def table_markdown() -> str:
    """TABLE as the Markdown table docs/protocol.md shows (one row per state, sender and
    outcome, naming the message kinds it applies to)."""
    lines = ["| state | sent by | message kinds | outcome |", "|---|---|---|---|"]
    for state, senders in TABLE.items():
        for sender, cells in senders.items():
            outcomes: dict[str, list[str]] = {}
            for kind, rule in cells.items():
                outcomes.setdefault(_describe(rule), []).append(f"`{kind}`")
            for outcome, kinds in outcomes.items():
                names = "any" if len(kinds) == len(cells) else ", ".join(kinds)
                lines.append(f"| `{state}` | {sender} | {names} | {outcome} |")
    return "\n".join(lines) + "\n"
