"""The Litestar application: routes, error handlers, OpenAPI, and the lifespan that opens
the store and runs the dispatcher."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from functools import partial

from litestar import Litestar, Router, WebSocket, websocket
from litestar.datastructures import State
from litestar.logging.config import LoggingConfig
from litestar.openapi import OpenAPIConfig

from common import logfmt
from protocol.exceptions import CloseCode
from protocol.messages import PowerAction, StopJob
from switchboard import recovery
from switchboard.api.artifacts import ArtifactController
from switchboard.api.device_console import device_console
from switchboard.api.devices import DeviceController
from switchboard.api.dispatch import DispatchController
from switchboard.api.errors import EXCEPTION_HANDLERS
from switchboard.api.files import FilesController
from switchboard.api.groups import GroupController
from switchboard.api.jobs import JobController
from switchboard.api.live import live, me, overview
from switchboard.api.metrics import metrics
from switchboard.api.openapi import schema_plugins
from switchboard.api.output import OutputController
from switchboard.api.request import SwitchboardRequest
from switchboard.api.reservations import ReservationController
from switchboard.api.supervisors import SupervisorController
from switchboard.api.system import health, ready
from switchboard.api.tokens import TokenController
from switchboard.api.uploads import UploadController
from switchboard.artifact_blobs import make_blobs, sweep_uploads
from switchboard.changes import Changes
from switchboard.checks import HealthChecks
from switchboard.config import Settings
from switchboard.dashboard import dashboard_routes
from switchboard.dispatcher import Dispatcher
from switchboard.hub import Hub
from switchboard.leader import Leadership, SingletonWork
from switchboard.live import LiveFeed
from switchboard.metrics import RUNS_LOST, SESSIONS_REAPED
from switchboard.models import DeviceView, PowerReply
from switchboard.power import PowerAnswer, ask_here, power
from switchboard.recoveries import Recoveries
from switchboard.relay import CommandRelay, Sockets
from switchboard.reports.queue import ReportQueue
from switchboard.reservations import ReservationSweep
from switchboard.retention import Retention
from switchboard.sealing import Keyring
from switchboard.state import AppState
from switchboard.store.base import Store
from switchboard.store.choice import make_store
from switchboard.store.fencing import Fenced
from switchboard.waiters import JobWaiters

VERSION = "0.1.0"

log = logging.getLogger("switchboard")

#: What a stopping switchboard tells supervisors to wait before reconnecting (about the time
#: a restart takes), so a fleet doesn't hammer the port while it is closed.
RESTART_GRACE_S = 2.0


async def goodbye_to_supervisors(hub: Hub) -> None:
    """Tell every connected supervisor the switchboard is stopping and when to come back
    (protocol_error 1013 with retry_after_s), then close: before the server closes
    connections itself, and again as the app shuts down."""
    await hub.close_all(CloseCode.TRY_AGAIN_LATER, "switchboard shutting down", RESTART_GRACE_S)


@websocket("/ws/supervisor")
async def supervisor_socket(socket: WebSocket) -> None:
    """The supervisor protocol endpoint (docs/protocol.md)."""
    await socket.app.state.switchboard.hub.handle(socket)


async def _recovery_cycle(
    hub: Hub, store: Store, timeout_s: float, device: DeviceView, check_job: str
) -> PowerAnswer:
    """A recovery's power cycle (switchboard/recoveries.py), audited with its failed check."""
    return await power(hub, store, device, "cycle", recovery.ACTOR, timeout_s, job_id=check_job)


async def _power_here(
    hub: Hub, timeout_s: float, supervisor_id: str, device_id: str, action: PowerAction
) -> PowerReply | None:
    """A power request another replica left for a socket here (switchboard.relay)."""
    return await ask_here(hub, supervisor_id, device_id, action, timeout_s)


async def keep_time(store: Store, settings: Settings, hub: Hub) -> None:
    """The switchboard's clock: give up on the runs of supervisors gone past the grace
    period, and end jobs past their queue timeout and runs past their run timeout (even
    when their supervisor has gone silent)."""
    period = max(0.05, min(settings.lost_after_s / 4, 0.5))
    while True:
        await asyncio.sleep(period)
        try:
            lost = await store.lose_runs(settings.lost_after_s)
            expired = await store.expire(settings.run_timeout_grace_s)
        except Fenced:  # another replica leads now: this work stops here (store.fencing)
            return
        except Exception:  # keep watching; the next pass retries
            log.exception("checking the clock failed")
            continue
        if lost:
            RUNS_LOST.labels("grace_period").inc(len(lost))
            log.warning(
                "runs lost with their supervisor: %s",
                ", ".join(f"{k.job_id}#{k.attempt}" for k in lost),
            )
        for run in expired.runs:
            log.warning("run %s#%d timed out without a report", run.job_id, run.attempt)
            stop = StopJob(job_id=run.job_id, attempt=run.attempt, reason="timeout")
            hub.send_stop(run.supervisor_id, stop)
        if expired.jobs:
            log.info("jobs past their queue timeout: %s", ", ".join(expired.jobs))
        if lost or expired.runs or expired.jobs:
            hub.wake_dispatcher()


async def reap_replicas(store: Store, hub: Hub, period_s: float, dead_after_s: float) -> None:
    """The leader ends the sessions of replicas that stopped answering (their supervisors
    reconnect elsewhere; their runs wait out the grace as any disconnected one's)."""
    while True:
        try:
            reaped = await store.reap_replicas(dead_after_s)
        except Fenced:  # another replica leads now: this work stops here (store.fencing)
            return
        except Exception:  # keep watching; the next pass retries
            log.exception("reaping the sessions of silent replicas failed")
            reaped = []
        if reaped:
            SESSIONS_REAPED.inc(len(reaped))
            log.warning(
                "sessions of a switchboard replica that stopped answering ended: %s",
                ", ".join(reaped),
            )
            hub.wake_dispatcher()
        await asyncio.sleep(period_s)


