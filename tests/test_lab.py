"""The hardware lab's pure rules (docs/lab.md): which devices may be given a run, which are
granted, which jobs are refused at submit because no device could ever serve them, who may
set which health; and a host's description of its boards (the supervisor's config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.exceptions import JobError, JobErrorKind
from protocol.messages import DeviceInfo
from protocol.spec import JobSpec, NoopBackend
from supervisor.backends.devices import Devices, inventory
from supervisor.config import ConfigError, parse_config
from switchboard import health
from switchboard.scheduler import (
    FleetMember,
    LabDevice,
    device_refusal,
    free_devices,
    grant,
)

pytestmark = pytest.mark.unit


def _dev(id_: str, health_: str = "good", *, host: str = "h1", cls: str = "nrf", held=False):
    return LabDevice(id_, host, cls, health_, held)


def _spec(**resources: int) -> JobSpec:
    return JobSpec(name="lab", backend=NoopBackend(), resources=resources)


def _member(id_: str, **resources: int) -> FleetMember:
    return FleetMember(id_, ["noop"], {}, resources, 4)


@pytest.mark.parametrize("state", health.HEALTH_STATES)
def test_only_unknown_good_and_looping_devices_take_runs(state: str) -> None:
    assert health.placeable(state) == (state in {"unknown", "good", "looping"})
    assert grant({"nrf": 1}, [_dev("a", state)]) == (["a"] if health.placeable(state) else None)


def test_free_devices_counts_placeable_unheld_ones_per_host_and_class() -> None:
    devices = [
        _dev("a"),
        _dev("b", "bad"),
        _dev("c", held=True),
        _dev("d", "maintenance", host="h2"),
        _dev("e", "unknown", host="h2", cls="stm"),
    ]
    # Every class a host declares is there, with 0 when none is free.
    assert free_devices(devices) == {"h1": {"nrf": 1}, "h2": {"nrf": 0, "stm": 1}}


def test_grant_takes_the_lowest_free_ids_all_or_none() -> None:
    devices = [_dev("b"), _dev("a", "bad"), _dev("c"), _dev("s1", cls="stm")]
    assert grant({"nrf": 2, "stm": 1}, devices) == ["b", "c", "s1"]
    assert grant({"nrf": 3}, devices) is None
    # A class the host declares no device of is no named grant (a plain resource).
    assert grant({"gpu": 1}, devices) == []


def test_a_job_no_device_could_ever_serve_is_refused() -> None:
    devices = [_dev("a", "bad"), _dev("b", "maintenance"), _dev("c", "retired", host="h2")]
    fleet = [_member("h1", nrf=2), _member("h2", nrf=1, gpu=1)]
    # Bad and in maintenance may come back: the job waits for them.
    assert device_refusal(_spec(nrf=2), devices, fleet) is None
    # A class that is in no inventory and no host offers: a mistake, refused.
    reason = device_refusal(_spec(stm32=1), devices, fleet)
    assert reason == "no device of class 'stm32' is in the lab (its classes: nrf)"
    # More devices than any one host has that are not retired.
    assert device_refusal(_spec(nrf=3), devices, fleet) == (
        "no supervisor has 3 'nrf' device(s) that are not retired"
    )
    # A plain resource some host offers is not the lab's business.
    assert device_refusal(_spec(gpu=1), devices, fleet) is None
    # Both wanted at once: no one host has a non-retired nrf and a gpu.
    assert device_refusal(_spec(nrf=1, gpu=1), devices, fleet) is not None
    # A switchboard with no inventory refuses nothing (jobs wait, marked unschedulable).
    assert device_refusal(_spec(stm32=1), [], fleet) is None


def test_an_operator_gives_any_health_with_a_reason() -> None:
    for state in health.HEALTH_STATES:
        assert health.refuse_change(state, "bench rewired") is None
    assert "one of" in (health.refuse_change("broken", "x") or "")
    assert "say why" in (health.refuse_change("maintenance", "  ") or "")
    assert "longer" in (health.refuse_change("bad", "x" * 2000) or "")


CONFIG = """
[[devices]]
name = "board-a"
path = "/dev/ttyACM0"
resource = "simboard"
labels = { serial = "A1" }
console = { path = "/dev/serial/by-id/usb-board-a", baud = 921600 }
power.on = ["board-power", "--serial", "{labels[serial]}", "on", "{id}"]
power.status = ["board-power", "{class}", "{console}"]

[[devices]]
name = "board-b"
path = "/dev/ttyACM1"
resource = "simboard"
"""


def test_a_host_describes_its_boards() -> None:
    config = parse_config(CONFIG)
    a, b = config.devices
    assert a.console is not None and a.console.baud == 921600
    assert b.console is None and b.power is None
    assert a.power is not None and a.power.on is not None and a.power.status is not None
    assert a.command(a.power.on) == ["board-power", "--serial", "A1", "on", "board-a"]
    assert a.command(a.power.status) == ["board-power", "simboard", "/dev/serial/by-id/usb-board-a"]
    assert inventory(config.devices) == [
        DeviceInfo("board-a", "simboard", {"serial": "A1"}, console=True, power=True),
        DeviceInfo("board-b", "simboard"),
    ]


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ('power = { on = ["x", "{colour}"] }', "power.on of 'board-c' names an unknown field"),
        ('power = { on = ["x", "{labels[nope]}"] }', "names an unknown field"),
        ("power = { on = [] }", "power.on"),
        ('power = { reboot = ["x"] }', "reboot"),
        ('console = { path = "ttyS0" }', "console.path"),
        ('console = { path = "/dev/ttyS0", baud = 0 }', "console.baud"),
    ],
)
def test_a_wrong_board_description_names_the_key(extra: str, error: str) -> None:
    text = f'[[devices]]\nname = "board-c"\npath = "/dev/x"\nresource = "s"\n{extra}\n'
    with pytest.raises(ConfigError, match=r"^lab\.toml: ") as caught:
        parse_config(text, "lab.toml")
    assert error in str(caught.value)


def test_a_run_gets_exactly_the_devices_it_was_granted(tmp_path: Path) -> None:
    plugged = {"/dev/ttyACM0", "/dev/ttyACM1"}
    devices = Devices(parse_config(CONFIG).devices, present=lambda d: d.path in plugged)
    assert [d.name for d in devices.allocate("run-1", {"simboard": 1}, ["board-b"])] == ["board-b"]
    # Granted again: the same (idempotent).
    assert [d.name for d in devices.allocate("run-1", {"simboard": 1}, ["board-b"])] == ["board-b"]
    refusals = {
        "board-b": "held by another run",
        "board-z": "this host has no such device",
    }
    for name, why in refusals.items():
        with pytest.raises(JobError) as caught:
            devices.allocate("run-2", {"simboard": 1}, [name])
        assert caught.value.kind == JobErrorKind.MAX_CONCURRENT_JOBS
        assert why in str(caught.value)
    plugged.discard("/dev/ttyACM0")
    with pytest.raises(JobError, match="not present on the host"):
        devices.allocate("run-2", {"simboard": 1}, ["board-a"])
    # Without a grant (an older switchboard) it picks a free one, as before.
    plugged.add("/dev/ttyACM0")
    assert [d.name for d in devices.allocate("run-3", {"simboard": 1})] == ["board-a"]
