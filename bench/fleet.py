"""A simulated fleet: many supervisor connections in one process (asyncio on uvloop, the
`websockets` client), speaking the real protocol over real sockets.

Each connection says Hello (versions, backends ["noop"], max_jobs), takes the Welcome,
sends a Heartbeat at the interval the Welcome gives, and answers StartJob for a noop job
with the events the real noop backend produces through supervisor/jobs.py: state
initializing (stage accepted), state running, the output if any, exit, then the terminal
state, numbered 1, 2, 3... per supervisor. It notes when each run's StartJob arrived and
when the Acks covering its running and terminal events arrived: an Ack means the
switchboard has stored the event durably.

Two job parameters (StartJob carries them like any other) make a noop run an output
benchmark: BENCH_OUTPUT_BYTES streams that many bytes of stdout in MAX_OUTPUT_CHUNK pieces
as fast as the socket and the Acks allow (at most BACKLOG_BYTES unacknowledged, as the
reference supervisor; BENCH_BACKLOG_BYTES sets another bound), and BENCH_HOLD makes the
run wait after `running` until release().

A "raw" fleet connects to a bare WebSocket server instead (bench.floors) and only sends
heartbeat-sized frames at an interval: the floor of what idle connections cost.

`FleetProcess` runs a Fleet in a child process and drives it over a pipe, so that the
fleet, the switchboard and the benchmark's client never share an event loop (or a core).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import uvloop
import websockets
from websockets.asyncio.client import ClientConnection

from bench.procs import child_channels, raise_fd_limit, spawn_child, stop_child
from connector.websocket import SEND_WINDOW_BYTES
from protocol import codec, limits
from protocol.exceptions import JobErrorKind
from protocol.messages import (
    Ack,
    DeviceInfo,
    Event,
    Heartbeat,
    HeldRun,
    Hello,
    JobErrorReport,
    JobExit,
    JobStateChanged,
    Output,
    ProtocolErrorMessage,
    ServerHeartbeat,
    StartJob,
    StatusReply,
    StatusRequest,
    StopJob,
    Welcome,
)
from protocol.spec import NoopBackend
from protocol.state import Phase, is_terminal
from protocol.tokens import new_token, token_sha256
from protocol.versions import supported_versions

PARAM_OUTPUT_BYTES = "BENCH_OUTPUT_BYTES"
PARAM_HOLD = "BENCH_HOLD"
PARAM_BACKLOG = "BENCH_BACKLOG_BYTES"
#: Unacknowledged output a run may have in flight unless BENCH_BACKLOG_BYTES says otherwise:
#: the reference supervisor's send window (its backlog may hold more, but only this much
#: travels unacknowledged).
BACKLOG_BYTES = SEND_WINDOW_BYTES
#: Connections opened at once: the switchboard's listen backlog is 2048.
WAVE = 250
#: The class of the boards members declare (`connect(devices=N)`).
DEVICE_CLASS = "simboard"
OPEN_TIMEOUT_S = 120.0
SOFTWARE = "switchboard-bench-fleet/0.1"
#: The bytes every output chunk carries (not compressible, not that it matters: no deflate).
CHUNK = random.Random(7).randbytes(limits.MAX_OUTPUT_CHUNK)


@dataclass
class RunMarks:
    """time.monotonic() of what happened to one run (CLOCK_MONOTONIC: comparable with the
    benchmark process's own readings on the same machine). None: not yet."""

    start_received: float
    supervisor_id: str
    running_acked: float | None = None
    done_acked: float | None = None
    phase: str = ""
    #: Output runs: (monotonic time just before the send, offset after the chunk, seq).
    chunks: list[tuple[float, int, int]] = field(default_factory=list)
    #: Output runs: (monotonic time an Ack arrived, the seq it covered up to).
    acks: list[tuple[float, int]] = field(default_factory=list)


class Member:
    """One supervisor connection."""

    def __init__(self, fleet: Fleet, supervisor_id: str, max_jobs: int, devices: int = 0) -> None:
        self.fleet = fleet
        self.id = supervisor_id
        self.max_jobs = max_jobs
        #: Boards it declares (class DEVICE_CLASS), for placement's grants to be watched.
        self.devices = [f"{supervisor_id}-board-{n}" for n in range(devices)]
        self.ws: ClientConnection | None = None
        self.seq = 0
        self.acked = 0
        self.held: dict[str, tuple[int, Phase]] = {}
        #: (seq, job_id, what) waiting for the Ack that covers seq, in seq order.
        self._marks: deque[tuple[int, str, str]] = deque()
        #: Output frames not yet acknowledged: (seq, bytes).
        self._unacked: deque[tuple[int, int]] = deque()
        self._unacked_bytes = 0
        self._room = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    # --- connecting ------------------------------------------------------------------

    async def open(self, url: str, token: str) -> None:
        ws = await websockets.connect(
            url,
            additional_headers={"Authorization": f"Bearer {token}"},
            subprotocols=[websockets.Subprotocol(limits.SUBPROTOCOL)],
            compression=None,
            ping_interval=None,
            max_size=limits.MAX_FRAME_BYTES,
            open_timeout=OPEN_TIMEOUT_S,
            close_timeout=2,
        )
        self.ws = ws
        hello = Hello(
            supervisor_id=self.id,
            name=self.id,
            versions=supported_versions(),
            backends=["noop"],
            max_jobs=self.max_jobs,
            devices=[DeviceInfo(id=d, class_=DEVICE_CLASS) for d in self.devices],
            runs=[HeldRun(j, a, p) for j, (a, p) in self.held.items()],
            last_seq=self.seq,
            software=SOFTWARE,
            # Each member enrols with the fleet's registration token (it connects once).
            credential_sha256=token_sha256(new_token()).hex(),
        )
        await ws.send(codec.encode(hello), text=True)
        raw = await asyncio.wait_for(ws.recv(decode=False), OPEN_TIMEOUT_S)
        welcome = codec.decode_from_switchboard(raw)
        if not isinstance(welcome, Welcome):
            raise RuntimeError(f"{self.id}: expected welcome, got {welcome!r}")
        self.seq = max(self.seq, welcome.last_seq)
        self._spawn(self._read())
        self._spawn(self._beat(welcome.heartbeat_interval_s))

    async def open_raw(self, url: str, interval_s: float) -> None:
        self.ws = await websockets.connect(
            url,
            compression=None,
            ping_interval=None,
            max_size=limits.MAX_FRAME_BYTES,
            open_timeout=OPEN_TIMEOUT_S,
            close_timeout=2,
        )
        self._spawn(self._read_raw())
        self._spawn(self._beat(interval_s))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, websockets.ConnectionClosed):
                self.fleet.errors.append(f"{self.id}: {exc!r}")

    # --- the loops -------------------------------------------------------------------

    async def _beat(self, interval_s: float) -> None:
        assert self.ws is not None
        fleet = self.fleet
        # Real supervisors' heartbeats are spread over the interval, not in step.
        await asyncio.sleep(random.uniform(0, interval_s))
        while True:
            await self.ws.send(codec.encode(Heartbeat(at=time.time())), text=True)
            fleet.heartbeats_sent += 1
            await asyncio.sleep(interval_s)

    async def _read(self) -> None:
        ws = self.ws
        assert ws is not None
        fleet = self.fleet
        try:
            while True:
                message = codec.decode_from_switchboard(await ws.recv(decode=False))
                match message:
                    case Ack(seq=seq):
                        self._on_ack(seq)
                    case ServerHeartbeat():
                        fleet.heartbeats_received += 1
                    case StartJob():
                        self._spawn(self._run(message))
                    case StopJob():
                        fleet.stops += 1  # the benchmarks cancel nothing; runs end soon
                    case StatusRequest(request_id=request_id):
                        runs = [HeldRun(j, a, p) for j, (a, p) in self.held.items()]
                        reply = StatusReply(request_id=request_id, runs=runs, running=len(runs))
                        await ws.send(codec.encode(reply), text=True)
                    case ProtocolErrorMessage(code=code, reason=reason):
                        fleet.errors.append(f"{self.id}: protocol_error {code} {reason}")
        except websockets.ConnectionClosed:
            if not fleet.closing:
                fleet.disconnects += 1

    async def _read_raw(self) -> None:
        assert self.ws is not None
        async for _ in self.ws:
            self.fleet.heartbeats_received += 1

    def _on_ack(self, seq: int) -> None:
        if seq <= self.acked:
            return
        self.acked = seq
        now = time.monotonic()
        fleet = self.fleet
        marks = self._marks
        while marks and marks[0][0] <= seq:
            _, job_id, what = marks.popleft()
            run = fleet.runs.get(job_id)
            if run is None:
                continue
            if what == "running":
                run.running_acked = now
            elif what == "done":
                run.done_acked = now
                fleet.run_done(job_id)
            elif what == "output":
                run.acks.append((now, seq))
        if self._unacked:
            while self._unacked and self._unacked[0][0] <= seq:
                self._unacked_bytes -= self._unacked.popleft()[1]
            self._room.set()

    # --- one run ---------------------------------------------------------------------

    async def _event(self, event: Event, job_id: str = "", mark: str = "") -> int:
        """Number an event and send it; `mark`: note the Ack that covers it."""
        assert self.ws is not None
        self.seq += 1
        event.seq = self.seq
        if mark:
            self._marks.append((self.seq, job_id, mark))
        await self.ws.send(codec.encode(event), text=True)
        return self.seq

    async def _state(self, job_id: str, attempt: int, phase: Phase, **kw: Any) -> None:
        self.held[job_id] = (attempt, phase)
        event = JobStateChanged(0, job_id, attempt, phase, at=time.time(), **kw)
        mark = "running" if phase == Phase.RUNNING else "done" if is_terminal(phase) else ""
        await self._event(event, job_id, mark)

    async def _run(self, start: StartJob) -> None:
        fleet = self.fleet
        job_id, attempt = start.job_id, start.attempt
        if job_id in self.held:
            return  # a repeat: the run goes on
        fleet.runs[job_id] = RunMarks(time.monotonic(), self.id)
        fleet.starts += 1
        spec = start.backend
        if len(self.held) >= self.max_jobs:
            fleet.over_capacity += 1  # placement gave this supervisor more than its slots
        for device in start.devices:
            holder = fleet.device_holders.get(device)
            if (holder is not None and holder != job_id) or device not in self.devices:
                fleet.double_grants += 1  # a board already held, or none of this host's
        if not isinstance(spec, NoopBackend) or len(self.held) >= self.max_jobs:
            kind = (
                JobErrorKind.IMAGE_NOT_COMPATIBLE
                if not isinstance(spec, NoopBackend)
                else JobErrorKind.MAX_CONCURRENT_JOBS
            )
            fleet.runs[job_id].phase = Phase.REJECTED.value
            await self._event(JobErrorReport(0, job_id, attempt, kind, "refused by the fleet"))
            await self._state(job_id, attempt, Phase.REJECTED, message=kind.value)
            self.held.pop(job_id, None)
            return
        granted = list(start.devices)
        for device in granted:
            fleet.device_holders.setdefault(device, job_id)
        try:
            await self._state(job_id, attempt, Phase.INITIALIZING, stage="accepted")
            await self._state(job_id, attempt, Phase.RUNNING)
            if PARAM_HOLD in start.parameters:
                await fleet.hold(job_id)
            size = start.parameters.get(PARAM_OUTPUT_BYTES)
            if size is not None:
                backlog = start.parameters.get(PARAM_BACKLOG)
                limit = int(backlog.value) if backlog is not None else BACKLOG_BYTES
                await self._stream(job_id, attempt, int(size.value), limit)
            elif spec.output:
                await self._event(Output(0, job_id, attempt, "stdout", 0, spec.output.encode()))
            if spec.delay_s > 0:
                await asyncio.sleep(spec.delay_s)
            await self._event(JobExit(0, job_id, attempt, exit_code=spec.exit_code))
            end = Phase.SUCCEEDED if spec.exit_code == 0 else Phase.FAILED
            fleet.runs[job_id].phase = end.value
            await self._state(job_id, attempt, end)
        finally:
            self.held.pop(job_id, None)
            for device in granted:
                if fleet.device_holders.get(device) == job_id:
                    del fleet.device_holders[device]

    async def _stream(self, job_id: str, attempt: int, size: int, backlog: int) -> None:
        """`size` bytes of stdout, chunk after chunk, at most `backlog` bytes unacknowledged."""
        run = self.fleet.runs[job_id]
        offset = 0
        while offset < size:
            while self._unacked_bytes >= backlog:
                self._room.clear()
                await self._room.wait()
            data = CHUNK[: min(len(CHUNK), size - offset)]
            self.seq += 1
            seq = self.seq
            frame = codec.encode(Output(seq, job_id, attempt, "stdout", offset, data))
            offset += len(data)
            self._marks.append((seq, job_id, "output"))
            self._unacked.append((seq, len(data)))
            self._unacked_bytes += len(data)
            run.chunks.append((time.monotonic(), offset, seq))
            assert self.ws is not None
            await self.ws.send(frame, text=True)


