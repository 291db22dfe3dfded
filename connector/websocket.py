"""The connector to a switchboard over a WebSocket, with reconnects that lose nothing.

One connection at a time, each a pump between the socket and a protocol.connection
Connection (which decides what may come when, and what is resent). Each starts with
Hello -> Welcome; then a writer task sends every event the switchboard hasn't stored
(oldest first, resending after a reconnect), a heartbeat task keeps both sides sure the
other is alive, and the reader hands StartJob and StopJob to the supervisor and answers
StatusRequest. Events stay in the backlog until acknowledged, so a dropped connection
costs a resend, never an event. What the switchboard sends that the protocol refuses,
down to a binary, non-UTF-8 or oversized WebSocket message (protocol.frames), ends the
connection with a protocol_error first, counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.client import ClientProtocol
from websockets.exceptions import (
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    InvalidStatus,
)

from protocol import frames, limits
from protocol.connection import Acknowledged, Connection, Goodbye, Role
from protocol.exceptions import CloseCode, FrameError, JobError
from protocol.messages import (
    ConsoleAttach,
    ConsoleDetach,
    ConsoleInput,
    Heartbeat,
    HeldRun,
    Hello,
    JobStateChanged,
    Power,
    ProtocolErrorMessage,
    RunRef,
    StartJob,
    StatusRequest,
    StopJob,
    SupervisorEvent,
    SupervisorMessage,
    Welcome,
)
from protocol.sequencing import EventBacklog
from protocol.state import Phase, is_terminal
from protocol.versions import supported_versions

from . import metrics
from .backoff import Verdict, backoff, classify, is_unauthorized
from .base import Supervisor, SupervisorConnector
from .console_sessions import ConsoleSessions
from .credentials import Attempt, HostCredentials, NoCredential

#: Unacknowledged bytes a connection may have on the wire (see WebSocketConnector).
SEND_WINDOW_BYTES = 4 * 1024 * 1024

log = logging.getLogger("connector.websocket")

SOFTWARE = "switchboard-supervisor/0.1"
#: Events held before the first Welcome at most; past that, reporting waits for it.
MAX_UNNUMBERED = 4096
#: Seconds a run's progress (a phase that is not its last) waits for company before it
#: goes out: a short job's phases then travel, and are stored, together with its end
#: instead of one message and one write each. An event that ends a run goes at once.
PROGRESS_LINGER_S = 0.002
#: Bytes of frames written at once, about (a larger frame goes alone).
WRITE_BYTES = 256 * 1024
#: Seconds a power_result may take to go out before it is given up (the switchboard's
#: caller then times out).
POWER_SEND_TIMEOUT_S = 10.0


class _Write:
    """Frames going out in one write to the socket, and the events among them."""

    __slots__ = ("frames", "seqs", "size")

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.seqs: list[int] = []
        self.size = 0

    def add(self, seq: int | None, frame: bytes) -> None:
        self.frames.append(frame)
        self.size += len(frame)
        if seq is not None:
            self.seqs.append(seq)

    async def send(self, ws: ClientConnection, connection: Connection) -> None:
        """Write the frames (text messages, in order) at once, then mark their events sent."""
        if not self.frames:
            return
        async with ws.send_context():
            for frame in self.frames:
                ws.protocol.send_text(frame)
            ws.transport.write(b"".join(ws.protocol.data_to_send()))
        for seq in self.seqs:
            if connection.sent(seq):
                metrics.EVENTS_RESENT.inc()
        self.frames, self.seqs, self.size = [], [], 0


class ConnectorFatalError(Exception):
    """The switchboard refused this supervisor in a way retrying won't fix."""


