"""The placement rules, as a pure function, with examples and properties."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.spec import JobSpec, LabelExpression, NoopBackend, Selector, WasmBackend
from switchboard.models import QueuedJob
from switchboard.scheduler import Candidate, plan, selector_matches

DIGEST = "sha256:" + "a" * 64


def job(
    id: str, seq: int, *, priority: int = 0, kind: str = "noop", selector=None, resources=None
) -> QueuedJob:
    backend = NoopBackend() if kind == "noop" else WasmBackend(module=DIGEST)
    spec = JobSpec(
        name=id,
        backend=backend,
        selector=selector or Selector(),
        resources=resources or {},
        priority=priority,
    )
    return QueuedJob(id, seq, priority, spec)


def sup(id: str, free: int = 1, labels=None, backends=("noop", "wasm"), resources=None):
    return Candidate(
        id=id, backends=list(backends), labels=labels or {}, free=free, resources=resources or {}
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
    assert plan(jobs, [sup("s", free=2)]) == [("new-high", "s"), ("old-low", "s")]


def test_a_job_that_fits_nowhere_does_not_block_the_rest():
    picky = job("picky", 1, selector=Selector(match_labels={"gpu": "yes"}))
    assert plan([picky, job("easy", 2)], [sup("s")]) == [("easy", "s")]


def test_backend_kind_must_be_supported():
    assert plan([job("w", 1, kind="wasm")], [sup("s", backends=("noop",))]) == []


def test_resources_must_be_available():
    wants_board = job("j", 1, resources={"nrf52": 1})
    assert plan([wants_board], [sup("plain")]) == []
    assert plan([wants_board], [sup("lab", resources={"nrf52": 1})]) == [("j", "lab")]
    two = [wants_board, job("k", 2, resources={"nrf52": 1})]
    assert plan(two, [sup("lab", free=5, resources={"nrf52": 1})]) == [("j", "lab")]


def test_least_loaded_supervisor_wins():
    busy = Candidate(id="a", backends=["noop"], labels={}, free=3, running=5)
    idle = Candidate(id="b", backends=["noop"], labels={}, free=3, running=0)
    assert plan([job("j", 1)], [busy, idle]) == [("j", "b")]


labels_st = st.dictionaries(
    st.sampled_from(["arch", "os", "board"]), st.sampled_from(["a", "b"]), max_size=3
)


@settings(max_examples=200, deadline=None)
@given(
    jobs=st.lists(
        st.tuples(st.integers(-2, 2), labels_st, st.sampled_from(["noop", "wasm"])),
        max_size=30,
    ),
    sups=st.lists(
        st.tuples(st.integers(0, 4), labels_st, st.sampled_from([("noop",), ("noop", "wasm")])),
        max_size=6,
    ),
)
def test_properties(jobs, sups):
    queued = [
        job(f"j{i}", i, priority=p, kind=kind, selector=Selector(match_labels=sel))
        for i, (p, sel, kind) in enumerate(jobs)
    ]
    candidates = [
        sup(f"s{i}", free=f, labels=lab, backends=b) for i, (f, lab, b) in enumerate(sups)
    ]
    decisions = plan(queued, candidates)
    by_id = {j.id: j for j in queued}
    sup_by_id = {s.id: s for s in candidates}
    # Never beyond capacity; each job at most once.
    assert len({j for j, _ in decisions}) == len(decisions)
    for s in candidates:
        assert sum(1 for _, sid in decisions if sid == s.id) <= s.free
    # Selector and backend always respected.
    for job_id, sid in decisions:
        spec, target = by_id[job_id].spec, sup_by_id[sid]
        assert selector_matches(spec.selector, target.labels)
        assert spec.backend.kind in target.backends
    # No job left waiting that could still have gone somewhere with room.
    placed = {j for j, _ in decisions}
    used = {s.id: sum(1 for _, sid in decisions if sid == s.id) for s in candidates}
    for j in queued:
        if j.id in placed:
            continue
        for s in candidates:
            fits = selector_matches(j.spec.selector, s.labels) and j.spec.backend.kind in s.backends
            assert not (fits and used[s.id] < s.free)
    # Priorities honored: a placed job never has lower priority than an unplaced one that fit
    # the same supervisor.
    for job_id, sid in decisions:
        for other in queued:
            if other.id in placed or other.priority <= by_id[job_id].priority:
                continue
            s = sup_by_id[sid]
            assert not (
                selector_matches(other.spec.selector, s.labels)
                and other.spec.backend.kind in s.backends
            )
