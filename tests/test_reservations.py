"""Reservations in placement (switchboard/scheduler.py), pure: a reserved device goes only
to a job naming its reservation, such jobs skip the queue, and a reservation is granted
all the devices it asks for or none."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.spec import JobSpec, NoopBackend, Selector
from switchboard.models import QueuedJob
from switchboard.scheduler import (
    Candidate,
    LabDevice,
    ReservationWanted,
    free_devices,
    grant,
    grant_reservations,
    plan,
    reservation_refusal,
    reserved_devices,
)

pytestmark = pytest.mark.unit


def job(id: str, seq: int, reservation: str | None = None, priority: int = 0) -> QueuedJob:
    spec = JobSpec(
        name=id,
        backend=NoopBackend(),
        resources={"board": 1},
        reservation=reservation,
        priority=priority,
    )
    return QueuedJob(id, seq, priority, spec, queued_at=0.0)


def board(id: str, host: str = "h1", reserved: str | None = None, **kw: object) -> LabDevice:
    return LabDevice(id, host, "board", kw.pop("health", "good"), reserved=reserved, **kw)  # type: ignore[arg-type]


def candidates(devices: list[LabDevice], free: int = 4) -> list[Candidate]:
    free_now, reserved = free_devices(devices), reserved_devices(devices)
    return [
        Candidate(
            id=host,
            backends=["noop"],
            labels={},
            free=free,
            resources=free_now.get(host, {}),
            reserved=reserved.get(host, {}),
        )
        for host in sorted({d.supervisor_id for d in devices})
    ]


def test_a_reserved_device_goes_only_to_a_job_naming_its_reservation():
    devices = [board("b1", reserved="r-1")]
    assert plan([job("other", 1)], candidates(devices), now=0) == []
    assert plan([job("mine", 2, "r-1")], candidates(devices), now=0) == [("mine", "h1")]
    assert plan([job("wrong", 3, "r-2")], candidates(devices), now=0) == []
    # And the grant, made in the placing transaction, agrees.
    assert grant({"board": 1}, devices) is None
    assert grant({"board": 1}, devices, reservation="r-2") is None
    assert grant({"board": 1}, devices, reservation="r-1") == ["b1"]


def test_jobs_naming_the_reservation_skip_the_queue_and_others_go_elsewhere():
    devices = [board("b1", reserved="r-1"), board("b2", "h2")]
    jobs = [job("early", 1, priority=100), job("mine", 50, "r-1"), job("late", 60)]
    # One slot on h1: the reservation's job takes it, though queued after a higher priority;
    # the unreserved jobs take the free board on h2, one of them (the other waits).
    decided = plan(jobs, candidates(devices, free=1), now=0)
    assert decided == [("mine", "h1"), ("early", "h2")]


def test_a_reservations_job_uses_only_its_free_devices():
    devices = [board("b1", reserved="r-1", held=True), board("b2")]
    # b1 is busy with a run: the reservation's next job waits rather than take b2.
    assert plan([job("mine", 1, "r-1")], candidates(devices), now=0) == []
    assert grant({"board": 1}, devices, reservation="r-1") is None


def test_a_reserved_device_is_not_checked_while_held():
    from switchboard.scheduler import awaiting_checks

    devices = [board("b1", reserved="r-1", checking=True), board("b2", checking=True)]
    assert awaiting_checks(devices) == {"h1": frozenset({"b2"})}
    assert grant({"board": 1}, devices, check="b1") is None


def wanted(
    id: str, count: int, priority: int = 0, at: float = 0.0, **kw: object
) -> ReservationWanted:
    return ReservationWanted(
        id, count, kw.pop("class_", "board"), priority=priority, created_at=at, **kw
    )  # type: ignore[arg-type]


def test_a_reservation_gets_all_its_devices_or_none():
    devices = [board("b1"), board("b2", held=True), board("b3", health="bad")]
    assert grant_reservations([wanted("r-2", 2)], devices) == []
    assert grant_reservations([wanted("r-1", 1)], devices) == [("r-1", ["b1"])]


def test_reservations_are_granted_by_priority_then_age_and_never_share():
    devices = [board("b1"), board("b2"), board("b3", "h2")]
    waiting = [
        wanted("old", 2, at=1.0),
        wanted("urgent", 2, priority=5, at=2.0),
        wanted("one", 1, at=3.0),
    ]
    # urgent takes two; old can't have two of the one left, so holds nothing; one takes it.
    assert grant_reservations(waiting, devices) == [("urgent", ["b1", "b2"]), ("one", ["b3"])]


def test_a_reservation_by_selector_matches_device_labels():
    devices = [board("b1", labels={"rev": "a"}), board("b2", labels={"rev": "b"})]
    by_label = wanted("r", 1, class_=None, selector=Selector(match_labels={"rev": "b"}))
    assert grant_reservations([by_label], devices) == [("r", ["b2"])]


def test_what_no_inventory_could_serve_is_refused_with_a_reason():
    devices = [board("b1"), board("b2", health="retired")]
    unknown = reservation_refusal(wanted("r", 1, class_="stm32"), devices)
    assert unknown is not None and "no device of class 'stm32'" in unknown
    too_many = reservation_refusal(wanted("r", 2), devices)
    assert too_many is not None and "only 1" in too_many
    assert reservation_refusal(wanted("r", 1), devices) is None


@given(
    healths=st.lists(st.sampled_from(["good", "bad", "unknown"]), min_size=1, max_size=8),
    held=st.lists(st.booleans(), min_size=8, max_size=8),
    counts=st.lists(st.integers(1, 4), min_size=1, max_size=5),
)
def test_grants_are_all_or_none_and_never_overlap(healths, held, counts):
    devices = [board(f"b{i}", health=h, held=held[i]) for i, h in enumerate(healths)]
    waiting = [wanted(f"r{i}", n, at=float(i)) for i, n in enumerate(counts)]
    granted = grant_reservations(waiting, devices)
    given_out = [d for _, ids in granted for d in ids]
    assert len(given_out) == len(set(given_out))
    by_id = {d.id: d for d in devices}
    for reservation_id, ids in granted:
        assert len(ids) == counts[int(reservation_id[1:])]
        assert all(by_id[d].health != "bad" and not by_id[d].held for d in ids)
