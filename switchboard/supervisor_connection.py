"""One supervisor's live WebSocket on the switchboard: a pump between the socket, the
protocol's Connection (protocol.connection: which message may come when, duplicates,
acks, when to reconcile) and the store.

Its reader hands frames to the Connection and queues the events it lets through; its
applier hands whatever has gathered to the store as one batch (one transaction), and its
acknowledger sends one cumulative Ack per batch once the batch is stored, so
acknowledging never races ahead of durability. The next batch goes to the store while the
one before is still being committed (the store takes them in order and refuses a batch
whose predecessor failed), so a run's events that arrive a moment apart don't wait for two
commits one after the other. Everything sent goes through the connection's Outbox
(switchboard.outbox): nothing here waits on the socket to send.

A connection that ends, however it ends, ends as any other does: the store marks the
supervisor disconnected; its runs wait out the lost-after grace or are reconciled when it
is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Sequence
from typing import NamedTuple, Protocol

from litestar import WebSocket

from protocol import frames
from protocol.connection import Connection, Goodbye
from protocol.exceptions import CloseCode
from protocol.limits import console_device
from protocol.messages import (
    ConsoleAttach,
    ConsoleClosed,
    ConsoleData,
    ConsoleDetach,
    ConsoleInput,
    Event,
    HeldRun,
    Hello,
    Output,
    Power,
    PowerAction,
    PowerResult,
    ProtocolErrorMessage,
    RunRef,
    StatusReply,
    StopJob,
    SwitchboardMessage,
)
from protocol.spec import JobSpec
from protocol.state import Phase
from protocol.versions import CONSOLE_MINOR, minor_of
from switchboard import metrics, wsprotocol
from switchboard.config import Settings
from switchboard.lograte import RateLimitedLog
from switchboard.models import ActiveRun, EventsApplied, JobView, PendingReport
from switchboard.outbox import Outbox
from switchboard.reconcile import Action, Decision, drift, reconcile
from switchboard.store import fencing
from switchboard.store.base import Store

log = logging.getLogger("switchboard.connections")
#: A supervisor that keeps sending bad events (a bug) would fill the log: one line per
#: supervisor and problem per interval, the metric counting each.
_problem_log = RateLimitedLog(log)

#: Events waiting to be stored, per connection; a full queue stops reading the socket.
EVENT_QUEUE = 4096
#: Events stored per transaction at most.
MAX_BATCH = 1024
#: Batches of one connection handed to the store and not yet acknowledged, at most.
WRITES_IN_FLIGHT = 2
#: Power requests of one connection waiting for their answer, at most.
POWER_IN_FLIGHT = 16
#: Attached console sessions of one connection, at most.
CONSOLE_SESSIONS = 64
#: Runs whose granted devices one connection remembers (to check console streams).
GRANTS_KEPT = 256


class ConsolePeer(Protocol):
    """An attached console client (switchboard.console_relay): told what the supervisor
    sends for its session. Neither call may wait."""

    def feed(self, offset: int, data: bytes) -> None: ...

    def closed(self, reason: str) -> None: ...


class Fleet(Protocol):
    """What a connection needs of the hub that holds it."""

    store: Store
    settings: Settings
    #: Outboxes whose writer is running: the only ones the send deadline watch visits.
    writing: set[Outbox]

    def is_current(self, connection: SupervisorConnection) -> bool: ...

    def waited(self, job_id: str) -> bool: ...

    def jobs_ended(self, jobs: list[JobView]) -> None: ...

    def wake_dispatcher(self) -> None: ...

    def reports_stored(self, reports: list[PendingReport]) -> None: ...

    async def stored_run_refs(self, supervisor_id: str) -> set[RunRef]: ...

    async def start_frame(
        self,
        job_id: str,
        attempt: int,
        spec: JobSpec,
        minor: int | None = None,
        devices: Sequence[str] = (),
    ) -> bytes | None: ...


class PowerUnavailable(Exception):
    """A power request can't be sent on this connection: it is closing, or too many
    power requests to it are unanswered."""


class _Inbox:
    """Events on their way from a connection's reader to its applier (one of each): a list
    and at most one waiting side. An asyncio.Queue would do, at about 3 KiB a connection
    (four deques and an Event) on a switchboard holding thousands of idle ones."""

    __slots__ = ("_items", "_limit", "_putter", "_taker")

    def __init__(self, limit: int) -> None:
        self._items: list[Event] = []
        self._limit = limit
        self._taker: asyncio.Future[None] | None = None
        self._putter: asyncio.Future[None] | None = None

    async def put(self, event: Event) -> None:
        """Add an event; while `limit` are waiting, wait (the reader stops reading)."""
        while len(self._items) >= self._limit:
            self._putter = asyncio.get_running_loop().create_future()
            await self._putter
        self._items.append(event)
        _wake(self._taker)

    async def take(self, most: int) -> list[Event]:
        """The oldest events, at most `most`, once there is one."""
        while not self._items:
            self._taker = asyncio.get_running_loop().create_future()
            await self._taker
        batch = self._items[:most]
        del self._items[:most]
        _wake(self._putter)
        return batch

    def take_all(self) -> list[Event]:
        batch, self._items = self._items, []
        _wake(self._putter)
        return batch


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class _Write(NamedTuple):
    """A batch of events handed to the store, waiting to be acknowledged."""

    batch: list[Event]
    #: Its events not handed over before (the rest are resends).
    fresh: list[Event]
    result: Awaitable[EventsApplied]
    started: float


class SupervisorConnection:
    # One per connected supervisor, thousands at once: no per-instance dict.
    __slots__ = (
        "_acknowledger",
        "_beats",
        "_console_id",
        "_consoles",
        "_events",
        "_grants",
        "_last_heard",
        "_power_id",
        "_power_over",
        "_powering",
        "_room",
        "_writes",
        "closed_because",
        "enrolled",
        "fleet",
        "hello",
        "id",
        "last_heard_at",
        "opened_at",
        "outbox",
        "protocol",
        "ready",
        "session",
        "token_ids",
    )

    def __init__(
        self,
        fleet: Fleet,
        socket: WebSocket,
        protocol: Connection,
        hello: Hello,
        session: int,
    ) -> None:
        self.fleet = fleet
        self.protocol = protocol
        self.hello = hello
        self.id = hello.supervisor_id
        #: The session generation the store handed out for this connection.
        self.session = session
        #: The tokens this connection stands on (a revoke of any closes it): the one it
        #: authenticated with, and the credential it enrolled with it, if any.
        self.token_ids: tuple[str, ...] = ()
        #: True if this connection enrolled its supervisor (the Welcome says so).
        self.enrolled = False
        #: True once reconciled: only then may the dispatcher give it new runs.
        self.ready = False
        self.outbox = Outbox(socket, fleet.settings, self.id, fleet.writing, self.cut)
        self._events = _Inbox(EVENT_QUEUE)
        self._beats = 0
        self._last_heard = time.monotonic()
        #: When the connection was admitted (monotonic clock).
        self.opened_at = self._last_heard
        #: Wall-clock time of the last frame received, for people (the dashboard).
        self.last_heard_at = time.time()
        #: Why the switchboard closed this connection (None: the supervisor's side ended it).
        self.closed_because: str | None = None
        #: Batches handed to the store and not yet acknowledged, oldest first; the task
        #: acknowledging them runs only while there are some (idle connections are many
        #: and each task costs memory), and the applier waits on `_room` while they are many.
        self._writes: list[_Write] = []
        self._acknowledger: asyncio.Task[None] | None = None
        self._room: asyncio.Future[None] | None = None
        #: Power requests sent and not answered yet, by request id (None until the first:
        #: most connections never send one).
        self._powering: dict[int, asyncio.Future[PowerResult | None]] | None = None
        self._power_id = 0
        #: True once no answer can come any more (the connection is over).
        self._power_over = False
        #: Attached console sessions by number (None until the first).
        self._consoles: dict[int, ConsolePeer] | None = None
        self._console_id = 0
        #: The devices granted to runs whose console streams came (None until the first).
        self._grants: dict[RunRef, frozenset[str]] | None = None

    @property
    def minor(self) -> int:
        """The minor of the protocol version this connection negotiated."""
        return minor_of(self.protocol.version or "")

    # --- sending (never waits: see switchboard.outbox) ---------------------------------

    def send(self, message: SwitchboardMessage) -> None:
        self.outbox.send(self.protocol.send(message))

    def send_frame(self, kind: str, frame: bytes) -> None:
        """Queue a message encoded once for many connections (a heartbeat)."""
        if self.protocol.may_send(kind):
            self.outbox.send(frame)

    def start(self, run: RunRef, frame: bytes) -> None:
        """Queue a run's encoded StartJob (see Outbox.start)."""
        if self.protocol.may_send("start_job"):
            self.outbox.start(run, frame)

    def stop(self, stop: StopJob) -> None:
        self.outbox.stop(RunRef(stop.job_id, stop.attempt), self.protocol.send(stop))

    def power(self, device_id: str, action: PowerAction) -> asyncio.Future[PowerResult | None]:
        """Send a power request; the future gets its answer, or None if the connection
        ends first. Raises PowerUnavailable while POWER_IN_FLIGHT are unanswered, or once
        the connection is closing. The caller waits with its own deadline and cancels the
        future past it (it is then forgotten here)."""
        pending = self._powering if self._powering is not None else {}
        if self.outbox.closed or self._power_over:
            raise PowerUnavailable(f"the connection of {self.id} is closing")
        if len(pending) >= POWER_IN_FLIGHT:
            raise PowerUnavailable(f"{POWER_IN_FLIGHT} power requests to {self.id} are unanswered")
        self._powering = pending
        self._power_id += 1
        request_id = self._power_id
        answer: asyncio.Future[PowerResult | None] = asyncio.get_running_loop().create_future()
        pending[request_id] = answer
        answer.add_done_callback(lambda _: pending.pop(request_id, None))
        self.send(Power(request_id=request_id, device_id=device_id, action=action))
        return answer

    def _powered(self, result: PowerResult) -> None:
        answer = (self._powering or {}).get(result.request_id)
        if answer is not None and not answer.done():
            answer.set_result(result)

    def _power_lost(self) -> None:
        self._power_over = True
        for answer in list((self._powering or {}).values()):
            if not answer.done():
                answer.set_result(None)

    def attach_console(self, device_id: str, peer: ConsolePeer) -> int | str:
        """Start an attached console session of the device: its number, or why not. What
        the supervisor sends for it goes to `peer`."""
        if self.minor < CONSOLE_MINOR:
            return (
                f"supervisor {self.id} speaks protocol 1.{self.minor}:"
                f" the console needs 1.{CONSOLE_MINOR}"
            )
        if self.outbox.closed or self._power_over:
            return f"the connection of {self.id} is closing"
        sessions = self._consoles if self._consoles is not None else {}
        if len(sessions) >= CONSOLE_SESSIONS:
            return f"{CONSOLE_SESSIONS} console sessions of {self.id} are attached already"
        self._consoles = sessions
        self._console_id += 1
        sessions[self._console_id] = peer
        self.send(ConsoleAttach(session=self._console_id, device_id=device_id))
        return self._console_id

    def console_input(self, session: int, data: bytes) -> None:
        if self._consoles is not None and session in self._consoles:
            self.send(ConsoleInput(session=session, data=data))

    def detach_console(self, session: int) -> None:
        if self._consoles is not None and self._consoles.pop(session, None) is not None:
            self.send(ConsoleDetach(session=session))

    def _console_said(self, message: ConsoleData | ConsoleClosed) -> None:
        peer = (self._consoles or {}).get(message.session)
        if peer is None:
            return  # detached meanwhile
        if isinstance(message, ConsoleData):
            peer.feed(message.offset, message.data)
        else:
            assert self._consoles is not None
            del self._consoles[message.session]
            peer.closed(message.reason or "the supervisor ended the session")

    def _consoles_over(self) -> None:
        sessions, self._consoles = self._consoles or {}, None
        for peer in sessions.values():
            peer.closed(f"the connection of supervisor {self.id} ended")

    async def _console_refusal(self, event: Output) -> str | None:
        """Why an output event's `console:<device>` stream may not come: its device was
        not granted to its run (None: it was, or the run is unknown, which the store
        tells the supervisor as for any event)."""
        device = console_device(event.stream)
        if device is None:
            return None
        run = RunRef(event.job_id, event.attempt)
        grants = self._grants if self._grants is not None else {}
        granted = grants.get(run)
        if granted is None:
            job = await self.fleet.store.get_job(event.job_id)
            found = [r for r in (job.runs if job is not None else []) if r.attempt == run.attempt]
            if not found:
                return None
            granted = frozenset(found[0].devices)
            if len(grants) >= GRANTS_KEPT:
                grants.pop(next(iter(grants)))
            grants[run] = granted
            self._grants = grants
        if device in granted:
            return None
        return (
            f"output stream {event.stream!r} of run {event.job_id}#{event.attempt}: device"
            f" {device!r} was not granted to the run"
            f" (granted: {', '.join(sorted(granted)) or 'none'})"
        )

    def request_status(self) -> None:
        """Ask the supervisor which runs it holds (the reply is reconciled when it comes)."""
        self.outbox.send(self.protocol.status_request())

    def cut(self, reason: str, detail: str) -> None:
        """End a connection whose supervisor does not keep up or has gone silent (`reason`:
        one of metrics.CUT_REASONS), counted and logged once."""
        if self.outbox.closed:
            if reason == "send_timeout":
                self.outbox.abort()  # not even its goodbye could be sent
            return
        metrics.SESSIONS_CUT.labels(reason).inc()
        log.warning(
            "supervisor %s: %s; %s the connection",
            self.id,
            detail,
            "aborting" if self.outbox.stuck else "closing",
        )
        code = CloseCode.HEARTBEAT_TIMEOUT if reason == "heartbeat_timeout" else CloseCode.TOO_SLOW
        self.close(code, detail)

    def close(self, code: CloseCode, reason: str, retry_after_s: float | None = None) -> None:
        """End the connection with a protocol_error and the close (see Outbox.close)."""
        if self.outbox.closed:
            return
        self.closed_because = reason
        self.outbox.close(self.protocol.fail(code, reason, retry_after_s))

    def heartbeat(self, frame: bytes, now: float, status_every: int = 0) -> None:
        """Queue the hub's heartbeat (and, every `status_every` of them once ready, a
        StatusRequest), or end the connection if the supervisor went silent."""
        if now - self._last_heard > self.fleet.settings.heartbeat_timeout_s:
            self.cut("heartbeat_timeout", "no heartbeat from the supervisor")
            return
        self.send_frame("heartbeat", frame)
        self._beats += 1
        # Counted per connection, so a fleet's requests spread over the interval.
        if status_every > 0 and self.ready and self._beats % status_every == 0:
            self.request_status()

    # --- serving --------------------------------------------------------------------

    async def serve(self, stored_seq: int) -> None:
        # Every write for this connection, in this task and those it starts, is fenced by
        # its session where replicas share the store (store.fencing).
        fenced = fencing.SESSION.set((self.id, self.session)) if self.fleet.store.shared else None
        try:
            await self._serve(stored_seq)
        except fencing.Fenced as exc:  # while reconciling, before serving: nothing written
            log.warning("supervisor %s: %s; closing the connection", self.id, exc)
            self.close(CloseCode.REPLACED, "the session moved to another switchboard")
            await self.outbox.finish(self.fleet.settings.send_timeout_s)
        finally:
            if fenced is not None:
                fencing.SESSION.reset(fenced)

    async def _serve(self, stored_seq: int) -> None:
        settings = self.fleet.settings
        self.outbox.send(
            self.protocol.welcome(
                session=self.session,
                stored_seq=stored_seq,
                heartbeat_interval_s=settings.heartbeat_interval_s,
                heartbeat_timeout_s=settings.heartbeat_timeout_s,
                enrolled=self.enrolled,
            )
        )
        if self.protocol.reconcile_due():
            await self._reconcile(self.hello.runs)
        elif self.protocol.behind_hello():
            # Resent events will close the gap, unless the store lost them (restored from
            # an older copy): the StatusReply, sent after them all, settles which.
            self.request_status()
        # Heartbeats both ways are kept by the hub (Hub.keep_heartbeats): one timer for all
        # connections instead of a task each.
        tasks = [
            asyncio.create_task(self._read_loop()),
            asyncio.create_task(self._apply_loop()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is not None:
                    log.error("supervisor %s connection failed", self.id, exc_info=exc)
                    self.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            if self._acknowledger is not None:
                tasks.append(self._acknowledger)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._power_lost()  # no answer comes any more: their callers are told now
            self._consoles_over()
            # Store what was received before the connection went away.
            await self._drain_events()
            # The goodbye, if the switchboard ended the connection; otherwise the socket
            # is gone and the writer stops at its next send.
            await self.outbox.finish(settings.send_timeout_s)
            self.protocol.lost()

    async def _read_loop(self) -> None:
        receive = self.outbox.socket.receive
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                if (refused := wsprotocol.refusal(message)) is not None:
                    # Refused by the WebSocket layer (too big, not UTF-8): the supervisor
                    # has been told, as for any goodbye.
                    self._protocol_error(*refused)
                return
            self._last_heard = time.monotonic()
            self.last_heard_at = time.time()
            match frames.receive(self.protocol, wsprotocol.message_data(message)):
                case Output() as event if console_device(event.stream) is not None:
                    refusal = await self._console_refusal(event)
                    if refusal is not None:
                        self._protocol_error(CloseCode.INVALID_PAYLOAD, refusal)
                        self.close(CloseCode.INVALID_PAYLOAD, refusal)
                        return
                    await self._events.put(event)
                case Event() as event:
                    await self._events.put(event)
                case ConsoleData() | ConsoleClosed() as said:
                    self._console_said(said)
                case StatusReply():
                    await self._status_due()
                case PowerResult() as result:
                    self._powered(result)
                case Goodbye() as goodbye:
                    self._protocol_error(goodbye.code, goodbye.reason)
                    self.outbox.close(goodbye)
                    return
                case ProtocolErrorMessage(code=code, reason=reason):
                    log.warning(
                        "supervisor %s reported a protocol error: %s (%d)", self.id, reason, code
                    )
                    return

    def _protocol_error(self, code: int, reason: str) -> None:
        """The supervisor sent what the protocol refuses: counted, and logged once."""
        metrics.PROTOCOL_ERRORS.labels(str(code)).inc()
        log.warning("supervisor %s: %s (%d)", self.id, reason, code)
        self.closed_because = reason

    async def _apply_loop(self) -> None:
        while not self.outbox.closed:
            while len(self._writes) >= WRITES_IN_FLIGHT:
                self._room = asyncio.get_running_loop().create_future()
                await self._room
            # Nothing may wait between taking events and handing them over: a connection
            # ending there would drop them (the inbox no longer holds them).
            batch = await self._events.take(MAX_BATCH)
            self._writes.append(self._hand_to_store(batch))
            if self._acknowledger is None:
                self._acknowledger = asyncio.create_task(self._acknowledge_writes())

    async def _acknowledge_writes(self) -> None:
        """Acknowledge the batches handed to the store, in order, as each is stored. A
        batch that could not be stored ends the connection (the supervisor sends it again
        once reconnected)."""
        try:
            while self._writes:
                write = self._writes[0]
                # Shielded: if the connection ends meanwhile, _drain_events still waits.
                result = await asyncio.shield(write.result)
                self._writes.pop(0)
                _wake(self._room)
                await self._acknowledge(write, result)
        except Exception as exc:
            if self._room is not None and not self._room.done():
                self._room.set_exception(exc)
            if isinstance(exc, fencing.Fenced):
                # Another replica holds the supervisor now: this one writes nothing more.
                log.warning("supervisor %s: %s; closing the connection", self.id, exc)
                self.close(CloseCode.REPLACED, "the session moved to another switchboard")
                return
            log.error("supervisor %s: storing its events failed", self.id, exc_info=exc)
            self.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            self._acknowledger = None

    async def _drain_events(self) -> None:
        """The connection is over: acknowledge what is still being stored, then store and
        acknowledge what was received and not yet handed over (the Acks may not arrive;
        what was stored counts, and the supervisor resends the rest)."""
        batch = self._events.take_all()
        if batch:
            self._writes.append(self._hand_to_store(batch))
        writes, self._writes = self._writes, []
        for write in writes:  # each awaited, so none is left with an unseen failure
            with contextlib.suppress(Exception):
                await self._acknowledge(write, await write.result)

    def _hand_to_store(self, batch: list[Event]) -> _Write:
        fresh, after = self.protocol.hand_over(batch)
        result = self.fleet.store.apply_events(
            self.id, batch, after_seq=after, waited=self.fleet.waited
        )
        return _Write(batch, fresh, result, time.perf_counter())

    async def _acknowledge(self, write: _Write, result: EventsApplied) -> None:
        metrics.EVENT_BATCH_SECONDS.observe(time.perf_counter() - write.started)
        metrics.EVENTS_STORED.inc(len(write.fresh))
        metrics.count_output(write.fresh)
        if len(write.fresh) < len(write.batch):
            metrics.DUPLICATE_EVENTS.inc(len(write.batch) - len(write.fresh))
        self.outbox.send(self.protocol.acknowledge(result.stored_seq, result.problems))
        for problem in result.problems:
            metrics.EVENT_PROBLEMS.labels(problem.code.value).inc()
            _problem_log.warning(
                f"{self.id}:{problem.code.value}",
                "supervisor %s: event %d: %s: %s",
                self.id,
                problem.seq,
                problem.code.value,
                problem.reason,
            )
        for key in result.unwanted:
            metrics.ZOMBIE_RUNS_STOPPED.labels("events").inc()
            self.stop(StopJob(job_id=key.job_id, attempt=key.attempt, reason="unwanted"))
        if result.reports:
            self.fleet.reports_stored(result.reports)
        if result.ended_jobs:
            self.fleet.jobs_ended(result.ended_jobs)
        if result.ended:
            self.fleet.wake_dispatcher()
        if self.protocol.reconcile_due():
            await self._reconcile(self.hello.runs)
        await self._status_due()

    # --- reconciling ------------------------------------------------------------------

    async def _reconcile(self, held: Sequence[HeldRun]) -> None:
        """Settle every run with the supervisor's list of `held` runs (its Hello's, or a
        StatusReply's: switchboard.reconcile), then take runs."""
        if not self.fleet.is_current(self):
            return  # replaced: its Hello is out of date, the newer connection reconciles
        store = self.fleet.store
        decisions = reconcile(await store.active_runs(self.id), held)
        await self._carry_out(decisions, "reconcile")
        self.ready = True
        # Runs assigned while this ran were not sent (it wasn't ready): send them.
        known = {(d.job_id, d.attempt) for d in decisions}
        for run in await store.active_runs(self.id):
            if run.phase == Phase.ASSIGNED and (run.job_id, run.attempt) not in known:
                await self.resend(run)
        self.fleet.wake_dispatcher()

    async def _status_due(self) -> None:
        """Repair what drifted by each StatusReply whose events are stored, one at a time."""
        while (reply := self.protocol.status_due()) is not None:
            try:
                if self.protocol.reconcile_by_status():
                    await self._resynchronise(reply)
                else:
                    await self._check_status(reply)
            finally:
                self.protocol.status_checked()

    async def _resynchronise(self, reply: StatusReply) -> None:
        """Reconcile with a StatusReply that came before the events up to the Hello's
        last_seq were stored: those are lost (docs/protocol.md §6.6)."""
        if self.protocol.behind_hello():
            metrics.SEQ_RESYNCS.inc()
            log.warning(
                "supervisor %s numbered events up to %d but the store has only up to %d and"
                " it has no more to send (the store restored from an older copy?): the"
                " events in between are lost; reconciling with its status instead",
                self.id,
                self.hello.last_seq,
                self.protocol.stored_seq,
            )
        await self._reconcile(reply.runs)

    async def _check_status(self, reply: StatusReply) -> None:
        if not self.ready or not self.fleet.is_current(self):
            return
        store = self.fleet.store
        # The common case, nothing drifted, costs a read of run identities (the full list
        # holds the specs and opens secrets). Equal sets: no row of `drift` applies.
        held = {RunRef(run.job_id, run.attempt) for run in reply.runs}
        if held == await self.fleet.stored_run_refs(self.id):
            return
        runs = await store.active_runs(self.id)
        # Which runs had events since the reply is asked only now: the reader kept reading
        # and the store kept storing while it was read, and a run whose events after the
        # reply were stored by then looks started (or ended) there, not as in the reply.
        newer = self.protocol.status_newer()
        if not self.fleet.is_current(self):
            return  # replaced while reading: the newer connection reconciles
        decisions = drift(runs, reply.runs, newer)
        if decisions:
            log.warning(
                "supervisor %s: its runs drifted from what is stored: %s",
                self.id,
                ", ".join(f"{d.job_id}#{d.attempt} {d.action}" for d in decisions),
            )
            await self._carry_out(decisions, "status")
            self.fleet.wake_dispatcher()

    async def _carry_out(self, decisions: Sequence[Decision], via: str) -> None:
        store = self.fleet.store
        for decision in decisions:
            match decision.action:
                case Action.ADOPT:
                    pass
                case Action.RESEND:
                    assert decision.run is not None
                    await self.resend(decision.run)
                case Action.STOP:
                    self.stop(
                        StopJob(job_id=decision.job_id, attempt=decision.attempt, reason="canceled")
                    )
                case Action.STOP_ZOMBIE:
                    metrics.ZOMBIE_RUNS_STOPPED.labels(via).inc()
                    self.stop(
                        StopJob(job_id=decision.job_id, attempt=decision.attempt, reason="unwanted")
                    )
                case Action.FINALIZE_CANCELED | Action.FINALIZE_LOST:
                    phase = "canceled" if decision.action is Action.FINALIZE_CANCELED else "lost"
                    key = RunRef(decision.job_id, decision.attempt)
                    ended = await store.end_run(key, phase, "supervisor no longer holds it")
                    if ended and decision.action is Action.FINALIZE_LOST:
                        metrics.RUNS_LOST.labels(via).inc()

    async def resend(self, run: ActiveRun) -> None:
        """(Re)send an assigned run's StartJob (queued: never waiting on the socket). A
        run whose secret values this switchboard can't open (sealed under another key) is
        ended instead."""
        if run.secrets_unreadable is not None:
            reason = f"not started: {run.secrets_unreadable}"
            key = RunRef(run.job_id, run.attempt)
            if await self.fleet.store.end_run(key, Phase.REJECTED.value, reason):
                metrics.SECRETS_UNREADABLE.labels("reconcile").inc()
                log.warning("run %s#%d rejected: %s", run.job_id, run.attempt, reason)
            return
        frame = await self.fleet.start_frame(
            run.job_id, run.attempt, run.spec, self.minor, run.devices
        )
        if frame is not None:
            self.start(RunRef(run.job_id, run.attempt), frame)
