"""Prometheus metrics (switchboard.metrics) as text. Needs no token, like health: it tells
counts only, never ids or job contents."""

from __future__ import annotations

from litestar import MediaType, Request, Response, get
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from switchboard.metrics import REGISTRY, refresh
from switchboard.state import app_state


@get("/metrics", tags=["system"], media_type=MediaType.TEXT)
async def metrics(request: Request) -> Response[bytes]:
    """The switchboard's metrics in the Prometheus text format."""
    state = app_state(request)
    await refresh(state.store, state.hub)
    # The route's media_type is for the OpenAPI document; the exact type (with the format
    # version) is given as a header, which Litestar would otherwise add a second charset to.
    return Response(generate_latest(REGISTRY), headers={"content-type": CONTENT_TYPE_LATEST})
