"""Power control of the lab's devices (docs/lab.md "Power"): a power request goes to the
device's supervisor (protocol 1.5 `power`), the caller waits for its `power_result` with
a deadline, and every call, however it went, is kept in the device's history and, when
a run holds the device, in that run's timeline.

The wait is the caller's own (one REST request): nothing that serves everyone awaits it.
When the supervisor's socket is on another replica (several on one database), the
request goes to that replica as a command and its answer comes back the same way
(switchboard.relay), within the same timeout; the call is audited here, once.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec

from protocol.messages import PowerAction
from switchboard import metrics
from switchboard.hub import Hub
from switchboard.models import DeviceView, PowerCall, PowerReply
from switchboard.store.base import Store

log = logging.getLogger("switchboard.power")


class PowerAnswer(msgspec.Struct, frozen=True):
    """How a power call went (`result`: one of models.POWER_RESULTS): `ok` if the command
    exited 0, its exit status and output (cut to 4 KiB on the host), why not, and the
    run holding the device then (its timeline has the call too)."""

    device_id: str
    action: str
    result: str
    ok: bool = False
    exit_code: int | None = None
    output: str = ""
    reason: str = ""
    job_id: str | None = None


async def power(
    hub: Hub,
    store: Store,
    device: DeviceView,
    action: PowerAction,
    who: str,
    timeout_s: float,
    job_id: str | None = None,
) -> PowerAnswer:
    """Have the device's supervisor run its `action` command and wait at most `timeout_s`
    for the answer; the call is audited whatever came of it, with the job it was made for
    (`job_id`: a failed health check the switchboard recovers from), or the run holding the
    device then."""
    answer = await _ask(hub, device, action, timeout_s)
    call = PowerCall(
        at=time.time(),
        actor=who,
        action=action,
        result=answer.result,
        exit_code=answer.exit_code,
        reason=answer.reason,
        job_id=job_id,
    )
    kept = await store.record_power_call(device.id, call)
    metrics.POWER_CALLS.labels(action, answer.result).inc()
    log.info(
        "power %s of device %s by %s: %s%s",
        action,
        device.id,
        who,
        answer.result,
        f" ({answer.reason})" if answer.reason else "",
    )
    return msgspec.structs.replace(answer, job_id=kept.job_id)


async def _ask(hub: Hub, device: DeviceView, action: PowerAction, timeout_s: float) -> PowerAnswer:
    if not device.power:
        return PowerAnswer(
            device.id, action, "no_power", reason=f"device {device.id} has no power commands"
        )
    reply = await ask_supervisor(hub, device.supervisor_id, device.id, action, timeout_s)
    return PowerAnswer(
        device.id,
        action,
        reply.result,
        ok=reply.ok,
        exit_code=reply.exit_code,
        output=reply.output,
        reason=reply.reason,
    )


async def ask_supervisor(
    hub: Hub, supervisor_id: str, device_id: str, action: PowerAction, timeout_s: float
) -> PowerReply:
    """Send the power request on the supervisor's socket, here or (through the database)
    on the replica holding it, and wait at most `timeout_s` for the answer."""
    reply = await ask_here(hub, supervisor_id, device_id, action, timeout_s)
    if reply is not None:
        return reply
    if hub.relay is not None:
        return await hub.relay.ask_power(supervisor_id, device_id, action, timeout_s)
    return PowerReply("not_connected", reason=f"supervisor {supervisor_id} is not connected")


async def ask_here(
    hub: Hub, supervisor_id: str, device_id: str, action: PowerAction, timeout_s: float
) -> PowerReply | None:
    """Send the power request on the supervisor's socket if it is here and wait at most
    `timeout_s` for the answer; None if the socket is not here."""
    if not hub.holds(supervisor_id):
        return None
    sent = hub.power(supervisor_id, device_id, action)
    if isinstance(sent, str):
        return PowerReply("not_connected", reason=sent)
    try:
        # Shielded: a timeout cancels only the wait; the future is dropped just after.
        reply = await asyncio.wait_for(asyncio.shield(sent), timeout_s)
    except TimeoutError:
        return PowerReply("timed_out", reason=f"no answer from {supervisor_id} in {timeout_s:g} s")
    finally:
        sent.cancel()  # answered or not, forget it (its entry leaves the connection's table)
    if reply is None:
        return PowerReply("not_connected", reason=f"supervisor {supervisor_id} disconnected")
    return PowerReply(
        "ok" if reply.ok else "failed",
        ok=reply.ok,
        exit_code=reply.exit_code,
        output=reply.output,
        reason=reply.reason,
    )
