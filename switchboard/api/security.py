"""Route guards: every endpoint but health names the permission it needs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler

from switchboard.api.errors import ApiError
from switchboard.auth import Permission, Role, allows, authenticate
from switchboard.state import app_state

Guard = Callable[[ASGIConnection, BaseRouteHandler], Awaitable[None]]


def require(permission: Permission) -> list[Guard]:
    """Guards for a route needing `permission`; the token lands in `connection.state.token`."""

    async def guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        token = await authenticate(
            app_state(connection).store, connection.headers.get("authorization")
        )
        if token is None:
            raise ApiError(401, "unauthorized", "a valid token is required (Authorization: Bearer)")
        if not allows(token.role, permission):
            raise ApiError(403, "forbidden", f"role {token.role!r} may not {permission.value}")
        if token.role == Role.SUPERVISOR and token.supervisor_id is None:
            # A registration token is shared by a fleet: it only enrols (the WebSocket).
            raise ApiError(
                403,
                "forbidden",
                f"a registration token only enrols supervisors: {permission.value} takes a"
                " host's own credential",
            )
        connection.state.token = token

    return [guard]


def actor(connection: ASGIConnection) -> str:
    """Who made this request, for the audit trail: the token's name and id."""
    token = connection.state.token
    return f"{token.name} ({token.id})"