class Fleet:
    """Every connection of this process, and what they observed."""

    def __init__(self) -> None:
        self.members: list[Member] = []
        self.runs: dict[str, RunMarks] = {}
        self.done = 0
        self.heartbeats_sent = 0
        self.heartbeats_received = 0
        self.stops = 0
        self.disconnects = 0
        self.errors: list[str] = []
        self.closing = False
        #: StartJobs received; those beyond a supervisor's slots; boards granted while
        #: another run held them (or not the supervisor's own).
        self.starts = 0
        self.over_capacity = 0
        self.double_grants = 0
        #: board -> the job holding it now.
        self.device_holders: dict[str, str] = {}
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._held: dict[str, asyncio.Event] = {}
        #: Supervisor ids handed out so far, per prefix.
        self._named: dict[str, int] = {}
        #: Called with (kind, job_id) when a run is held or done (FleetProcess: a pipe).
        self.notify: Any = lambda kind, job_id: None

    async def connect(
        self,
        url: str,
        token: str,
        count: int,
        prefix: str = "fleet",
        max_jobs: int = 1,
        devices: int = 0,
    ) -> dict[str, float]:
        """Open `count` more supervisor connections, WAVE at a time, each declaring
        `devices` boards; returns how long it took."""
        started = time.monotonic()
        first = self._named.get(prefix, 0)
        self._named[prefix] = first + count
        fresh = [Member(self, f"{prefix}-{first + i:04d}", max_jobs, devices) for i in range(count)]
        for i in range(0, count, WAVE):
            wave = fresh[i : i + WAVE]
            await asyncio.gather(*(m.open(url, token) for m in wave))
            self.members.extend(wave)
        return {"seconds": time.monotonic() - started, "connected": len(self.members)}

    async def connect_raw(self, url: str, count: int, interval_s: float) -> dict[str, float]:
        started = time.monotonic()
        fresh = [Member(self, f"raw-{i}", 1) for i in range(count)]
        for i in range(0, count, WAVE):
            wave = fresh[i : i + WAVE]
            await asyncio.gather(*(m.open_raw(url, interval_s) for m in wave))
            self.members.extend(wave)
        return {"seconds": time.monotonic() - started, "connected": len(self.members)}

    async def disconnect(self) -> None:
        self.closing = True
        members, self.members = self.members, []
        for i in range(0, len(members), WAVE):
            await asyncio.gather(*(m.close() for m in members[i : i + WAVE]))
        self.closing = False

    def counters(self) -> dict[str, Any]:
        return {
            "connected": len(self.members),
            "heartbeats_sent": self.heartbeats_sent,
            "heartbeats_received": self.heartbeats_received,
            "runs": len(self.runs),
            "done": self.done,
            "stops": self.stops,
            "disconnects": self.disconnects,
            "errors": self.errors[-5:],
            "error_count": len(self.errors),
            "starts": self.starts,
            "over_capacity": self.over_capacity,
            "double_grants": self.double_grants,
        }

    def reset_runs(self) -> None:
        self.runs.clear()
        self.done = 0

    def run_done(self, job_id: str) -> None:
        self.done += 1
        self.notify("done", job_id)
        while self._waiters and self._waiters[0][0] <= self.done:
            _, future = self._waiters.pop(0)
            if not future.done():
                future.set_result(None)

    async def wait_done(self, count: int, limit_s: float) -> None:
        """Until `count` runs (since reset_runs) had their terminal event acknowledged."""
        if self.done >= count:
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((count, future))
        self._waiters.sort(key=lambda w: w[0])
        try:
            await asyncio.wait_for(future, limit_s)
        except TimeoutError:
            raise TimeoutError(f"{self.done} of {count} runs done; {self.counters()}") from None

    async def hold(self, job_id: str) -> None:
        event = self._held.setdefault(job_id, asyncio.Event())
        self.notify("held", job_id)
        await event.wait()

    def release(self, job_id: str) -> None:
        self._held.setdefault(job_id, asyncio.Event()).set()

    def marks(self, job_ids: list[str] | None = None) -> dict[str, dict[str, Any]]:
        wanted = self.runs if job_ids is None else {j: self.runs[j] for j in job_ids}
        return {job_id: asdict(run) for job_id, run in wanted.items()}


