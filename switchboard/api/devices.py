"""Devices (the hardware lab, docs/lab.md): list, show, set health, and switch power."""

from __future__ import annotations

import logging
from typing import Annotated

import msgspec
from litestar import Controller, Request, get, post, put
from litestar.params import FromPath, JSONBody, QueryParameter

from protocol.messages import POWER_ACTIONS, PowerAction
from switchboard import health, metrics, power
from switchboard.api.errors import ApiError, error_responses
from switchboard.api.security import actor, require
from switchboard.auth import Permission, allows
from switchboard.models import DeviceView
from switchboard.state import app_state

log = logging.getLogger("switchboard.api.devices")


class SetHealth(msgspec.Struct, forbid_unknown_fields=True):
    """An operator's change of a device's health, and why (kept in its history)."""

    health: str
    reason: str


class PowerRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Which of the device's power commands to run."""

    action: str


#: Why a power call could not be answered, as the HTTP status and error kind it gets.
_NOT_ANSWERED = {
    "no_power": (409, "no_power"),
    "not_connected": (503, "not_connected"),
    "timed_out": (504, "timed_out"),
}


def _refuse_power(status: int, message: str, field: str | None = None) -> ApiError:
    """A power request refused before it reaches a supervisor: counted, logged once."""
    kind = "invalid_request" if status == 400 else "forbidden"
    metrics.POWER_REFUSALS.labels(kind).inc()
    log.info("refused a power request (%d): %s", status, message)
    return ApiError(status, kind, message, field)


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
        class_: Annotated[str | None, QueryParameter(name="class")] = None,
        health_: Annotated[str | None, QueryParameter(name="health")] = None,
        host: Annotated[str | None, QueryParameter(name="host")] = None,
    ) -> list[DeviceView]:
        """Every device the supervisors declare, by id: of one `class`, in one `health`,
        on one `host` (supervisor id), if given. Without its history."""
        _check_health_filter(health_)
        return await app_state(request).store.list_devices(
            class_=class_, health=health_, supervisor_id=host
        )

    @get("/{device_id:str}", guards=require(Permission.VIEW), responses=error_responses(404))
    async def show(self, request: Request, device_id: FromPath[str]) -> DeviceView:
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
    async def set_health(
        self, request: Request, device_id: FromPath[str], data: JSONBody[SetHealth]
    ) -> DeviceView:
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

    @post(
        "/{device_id:str}/power",
        guards=require(Permission.VIEW),
        responses=error_responses(404, 409, 503, 504),
        status_code=200,
    )
    async def switch_power(
        self, request: Request, device_id: FromPath[str], data: JSONBody[PowerRequest]
    ) -> power.PowerAnswer:
        """Run one of the device's power commands (`on`, `off`, `cycle`, `status`) on its
        host and answer how it went: for operators and the holder of the lease the device
        belongs to (403 for anyone else). 409 if the device has no power commands, 503 if
        its supervisor is not connected, 504 if no answer came in time. Every call is kept
        in the device's history and, when a run holds the device, in the run's events."""
        if data.action not in POWER_ACTIONS:
            raise _refuse_power(400, f"action: one of {', '.join(POWER_ACTIONS)}", "action")
        state = app_state(request)
        device = await state.store.get_device(device_id)
        if device is None:
            raise ApiError(404, "not_found", f"no device {device_id!r}")
        token = request.state.token
        if not allows(token.role, Permission.OPERATE):
            lease = (
                await state.store.get_reservation(device.reservation)
                if device.reservation is not None
                else None
            )
            if lease is None or lease.owner != token.id:
                raise _refuse_power(
                    403,
                    f"power of device {device_id}: only an operator or the holder of its"
                    " lease" + (f" ({lease.actor})" if lease is not None else " (it has none)"),
                )
        action: PowerAction = data.action  # checked above
        answer = await power.power(
            state.hub, state.store, device, action, actor(request), state.settings.power_timeout_s
        )
        if answer.result in _NOT_ANSWERED:
            status, kind = _NOT_ANSWERED[answer.result]
            raise ApiError(status, kind, answer.reason)
        return answer
