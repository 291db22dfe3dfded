"""Properties of the pure scheduler, checked on random small fleets and queues.

The fleets and queues are drawn from tiny alphabets (three label keys, three values, two
resource names, three concurrency keys) so selectors match some supervisors and not
others, jobs compete for the same slots and keys, and identical requirements recur.
The checks use their own selector evaluation and their own greedy reference, not the
scheduler's helpers, so a bug there cannot hide itself.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

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
    by_load,
    effective_priority,
    place_one,
    plan,
    unsatisfiable_reason,
)

pytestmark = pytest.mark.slow

LABEL_KEYS = ("arch", "os", "zone")
LABEL_VALUES = ("a", "b", "c")
KINDS = ("noop", "wasm", "docker")
RESOURCES = ("gpu", "board")
CONCURRENCY_KEYS = ("k1", "k2", "k3")
BACKENDS = {
    "noop": NoopBackend(),
    "wasm": WasmBackend(module="sha256:" + "a" * 64),
    "docker": DockerBackend(image="alpine"),
}

T = TypeVar("T")
V = TypeVar("V")

# Modest: about a second per property (hypothesis's cost per drawn choice dominates).
FEW = settings(max_examples=200, deadline=None)


# --- strategies -------------------------------------------------------------------------
#
# Each small domain (label sets, backend sets, resource counts, selector terms) is listed
# in full, simplest first, and drawn with one `sampled_from`: one choice per value keeps
# generation cheap (hypothesis spends its time per choice) and shrinks toward the simple
# end. Strategies are module constants: building them inside a composite costs more than
# drawing from them.


def _mappings(keys: tuple[str, ...], values: Sequence[V]) -> list[dict[str, V]]:
    """Every mapping from a subset of `keys` to `values`, smallest first."""
    picks = itertools.product(*[[None, *values]] * len(keys))
    found = [{k: v for k, v in zip(keys, pick, strict=True) if v is not None} for pick in picks]
    return sorted(found, key=len)


LABEL_SETS = _mappings(LABEL_KEYS, LABEL_VALUES)
BACKEND_SETS = [list(c) for n in range(len(KINDS) + 1) for c in itertools.combinations(KINDS, n)]
VALUE_SETS = [[v] for v in LABEL_VALUES] + [
    list(c) for c in itertools.combinations(LABEL_VALUES, 2)
]
EXPRESSIONS = [
    LabelExpression(key, op) for op in ("Exists", "DoesNotExist") for key in LABEL_KEYS
] + [
    LabelExpression(key, op, vs)
    for op in ("In", "NotIn")
    for key in LABEL_KEYS
    for vs in VALUE_SETS
]


def _mostly(common: T, others: Sequence[T]) -> st.SearchStrategy[T]:
    """`common` about half the time, else one of `others`, in a single choice."""
    return st.sampled_from([common] * len(others) + list(others))


# Uniform draws would make a job fit a supervisor only a few % of the time, so plans would
# be mostly empty: "runs every backend", "no selector" and "no resources" are made common.
labels_st = st.sampled_from(LABEL_SETS)
backends_st = _mostly(list(KINDS), BACKEND_SETS)
selector_st = st.builds(
    Selector,
    match_labels=_mostly({}, [s for s in LABEL_SETS if len(s) == 1]),
    match_expressions=st.lists(st.sampled_from(EXPRESSIONS), max_size=2),
)
spec_st = st.builds(
    lambda kind, selector, resources: JobSpec(
        name="j", backend=BACKENDS[kind], selector=selector, resources=resources
    ),
    st.sampled_from(KINDS),
    st.builds(Selector) | selector_st,
    _mostly({}, _mappings(RESOURCES, range(1, 3))[1:]),  # asking 1..2 each
)
free_resources_st = st.sampled_from(_mappings(RESOURCES, range(4)))  # having 0..3 each
# Free slots 0..3, but not mostly 0 (integers favour their bounds): a full fleet decides
# nothing interesting.
free_slots_st = st.sampled_from([1, 2, 3, 0])
candidate_fields_st = st.tuples(
    backends_st, labels_st, free_slots_st, free_resources_st, st.integers(0, 3)
)
template_st = st.tuples(spec_st, _mostly(None, CONCURRENCY_KEYS))
job_fields_st = st.tuples(st.integers(0, 4), st.integers(-2, 2), st.integers(0, 1000))


@dataclass
class Scenario:
    jobs: list[QueuedJob]
    sups: list[Candidate]
    now: float
    aging_s: float
    busy_keys: frozenset[str]


@st.composite
def sized_lists(draw: st.DrawFn, elements: st.SearchStrategy[T], lo: int, hi: int) -> list[T]:
    """Lists of lo..hi elements. Plain `st.lists` favours very short lists, and crowded
    queues on several supervisors are where the rules interact."""
    return [draw(elements) for _ in range(draw(st.integers(lo, hi)))]


@st.composite
def candidates_st(draw: st.DrawFn, max_size: int = 4) -> list[Candidate]:
    fields = draw(sized_lists(candidate_fields_st, 1, max_size))
    # Ids rotated, so "lowest id" and "first in the list" differ (cheaper than a shuffle).
    turn = draw(st.integers(0, len(fields) - 1))
    return [
        # Copies: the pooled values are shared between examples.
        Candidate(
            id=f"s{(i + turn) % len(fields)}",
            backends=list(b),
            labels=dict(lab),
            free=f,
            resources=dict(r),
            running=n,
        )
        for i, (b, lab, f, r, n) in enumerate(fields)
    ]


@st.composite
def jobs_st(draw: st.DrawFn, max_size: int = 8) -> list[QueuedJob]:
    # Jobs share a few requirement templates, so identical requirements are common.
    templates = draw(sized_lists(template_st, 1, 4))
    fields = draw(sized_lists(job_fields_st, 1, max_size))
    # Seqs rotated, so input order is not queue order (cheaper than a shuffle).
    turn = draw(st.integers(0, len(fields) - 1))
    jobs = []
    for i, (t, priority, queued_at) in enumerate(fields):
        spec, key = templates[t % len(templates)]
        jobs.append(
            QueuedJob(
                id=f"j{i}",
                seq=1 + (i + turn) % len(fields),
                priority=priority,
                spec=spec,
                queued_at=float(queued_at),
                concurrency_key=key,
            )
        )
    return jobs


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    return Scenario(
        jobs=draw(jobs_st()),
        sups=draw(candidates_st()),
        now=float(draw(st.integers(0, 1200))),
        aging_s=draw(st.sampled_from([0.0, 60.0, 250.0])),
        busy_keys=draw(st.frozensets(st.sampled_from(CONCURRENCY_KEYS), max_size=2)),
    )


def run(sc: Scenario) -> list[tuple[str, str]]:
    return plan(sc.jobs, sc.sups, now=sc.now, aging_s=sc.aging_s, busy_keys=sc.busy_keys)


# --- independent reference rules --------------------------------------------------------


def label_ok(selector: Selector, labels: dict[str, str]) -> bool:
    def term(e: LabelExpression) -> bool:
        value = labels.get(e.key)
        return {
            "In": value is not None and value in e.values,
            "NotIn": value is None or value not in e.values,
            "Exists": value is not None,
            "DoesNotExist": value is None,
        }[e.operator]

    return all(labels.get(k) == v for k, v in selector.match_labels.items()) and all(
        term(e) for e in selector.match_expressions
    )


def can_host(spec: JobSpec, backends: list[str], labels: dict[str, str]) -> bool:
    """Backend and selector: what does not change while a pass runs."""
    return spec.backend.kind in backends and label_ok(spec.selector, labels)


def room_for(spec: JobSpec, slots: int, resources: dict[str, int]) -> bool:
    return slots > 0 and all(resources.get(r, 0) >= n for r, n in spec.resources.items())


def rank(job: QueuedJob, now: float, aging_s: float) -> tuple[int, int]:
    """Sort key: better-ranked jobs sort first."""
    waited = max(0.0, now - job.queued_at)
    eff = job.priority + (math.floor(waited / aging_s) if aging_s > 0 else 0)
    return (-eff, job.seq)


def remaining(sc: Scenario, decisions: list[tuple[str, str]]) -> dict[str, Candidate]:
    """Each supervisor's slots and resources after the plan's placements."""
    left = {s.id: Candidate(s.id, s.backends, s.labels, s.free, dict(s.resources)) for s in sc.sups}
    by_id = {j.id: j for j in sc.jobs}
    for job_id, sid in decisions:
        left[sid].free -= 1
        for r, n in by_id[job_id].spec.resources.items():
            left[sid].resources[r] = left[sid].resources.get(r, 0) - n
    return left


def reference_plan(sc: Scenario) -> list[tuple[str, str]]:
    """The placement rules written out as a plain greedy loop."""
    slots = {s.id: s.free for s in sc.sups}
    load = {s.id: s.running for s in sc.sups}
    res = {s.id: dict(s.resources) for s in sc.sups}
    keys = set(sc.busy_keys)
    out = []
    for job in sorted(sc.jobs, key=lambda j: rank(j, sc.now, sc.aging_s)):
        if job.concurrency_key in keys:
            continue
        options = sorted(
            (load[s.id], s.id)
            for s in sc.sups
            if can_host(job.spec, s.backends, s.labels)
            and room_for(job.spec, slots[s.id], res[s.id])
        )
        if not options:
            continue
        sid = options[0][1]
        slots[sid] -= 1
        load[sid] += 1
        for r, n in job.spec.resources.items():
            res[sid][r] -= n
        if job.concurrency_key is not None:
            keys.add(job.concurrency_key)
        out.append((job.id, sid))
    return out


# --- plan -------------------------------------------------------------------------------


@FEW
@given(scenarios())
def test_never_beyond_capacity(sc: Scenario):
    """(a) Per supervisor: placements <= free slots; placed resources <= free resources."""
    decisions = run(sc)
    by_id = {j.id: j for j in sc.jobs}
    for s in sc.sups:
        mine = [by_id[j] for j, sid in decisions if sid == s.id]
        assert len(mine) <= s.free
        for r in RESOURCES:
            used = sum(j.spec.resources.get(r, 0) for j in mine)
            assert used == 0 or used <= s.resources.get(r, 0)


@FEW
@given(scenarios())
def test_every_placement_satisfies_backend_selector_and_resources(sc: Scenario):
    """(b) Each placement is on a supervisor that runs the backend, matches the selector and
    (even on its own) has the resources."""
    by_id = {j.id: j for j in sc.jobs}
    sups = {s.id: s for s in sc.sups}
    for job_id, sid in run(sc):
        spec, s = by_id[job_id].spec, sups[sid]
        assert can_host(spec, s.backends, s.labels)
        assert room_for(spec, s.free, s.resources)


@FEW
@given(scenarios())
def test_each_job_once_one_per_key_and_no_busy_key(sc: Scenario):
    """(c) No job twice; at most one placement per concurrency key; none with a busy key."""
    decisions = run(sc)
    placed = [j for j, _ in decisions]
    assert len(placed) == len(set(placed))
    assert set(placed) <= {j.id for j in sc.jobs}
    keys = [j.concurrency_key for j in sc.jobs if j.id in placed and j.concurrency_key]
    assert len(keys) == len(set(keys))
    assert not set(keys) & sc.busy_keys


@FEW
@given(scenarios())
def test_work_conserving(sc: Scenario):
    """(d) No head-of-line blocking: no unplaced job that was free to go (its key neither
    busy nor taken by a placed job) still fits what some supervisor has left."""
    decisions = run(sc)
    placed = {j for j, _ in decisions}
    taken = sc.busy_keys | {j.concurrency_key for j in sc.jobs if j.id in placed}
    left = remaining(sc, decisions).values()
    for job in sc.jobs:
        if job.id in placed or job.concurrency_key in taken:
            continue
        for s in left:
            assert not (
                can_host(job.spec, s.backends, s.labels) and room_for(job.spec, s.free, s.resources)
            ), f"{job.id} still fits {s.id}"


@FEW
@given(scenarios())
def test_every_skip_was_forced_at_its_turn(sc: Scenario):
    """(e) Priorities honored: a job left out was, at its turn (after the placements of the
    jobs ranked ahead of it), either blocked by its concurrency key or fit no supervisor.
    So a lower-ranked job never took capacity a higher-ranked one could have used."""
    decisions = run(sc)
    by_id = {j.id: j for j in sc.jobs}
    placed = {j for j, _ in decisions}
    for job in sc.jobs:
        if job.id in placed:
            continue
        turn = rank(job, sc.now, sc.aging_s)
        ahead = [(j, s) for j, s in decisions if rank(by_id[j], sc.now, sc.aging_s) < turn]
        if job.concurrency_key in sc.busy_keys | {by_id[j].concurrency_key for j, _ in ahead}:
            continue
        for s in remaining(sc, ahead).values():
            assert not (
                can_host(job.spec, s.backends, s.labels) and room_for(job.spec, s.free, s.resources)
            ), f"{job.id} fit {s.id} at its turn"


@FEW
@given(scenarios())
def test_plan_equals_greedy_reference(sc: Scenario):
    """(e) Priorities honored: the plan is exactly the greedy pass in (-effective priority,
    seq) order, placing on the least loaded fitting supervisor (ties: lowest id)."""
    assert run(sc) == reference_plan(sc)


@FEW
@given(scenarios())
def test_better_ranked_twin_is_placed_whenever_the_other_is(sc: Scenario):
    """(e) Of two jobs with identical requirements (backend, selector, resources, key), the
    one ranked ahead (higher effective priority, or equal and lower seq) is placed whenever
    the other one is."""
    placed = {j for j, _ in run(sc)}

    def needs(j: QueuedJob) -> tuple[object, ...]:
        return (j.spec.backend.kind, j.spec.selector, j.spec.resources, j.concurrency_key)

    for a in sc.jobs:
        for b in sc.jobs:
            if needs(a) == needs(b) and rank(a, sc.now, sc.aging_s) < rank(b, sc.now, sc.aging_s):
                assert a.id in placed or b.id not in placed


@FEW
@given(
    p=st.integers(-1000, 1000),
    k=st.integers(0, 50),
    aging_s=st.integers(1, 3600),
    extra=st.floats(0.0, 0.99),
    old_seq=st.integers(2, 10),
)
def test_a_job_waiting_long_enough_outranks_a_fresher_higher_priority_one(
    p: int, k: int, aging_s: int, extra: float, old_seq: int
):
    """(f) Aging: priority p after (k + 1) aging periods beats priority p + k just queued,
    even when the fresh job is ahead in seq order."""
    spec = JobSpec(name="j", backend=NoopBackend())
    # Whole seconds keep the arithmetic exact (now - queued_at == waited).
    waited = (k + 1) * aging_s + math.floor(extra * aging_s)
    now = float(10**6)
    old = QueuedJob("old", old_seq, p, spec, queued_at=now - waited)
    fresh = QueuedJob("fresh", 1, p + k, spec, queued_at=now)
    assert effective_priority(old, now, aging_s) == p + k + 1
    assert effective_priority(fresh, now, aging_s) == p + k
    one_slot = [Candidate(id="s", backends=["noop"], labels={}, free=1)]
    assert plan([fresh, old], one_slot, now=now, aging_s=aging_s) == [("old", "s")]


@FEW
@given(
    p=st.integers(-10, 10),
    queued_at=st.floats(0, 1e6),
    t1=st.floats(0, 1e6),
    dt=st.floats(0, 1e6),
    aging_s=st.floats(-10, 1e4),
)
def test_effective_priority_never_falls_with_time(
    p: int, queued_at: float, t1: float, dt: float, aging_s: float
):
    """(f) Waiting never lowers a job: effective priority starts at its priority and does not
    decrease as time passes."""
    job = QueuedJob("j", 1, p, JobSpec(name="j", backend=NoopBackend()), queued_at=queued_at)
    assert p <= effective_priority(job, t1, aging_s) <= effective_priority(job, t1 + dt, aging_s)


# --- unsatisfiable_reason ---------------------------------------------------------------

fleet_st = st.lists(
    st.builds(
        FleetMember,
        id=st.sampled_from(["a", "b", "c", "d"]),
        backends=backends_st.map(list),  # copies: the pooled values are shared
        labels=labels_st.map(dict),
        resources=free_resources_st.map(dict),
        max_jobs=st.integers(0, 3),
    ),
    max_size=4,
    unique_by=lambda m: m.id,
)


@FEW
@given(spec=spec_st, fleet=fleet_st)
def test_satisfiable_job_is_placed_alone_on_an_idle_fleet(spec: JobSpec, fleet: list[FleetMember]):
    """None means some supervisor could run it: alone, on the fleet with everything free, it
    is placed. A reason means it is not."""
    idle = [
        Candidate(
            id=m.id, backends=m.backends, labels=m.labels, free=m.max_jobs, resources=m.resources
        )
        for m in fleet
    ]
    job = QueuedJob("j", 1, 0, spec, concurrency_key="k")
    placed = plan([job], idle, now=0.0) != []
    assert placed == (unsatisfiable_reason(spec, fleet) is None)


@FEW
@given(spec=spec_st, fleet=fleet_st, others=jobs_st(max_size=4), data=st.data())
def test_unsatisfiable_job_is_never_placed(
    spec: JobSpec, fleet: list[FleetMember], others: list[QueuedJob], data: st.DataObject
):
    """With a reason, the job is placed on no state of that fleet (any load, any other
    jobs, any priority)."""
    reason = unsatisfiable_reason(spec, fleet)
    assume(reason is not None)
    state = [
        Candidate(
            id=m.id,
            backends=m.backends,
            labels=m.labels,
            free=data.draw(st.integers(0, m.max_jobs)),
            resources={r: data.draw(st.integers(0, n)) for r, n in m.resources.items()},
            running=data.draw(st.integers(0, 3)),
        )
        for m in fleet
    ]
    job = QueuedJob("hopeless", 0, 1000, spec)
    decisions = plan([job, *others], state, now=0.0)
    assert "hopeless" not in {j for j, _ in decisions}


@FEW
@given(spec=spec_st, fleet=fleet_st)
def test_unsatisfiable_reason_names_the_first_unmet_requirement(
    spec: JobSpec, fleet: list[FleetMember]
):
    """The reason follows the order: backend, then selector, then resources."""
    reason = unsatisfiable_reason(spec, fleet)
    kind = spec.backend.kind
    usable = [m for m in fleet if m.max_jobs >= 1]
    runs = [m for m in usable if kind in m.backends]
    selected = [m for m in runs if label_ok(spec.selector, m.labels)]
    if not fleet:
        assert reason == "no supervisor is registered"
    elif not usable:
        assert reason == "no registered supervisor accepts jobs"
    elif not runs:
        assert reason == f"no registered supervisor runs backend '{kind}'"
    elif not selected:
        assert reason is not None
        assert reason.startswith(f"no supervisor running backend '{kind}' matches the selector")
    elif not any(room_for(spec, 1, m.resources) for m in selected):
        assert reason is not None
        assert reason.startswith("no supervisor matching the selector has resources ")
        for r, n in spec.resources.items():
            assert f"{r}={n}" in reason
    else:
        assert reason is None


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_placing_one_job_alone_matches_plan(sc: Scenario) -> None:
    job = sc.jobs[0]
    alone = place_one(job, sorted(sc.sups, key=by_load), sc.busy_keys)
    planned = plan([job], sc.sups, now=sc.now, aging_s=sc.aging_s, busy_keys=sc.busy_keys)
    assert alone == (planned[0][1] if planned else None)
