"""Commands between switchboard replicas sharing one database.

A StopJob (a cancel, a timeout), the StartJob of a job group's run, or a power request may
be decided by any replica, but only the replica holding the supervisor's socket can send
it. When the socket is not here, the command is left in the database as a row
(Store.send_commands, the group's placement, Store.ask_power); the replica holding the
socket takes the rows for its supervisors and sends them: a StopJob as it is, a StartJob
built from the stored run (a supervisor not ready yet gets it from its reconcile), a power
request on its own task, whose answer is written back on the row for the replica that
asked. That one waits for it (at most the power timeout), woken by a hint naming the row
and looking every REPLY_SWEEP_S without one. It looks when a NOTIFY hint says some wait
(the hint names the supervisor, never the command; many hints wake one look), and on a
sweep every `sweep_s` whether hints come or not: they may be lost with the listening
connection, or off (`serve --no-notify`, behind a pooler in transaction mode, where LISTEN
does not work). The same channel carries a hint that jobs were queued elsewhere, which
wakes this replica's dispatcher (it places jobs on the supervisors whose sockets it holds);
without hints, each sweep wakes it instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import msgspec

from protocol.messages import PowerAction, StopJob, StopReason
from switchboard import metrics
from switchboard.models import PowerReply, SupervisorCommand
from switchboard.store.base import Store
from switchboard.store.fencing import ANSWERED, CHANNEL, JOBS_QUEUED

log = logging.getLogger("switchboard.relay")

#: How often a replica waiting for the answer to a power request it left looks for it,
#: hint or not (a hint wakes it at once).
REPLY_SWEEP_S = 0.25

#: Sends the StartJob of a stored run (supervisor, job, attempt) on a socket held here:
#: whether it went (a supervisor not ready yet gets it from its reconcile).
StartStored = Callable[[str, str, int], Awaitable[bool]]
#: Runs a device's power command through a supervisor whose socket is here (supervisor,
#: device, action) and waits for its answer; None if the socket is not here.
PowerHere = Callable[[str, str, PowerAction], Awaitable[PowerReply | None]]


async def _nothing_started(supervisor_id: str, job_id: str, attempt: int) -> bool:
    return False


async def _no_power(supervisor_id: str, device_id: str, action: PowerAction) -> None:
    return None


class Sockets:
    """What the relay needs of the hub: which supervisors' sockets are here, and sending
    a StopJob, a stored run's StartJob or a power request on one of them."""

    def __init__(
        self,
        connected: Callable[[], list[str]],
        stop: Callable[[str, StopJob], bool],
        start: StartStored = _nothing_started,
        power: PowerHere = _no_power,
    ):
        self.connected = connected
        self.stop = stop
        self.start = start
        self.power = power


