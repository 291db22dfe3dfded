"""A simulated development board behind a pseudo-terminal, for the hardware-lab tests.

There are no boards on the machines the tests run on, so this stands in for one: a process
that owns a pseudo-terminal (its tty path is linked at DIR/tty, like a udev symlink under
/dev/serial/by-id) and a power switch (a Unix socket at DIR/power.sock).

- Off (the state it starts in) it reads and drops whatever is written to its console, and
  says nothing.
- `on` boots it: a few lines of boot log, then the prompt `> `. At the prompt `ping`
  answers `pong`, `run-tests` prints a few test lines and `tests: N passed`, `selftest` (the
  health check) prints `selftest: ok`, or `selftest: FAIL ...` when the board is made to
  fail its check (`--fail-check`, or `fail-check on` on the power socket; `fail-check
  until-boot`: a fault its next boot clears, as a power cycle clears a wedged radio), and
  anything else `unknown command: ...`.
- `off` powers it down, `cycle` is off then on, `status` answers `on` or `off`.
- `chatter on` makes it print a numbered line (with bytes that are not UTF-8) every
  CHATTER_S, whatever its power, until `chatter off`: a console that keeps talking.
- Every byte it writes to its console is also appended to DIR/console.out, so a test can
  compare what a reader of the console got with what the board wrote.

Serve a board::

    python -m tests.simboard serve --dir /tmp/board-a [--fail-check]

Drive its power (what a lab's power command lines call; exit status 0 on success)::

    python -m tests.simboard power --dir /tmp/board-a on|off|cycle|status
    python -m tests.simboard power --dir /tmp/board-a fail-check on|off|until-boot

`SimBoard` below starts one as a child process and waits until it is ready.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import termios
import time
import tty
from collections.abc import Callable
from pathlib import Path

#: What the board prints when it boots, one line at a time.
BOOT_LOG = (
    "SimBoard bootloader v1.2",
    "clock: 64 MHz, flash: 1024 KiB, ram: 256 KiB",
    "loading firmware ... done",
    "simboard ready",
)
PROMPT = b"> "
#: Longest console line the board takes; a longer one is dropped (a real UART overruns).
MAX_LINE = 4096
#: Longest power command (and its answer) on the socket.
MAX_COMMAND = 256
#: Seconds between two lines of a chattering board.
CHATTER_S = 0.01
#: What the board has written to its console, under its directory.
RECORD = "console.out"


def chatter_line(n: int) -> bytes:
    """The `n`th line a chattering board prints: numbered, with two bytes that are not
    UTF-8 and an escape sequence, as real consoles print."""
    return f"tick {n:06d} ".encode() + b"\xff\xfe \x1b[1mok\x1b[0m\r\n"


class Board:
    """The board's state and what it answers; the I/O loop is `serve`."""

    def __init__(self, fail_check: bool = False) -> None:
        self.on = False
        self.fail_check = fail_check
        #: The failure lasts until the next boot only.
        self.fault_until_boot = False
        self.boots = 0
        self.chatter = False
        self.chatted = 0
        self._line = bytearray()

    def power(self, command: str) -> tuple[str, bytes]:
        """A power-socket command: (the answer, what the console prints because of it)."""
        words = command.split()
        match words:
            case ["on"]:
                return "ok", b"" if self.on else self._boot()
            case ["off"]:
                self.on = False
                self._line.clear()
                return "ok", b""
            case ["cycle"]:
                self.on = False
                self._line.clear()
                return "ok", self._boot()
            case ["status"]:
                return ("on" if self.on else "off"), b""
            case ["fail-check", ("on" | "off" | "until-boot") as flag]:
                self.fail_check = flag != "off"
                self.fault_until_boot = flag == "until-boot"
                return "ok", b""
            case ["chatter", ("on" | "off") as flag]:
                self.chatter = flag == "on"
                return "ok", b""
        return f"error: unknown command {command!r}", b""

    def _boot(self) -> bytes:
        self.on = True
        self.boots += 1
        if self.fault_until_boot:
            self.fail_check = self.fault_until_boot = False
        return "".join(f"{line}\r\n" for line in BOOT_LOG).encode() + PROMPT

    def console_input(self, data: bytes) -> bytes:
        """Bytes written to the console: what the board answers (nothing while off)."""
        if not self.on:
            return b""
        out = bytearray()
        for byte in data:
            if byte in b"\r\n":
                if self._line or byte == ord("\r"):
                    out += self._answer(self._line.decode("utf-8", "replace").strip())
                self._line.clear()
            elif len(self._line) < MAX_LINE:
                self._line.append(byte)
        return bytes(out)

    def _answer(self, line: str) -> bytes:
        match line:
            case "":
                lines: list[str] = []
            case "ping":
                lines = ["pong"]
            case "run-tests":
                lines = ["test gpio ... ok", "test uart ... ok", "test radio ... ok"]
                lines.append("tests: 3 passed")
            case "selftest":
                failed = "selftest: FAIL (radio not responding)"
                lines = [failed if self.fail_check else "selftest: ok"]
            case _:
                lines = [f"unknown command: {line}"]
        return "".join(f"{x}\r\n" for x in lines).encode() + PROMPT


