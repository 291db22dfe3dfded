"""A supervisor's events stored in one batch leave exactly the record they leave stored one
at a time: the store writes only a run's last phase change of a batch to the run and its
job (earlier ones go to the history only), and that must never show.

Random event sequences for one run (valid and refused transitions, messages, stages,
errors, exits, output), each stored into two fresh stores: one event per transaction, and
split into random batches. The job, its runs with their phase histories, the audit trail
and the output must come out the same."""

from __future__ import annotations

import asyncio
import itertools
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.exceptions import JobErrorKind
from protocol.messages import JobErrorReport, JobExit, JobStateChanged, Output
from protocol.spec import Backoff, JobSpec, NoopBackend, RestartPolicy
from protocol.state import Phase
from switchboard.store.sqlite import SQLiteStore
from tests.store_setup import HELLO

pytestmark = pytest.mark.slow

SPECS = [
    JobSpec(name="plain", backend=NoopBackend()),
    JobSpec(
        name="restarts",
        backend=NoopBackend(),
        restart=RestartPolicy(policy="on_failure", max_restarts=1, backoff=Backoff(jitter="none")),
    ),
]
# Non-terminal phases twice: sequences that go on after a change are the interesting ones.
PHASES = [
    Phase.INITIALIZING,
    Phase.INITIALIZING,
    Phase.RUNNING,
    Phase.RUNNING,
    Phase.SUCCEEDED,
    Phase.FAILED,
    Phase.REJECTED,
    Phase.TIMED_OUT,
    Phase.CANCELED,
    Phase.LOST,
]
MESSAGES = st.sampled_from([None, "first", "second"])


@st.composite
def event_kinds(draw: st.DrawFn) -> tuple:
    kind = draw(st.sampled_from(["state", "state", "state", "exit", "error", "output"]))
    if kind == "state":
        stage = draw(st.sampled_from([None, "fetching", "accepted"]))
        return ("state", draw(st.sampled_from(PHASES)), stage, draw(MESSAGES))
    if kind == "exit":
        return ("exit", draw(st.integers(0, 2)), draw(MESSAGES))
    if kind == "error":
        return (
            "error",
            draw(st.sampled_from([JobErrorKind.MAX_CONCURRENT_JOBS, JobErrorKind.IMAGE_NOT_FOUND])),
        )
    return ("output",)


def _events(kinds: list[tuple]) -> list:
    events, offset = [], 0
    for seq, kind in enumerate(kinds, start=1):
        at = 1_000_000.0 + seq
        match kind:
            case ("state", phase, stage, message):
                events.append(
                    JobStateChanged(
                        seq=seq,
                        job_id="j",
                        attempt=1,
                        phase=phase,
                        stage=stage,
                        message=message,
                        at=at,
                    )
                )
            case ("exit", code, message):
                events.append(
                    JobExit(seq=seq, job_id="j", attempt=1, exit_code=code, message=message)
                )
            case ("error", error_kind):
                events.append(
                    JobErrorReport(
                        seq=seq, job_id="j", attempt=1, kind=error_kind, description="no"
                    )
                )
            case ("output",):
                events.append(
                    Output(
                        seq=seq, job_id="j", attempt=1, stream="stdout", offset=offset, data=b"ab"
                    )
                )
                offset += 2
    return events


async def _record(spec: JobSpec, batches: list[list]) -> tuple:
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "db.sqlite3")
        await store.open()
        try:
            await store.supervisor_connected(HELLO)
            await store.create_job("j", spec)
            await store.assign([("j", "s1")])
            ended, unwanted = set(), set()
            for batch in batches:
                result = await store.apply_events("s1", batch)
                ended |= set(result.ended)
                unwanted |= set(result.unwanted)
            job = await store.get_job("j")
            events = await store.job_events("j")
            output = await store.read_output("j", 1, "stdout")
        finally:
            await store.close()
    runs = [
        (
            r.phase,
            r.stage,
            r.message,
            r.exit_code,
            r.reason,
            r.error_kind,
            r.error,
            r.started_at,
            r.ended_at,
            # the assignment's time is the store's clock; the others are the events' own
            [
                (p.phase, p.stage, p.message, p.at if p.phase != Phase.ASSIGNED else 0)
                for p in r.phases
            ],
        )
        for r in job.runs
    ]
    trail = [(e.kind, e.message, e.attempt) for e in events if e.kind != "submitted"]
    return (job.phase, job.exit_code, job.reason, runs, trail, output, ended, unwanted)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=st.sampled_from(SPECS),
    kinds=st.lists(event_kinds(), min_size=1, max_size=8),
    cuts=st.sets(st.integers(1, 7)),
)
def test_batched_events_leave_the_record_one_at_a_time_leaves(spec, kinds, cuts):
    events = _events(kinds)
    one_by_one = [[event] for event in events]
    bounds = [0, *sorted(c for c in cuts if c < len(events)), len(events)]
    batched = [events[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    assert asyncio.run(_record(spec, batched)) == asyncio.run(_record(spec, one_by_one))


async def test_one_event_at_a_time_each_shows_at_once(store):
    """The reference the property above compares with: what each event does on its own."""
    await store.supervisor_connected(HELLO)
    await store.create_job("j", SPECS[0])
    await store.assign([("j", "s1")])

    async def after(event) -> tuple:
        await store.apply_events("s1", [event])
        job = await store.get_job("j")
        run = job.runs[0]
        return (job.phase, job.exit_code, run.phase, run.stage, run.message, run.exit_code)

    init = JobStateChanged(
        seq=1,
        job_id="j",
        attempt=1,
        phase=Phase.INITIALIZING,
        stage="fetching",
        message="pulling",
        at=10.0,
    )
    assert await after(init) == (
        "initializing",
        None,
        "initializing",
        "fetching",
        "pulling",
        None,
    )
    running = JobStateChanged(seq=2, job_id="j", attempt=1, phase=Phase.RUNNING, at=11.0)
    assert await after(running) == ("running", None, "running", None, "pulling", None)
    assert (await store.get_job("j")).runs[0].started_at == 11.0
    exit_ = JobExit(seq=3, job_id="j", attempt=1, exit_code=0, message="done")
    assert await after(exit_) == ("running", None, "running", None, "done", 0)
    end = JobStateChanged(seq=4, job_id="j", attempt=1, phase=Phase.SUCCEEDED, at=12.0)
    assert await after(end) == ("succeeded", 0, "succeeded", None, "done", 0)
    run = (await store.get_job("j")).runs[0]
    assert (run.started_at, run.ended_at) == (11.0, 12.0)
