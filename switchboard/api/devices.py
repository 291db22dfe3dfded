"""Devices (the hardware lab, docs/lab.md): list, show, and set health."""

from __future__ import annotations

import logging
from typing import Annotated

import msgspec
from litestar import Controller, Request, get, put
from litestar.params import Parameter

from switchboard import health, metrics
from switchboard.api.errors import ApiError, error_responses
from switchboard.api.security import actor, require
from switchboard.auth import Permission
from switchboard.models import DeviceView
from switchboard.state import app_state

log = logging.getLogger("switchboard.api.devices")


class SetHealth(msgspec.Struct, forbid_unknown_fields=True):
    """An operator's change of a device's health, and why (kept in its history)."""

    health: str
    reason: str


def _check_health_filter(value: str | None) -> None:
    if value is not None and value not in health.HEALTH_STATES:
        states = ", ".join(health.HEALTH_STATES)
        raise ApiError(400, "invalid_request", f"health: one of {states}", "health")


class DeviceController(Controller):
    path = "/api/v1/devices"
    tags = ["devices"]  # noqa: RUF012 - Litestar reads it as a plain list

    @get("/", guards=require(Permission.VIEW), responses=error_responses())
    async def list_devices(
        self,
        request: Request,
        class_: Annotated[str | None, Parameter(query="class")] = None,
        health_: Annotated[str | None, Parameter(query="health")] = None,
        host: Annotated[str | None, Parameter(query="host")] = None,
    ) -> list[DeviceView]:
        """Every device the supervisors declare, by id: of one `class`, in one `health`,
        on one `host` (supervisor id), if given. Without its history."""
        _check_health_filter(health_)
        return await app_state(request).store.list_devices(
            class_=class_, health=health_, supervisor_id=host
        )

    @get("/{device_id:str}", guards=require(Permission.VIEW), responses=error_responses(404))
    async def show(self, request: Request, device_id: str) -> DeviceView:
        """A device with its latest health changes (at most 100), newest first."""
        view = await app_state(request).store.get_device(device_id)
        if view is None:
            raise ApiError(404, "not_found", f"no device {device_id!r}")
        return view

    @put(
        "/{device_id:str}/health",
        guards=require(Permission.OPERATE),
        responses=error_responses(404),
    )
    async def set_health(self, request: Request, device_id: str, data: SetHealth) -> DeviceView:
        """Set the device's health (any of unknown, good, bad, maintenance, looping,
        retired), with a reason. A device that is bad, in maintenance or retired gets no
        job; the change is kept in its history with the token that made it."""
        refusal = health.refuse_change(data.health, data.reason)
        if refusal is not None:
            raise ApiError(400, "invalid_request", refusal, "health")
        state = app_state(request)
        before = await state.store.get_device(device_id)
        if before is None:
            raise ApiError(404, "not_found", f"no device {device_id!r}")
        who = actor(request)
        view = await state.store.set_device_health(device_id, data.health, who, data.reason)
        if view is None:
            raise ApiError(404, "not_found", f"no device {device_id!r}")
        if before.health != view.health:
            metrics.DEVICE_HEALTH_CHANGES.labels(view.health).inc()
            log.info(
                "device %s: %s -> %s by %s: %s",
                device_id,
                before.health,
                view.health,
                who,
                data.reason,
            )
        state.dispatcher.wake()  # a device back in service may take a waiting job
        return view
