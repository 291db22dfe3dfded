"""The supervisor's side of a device console (supervisor.console) on a real
pseudo-terminal, and the bounds of attached sessions on both sides
(connector.console_sessions, switchboard.console_relay). The tty's other end is the
test's: what it writes is what the board prints."""

from __future__ import annotations

import asyncio
import os
import tty
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from connector.base import Supervisor
from connector.console_sessions import SESSION_BUFFER_BYTES, ConsoleSessions
from protocol.messages import ConsoleAttach, ConsoleClosed, ConsoleData, RunRef
from supervisor.config import ConsoleConfig, DeviceConfig
from supervisor.console import Consoles
from switchboard.console_relay import ConsoleRelay

pytestmark = pytest.mark.unit

RUN = RunRef("job-1", 1)


class Board:
    """The far end of a pty: the console a Consoles opens by path."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        os.set_blocking(self.master, False)

    async def print(self, data: bytes) -> None:
        """Write to the console as a board does: as fast as the reader takes it."""
        while data:
            try:
                data = data[os.write(self.master, data) :]
            except BlockingIOError:
                await asyncio.sleep(0.005)

    async def read(self, size: int) -> bytes:
        while True:
            try:
                return os.read(self.master, size)
            except BlockingIOError:
                await asyncio.sleep(0.005)

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


class Sent:
    """Where a run's console stream goes: what the connector was handed, in order."""

    def __init__(self) -> None:
        self.chunks: list[tuple[RunRef, str, int, bytes]] = []
        self.delivered = asyncio.Event()

    async def send(self, run: RunRef, stream: str, offset: int, data: bytes) -> None:
        self.chunks.append((run, stream, offset, data))

    async def wait_delivered(self) -> None:
        await self.delivered.wait()

    def stream(self) -> bytes:
        out = b""
        for _, _, offset, data in self.chunks:
            assert offset == len(out), "each chunk continues the last"
            out += data
        return out


@pytest.fixture
async def board() -> AsyncIterator[Board]:
    b = Board()
    yield b
    b.close()


def _consoles(board: Board, root: Path) -> Consoles:
    device = DeviceConfig(
        name="board-1",
        path="/dev/null",
        resource="simboard",
        console=ConsoleConfig(path=board.path, baud=115200),
    )
    return Consoles([device], root / "console")