def singleton_work(state: AppState, reports: ReportQueue) -> dict[str, SingletonWork]:
    """The work that runs once for the whole lab: on the replica holding the leader lease
    (switchboard.leader), or, on a store one process serves, here for good."""
    store, settings, hub = state.store, state.settings, state.hub
    work: dict[str, SingletonWork] = {
        "clock": lambda: keep_time(store, settings, hub),
        "retention": Retention(store, state.artifacts, settings).run,
        "health checks": HealthChecks(
            store,
            state.dispatcher,
            settings.health_checks,
            default_timeout_s=settings.default_run_timeout_s,
            recoveries=Recoveries(
                store,
                settings.health_checks,
                partial(_recovery_cycle, hub, store, settings.power_timeout_s),
                state.dispatcher.wake,
            ),
        ).run,
        "reservations": ReservationSweep(
            store,
            state.dispatcher,
            period_s=settings.reservation_sweep_s,
            limit=settings.reservation_sweep_limit,
        ).run,
    }
    if store.shared:
        work["replica reaper"] = lambda: reap_replicas(
            store, hub, claim_period(settings), settings.leader_lease_s
        )
    return work


def claim_period(settings: Settings) -> float:
    """How often replicas claim the leader lease: a fifth of it, every 2 s at most."""
    return min(settings.leader_claim_s, settings.leader_lease_s / 5)


def create_app(settings: Settings, keyring: Keyring | None = None) -> Litestar:
    """`keyring` seals secret parameter values (server.py loads it from the settings)."""
    store = make_store(settings, keyring)
    hub = Hub(store, settings)
    changes = Changes(store)
    artifact_blobs = make_blobs(store, settings)
    reports = ReportQueue(store, artifact_blobs)
    hub.on_reports(reports.submit)
    waiters = JobWaiters(store, changes)
    hub.on_endings(waiters.is_waited, waiters.found_ended)
    state = AppState(
        settings=settings,
        store=store,
        hub=hub,
        dispatcher=Dispatcher(store, hub, aging_s=settings.aging_s),
        artifacts=artifact_blobs,
        live=LiveFeed(store, hub, changes),
        changes=changes,
        waiters=waiters,
    )

    leadership = Leadership(
        store,
        singleton_work(state, reports),
        ttl_s=settings.leader_lease_s,
        claim_every_s=claim_period(settings),
        on_owned=hub.drop_disowned,
    )
    if store.shared:
        hub.relay = CommandRelay(
            store,
            Sockets(
                lambda: list(hub.connected_ids()),
                hub.stop_here,
                hub.start_stored,
                partial(_power_here, hub, settings.power_timeout_s),
            ),
            dsn=settings.database if settings.notify and not settings.database_pooler else None,
            sweep_s=settings.command_sweep_s,
            on_jobs_queued=state.dispatcher.jobs_submitted,
            on_sweep=state.dispatcher.wake,
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await store.open()
        await store.forget_connections()
        # Reports stored before a stop and not parsed then: parse them now.
        reports.submit(await store.pending_reports())
        background = [
            asyncio.create_task(state.dispatcher.run(), name="dispatcher"),
            asyncio.create_task(leadership.run(), name="leadership"),
            asyncio.create_task(state.live.run(), name="live feed"),
            asyncio.create_task(state.waiters.run(), name="job waiters"),
            asyncio.create_task(hub.keep_heartbeats(), name="heartbeats"),
            asyncio.create_task(hub.keep_send_deadlines(), name="send deadlines"),
        ]
        if hub.relay is not None:
            background.append(asyncio.create_task(hub.relay.run(), name="commands in"))
        if store.shared:  # each replica's own data dir (retention sweeps the leader's)
            sweep = sweep_uploads(artifact_blobs.files, settings.retention_interval_s)
            background.append(asyncio.create_task(sweep, name="upload leftovers"))
        try:
            yield
        finally:
            state.waiters.close()  # (uvicorn closed them already when it was signalled)
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            reports.stop()
            await goodbye_to_supervisors(hub)  # a backstop: any connected since the first
            try:
                await store.leave()  # another replica leads at once, not a lease later
            except Exception:
                log.exception("releasing the leader lease failed (it expires on its own)")
            await store.close()

    artifacts = Router(
        path="/",
        route_handlers=[ArtifactController],
        request_max_body_size=settings.max_artifact_bytes,
    )
    return Litestar(
        route_handlers=[
            JobController,
            OutputController,
            FilesController,
            SupervisorController,
            DeviceController,
            ReservationController,
            GroupController,
            TokenController,
            DispatchController,
            artifacts,
            UploadController,
            health,
            ready,
            me,
            overview,
            live,
            metrics,
            supervisor_socket,
            device_console,
            *dashboard_routes(),
        ],
        lifespan=[lifespan],
        state=State({"switchboard": state}),
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        request_class=SwitchboardRequest,
        # The process sets up the root logger (common.logfmt, in server.py); Litestar
        # only gives its own logger a handler, in the same format, text or JSON.
        logging_config=LoggingConfig(
            configure_root_logger=False,
            formatters={"standard": logfmt.formatter_config(settings.log_format)},
        ),
        request_max_body_size=settings.max_request_bytes,
        openapi_config=OpenAPIConfig(title="Switchboard", version=VERSION),
        plugins=schema_plugins(),
    )
