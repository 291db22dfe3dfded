"""The Litestar application: routes, error handlers, OpenAPI, and the lifespan that opens
the store and runs the dispatcher."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from litestar import Litestar, Router, WebSocket, websocket
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig

from protocol.exceptions import CloseCode
from switchboard.api.artifacts import ArtifactController
from switchboard.api.errors import EXCEPTION_HANDLERS
from switchboard.api.jobs import JobController
from switchboard.api.metrics import metrics
from switchboard.api.system import health, list_supervisors
from switchboard.artifacts import ArtifactFiles
from switchboard.config import Settings
from switchboard.dispatcher import Dispatcher
from switchboard.metrics import RUNS_LOST
from switchboard.sessions import Hub
from switchboard.state import AppState
from switchboard.store.base import Store
from switchboard.store.sqlite import SQLiteStore

VERSION = "0.1.0"

log = logging.getLogger("switchboard")

#: What a stopping switchboard tells supervisors to wait before reconnecting (about the time
#: a restart takes), so a fleet doesn't hammer the port while it is closed.
RESTART_GRACE_S = 2.0


@websocket("/ws/supervisor")
async def supervisor_socket(socket: WebSocket) -> None:
    """The supervisor protocol endpoint (docs/protocol.md)."""
    await socket.app.state.switchboard.hub.handle(socket)


async def watch_for_lost_runs(store: Store, settings: Settings, hub: Hub) -> None:
    """Give up on the runs of supervisors that have been gone past the grace period."""
    period = max(0.05, min(settings.lost_after_s / 4, 5.0))
    while True:
        await asyncio.sleep(period)
        try:
            lost = await store.lose_runs(settings.lost_after_s)
        except Exception:  # keep watching; the next pass retries
            log.exception("checking for lost runs failed")
            continue
        if lost:
            RUNS_LOST.labels("grace_period").inc(len(lost))
            log.warning(
                "runs lost with their supervisor: %s",
                ", ".join(f"{k.job_id}#{k.attempt}" for k in lost),
            )
            hub.wake_dispatcher()


def create_app(settings: Settings) -> Litestar:
    store = SQLiteStore(settings.database_path)
    hub = Hub(store, settings)
    state = AppState(
        settings=settings,
        store=store,
        hub=hub,
        dispatcher=Dispatcher(store, hub),
        artifacts=ArtifactFiles(settings.artifacts_dir),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await store.open()
        await store.forget_connections()
        background = [
            asyncio.create_task(state.dispatcher.run(), name="dispatcher"),
            asyncio.create_task(watch_for_lost_runs(store, settings, hub), name="lost runs"),
        ]
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await hub.close_all(
                CloseCode.TRY_AGAIN_LATER, "switchboard shutting down", RESTART_GRACE_S
            )
            await store.close()

    artifacts = Router(
        path="/",
        route_handlers=[ArtifactController],
        request_max_body_size=settings.max_artifact_bytes,
    )
    return Litestar(
        route_handlers=[
            JobController,
            artifacts,
            health,
            list_supervisors,
            metrics,
            supervisor_socket,
        ],
        lifespan=[lifespan],
        state=State({"switchboard": state}),
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        request_max_body_size=settings.max_request_bytes,
        openapi_config=OpenAPIConfig(title="Switchboard", version=VERSION),
    )
