"""Several devices in one job and job groups, as pure decisions: the grant of devices asked
for one by one (switchboard.scheduler.grant, match), the refusal at submit of what no
host could ever serve, and switchboard.gangs (fitting a group all or none, what an
essential role's failure stops, a group's state)."""

from __future__ import annotations

import itertools

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.spec import DeviceWanted, JobSpec, NoopBackend, Selector
from protocol.state import Phase
from switchboard import gangs
from switchboard.models import QueuedJob, SupervisorView
from switchboard.scheduler import (
    Candidate,
    FleetMember,
    LabDevice,
    device_refusal,
    grant,
    match,
    plan,
)

pytestmark = pytest.mark.unit


def dev(id: str, host: str, cls: str, health: str = "good", **labels: str) -> LabDevice:
    return LabDevice(id, host, cls, health, labels=labels)


def want(cls: str | None = None, role: str | None = None, **labels: str) -> DeviceWanted:
    return DeviceWanted(class_=cls, selector=Selector(match_labels=labels), role=role)


def spec(*devices: DeviceWanted, resources: dict[str, int] | None = None) -> JobSpec:
    return JobSpec(
        name="j", backend=NoopBackend(), devices=list(devices), resources=resources or {}
    )


LAB = [
    dev("nrf-1", "h1", "nrf", probe="a"),
    dev("nrf-2", "h1", "nrf", probe="b"),
    dev("ppk-1", "h1", "ppk2"),
    dev("nrf-3", "h2", "nrf", probe="a"),
    dev("ppk-2", "h2", "ppk2"),
]


def host(id: str, devices: list[LabDevice] = LAB, free: int = 4) -> Candidate:
    mine = [d for d in devices if d.supervisor_id == id]
    counts: dict[str, int] = {}
    for d in mine:
        counts[d.class_] = counts.get(d.class_, 0) + (not d.held and d.health == "good")
    return Candidate(id=id, backends=["noop"], labels={}, free=free, resources=counts, lab=mine)


# --- devices asked for one by one ---------------------------------------------------------


def test_the_spec_counts_classes_and_refuses_an_entry_naming_nothing() -> None:
    s = spec(want("nrf", "dut"), want("ppk2", "meter"), want(probe="a"), resources={"nrf": 1})
    assert s.classes_wanted() == {"nrf": 2, "ppk2": 1}
    with pytest.raises(msgspec.ValidationError, match="a `class`, a `selector`, or both"):
        msgspec.json.decode(b'{"name":"x","backend":{"kind":"noop"},"devices":[{}]}', type=JobSpec)
    with pytest.raises(msgspec.ValidationError, match="same role"):
        msgspec.json.decode(
            b'{"name":"x","backend":{"kind":"noop"},"devices":'
            b'[{"class":"a","role":"r"},{"class":"b","role":"r"}]}',
            type=JobSpec,
        )


def test_each_entry_gets_a_different_device_of_its_class_and_labels() -> None:
    h1 = [d for d in LAB if d.supervisor_id == "h1"]
    assert grant({}, h1, entries=[want("nrf", "dut", probe="b"), want("ppk2")]) == [
        "nrf-2",
        "ppk-1",
    ]
    # Classes by count first (lowest ids), then the entries in their order.
    assert grant({"nrf": 1}, h1, entries=[want("nrf")]) == ["nrf-1", "nrf-2"]
    assert grant({"nrf": 1}, h1, entries=[want("nrf"), want("nrf")]) is None


def test_the_matching_moves_an_earlier_choice_along_when_it_must() -> None:
    h1 = [d for d in LAB if d.supervisor_id == "h1"]
    # Any nrf first (takes nrf-1), then the one with probe a: only nrf-1 has it.
    assert grant({}, h1, entries=[want("nrf"), want("nrf", probe="a")]) == ["nrf-2", "nrf-1"]
    assert match([["a", "b"], ["a"]]) == ["b", "a"]
    assert match([["a"], ["a"]]) is None
    assert match([]) == []


def test_a_busy_or_bad_device_is_never_granted_and_nothing_is_if_one_is_missing() -> None:
    h1 = [
        dev("nrf-1", "h1", "nrf", probe="a"),
        dev("nrf-2", "h1", "nrf", "bad", probe="b"),
        msgspec.structs.replace(dev("ppk-1", "h1", "ppk2"), held=True),
    ]
    assert grant({}, h1, entries=[want("nrf", probe="b")]) is None
    assert grant({}, h1, entries=[want("nrf"), want("ppk2")]) is None
    assert grant({}, h1, entries=[want("nrf")]) == ["nrf-1"]