async def _until(check, what: str, within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_what_the_console_prints_while_a_run_holds_it_is_its_stream(
    board: Board, tmp_path: Path
) -> None:
    consoles = _consoles(board, tmp_path)
    consoles.open()
    sent = Sent()
    try:
        await board.print(b"before the run\r\n")  # nobody's: no run holds the board
        await asyncio.sleep(0.1)
        consoles.claim(RUN, ["board-1", "not-here"], sent.send)
        printed = b"".join(b"line %d \xff\r\n" % i for i in range(2000))
        for start in range(0, len(printed), 1000):
            await board.print(printed[start : start + 1000])
        await _until(lambda: len(sent.stream()) == len(printed), "the whole stream sent")
        assert sent.stream() == printed
        assert {stream for _, stream, _, _ in sent.chunks} == {"console:board-1"}
        spool = tmp_path / "console" / "job-1.1" / "board-1"
        assert spool.read_bytes() == printed  # on disk before it was sent
        await consoles.release(RUN, sent.wait_delivered)
        await board.print(b"after the run\r\n")  # nobody's again
        await asyncio.sleep(0.1)
        assert sent.stream() == printed
        assert spool.exists()  # kept until acknowledged...
        sent.delivered.set()
        await _until(lambda: not spool.exists(), "the spool removed once acknowledged")
    finally:
        await consoles.close()


async def test_a_spool_left_by_a_killed_supervisor_is_sent_once_connected(
    board: Board, tmp_path: Path
) -> None:
    first = _consoles(board, tmp_path)
    first.open()

    async def never(run: RunRef, stream: str, offset: int, data: bytes) -> None:
        await asyncio.Event().wait()  # the link is down: nothing gets out

    first.claim(RUN, ["board-1"], never)
    said = b"spooled \x00\xff before the kill\r\n"
    await board.print(said)
    spool = tmp_path / "console" / "job-1.1" / "board-1"
    await _until(lambda: spool.exists() and spool.stat().st_size == len(said), "spooled")
    await first.close()  # the process is gone; its files stay

    second = _consoles(board, tmp_path)
    second.open()
    link = Link()
    try:
        second.recover(set(), link.send, link.delivered)  # the run did not survive
        await asyncio.sleep(0.1)
        assert link.sent.chunks == []  # not before the Welcome
        link.connected.set()
        await _until(lambda: link.sent.chunks, "the spool sent")
        assert link.sent.stream() == said
        assert link.sent.chunks[0][:3] == (RUN, "console:board-1", 0)
        await asyncio.sleep(0.1)
        assert spool.exists()  # not acknowledged yet
        link.acknowledge()
        await _until(lambda: not spool.parent.exists(), "the spool removed")
    finally:
        await second.close()


class Link:
    """A connector's delivery as the consoles see it: nothing before the Welcome, and
    `delivered` once everything handed over so far is acknowledged."""

    def __init__(self) -> None:
        self.sent = Sent()
        self.connected = asyncio.Event()
        self.unacked = 0
        self._acked = asyncio.Event()

    async def send(self, run: RunRef, stream: str, offset: int, data: bytes) -> None:
        self.unacked += 1
        self._acked.clear()
        await self.sent.send(run, stream, offset, data)

    async def delivered(self) -> None:
        await self.connected.wait()
        while self.unacked:
            await self._acked.wait()

    def acknowledge(self) -> None:
        self.unacked = 0
        self._acked.set()


async def test_a_re_adopted_run_goes_on_from_offset_0(board: Board, tmp_path: Path) -> None:
    first = _consoles(board, tmp_path)
    first.open()
    first.claim(RUN, ["board-1"], Sent().send)
    await board.print(b"one ")
    spool = tmp_path / "console" / "job-1.1" / "board-1"
    await _until(lambda: spool.exists() and spool.stat().st_size == 4, "spooled")
    await first.close()
    second = _consoles(board, tmp_path)
    second.open()
    sent = Sent()
    try:
        second.recover({RUN}, sent.send, sent.wait_delivered)
        second.claim(RUN, ["board-1"], sent.send)  # as the supervisor does: no second spool
        await board.print(b"two")
        await _until(lambda: sent.stream() == b"one two", "the stream continued")
    finally:
        await second.close()


async def test_attached_listeners_get_every_byte_with_offsets_and_input_reaches_the_board(
    board: Board, tmp_path: Path
) -> None:
    consoles = _consoles(board, tmp_path)
    consoles.open()
    got: list[tuple[int, bytes]] = []
    try:
        assert consoles.attach("nope", object(), lambda o, d: None) is not None
        key = object()
        assert consoles.attach("board-1", key, lambda o, d: got.append((o, d))) is None
        await board.print(b"hello ")
        await board.print(b"world")
        await _until(lambda: b"".join(d for _, d in got) == b"hello world", "both pieces")
        offset = 0
        for piece_offset, data in got:
            assert piece_offset == offset
            offset += len(data)
        assert consoles.write("board-1", b"ping\r") == 5
        assert await board.read(100) == b"ping\r"
        consoles.detach("board-1", key)
        await board.print(b"gone")
        await asyncio.sleep(0.1)
        assert b"gone" not in b"".join(d for _, d in got)
    finally:
        await consoles.close()


async def test_a_console_that_cannot_be_opened_is_tried_again(tmp_path: Path) -> None:
    path = tmp_path / "tty"  # not there yet: a board unplugged
    device = DeviceConfig(
        name="board-1",
        path="/dev/null",
        resource="simboard",
        console=ConsoleConfig(path=str(path)),
    )
    consoles = Consoles([device], tmp_path / "console")
    consoles.open()
    board = Board()
    try:
        port = consoles.ports["board-1"]
        assert port.fd < 0 and port.error is not None and "can't open" in port.error
        path.symlink_to(board.path)  # plugged in
        await _until(lambda: port.fd >= 0, "the console opened")
        assert port.error is None
    finally:
        await consoles.close()
        board.close()


async def test_a_console_that_is_the_runs_device_node_is_the_jobs_while_it_runs(
    board: Board, tmp_path: Path
) -> None:
    """Its tty is the node the job is given: two readers would steal each other's bytes,
    so the supervisor lets go of it for the run, and takes it back after."""
    device = DeviceConfig(
        name="board-1",
        path=board.path,
        resource="simboard",
        console=ConsoleConfig(path=board.path),
    )
    consoles = Consoles([device], tmp_path / "console")
    consoles.open()
    sent = Sent()
    try:
        port = consoles.ports["board-1"]
        assert port.fd >= 0
        consoles.claim(RUN, ["board-1"], sent.send)
        assert port.fd < 0
        refused = consoles.attach("board-1", object(), lambda o, d: None)
        assert refused is not None and "job-1#1" in refused
        await board.print(b"for the job\r\n")
        await asyncio.sleep(0.1)
        assert sent.chunks == [] and not (tmp_path / "console" / "job-1.1").exists()
        await consoles.release(RUN, sent.wait_delivered)
        assert port.fd >= 0 and consoles.attach("board-1", object(), lambda o, d: None) is None
    finally:
        await consoles.close()


class _Host(Supervisor):
    """A supervisor whose one console is fed by the test."""

    def __init__(self) -> None:
        self.listeners: dict[object, object] = {}

    def attach_console(self, device_id, key, listener):  # type: ignore[no-untyped-def]
        if device_id != "board-1":
            return f"device {device_id} has no console on this host"
        self.listeners[key] = listener
        return None

    def detach_console(self, device_id, key):  # type: ignore[no-untyped-def]
        self.listeners.pop(key, None)

    async def start_job(self, start):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    async def stop_job(self, stop):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def held_runs(self):  # type: ignore[no-untyped-def]
        return []

    async def recover(self) -> None:
        pass

    def capabilities(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    async def shutdown(self, grace_s: float = 10.0) -> None:
        pass


async def test_a_session_that_falls_behind_is_ended_with_the_reason() -> None:
    host = _Host()
    said: list[object] = []
    link_open = asyncio.Event()

    async def send(message) -> None:  # type: ignore[no-untyped-def]
        if isinstance(message, ConsoleData):
            await link_open.wait()  # the link does not take console data
        said.append(message)

    sessions = ConsoleSessions(host, send)
    sessions.attach(ConsoleAttach(session=1, device_id="nope"))
    sessions.attach(ConsoleAttach(session=2, device_id="board-1"))
    await asyncio.sleep(0.01)
    assert said == [ConsoleClosed(session=1, reason="device nope has no console on this host")]
    [listener] = host.listeners.values()
    listener(0, b"x" * 1000)  # taken by the sender, which then waits on the link
    await asyncio.sleep(0.01)
    piece = b"y" * 65536
    for i in range(SESSION_BUFFER_BYTES // len(piece) + 1):
        listener(1000 + i * len(piece), piece)  # never waits, whatever the link does
    await asyncio.sleep(0.01)
    closed = [m for m in said if isinstance(m, ConsoleClosed) and m.session == 2]
    assert closed and "fell behind" in closed[0].reason
    assert host.listeners == {}  # detached: the console no longer feeds it
    sessions.close()


async def test_the_switchboards_relay_drops_a_client_that_does_not_keep_up() -> None:
    relay = ConsoleRelay(buffer_bytes=1000)
    relay.feed(0, b"a" * 600)
    relay.feed(600, b"b" * 300)
    assert await relay.take() == [(0, b"a" * 600), (600, b"b" * 300)]
    relay.feed(900, b"c" * 700)
    relay.feed(1600, b"d" * 400)  # 1100 waiting: over the bound
    assert relay.ended is not None and relay.ended_by == "too_slow"
    assert await relay.take() is None
    relay.feed(2000, b"e")  # ignored, nothing grows
    ended = ConsoleRelay()
    ended.closed("supervisor sup-1 disconnected")
    assert ended.ended_by == "supervisor" and await ended.take() is None