def serve(directory: Path, fail_check: bool = False) -> None:
    """Run a board until SIGTERM: its tty linked at DIR/tty, its power at DIR/power.sock."""
    directory.mkdir(parents=True, exist_ok=True)
    master, slave = os.openpty()
    # Raw: what is written to the console reaches the board byte for byte (no echo, no
    # line editing), as a UART would pass it.
    tty.setraw(slave)
    attrs = termios.tcgetattr(slave)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    link = directory / "tty"
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    link.symlink_to(os.ttyname(slave))
    sock_path = directory / "power.sock"
    with contextlib.suppress(FileNotFoundError):
        sock_path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(8)
    os.set_blocking(master, False)
    board = Board(fail_check)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sel = selectors.DefaultSelector()
    sel.register(master, selectors.EVENT_READ, "console")
    sel.register(listener, selectors.EVENT_READ, "power")
    record = open(directory / RECORD, "ab", buffering=0)  # closed below

    def write(data: bytes) -> None:
        record.write(data[: _write_all(master, data)])

    # The slave stays open here: a reader closing its end never hangs the line up.
    print(f"ready {os.ttyname(slave)}", flush=True)
    next_line = time.monotonic()
    try:
        while not stopping:
            timeout = max(0.0, next_line - time.monotonic()) if board.chatter else 0.5
            for key, _ in sel.select(timeout=timeout):
                if key.data == "console":
                    try:
                        data = os.read(master, 4096)
                    except (BlockingIOError, InterruptedError):
                        continue
                    write(board.console_input(data))
                else:
                    _power_request(listener, board, write)
            if board.chatter and time.monotonic() >= next_line:
                board.chatted += 1
                write(chatter_line(board.chatted))
                next_line = time.monotonic() + CHATTER_S
    finally:
        record.close()
        sel.close()
        listener.close()
        for path in (sock_path, link):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        os.close(master)
        os.close(slave)


def _power_request(listener: socket.socket, board: Board, write: Callable[[bytes], None]) -> None:
    """Answer one power-socket command (what the console prints because of it first)."""
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(2.0)
        try:
            command = conn.recv(MAX_COMMAND).decode("utf-8", "replace").strip()
        except OSError:
            return
        answer, printed = board.power(command)
        write(printed)
        with contextlib.suppress(OSError):
            conn.sendall(answer.encode() + b"\n")


def _write_all(fd: int, data: bytes) -> int:
    """Write to the console; what nobody reads past the pty's buffer is dropped, as a UART
    with no listener drops it. How many bytes were written."""
    done = 0
    while done < len(data):
        try:
            done += os.write(fd, data[done:])
        except BlockingIOError:
            break
    return done


def power(directory: Path, command: str, timeout: float = 5.0) -> str:
    """Send a power command to the board served in `directory`; its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(directory / "power.sock"))
        sock.sendall(command.encode())
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(MAX_COMMAND):
            answer += chunk
    return answer.decode().strip()


class SimBoard:
    """A simulated board as a child process (`python -m tests.simboard serve`)."""

    def __init__(self, directory: Path, *, fail_check: bool = False) -> None:
        self.dir = directory
        args = [sys.executable, "-m", "tests.simboard", "serve", "--dir", str(directory)]
        if fail_check:
            args.append("--fail-check")
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parent.parent,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("ready "):
            self.stop()
            raise RuntimeError(f"the simulated board did not start: {line!r}")
        self.pts = line.split()[1]

    @property
    def tty(self) -> Path:
        """The console's path (a symlink to the pty, as udev makes them)."""
        return self.dir / "tty"

    def power(self, command: str) -> str:
        return power(self.dir, command)

    def written(self) -> bytes:
        """Every byte the board has written to its console so far."""
        return (self.dir / RECORD).read_bytes()

    def power_argv(self, command: str) -> list[str]:
        """The command line that drives this board's power (for a supervisor's config)."""
        return [sys.executable, "-m", "tests.simboard", "power", "--dir", str(self.dir), command]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> SimBoard:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


class Console:
    """The board's serial console opened as a client would open it (raw, non-blocking)."""

    def __init__(self, path: Path | str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.fd)
        self.seen = b""

    def send(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def read_until(self, marker: bytes, timeout: float = 5.0) -> bytes:
        """Everything read until `marker` has been seen (since the last call)."""
        deadline = time.monotonic() + timeout
        sel = selectors.DefaultSelector()
        sel.register(self.fd, selectors.EVENT_READ)
        try:
            while marker not in self.seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {marker!r} on the console; it said {self.seen!r}")
                if sel.select(left):
                    with contextlib.suppress(BlockingIOError):
                        self.seen += os.read(self.fd, 4096)
        finally:
            sel.close()
        at = self.seen.index(marker) + len(marker)
        got, self.seen = self.seen[:at], self.seen[at:]
        return got

    def quiet_for(self, seconds: float) -> bytes:
        """What the console says within `seconds` (b"" for a board that is off)."""
        sel = selectors.DefaultSelector()
        sel.register(self.fd, selectors.EVENT_READ)
        deadline = time.monotonic() + seconds
        try:
            while (left := deadline - time.monotonic()) > 0:
                if sel.select(left):
                    with contextlib.suppress(BlockingIOError):
                        self.seen += os.read(self.fd, 4096)
        finally:
            sel.close()
        got, self.seen = self.seen, b""
        return got

    def close(self) -> None:
        os.close(self.fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="simboard", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="run a simulated board")
    serve_p.add_argument("--dir", type=Path, required=True)
    serve_p.add_argument("--fail-check", action="store_true", help="its selftest fails")
    power_p = sub.add_parser("power", help="drive a board's power: on|off|cycle|status")
    power_p.add_argument("--dir", type=Path, required=True)
    power_p.add_argument("words", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.dir, args.fail_check)
        return 0
    try:
        answer = power(args.dir, " ".join(args.words))
    except OSError as exc:
        print(f"simboard-power: {args.dir}: {exc}", file=sys.stderr)
        return 2
    print(answer)
    return 1 if answer.startswith("error") else 0


if __name__ == "__main__":
    sys.exit(main())
