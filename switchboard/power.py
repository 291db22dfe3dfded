"""Power control of the lab's devices (docs/lab.md "Power"): a power request goes to the
device's supervisor (protocol 1.5 `power`), the caller waits for its `power_result` with
a deadline, and every call, however it went, is kept in the device's history and, when
a run holds the device, in that run's timeline.

The wait is the caller's own (one REST request): nothing that serves everyone awaits it.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec

from protocol.messages import PowerAction
from switchboard import metrics
from switchboard.hub import Hub
from switchboard.models import DeviceView, PowerCall
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
    def not_done(result: str, reason: str) -> PowerAnswer:
        return PowerAnswer(device.id, action, result, reason=reason)

    if not device.power:
        return not_done("no_power", f"device {device.id} has no power commands")
    sent = hub.power(device.supervisor_id, device.id, action)
    if isinstance(sent, str):
        return not_done("not_connected", sent)
    try:
        # Shielded: a timeout cancels only the wait; the future is dropped just after.
        reply = await asyncio.wait_for(asyncio.shield(sent), timeout_s)
    except TimeoutError:
        return not_done("timed_out", f"no answer from {device.supervisor_id} in {timeout_s:g} s")
    finally:
        sent.cancel()  # answered or not, forget it (its entry leaves the connection's table)
    if reply is None:
        return not_done("not_connected", f"supervisor {device.supervisor_id} disconnected")
    return PowerAnswer(
        device.id,
        action,
        "ok" if reply.ok else "failed",
        ok=reply.ok,
        exit_code=reply.exit_code,
        output=reply.output,
        reason=reply.reason,
    )
