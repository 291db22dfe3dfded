"""Placement decisions, kept pure: (queued jobs, this replica's supervisors) -> assignments.

Rules: a job goes only to a supervisor that runs its backend kind, speaks a protocol
version that carries everything its spec asks for (protocol.messages.minor_needed: e.g.
inputs need 1.3, which an older supervisor would silently ignore), whose labels satisfy
its selector, that has a free slot and the free resources it asks for. A job whose
concurrency key is busy (a run with that key is active) is skipped, and at most one job
per key is placed in a pass. A job that fits nowhere right now is skipped, so it never
blocks the jobs behind it. Among the supervisors that fit, the least loaded wins (ties go
to the lowest id, so decisions are reproducible).

Jobs are considered in order of (-effective priority, seq), where aging lifts a job one
priority level for every `aging_s` seconds it has waited, so nothing starves:

    effective = priority + floor(max(0, now - queued_at) / aging_s)   (aging_s > 0)
    effective = priority                                              (aging_s <= 0)

(A `queued_at` in the future, from clock skew, counts as no wait rather than lowering
the job; the aging term is capped at 10**15 levels so a degenerate `aging_s` cannot
overflow.)

`unsatisfiable_reason` answers a different question: could any registered supervisor
*ever* run a job, ignoring current load? It says why not, so a job that can never be
placed does not wait silently.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet

import msgspec

from protocol import limits
from protocol.messages import minor_needed
from protocol.spec import DeviceWanted, JobSpec, Selector
from switchboard.health import OUT_OF_SERVICE, placeable
from switchboard.models import QueuedJob

#: Far beyond any real wait; bounds the aging term (see the module docstring).
_MAX_AGING_LEVELS = 1e15


class Candidate(msgspec.Struct):
    """A connected supervisor as the scheduler sees it. `free` is its free slots and
    `resources` its *free* resource counts (the caller subtracts what active runs hold;
    either may be negative if a supervisor is overcommitted)."""

    id: str
    backends: list[str]
    labels: dict[str, str]
    free: int
    resources: dict[str, int] = {}
    running: int = 0
    #: The minor of the protocol version its connection negotiated.
    minor: int = limits.PROTOCOL_MINOR
    #: Its devices whose health check may start now (awaiting_checks).
    checks: frozenset[str] = frozenset()
    #: Reservation id -> {class: its devices here free for a run} (reserved_devices): a
    #: job naming the reservation takes these; no other job may.
    reserved: dict[str, dict[str, int]] = {}
    #: Its devices (LabDevice), for a job asking for devices one by one (`devices`): only
    #: the grant itself can tell whether their labels fit.
    lab: list[LabDevice] = []


class FleetMember(msgspec.Struct):
    """A registered supervisor (connected or not) with its *total* capacity."""

    id: str
    backends: list[str]
    labels: dict[str, str]
    resources: dict[str, int]
    max_jobs: int
    #: The minor of the protocol version it last connected with (0: not known).
    minor: int = limits.PROTOCOL_MINOR


def effective_priority(job: QueuedJob, now: float, aging_s: float) -> int:
    """`job.priority` plus one for every whole `aging_s` seconds the job has waited."""
    if aging_s <= 0:
        return job.priority
    # min() also turns the inf a tiny aging_s produces into a finite number of levels.
    levels = min(max(0.0, now - job.queued_at) / aging_s, _MAX_AGING_LEVELS)
    return job.priority + math.floor(levels)


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


def _has_resources(have: dict[str, int], want: dict[str, int]) -> bool:
    return all(have.get(name, 0) >= n for name, n in want.items())


def _has_devices(job: QueuedJob, sup: Candidate) -> bool:
    """A health check needs its device; a job naming a reservation goes only where the
    reservation holds devices, and takes the classes the reservation holds from it."""
    if job.device is not None:
        return job.device in sup.checks
    spec = job.spec
    reservation = spec.reservation
    wanted = spec.classes_wanted()
    if reservation is None:
        counted = _has_resources(sup.resources, wanted)
    else:
        mine = sup.reserved.get(reservation)
        counted = mine is not None and _has_resources({**sup.resources, **mine}, wanted)
    return counted and (not spec.devices or _granted(spec, sup) is not None)


def _granted(spec: JobSpec, sup: Candidate) -> list[str] | None:
    """The devices a job asking for devices one by one would be granted there now."""
    return grant(spec.resources, sup.lab, None, frozenset(), spec.reservation, spec.devices)


def _fits(job: QueuedJob, sup: Candidate) -> bool:
    # Cheapest checks first: this runs for every (job, supervisor) pair in a pass.
    return (
        sup.free > 0
        and job.spec.backend.kind in sup.backends
        and minor_needed(job.spec) <= sup.minor
        and _has_devices(job, sup)
        and selector_matches(job.spec.selector, sup.labels)
    )


def _own_copy(sup: Candidate) -> Candidate:
    """A copy whose counts may be spent without touching the original."""
    return msgspec.structs.replace(
        sup,
        resources=dict(sup.resources),
        reserved={r: dict(counts) for r, counts in sup.reserved.items()},
        lab=list(sup.lab),
    )


def plan(
    jobs: Sequence[QueuedJob],
    supervisors: Sequence[Candidate],
    *,
    now: float,
    aging_s: float = 60.0,
    busy_keys: AbstractSet[str] = frozenset(),
) -> list[tuple[str, str]]:
    """Pairs (job id, supervisor id) to assign now, in the order they were decided.

    `busy_keys` are the concurrency keys of runs already active anywhere. The inputs are
    not modified.
    """
    # Only supervisors with a free slot are looked at; the pass ends when none is left.
    # One is copied when the pass first spends its slots and resources (the inputs are
    # not modified, and a pass placing one job among many supervisors copies one).
    pool = [s for s in supervisors if s.free > 0]
    copied: set[str] = set()
    taken = set(busy_keys)
    # Jobs naming a reservation skip the queue: its devices wait for them alone.
    ranked = sorted(
        jobs,
        key=lambda j: (j.spec.reservation is None, -effective_priority(j, now, aging_s), j.seq),
    )
    decisions: list[tuple[str, str]] = []
    for job in ranked:
        if not pool:
            break
        key = job.concurrency_key
        if key is not None and key in taken:
            continue
        fitting = [s for s in pool if _fits(job, s)]
        if not fitting:
            continue
        best = min(fitting, key=by_load)
        if best.id not in copied:
            copied.add(best.id)
            at = pool.index(best)
            best = pool[at] = _own_copy(best)
        spend(best, job.spec, job.device)
        if best.free <= 0:
            pool.remove(best)
        if key is not None:
            taken.add(key)
        decisions.append((job.id, best.id))
    return decisions


def by_load(supervisor: Candidate) -> tuple[int, str]:
    """The order `plan` prefers supervisors in: least loaded, then lowest id."""
    return (supervisor.running, supervisor.id)


def place_one(
    job: QueuedJob,
    supervisors: Iterable[Candidate],
    busy_keys: AbstractSet[str] = frozenset(),
) -> str | None:
    """Where `plan` would place `job` alone, given `supervisors` sorted by `by_load`: the
    first that fits (usually the first one looked at, whatever the fleet's size)."""
    if job.concurrency_key is not None and job.concurrency_key in busy_keys:
        return None
    return next((s.id for s in supervisors if _fits(job, s)), None)


def spend(supervisor: Candidate, spec: JobSpec, check: str | None = None) -> None:
    """Take one slot and the resources `spec` asks for from `supervisor` (in place); a
    health check (`check`: its device) takes that device instead."""
    supervisor.free -= 1
    supervisor.running += 1
    if check is not None:
        supervisor.checks = supervisor.checks - {check}
        return
    if spec.devices and supervisor.lab:
        taken = set(_granted(spec, supervisor) or ())
        supervisor.lab = [
            msgspec.structs.replace(d, held=True) if d.id in taken else d for d in supervisor.lab
        ]
    mine = supervisor.reserved.get(spec.reservation) if spec.reservation is not None else None
    for name, n in spec.classes_wanted().items():
        counts = mine if mine is not None and name in mine else supervisor.resources
        counts[name] = counts.get(name, 0) - n


def remaining(
    supervisors: Sequence[Candidate],
    jobs: Sequence[QueuedJob],
    decisions: Sequence[tuple[str, str]],
) -> list[Candidate]:
    """Copies of `supervisors` less the slots and resources `decisions` (from `plan` over
    `jobs`) spent: what a further `plan` over more jobs may still use."""
    pool = {s.id: _own_copy(s) for s in supervisors}
    by_id = {job.id: job for job in jobs}
    for job_id, supervisor_id in decisions:
        job = by_id[job_id]
        spend(pool[supervisor_id], job.spec, job.device)
    return list(pool.values())


def describe_selector(selector: Selector) -> str:
    """The selector in the CLI's label syntax, e.g. `arch=x86_64, board in (a, b), !gpu`."""
    terms = [f"{key}={value}" for key, value in sorted(selector.match_labels.items())]
    for expr in selector.match_expressions:
        values = ", ".join(expr.values)
        terms.append(
            {
                "In": f"{expr.key} in ({values})",
                "NotIn": f"{expr.key} notin ({values})",
                "Exists": expr.key,
                "DoesNotExist": f"!{expr.key}",
            }[expr.operator]
        )
    return ", ".join(terms)


def files_asked(spec: JobSpec) -> str:
    """What of a spec needs a newer protocol (its files), for people."""
    return "inputs" if spec.inputs else "outputs and reports"


def unsatisfiable_reason(spec: JobSpec, fleet: Sequence[FleetMember]) -> str | None:
    """None if some registered supervisor could ever run `spec` (ignoring current load),
    else why not, naming the first unmet requirement: backend, then selector, then
    resources, then protocol version."""
    if not fleet:
        return "no supervisor is registered"
    # A supervisor without a single slot can never run anything (the protocol forbids
    # max_jobs < 1; this keeps the answer consistent with `plan` regardless).
    members = [m for m in fleet if m.max_jobs >= 1]
    if not members:
        return "no registered supervisor accepts jobs"
    kind = spec.backend.kind
    members = [m for m in members if kind in m.backends]
    if not members:
        return f"no registered supervisor runs backend {kind!r}"
    members = [m for m in members if selector_matches(spec.selector, m.labels)]
    if not members:
        return (
            f"no supervisor running backend {kind!r} matches the selector"
            f" ({describe_selector(spec.selector)})"
        )
    members = [m for m in members if _has_resources(m.resources, spec.resources)]
    if not members:
        wanted = ", ".join(f"{name}={n}" for name, n in sorted(spec.resources.items()))
        return f"no supervisor matching the selector has resources {wanted}"
    needed = minor_needed(spec)
    if not any(m.minor >= needed for m in members):
        best = max(m.minor for m in members)
        return (
            f"the job's {files_asked(spec)} need protocol {limits.PROTOCOL_MAJOR}.{needed};"
            " the supervisors"
            f" that could run it speak at most {limits.PROTOCOL_MAJOR}.{best}"
        )
    return None


# --- devices (the hardware lab, docs/lab.md) --------------------------------------------
# A supervisor that declares devices (protocol 1.4) offers each class it declares as many
# times as it has devices of that class that are placeable (switchboard.health) and held
# by no active run; the run placed gets named devices (`grant`). A class a supervisor
# declares no device of is counted as before, from the resources of its hello.


class LabDevice(msgspec.Struct, frozen=True):
    """A device as placement sees it."""

    id: str
    supervisor_id: str
    class_: str
    health: str
    #: An active run holds it.
    held: bool = False
    #: It waits for its health check, and serves no other job until that has ended.
    checking: bool = False
    #: The held reservation it belongs to (its jobs alone may be given it).
    reserved: str | None = None
    labels: dict[str, str] = {}


def _free(device: LabDevice) -> bool:
    """May be given a run now (by a job its reservation allows: see grant)."""
    return placeable(device.health) and not device.held and not device.checking


def in_service_devices(devices: Iterable[LabDevice]) -> dict[str, dict[str, int]]:
    """supervisor id -> {class: its devices of it that are not retired}: what it could
    ever offer of a class it declares devices of (busy, bad or in maintenance ones count:
    they may serve again), whatever the resources of its hello say of that class."""
    counts: dict[str, dict[str, int]] = {}
    for d in devices:
        mine = counts.setdefault(d.supervisor_id, {})
        mine[d.class_] = mine.get(d.class_, 0) + (d.health not in OUT_OF_SERVICE)
    return counts


def free_devices(devices: Iterable[LabDevice]) -> dict[str, dict[str, int]]:
    """supervisor id -> {class: devices of it that may be given a run now, reserved ones
    left out}; every class a supervisor declares is there, 0 when none is free."""
    free: dict[str, dict[str, int]] = {}
    for d in devices:
        counts = free.setdefault(d.supervisor_id, {})
        counts[d.class_] = counts.get(d.class_, 0) + (_free(d) and d.reserved is None)
    return free


def reserved_devices(devices: Iterable[LabDevice]) -> dict[str, dict[str, dict[str, int]]]:
    """supervisor id -> reservation id -> {class: its devices there that may be given a
    run of a job naming it now}; a class it holds is there, 0 when none is free."""
    found: dict[str, dict[str, dict[str, int]]] = {}
    for d in devices:
        if d.reserved is not None:
            counts = found.setdefault(d.supervisor_id, {}).setdefault(d.reserved, {})
            counts[d.class_] = counts.get(d.class_, 0) + _free(d)
    return found


def awaiting_checks(devices: Iterable[LabDevice]) -> dict[str, frozenset[str]]:
    """supervisor id -> its devices whose health check may start now (waiting for it, not
    held, not in maintenance or retired)."""
    found: dict[str, set[str]] = {}
    for d in devices:
        # A reserved device is its holder's: its check waits for the lease to end.
        idle = not d.held and d.reserved is None
        if d.checking and idle and d.health not in OUT_OF_SERVICE | {"maintenance"}:
            found.setdefault(d.supervisor_id, set()).add(d.id)
    return {host: frozenset(ids) for host, ids in found.items()}


def grant(
    wanted: dict[str, int],
    devices: Sequence[LabDevice],
    check: str | None = None,
    avoid: AbstractSet[str] = frozenset(),
    reservation: str | None = None,
    entries: Sequence[DeviceWanted] = (),
) -> list[str] | None:
    """The devices to give a run wanting `wanted` ({class: count}) and `entries` (its
    spec's `devices`, one each) on a supervisor whose inventory is `devices`: for each
    class it declares devices of, that many free ones (lowest ids first, so decisions are
    reproducible, those in `avoid` last: the job's previous run was refused with them,
    e.g. one was unplugged); classes it declares none of are not granted by name. Then,
    for each entry in order, a free device of its class and labels, every one a different
    device (`match`): the classes' devices first, the entries' after, in that order. A
    health check (`check`: the device it checks) gets that device alone, whatever its
    health. A device a reservation holds goes only to a job naming it (`reservation`),
    which takes the classes its reservation holds from it and no other device of them.
    None if they are not all free now (nothing is granted then)."""
    if check is not None:
        mine = [d for d in devices if d.id == check and not d.held and d.reserved is None]
        return [check] if mine else None
    slots: list[list[str]] = []
    for cls, n in sorted(wanted.items()):
        of_class = sorted(
            (d for d in devices if d.class_ == cls), key=lambda d: (d.id in avoid, d.id)
        )
        if not of_class:
            continue
        mine = [d for d in of_class if reservation is not None and d.reserved == reservation]
        pool = mine or [d for d in of_class if d.reserved is None]
        free = [d.id for d in pool if _free(d)]
        if len(free) < n:
            return None
        slots += [free] * n
    for entry in entries:
        fits = sorted(
            (
                d
                for d in devices
                if _free(d) and d.reserved in (None, reservation) and device_matches(entry, d)
            ),
            key=lambda d: (d.reserved is None, d.id in avoid, d.id),
        )
        if not fits:
            return None
        slots.append([d.id for d in fits])
    return match(slots)


def device_matches(entry: DeviceWanted, device: LabDevice) -> bool:
    """The device is of the entry's class (if it names one) and its labels satisfy the
    entry's selector (free or not)."""
    return (entry.class_ is None or device.class_ == entry.class_) and selector_matches(
        entry.selector, device.labels
    )


def match(slots: Sequence[Sequence[str]]) -> list[str] | None:
    """One different device for every slot (its candidates, in order of preference), or
    None if there is no such choice. Each slot takes its first candidate not yet taken
    when there is one (so plain counts get the lowest ids, in order); otherwise the slots
    before it are moved along (augmenting paths, bipartite matching), so an answer is
    found whenever one exists."""
    owner: dict[str, int] = {}
    chosen: list[str] = [""] * len(slots)

    def augment(slot: int, seen: set[str]) -> bool:
        for device in slots[slot]:
            if device in seen:
                continue
            seen.add(device)
            other = owner.get(device)
            if other is None or augment(other, seen):
                owner[device] = slot
                chosen[slot] = device
                return True
        return False

    for slot, candidates in enumerate(slots):
        direct = next((d for d in candidates if d not in owner), None)
        if direct is not None:
            owner[direct] = slot
            chosen[slot] = direct
        elif not augment(slot, set()):
            return None
    return chosen


def device_refusal(
    spec: JobSpec, devices: Sequence[LabDevice], fleet: Sequence[FleetMember]
) -> str | None:
    """Why no device could *ever* serve a job (it is refused at submit), or None.

    Only a lab answers (a switchboard some supervisor has declared devices to): there a
    class that no device has and no supervisor offers as a plain resource is a mistake,
    not something to wait for. A job is refused when no one supervisor has, for every
    class it asks for, that many devices that are not retired (or the resource count in
    its hello, for a class it declares no device of), and for every entry of its
    `devices` one more device of its class and labels that is not retired. Devices that
    are bad or in maintenance count: an operator may bring them back, and the job waits
    for that."""
    if not devices or not (spec.resources or spec.devices):
        return None
    in_service = [d for d in devices if d.health not in OUT_OF_SERVICE]
    classes = {d.class_ for d in devices}
    offered = {m.id: m.resources for m in fleet}
    asked = sorted(set(spec.resources) | {e.class_ for e in spec.devices if e.class_})
    for cls in asked:
        if cls not in classes and (
            cls not in spec.resources or not any(cls in r for r in offered.values())
        ):
            known = ", ".join(sorted(classes))
            return f"no device of class {cls!r} is in the lab (its classes: {known})"
    declared: dict[str, set[str]] = {}
    for d in devices:
        declared.setdefault(d.supervisor_id, set()).add(d.class_)
    hosts = declared.keys() | offered.keys()
    if any(
        _could_serve(spec, host, in_service, declared.get(host, set()), offered.get(host, {}))
        for host in hosts
    ):
        return None
    if spec.devices:
        return (
            "no supervisor has devices that are not retired for all it asks for: "
            + describe_wanted(spec)
        )
    wanted = ", ".join(f"{n} {cls!r}" for cls, n in sorted(spec.resources.items()))
    return f"no supervisor has {wanted} device(s) that are not retired"


def _could_serve(
    spec: JobSpec,
    host: str,
    devices: Sequence[LabDevice],
    declared: AbstractSet[str],
    plain: dict[str, int],
) -> bool:
    """The host could serve the job if all its devices not retired (`devices`) were free;
    `declared`: the classes it declares devices of (retired ones too), `plain`: the
    resource counts of its hello."""
    mine = [
        msgspec.structs.replace(d, health="good", held=False, checking=False, reserved=None)
        for d in devices
        if d.supervisor_id == host
    ]
    if any(plain.get(cls, 0) < n for cls, n in spec.resources.items() if cls not in declared):
        return False
    by_name = {cls: n for cls, n in spec.resources.items() if cls in declared}
    if any(sum(d.class_ == cls for d in mine) < n for cls, n in by_name.items()):
        return False  # (grant leaves out a class with no device here: all retired)
    return grant(by_name, mine, entries=spec.devices) is not None


def describe_wanted(spec: JobSpec) -> str:
    """What a job asks for, for people: `2 'nrf' and nrf (dut), ppk2 (meter, probe=1)`."""
    parts = [f"{n} {cls!r}" for cls, n in sorted(spec.resources.items())]
    for entry in spec.devices:
        about = [t for t in (entry.role, describe_selector(entry.selector)) if t]
        what = entry.class_ or "any class"
        parts.append(f"{what} ({', '.join(about)})" if about else what)
    return " and ".join(parts)


# --- reservations (docs/lab.md) ----------------------------------------------------------


class ReservationWanted(msgspec.Struct, frozen=True):
    """What a waiting reservation asks for: `count` devices of `class_` (None: any class)
    whose labels satisfy `selector`."""

    id: str
    count: int
    class_: str | None = None
    selector: Selector = msgspec.field(default_factory=Selector)
    priority: int = 0
    created_at: float = 0.0


def _reservable(d: LabDevice) -> bool:
    return _free(d) and d.reserved is None


def reservation_matches(wanted: ReservationWanted, device: LabDevice) -> bool:
    """The device is of the class and labels the reservation asks for (free or not)."""
    return (wanted.class_ is None or device.class_ == wanted.class_) and selector_matches(
        wanted.selector, device.labels
    )


def grant_reservations(
    waiting: Sequence[ReservationWanted], devices: Sequence[LabDevice]
) -> list[tuple[str, list[str]]]:
    """(reservation id, its devices) for the waiting reservations that may be granted now:
    considered by (-priority, created_at), each granted all the devices it asks for (the
    lowest free ids that match) or none, never some: a reservation that can't have all
    of them waits, holding nothing. The inputs are not modified."""
    taken: set[str] = set()
    granted = []
    for wanted in sorted(waiting, key=lambda w: (-w.priority, w.created_at, w.id)):
        free = sorted(
            d.id
            for d in devices
            if d.id not in taken and _reservable(d) and reservation_matches(wanted, d)
        )
        if len(free) >= wanted.count:
            chosen = free[: wanted.count]
            taken.update(chosen)
            granted.append((wanted.id, chosen))
    return granted


def reservation_refusal(wanted: ReservationWanted, devices: Sequence[LabDevice]) -> str | None:
    """Why no inventory could serve a reservation (refused when asked: 400), or None.
    Devices that are bad or in maintenance count (an operator may bring them back)."""
    classes = {d.class_ for d in devices}
    if wanted.class_ is not None and wanted.class_ not in classes:
        known = ", ".join(sorted(classes)) or "none"
        return f"no device of class {wanted.class_!r} is in the lab (its classes: {known})"
    serving = [
        d for d in devices if d.health not in OUT_OF_SERVICE and reservation_matches(wanted, d)
    ]
    if len(serving) < wanted.count:
        what = f"of class {wanted.class_!r}" if wanted.class_ else "in the lab"
        if wanted.selector.match_labels or wanted.selector.match_expressions:
            what += f" matching {describe_selector(wanted.selector)}"
        return f"{wanted.count} device(s) asked for, but only {len(serving)} {what} are not retired"
    return None


def fits(job: QueuedJob, supervisor: Candidate) -> bool:
    """`plan`'s test of whether a job fits on a supervisor now (for job groups)."""
    return _fits(job, supervisor)


def copy_of(supervisor: Candidate) -> Candidate:
    """A copy whose slots and resources may be spent without touching the original."""
    return _own_copy(supervisor)
