"""Health and readiness: the only endpoints that need no token."""

from __future__ import annotations

import msgspec
from litestar import Request, Response, get
from litestar.openapi.datastructures import ResponseSpec

from switchboard.state import app_state


class Health(msgspec.Struct):
    status: str
    supervisors_connected: int


class Readiness(msgspec.Struct):
    ready: bool
    store: bool
    dispatcher: bool


@get("/api/v1/health", tags=["system"])
async def health(request: Request) -> Health:
    """Liveness: the process answers."""
    hub = app_state(request).hub
    return Health("ok", hub.connected_count())


@get(
    "/api/v1/ready",
    tags=["system"],
    responses={503: ResponseSpec(Readiness, description="Not ready", generate_examples=False)},
)
async def ready(request: Request) -> Response[Readiness]:
    """Readiness: the store answers and the dispatcher runs (503 otherwise)."""
    state = app_state(request)
    try:
        await state.store.queue_length()
        store_ok = True
    except Exception:
        store_ok = False
    dispatching = state.dispatcher.running
    ok = store_ok and dispatching
    return Response(Readiness(ok, store_ok, dispatching), status_code=200 if ok else 503)
