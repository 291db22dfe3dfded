"""What the dashboard reads: who is asking (`/me`), the overview, and one live event stream
per browser (`/live`, server-sent events; see switchboard.live)."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

import msgspec
from litestar import Request, get
from litestar.response import ServerSentEvent, ServerSentEventMessage

from switchboard.api.errors import error_responses
from switchboard.api.security import require
from switchboard.api.streams import TICK_S, revoked_event, until_revoked
from switchboard.auth import ROLE_PERMISSIONS, Permission, Role
from switchboard.live import OVERVIEW_FAILURES, OVERVIEW_MINUTES, LiveFeed
from switchboard.models import Overview
from switchboard.state import app_state

#: An idle event stream gets a comment this often, so proxies and browsers keep it open.
PING_S = 15.0


class Me(msgspec.Struct):
    """The token making the request: the dashboard shows only what its role may do."""

    id: str
    name: str
    role: str
    permissions: list[str]


@get("/api/v1/me", tags=["dashboard"], guards=require(Permission.VIEW), responses=error_responses())
async def me(request: Request) -> Me:
    token = request.state.token
    allowed = sorted(p.value for p in ROLE_PERMISSIONS[Role(token.role)])
    return Me(token.id, token.name, token.role, allowed)


@get(
    "/api/v1/overview",
    tags=["dashboard"],
    guards=require(Permission.VIEW),
    responses=error_responses(),
)
async def overview(request: Request) -> Overview:
    """Supervisors online / offline / draining, queued jobs by priority, active runs, jobs
    ended per minute over the last hour, and the latest failures."""
    store = app_state(request).store
    return await store.overview(time.time(), OVERVIEW_MINUTES, OVERVIEW_FAILURES)


async def _events(feed: LiveFeed) -> AsyncGenerator[ServerSentEventMessage | None, None]:
    """The feed's events; None (a tick, see switchboard.api.streams) after TICK_S without
    one, and a comment after PING_S."""
    subscriber = feed.subscribe()
    sent = time.monotonic()
    try:
        while True:
            try:
                event = await subscriber.next(TICK_S)
            except EOFError:  # the server is shutting down
                return
            if event is not None:
                sent = time.monotonic()
                yield ServerSentEventMessage(data=event.data, event=event.kind)
            elif time.monotonic() - sent >= PING_S:
                sent = time.monotonic()
                yield ServerSentEventMessage(data=None, comment="ping")  # no data: not an event
            else:
                yield None
    finally:
        feed.unsubscribe(subscriber)


@get(
    "/api/v1/live",
    tags=["dashboard"],
    guards=require(Permission.VIEW),
    media_type="text/event-stream",
    responses=error_responses(),
)
async def live(request: Request) -> ServerSentEvent:
    """Everything that changes, as it changes: `job` (a JobSummary), `job_deleted`
    (`{"id"}`), `supervisor` (a SupervisorView), `device` (a DeviceView without its
    history: its health, last check or holder changed, or it was declared),
    `device_removed` (`{"id"}`: its supervisor no longer declares it), `overview` (an
    Overview), `heartbeats`
    (every 5 s: `{"at", "last_heard": {supervisor id: epoch seconds}}` for the connected
    ones) and `resync` (this stream fell behind and dropped events: refetch). Comments keep
    it open. A stream whose token is revoked ends within seconds, with a `revoked` event
    (`{"error": "unauthorized", "message"}`)."""
    events = _events(app_state(request).live)
    return ServerSentEvent(until_revoked(request, events, "live", revoked_event))
