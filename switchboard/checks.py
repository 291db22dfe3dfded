"""Health checks of the lab's devices (docs/lab.md): a loop that, every half second, gives
each device whose check job has ended the health it says, puts in doubt the devices whose
run was lost with its host or refused for want of them, and queues a check job for each
device that needs one (health.check_due). Placement then gives the check its device ahead
of any other job. A device whose check failed is recovered, if its class says so
(switchboard/recoveries.py: power cycles, each a task of its own)."""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec

from protocol.spec import JobSpec
from switchboard import metrics
from switchboard.dispatcher import Dispatcher
from switchboard.health import DeviceFacts, HealthCheck, check_due
from switchboard.ids import new_job_id
from switchboard.recoveries import Recoveries
from switchboard.store.base import Store

log = logging.getLogger("switchboard.checks")

#: Who the history names as having queued a check.
ACTOR = "switchboard (health check)"
#: The label that marks a check job, with the device it checks.
CHECK_LABEL = "switchboard.check"


def check_spec(
    check: HealthCheck, device: DeviceFacts, default_timeout_s: float | None = None
) -> JobSpec:
    """The job that checks `device`: the class's spec, asking for one device of its class,
    named and labelled after the device, with the switchboard's default run timeout if it
    gives none (a hung board must not hold its check, and so itself, for ever)."""
    spec = check.spec
    return msgspec.structs.replace(
        spec,
        name=f"health check of {device.id}",
        resources={device.class_: 1},
        labels={**spec.labels, CHECK_LABEL: device.id},
        timeout_s=spec.timeout_s if spec.timeout_s is not None else default_timeout_s,
    )


class HealthChecks:
    def __init__(
        self,
        store: Store,
        dispatcher: Dispatcher,
        checks: dict[str, HealthCheck],
        *,
        default_timeout_s: float | None = None,
        period_s: float = 0.5,
        recoveries: Recoveries | None = None,
    ) -> None:
        self.store = store
        self.recoveries = recoveries
        self.dispatcher = dispatcher
        self.checks = checks
        self.default_timeout_s = default_timeout_s
        self.period_s = period_s

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.period_s)
                try:
                    await self.once()
                except Exception:  # keep checking; the next pass retries
                    log.exception("a health-check pass failed")
        finally:
            if self.recoveries is not None:
                await self.recoveries.close()

    async def once(self) -> None:
        changed = False
        for device, job_id, result, health in await self.store.finish_checks():
            metrics.HEALTH_CHECKS.labels(result).inc()
            metrics.DEVICE_HEALTH_CHANGES.labels(health).inc()
            log.info("device %s: health check %s %s: %s", device, job_id, result, health)
            if self.recoveries is not None:
                self.recoveries.after_check(device, job_id, result, health)
            changed = True
        for device in await self.store.devices_after_lost_runs():
            metrics.DEVICE_HEALTH_CHANGES.labels("unknown").inc()
            log.warning(
                "device %s: a run it was granted was lost or refused: health unknown", device
            )
            changed = True
        if self.checks:
            now = time.time()
            due = []
            for facts in await self.store.device_facts():
                check = self.checks.get(facts.class_)
                why = check_due(facts, check, now) if check is not None else None
                if check is not None and why is not None:
                    spec = check_spec(check, facts, self.default_timeout_s)
                    due.append((new_job_id(), spec, facts.id))
                    log.info("device %s needs its health check: %s", facts.id, why)
            if due:
                await self.store.create_checks(due, ACTOR)
                changed = True
        if changed:
            self.dispatcher.wake()
