"""Dispatch: pause and resume placing jobs, and see the queue."""

from __future__ import annotations

import msgspec
from litestar import Controller, Request, get, post

from switchboard.api.security import require
from switchboard.auth import Permission
from switchboard.state import AppState


class DispatchState(msgspec.Struct):
    """`paused`: no job is placed (runs already placed go on). `queued`: jobs waiting."""

    paused: bool
    queued: int


async def _dispatch_state(state: AppState) -> DispatchState:
    return DispatchState(state.dispatcher.paused, await state.store.queue_length())


class DispatchController(Controller):
    path = "/api/v1/dispatch"
    tags = ["dispatch"]  # noqa: RUF012 - Litestar reads it as a plain list

    @get("/", guards=require(Permission.VIEW))
    async def show(self, request: Request) -> DispatchState:
        return await _dispatch_state(request.app.state.switchboard)

    @post("/pause", guards=require(Permission.OPERATE), status_code=200)
    async def pause(self, request: Request) -> DispatchState:
        """Stop placing jobs (idempotent; kept across restarts)."""
        state: AppState = request.app.state.switchboard
        await state.dispatcher.set_paused(True)
        return await _dispatch_state(state)

    @post("/resume", guards=require(Permission.OPERATE), status_code=200)
    async def resume(self, request: Request) -> DispatchState:
        """Place jobs again (idempotent)."""
        state: AppState = request.app.state.switchboard
        await state.dispatcher.set_paused(False)
        return await _dispatch_state(state)
