"""Prometheus metrics (switchboard.metrics) as text. Needs no token, like health: it tells
counts only, never ids or job contents."""

from __future__ import annotations

from litestar import Response, get
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from switchboard.metrics import REGISTRY


@get("/metrics", tags=["system"], sync_to_thread=False)
def metrics() -> Response[bytes]:
    """The switchboard's metrics in the Prometheus text format."""
    # Given as a header, not media_type: Litestar would add a second charset to it.
    return Response(generate_latest(REGISTRY), headers={"content-type": CONTENT_TYPE_LATEST})
