"""Placement decisions, kept pure: (queued jobs, this replica's supervisors) -> assignments.

Rules: a job goes only to a supervisor that runs its backend kind, whose labels satisfy
its selector, that has a free slot and the resources it asks for. Jobs are considered
highest priority first, oldest first within a priority; a job that fits nowhere right now
is skipped, so it never blocks the jobs behind it. Among the supervisors that fit, the
least loaded wins (ties go to the lowest id, so decisions are reproducible).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from protocol.spec import Selector
from switchboard.models import QueuedJob


class Candidate(msgspec.Struct):
    """A connected supervisor as the scheduler sees it; `free` and `resources` are what
    is still available."""

    id: str
    backends: list[str]
    labels: dict[str, str]
    free: int
    resources: dict[str, int] = {}
    running: int = 0


def selector_matches(selector: Selector, labels: dict[str, str]) -> bool:
    """True if a supervisor with `labels` satisfies `selector`. A missing key satisfies
    NotIn and DoesNotExist, and nothing else."""
    for key, value in selector.match_labels.items():
        if labels.get(key) != value:
            return False
    for expr in selector.match_expressions:
        present = expr.key in labels
        match expr.operator:
            case "In":
                ok = present and labels[expr.key] in expr.values
            case "NotIn":
                ok = not present or labels[expr.key] not in expr.values
            case "Exists":
                ok = present
            case "DoesNotExist":
                ok = not present
        if not ok:
            return False
    return True


def _fits(job: QueuedJob, sup: Candidate) -> bool:
    return (
        sup.free > 0
        and job.spec.backend.kind in sup.backends
        and selector_matches(job.spec.selector, sup.labels)
        and all(sup.resources.get(name, 0) >= n for name, n in job.spec.resources.items())
    )


def plan(jobs: Sequence[QueuedJob], supervisors: Sequence[Candidate]) -> list[tuple[str, str]]:
    """Pairs (job id, supervisor id) to assign now. `jobs` must be in queue order."""
    pool = [msgspec.structs.replace(s, resources=dict(s.resources)) for s in supervisors]
    decisions: list[tuple[str, str]] = []
    for job in sorted(jobs, key=lambda j: (-j.priority, j.seq)):
        fitting = [s for s in pool if _fits(job, s)]
        if not fitting:
            continue
        best = min(fitting, key=lambda s: (s.running, s.id))
        best.free -= 1
        best.running += 1
        for name, n in job.spec.resources.items():
            best.resources[name] -= n
        decisions.append((job.id, best.id))
    return decisions
