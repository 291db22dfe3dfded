"""The placement rules, as pure functions: worked examples (properties are in
test_scheduler_properties.py)."""

from __future__ import annotations

import pytest

from protocol.spec import (
    DockerBackend,
    JobSpec,
    LabelExpression,
    NoopBackend,
    Selector,
    WasmBackend,
)
from switchboard.models import QueuedJob
from switchboard.scheduler import (
    Candidate,
    FleetMember,
    LabDevice,
    describe_selector,
    effective_priority,
    in_service_devices,
    plan,
    selector_matches,
    unsatisfiable_reason,
)

pytestmark = pytest.mark.unit

DIGEST = "sha256:" + "a" * 64


def spec(
    name: str = "j",
    *,
    kind: str = "noop",
    selector: Selector | None = None,
    resources: dict[str, int] | None = None,
) -> JobSpec:
    backend = {
        "noop": NoopBackend(),
        "wasm": WasmBackend(module=DIGEST),
        "docker": DockerBackend(image="alpine"),
    }[kind]
    return JobSpec(
        name=name, backend=backend, selector=selector or Selector(), resources=resources or {}
    )


def job(
    id: str,
    seq: int,
    *,
    priority: int = 0,
    kind: str = "noop",
    selector: Selector | None = None,
    resources: dict[str, int] | None = None,
    queued_at: float = 0.0,
    key: str | None = None,
) -> QueuedJob:
    return QueuedJob(
        id,
        seq,
        priority,
        spec(id, kind=kind, selector=selector, resources=resources),
        queued_at=queued_at,
        concurrency_key=key,
    )


def sup(
    id: str,
    free: int = 1,
    labels: dict[str, str] | None = None,
    backends: tuple[str, ...] = ("noop", "wasm"),
    resources: dict[str, int] | None = None,
    running: int = 0,
) -> Candidate:
    return Candidate(
        id=id,
        backends=list(backends),
        labels=labels or {},
        free=free,
        resources=resources or {},
        running=running,
    )


def member(
    id: str,
    labels: dict[str, str] | None = None,
    backends: tuple[str, ...] = ("noop",),
    resources: dict[str, int] | None = None,
    max_jobs: int = 1,
) -> FleetMember:
    return FleetMember(
        id=id,
        backends=list(backends),
        labels=labels or {},
        resources=resources or {},
        max_jobs=max_jobs,
    )


def test_selector_operators():
    labels = {"arch": "arm", "board": "nrf"}
    assert selector_matches(Selector(match_labels={"arch": "arm"}), labels)
    assert not selector_matches(Selector(match_labels={"arch": "x86"}), labels)

    def expr(op, *values, key="arch"):
        return Selector(match_expressions=[LabelExpression(key, op, list(values))])

    assert selector_matches(expr("In", "arm", "riscv"), labels)
    assert not selector_matches(expr("In", "x86"), labels)
    assert selector_matches(expr("NotIn", "x86"), labels)
    assert not selector_matches(expr("NotIn", "arm"), labels)
    assert selector_matches(expr("NotIn", "x", key="missing"), labels)  # missing satisfies NotIn
    assert not selector_matches(expr("In", "x", key="missing"), labels)
    assert selector_matches(expr("Exists"), labels)
    assert not selector_matches(expr("Exists", key="missing"), labels)
    assert selector_matches(expr("DoesNotExist", key="missing"), labels)
    assert not selector_matches(expr("DoesNotExist"), labels)


def test_priority_first_then_fifo():
    jobs = [job("old-low", 1), job("new-high", 3, priority=5), job("mid-low", 2)]
    assert plan(jobs, [sup("s", free=2)], now=0) == [("new-high", "s"), ("old-low", "s")]


def test_queue_order_comes_from_seq_not_input_order():
    jobs = [job("second", 2), job("first", 1)]
    assert plan(jobs, [sup("s")], now=0) == [("first", "s")]


def test_a_job_that_fits_nowhere_does_not_block_the_rest():
    picky = job("picky", 1, selector=Selector(match_labels={"gpu": "yes"}))
    assert plan([picky, job("easy", 2)], [sup("s")], now=0) == [("easy", "s")]


def test_backend_kind_must_be_supported():
    assert plan([job("w", 1, kind="wasm")], [sup("s", backends=("noop",))], now=0) == []


