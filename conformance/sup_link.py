"""One established connection with the supervisor under test, as the kit's switchboard
sees it: the handshake, a ledger of every event by `seq` (which catches gaps, reuse and
resends of what was acknowledged), acknowledgements on demand or automatic, and waiting
for what a scenario expects.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeGuard, get_args

from protocol.exceptions import FrameError
from protocol.messages import (
    Ack,
    EventProblem,
    FromSupervisor,
    Heartbeat,
    Hello,
    JobStateChanged,
    StatusReply,
    StatusRequest,
    SupervisorEvent,
    Welcome,
)
from protocol.state import is_terminal
from protocol.versions import minor_of, negotiate_version

from .sup_server import BadFrame, Closed, Peer, PeerTimeout

#: What the kit's welcome asks for: short, so the heartbeat check takes little time.
HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_TIMEOUT_S = 10.0
#: §4 step 1: the hello must come within 10 s of the upgrade.
HELLO_TIMEOUT_S = 10.0

#: Every kind of event (protocol.messages' own list: a kind added there is one here).
EVENT_TYPES: tuple[type, ...] = get_args(SupervisorEvent)


class KitFailure(Exception):
    """A check cannot go on: the message says what was seen instead of what was expected."""


@dataclass
class Ledger:
    """Every event one supervisor process sent, by seq, across its connections."""

    events: dict[int, SupervisorEvent] = field(default_factory=dict)
    #: Highest seq seen.
    highest: int = 0
    #: Highest seq the kit has acknowledged (or says it stored, in a welcome).
    stored: int = 0
    resent: int = 0
    violations: list[str] = field(default_factory=list)

    def record(self, event: SupervisorEvent, floor: int) -> None:
        """Note one event that came on a connection whose welcome said `floor`."""
        seq = event.seq
        if seq <= floor:
            self.violations.append(f"seq {seq} sent though welcome.last_seq was {floor}")
        if seq in self.events:
            self.resent += 1
            if self.events[seq] != event:
                self.violations.append(f"seq {seq} reused for another event")
            return
        if seq != self.highest + 1:
            self.violations.append(f"seq {seq} after {self.highest} (a gap or disorder)")
        self.events[seq] = event
        self.highest = max(self.highest, seq)


def is_event(message: object) -> TypeGuard[SupervisorEvent]:
    return isinstance(message, EVENT_TYPES)


def of_run(job_id: str, attempt: int = 1) -> Callable[[FromSupervisor], bool]:
    def match(message: FromSupervisor) -> bool:
        return is_event(message) and (message.job_id, message.attempt) == (job_id, attempt)

    return match


async def read_hello(peer: Peer, timeout_s: float = HELLO_TIMEOUT_S) -> Hello:
    """The connection's first message, which must be a valid hello."""
    try:
        first = await peer.next(timeout_s)
    except PeerTimeout:
        raise KitFailure(f"no hello within {timeout_s:g} s of the upgrade") from None
    if isinstance(first, BadFrame):
        raise KitFailure(f"the first message is not a valid hello: {first.reason}")
    if isinstance(first, Closed):
        raise KitFailure(f"the supervisor closed before its hello ({first.code} {first.reason})")
    if not isinstance(first, Hello):
        raise KitFailure(f"the first message is {type(first).__name__}, not hello")
    return first


