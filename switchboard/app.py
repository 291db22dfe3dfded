"""The Litestar application: routes, error handlers, OpenAPI, and the lifespan that opens
the store and runs the dispatcher."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from litestar import Litestar, Router, WebSocket, websocket
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig

from protocol.exceptions import CloseCode
from switchboard.api.artifacts import ArtifactController
from switchboard.api.errors import EXCEPTION_HANDLERS
from switchboard.api.jobs import JobController
from switchboard.api.system import health, list_supervisors
from switchboard.artifacts import ArtifactFiles
from switchboard.config import Settings
from switchboard.dispatcher import Dispatcher
from switchboard.sessions import Hub
from switchboard.state import AppState
from switchboard.store.sqlite import SQLiteStore

VERSION = "0.1.0"


@websocket("/ws/supervisor")
async def supervisor_socket(socket: WebSocket) -> None:
    """The supervisor protocol endpoint (docs/protocol.md)."""
    await socket.app.state.switchboard.hub.handle(socket)


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
        dispatching = asyncio.create_task(state.dispatcher.run(), name="dispatcher")
        try:
            yield
        finally:
            dispatching.cancel()
            await asyncio.gather(dispatching, return_exceptions=True)
            await hub.close_all(CloseCode.TRY_AGAIN_LATER, "switchboard shutting down")
            await store.close()

    artifacts = Router(
        path="/",
        route_handlers=[ArtifactController],
        request_max_body_size=settings.max_artifact_bytes,
    )
    return Litestar(
        route_handlers=[JobController, artifacts, health, list_supervisors, supervisor_socket],
        lifespan=[lifespan],
        state=State({"switchboard": state}),
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        request_max_body_size=settings.max_request_bytes,
        openapi_config=OpenAPIConfig(title="Switchboard", version=VERSION),
    )
