"""Dispatch: pause and resume placing jobs, and see the queue."""

from __future__ import annotations

import msgspec
from litestar import Controller, Request, get, post

from switchboard.api.errors import error_responses
from switchboard.api.security import require
from switchboard.auth import Permission
from switchboard.state import AppState, app_state


class DispatchState(msgspec.Struct):
    """`paused`: no job is placed (runs already placed go on). `queued`: jobs waiting."""

    paused: bool
    queued: int


async def _dispatch_state(state: AppState) -> DispatchState:
    return DispatchState(state.dispatcher.paused, await state.store.queue_length())


class DispatchController(Controller):
    path = "/api/v1/dispatch"
    tags = ["dispatch"]  # noqa: RUF012 - Litestar reads it as a plain list

    @get("/", guards=require(Permission.VIEW), responses=error_responses())
    async def show(self, request: Request) -> DispatchState:
        return await _dispatch_state(app_state(request))

    @post(
        "/pause",
        guards=require(Permission.OPERATE),
        status_code=200,
        responses=error_responses(),
    )
    async def pause(self, request: Request) -> DispatchState:
        """Stop placing jobs (idempotent; kept across restarts)."""
        state = app_state(request)
        await state.dispatcher.set_paused(True)
        return await _dispatch_state(state)

    @post(
        "/resume",
        guards=require(Permission.OPERATE),
        status_code=200,
        responses=error_responses(),
    )
    async def resume(self, request: Request) -> DispatchState:
        """Place jobs again (idempotent)."""
        state = app_state(request)
        await state.dispatcher.set_paused(False)
        return await _dispatch_state(state)
