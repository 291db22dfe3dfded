"""Job groups ("gangs", docs/lab.md): the decisions, kept pure.

A group is several roles, each a job with its own spec and devices, possibly on different
hosts. It is placed all or none: `fit_group` finds a supervisor for every role at once
(each role's devices granted as the scheduler grants a job's, no device to two roles), or
answers None and nothing is held, so a group waiting for a bad board never keeps another
group from what it needs: no two groups can each hold half of what both need.

Once placed, a role marked essential that ends without succeeding stops the others
(`to_stop`); a group's state is derived from its roles' phases (`group_state`).
"""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet

import msgspec

from protocol import limits
from protocol.spec import JobSpec
from protocol.state import TERMINAL, Phase
from protocol.versions import minor_of
from switchboard.health import OUT_OF_SERVICE
from switchboard.models import QueuedJob, SupervisorView
from switchboard.scheduler import Candidate, LabDevice, by_load, copy_of, fits, spend

#: Placements one group's fitting may try before it gives up for this pass (a group whose
#: roles fit many hosts each finds an answer in a few; this bounds a hopeless search).
SEARCH_BUDGET = 10_000

#: The states of a group.
STATES = ("waiting", "running", "stopping", "succeeded", "failed", "canceled")


class RoleNeed(msgspec.Struct, frozen=True):
    """A role of a group waiting to be placed: its job and what that job asks for."""

    role: str
    job_id: str
    spec: JobSpec
    essential: bool = True


class RoleState(msgspec.Struct, frozen=True):
    """A role of a group as it is now: its job's phase (None: the job is deleted) and
    whether it still waits for the group's placement."""

    role: str
    job_id: str
    phase: Phase | None
    essential: bool = True
    held: bool = False


class Stop(msgspec.Struct, frozen=True):
    """An essential role ended without succeeding: the group's other roles not yet ended
    (`cancel`, job ids) are stopped, with `reason`."""

    role: str
    phase: Phase
    cancel: list[str]
    reason: str


def _as_queued(need: RoleNeed, seq: int) -> QueuedJob:
    return QueuedJob(need.job_id, seq, need.spec.priority, need.spec)


def fit_group(
    roles: Sequence[RoleNeed],
    supervisors: Sequence[Candidate],
    busy_keys: AbstractSet[str] = frozenset(),
    budget: int = SEARCH_BUDGET,
) -> list[tuple[str, str]] | None:
    """(job id, supervisor id) for every role, all placed at once on what `supervisors`
    have free now (slots, resources, devices: a role's devices are taken from those left
    by the roles before it), or None if not every role can be (or the search spent its
    `budget`). Roles are tried in the order given, each on the least loaded supervisor
    that fits first; a role that fits nowhere with the others' choices moves them along
    (a depth-first search). The inputs are not modified."""
    jobs = [_as_queued(need, i) for i, need in enumerate(roles)]
    if any(j.concurrency_key is not None and j.concurrency_key in busy_keys for j in jobs):
        return None
    left = [budget]

    def place(index: int, pool: dict[str, Candidate]) -> list[tuple[str, str]] | None:
        if index == len(jobs):
            return []
        job = jobs[index]
        for sup in sorted((s for s in pool.values() if fits(job, s)), key=by_load):
            left[0] -= 1
            if left[0] < 0:
                return None
            mine = copy_of(sup)
            spend(mine, job.spec)
            rest = place(index + 1, {**pool, sup.id: mine})
            if rest is not None:
                return [(job.id, sup.id), *rest]
        return None

    return place(0, {s.id: s for s in supervisors if s.free > 0})


#: An essential role ending in one of these stops its group.
_SUCCEEDED = Phase.SUCCEEDED


def to_stop(roles: Sequence[RoleState], group_id: str) -> Stop | None:
    """The stop a group needs now, or None: when an essential role's job has ended
    without succeeding (failed, timed out, lost, rejected, exhausted, canceled, or
    deleted), the roles not yet ended are canceled, with a reason naming that role."""
    for state in roles:
        ended = state.phase is None or state.phase in TERMINAL
        if state.essential and ended and state.phase is not _SUCCEEDED:
            phase = state.phase or Phase.CANCELED
            cancel = [r.job_id for r in roles if r.phase is not None and r.phase not in TERMINAL]
            reason = f"essential role {state.role!r} of group {group_id} ended {phase.value}"
            return Stop(state.role, phase, cancel, reason)
    return None


def group_state(roles: Sequence[RoleState], stop_reason: str | None) -> str:
    """A group's state from its roles': `waiting` while a role waits for the group's
    placement, `running` once placed, `stopping` when an essential role ended without
    succeeding and others have not yet ended; once every role has ended, `succeeded` if
    every essential role succeeded, `failed` if one failed (failed, timed out, lost,
    rejected, exhausted), else `canceled` (one was canceled, or deleted)."""
    ended = all(r.phase is None or r.phase in TERMINAL for r in roles)
    if ended:
        essential = [r for r in roles if r.essential]
        if all(r.phase is _SUCCEEDED for r in essential):
            return "succeeded"
        bad = [r for r in essential if r.phase not in (_SUCCEEDED, Phase.CANCELED, None)]
        return "failed" if bad else "canceled"
    if stop_reason is not None:
        return "stopping"
    if any(r.held for r in roles):
        return "waiting"
    return "running"


def refusal(roles: Sequence[RoleNeed], supervisors: Sequence[Candidate]) -> str | None:
    """Why a group could never be placed, given `supervisors` as they would be with
    nothing running and every device not retired free (the caller builds them), or None.
    It names the first role that fits nowhere alone, else says the roles can't all be
    placed at once."""
    for need in roles:
        if not any(fits(_as_queued(need, 0), s) for s in supervisors):
            return f"role {need.role!r} fits no supervisor of the lab, even with all free"
    if fit_group(roles, supervisors) is None:
        return "the roles can't all be placed at once, even with the whole lab free"
    return None


def whole_lab(fleet: Sequence[SupervisorView], devices: Sequence[LabDevice]) -> list[Candidate]:
    """Every registered supervisor as it would be with nothing running and every device
    of it not retired free (what `refusal` asks of): a group that can't be placed on
    this can never be. Devices that are bad or in maintenance count, as for a job: an
    operator may bring them back."""
    by_host: dict[str, list[LabDevice]] = {}
    for d in devices:
        if d.health not in OUT_OF_SERVICE:
            free = msgspec.structs.replace(
                d, health="good", held=False, checking=False, reserved=None
            )
            by_host.setdefault(d.supervisor_id, []).append(free)
    found = []
    for s in fleet:
        mine = by_host.get(s.id, [])
        counts: dict[str, int] = {}
        for d in mine:
            counts[d.class_] = counts.get(d.class_, 0) + 1
        declared = {d.class_ for d in devices if d.supervisor_id == s.id}
        resources = {k: n for k, n in s.resources.items() if k not in declared}
        found.append(
            Candidate(
                id=s.id,
                backends=s.backends,
                labels=s.labels,
                free=s.max_jobs,
                resources={**resources, **counts, **{c: 0 for c in declared - counts.keys()}},
                minor=minor_of(s.protocol) if s.protocol else limits.PROTOCOL_MINOR,
                lab=mine,
            )
        )
    return found