def test_plan_places_a_job_only_where_all_its_devices_are_free() -> None:
    job = QueuedJob("j1", 1, 0, spec(want("nrf", probe="b"), want("ppk2")))
    busy = [msgspec.structs.replace(d, held=d.id == "nrf-2") for d in LAB]
    assert plan([job], [host("h1", busy), host("h2", busy)], now=0) == []
    assert plan([job], [host("h1"), host("h2")], now=0) == [("j1", "h1")]
    # Two such jobs, one board with probe b: the second waits (a slot left to others).
    other = QueuedJob("j2", 2, 0, spec(want("nrf", probe="b")))
    plain = QueuedJob("j3", 3, 0, spec())
    assert plan([job, other, plain], [host("h1", free=2)], now=0) == [("j1", "h1"), ("j3", "h1")]


def test_a_job_no_host_could_ever_serve_is_refused_saying_so() -> None:
    fleet = [FleetMember("h1", ["noop"], {}, {}, 4), FleetMember("h2", ["noop"], {}, {}, 4)]
    assert device_refusal(spec(want("nrf", probe="a"), want("ppk2")), LAB, fleet) is None
    # Two nrf with probe a exist, but on two hosts: no one host has both.
    reason = device_refusal(spec(want("nrf", probe="a"), want("nrf", probe="a")), LAB, fleet)
    assert reason is not None and "no supervisor has devices" in reason
    assert "nrf (probe=a)" in reason
    missing = device_refusal(spec(want("stm32")), LAB, fleet)
    assert missing == "no device of class 'stm32' is in the lab (its classes: nrf, ppk2)"
    # Bad boards count (they may come back); retired ones don't.
    worn = [msgspec.structs.replace(d, health="bad") for d in LAB]
    assert device_refusal(spec(want("nrf", probe="b")), worn, fleet) is None
    gone = [msgspec.structs.replace(d, health="retired") if d.id == "nrf-2" else d for d in LAB]
    assert device_refusal(spec(want("nrf", probe="b")), gone, fleet) is not None


# --- job groups ---------------------------------------------------------------------------


def role(name: str, *devices: DeviceWanted, essential: bool = True) -> gangs.RoleNeed:
    return gangs.RoleNeed(name, f"job-{name}", spec(*devices), essential)


def test_a_group_is_placed_whole_across_hosts_or_not_at_all() -> None:
    roles = [role("a", want("nrf", probe="b")), role("b", want("nrf", probe="a"), want("ppk2"))]
    # Role a only fits h1; b goes to the least loaded host then.
    placed = gangs.fit_group(roles, [host("h1"), host("h2")])
    assert placed == [("job-a", "h1"), ("job-b", "h2")]
    # With h2's ppk busy, role b joins a on h1.
    busy = [msgspec.structs.replace(d, held=d.id == "ppk-2") for d in LAB]
    assert gangs.fit_group(roles, [host("h1", busy), host("h2", busy)]) == [
        ("job-a", "h1"),
        ("job-b", "h1"),
    ]
    # A bad board one role needs: nothing at all is placed.
    bad = [msgspec.structs.replace(d, health="bad") if d.id == "nrf-2" else d for d in LAB]
    assert gangs.fit_group(roles, [host("h1", bad), host("h2", bad)]) is None


def test_roles_never_share_a_device_and_the_search_backtracks() -> None:
    # Both roles want a probe-a nrf: one on each host.
    roles = [role("x", want("nrf", probe="a")), role("y", want("nrf", probe="a"))]
    assert gangs.fit_group(roles, [host("h1"), host("h2")]) == [("job-x", "h1"), ("job-y", "h2")]
    three = [*roles, role("z", want("nrf", probe="a"))]
    assert gangs.fit_group(three, [host("h1"), host("h2")]) is None
    # One slot per host: the roles spread.
    assert gangs.fit_group([role("p"), role("q")], [host("h1", free=1), host("h2", free=1)]) == [
        ("job-p", "h1"),
        ("job-q", "h2"),
    ]
    assert gangs.fit_group([role("p"), role("q")], [host("h1", free=1)]) is None
    assert gangs.fit_group(three, [host("h1"), host("h2")], budget=1) is None