def test_resources_must_be_available():
    wants_board = job("j", 1, resources={"nrf52": 1})
    assert plan([wants_board], [sup("plain")], now=0) == []
    assert plan([wants_board], [sup("lab", resources={"nrf52": 1})], now=0) == [("j", "lab")]
    two = [wants_board, job("k", 2, resources={"nrf52": 1})]
    assert plan(two, [sup("lab", free=5, resources={"nrf52": 1})], now=0) == [("j", "lab")]


def test_overcommitted_supervisor_gets_nothing():
    # The caller may hand over negative counts (config shrank under running jobs).
    over = [sup("a", free=-1), sup("b", free=3, resources={"gpu": -1})]
    assert plan([job("j", 1), job("g", 2, resources={"gpu": 1})], over, now=0) == [("j", "b")]


def test_least_loaded_supervisor_wins():
    busy = sup("a", free=3, backends=("noop",), running=5)
    idle = sup("b", free=3, backends=("noop",), running=0)
    assert plan([job("j", 1)], [busy, idle], now=0) == [("j", "b")]


def test_least_loaded_counts_placements_of_this_pass_and_ties_go_to_lowest_id():
    jobs = [job("j1", 1), job("j2", 2), job("j3", 3)]
    assert plan(jobs, [sup("b", free=2), sup("a", free=2)], now=0) == [
        ("j1", "a"),
        ("j2", "b"),
        ("j3", "a"),
    ]


def test_inputs_are_not_modified():
    s = sup("s", free=2, resources={"gpu": 2})
    plan([job("j", 1, resources={"gpu": 1})], [s], now=0)
    assert (s.free, s.resources, s.running) == (2, {"gpu": 2}, 0)


def test_effective_priority_formula():
    j = job("j", 1, priority=3, queued_at=100.0)
    assert effective_priority(j, 100.0, 60.0) == 3
    assert effective_priority(j, 159.9, 60.0) == 3
    assert effective_priority(j, 160.0, 60.0) == 4
    assert effective_priority(j, 100.0 + 10 * 60 + 1, 60.0) == 13
    assert effective_priority(j, 10_000.0, 0.0) == 3  # aging disabled
    assert effective_priority(j, 10_000.0, -5.0) == 3
    assert effective_priority(j, 0.0, 60.0) == 3  # a clock behind queued_at never lowers it


def test_aging_lets_a_long_waiting_job_outrank_a_fresh_higher_priority_one():
    old = job("old", 2, priority=0, queued_at=0.0)
    fresh = job("fresh", 1, priority=2, queued_at=1000.0)
    one_slot = [sup("s")]
    # 1000 s at 60 s a level lifts old to 0 + 16, above fresh's 2.
    assert plan([old, fresh], one_slot, now=1000.0, aging_s=60.0) == [("old", "s")]
    # Not aged enough yet: at now=100 old is at 0 + 1, still below 2.
    assert plan([old, fresh], one_slot, now=100.0, aging_s=60.0) == [("fresh", "s")]
    # Aging disabled: plain priority.
    assert plan([old, fresh], one_slot, now=1000.0, aging_s=0) == [("fresh", "s")]
    # Equal effective priority: the lower seq goes first (fresh has seq 1).
    assert plan([old, fresh], one_slot, now=120.0, aging_s=60.0) == [("fresh", "s")]


def test_busy_concurrency_key_is_skipped():
    jobs = [job("keyed", 1, key="deploy"), job("other", 2)]
    assert plan(jobs, [sup("s", free=2)], now=0, busy_keys={"deploy"}) == [("other", "s")]
    assert plan(jobs, [sup("s", free=2)], now=0, busy_keys=frozenset({"x"})) == [
        ("keyed", "s"),
        ("other", "s"),
    ]


def test_at_most_one_job_per_concurrency_key_per_pass():
    jobs = [job("a", 1, key="k"), job("b", 2, key="k"), job("c", 3, key="m"), job("d", 4)]
    assert plan(jobs, [sup("s", free=9)], now=0) == [("a", "s"), ("c", "s"), ("d", "s")]


def test_a_keyed_job_that_fits_nowhere_does_not_take_its_key():
    picky = job("picky", 1, key="k", resources={"gpu": 1})
    assert plan([picky, job("next", 2, key="k")], [sup("s")], now=0) == [("next", "s")]


def test_unsatisfiable_reason_empty_fleet():
    assert unsatisfiable_reason(spec(), []) == "no supervisor is registered"