@dataclass(eq=False)
class Link:
    """An established connection: hello read, welcome sent."""

    peer: Peer
    hello: Hello
    welcome: Welcome
    ledger: Ledger
    #: Acknowledge every event as it arrives (as a switchboard storing at once would).
    auto_ack: bool = True
    #: Events in the order they came on this connection (resends included).
    events: list[SupervisorEvent] = field(default_factory=list)
    heartbeats: list[float] = field(default_factory=list)
    #: Messages read while waiting for something else, kept for a later wait.
    pending: list[FromSupervisor] = field(default_factory=list)
    welcomed_at: float = 0.0

    @property
    def minor(self) -> int:
        return minor_of(self.welcome.version)

    async def _observe(self, message: FromSupervisor) -> None:
        if isinstance(message, Heartbeat):
            self.heartbeats.append(time.monotonic())
        elif is_event(message):
            self.ledger.record(message, self.welcome.last_seq)
            self.events.append(message)
            if self.auto_ack:
                await self.ack_all()

    async def ack_all(self, problems: list[EventProblem] | None = None) -> None:
        """Acknowledge everything seen so far."""
        self.ledger.stored = max(self.ledger.stored, self.ledger.highest)
        await self.peer.send(Ack(seq=self.ledger.stored, problems=problems or []))

    async def _read(self, left: float, what: str) -> FromSupervisor | None:
        """The next message but heartbeats, None when `left` runs out."""
        while True:
            try:
                if left <= 0:
                    return None
                start = time.monotonic()
                item = await self.peer.next(left)
            except PeerTimeout:
                return None
            if isinstance(item, BadFrame):
                raise KitFailure(f"an invalid message while waiting for {what}: {item.reason}")
            if isinstance(item, Closed):
                raise KitFailure(
                    f"the supervisor closed the connection ({item.code} {item.reason!r})"
                    f" while the kit waited for {what}"
                )
            if not isinstance(item, Heartbeat):
                return item
            left -= time.monotonic() - start

    async def expect(
        self, match: Callable[[FromSupervisor], bool], timeout_s: float, what: str
    ) -> FromSupervisor:
        """The first message (kept or new) that `match`es; KitFailure naming `what` if none
        comes within `timeout_s`, or the connection ends, or a bad frame comes first."""
        for index, message in enumerate(self.pending):
            if match(message):
                return self.pending.pop(index)
        deadline = time.monotonic() + timeout_s
        while True:
            item = await self._read(deadline - time.monotonic(), what)
            if item is None:
                raise KitFailure(f"no {what} within {timeout_s:g} s")
            if match(item):
                return item
            self.pending.append(item)

    async def idle(self, seconds: float, what: str = "the pause to end") -> None:
        """Read (and keep) whatever comes for `seconds`; KitFailure if the link ends."""
        deadline = time.monotonic() + seconds
        while (item := await self._read(deadline - time.monotonic(), what)) is not None:
            self.pending.append(item)

    def take(self, match: Callable[[FromSupervisor], bool]) -> list[FromSupervisor]:
        """Remove and return the kept messages that `match`."""
        taken = [m for m in self.pending if match(m)]
        self.pending = [m for m in self.pending if not match(m)]
        return taken

    async def until_end(
        self, job_id: str, timeout_s: float, attempt: int = 1
    ) -> list[SupervisorEvent]:
        """The run's events from now (and those kept) up to its terminal state."""
        return await self._run_events(job_id, attempt, None, timeout_s)

    async def until_phase(
        self, job_id: str, phase: str, timeout_s: float, attempt: int = 1
    ) -> list[SupervisorEvent]:
        """The run's events up to the state `phase` (KitFailure if it ends first)."""
        return await self._run_events(job_id, attempt, phase, timeout_s)

    async def _run_events(
        self, job_id: str, attempt: int, phase: str | None, timeout_s: float
    ) -> list[SupervisorEvent]:
        """The run's events up to the state `phase`, or (None) to its terminal state."""
        wanted = f"state {phase}" if phase is not None else "the end"
        deadline = time.monotonic() + timeout_s
        events: list[SupervisorEvent] = []
        while True:
            left = max(0.0, deadline - time.monotonic())
            event = await self.expect(
                of_run(job_id, attempt), left, f"{wanted} of run {job_id}#{attempt}"
            )
            assert is_event(event)
            events.append(event)
            if not isinstance(event, JobStateChanged):
                continue
            if event.phase == phase:
                return events
            if is_terminal(event.phase):
                if phase is None:
                    return events
                raise KitFailure(f"run {job_id}#{attempt} ended {event.phase} before {phase}")

    async def status(self, request_id: int, timeout_s: float = 3.0) -> StatusReply:
        await self.peer.send(StatusRequest(request_id=request_id))
        reply = await self.expect(
            lambda m: isinstance(m, StatusReply) and m.request_id == request_id,
            timeout_s,
            f"status answering status_request {request_id}",
        )
        assert isinstance(reply, StatusReply)
        return reply


async def establish(
    peer: Peer, hello: Hello, ledger: Ledger, session: int, last_seq: int | None = None
) -> Link:
    """Answer `hello` with a welcome (the highest version both speak; `last_seq`: what
    the kit says it stored, by default all it acknowledged) and start heartbeats."""
    try:
        version = negotiate_version(hello.versions)
    except FrameError as exc:
        raise KitFailure(f"hello.versions {hello.versions}: {exc.reason}") from None
    stored = ledger.stored if last_seq is None else last_seq
    ledger.stored = stored
    welcome = Welcome(
        version=version,
        session=session,
        last_seq=stored,
        heartbeat_interval_s=HEARTBEAT_INTERVAL_S,
        heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S,
    )
    link = Link(peer, hello, welcome, ledger)
    peer.observer = link._observe
    await peer.send(welcome)
    link.welcomed_at = time.monotonic()
    peer.start_heartbeats(HEARTBEAT_INTERVAL_S)
    return link
