"""The hardware lab's pure rules (docs/lab.md): which devices may be given a run, which are
granted, which jobs are refused at submit because no device could ever serve them, who may
set which health; and a host's description of its boards (the supervisor's config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.exceptions import JobError, JobErrorKind
from protocol.messages import DeviceInfo
from protocol.spec import JobSpec, NoopBackend
from protocol.state import Phase
from supervisor.backends.devices import Devices, inventory
from supervisor.config import ConfigError, parse_config
from switchboard import health
from switchboard.models import QueuedJob
from switchboard.scheduler import (
    Candidate,
    FleetMember,
    LabDevice,
    awaiting_checks,
    device_refusal,
    free_devices,
    grant,
    plan,
)

pytestmark = pytest.mark.unit


def _dev(
    id_: str,
    health_: str = "good",
    *,
    host: str = "h1",
    cls: str = "nrf",
    held: bool = False,
    checking: bool = False,
) -> LabDevice:
    return LabDevice(id_, host, cls, health_, held, checking)


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
    # Those its previous run was refused with come last, not never.
    assert grant({"nrf": 1}, devices, avoid={"b"}) == ["c"]
    assert grant({"nrf": 2}, devices, avoid={"b"}) == ["c", "b"]


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


# --- health checks ------------------------------------------------------------------------

CHECK = health.HealthCheck(spec=JobSpec(name="selftest", backend=NoopBackend()), after_runs=3)


def _facts(**fields: object) -> health.DeviceFacts:
    base: dict[str, object] = {"id": "a", "class_": "nrf", "health": "good", "check_at": 1000.0}
    base.update(fields, check_result=fields.get("check_result", "pass"))
    return health.DeviceFacts(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "now", "due"),
    [
        ({"health": "unknown", "check_at": None}, 1000.0, "its health is unknown"),
        ({"health": "unknown"}, 1001.0, "its health is unknown"),
        ({}, 1000.0 + 86400, "its last check is older than 86400 s"),
        ({}, 1001.0, None),
        ({"runs_since_check": 3}, 1001.0, "3 runs since its last check"),
        ({"health": "looping", "runs_since_check": 1}, 1001.0, "it is looping"),
        ({"health": "looping"}, 1001.0, None),
        # A check is under way; or nobody may use the device: no check.
        ({"health": "unknown", "checking": True}, 1001.0, None),
        ({"health": "bad", "check_at": None}, 1001.0, None),
        ({"health": "maintenance", "check_at": None}, 1001.0, None),
        ({"health": "retired", "check_at": None}, 1001.0, None),
        # After an infrastructure error, the next check waits a minute.
        ({"health": "unknown", "check_result": "error"}, 1030.0, None),
        ({"health": "unknown", "check_result": "error"}, 1061.0, "its health is unknown"),
    ],
)
def test_when_a_device_needs_its_check(fields: dict, now: float, due: str | None) -> None:
    got = health.check_due(_facts(**fields), CHECK, now)
    assert got == due or (due is not None and got is not None and got.startswith(due))


@pytest.mark.parametrize(
    ("phase", "result", "after"),
    [
        (Phase.SUCCEEDED, "pass", "good"),
        (Phase.FAILED, "fail", "bad"),
        (Phase.TIMED_OUT, "fail", "bad"),
        (Phase.CANCELED, "fail", "bad"),
        (Phase.LOST, "error", "unknown"),
        (Phase.REJECTED, "error", "unknown"),
        (Phase.EXHAUSTED, "error", "unknown"),
    ],
)
def test_a_checks_ending_decides_the_health(phase: Phase, result: str, after: str) -> None:
    assert health.check_outcome(phase, "unknown") == (result, after)
    assert health.check_outcome(phase, "good")[1] == after
    # Looping stays looping; an operator's bad, maintenance or retired stays.
    for kept in ("looping", "bad", "maintenance", "retired"):
        assert health.check_outcome(phase, kept) == (result, kept)


def test_a_lost_run_puts_its_devices_in_doubt() -> None:
    assert health.after_run("good", Phase.LOST) == "unknown"
    # Refused by its supervisor for want of the device (unplugged): in doubt too.
    assert health.after_run("good", Phase.REJECTED, "max_concurrent_jobs") == "unknown"
    assert health.after_run("good", Phase.REJECTED, "image_not_found") is None
    assert health.after_run("looping", Phase.LOST) == "unknown"
    assert health.after_run("good", Phase.FAILED) is None  # the job's fault, not the board's
    assert health.after_run("maintenance", Phase.LOST) is None


def test_a_check_gets_its_device_and_other_jobs_do_not() -> None:
    devices = [_dev("a", "unknown", checking=True), _dev("b")]
    assert grant({"nrf": 1}, devices) == ["b"]
    assert grant({"nrf": 1}, devices, check="a") == ["a"]
    assert grant({"nrf": 1}, [_dev("a", held=True)], check="a") is None
    assert free_devices(devices) == {"h1": {"nrf": 1}}
    assert awaiting_checks([*devices, _dev("c", "maintenance", checking=True)]) == {
        "h1": frozenset({"a"})
    }


def test_placement_puts_a_check_where_its_device_is() -> None:
    spec = _spec(nrf=1)
    check = QueuedJob("check", 2, 100, spec, device="a")
    regular = QueuedJob("regular", 1, 0, spec)
    here = Candidate("h1", ["noop"], {}, free=2, resources={"nrf": 0}, checks=frozenset({"a"}))
    there = Candidate("h2", ["noop"], {}, free=2, resources={"nrf": 1})
    assert plan([regular, check], [here, there], now=0.0) == [("check", "h1"), ("regular", "h2")]
    # Once its check has started, its device takes no second one.
    again = QueuedJob("check-2", 3, 100, spec, device="a")
    assert plan([check, again], [here], now=0.0) == [("check", "h1")]
