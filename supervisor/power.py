"""A host's power switches: runs a device's configured power command (docs/lab.md "Power").

The command is an argv (no shell) with the device's fields substituted, run in a
subprocess with a deadline (killed past it), its output (stdout and stderr together)
read in full but kept only up to the protocol's cap. One command per device at a time: a
second request while one runs is answered at once, not queued. Nothing here blocks the
event loop: the subprocess is awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from protocol import limits
from protocol.messages import Power, PowerResult

from .config import DeviceConfig

log = logging.getLogger("supervisor.power")

#: Seconds a power command may take before it is killed.
DEFAULT_DEADLINE_S = 30.0
#: Bytes of a command's output read into memory at most (the rest is read and dropped).
_READ_MAX = limits.POWER_OUTPUT_MAX_LEN * 4


class PowerSwitches:
    def __init__(self, devices: list[DeviceConfig], deadline_s: float = DEFAULT_DEADLINE_S) -> None:
        self._devices = {device.name: device for device in devices}
        self._deadline_s = deadline_s
        #: Devices whose power command is running now.
        self._busy: set[str] = set()

    async def run(self, request: Power) -> PowerResult:
        """Run `request`'s command and say how it went (never raises for the command)."""
        device = self._devices.get(request.device_id)
        if device is None:
            return self._refused(request, f"no device {request.device_id!r} on this host")
        argv = getattr(device.power, request.action) if device.power is not None else None
        if argv is None:
            return self._refused(
                request, f"device {request.device_id} has no power.{request.action} command"
            )
        if request.device_id in self._busy:
            return self._refused(
                request, f"device {request.device_id}: another power command is running"
            )
        self._busy.add(request.device_id)
        try:
            return await self._execute(request, device.command(argv))
        finally:
            self._busy.discard(request.device_id)

    def _refused(self, request: Power, reason: str) -> PowerResult:
        log.warning("power %s of %s refused: %s", request.action, request.device_id, reason)
        return PowerResult(request_id=request.request_id, reason=reason)

    async def _execute(self, request: Power, argv: list[str]) -> PowerResult:
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            return self._refused(request, f"power command could not start: {exc}")
        assert process.stdout is not None
        kept = bytearray()

        async def read() -> None:
            assert process.stdout is not None
            while chunk := await process.stdout.read(65536):
                if len(kept) < _READ_MAX:
                    kept.extend(chunk[: _READ_MAX - len(kept)])
            await process.wait()

        try:
            await asyncio.wait_for(read(), self._deadline_s)
        except TimeoutError:
            # Its own process group (start_new_session): whatever it started goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            output = limits.clip_message(kept.decode(errors="replace")) or ""
            reason = f"power command timed out after {self._deadline_s:g} s: killed"
            log.warning("power %s of %s: %s", request.action, request.device_id, reason)
            return PowerResult(request_id=request.request_id, output=output, reason=reason)
        code = process.returncode
        output = limits.clip_message(kept.decode(errors="replace")) or ""
        ok = code == 0
        log.info("power %s of %s: exit status %s", request.action, request.device_id, code)
        return PowerResult(
            request_id=request.request_id,
            ok=ok,
            exit_code=code,
            output=output,
            reason="" if ok else f"power command exited with status {code}",
        )
