"""Recovery of devices whose health check failed, as the checks loop runs it (docs/lab.md
"Recovery"; the decisions are switchboard/recovery.py's). The loop hands each ended check
to `after_check`, which returns at once: each recovery step runs as a task of its own (a
power cycle may take the whole power timeout), so no device's board holds up the loop
that serves all of them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from switchboard import metrics, recovery
from switchboard.health import HealthCheck
from switchboard.models import DeviceView
from switchboard.power import PowerAnswer
from switchboard.store.base import Store

log = logging.getLogger("switchboard.recovery")

#: Power-cycles a device for its recovery after the failed check (the job id), audited.
PowerCycle = Callable[[DeviceView, str], Awaitable[PowerAnswer]]


class Recoveries:
    def __init__(
        self,
        store: Store,
        checks: dict[str, HealthCheck],
        cycle: PowerCycle,
        wake: Callable[[], None],
    ) -> None:
        self.store = store
        self.checks = checks
        self.cycle = cycle
        self.wake = wake
        #: Power cycles in a row, per device, since its last passed check (kept in memory:
        #: a restarted switchboard starts counting again, at most `recovery_attempts` more).
        self.cycles: dict[str, int] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def after_check(self, device_id: str, job_id: str, result: str, health: str) -> None:
        """A check of `device_id` ended: recover the device if it failed and its class
        says so (in a task of its own)."""
        self.cycles[device_id] = recovery.cycles_after(result, self.cycles.get(device_id, 0))
        if self.cycles[device_id] == 0:
            del self.cycles[device_id]
        if result != "fail" or health != "bad" or device_id in self._tasks:
            return
        task = asyncio.create_task(
            self._recover(device_id, job_id, result, health), name=f"recovery of {device_id}"
        )
        self._tasks[device_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(device_id, None))

    @property
    def under_way(self) -> frozenset[str]:
        """The devices whose recovery step is running now."""
        return frozenset(self._tasks)

    async def _recover(self, device_id: str, job_id: str, result: str, health: str) -> None:
        try:
            await self._steps(device_id, job_id, result, health)
        except Exception:  # the device stays bad: an operator's to look at
            log.exception("the recovery of device %s failed", device_id)

    async def _steps(self, device_id: str, job_id: str, result: str, health: str) -> None:
        device = await self.store.get_device(device_id)
        if device is None:
            return
        check = self.checks.get(device.class_)
        attempts = check.recovery_attempts if check is not None else None
        step = recovery.after_check(
            result, health, self.cycles.get(device_id, 0), attempts, device.power, job_id
        )
        if step.action == "none":
            if step.reason:
                log.info("device %s is not recovered: %s", device_id, step.reason)
            return
        if step.action == "cycle":
            assert attempts is not None  # a cycle is decided only with attempts
            self.cycles[device_id] = step.attempt
            log.info("device %s: %s", device_id, step.reason)
            answer = await self.cycle(device, job_id)
            step = recovery.after_power(
                answer.result, answer.reason, step.attempt, attempts, job_id
            )
        health_to = "unknown" if step.action == "recheck" else "maintenance"
        if step.action == "maintenance":
            self.cycles.pop(device_id, None)
        if await self.store.recovery_health(
            device_id, job_id, health_to, recovery.ACTOR, step.reason
        ):
            metrics.DEVICE_HEALTH_CHANGES.labels(health_to).inc()
            log.log(
                logging.WARNING if health_to == "maintenance" else logging.INFO,
                "device %s: %s: %s",
                device_id,
                health_to,
                step.reason,
            )
            self.wake()
        else:
            self.cycles.pop(device_id, None)
            log.info("device %s: its health changed meanwhile: its recovery ends", device_id)

    async def close(self) -> None:
        """Cancel the recoveries under way (the switchboard is stopping)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
