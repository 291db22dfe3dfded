"""A host's power switches (supervisor/power.py) with real subprocesses: a command's
fields are substituted and its output kept up to the cap; one past its deadline is killed
(its whole process group); a second command for a device whose first still runs is
answered at once; an unknown device or command is refused with the reason."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from protocol import limits
from protocol.messages import Power
from supervisor.config import DeviceConfig, PowerConfig
from supervisor.power import PowerSwitches

pytestmark = pytest.mark.process


def _switches(tmp_path: Path, deadline_s: float = 10.0, **power: list[str]) -> PowerSwitches:
    node = tmp_path / "node"
    node.touch()
    device = DeviceConfig(
        name="board-1", path=str(node), resource="simboard", power=PowerConfig(**power)
    )
    return PowerSwitches([device], deadline_s=deadline_s)


def _ask(action: str, device: str = "board-1", request_id: int = 1) -> Power:
    return Power(request_id=request_id, device_id=device, action=action)  # type: ignore[arg-type]


async def test_fields_are_substituted_and_output_is_capped(tmp_path: Path) -> None:
    switches = _switches(
        tmp_path,
        on=[sys.executable, "-c", "import sys; print(sys.argv[1] * 3000)", "{id}"],
        off=[sys.executable, "-c", "import sys; sys.stderr.write('relay stuck'); sys.exit(3)"],
    )
    on = await switches.run(_ask("on"))
    assert (on.request_id, on.ok, on.exit_code, on.reason) == (1, True, 0, "")
    assert len(on.output) == limits.POWER_OUTPUT_MAX_LEN and on.output.startswith("board-1")
    off = await switches.run(_ask("off", request_id=2))
    assert (off.ok, off.exit_code, off.output) == (False, 3, "relay stuck")
    assert off.reason == "power command exited with status 3"


async def test_a_command_past_its_deadline_is_killed(tmp_path: Path) -> None:
    # A shell that starts a child: killing the group kills both, so the wait ends at once.
    switches = _switches(tmp_path, deadline_s=0.5, cycle=["sh", "-c", "sleep 30 & sleep 30"])
    started = time.monotonic()
    result = await switches.run(_ask("cycle"))
    took = time.monotonic() - started
    assert not result.ok and result.exit_code is None
    assert "timed out after 0.5 s" in result.reason
    assert took < 30 / 2, took  # killed, not waited for: the command takes 30 s


async def test_one_command_per_device_at_a_time(tmp_path: Path) -> None:
    switches = _switches(tmp_path, status=[sys.executable, "-c", "import time; time.sleep(1)"])
    first = asyncio.create_task(switches.run(_ask("status", request_id=1)))
    await asyncio.sleep(0.2)
    second = await switches.run(_ask("status", request_id=2))
    assert not second.ok and "another power command is running" in second.reason
    assert (await first).ok
    assert (await switches.run(_ask("status", request_id=3))).ok  # free again


async def test_unknown_devices_and_commands_are_refused(tmp_path: Path) -> None:
    switches = _switches(tmp_path, status=["true"])
    unknown = await switches.run(_ask("on", device="board-9"))
    assert not unknown.ok and unknown.reason == "no device 'board-9' on this host"
    missing = await switches.run(_ask("on"))
    assert missing.reason == "device board-1 has no power.on command"
    gone = _switches(tmp_path, on=["/no/such/program"])
    cannot = await gone.run(_ask("on"))
    assert not cannot.ok and "could not start" in cannot.reason
