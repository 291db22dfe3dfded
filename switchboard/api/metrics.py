"""Prometheus metrics (switchboard.metrics) as text. Needs no token, like health: it tells
counts only, never ids or job contents."""

from __future__ import annotations

import logging
import time

from litestar import MediaType, Request, Response, get
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from protocol.state import Phase
from switchboard.hub import Hub
from switchboard.metrics import (
    DEVICES,
    JOBS,
    QUEUE_DEPTH,
    QUEUE_STATES,
    REGISTRY,
    RESERVATION_STATES,
    RESERVATIONS,
    SUPERVISORS_CONNECTED,
)
from switchboard.state import app_state
from switchboard.store.base import Store

log = logging.getLogger("switchboard.metrics")

#: Scrapes closer together than this reuse the counts of stored rows.
REFRESH_MIN_S = 1.0

_refreshed_at = float("-inf")
_drained: frozenset[str] = frozenset()


@get("/metrics", tags=["system"], media_type=MediaType.TEXT)
async def metrics(request: Request) -> Response[bytes]:
    """The switchboard's metrics in the Prometheus text format."""
    state = app_state(request)
    await refresh(state.store, state.hub)
    # The route's media_type is for the OpenAPI document; the exact type (with the format
    # version) is given as a header, which Litestar would otherwise add a second charset to.
    return Response(generate_latest(REGISTRY), headers={"content-type": CONTENT_TYPE_LATEST})


async def refresh(store: Store, hub: Hub) -> None:
    """Bring the gauges that count stored rows (jobs, queue) up to date with one store
    read, at most once per REFRESH_MIN_S however often /metrics is scraped; the connected
    supervisors are counted on every scrape. A failing store leaves the last values (and
    says so in the log): the rest is still served."""
    global _refreshed_at, _drained
    now = time.monotonic()
    if now - _refreshed_at >= REFRESH_MIN_S:
        _refreshed_at = now  # also holds off scrapes arriving while this one reads
        try:
            counts = await store.counts()
        except Exception:
            log.exception("metrics: reading the counts from the store failed")
        else:
            for phase in Phase:
                JOBS.labels(phase.value).set(counts.jobs.get(phase.value, 0))
            for state in QUEUE_STATES:
                QUEUE_DEPTH.labels(state).set(counts.queued.get(state, 0))
            _drained = frozenset(counts.drained)
        try:
            devices = await store.device_counts()
        except Exception:
            log.exception("metrics: reading the device counts from the store failed")
        else:
            DEVICES.clear()  # a class may have left the lab
            for (health, cls), n in devices.items():
                DEVICES.labels(health, cls).set(n)
        try:
            reservations = await store.reservation_counts()
        except Exception:
            log.exception("metrics: reading the reservation counts from the store failed")
        else:
            for state in RESERVATION_STATES:
                RESERVATIONS.labels(state).set(reservations.get(state, 0))
    draining = sum(1 for i in hub.connected_ids() if i in _drained)
    SUPERVISORS_CONNECTED.labels("connected").set(hub.connected_count() - draining)
    SUPERVISORS_CONNECTED.labels("draining").set(draining)
