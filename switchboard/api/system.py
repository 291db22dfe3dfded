"""Health and supervisors."""

from __future__ import annotations

import msgspec
from litestar import Request, get

from switchboard.api.security import require
from switchboard.auth import Permission
from switchboard.models import SupervisorView


class Health(msgspec.Struct):
    status: str
    supervisors_connected: int


@get("/api/v1/health", tags=["system"])
async def health(request: Request) -> Health:
    """Liveness; needs no token."""
    hub = request.app.state.switchboard.hub
    return Health("ok", len(hub.sessions))


@get("/api/v1/supervisors", guards=require(Permission.VIEW), tags=["supervisors"])
async def list_supervisors(request: Request) -> list[SupervisorView]:
    """Every supervisor that ever connected, with whether it is connected now."""
    return await request.app.state.switchboard.store.list_supervisors()
