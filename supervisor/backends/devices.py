"""Host devices (boards, probes, serial adapters) handed to jobs, each to one run at a time.

The supervisor's config file names every device with its host path and the resource class it
counts towards. The supervisor advertises how many devices of each class it has
(:meth:`Devices.resource_counts`, sent in its Hello); a job that asks for
`resources = {"nrf52840dk": 1}` gets one free device of that class for its run, and nobody
else gets that device until the run has ended.

Refusals, as JobError kinds the switchboard understands:
- a class this host doesn't have, or more devices than it has of a class: image_not_compatible
  (this host can never run the job);
- every device of the class is held by other runs, or unplugged: max_concurrent_jobs (the job
  may be placed again, here later or elsewhere).

A switchboard that keeps the lab's inventory (protocol 1.4) names the devices it grants a
run (`start_job.devices`): the run gets exactly those. One this host doesn't have (its
config changed), held by another run or unplugged is refused as max_concurrent_jobs, so the
job is placed again with the inventory this host reports when it reconnects.

All methods run on the event loop (no locking); nothing here blocks except the `os.stat` of
the device nodes being allocated.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping

from protocol.exceptions import JobError, JobErrorKind
from protocol.messages import DeviceInfo
from supervisor.config import DeviceConfig

log = logging.getLogger(__name__)


def _present(device: DeviceConfig) -> bool:
    return os.path.exists(device.path)


def inventory(devices: Iterable[DeviceConfig]) -> list[DeviceInfo]:
    """The devices of a config as a Hello declares them (protocol 1.4)."""
    return [
        DeviceInfo(
            id=d.name,
            class_=d.resource,
            labels=d.labels,
            console=d.console is not None,
            power=d.power is not None,
        )
        for d in devices
    ]


class Devices:
    """The devices of one host and which run holds which."""

    def __init__(
        self,
        devices: Iterable[DeviceConfig] = (),
        *,
        present: Callable[[DeviceConfig], bool] = _present,
    ) -> None:
        self._devices: dict[str, DeviceConfig] = {}
        for device in devices:
            if device.name in self._devices:
                raise ValueError(f"two devices are named {device.name!r}")
            self._devices[device.name] = device
        self._present = present
        #: device name -> the owner (a run's key) holding it.
        self._holder: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._devices)

    def resource_counts(self) -> dict[str, int]:
        """How many devices of each class this host has (free or not): for the Hello."""
        counts: dict[str, int] = {}
        for device in self._devices.values():
            counts[device.resource] = counts.get(device.resource, 0) + 1
        return counts

    def free(self, resource: str) -> list[DeviceConfig]:
        """Devices of `resource` that no run holds (plugged in or not)."""
        return [
            d
            for d in self._devices.values()
            if d.resource == resource and d.name not in self._holder
        ]

    def held_by(self, owner: str) -> list[DeviceConfig]:
        return [self._devices[n] for n, o in self._holder.items() if o == owner]

    def holder(self, name: str) -> str | None:
        return self._holder.get(name)

    def allocate(
        self, owner: str, wanted: Mapping[str, int], named: Iterable[str] = ()
    ) -> list[DeviceConfig]:
        """Give `owner` the devices `wanted` asks for ({resource class: count}), all or none:
        exactly the `named` ones if the switchboard granted some, else free ones.

        Asking again for an owner that already holds devices returns those (idempotent).
        Raises JobError (see the module docstring) when the request can't be met now.
        """
        held = self.held_by(owner)
        if held:
            return held
        names = list(named)
        if names:
            return self._allocate_named(owner, names)
        if not wanted:
            return []
        counts = self.resource_counts()
        for resource, count in sorted(wanted.items()):
            have = counts.get(resource, 0)
            if have == 0:
                offered = ", ".join(sorted(counts)) or "none"
                raise JobError(
                    JobErrorKind.IMAGE_NOT_COMPATIBLE,
                    f"this host has no devices of resource {resource!r} (it has: {offered})",
                )
            if count > have:
                raise JobError(
                    JobErrorKind.IMAGE_NOT_COMPATIBLE,
                    f"the job wants {count} {resource!r} devices; this host has only {have}",
                )
        chosen: list[DeviceConfig] = []
        for resource, count in sorted(wanted.items()):
            free = self.free(resource)
            plugged = [d for d in free if self._present(d)]
            if len(plugged) < count:
                busy = counts[resource] - len(free)
                missing = len(free) - len(plugged)
                detail = f"{busy} in use by other runs"
                if missing:
                    detail += f", {missing} not present on the host"
                raise JobError(
                    JobErrorKind.MAX_CONCURRENT_JOBS,
                    f"the job wants {count} {resource!r} device(s); {len(plugged)} of "
                    f"{counts[resource]} available ({detail})",
                )
            chosen += plugged[:count]
        for device in chosen:
            self._holder[device.name] = owner
        log.debug("devices %s -> %s", [d.name for d in chosen], owner)
        return chosen

    def _allocate_named(self, owner: str, names: list[str]) -> list[DeviceConfig]:
        chosen = []
        for name in names:
            device = self._devices.get(name)
            if device is None:
                why = "this host has no such device (its config changed?)"
            elif self._holder.get(name) not in (None, owner):
                why = "held by another run"
            elif not self._present(device):
                why = f"not present on the host ({device.path})"
            else:
                chosen.append(device)
                continue
            raise JobError(JobErrorKind.MAX_CONCURRENT_JOBS, f"device {name!r} granted: {why}")
        for device in chosen:
            self._holder[device.name] = owner
        log.debug("devices %s -> %s (granted)", names, owner)
        return chosen

    def reserve(self, owner: str, names: Iterable[str]) -> list[DeviceConfig]:
        """Mark named devices as held by `owner` (a run re-adopted after a restart holds
        what it held before). Unknown names are ignored; a device another owner holds stays
        with it (logged: the config or the containers disagree)."""
        taken = []
        for name in names:
            device = self._devices.get(name)
            if device is None:
                log.warning("run %s holds device %r, which the config no longer has", owner, name)
                continue
            current = self._holder.get(name)
            if current not in (None, owner):
                log.error("device %r is held by both %s and %s", name, current, owner)
                continue
            self._holder[name] = owner
            taken.append(device)
        return taken

    def release(self, owner: str) -> None:
        """Free every device `owner` holds (harmless if it holds none)."""
        for name in [n for n, o in self._holder.items() if o == owner]:
            del self._holder[name]