# --- the fleet in a child process ------------------------------------------------------


class FleetProcess:
    """A Fleet in its own process (`python -m bench.fleet`). `call(name, **kwargs)` runs
    one of the calls of `_serve` there and returns its result; notifications ("held" or
    "done", job_id) come on `events` once `call("watch")` turned them on."""

    def __init__(self) -> None:
        self.process, (self._conn, self.events) = spawn_child("bench.fleet", 2)
        self.call("ping", timeout_s=60)

    @property
    def pid(self) -> int:
        return self.process.pid

    def call(self, name: str, timeout_s: float = 600.0, **kwargs: Any) -> Any:
        self._conn.send((name, kwargs))
        if not self._conn.poll(timeout_s):
            raise TimeoutError(f"the fleet did not answer {name} within {timeout_s} s")
        ok, value = self._conn.recv()
        if not ok:
            raise RuntimeError(f"fleet {name} failed:\n{value}")
        return value

    def next_event(self, timeout_s: float) -> tuple[str, str]:
        if not self.events.poll(timeout_s):
            raise TimeoutError(f"no word from the fleet within {timeout_s} s")
        return self.events.recv()

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(Exception):
                self.call("stop", timeout_s=60)
        stop_child(self.process)
        self._conn.close()
        self.events.close()


def main(argv: list[str]) -> None:
    conn, events = child_channels(argv)
    raise_fd_limit()
    uvloop.run(_serve(conn, events))


