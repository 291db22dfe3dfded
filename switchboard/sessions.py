"""Supervisor connections on the switchboard: handshake, events in, commands out.

One SupervisorSession per WebSocket. Its reader decodes frames and queues events; its
applier hands whatever has gathered to the store as one batch (one transaction), and its
acknowledger sends one cumulative Ack per batch once the batch is stored, so acknowledging
never races ahead of durability. The next batch goes to the store while the one before is
still being committed (the store takes them in order and refuses a batch whose
predecessor failed), so a run's events that arrive a moment apart don't wait for two
commits one after the other. A newer connection of the same supervisor replaces an older
one (the store hands out session generations).

Nothing that serves everyone waits on one supervisor's socket: sending only queues the
encoded message in the session's outbox (bounded in bytes and messages) and returns; one
writer task per session, alive only while the outbox holds something, sends it. A send
that waits on the socket past the send timeout, an outbox that overflows, or a supervisor
silent past the heartbeat timeout ends the session: with a protocol_error and the close
handshake when the socket can take them, else by aborting the connection (which the
socket's close would wait on for ever). Either way the session then ends as any other
does (the store marks the supervisor disconnected; its runs wait out the lost-after grace
or are reconciled when it is back).

The Hub knows the live sessions of this process, so the dispatcher and the API can send
StartJob and StopJob to the right socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Any, NamedTuple

import msgspec
from litestar import WebSocket

from protocol import codec, limits
from protocol.exceptions import CloseCode, FrameError, MessageTooBig
from protocol.messages import (
    Ack,
    Event,
    Heartbeat,
    Hello,
    ProtocolErrorMessage,
    ServerHeartbeat,
    StatusReply,
    StopJob,
    SwitchboardMessage,
    Welcome,
)
from protocol.session import negotiate_version
from protocol.state import Phase
from switchboard import auth, enrolment, metrics
from switchboard.config import Settings
from switchboard.lograte import RateLimitedLog
from switchboard.models import ActiveRun, Assignment, EventsApplied, RunKey
from switchboard.reconcile import Action, reconcile
from switchboard.store.base import Store
from switchboard.store.errors import ConnectRefused
from switchboard.wsprotocol import ABORT_EXTENSION

log = logging.getLogger("switchboard.sessions")

#: Events waiting to be stored, per connection; a full queue stops reading the socket.
EVENT_QUEUE = 4096
#: Events stored per transaction at most.
MAX_BATCH = 1024
#: Batches of one session handed to the store and not yet acknowledged, at most.
WRITES_IN_FLIGHT = 2


class _Inbox:
    """Events on their way from a session's reader to its applier (one of each): a list
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


