"""Tokens: create (shown once), list, revoke."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.params import FromPath, JSONBody
from msgspec import Meta

from protocol import limits
from protocol.spec import Id
from switchboard.api.errors import ApiError, error_responses
from switchboard.api.security import require
from switchboard.auth import Permission, Role, TokenError, create_token
from switchboard.models import TokenView
from switchboard.state import app_state


class TokenRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A token to create. `supervisor_id` (supervisor tokens only) binds it to one
    supervisor: a connection with that token and another id is refused."""

    role: Role
    name: Annotated[str, Meta(max_length=limits.NAME_MAX_LEN)] = ""
    supervisor_id: Id | None = None


class TokenCreated(msgspec.Struct):
    """A new token. `token` is the secret: it is shown here once and never again."""

    id: str
    token: str
    role: str
    name: str
    supervisor_id: str | None = None


class TokenController(Controller):
    path = "/api/v1/tokens"
    tags = ["tokens"]  # noqa: RUF012 - Litestar reads it as a plain list

    @post(
        "/", guards=require(Permission.ADMINISTER), status_code=201, responses=error_responses(413)
    )
    async def create(self, request: Request, data: JSONBody[TokenRequest]) -> TokenCreated:
        try:
            made = await create_token(
                app_state(request).store, data.role, data.name, supervisor_id=data.supervisor_id
            )
        except TokenError as exc:
            raise ApiError(
                400, "invalid_request", f"supervisor_id: {exc}", "supervisor_id"
            ) from None
        return TokenCreated(made.id, made.token, data.role.value, made.name, data.supervisor_id)

    @get("/", guards=require(Permission.ADMINISTER), responses=error_responses())
    async def list_tokens(self, request: Request) -> list[TokenView]:
        """Every token, revoked ones included (never their secrets)."""
        return await app_state(request).store.list_tokens()

    @delete(
        "/{token_id:str}",
        guards=require(Permission.ADMINISTER),
        status_code=204,
        responses=error_responses(404),
    )
    async def revoke(self, request: Request, token_id: FromPath[str]) -> None:
        """Revoke a token at once: requests with it are refused from now on, and a
        supervisor connected with it is disconnected. Revoking twice is fine."""
        state = app_state(request)
        if not await state.store.revoke_token(token_id):
            raise ApiError(404, "not_found", f"no token {token_id!r}")
        await state.hub.drop_revoked_connections()