async def _serve(conn: Connection, events: Connection) -> None:
    """Answer calls from the pipe (read by a thread, run on this loop) until `stop`."""
    fleet = Fleet()
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    watching = [False]

    def notify(kind: str, job_id: str) -> None:
        if watching[0]:
            events.send((kind, job_id))

    fleet.notify = notify

    async def handle(name: str, kwargs: dict[str, Any]) -> Any:
        match name:
            case "ping":
                return "pong"
            case "connect":
                return await fleet.connect(**kwargs)
            case "connect_raw":
                return await fleet.connect_raw(**kwargs)
            case "disconnect":
                return await fleet.disconnect()
            case "counters":
                return fleet.counters()
            case "reset_runs":
                return fleet.reset_runs()
            case "wait_done":
                return await fleet.wait_done(**kwargs)
            case "marks":
                return fleet.marks(**kwargs)
            case "release":
                return fleet.release(**kwargs)
            case "watch":
                watching[0] = kwargs.get("on", True)
                return None
            case "stop":
                await fleet.disconnect()
                stopped.set()
                return None
        raise ValueError(f"no fleet call {name!r}")

    def reader() -> None:
        while True:
            try:
                name, kwargs = conn.recv()
            except EOFError:
                loop.call_soon_threadsafe(stopped.set)
                return
            future = asyncio.run_coroutine_threadsafe(handle(name, kwargs), loop)
            try:
                reply = (True, future.result())
            except BaseException:
                reply = (False, traceback.format_exc())
            conn.send(reply)
            if name == "stop":
                return

    threading.Thread(target=reader, name="fleet-calls", daemon=True).start()
    await stopped.wait()


if __name__ == "__main__":
    main(sys.argv[1:])
