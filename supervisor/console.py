"""The host's serial consoles (docs/lab.md "Serial console"): each device's tty, opened
raw at its configured baud for as long as the supervisor declares the device, read on the
event loop (add_reader, non-blocking reads, never a blocking call).

What a console prints goes to:

- the run that holds the device (its StartJob's `devices` names it), as that run's output
  stream `console:<device>` (protocol 1.6), with stdout's guarantee: every byte read is
  first appended to a spool file on disk (WORK_DIR/console/<job>.<attempt>/<device>), and
  a sender hands the file's bytes to the connector in order, with their offsets. Memory
  holds one chunk per sender at most; the disk holds the rest while the link is slow or
  down. The file outlives the process: after a restart, a spool of a run that was
  re-adopted is continued and sent again from offset 0 (the switchboard keeps only what
  it lacks), and one of a run that did not survive is sent once connected (the
  switchboard stores the output of a lost run), then removed once acknowledged.
- every attached session (`switchboard device console`), live, best effort on the
  session's side (see connector.console_sessions).

Bytes the board prints while nothing reads the tty (the supervisor is down) stay in the
tty's buffer only as far as the kernel keeps them.

A device whose node (`path`) is its console itself (a Docker job given the board's
serial port, as in docs/lab.md's worked example) is the job's while its run holds it: the
supervisor closes the console for the run (two readers would steal each other's bytes)
and opens it again when the run ends. That run has no console stream; its program's own
output says what it read.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import termios
import tty
from collections.abc import Awaitable, Callable
from pathlib import Path

from protocol.limits import MAX_OUTPUT_CHUNK, console_stream
from protocol.messages import RunRef

from .config import DeviceConfig

log = logging.getLogger("supervisor.console")

#: Where the spools live, under the supervisor's work dir.
SPOOL_DIR = "console"
#: Seconds between attempts to open a console that can't be opened (unplugged).
REOPEN_S = 1.0
#: Bytes read from a tty at once.
READ_BYTES = 64 * 1024
#: The most one run's spool of one console keeps on disk: past it, what the console
#: prints is dropped (logged once), as the switchboard's own output cap would drop it.
MAX_SPOOL_BYTES = 1024**3

#: Sends bytes [offset, offset + len) of a run's stream (the connector's send_output).
SendOutput = Callable[[RunRef, str, int, bytes], Awaitable[None]]
#: Waits until every event reported so far is acknowledged (the connector's delivered).
Delivered = Callable[[], Awaitable[None]]
#: An attached session's listener: (offset of the bytes in the console since opened, bytes).
Listener = Callable[[int, bytes], None]

_BAUDS = {
    int(name[1:]): getattr(termios, name)
    for name in dir(termios)
    if name.startswith("B") and name[1:].isdigit()
}


class Spool:
    """One run's capture of one device's console: a file the port appends to, and the
    task that sends it on, in order, from `sent`."""

    def __init__(
        self,
        path: Path,
        run: RunRef,
        device_id: str,
        send: SendOutput,
        ready: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.path = path
        self.run = run
        self.device_id = device_id
        self.stream = console_stream(device_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        #: Bytes in the file (all of them sent again from 0 after a restart).
        self.size = os.fstat(self._fd).st_size
        self.sent = 0
        #: Past MAX_SPOOL_BYTES: what comes is dropped.
        self.full = False
        self._send = send
        #: Awaited before the first send (an ended run's spool waits for the Welcome).
        self._ready = ready
        self._wake = asyncio.Event()
        self._finishing = False
        if self.size:
            self._wake.set()
        self._task = asyncio.get_running_loop().create_task(
            self._sender(), name=f"console {device_id} of {run.job_id}#{run.attempt}"
        )

    def append(self, data: bytes) -> None:
        """Keep bytes read from the console (a local append: it does not wait on anyone)."""
        if self.size + len(data) > MAX_SPOOL_BYTES:
            if not self.full:
                self.full = True
                log.warning(
                    "console of %s: run %s#%d has %d bytes spooled: dropping the rest",
                    self.device_id,
                    self.run.job_id,
                    self.run.attempt,
                    self.size,
                )
            return
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.size += len(data)
        self._wake.set()

    async def _sender(self) -> None:
        if self._ready is not None:
            await self._ready()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.sent < self.size:
                want = min(MAX_OUTPUT_CHUNK, self.size - self.sent)
                chunk = await asyncio.to_thread(os.pread, self._fd, want, self.sent)
                if not chunk:
                    raise OSError(f"{self.path} shrank to {self.sent} bytes")
                # May wait while the connector's backlog is full: the file holds the rest.
                await self._send(self.run, self.stream, self.sent, chunk)
                self.sent += len(chunk)
            if self._finishing:
                return

    async def finish(self) -> None:
        """Hand everything appended so far to the connector; then nothing more comes."""
        self._finishing = True
        self._wake.set()
        await self._task

    def abort(self) -> None:
        self._task.cancel()
        self._close()

    def remove(self) -> None:
        """Forget the spool (its bytes are acknowledged)."""
        self._close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            self.path.parent.rmdir()  # once the run's last device is done

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Port:
    """One device's console: open (and reopened after an error) for the port's life."""

    def __init__(self, device: DeviceConfig) -> None:
        assert device.console is not None
        self.device_id = device.name
        self.path = device.console.path
        #: The device node given to runs is this very tty: a run holding it owns the port.
        self.is_device_node = _same_file(device.path, device.console.path)
        #: The run that owns the port now (it is closed meanwhile), if any.
        self.yielded_to: RunRef | None = None
        self.baud = device.console.baud
        self.fd = -1
        #: Bytes read since the supervisor started (the offsets attached sessions see).
        self.read_total = 0
        #: The spool of the run holding the device, if any.
        self.spool: Spool | None = None
        self.listeners: dict[object, Listener] = {}
        self.error: str | None = None
        self._loop = asyncio.get_running_loop()
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False

    def open(self) -> None:
        if self._closed or self.fd >= 0 or self.yielded_to is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as exc:
            self._failed(f"can't open {self.path}: {exc.strerror}")
            return
        try:
            tty.setraw(fd)
            attrs = termios.tcgetattr(fd)
            speed = _BAUDS.get(self.baud)
            if speed is not None:  # a pty has no speed; a rate termios can't name is kept
                attrs[4] = attrs[5] = speed
            attrs[3] &= ~termios.ECHO
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
        except termios.error as exc:
            os.close(fd)
            self._failed(f"can't set {self.path} to raw at {self.baud} baud: {exc}")
            return
        self.fd = fd
        if self.error is not None:
            log.info("console of %s: open again", self.device_id)
        self.error = None
        self._loop.add_reader(fd, self._readable)

    def _failed(self, why: str) -> None:
        if why != self.error:
            log.warning("console of %s: %s; trying again every %gs", self.device_id, why, REOPEN_S)
        self.error = why
        self._shut()
        if not self._closed:
            self._retry = self._loop.call_later(REOPEN_S, self.open)

    def _readable(self) -> None:
        while True:
            try:
                data = os.read(self.fd, READ_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EIO: the other end hung up (a board unplugged, a pty closed).
                why = "hung up" if exc.errno == errno.EIO else exc.strerror or str(exc)
                self._failed(f"reading {self.path}: {why}")
                return
            if not data:
                self._failed(f"{self.path}: end of file")
                return
            self._take(data)
            if len(data) < READ_BYTES:
                return

    def _take(self, data: bytes) -> None:
        offset = self.read_total
        self.read_total += len(data)
        if self.spool is not None:
            try:
                self.spool.append(data)
            except OSError as exc:
                log.error("console of %s: spool %s: %s", self.device_id, self.spool.path, exc)
        for listener in list(self.listeners.values()):
            listener(offset, data)

    def write(self, data: bytes) -> int:
        """Write what the tty takes now (best effort); how many bytes it took."""
        if self.fd < 0:
            return 0
        try:
            return os.write(self.fd, data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            log.info("console of %s: writing: %s", self.device_id, exc)
            return 0

    def _shut(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self.fd >= 0:
            self._loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1

    def yield_to(self, run: RunRef) -> None:
        """The run's program gets the port: close it until `take_back`."""
        self.yielded_to = run
        self._shut()
        log.info(
            "console of %s: its tty is the device node of run %s#%d, which has it until it ends",
            self.device_id,
            run.job_id,
            run.attempt,
        )

    def take_back(self, run: RunRef) -> None:
        if self.yielded_to == run:
            self.yielded_to = None
            self.open()

    def close(self) -> None:
        self._closed = True
        self._shut()