class SupervisorSession:
    def __init__(
        self, hub: Hub, socket: WebSocket, hello: Hello, session: int, stored_seq: int = 0
    ) -> None:
        self.hub = hub
        self.socket = socket
        self.hello = hello
        self.id = hello.supervisor_id
        self.session = session
        #: The tokens this connection stands on (a revoke of any closes it): the one it
        #: authenticated with, and the credential it enrolled with it, if any.
        self.token_ids: tuple[str, ...] = ()
        #: True if this connection enrolled its supervisor (the Welcome says so).
        self.enrolled = False
        #: True once reconciled: only then may the dispatcher give it new runs.
        self.ready = False
        self._events = _Inbox(EVENT_QUEUE)
        #: Encoded messages waiting for the writer, oldest first; last, once closing, the
        #: close handshake (an ASGI message). The writer task runs only while it holds
        #: something (idle sessions are many, and each task costs memory).
        self._outbox: list[bytes | dict[str, Any]] = []
        self._outbox_bytes = 0
        self._writer: asyncio.Task[None] | None = None
        #: When the send under way began to wait on the socket (None: none waits).
        self._send_since: float | None = None
        #: StartJobs waiting for room in the outbox, by run, oldest first (see `start`).
        self._starts: dict[RunKey, bytes] = {}
        #: Closing or closed: nothing more is queued.
        self._closed = False
        self._last_heard = time.monotonic()
        #: Wall-clock time of the last frame received, for people (the dashboard).
        self.last_heard_at = time.time()
        #: Why the switchboard closed this session (None: the supervisor's side ended it).
        self.closed_because: str | None = None
        #: Highest seq handed to the store (from Connected.last_seq on): events at or
        #: below it are resends.
        self._handed_seq = stored_seq
        #: Batches handed to the store and not yet acknowledged, oldest first; the task
        #: acknowledging them runs only while there are some (idle sessions are many and
        #: each task costs memory), and the applier waits on `_room` while they are many.
        self._writes: list[_Write] = []
        self._acknowledger: asyncio.Task[None] | None = None
        self._room: asyncio.Future[None] | None = None

    # --- sending: an outbox and its writer -------------------------------------------

    def send(self, message: SwitchboardMessage) -> None:
        """Queue a message for the supervisor; never waits (the session's writer sends
        it). A closing session drops it; an outbox too full to take it cuts the session."""
        self._queue(codec.encode(message))

    def start(self, key: RunKey, frame: bytes) -> None:
        """Queue a run's StartJob (`frame`, encoded). StartJobs wait apart from the outbox
        and move into it while it is at most half full: a dispatch pass or a reconnect can
        give a supervisor more large StartJobs than its outbox holds, but no more than it
        has slots (the store assigns no more), so they are bounded without cutting a
        healthy supervisor, and the other half of the outbox stays for acks, stops and
        heartbeats."""
        if self._closed:
            return
        self._starts[key] = frame
        self._move_starts()

    def stop(self, stop: StopJob) -> None:
        """Queue a StopJob, after its run's StartJob if that still waits (the supervisor
        must not hear of the stop first: it would ignore it, then start the run)."""
        frame = self._starts.pop(RunKey(stop.job_id, stop.attempt), None)
        if frame is not None:
            self._append(frame)  # bounded by the supervisor's slots like every StartJob
        self.send(stop)

    def _move_starts(self) -> None:
        settings = self.hub.settings
        while self._starts and not self._closed:
            key, frame = next(iter(self._starts.items()))
            if self._outbox and (
                2 * len(self._outbox) >= settings.outbox_max_messages
                or 2 * (self._outbox_bytes + len(frame)) > settings.outbox_max_bytes
            ):
                return  # the writer moves more as it sends
            del self._starts[key]
            self._append(frame)

    def _is_full(self, size: int) -> bool:
        settings = self.hub.settings
        return (
            len(self._outbox) >= settings.outbox_max_messages
            or self._outbox_bytes + size > settings.outbox_max_bytes
        )

    def _queue(self, frame: bytes) -> None:
        if self._closed:
            return  # what was not sent is settled when the supervisor reconnects
        # An empty outbox takes any one message (up to the frame limit).
        if self._outbox and self._is_full(len(frame)):
            self.cut(
                "outbox_full",
                f"{len(self._outbox)} messages ({self._outbox_bytes} bytes) already wait to "
                "be sent to it",
            )
            return
        self._append(frame)

    def _append(self, frame: bytes) -> None:
        self._outbox.append(frame)
        self._outbox_bytes += len(frame)
        self._start_writer()

    def _start_writer(self) -> None:
        if self._writer is None:
            self._writer = asyncio.create_task(self._write())
            self.hub.writing.add(self)

    async def _write(self) -> None:
        """Send the outbox, oldest first, until it is empty. Only the socket's send may
        wait (uvicorn's waits while the transport's buffer is full): `_send_since` tells
        the hub's deadline watch how long it has."""
        outbox = self._outbox
        try:
            while outbox:
                item = outbox[0]
                if isinstance(item, bytes):
                    message: Any = {"type": "websocket.send", "text": item.decode()}
                else:
                    message = item  # the close handshake
                self._send_since = time.monotonic()
                await self.socket.send(message)
                self._send_since = None
                del outbox[0]
                if isinstance(item, bytes):
                    self._outbox_bytes -= len(item)
                if self._starts:
                    self._move_starts()
        except Exception as exc:  # the connection is gone: nothing more can be sent
            log.debug("supervisor %s: sending failed: %r", self.id, exc)
            self._closed = True
            outbox.clear()
            self._outbox_bytes = 0
            self._starts.clear()
        finally:
            self._send_since = None
            self._writer = None
            self.hub.writing.discard(self)

    def check_send_deadline(self, now: float) -> None:
        """Cut the session if the send under way has waited on the socket too long."""
        since = self._send_since
        if since is not None and now - since > self.hub.settings.send_timeout_s:
            self.cut("send_timeout", f"a message waited {now - since:.1f}s for it to read")

    def cut(self, reason: str, detail: str) -> None:
        """End a session whose supervisor does not keep up or has gone silent (`reason`:
        one of metrics.CUT_REASONS), counted and logged once."""
        if self._closed:
            if reason == "send_timeout":
                self._abort()  # not even its goodbye could be sent
            return
        metrics.SESSIONS_CUT.labels(reason).inc()
        stuck = self._send_since is not None
        log.warning(
            "supervisor %s: %s; %s the connection",
            self.id,
            detail,
            "aborting" if stuck else "closing",
        )
        code = CloseCode.HEARTBEAT_TIMEOUT if reason == "heartbeat_timeout" else CloseCode.TOO_SLOW
        self.close(code, detail)

    def close(self, code: CloseCode, reason: str, retry_after_s: float | None = None) -> None:
        """End the session; never waits. When the socket can take it, what is still queued
        is dropped (the supervisor's reconnect settles it) and a protocol_error and the
        close handshake are sent; when a send already waits on the socket, the connection
        is aborted."""
        if self._closed:
            return
        self._closed = True
        self.closed_because = reason
        self._starts.clear()  # settled when the supervisor reconnects
        if self._send_since is not None:
            self._abort()
            return
        error = FrameError(code, reason)
        goodbye = codec.encode(
            ProtocolErrorMessage(code=int(code), reason=reason, retry_after_s=retry_after_s)
        )
        handshake = {"type": "websocket.close", "code": int(code), "reason": error.close_reason()}
        self._outbox[:] = [goodbye, handshake]
        self._outbox_bytes = len(goodbye)
        self._start_writer()

    def _abort(self) -> None:
        """Drop the connection at once."""
        if not _abort(self.socket) and self._writer is not None:
            self._writer.cancel()  # another server: at least stop waiting on the socket

    async def finish_writing(self, grace_s: float) -> None:
        """Wait until the writer has sent (or failed to send) the outbox, at most
        `grace_s`; then abort the connection if it still waits."""
        writer = self._writer
        if writer is None:
            return
        try:
            await asyncio.wait([writer], timeout=grace_s)
        finally:
            if self._writer is not None:
                self._abort()

    # --- receiving ------------------------------------------------------------------

    async def serve(self, stored_seq: int) -> None:
        settings = self.hub.settings
        self.send(
            Welcome(
                version=negotiate_version(self.hello.versions),
                session=self.session,
                last_seq=stored_seq,
                heartbeat_interval_s=settings.heartbeat_interval_s,
                heartbeat_timeout_s=settings.heartbeat_timeout_s,
                enrolled=self.enrolled,
            )
        )
        if stored_seq >= self.hello.last_seq:
            await self._reconcile()
        # Heartbeats both ways are kept by the hub (Hub.keep_heartbeats): one timer for all
        # sessions instead of a task each.
        tasks = [
            asyncio.create_task(self._read_loop()),
            asyncio.create_task(self._apply_loop()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if isinstance(exc, FrameError):
                    log.warning("supervisor %s: %s", self.id, exc)
                    self.close(exc.code, exc.reason)
                elif exc is not None:
                    log.error("supervisor %s session failed", self.id, exc_info=exc)
                    self.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            if self._acknowledger is not None:
                tasks.append(self._acknowledger)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Store what was received before the connection went away.
            await self._drain_events()
            # The goodbye, if the switchboard ended the session; otherwise the socket is
            # gone and the writer stops at its next send.
            self._closed = True
            await self.finish_writing(settings.send_timeout_s)

    async def _read_loop(self) -> None:
        while True:
            message = await self.socket.receive()
            if message["type"] == "websocket.disconnect":
                return
            frame = message.get("bytes") or message.get("text") or b""
            self._last_heard = time.monotonic()
            self.last_heard_at = time.time()
            decoded = codec.decode_from_supervisor(frame)
            match decoded:
                case Event():
                    await self._events.put(decoded)
                case Heartbeat():
                    pass
                case StatusReply():
                    pass
                case ProtocolErrorMessage(code=code, reason=reason):
                    log.warning(
                        "supervisor %s reported a protocol error: %s (%d)", self.id, reason, code
                    )
                    return
                case Hello():
                    raise FrameError(CloseCode.UNEXPECTED_MESSAGE, "hello after the handshake")

    async def _apply_loop(self) -> None:
        while not self._closed:
            while len(self._writes) >= WRITES_IN_FLIGHT:
                self._room = asyncio.get_running_loop().create_future()
                await self._room
            # Nothing may wait between taking events and handing them over: a session
            # ending there would drop them (the inbox no longer holds them).
            batch = await self._events.take(MAX_BATCH)
            self._writes.append(self._hand_to_store(batch))
            if self._acknowledger is None:
                self._acknowledger = asyncio.create_task(self._acknowledge_writes())

    async def _acknowledge_writes(self) -> None:
        """Acknowledge the batches handed to the store, in order, as each is stored. A
        batch that could not be stored ends the session (the supervisor sends it again
        once reconnected)."""
        try:
            while self._writes:
                write = self._writes[0]
                # Shielded: if the session ends meanwhile, _drain_events still waits for it.
                result = await asyncio.shield(write.result)
                self._writes.pop(0)
                _wake(self._room)
                await self._acknowledge(write, result)
        except Exception as exc:
            if self._room is not None and not self._room.done():
                self._room.set_exception(exc)
            log.error("supervisor %s: storing its events failed", self.id, exc_info=exc)
            self.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            self._acknowledger = None

    async def _drain_events(self) -> None:
        """The session is over: acknowledge what is still being stored, then store and
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
        # The store skips events it has already stored without saying how many: count
        # them the same way it decides, against the highest seq handed to it.
        fresh = []
        highest = self._handed_seq
        for event in batch:
            if event.seq > highest:
                highest = event.seq
                fresh.append(event)
        result = self.hub.store.apply_events(self.id, batch, after_seq=self._handed_seq)
        self._handed_seq = highest
        return _Write(batch, fresh, result, time.perf_counter())

    async def _acknowledge(self, write: _Write, result: EventsApplied) -> None:
        hub = self.hub
        metrics.EVENT_BATCH_SECONDS.observe(time.perf_counter() - write.started)
        metrics.EVENTS_STORED.inc(len(write.fresh))
        metrics.count_output(write.fresh)
        if len(write.fresh) < len(write.batch):
            metrics.DUPLICATE_EVENTS.inc(len(write.batch) - len(write.fresh))
        self.send(Ack(seq=result.stored_seq))
        for key in result.unwanted:
            metrics.ZOMBIE_RUNS_STOPPED.labels("events").inc()
            self.stop(StopJob(job_id=key.job_id, attempt=key.attempt, reason="unwanted"))
        hub.notify_stored()
        if result.ended:
            hub.wake_dispatcher()
        if not self.ready and result.stored_seq >= self.hello.last_seq:
            await self._reconcile()

    async def _reconcile(self) -> None:
        if self.hub.sessions.get(self.id) is not self:
            return  # replaced: its Hello is out of date, the newer session reconciles
        store = self.hub.store
        decisions = reconcile(await store.active_runs(self.id), self.hello.runs)
        for decision in decisions:
            match decision.action:
                case Action.ADOPT:
                    pass
                case Action.RESEND:
                    assert decision.run is not None
                    await self._resend(decision.run)
                case Action.STOP:
                    self.stop(
                        StopJob(job_id=decision.job_id, attempt=decision.attempt, reason="canceled")
                    )
                case Action.STOP_ZOMBIE:
                    metrics.ZOMBIE_RUNS_STOPPED.labels("reconcile").inc()
                    self.stop(
                        StopJob(job_id=decision.job_id, attempt=decision.attempt, reason="unwanted")
                    )
                case Action.FINALIZE_CANCELED | Action.FINALIZE_LOST:
                    phase = "canceled" if decision.action is Action.FINALIZE_CANCELED else "lost"
                    key = RunKey(decision.job_id, decision.attempt)
                    ended = await store.end_run(key, phase, "supervisor no longer holds it")
                    if ended and decision.action is Action.FINALIZE_LOST:
                        metrics.RUNS_LOST.labels("reconcile").inc()
        self.ready = True
        # Runs assigned while this ran were not sent (the session wasn't ready): send them.
        known = {(d.job_id, d.attempt) for d in decisions}
        for run in await store.active_runs(self.id):
            if run.phase == Phase.ASSIGNED and (run.job_id, run.attempt) not in known:
                await self._resend(run)
        self.hub.wake_dispatcher()

    async def _resend(self, run: ActiveRun) -> None:
        """(Re)send an assigned run's StartJob (queued: never waiting on the socket). A
        run it cannot be sent for is ended instead: one whose secret values this
        switchboard can't open (sealed under another key), or one whose StartJob is over
        the frame limit."""
        key = RunKey(run.job_id, run.attempt)
        if run.secrets_unreadable is not None:
            reason = f"not started: {run.secrets_unreadable}"
            if await self.hub.store.end_run(key, Phase.REJECTED.value, reason):
                metrics.SECRETS_UNREADABLE.labels("reconcile").inc()
                log.warning("run %s#%d rejected: %s", run.job_id, run.attempt, reason)
            return
        try:
            frame = codec.encode_start_job(run.job_id, run.attempt, run.spec)
        except MessageTooBig as exc:
            await self.hub.undeliverable(key, exc)
            return
        self.start(key, frame)

    def heartbeat(self, frame: bytes, now: float) -> None:
        """Queue the hub's heartbeat, or end the session if the supervisor has gone silent."""
        if now - self._last_heard > self.hub.settings.heartbeat_timeout_s:
            self.cut("heartbeat_timeout", "no heartbeat from the supervisor")
            return
        self._queue(frame)


class Hub:
    """The live supervisor sessions of this switchboard process."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.sessions: dict[str, SupervisorSession] = {}
        #: Sessions whose writer is running: the only ones the send deadline watch visits.
        self.writing: set[SupervisorSession] = set()
        self._wake_dispatcher: Any = lambda: None
        self._stored_waiters: list[asyncio.Future[None]] = []
        #: Refusals anyone who reaches the port can cause, one per attempt: logged once
        #: per interval (the metric counts each).
        self._refusals_log = RateLimitedLog(log)

    def on_capacity_change(self, callback: Any) -> None:
        self._wake_dispatcher = callback

    def wake_dispatcher(self) -> None:
        self._wake_dispatcher()

    def notify_stored(self) -> None:
        """Events were stored: wake whoever follows output or phases."""
        waiters, self._stored_waiters = self._stored_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_stored(self, timeout_s: float) -> None:
        """Until the next batch of events is stored, or `timeout_s` (a bound, so a follower
        also notices what another process stored)."""
        waiter = asyncio.get_running_loop().create_future()
        self._stored_waiters.append(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, timeout_s)
        finally:
            if not waiter.done():  # timed out: don't let idle followers pile up
                self._stored_waiters.remove(waiter)

    async def keep_heartbeats(self) -> None:
        """Every heartbeat interval: a heartbeat queued for each session (one frame,
        encoded once), and the end of each session whose supervisor has been silent past
        the timeout."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            frame = codec.encode(ServerHeartbeat(at=time.time()))
            now = time.monotonic()
            for session in list(self.sessions.values()):
                try:
                    session.heartbeat(frame, now)
                except Exception:  # one session's trouble must not stop the others' beats
                    log.exception("heartbeat to %s failed", session.id)

    async def keep_send_deadlines(self) -> None:
        """Cut each session whose send has waited on its socket past the send timeout: one
        timer for all (a timer per send would cost more than the send), visiting only the
        sessions that have something to send. A send's deadline is met within a quarter of
        the timeout (at most a second) after it passes."""
        timeout = self.settings.send_timeout_s
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            now = time.monotonic()
            for session in list(self.writing):
                try:
                    session.check_send_deadline(now)
                except Exception:
                    log.exception("checking the send deadline of %s failed", session.id)

    def ready_sessions(self) -> list[SupervisorSession]:
        return [s for s in self.sessions.values() if s.ready]

    async def start_runs(self, runs: Iterable[Assignment]) -> None:
        """Queue the StartJob of each run just assigned for its supervisor (never waiting
        on a socket; a supervisor not connected and ready gets it when it reconciles). A
        run whose StartJob no supervisor could take is not sent but ended."""
        for run in runs:
            try:
                frame = codec.encode_start_job(run.job_id, run.attempt, run.spec)
            except MessageTooBig as exc:
                await self.undeliverable(RunKey(run.job_id, run.attempt), exc)
                continue
            session = self.sessions.get(run.supervisor_id)
            if session is not None and session.ready:
                session.start(RunKey(run.job_id, run.attempt), frame)

    async def undeliverable(self, key: RunKey, error: MessageTooBig) -> None:
        """End a run whose StartJob is over the frame limit (its job got into the store
        around the check at submission): `rejected`, with the reason, so that its job is
        neither resent nor restarted for ever, and no connection is cut for it."""
        metrics.RUNS_UNDELIVERABLE.inc()
        log.error("run %s#%d cannot be sent: %s", key.job_id, key.attempt, error)
        if await self.store.end_run(key, Phase.REJECTED.value, f"not sent: {error}"):
            self.notify_stored()
            self.wake_dispatcher()

    def send_stop(self, supervisor_id: str, stop: StopJob) -> None:
        """Queue a StopJob for the supervisor; never waits on its socket."""
        session = self.sessions.get(supervisor_id)
        if session is not None:
            session.stop(stop)
        # Otherwise reconciliation stops it when the supervisor is back.

    async def close_all(
        self, code: CloseCode, reason: str, retry_after_s: float | None = None
    ) -> None:
        """Close every session, waiting at most the send timeout for the goodbyes."""
        sessions = list(self.sessions.values())
        for session in sessions:
            session.close(code, reason, retry_after_s)
        await asyncio.gather(
            *(s.finish_writing(self.settings.send_timeout_s) for s in sessions),
            return_exceptions=True,
        )

    async def drop_revoked_sessions(self) -> None:
        """Close the connections whose token has been revoked."""
        revoked = {t.id for t in await self.store.list_tokens() if t.revoked}
        for session in [s for s in self.sessions.values() if not revoked.isdisjoint(s.token_ids)]:
            session.close(CloseCode.UNAUTHORIZED, "token revoked")

    async def handle(self, socket: WebSocket) -> None:
        """Serve one supervisor WebSocket from the upgrade request to the close."""
        timeout = self.settings.send_timeout_s
        token = await auth.authenticate(self.store, socket.headers.get("authorization"))
        if token is None or not auth.allows(token.role, auth.Permission.CONNECT):
            metrics.SUPERVISOR_REFUSALS.labels("unauthorized").inc()
            self._refusals_log.warning(
                "unauthorized", "supervisor connection refused: no valid supervisor token"
            )
            await _refuse(
                socket, 401, "unauthorized", "a valid supervisor token is required", timeout
            )
            return
        offered = socket.scope.get("subprotocols") or []
        if limits.SUBPROTOCOL not in offered:
            await _refuse(
                socket,
                400,
                "unsupported_protocol",
                f"the WebSocket subprotocol {limits.SUBPROTOCOL} is required",
                timeout,
            )
            return
        async with _deadline(socket, timeout):
            await socket.accept(subprotocols=limits.SUBPROTOCOL)
        try:
            hello = await self._receive_hello(socket)
        except FrameError as exc:
            await _close_with_error(socket, exc, timeout)
            return
        except TimeoutError:
            await _close_with_error(
                socket,
                FrameError(CloseCode.HANDSHAKE_FAILED, "no hello within the time limit"),
                timeout,
            )
            return
        try:
            admission = enrolment.admit(token, hello)
            try:
                connected = await self.store.supervisor_connected(
                    hello, token_id=token.id, enrol=admission.enrol
                )
            except ConnectRefused as exc:
                raise enrolment.refusal(exc, hello.supervisor_id) from None
        except enrolment.Refused as refused:
            metrics.SUPERVISOR_REFUSALS.labels(refused.reason).inc()
            log.warning(
                "supervisor %s refused (token %s): %s",
                hello.supervisor_id,
                token.id,
                refused.message,
            )
            await _close_with_error(
                socket, FrameError(CloseCode.UNAUTHORIZED, refused.message), timeout
            )
            return
        session = SupervisorSession(
            self, socket, hello, connected.session, stored_seq=connected.last_seq
        )
        session.token_ids = admission.token_ids
        if admission.enrol is not None:
            session.enrolled = True
            metrics.SUPERVISOR_ENROLMENTS.inc()
            log.info(
                "supervisor %s enrolled with registration token %s (credential %s)",
                hello.supervisor_id,
                token.id,
                admission.enrol.token_id,
            )
        metrics.SUPERVISOR_CONNECTIONS.inc()
        if connected.session > 1:
            metrics.SUPERVISOR_RECONNECTS.inc()
        previous = self.sessions.get(session.id)
        self.sessions[session.id] = session
        if previous is not None:
            metrics.SESSIONS_REPLACED.inc()
            previous.close(CloseCode.REPLACED, "replaced by a newer connection")
        log.info("supervisor %s connected (session %d)", session.id, session.session)
        try:
            await session.serve(connected.last_seq)
        finally:
            if self.sessions.get(session.id) is session:
                del self.sessions[session.id]
            await self.store.supervisor_disconnected(
                session.id, session.session, session.closed_because or "closed by the supervisor"
            )
            log.info("supervisor %s disconnected (session %d)", session.id, session.session)

    async def _receive_hello(self, socket: WebSocket) -> Hello:
        message = await asyncio.wait_for(socket.receive(), self.settings.hello_timeout_s)
        if message["type"] == "websocket.disconnect":
            raise FrameError(CloseCode.HANDSHAKE_FAILED, "closed before hello")
        decoded = codec.decode_from_supervisor(message.get("bytes") or message.get("text") or b"")
        if not isinstance(decoded, Hello):
            raise FrameError(CloseCode.HANDSHAKE_FAILED, "the first message must be hello")
        negotiate_version(decoded.versions)
        return decoded


def _abort(socket: WebSocket) -> bool:
    """Drop the connection at once, if the server offers it (switchboard.wsprotocol)."""
    abort = socket.scope.get("extensions", {}).get(ABORT_EXTENSION)
    if abort is None:
        return False
    abort()
    return True


@contextlib.asynccontextmanager
async def _deadline(socket: WebSocket, seconds: float) -> AsyncIterator[None]:
    """Sends before the session exists (refusals, a failed handshake) get the send
    timeout too: past it, the connection is aborted."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        _abort(socket)


async def _refuse(
    socket: WebSocket, status: int, error: str, message: str, send_timeout_s: float
) -> None:
    """Answer the upgrade request with a plain HTTP error instead of accepting it."""
    await socket.receive()  # websocket.connect
    body = msgspec.json.encode({"error": error, "message": message})
    async with _deadline(socket, send_timeout_s):
        await socket.send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await socket.send({"type": "websocket.http.response.body", "body": body})


async def _close_with_error(socket: WebSocket, error: FrameError, send_timeout_s: float) -> None:
    """Say why (a ProtocolErrorMessage), then close with the code. Never raises: the peer
    may already be gone."""
    with contextlib.suppress(Exception):
        message = ProtocolErrorMessage(code=int(error.code), reason=error.reason)
        text = codec.encode(message)
        async with _deadline(socket, send_timeout_s):
            await socket.send({"type": "websocket.send", "text": text.decode()})
            await socket.close(int(error.code), error.close_reason())
