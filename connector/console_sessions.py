"""Attached console sessions on one connection to a switchboard (protocol 1.6): a
`console_attach` starts one, its device's console output goes back as `console_data`,
`console_input` is written to the console, `console_detach` (or the connection's end)
ends it.

Not events: nothing is numbered or resent, a session lives and dies with its connection.
Each session is bounded: what its console prints waits in a buffer of at most
SESSION_BUFFER_BYTES for its sender, which sends it (at most MAX_CONSOLE_DATA a message)
with a deadline. A session whose buffer fills or whose send misses the deadline is ended
with `console_closed` saying why: it never holds up the connection's events or the
console (a run's stream is captured apart, on disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from protocol.limits import MAX_CONSOLE_DATA
from protocol.messages import ConsoleAttach, ConsoleClosed, ConsoleData, SupervisorMessage

from .base import Supervisor

log = logging.getLogger("connector.console")

#: Bytes of console output one session may have waiting to be sent.
SESSION_BUFFER_BYTES = 1024 * 1024
#: Seconds one `console_data` may take to go out.
SEND_TIMEOUT_S = 10.0
#: Sessions one connection may hold at once.
MAX_SESSIONS = 64

#: Sends one message on the connection (None: closed), waiting for the socket.
Send = Callable[[SupervisorMessage], Awaitable[None]]


class _Session:
    def __init__(self, sessions: ConsoleSessions, number: int, device_id: str) -> None:
        self.sessions = sessions
        self.number = number
        self.device_id = device_id
        self.pending = bytearray()
        self.offset = 0  # of pending[0] in the console
        self.wake = asyncio.Event()
        self.ended: str | None = None
        self.task: asyncio.Task[None] | None = None

    def feed(self, offset: int, data: bytes) -> None:
        """What the console printed (called on the loop by the console's reader)."""
        if self.ended is not None:
            return
        if len(self.pending) + len(data) > SESSION_BUFFER_BYTES:
            self.sessions.end(self.number, f"fell behind: {SESSION_BUFFER_BYTES} bytes not sent")
            return
        if not self.pending:
            self.offset = offset
        self.pending += data
        self.wake.set()

    async def run(self, send: Send) -> None:
        while self.ended is None:
            await self.wake.wait()
            self.wake.clear()
            while self.pending and self.ended is None:
                data = bytes(self.pending[:MAX_CONSOLE_DATA])
                del self.pending[:MAX_CONSOLE_DATA]
                offset = self.offset
                self.offset += len(data)
                message = ConsoleData(session=self.number, offset=offset, data=data)
                try:
                    await asyncio.wait_for(send(message), SEND_TIMEOUT_S)
                except TimeoutError:
                    self.sessions.end(self.number, f"a send took over {SEND_TIMEOUT_S:g} s")
                    return


class ConsoleSessions:
    """The sessions of one connection."""

    def __init__(self, supervisor: Supervisor, send: Send) -> None:
        self._supervisor = supervisor
        self._send = send
        self._sessions: dict[int, _Session] = {}
        self._goodbyes: set[asyncio.Task[None]] = set()

    def attach(self, request: ConsoleAttach) -> None:
        if request.session in self._sessions:
            return  # a repeat
        if len(self._sessions) >= MAX_SESSIONS:
            self._say_closed(request.session, f"{MAX_SESSIONS} sessions are attached already")
            return
        session = _Session(self, request.session, request.device_id)
        refused = self._supervisor.attach_console(request.device_id, session, session.feed)
        if refused is not None:
            self._say_closed(request.session, refused)
            return
        self._sessions[request.session] = session
        session.task = asyncio.get_running_loop().create_task(
            session.run(self._send), name=f"console session {request.session}"
        )
        log.info("console of %s: session %d attached", request.device_id, request.session)

    def write(self, number: int, data: bytes) -> None:
        session = self._sessions.get(number)
        if session is not None:
            taken = self._supervisor.write_console(session.device_id, data)
            if taken < len(data):
                log.debug(
                    "console of %s: %d input byte(s) dropped", session.device_id, len(data) - taken
                )

    def detach(self, number: int) -> None:
        """The switchboard ended the session: nothing is said back."""
        session = self._sessions.pop(number, None)
        if session is not None:
            self._stop(session, "detached")

    def end(self, number: int, reason: str) -> None:
        """End a session from this side, telling the switchboard why."""
        session = self._sessions.pop(number, None)
        if session is None:
            return
        log.info("console of %s: session %d ended: %s", session.device_id, number, reason)
        self._stop(session, reason)
        self._say_closed(number, reason)

    def close(self) -> None:
        """The connection is over: every session with it."""
        for number in list(self._sessions):
            session = self._sessions.pop(number)
            self._stop(session, "the connection ended")
        for task in list(self._goodbyes):
            task.cancel()

    def _stop(self, session: _Session, reason: str) -> None:
        session.ended = reason
        session.wake.set()
        self._supervisor.detach_console(session.device_id, session)
        if session.task is not None and session.task is not asyncio.current_task():
            session.task.cancel()

    def _say_closed(self, number: int, reason: str) -> None:
        async def say() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._send(ConsoleClosed(session=number, reason=reason)), SEND_TIMEOUT_S
                )

        task = asyncio.get_running_loop().create_task(say())
        self._goodbyes.add(task)
        task.add_done_callback(self._goodbyes.discard)
