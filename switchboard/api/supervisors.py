"""Supervisors: list, show, drain and resume, operator labels, token rotation, unenrol."""

from __future__ import annotations

import logging

import msgspec
from litestar import Controller, Request, get, post, put
from litestar.params import FromPath, JSONBody

from protocol.spec import Labels
from switchboard.api.errors import ApiError, error_responses
from switchboard.api.security import actor, require
from switchboard.api.tokens import TokenCreated
from switchboard.auth import Permission, Role, create_token
from switchboard.live import with_last_heard
from switchboard.models import ConnectionRecord, SupervisorView
from switchboard.state import AppState, app_state

log = logging.getLogger("switchboard.api.supervisors")


class OperatorLabels(msgspec.Struct, forbid_unknown_fields=True):
    """Labels an operator sets on a supervisor; they override the ones it advertises for
    selectors (the whole set is replaced; `{}` clears it)."""

    labels: Labels


class Unenrolled(msgspec.Struct):
    """A supervisor id released: its host credentials (the tokens bound to it) are revoked,
    so the next registration token to present it enrols it."""

    supervisor_id: str
    #: Ids of the tokens revoked now (empty if it had none).
    revoked: list[str]


async def _supervisor_or_404(state: AppState, supervisor_id: str) -> SupervisorView:
    view = await state.store.get_supervisor(supervisor_id)
    if view is None:
        raise ApiError(404, "not_found", f"no supervisor {supervisor_id!r}")
    return with_last_heard(view, state.hub)


async def _set_drained(state: AppState, supervisor_id: str, drained: bool) -> SupervisorView:
    if not await state.store.set_drained(supervisor_id, drained):
        raise ApiError(404, "not_found", f"no supervisor {supervisor_id!r}")
    if not drained:
        state.dispatcher.wake()  # it may take queued jobs now
    return await _supervisor_or_404(state, supervisor_id)


#: Connections one supervisor's history shows.
CONNECTIONS_SHOWN = 50


class SupervisorController(Controller):
    path = "/api/v1/supervisors"
    tags = ["supervisors"]  # noqa: RUF012 - Litestar reads it as a plain list

    @get("/", guards=require(Permission.VIEW), responses=error_responses())
    async def list_supervisors(self, request: Request) -> list[SupervisorView]:
        """Every supervisor that ever connected, with whether it is connected now."""
        state = app_state(request)
        return [with_last_heard(view, state.hub) for view in await state.store.list_supervisors()]

    @get("/{supervisor_id:str}", guards=require(Permission.VIEW), responses=error_responses(404))
    async def show(self, request: Request, supervisor_id: FromPath[str]) -> SupervisorView:
        return await _supervisor_or_404(app_state(request), supervisor_id)

    @get(
        "/{supervisor_id:str}/connections",
        guards=require(Permission.VIEW),
        responses=error_responses(404),
    )
    async def connections(
        self, request: Request, supervisor_id: FromPath[str]
    ) -> list[ConnectionRecord]:
        """The supervisor's latest connections (at most 50), newest first: when each began,
        and when and why it ended."""
        state = app_state(request)
        await _supervisor_or_404(state, supervisor_id)
        return await state.store.connection_records(supervisor_id, CONNECTIONS_SHOWN)

    @post(
        "/{supervisor_id:str}/drain",
        guards=require(Permission.OPERATE),
        status_code=200,
        responses=error_responses(404),
    )
    async def drain(self, request: Request, supervisor_id: FromPath[str]) -> SupervisorView:
        """Take no new runs on this supervisor; its current runs finish (idempotent)."""
        return await _set_drained(app_state(request), supervisor_id, True)

    @post(
        "/{supervisor_id:str}/resume",
        guards=require(Permission.OPERATE),
        status_code=200,
        responses=error_responses(404),
    )
    async def resume(self, request: Request, supervisor_id: FromPath[str]) -> SupervisorView:
        """Let a drained supervisor take runs again (idempotent)."""
        return await _set_drained(app_state(request), supervisor_id, False)

    @put(
        "/{supervisor_id:str}/labels",
        guards=require(Permission.OPERATE),
        responses=error_responses(404, 413),
    )
    async def set_labels(
        self, request: Request, supervisor_id: FromPath[str], data: JSONBody[OperatorLabels]
    ) -> SupervisorView:
        """Replace the supervisor's operator labels."""
        state = app_state(request)
        if not await state.store.set_operator_labels(supervisor_id, data.labels):
            raise ApiError(404, "not_found", f"no supervisor {supervisor_id!r}")
        state.dispatcher.wake()
        return await _supervisor_or_404(state, supervisor_id)

    @post(
        "/{supervisor_id:str}/token",
        guards=require(Permission.ADMINISTER),
        status_code=201,
        responses=error_responses(404),
    )
    async def rotate_token(self, request: Request, supervisor_id: FromPath[str]) -> TokenCreated:
        """A new supervisor token bound to this supervisor; every token bound to it
        before is revoked (and its connection closed). The token is shown only here."""
        state = app_state(request)
        await _supervisor_or_404(state, supervisor_id)
        made = await create_token(
            state.store,
            Role.SUPERVISOR,
            f"supervisor {supervisor_id}",
            supervisor_id=supervisor_id,
            replace_bound=True,
        )
        await state.hub.drop_revoked_connections()
        return TokenCreated(made.id, made.token, Role.SUPERVISOR.value, made.name, supervisor_id)

    @post(
        "/{supervisor_id:str}/unenroll",
        guards=require(Permission.ADMINISTER),
        status_code=200,
        responses=error_responses(404),
    )
    async def unenroll(self, request: Request, supervisor_id: FromPath[str]) -> Unenrolled:
        """Release the supervisor id: revoke every token bound to it (its enrolled credential
        and any rotated token) and close its connection, so the next registration token that
        presents the id may enrol it. Its jobs and history stay. Idempotent."""
        state = app_state(request)
        revoked = await state.store.unenroll(supervisor_id)
        if revoked is None:
            raise ApiError(404, "not_found", f"no supervisor {supervisor_id!r}")
        log.info(
            "supervisor %s unenrolled by %s: tokens revoked: %s",
            supervisor_id,
            actor(request),
            ", ".join(revoked) or "none",
        )
        await state.hub.drop_revoked_connections()
        return Unenrolled(supervisor_id, revoked)