def test_the_inputs_are_not_modified() -> None:
    hosts = [host("h1"), host("h2")]
    before = msgspec.json.encode(hosts)
    gangs.fit_group([role("a", want("nrf")), role("b", want("nrf"))], hosts)
    assert msgspec.json.encode(hosts) == before


def state(name: str, phase: Phase | None, essential: bool = True, held: bool = False):
    return gangs.RoleState(name, f"job-{name}", phase, essential, held)


def test_an_essential_role_that_fails_stops_the_others() -> None:
    roles = [
        state("dut", Phase.FAILED),
        state("meter", Phase.RUNNING),
        state("log", Phase.SUCCEEDED, essential=False),
    ]
    stop = gangs.to_stop(roles, "g-1")
    assert stop is not None
    assert (stop.role, stop.phase, stop.cancel) == ("dut", Phase.FAILED, ["job-meter"])
    assert stop.reason == "essential role 'dut' of group g-1 ended failed"
    for phase in (Phase.TIMED_OUT, Phase.LOST, Phase.REJECTED, Phase.CANCELED, None):
        assert gangs.to_stop([state("dut", phase), state("m", Phase.QUEUED)], "g") is not None
    # A role that is not essential may fail alone; a success stops nothing.
    assert gangs.to_stop([state("x", Phase.FAILED, False), state("m", Phase.RUNNING)], "g") is None
    assert gangs.to_stop([state("x", Phase.SUCCEEDED), state("m", Phase.RUNNING)], "g") is None


def test_a_groups_state_is_derived_from_its_roles() -> None:
    held = [state("a", Phase.QUEUED, held=True), state("b", Phase.QUEUED, held=True)]
    assert gangs.group_state(held, None) == "waiting"
    running = [state("a", Phase.RUNNING), state("b", Phase.ASSIGNED)]
    assert gangs.group_state(running, None) == "running"
    assert gangs.group_state([state("a", Phase.FAILED), state("b", Phase.RUNNING)], "x") == (
        "stopping"
    )
    done = [state("a", Phase.SUCCEEDED), state("b", Phase.FAILED, essential=False)]
    assert gangs.group_state(done, None) == "succeeded"
    assert gangs.group_state([state("a", Phase.FAILED), state("b", Phase.CANCELED)], "x") == (
        "failed"
    )
    assert gangs.group_state([state("a", Phase.CANCELED), state("b", Phase.CANCELED)], None) == (
        "canceled"
    )
    assert set(gangs.STATES) >= {"waiting", "running", "stopping", "succeeded", "failed"}


def test_a_group_the_lab_could_never_hold_is_refused() -> None:
    fleet = [
        SupervisorView(id=h, name=h, connected=False, backends=["noop"], labels={}, max_jobs=2)
        for h in ("h1", "h2")
    ]
    lab = gangs.whole_lab(fleet, [msgspec.structs.replace(d, held=True) for d in LAB])
    roles = [role("x", want("nrf", probe="a")), role("y", want("nrf", probe="a"))]
    assert gangs.refusal(roles, lab) is None  # busy now, but it could be placed
    three = [*roles, role("z", want("nrf", probe="a"))]
    assert gangs.refusal(three, lab) == (
        "the roles can't all be placed at once, even with the whole lab free"
    )
    stm = [role("s", want("stm32"))]
    assert gangs.refusal(stm, lab) == "role 's' fits no supervisor of the lab, even with all free"
    retired = [msgspec.structs.replace(d, health="retired") for d in LAB]
    assert gangs.refusal(roles, gangs.whole_lab(fleet, retired)) is not None


_slots = st.lists(st.lists(st.sampled_from("abcdef"), max_size=4, unique=True), max_size=6)


@settings(max_examples=300, deadline=None)
@given(_slots)
def test_match_finds_a_choice_whenever_one_exists(slots: list[list[str]]) -> None:
    found = match(slots)
    possible = any(len(set(choice)) == len(choice) for choice in itertools.product(*slots))
    assert (found is not None) == possible
    if found is not None:
        assert len(set(found)) == len(found)
        assert all(device in slot for device, slot in zip(found, slots, strict=True))
