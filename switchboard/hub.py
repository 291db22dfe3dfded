"""The live supervisor connections of this switchboard process.

The Hub admits each supervisor WebSocket (switchboard.handshake), serves it as a
SupervisorConnection until it ends, and lets a newer connection of the same supervisor
replace an older one (the store hands out session generations). The dispatcher, the API,
the metrics and the live feed ask it narrow questions (is this supervisor connected and
ready, when was it last heard from) and have it queue StartJob and StopJob; nothing here
waits on a socket to send. One timer for all connections keeps the heartbeats (and asks
for a StatusRequest every few of them) and one watches the send deadlines.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from litestar import WebSocket

from protocol import codec, limits
from protocol.exceptions import CloseCode, MessageTooBig
from protocol.messages import (
    PowerAction,
    PowerResult,
    RunRef,
    ServerHeartbeat,
    StopJob,
    minor_needed,
)
from protocol.spec import JobSpec
from protocol.state import Phase
from protocol.versions import POWER_MINOR
from switchboard import handshake, metrics
from switchboard.coalesce import CoalescedRead
from switchboard.config import Settings
from switchboard.lograte import RateLimitedLog
from switchboard.models import Assignment, JobView, PendingReport
from switchboard.outbox import Outbox
from switchboard.relay import CommandRelay
from switchboard.scheduler import files_asked
from switchboard.store.base import Store
from switchboard.supervisor_connection import ConsolePeer, PowerUnavailable, SupervisorConnection

log = logging.getLogger("switchboard.hub")

#: Told when capacity may have changed (a supervisor ready, a run ended): the dispatcher.
CapacityListener = Callable[[], None]
#: Given the test reports among output files just stored, to parse (switchboard.reports).
ReportListener = Callable[[list[PendingReport]], None]


class Hub:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self._connections: dict[str, SupervisorConnection] = {}
        #: Outboxes whose writer is running: the only ones the send deadline watch visits.
        self.writing: set[Outbox] = set()
        self._capacity_listener: CapacityListener = lambda: None
        self._report_listener: ReportListener = lambda reports: None
        #: Whether someone waits for a job (called from the store's writer thread), and
        #: who hears of the jobs a batch of events ended that someone waits for.
        self._waited: Callable[[str], bool] = lambda job_id: False
        self._endings_listener: Callable[[list[JobView]], None] = lambda jobs: None
        #: Refusals anyone who reaches the port can cause, one per attempt: logged once
        #: per interval (the metric counts each).
        self._refusals_log = RateLimitedLog(log)
        #: What the store believes each supervisor holds, for status checks: one read per
        #: burst of them, not one per supervisor.
        self._stored_runs = CoalescedRead(store.active_run_refs)
        #: Where StopJobs for supervisors whose sockets other replicas hold go (None: one
        #: process serves the store, every socket is here).
        self.relay: CommandRelay | None = None

    # --- what others may ask ------------------------------------------------------------

    def connected_count(self) -> int:
        return len(self._connections)

    def connected_ids(self) -> Iterator[str]:
        return iter(self._connections)

    def holds(self, supervisor_id: str) -> bool:
        """Whether the supervisor's socket is here (on this replica)."""
        return supervisor_id in self._connections

    def is_ready(self, supervisor_id: str) -> bool:
        """Connected, and reconciled: it may be given new runs."""
        connection = self._connections.get(supervisor_id)
        return connection is not None and connection.ready

    def ready_ids(self) -> set[str]:
        return {i for i, c in self._connections.items() if c.ready}

    def last_heard_at(self, supervisor_id: str) -> float | None:
        """Wall-clock time the supervisor was last heard from; None if not connected."""
        connection = self._connections.get(supervisor_id)
        return None if connection is None else connection.last_heard_at

    def last_heard(self) -> dict[str, float]:
        """supervisor id -> last heard from (wall clock), for every connected one."""
        return {i: c.last_heard_at for i, c in self._connections.items()}

    def is_current(self, connection: SupervisorConnection) -> bool:
        """True while `connection` is its supervisor's live one (not replaced)."""
        return self._connections.get(connection.id) is connection

    # --- capacity and runs -----------------------------------------------------------

    def on_capacity_change(self, listener: CapacityListener) -> None:
        self._capacity_listener = listener

    def on_reports(self, listener: ReportListener) -> None:
        self._report_listener = listener

    def reports_stored(self, reports: list[PendingReport]) -> None:
        """Test reports among output files just stored: parse them (in the background)."""
        self._report_listener(reports)

    async def stored_run_refs(self, supervisor_id: str) -> set[RunRef]:
        """The runs the store believes `supervisor_id` holds (identities only)."""
        return await self._stored_runs.get(supervisor_id)

    def on_endings(
        self, waited: Callable[[str], bool], listener: Callable[[list[JobView]], None]
    ) -> None:
        """Who waits for jobs to end (switchboard.waiters): asked while events are stored,
        told of the waited-for jobs they ended."""
        self._waited = waited
        self._endings_listener = listener

    def waited(self, job_id: str) -> bool:
        return self._waited(job_id)

    def jobs_ended(self, jobs: list[JobView]) -> None:
        self._endings_listener(jobs)

    def wake_dispatcher(self) -> None:
        self._capacity_listener()

    async def start_frame(
        self,
        job_id: str,
        attempt: int,
        spec: JobSpec,
        minor: int | None = None,
        devices: Sequence[str] = (),
    ) -> bytes | None:
        """A run's encoded StartJob (protocol.codec builds and measures it) for a
        connection that negotiated protocol 1.`minor` (None: not connected, not checked).
        None for a run that can't be sent, which is ended instead: its StartJob is over
        the frame limit (its job got into the store around the check at submission), or
        the supervisor reconnected with a version too old for what the job asks for since
        the run was placed. It ends `rejected`, with the reason, so that its job is neither
        resent nor restarted for ever, and no connection is cut for it."""
        needed = minor_needed(spec)
        try:
            if minor is not None and minor < needed:
                raise ValueError(
                    f"its supervisor now speaks protocol {limits.PROTOCOL_MAJOR}.{minor}; the"
                    f" job's {files_asked(spec)} need {limits.PROTOCOL_MAJOR}.{needed}"
                )
            return codec.encode_start_job(
                job_id, attempt, spec, self.settings.collect_limits, devices
            )
        except (MessageTooBig, ValueError) as error:
            metrics.RUNS_UNDELIVERABLE.inc()
            log.error("run %s#%d cannot be sent: %s", job_id, attempt, error)
            key = RunRef(job_id, attempt)
            if await self.store.end_run(key, Phase.REJECTED.value, f"not sent: {error}"):
                self.wake_dispatcher()
            return None

    async def start_runs(self, runs: Iterable[Assignment]) -> None:
        """Queue the StartJob of each run just assigned for its supervisor (never waiting
        on a socket; a supervisor not connected and ready gets it when it reconciles)."""
        for run in runs:
            connection = self._connections.get(run.supervisor_id)
            minor = connection.minor if connection is not None else None
            frame = await self.start_frame(run.job_id, run.attempt, run.spec, minor, run.devices)
            if frame is not None and connection is not None and connection.ready:
                connection.start(RunRef(run.job_id, run.attempt), frame)

    async def start_stored(self, supervisor_id: str, job_id: str, attempt: int) -> bool:
        """Send the StartJob of a stored run still `assigned` to a supervisor whose socket
        is here and ready (another replica placed it: switchboard.relay); False if not
        sent. A supervisor not ready yet gets it from its reconcile, one not connected
        here when it reconnects (its run waits as any disconnected supervisor's do)."""
        connection = self._connections.get(supervisor_id)
        if connection is None or not connection.ready:
            return False
        for run in await self.store.active_runs(supervisor_id):
            if (run.job_id, run.attempt) == (job_id, attempt) and run.phase == Phase.ASSIGNED:
                await connection.resend(run)
                return True
        return False

    def power(
        self, supervisor_id: str, device_id: str, action: PowerAction
    ) -> asyncio.Future[PowerResult | None] | str:
        """Send a power request to the supervisor of the device: the future of its answer
        (None if the connection ends first), or why it can't be sent."""
        connection = self._connections.get(supervisor_id)
        if connection is None:
            return f"supervisor {supervisor_id} is not connected"
        if connection.minor < POWER_MINOR:
            return (
                f"supervisor {supervisor_id} speaks protocol {limits.PROTOCOL_MAJOR}."
                f"{connection.minor}: power needs {limits.PROTOCOL_MAJOR}.{POWER_MINOR}"
            )
        try:
            return connection.power(device_id, action)
        except PowerUnavailable as busy:
            return str(busy)

    def attach_console(
        self, supervisor_id: str, device_id: str, peer: ConsolePeer
    ) -> tuple[SupervisorConnection, int] | str:
        """Attach `peer` to the device's console through its supervisor: the connection
        and the session's number (detach through them), or why it can't be done."""
        connection = self._connections.get(supervisor_id)
        if connection is None:
            return f"supervisor {supervisor_id} is not connected"
        session = connection.attach_console(device_id, peer)
        if isinstance(session, str):
            return session
        return connection, session

    def send_stop(self, supervisor_id: str, stop: StopJob) -> None:
        """Queue a StopJob for the supervisor; never waits on its socket. A supervisor
        connected to another replica gets it through that replica (switchboard.relay)."""
        if not self.stop_here(supervisor_id, stop) and self.relay is not None:
            self.relay.send(supervisor_id, stop)
        # Otherwise reconciliation stops it when the supervisor is back.

    def stop_here(self, supervisor_id: str, stop: StopJob) -> bool:
        """Queue a StopJob if the supervisor's socket is here; False if it is not."""
        connection = self._connections.get(supervisor_id)
        if connection is None:
            return False
        connection.stop(stop)
        return True

    def drop_disowned(self, owned: dict[str, int], as_of: float) -> None:
        """The store gives this replica the sessions `owned` (supervisor id -> session), as
        read from monotonic time `as_of` on: close each connection here admitted before
        then whose session it no longer gives (its supervisor connected to another replica,
        or the leader took this replica for dead). Whatever it would write is refused."""
        for connection in list(self._connections.values()):
            if owned.get(connection.id) != connection.session and connection.opened_at < as_of:
                log.warning(
                    "supervisor %s: session %d is no longer this replica's; closing it",
                    connection.id,
                    connection.session,
                )
                connection.close(CloseCode.REPLACED, "the session moved to another switchboard")

    # --- timers for all connections ------------------------------------------------------

    async def keep_heartbeats(self) -> None:
        """Every heartbeat interval: a heartbeat queued for each connection (one frame,
        encoded once), a StatusRequest for those due one, and the end of each connection
        whose supervisor has been silent past the timeout."""
        status_every = self.settings.status_every_heartbeats
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            frame = codec.encode(ServerHeartbeat(at=time.time()))
            now = time.monotonic()
            for connection in list(self._connections.values()):
                try:
                    connection.heartbeat(frame, now, status_every)
                except Exception:  # one connection's trouble must not stop the others' beats
                    log.exception("heartbeat to %s failed", connection.id)

    async def keep_send_deadlines(self) -> None:
        """Cut each connection whose send has waited on its socket past the send timeout:
        one timer for all (a timer per send would cost more than the send), visiting only
        the outboxes that have something to send. A send's deadline is met within a
        quarter of the timeout (at most a second) after it passes."""
        timeout = self.settings.send_timeout_s
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            now = time.monotonic()
            for outbox in list(self.writing):
                try:
                    outbox.check_send_deadline(now)
                except Exception:
                    log.exception("checking the send deadline of %s failed", outbox.name)

    # --- closing ----------------------------------------------------------------------

    async def close_all(
        self, code: CloseCode, reason: str, retry_after_s: float | None = None
    ) -> None:
        """Close every connection, waiting at most the send timeout for the goodbyes."""
        connections = list(self._connections.values())
        for connection in connections:
            connection.close(code, reason, retry_after_s)
        await asyncio.gather(
            *(c.outbox.finish(self.settings.send_timeout_s) for c in connections),
            return_exceptions=True,
        )

    async def drop_revoked_connections(self) -> None:
        """Close the connections whose token has been revoked."""
        revoked = {t.id for t in await self.store.list_tokens() if t.revoked}
        for connection in list(self._connections.values()):
            if not revoked.isdisjoint(connection.token_ids):
                connection.close(CloseCode.UNAUTHORIZED, "token revoked")

    # --- one WebSocket ------------------------------------------------------------------

    async def handle(self, socket: WebSocket) -> None:
        """Serve one supervisor WebSocket from the upgrade request to the close."""
        admitted = await handshake.admit(socket, self.store, self.settings, self._refusals_log)
        if admitted is None:
            return
        session = admitted.connected.session
        connection = SupervisorConnection(self, socket, admitted.protocol, admitted.hello, session)
        connection.token_ids = admitted.token_ids
        connection.enrolled = admitted.enrolled
        metrics.SUPERVISOR_CONNECTIONS.inc()
        if session > 1:
            metrics.SUPERVISOR_RECONNECTS.inc()
        previous = self._connections.get(connection.id)
        self._connections[connection.id] = connection
        if previous is not None:
            metrics.SESSIONS_REPLACED.inc()
            previous.close(CloseCode.REPLACED, "replaced by a newer connection")
        log.info("supervisor %s connected (session %d)", connection.id, session)
        try:
            await connection.serve(admitted.connected.last_seq)
        finally:
            if self.is_current(connection):
                del self._connections[connection.id]
            await self.store.supervisor_disconnected(
                connection.id, session, connection.closed_because or "closed by the supervisor"
            )
            log.info("supervisor %s disconnected (session %d)", connection.id, session)