class CommandRelay:
    def __init__(
        self,
        store: Store,
        sockets: Sockets,
        *,
        dsn: str | None,
        sweep_s: float,
        on_jobs_queued: Callable[[], None],
        on_sweep: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.sockets = sockets
        #: Where to LISTEN (None: no hints, the sweep alone).
        self.dsn = dsn
        self.sweep_s = sweep_s
        self.on_jobs_queued = on_jobs_queued
        self.on_sweep = on_sweep
        self._due = asyncio.Event()
        self._outgoing: list[tuple[str, StopJob]] = []
        self._flushing: asyncio.Task[None] | None = None
        self._listener: Any = None
        self._listen_failing = False
        #: Power requests left for other replicas, by seq: set when a hint says answered.
        self._answers: dict[int, asyncio.Event] = {}
        #: Power requests taken for sockets here, each on its own task.
        self._powering: set[asyncio.Task[None]] = set()

    # --- leaving commands for other replicas ---------------------------------------------

    def send(self, supervisor_id: str, stop: StopJob) -> None:
        """Leave a StopJob for the replica holding the supervisor's socket (never waits:
        the commands queued meanwhile are written together)."""
        self._outgoing.append((supervisor_id, stop))
        if self._flushing is None:
            # A context of its own: the commands of many callers go out together, under
            # none's fence (store.fencing).
            self._flushing = asyncio.create_task(
                self._flush(), name="commands out", context=contextvars.Context()
            )

    async def _flush(self) -> None:
        try:
            while self._outgoing:
                batch, self._outgoing = self._outgoing, []
                try:
                    await self.store.send_commands(batch)
                except Exception:
                    # The supervisor's reconcile settles it when it is next connected (its
                    # run's cancel or timeout is stored); said once per failed batch.
                    log.exception("leaving %d StopJobs for other replicas failed", len(batch))
                    continue
                metrics.SUPERVISOR_COMMANDS.labels("stop", "queued").inc(len(batch))
        finally:
            self._flushing = None

    async def ask_power(
        self, supervisor_id: str, device_id: str, action: PowerAction, timeout_s: float
    ) -> PowerReply:
        """Have the replica holding the supervisor's socket run the device's power command
        and wait at most `timeout_s` for its answer (the row is dropped whatever came of
        it: a request not yet taken when the wait ends is never sent)."""
        seq = await self.store.ask_power(supervisor_id, device_id, action)
        if seq is None:
            return PowerReply(
                "not_connected", reason=f"supervisor {supervisor_id} is not connected"
            )
        metrics.SUPERVISOR_COMMANDS.labels("power", "queued").inc()
        answered = self._answers[seq] = asyncio.Event()
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                there, answer = await self.store.power_answer(seq)
                if answer is not None:
                    return msgspec.json.decode(answer, type=PowerReply)
                if not there:  # (not dropped by anyone else while it waits)
                    return PowerReply("not_connected", reason="the power request was dropped")
                left = deadline - time.monotonic()
                if left <= 0:
                    return PowerReply(
                        "timed_out", reason=f"no answer from {supervisor_id} in {timeout_s:g} s"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(answered.wait(), min(left, REPLY_SWEEP_S))
                answered.clear()
        finally:
            del self._answers[seq]
            # Shielded: a caller that goes away still leaves no request behind.
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.forget_command(seq))

    # --- taking the commands left for the sockets here -------------------------------------

    async def run(self) -> None:
        try:
            while True:
                if self.dsn is not None and self._listener is None:
                    await self._listen()
                try:
                    await asyncio.wait_for(self._due.wait(), timeout=self.sweep_s)
                except TimeoutError:
                    pass
                self._due.clear()
                if self._listener is None:
                    self.on_sweep()  # no hint says jobs were queued elsewhere: look anyway
                try:
                    await self.deliver()
                except Exception:
                    log.exception("taking the commands for this replica's supervisors failed")
                if self._listener is not None and self._listener.is_closed():
                    self._listener = None  # listen again on the next turn
        finally:
            for task in list(self._powering):
                task.cancel()
            if self._listener is not None:
                await self._listener.close(timeout=2)

    async def deliver(self) -> int:
        """Send the commands left for supervisors whose sockets are here; how many."""
        here = self.sockets.connected()
        if not here:
            return 0
        taken = await self.store.take_commands(here)
        for command in taken:
            if command.kind == "stop":
                reason = cast(StopReason, command.reason)  # (written from a StopJob)
                stop = StopJob(job_id=command.job_id, attempt=command.attempt, reason=reason)
                if self.sockets.stop(command.supervisor_id, stop):
                    metrics.SUPERVISOR_COMMANDS.labels("stop", "delivered").inc()
            elif command.kind == "start":
                sent = await self.sockets.start(
                    command.supervisor_id, command.job_id, command.attempt
                )
                if sent:
                    metrics.SUPERVISOR_COMMANDS.labels("start", "delivered").inc()
            elif command.kind == "power":
                task = asyncio.create_task(
                    self._power(command), name=f"power {command.action} of {command.device_id}"
                )
                self._powering.add(task)
                task.add_done_callback(self._powering.discard)
            else:  # written by a newer switchboard: said once per command
                log.warning("a command of unknown kind %r dropped", command.kind)
        return len(taken)

    async def _power(self, command: SupervisorCommand) -> None:
        """Run a power request taken for a socket here and write its answer back."""
        action: PowerAction = command.action  # type: ignore[assignment]  # (written by ask_power)
        try:
            reply = await self.sockets.power(command.supervisor_id, command.device_id, action)
            if reply is None:
                reason = f"supervisor {command.supervisor_id} is no longer connected here"
                reply = PowerReply("not_connected", reason=reason)
            else:
                metrics.SUPERVISOR_COMMANDS.labels("power", "delivered").inc()
            if await self.store.answer_power(command.seq, msgspec.json.encode(reply).decode()):
                metrics.SUPERVISOR_COMMANDS.labels("power", "answered").inc()
        except Exception:  # the asker times out: its call is audited as such
            log.exception("answering power request %d of another replica failed", command.seq)

    async def _listen(self) -> None:
        import asyncpg  # only with a PostgreSQL store

        assert self.dsn is not None
        try:
            listener = await asyncpg.connect(self.dsn, timeout=self.sweep_s * 5)
            await listener.add_listener(CHANNEL, self._hint)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            if not self._listen_failing:
                log.warning("listening for other replicas' hints failed (sweeping on): %s", exc)
            self._listen_failing = True
            return
        self._listen_failing = False
        self._listener = listener
        self._due.set()  # what was left while not listening

    def _hint(self, connection: Any, pid: int, channel: str, payload: object) -> None:
        if payload == JOBS_QUEUED:
            self.on_jobs_queued()
        elif isinstance(payload, str) and payload.startswith(ANSWERED):
            seq = payload[len(ANSWERED) :]
            answered = self._answers.get(int(seq)) if seq.isdigit() else None
            if answered is not None:
                answered.set()
        else:
            self._due.set()