def _same_file(a: str, b: str) -> bool:
    """True if the two paths name one file (links followed), or are one path."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


class Consoles:
    """Every console of the host, and which run holds which (see the module docstring)."""

    def __init__(self, devices: list[DeviceConfig], spool_root: Path) -> None:
        self._devices = [d for d in devices if d.console is not None]
        self.spool_root = spool_root
        self.ports: dict[str, Port] = {}
        self._spools: dict[RunRef, list[Spool]] = {}
        #: Ports closed while a run's program has them (their tty is its device node).
        self._yielded: dict[RunRef, list[Port]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def open(self) -> None:
        """Open every console (one that can't be opened is tried again every second)."""
        for device in self._devices:
            if device.name not in self.ports:
                port = self.ports[device.name] = Port(device)
                port.open()

    def _spool_path(self, run: RunRef, device_id: str) -> Path:
        return self.spool_root / f"{run.job_id}.{run.attempt}" / device_id

    def claim(self, run: RunRef, devices: list[str], send: SendOutput) -> None:
        """The run holds these devices from now on: their consoles go to its streams."""
        for device_id in devices:
            port = self.ports.get(device_id)
            if port is None:
                continue
            if port.is_device_node:
                port.yield_to(run)
                self._yielded.setdefault(run, []).append(port)
                continue
            if port.spool is not None and port.spool.run != run:
                log.warning(
                    "console of %s: run %s#%d still had it; now %s#%d",
                    device_id,
                    port.spool.run.job_id,
                    port.spool.run.attempt,
                    run.job_id,
                    run.attempt,
                )
            if port.spool is not None and port.spool.run == run:
                continue  # already (a re-adopted run)
            spool = Spool(self._spool_path(run, device_id), run, device_id, send)
            port.spool = spool
            self._spools.setdefault(run, []).append(spool)

    async def release(self, run: RunRef, delivered: Delivered) -> None:
        """The run has ended: stop capturing for it and hand the rest of its consoles to
        the connector (before its exit is reported); the spools go once acknowledged."""
        for lent in self._yielded.pop(run, []):
            lent.take_back(run)
        spools = self._spools.pop(run, [])
        for spool in spools:
            port = self.ports.get(spool.device_id)
            if port is not None and port.spool is spool:
                port.spool = None
        for spool in spools:
            await spool.finish()
        if spools:
            self._spawn(self._remove_when_delivered(spools, delivered))

    def recover(self, held: set[RunRef], send: SendOutput, delivered: Delivered) -> None:
        """After a restart: continue the spools of runs re-adopted (`held`) from offset 0,
        and send those of runs that did not survive, then remove them."""
        if not self.spool_root.is_dir():
            return
        for run_dir in sorted(self.spool_root.iterdir()):
            job_id, _, attempt = run_dir.name.rpartition(".")
            if not job_id or not attempt.isdigit() or not run_dir.is_dir():
                continue
            run = RunRef(job_id, int(attempt))
            for path in sorted(run_dir.iterdir()):
                port = self.ports.get(path.name)
                if run in held and port is not None and port.spool is None:
                    spool = Spool(path, run, path.name, send)
                    port.spool = spool
                    self._spools.setdefault(run, []).append(spool)
                    log.info("console of %s: continuing run %s#%d", path.name, job_id, run.attempt)
                else:
                    self._spawn(self._deliver_orphan(path, run, send, delivered))

    async def _deliver_orphan(
        self, path: Path, run: RunRef, send: SendOutput, delivered: Delivered
    ) -> None:
        """Send the spool of a run that did not survive the restart, once connected (so
        the Hello does not claim the run is held), and remove it once acknowledged."""
        spool = Spool(path, run, path.name, send, ready=delivered)
        log.info(
            "console of %s: sending the %d byte(s) kept for run %s#%d, which ended",
            spool.device_id,
            spool.size,
            run.job_id,
            run.attempt,
        )
        await spool.finish()
        await self._remove_when_delivered([spool], delivered)

    async def _remove_when_delivered(self, spools: list[Spool], delivered: Delivered) -> None:
        await delivered()
        for spool in spools:
            spool.remove()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("console spool failed", exc_info=task.exception())

    # --- attached sessions ------------------------------------------------------------

    def attach(self, device_id: str, key: object, listener: Listener) -> str | None:
        """Send what the device's console prints to `listener` from now on; why not."""
        port = self.ports.get(device_id)
        if port is None:
            return f"device {device_id} has no console on this host"
        if port.yielded_to is not None:
            run = port.yielded_to
            return (
                f"the console of {device_id} is the device node of run {run.job_id}#"
                f"{run.attempt}: its program has the port until the run ends"
            )
        port.listeners[key] = listener
        return None

    def detach(self, device_id: str, key: object) -> None:
        port = self.ports.get(device_id)
        if port is not None:
            port.listeners.pop(key, None)

    def write(self, device_id: str, data: bytes) -> int:
        port = self.ports.get(device_id)
        return port.write(data) if port is not None else 0

    async def close(self) -> None:
        for port in self.ports.values():
            port.close()
        for spools in self._spools.values():
            for spool in spools:
                spool.abort()
        for task in list(self._tasks):
            task.cancel()
        self._spools.clear()