def test_unsatisfiable_reason_backend():
    fleet = [member("a", backends=("noop", "wasm"))]
    assert (
        unsatisfiable_reason(spec(kind="docker"), fleet)
        == "no registered supervisor runs backend 'docker'"
    )


def test_unsatisfiable_reason_selector():
    fleet = [member("a", backends=("wasm",), labels={"arch": "x86"}), member("b", {"arch": "arm"})]
    # b matches the selector but does not run wasm: the selector is checked among wasm runners.
    wants_arm = spec(kind="wasm", selector=Selector(match_labels={"arch": "arm"}))
    assert (
        unsatisfiable_reason(wants_arm, fleet)
        == "no supervisor running backend 'wasm' matches the selector (arch=arm)"
    )


def test_unsatisfiable_reason_resources():
    fleet = [
        member("a", {"arch": "arm"}, resources={"gpu": 1}),
        member("b", {"arch": "x86"}, resources={"gpu": 4}),  # enough, but not selected
    ]
    wants = spec(selector=Selector(match_labels={"arch": "arm"}), resources={"gpu": 2})
    assert (
        unsatisfiable_reason(wants, fleet)
        == "no supervisor matching the selector has resources gpu=2"
    )
    both = spec(resources={"gpu": 2, "fpga": 1})
    assert (
        unsatisfiable_reason(both, fleet)
        == "no supervisor matching the selector has resources fpga=1, gpu=2"
    )


def test_unsatisfiable_reason_backend_is_named_before_selector_and_resources():
    fleet = [member("a", {"arch": "x86"})]
    everything_wrong = spec(
        kind="wasm", selector=Selector(match_labels={"arch": "arm"}), resources={"gpu": 1}
    )
    assert unsatisfiable_reason(everything_wrong, fleet) == (
        "no registered supervisor runs backend 'wasm'"
    )


@pytest.mark.parametrize(
    "wanted",
    [
        spec(),
        spec(kind="wasm", selector=Selector(match_labels={"arch": "arm"}), resources={"gpu": 2}),
    ],
)
def test_unsatisfiable_reason_none_when_one_member_fits(wanted):
    fleet = [
        member("a", {"arch": "x86"}, backends=("noop",)),
        member("b", {"arch": "arm"}, backends=("wasm", "noop"), resources={"gpu": 2}),
    ]
    assert unsatisfiable_reason(wanted, fleet) is None


def test_unsatisfiable_reason_ignores_members_without_slots():
    # The protocol forbids max_jobs < 1; if one slipped in, it must not count as a fit.
    assert unsatisfiable_reason(spec(), [member("a", max_jobs=0)]) == (
        "no registered supervisor accepts jobs"
    )
    assert unsatisfiable_reason(spec(), [member("a", max_jobs=0), member("b")]) is None


def test_describe_selector_uses_the_cli_label_syntax():
    selector = Selector(
        match_labels={"arch": "arm", "os": "linux"},
        match_expressions=[
            LabelExpression(key="board", operator="In", values=["a", "b"]),
            LabelExpression(key="zone", operator="NotIn", values=["eu"]),
            LabelExpression(key="gpu", operator="Exists"),
            LabelExpression(key="flaky", operator="DoesNotExist"),
        ],
    )
    assert describe_selector(selector) == (
        "arch=arm, os=linux, board in (a, b), zone notin (eu), gpu, !flaky"
    )


def test_in_service_devices_counts_what_a_host_could_ever_offer():
    devices = [
        LabDevice("b1", "s1", "board", "good", held=True),
        LabDevice("b2", "s1", "board", "bad"),
        LabDevice("b3", "s1", "board", "retired"),
        LabDevice("p1", "s2", "probe", "maintenance", reserved="r1"),
        LabDevice("p2", "s2", "probe", "retired"),
    ]
    assert in_service_devices(devices) == {"s1": {"board": 2}, "s2": {"probe": 1}}
    # What the dispatcher gives unsatisfiable_reason: a host declaring boards as devices
    # only (no hello resources) could run a job asking for one.
    counts = in_service_devices(devices)
    member = FleetMember(
        id="s1", backends=["noop"], labels={}, resources={**counts["s1"]}, max_jobs=1
    )
    assert unsatisfiable_reason(spec(resources={"board": 2}), [member]) is None
    assert unsatisfiable_reason(spec(resources={"board": 3}), [member]) is not None