class WebSocketConnector(SupervisorConnector):
    def __init__(
        self,
        supervisor: Supervisor,
        url: str | Sequence[str],
        token: str | HostCredentials,
        *,
        supervisor_id: str,
        name: str | None = None,
        max_backlog_bytes: int = 64 * 1024 * 1024,
        send_window_bytes: int = SEND_WINDOW_BYTES,
        backoff_factory: Callable[[], Iterator[float]] = backoff,
        classify_error: Callable[[BaseException], Verdict] = classify,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout_s: float = 10.0,
    ) -> None:
        self.supervisor = supervisor
        #: The switchboard's addresses (replicas of one lab): one at a time is used, the
        #: next when it fails (see run).
        self.urls = [url] if isinstance(url, str) else list(url)
        if not self.urls:
            raise ValueError("a connector needs a switchboard URL")
        self._url_index = 0
        #: What to present on each attempt (a plain token: that token, always).
        self.credentials = (
            token
            if isinstance(token, HostCredentials)
            else HostCredentials(supervisor_id, token, None)
        )
        self._attempt: Attempt | None = None
        self.supervisor_id = supervisor_id
        self.name = name or supervisor_id
        self.backlog = EventBacklog(max_backlog_bytes)
        self._backoff_factory = backoff_factory
        self._classify = classify_error
        self._ssl = ssl_context
        self._handshake_timeout = handshake_timeout_s
        self._room = asyncio.Condition()
        self._new_event = asyncio.Event()
        self._linger: asyncio.TimerHandle | None = None
        self._stopping = asyncio.Event()
        #: Bytes sent on this connection and not yet acknowledged, and the most allowed: the
        #: backlog may hold much more (for a dropped link), but only a window of it travels
        #: at once, so what a live follower sees lags what the job wrote by little.
        self._in_flight = 0
        self._send_window = send_window_bytes
        self._window_open = asyncio.Event()
        self._welcomed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Set while a connection is established (after the Welcome); tests wait on it.
        self.connected = asyncio.Event()
        #: The last close's retry-after hint from the switchboard, if any.
        self._retry_after: float | None = None
        self.session: int | None = None
        #: Connections established so far (a Welcome received).
        self.sessions = 0
        supervisor.attach(self)

    @property
    def url(self) -> str:
        """The address used now (the last connected or being tried)."""
        return self.urls[self._url_index]

    # --- SupervisorConnector ---------------------------------------------------------

    async def send_event(self, event: SupervisorEvent) -> None:
        if not self.backlog.has_room():
            async with self._room:
                await self._room.wait_for(self.backlog.has_room)
        if len(self.backlog.held) >= MAX_UNNUMBERED:
            await self._welcomed.wait()
        self.backlog.report(event)
        metrics.BACKLOG_BYTES.set(self.backlog.size_bytes)
        if isinstance(event, JobStateChanged) and not is_terminal(event.phase):
            if self._linger is None and not self._new_event.is_set():
                self._linger = asyncio.get_running_loop().call_later(
                    PROGRESS_LINGER_S, self._wake_writer
                )
        else:
            self._wake_writer()

    def _wake_writer(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self._new_event.set()

    async def delivered(self) -> None:
        """Wait for the first Welcome, then until every event reported so far is
        acknowledged (across reconnects)."""
        await self._welcomed.wait()
        target = self.backlog.last_seq
        async with self._room:
            await self._room.wait_for(lambda: self.backlog.acknowledged_through(target))

    async def run(self) -> int:
        """Connect, and reconnect after every failure, until stop() or a fatal refusal."""
        await self.supervisor.recover()
        delays = self._backoff_factory()
        #: Addresses that failed since the last backoff wait or the last established
        #: connection: while some are untried, the next is tried at once (failover).
        failed_in_round = 0
        while not self._stopping.is_set():
            sessions_before = self.sessions
            try:
                await self._connect_once()
                why = "the connection closed"
            except NoCredential as exc:
                raise ConnectorFatalError(str(exc)) from exc
            except (OSError, TimeoutError, websockets.WebSocketException, FrameError) as exc:
                why = _describe(exc)
                if is_unauthorized(exc) and self._attempt is not None:
                    # Refused: the credentials may have something else to present (an
                    # enrolment, a credential whose enrolment was stored meanwhile).
                    at_upgrade = isinstance(exc, InvalidStatus)
                    if not self.credentials.refused(self._attempt, at_upgrade=at_upgrade):
                        raise ConnectorFatalError(why) from exc
                    why = f"the {self._attempt.presented.value} was refused: {why}"
                    if self.sessions == sessions_before:
                        log.warning("%s; trying again at once", why)
                        continue  # bounded: each refusal uses up what was presented
                elif self._classify(exc) is Verdict.FATAL:
                    raise ConnectorFatalError(why) from exc
            if self._stopping.is_set():
                break
            if self.sessions != sessions_before:
                # The link worked until it broke: back off from the start again, not from
                # where a run of failed attempts had left the delay.
                delays = self._backoff_factory()
                failed_in_round = 0
            failed_in_round += 1
            if failed_in_round < len(self.urls):
                # Another replica of the lab may be up: try it now, not after a backoff
                # (the hint of the one that failed is about that one).
                failed = self.url
                self._url_index = (self._url_index + 1) % len(self.urls)
                metrics.FAILOVERS.inc()
                log.warning("%s (%s); trying %s", why, failed, self.url)
                continue
            failed_in_round = 0
            # The switchboard's hint (e.g. it is restarting) is a floor under the backoff.
            delay = max(next(delays), self._retry_after or 0.0)
            self._retry_after = None
            log.warning("%s (%s); reconnecting in %.2fs", why, self.url, delay)
            if len(self.urls) > 1:
                self._url_index = (self._url_index + 1) % len(self.urls)
                metrics.FAILOVERS.inc()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
        return 0

    def stop(self) -> None:
        """Make run() return after closing the current connection."""
        self._stopping.set()

    # --- one connection --------------------------------------------------------------

    async def _connect_once(self) -> None:
        self._attempt = attempt = self.credentials.next_attempt()
        async with websockets.connect(
            self.url,
            additional_headers={"Authorization": f"Bearer {attempt.token}"},
            subprotocols=[websockets.Subprotocol(limits.SUBPROTOCOL)],
            max_size=limits.MAX_FRAME_BYTES,
            open_timeout=self._handshake_timeout,
            ssl=self._ssl,
            compression=None,  # output is already chunked; deflate costs more CPU than it saves
            ping_interval=None,  # liveness is the protocol's Heartbeat, with Welcome's settings
            create_connection=_SayingConnection,
        ) as ws:
            connection = Connection(Role.SUPERVISOR, backlog=self.backlog)
            welcome = await self._handshake(ws, connection, attempt)
            self.credentials.welcomed(attempt, welcome.enrolled)
            self.session = welcome.session
            self.sessions += 1
            if self.sessions > 1:
                metrics.RECONNECTS.inc()
            self._in_flight = 0
            async with self._room:
                self._room.notify_all()
            self.connected.set()
            log.info(
                "connected to %s as %s (session %d, resuming after seq %d)",
                self.url,
                self.supervisor_id,
                welcome.session,
                welcome.last_seq,
            )
            try:
                await self._serve(ws, connection, welcome)
            finally:
                self.connected.clear()

    def _runs_for_hello(self) -> list[HeldRun]:
        """The runs held now, plus those whose reports wait for the first Welcome (a run
        re-adopted after a restart may already have ended): the switchboard must not take
        those for lost before their reports arrive."""
        runs = {(r.job_id, r.attempt): r for r in self.supervisor.held_runs()}
        for event in self.backlog.held:
            key = (event.job_id, event.attempt)
            if isinstance(event, JobStateChanged):
                runs[key] = HeldRun(event.job_id, event.attempt, event.phase)
            elif key not in runs:
                runs[key] = HeldRun(event.job_id, event.attempt, Phase.RUNNING)
        return list(runs.values())

    async def _handshake(
        self, ws: ClientConnection, connection: Connection, attempt: Attempt
    ) -> Welcome:
        caps = self.supervisor.capabilities()
        hello = Hello(
            supervisor_id=self.supervisor_id,
            name=self.name,
            versions=supported_versions(),
            backends=caps.backends,
            labels=caps.labels,
            resources=caps.resources,
            max_jobs=caps.max_jobs,
            runs=self._runs_for_hello(),
            last_seq=self.backlog.last_seq,
            software=SOFTWARE,
            credential_sha256=attempt.credential_sha256,
            devices=caps.devices,
        )
        await ws.send(connection.send(hello), text=True)  # type: ignore[arg-type]
        raw = await asyncio.wait_for(_receive(ws), self._handshake_timeout)
        match frames.receive(connection, raw):
            case Goodbye() as goodbye:
                raise await _say_goodbye(ws, goodbye)
            case ProtocolErrorMessage(code=code, reason=reason):
                raise FrameError(CloseCode(code), f"switchboard refused: {reason}")
            case Welcome() as welcome:
                # The backlog has taken it: what it holds above welcome.last_seq is sent.
                metrics.BACKLOG_BYTES.set(self.backlog.size_bytes)
                self._welcomed.set()
                return welcome
        raise AssertionError("the connection lets nothing else through")

    async def _serve(self, ws: ClientConnection, connection: Connection, welcome: Welcome) -> None:
        last_heard = [time.monotonic()]
        writer = asyncio.create_task(self._write_loop(ws, connection))
        beat = asyncio.create_task(self._heartbeat_loop(ws, connection, welcome, last_heard))
        stopper = asyncio.create_task(self._stopping.wait())

        async def send(message: SupervisorMessage) -> None:
            frame = connection.send(message)
            if frame is not None:
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(frame, text=True)

        consoles = ConsoleSessions(self.supervisor, send)
        reader = asyncio.create_task(self._read_loop(ws, connection, last_heard, consoles))
        try:
            done, _ = await asyncio.wait(
                {writer, beat, stopper, reader}, return_when=asyncio.FIRST_COMPLETED
            )
            if stopper in done:
                await ws.close(CloseCode.GOING_AWAY, "supervisor shutting down")
            for task in done:
                if task is not stopper and not task.cancelled() and task.exception():
                    raise task.exception()  # type: ignore[misc]
        finally:
            consoles.close()
            for task in (writer, beat, stopper, reader):
                task.cancel()
            await asyncio.gather(writer, beat, stopper, reader, return_exceptions=True)

    async def _read_loop(
        self,
        ws: ClientConnection,
        connection: Connection,
        last_heard: list[float],
        consoles: ConsoleSessions,
    ) -> None:
        while True:
            try:
                raw = await _receive(ws)
            except ConnectionClosedOK:
                return
            last_heard[0] = time.monotonic()
            match frames.receive(connection, raw):
                case Goodbye() as goodbye:
                    raise await _say_goodbye(ws, goodbye)
                case Acknowledged(dropped=dropped, freed_bytes=freed, problems=problems):
                    for problem in problems:
                        # The switchboard's word on an event of ours: a bug to fix here.
                        metrics.EVENT_PROBLEMS.labels(problem.code.value).inc()
                        log.warning(
                            "switchboard: event %d: %s: %s",
                            problem.seq,
                            problem.code.value,
                            problem.reason,
                        )
                    if not dropped:
                        continue
                    metrics.BACKLOG_BYTES.set(self.backlog.size_bytes)
                    # Only sent events are acknowledged: all of these were in flight.
                    self._in_flight = max(0, self._in_flight - freed)
                    self._window_open.set()
                    async with self._room:
                        self._room.notify_all()
                case StartJob() as start:
                    self._spawn(self._start(start))
                case StopJob() as stop:
                    self._spawn(self.supervisor.stop_job(stop))
                case Power() as request:
                    self._spawn(self._power(ws, connection, request))
                case ConsoleAttach() as attach:
                    consoles.attach(attach)
                case ConsoleInput(session=session, data=data):
                    consoles.write(session, data)
                case ConsoleDetach(session=session):
                    consoles.detach(session)
                case StatusRequest() as request:
                    # Queued behind the events reported so far (the writer sends it).
                    connection.status_reply(request, self.supervisor.held_runs())
                    self._new_event.set()
                case ProtocolErrorMessage(code=code, reason=reason, retry_after_s=wait):
                    log.warning("switchboard is closing the connection: %s (%d)", reason, code)
                    self._retry_after = wait

    def _window_shut(self, size: int) -> bool:
        """Whether a frame of `size` bytes must wait for acknowledgements first."""
        return self._in_flight > 0 and self._in_flight + size > self._send_window

    async def _write_loop(self, ws: ClientConnection, connection: Connection) -> None:
        while True:
            batch = connection.outgoing(64)
            if not batch:
                self._new_event.clear()
                await self._new_event.wait()
                continue
            # What may go now goes in one write (a short run's events: one segment, so
            # the switchboard reads and stores them together); a write waits for the
            # window only once what came before it has gone.
            write = _Write()
            for seq, frame in batch:
                if write.size and write.size + len(frame) > WRITE_BYTES:
                    await write.send(ws, connection)
                if seq is None:  # a StatusReply: not an event, not in the send window
                    write.add(None, frame)
                    continue
                while self._window_shut(len(frame)):
                    await write.send(ws, connection)
                    if not self._window_shut(len(frame)):
                        break
                    self._window_open.clear()
                    await self._window_open.wait()
                write.add(seq, frame)
                self._in_flight += len(frame)
            await write.send(ws, connection)

    async def _heartbeat_loop(
        self,
        ws: ClientConnection,
        connection: Connection,
        welcome: Welcome,
        last_heard: list[float],
    ) -> None:
        while True:
            await asyncio.sleep(welcome.heartbeat_interval_s)
            silent = time.monotonic() - last_heard[0] > welcome.heartbeat_timeout_s
            if not silent:
                # A send queues behind output already on its way: if that doesn't drain
                # within the timeout either, the link is stalled all the same.
                try:
                    heartbeat = connection.send(Heartbeat(at=time.time()))
                    if heartbeat is not None:
                        await asyncio.wait_for(
                            ws.send(heartbeat, text=True), welcome.heartbeat_timeout_s
                        )
                except TimeoutError:
                    silent = True
            if silent:
                # The link is dead or stalled: a closing handshake would only wait on it.
                ws.transport.abort()
                raise TimeoutError("no heartbeat from the switchboard")

    async def _start(self, start: StartJob) -> None:
        run = RunRef(start.job_id, start.attempt)
        try:
            await self.supervisor.start_job(start)
        except JobError as exc:
            # A refusal is reported as the error, then the run's end: `rejected`.
            await self.report_job_error(run, exc.kind, exc.description)
            await self.update_job_state(run, Phase.REJECTED, message=str(exc))

    async def _power(self, ws: ClientConnection, connection: Connection, request: Power) -> None:
        """Run a power command in the background and answer with its result: not an event
        (not numbered, not resent), so it goes straight out, with a deadline; lost with
        the connection, the switchboard's caller times out."""
        result = await self.supervisor.power(request)
        frame = connection.send(result)
        if frame is not None:
            with contextlib.suppress(TimeoutError, ConnectionClosed):
                await asyncio.wait_for(ws.send(frame, text=True), POWER_SEND_TIMEOUT_S)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("request handler failed", exc_info=task.exception())


class _SayingProtocol(frames.SaysBeforeFailing, ClientProtocol):
    """websockets' client side, which sends a protocol_error before it fails a connection
    for what the switchboard sent: a message over the size limit (1009; the frame is never
    read whole), a text message that is not valid UTF-8 (1007). protocol.frames says what."""


class _SayingConnection(ClientConnection):
    def __init__(self, protocol: ClientProtocol, **kwargs: Any) -> None:
        # websockets.connect builds the ClientProtocol, with no way to name another class:
        # make it ours (a method more, and a field set only on refusing), keeping every
        # argument it was given.
        protocol.__class__ = _SayingProtocol
        super().__init__(protocol, **kwargs)


async def _receive(ws: ClientConnection) -> str | bytes:
    """The next message (str: text, bytes: binary). A message the WebSocket layer refused
    (the switchboard was told) raises FrameError, counted; ConnectionClosed otherwise."""
    try:
        return await ws.recv()
    except ConnectionClosedError:
        refused = getattr(ws.protocol, "refused", None)
        if refused is None:
            raise
        metrics.PROTOCOL_ERRORS.labels(str(refused.code)).inc()
        raise FrameError(CloseCode(refused.code), refused.reason) from None


async def _say_goodbye(ws: ClientConnection, goodbye: Goodbye) -> FrameError:
    """Send the connection's goodbye (a protocol_error, then the close), and return the
    error to raise (counted: the switchboard sent what the protocol refuses)."""
    metrics.PROTOCOL_ERRORS.labels(str(int(goodbye.code))).inc()
    with contextlib.suppress(websockets.WebSocketException, OSError):
        await ws.send(goodbye.frame, text=True)
        await ws.close(goodbye.code, goodbye.close_reason)
    return FrameError(goodbye.code, goodbye.reason)


#: OpenSSL's verify codes for a certificate that is fine but names another host or address.
_NAME_MISMATCH = frozenset({62, 64})  # X509_V_ERR_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        # Retried like any failed connect (a switchboard mid-rotation may fix it), but a
        # wrong trust anchor never fixes itself: say what to change.
        if exc.verify_code in _NAME_MISMATCH:
            hint = "connect by a host name or address the certificate lists"
        else:
            hint = "if a private CA signed it, give that CA with --ca-file or $SUPERVISOR_CA_FILE"
        return (
            f"the switchboard's TLS certificate could not be verified "
            f"({exc.verify_message}); {hint}"
        )
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake with the switchboard failed ({exc}); does it serve TLS there?"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
