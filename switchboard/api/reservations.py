"""Reservations of the lab's devices (docs/lab.md): ask, look, refresh, extend, release.

Who may: any token that may submit jobs asks for one (and holds it); only its holder, or
an operator, refreshes, extends or releases it. The sweep (switchboard/reservations.py)
grants, expires and releases them by itself.
"""

from __future__ import annotations

import logging
from typing import Annotated

import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.params import FromPath, JSONBody
from msgspec import Meta

from protocol.spec import Id, Selector
from switchboard import metrics
from switchboard.api.errors import ApiError, error_responses
from switchboard.api.security import actor, require
from switchboard.auth import Permission, allows
from switchboard.models import ReservationView
from switchboard.reservations import new_reservation_id
from switchboard.scheduler import ReservationWanted
from switchboard.state import AppState, app_state

log = logging.getLogger("switchboard.api.reservations")

#: The most devices one reservation may ask for.
MAX_COUNT = 64


class Reserve(msgspec.Struct, forbid_unknown_fields=True):
    """What a reservation asks for: `count` devices of `class` (and/or whose labels match
    `selector`), for `for_s` seconds once granted (absent: the switchboard's default)."""

    class_: Id | None = msgspec.field(name="class", default=None)
    selector: Selector = msgspec.field(default_factory=Selector)
    count: int = 1
    priority: Annotated[int, Meta(ge=-1000, le=1000)] = 0
    for_s: float | None = None


class Extend(msgspec.Struct, forbid_unknown_fields=True):
    """Lengthen the lease by `by_s` seconds (never past the longest a lease may last)."""

    by_s: float


def refuse(status: int, message: str, field: str | None = None) -> ApiError:
    """A refused reservation request: counted, logged once, told to the client."""
    kind = "invalid_request" if status == 400 else "forbidden"
    metrics.RESERVATION_REFUSALS.labels(kind).inc()
    log.info("refused a reservation request (%d): %s", status, message)
    return ApiError(status, kind, message, field)


def _check(state: AppState, data: Reserve) -> float:
    """The lease's length, or a 400 naming what is wrong."""
    settings = state.settings
    if not 1 <= data.count <= MAX_COUNT:
        raise refuse(400, f"count: between 1 and {MAX_COUNT} devices ({data.count} asked)", "count")
    has_selector = bool(data.selector.match_labels or data.selector.match_expressions)
    if data.class_ is None and not has_selector:
        raise refuse(400, "say which devices: a class, a selector, or both", "class")
    length = settings.lease_default_s if data.for_s is None else data.for_s
    if not 0 < length <= settings.lease_max_s:
        raise refuse(
            400,
            f"for_s: a lease lasts more than 0 s and at most {settings.lease_max_s:g} s"
            f" ({length:g} asked)",
            "for_s",
        )
    return length


async def held_by(request: Request, reservation_id: str) -> ReservationView:
    """The reservation, if the request's token is its holder or an operator: else 404 or
    403 (counted and logged once)."""
    found = await app_state(request).store.get_reservation(reservation_id)
    if found is None:
        raise ApiError(404, "not_found", f"no reservation {reservation_id!r}")
    token = request.state.token
    if found.owner != token.id and not allows(token.role, Permission.OPERATE):
        raise refuse(
            403, f"reservation {reservation_id} is held by {found.actor}: only it or an operator"
        )
    return found


class ReservationController(Controller):
    path = "/api/v1/reservations"
    tags = ["devices"]  # noqa: RUF012 - Litestar reads it as a plain list

    @post("/", guards=require(Permission.SUBMIT), responses=error_responses())
    async def reserve(self, request: Request, data: JSONBody[Reserve]) -> ReservationView:
        """Ask for devices. The reservation waits until all of them are free (granted all
        at once, never some), then holds them for its lease. While it waits, its client
        refreshes it (`POST .../refresh`) at least every `--reservation-ttl` seconds, or
        it expires."""
        state = app_state(request)
        length = _check(state, data)
        wanted = ReservationWanted("", data.count, data.class_, data.selector, data.priority)
        made = await state.store.create_reservation(
            new_reservation_id(),
            wanted,
            length,
            request.state.token.id,
            actor(request),
            state.settings.reservation_ttl_s,
        )
        if isinstance(made, str):
            raise refuse(400, made, "class" if data.class_ else "selector")
        log.info(
            "reservation %s asked by %s: %d %s",
            made.id,
            made.actor,
            made.count,
            made.class_ or "device(s)",
        )
        return made

    @get("/", guards=require(Permission.VIEW), responses=error_responses())
    async def list_reservations(self, request: Request) -> list[ReservationView]:
        """The reservations waiting or held, oldest first: who holds what until when."""
        return await app_state(request).store.list_reservations()

    @get("/{reservation_id:str}", guards=require(Permission.VIEW), responses=error_responses(404))
    async def show(self, request: Request, reservation_id: FromPath[str]) -> ReservationView:
        """A reservation, whatever its state."""
        found = await app_state(request).store.get_reservation(reservation_id)
        if found is None:
            raise ApiError(404, "not_found", f"no reservation {reservation_id!r}")
        return found

    @post(
        "/{reservation_id:str}/refresh",
        guards=require(Permission.SUBMIT),
        responses=error_responses(404),
        status_code=200,
    )
    async def refresh(self, request: Request, reservation_id: FromPath[str]) -> ReservationView:
        """Its client is still there: a waiting reservation expires a TTL from now."""
        await held_by(request, reservation_id)
        state = app_state(request)
        view = await state.store.refresh_reservation(
            reservation_id, state.settings.reservation_ttl_s
        )
        if view is None:
            raise ApiError(404, "not_found", f"no reservation {reservation_id!r}")
        return view

    @post(
        "/{reservation_id:str}/extend",
        guards=require(Permission.SUBMIT),
        responses=error_responses(404),
        status_code=200,
    )
    async def extend(
        self, request: Request, reservation_id: FromPath[str], data: JSONBody[Extend]
    ) -> ReservationView:
        """Lengthen the lease by `by_s`, up to the longest a lease may last from its grant."""
        await held_by(request, reservation_id)
        if not data.by_s > 0:
            raise refuse(400, f"by_s: more than 0 s ({data.by_s:g} asked)", "by_s")
        state = app_state(request)
        view = await state.store.extend_reservation(
            reservation_id, data.by_s, state.settings.lease_max_s
        )
        if view is None:
            raise ApiError(404, "not_found", f"no reservation {reservation_id!r}")
        if isinstance(view, str):
            raise refuse(400, view, "by_s")
        log.info(
            "reservation %s extended by %s to %.0f", reservation_id, actor(request), view.expires_at
        )
        return view

    @delete(
        "/{reservation_id:str}",
        guards=require(Permission.SUBMIT),
        responses=error_responses(404),
        status_code=200,
    )
    async def release(self, request: Request, reservation_id: FromPath[str]) -> ReservationView:
        """Release it: its devices are free at once; queued jobs naming it are canceled."""
        await held_by(request, reservation_id)
        state = app_state(request)
        view = await state.store.release_reservation(
            reservation_id, f"released by {actor(request)}"
        )
        if view is None:
            raise ApiError(404, "not_found", f"no reservation {reservation_id!r}")
        log.info("reservation %s released by %s", reservation_id, actor(request))
        state.dispatcher.wake()  # its devices may take waiting jobs
        return view
