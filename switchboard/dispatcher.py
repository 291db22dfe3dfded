"""The loop that places queued jobs on connected supervisors.

It wakes on events (a job submitted, a run ended, a supervisor connected, drained or
resumed, dispatch resumed) and on a slow timer as a safety net; each pass asks the pure
scheduler for decisions, records them in one transaction, then sends the StartJobs.

A pass also notes, for jobs it could not place, whether any registered supervisor could
*ever* run them, so a job whose selector matches nothing says so instead of waiting
silently. That check reruns only when the fleet changes or new jobs arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import NamedTuple

from protocol.messages import StopJob
from protocol.spec import JobSpec
from protocol.versions import minor_of
from switchboard import gangs, metrics
from switchboard.hub import Hub
from switchboard.models import Assignment, QueuedJob, Submitted, SupervisorView
from switchboard.scheduler import (
    Candidate,
    FleetMember,
    LabDevice,
    by_load,
    copy_of,
    in_service_devices,
    place_one,
    plan,
    remaining,
    spend,
    unsatisfiable_reason,
)
from switchboard.store.base import Store

log = logging.getLogger("switchboard.dispatcher")

#: Queued jobs read at a time, and the most pages of them one pass reads.
QUEUE_WINDOW = 1000
MAX_WINDOWS = 20
#: A pass's first page holds this many queued jobs per free slot (at least MIN_FIRST_PAGE):
#: most passes place a few jobs, and every job read costs a decoded spec and a place in
#: the plan. Later pages, read only while slots remain, hold QUEUE_WINDOW.
FIRST_PAGE_PER_SLOT = 4
MIN_FIRST_PAGE = 32
#: At least this often a pass reads a whole window anyway: the queue is read in priority
#: order, and an old low-priority job that aging has lifted must be seen to be placed.
WIDE_PASS_EVERY_S = 1.0
#: How often a pass looks for job groups when it knows of none open.
GROUPS_LOOK_EVERY_S = 5.0
#: Safety-net period between passes when nothing wakes the dispatcher.
IDLE_PERIOD_S = 5.0
#: The same on a store replicas share (Store.shared): what another replica does may free
#: a place for a job here without a hint (a job requeued, or a chained one resolved, by
#: it; a board its sweeps bring back or release; a note of its cleared), and each replica
#: places only on its own supervisors, so none must wait for the others to be woken.
SHARED_IDLE_PERIOD_S = 1.0


class PassDone(NamedTuple):
    """What a dispatch pass did, and what it tells the loop."""

    started: int
    #: It stopped at MAX_WINDOWS with slots left: run another.
    more: bool = False
    #: When the earliest restart backoff ends (wake then, if nothing sooner).
    backoff_end: float | None = None


class _Spare(NamedTuple):
    """What the last placement left free: supervisors with a free slot (as Candidates,
    sorted by `by_load`) and the busy concurrency keys, as of `writes`
    (Store.supervisor_writes). Only ever an underestimate of what is free while `writes`
    holds: runs ending free more, and only the dispatcher takes slots."""

    writes: int
    free: list[Candidate]
    busy: frozenset[str]


class Dispatcher:
    def __init__(self, store: Store, hub: Hub, *, aging_s: float = 60.0) -> None:
        self.store = store
        self.hub = hub
        self.aging_s = aging_s
        self.paused = False
        #: True while `run` is looping (readiness).
        self.running = False
        self._wake = asyncio.Event()
        #: job id -> the fleet key it was last checked against (for `unschedulable`).
        self._checked: dict[str, tuple] = {}
        #: The fleet the last pass saw: when it changes, jobs marked unschedulable are
        #: checked again (they are left out of the queue's pages until then).
        self._last_fleet: tuple | None = None
        #: The fleet's key and the supervisor_writes it was computed at (see _fleet_key).
        self._key: tuple = ()
        self._key_writes = -1
        self._new_jobs = False
        #: Held while jobs are being placed (a pass, or new jobs placed at submission), so
        #: only one placement at a time spends the free slots it saw.
        self._placing = asyncio.Lock()
        self._spare: _Spare | None = None
        self._next_wide_pass = 0.0
        #: Chained jobs may be waiting for others to end: each pass sweeps them
        #: (switchboard.chains) until a sweep finds none. True at start: the store may
        #: hold some from before a restart.
        self._chains_waiting = True
        #: Job groups may be open (waiting to be placed, or running): each pass places
        #: and sweeps them until a sweep finds none. True at start, as for chains.
        self._groups_open = True
        self._next_groups_look = 0.0
        hub.on_capacity_change(self.wake)

    def wake(self) -> None:
        self._wake.set()

    def jobs_submitted(self) -> None:
        """New jobs are queued: place them, or say why they can never be placed."""
        self._new_jobs = True
        self._wake.set()

    async def submit(
        self,
        jobs: list[tuple[str, JobSpec]],
        actor: str,
        max_queued: int,
        *,
        owner: str | None = None,
        max_queued_per_owner: int | None = None,
    ) -> list[Submitted]:
        """Queue new jobs owned by token `owner` (all or none; QueueFull if the queue is
        full, QueueQuotaFull if `owner` has its most queued already). When no other job
        waits and the slots the last placement left free fit them, they are placed in the
        same transaction and started at once, as the next pass would have placed them: a
        job submitted to an idle switchboard starts without waiting for a pass."""
        chained = any(spec.chained_inputs() for _, spec in jobs)
        if not chained and self._may_place_now():
            # Its own task, awaited shielded: once the jobs are stored with their runs,
            # the runs are started even if the request goes away meanwhile.
            placed = asyncio.ensure_future(
                self._store_and_start(jobs, actor, max_queued, owner, max_queued_per_owner)
            )
            made = await asyncio.shield(placed)
            if made is not None:
                return made
        made = await self.store.create_jobs(
            jobs, actor, max_queued, owner=owner, max_queued_per_owner=max_queued_per_owner
        )
        if chained:
            self._chains_waiting = True  # the passes sweep them until none waits
        self.jobs_submitted()
        return made

    def _may_place_now(self) -> bool:
        # A pass or another placement under way: leave the jobs to the pass.
        return not self._placing.locked() and self._may_place()

    async def _store_and_start(
        self,
        jobs: list[tuple[str, JobSpec]],
        actor: str,
        max_queued: int,
        owner: str | None,
        max_queued_per_owner: int | None,
    ) -> list[Submitted] | None:
        """Store the jobs with runs on the spare slots that fit them and start those runs;
        None (nothing stored) if none fits."""
        async with self._placing:
            # Decided holding the lock: what it left free is what the last holder left.
            placements = self._placements_now(jobs) if self._may_place() else {}
            if not placements:
                return None
            made, assigned = await self.store.create_and_assign(
                jobs,
                actor,
                max_queued,
                placements,
                owner=owner,
                max_queued_per_owner=max_queued_per_owner,
            )
            self._spend(assigned)
        metrics.RUNS_PLACED.labels("submission").inc(len(assigned))
        await self.hub.start_runs(assigned)
        if len(assigned) < sum(1 for m in made if m.phase == "queued"):
            self.jobs_submitted()  # some wait: the pass places them or says why not
        return made

    def _may_place(self) -> bool:
        """Placing at submission is allowed, and the spare slots are still current."""
        spare = self._spare
        current = spare is not None and spare.writes == self.store.supervisor_writes
        return current and not self.paused

    def _placements_now(self, jobs: list[tuple[str, JobSpec]]) -> dict[str, str]:
        """job id -> supervisor id for the new jobs that fit the spare slots now (the
        caller holds `_placing` and has checked the spare is current)."""
        spare = self._spare
        assert spare is not None
        is_ready = self.hub.is_ready
        # Still connected and ready: looked at lazily, so placing one job usually looks
        # at one supervisor however large the fleet.
        free = (c for c in spare.free if is_ready(c.id))
        now = time.time()
        queued = [_as_queued(i, job_id, spec, now) for i, (job_id, spec) in enumerate(jobs)]
        if len(queued) == 1:
            where = place_one(queued[0], free, spare.busy)
            return {} if where is None else {queued[0].id: where}
        return dict(plan(queued, list(free), now=now, aging_s=self.aging_s, busy_keys=spare.busy))

    def _spend(self, assigned: list[Assignment]) -> None:
        """Take what the runs just assigned hold out of the spare slots (the spare's
        Candidates are the dispatcher's own copies: changed in place)."""
        spare = self._spare
        if spare is None or not assigned:
            return
        by_id = {c.id: c for c in spare.free}
        for run in assigned:
            if (candidate := by_id.get(run.supervisor_id)) is not None:
                spend(candidate, run.spec)
        keys = {a.spec.concurrency.key for a in assigned if a.spec.concurrency is not None}
        free = sorted((c for c in spare.free if c.free > 0), key=by_load)
        self._spare = _Spare(spare.writes, free, spare.busy | keys)

    async def set_paused(self, paused: bool) -> None:
        """Pause or resume placing jobs (runs already placed go on); survives restarts."""
        await self.store.set_dispatch_paused(paused)
        self.paused = paused
        self.wake()

    async def run(self) -> None:
        self.paused = await self.store.dispatch_paused()
        self.running = True
        try:
            await self._loop()
        finally:
            self.running = False

    async def _loop(self) -> None:
        idle = SHARED_IDLE_PERIOD_S if self.store.shared else IDLE_PERIOD_S
        pause = idle
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), pause)
            self._wake.clear()
            try:
                pause = idle
                async with self._placing:
                    done = await self.dispatch_once()
                if done.more:
                    self.wake()  # slots remain for jobs past this pass's pages
                elif done.backoff_end is not None:
                    # Wake again when the next restart backoff ends, if that is sooner.
                    pause = min(pause, max(0.0, done.backoff_end - time.time()) + 0.001)
            except Exception:  # keep dispatching; the next pass retries
                log.exception("dispatch pass failed")

    async def dispatch_once(self) -> PassDone:
        """One pass. The caller holds `_placing`."""
        self._spare = None
        # Open groups are swept every pass; when none is known, a look now and then (a
        # group may have been submitted through another replica).
        if self._groups_open or time.monotonic() >= self._next_groups_look:
            self._next_groups_look = time.monotonic() + GROUPS_LOOK_EVERY_S
            await self._sweep_groups()
        if self.paused:
            return PassDone(0)  # resuming wakes the dispatcher
        if self._chains_waiting:
            await self._sweep_chains()
        ready = self.hub.ready_ids()
        news = self._new_jobs
        self._new_jobs = False
        # Writes counted before the read are visible to it: the key computed from this
        # snapshot's fleet is valid for them (a later write makes the next pass recompute).
        writes = self.store.supervisor_writes
        fleet_may_change = writes != self._key_writes
        wide = time.monotonic() >= self._next_wide_pass

        def first_page(fleet: list[SupervisorView]) -> int:
            free = sum(
                max(0, s.max_jobs - s.running) for s in fleet if s.id in ready and not s.drained
            )
            if free == 0:
                # Nothing to place: read the queue only to say which new jobs can never run.
                return QUEUE_WINDOW if news or fleet_may_change else 0
            if wide:
                return QUEUE_WINDOW
            return min(QUEUE_WINDOW, max(MIN_FIRST_PAGE, FIRST_PAGE_PER_SLOT * free))

        snapshot = await self.store.placement_snapshot(first_page)
        if wide:
            self._next_wide_pass = time.monotonic() + WIDE_PASS_EVERY_S
        fleet = snapshot.fleet
        key = self._fleet_key(fleet, writes, snapshot.lab)
        fleet_changed = key is not self._last_fleet
        candidates = _candidates(
            fleet,
            ready,
            snapshot.resources_in_use,
            snapshot.devices_free,
            snapshot.checks,
            snapshot.devices_reserved,
            snapshot.lab,
        )
        if self._groups_open:
            # A group may take hosts connected to other replicas too (their StartJobs go
            # there as commands); what is left here places the single jobs.
            elsewhere = {s.id for s in fleet if s.connected and not self.hub.holds(s.id)}
            hosts = candidates
            if elsewhere and self.store.shared:
                hosts = _candidates(
                    fleet,
                    ready | elsewhere,
                    snapshot.resources_in_use,
                    snapshot.devices_free,
                    snapshot.checks,
                    snapshot.devices_reserved,
                    snapshot.lab,
                )
            if hosts:
                left = await self._place_groups(hosts, snapshot.busy_keys)
                candidates = [c for c in left if c.id in ready]
        if not candidates and not news and not fleet_changed:
            self._spare = _Spare(writes, [], snapshot.busy_keys)
            return PassDone(0, backoff_end=snapshot.next_backoff_end)
        waiting: list[QueuedJob] = []
        if fleet_changed:
            # Jobs nobody could run may have found a taker: look at them again.
            waiting += await self.store.queued_jobs(QUEUE_WINDOW * MAX_WINDOWS, marked=True)
        decisions: list[tuple[str, str]] = []
        busy = set(snapshot.busy_keys)
        jobs, limit, read, more = snapshot.queue, first_page(fleet), 0, False
        # Page through the queue while slots remain, so jobs that fit nowhere now never
        # hide the ones behind them, however many there are (up to MAX_WINDOWS windows).
        while True:
            read += len(jobs)
            placed = []
            if candidates:
                placed = plan(
                    jobs, candidates, now=time.time(), aging_s=self.aging_s, busy_keys=busy
                )
            decisions += placed
            chosen = {job_id for job_id, _ in placed}
            waiting += [j for j in jobs if j.id not in chosen]
            candidates = [c for c in remaining(candidates, jobs, placed) if c.free > 0]
            busy |= {j.concurrency_key for j in jobs if j.id in chosen and j.concurrency_key}
            if len(jobs) < limit or not candidates:
                break  # the end of the queue, or of the free slots
            if read >= QUEUE_WINDOW * MAX_WINDOWS:
                more = True
                break
            limit = QUEUE_WINDOW
            jobs = await self.store.queued_jobs(limit, after=(jobs[-1].priority, jobs[-1].seq))
        self._spare = _Spare(writes, sorted(candidates, key=by_load), frozenset(busy))
        await self._note_unschedulable(waiting, fleet, key, snapshot.lab)
        started = await self.store.assign(decisions) if decisions else []
        metrics.RUNS_PLACED.labels("pass").inc(len(started))
        await self.hub.start_runs(started)
        return PassDone(len(started), more, snapshot.next_backoff_end)

    def groups_submitted(self) -> None:
        """A job group is queued: place it when all its roles fit at once."""
        self._groups_open = True
        self._wake.set()

    async def _sweep_groups(self) -> None:
        """Stop the groups an essential role of which ended without succeeding (their
        other roles' runs are stopped)."""
        swept = await self.store.sweep_groups()
        self._groups_open = swept.open
        for run in swept.stops:
            stop = StopJob(job_id=run.job_id, attempt=run.attempt, reason="canceled")
            self.hub.send_stop(run.supervisor_id, stop)
        if swept.stopped:
            metrics.GROUPS_STOPPED.inc(len(swept.stopped))

    async def _place_groups(
        self, candidates: list[Candidate], busy: frozenset[str]
    ) -> list[Candidate]:
        """Place the waiting groups that fit now, each all or none (gangs.fit_group, then
        one transaction), before the queue of single jobs; the candidates less what they
        took. On a store replicas share, the candidates include supervisors connected to
        other replicas: the StartJobs of runs placed there go to those replicas as commands
        (written in the placement's transaction)."""
        pool = {c.id: copy_of(c) for c in candidates}
        started: list[Assignment] = []
        for group_id, roles in await self.store.waiting_groups():
            pairs = gangs.fit_group(roles, list(pool.values()), busy) if roles else None
            if pairs is None:
                continue
            assigned = await self.store.assign_group(group_id, pairs)
            for run in assigned:
                spend(pool[run.supervisor_id], run.spec)
            if assigned:
                log.info("group %s placed: %d run(s)", group_id, len(assigned))
            started += assigned
        if started:
            metrics.RUNS_PLACED.labels("group").inc(len(started))
            elsewhere = sum(1 for run in started if not self.hub.holds(run.supervisor_id))
            metrics.SUPERVISOR_COMMANDS.labels("start", "queued").inc(elsewhere)
            await self.hub.start_runs(r for r in started if self.hub.holds(r.supervisor_id))
        return [c for c in pool.values() if c.free > 0]

    async def _sweep_chains(self) -> None:
        """Resolve the chained jobs whose awaited jobs have ended: the resolved join the
        queue (as new jobs: this pass places them or says why it can't)."""
        swept = await self.store.resolve_chains()
        self._chains_waiting = swept.waiting > 0
        if swept.resolved:
            self._new_jobs = True
        metrics.CHAINED_JOBS.labels("resolved").inc(swept.resolved)
        metrics.CHAINED_JOBS.labels("rejected").inc(swept.rejected)
        if swept.rejected:
            log.info("%d chained job(s) rejected: an input they name never came", swept.rejected)

    def _fleet_key(
        self, fleet: list[SupervisorView], writes: int, lab: list[LabDevice] | None = None
    ) -> tuple:
        """What of the fleet decides whether a job could ever run (its devices in service
        among it), recomputed only after a supervisor write; an unchanged fleet keeps the
        same key object (compared by `is`)."""
        if writes != self._key_writes:
            devices = in_service_devices(lab or ())
            key = tuple(
                (
                    s.id,
                    tuple(sorted(s.labels.items())),
                    tuple(s.backends),
                    tuple(s.resources.items()),
                    tuple(sorted(devices.get(s.id, {}).items())),
                    s.protocol,
                )
                for s in fleet
            )
            if key != self._key:
                self._key = key
            self._key_writes = writes
        return self._key

    async def _note_unschedulable(
        self,
        waiting: list[QueuedJob],
        fleet: list[SupervisorView],
        key: tuple,
        lab: list[LabDevice] | None = None,
    ) -> None:
        """Say on each waiting job whether no registered supervisor could ever run it. Of
        a class a supervisor declares devices of, it offers its devices not retired (as
        placement counts them), whatever its hello's resources say."""
        self._last_fleet = key
        members: list[FleetMember] | None = None
        reasons: dict[str, str | None] = {}
        for job in waiting:
            if self._checked.get(job.id) is key:
                continue
            self._checked[job.id] = key
            if members is None:
                devices = in_service_devices(lab or ())
                members = [
                    FleetMember(
                        id=s.id,
                        backends=s.backends,
                        labels=s.labels,
                        resources={**s.resources, **devices.get(s.id, {})},
                        max_jobs=s.max_jobs,
                        minor=minor_of(s.protocol),
                    )
                    for s in fleet
                ]
            reason = unsatisfiable_reason(job.spec, members)
            if reason != job.unschedulable:  # written on change only (it is a job change)
                reasons[job.id] = reason
        if len(self._checked) > 2 * QUEUE_WINDOW * MAX_WINDOWS:  # forget jobs that left
            waiting_ids = {j.id for j in waiting}
            self._checked = {k: v for k, v in self._checked.items() if k in waiting_ids}
        if reasons:
            await self.store.set_unschedulable(reasons)


def _candidates(
    fleet: list[SupervisorView],
    ready: set[str],
    in_use: dict[str, dict[str, int]],
    devices_free: dict[str, dict[str, int]],
    checks: dict[str, frozenset[str]],
    reserved: dict[str, dict[str, dict[str, int]]] | None = None,
    lab: list[LabDevice] | None = None,
) -> list[Candidate]:
    """Connected, undrained supervisors with a free slot, and what they have free now: of
    a device class it declares, the devices that may be given a run now (healthy, not
    held, not reserved; those a reservation holds, for the jobs naming it); of other
    resources, its hello's count less what its active runs hold."""
    candidates = []
    by_host: dict[str, list[LabDevice]] = {}
    for device in lab or ():
        by_host.setdefault(device.supervisor_id, []).append(device)
    for s in fleet:
        if s.id not in ready or s.drained or s.running >= s.max_jobs:
            continue
        held = in_use.get(s.id, {})
        resources = {k: n - held.get(k, 0) for k, n in s.resources.items()}
        resources.update(devices_free.get(s.id, {}))
        candidates.append(
            Candidate(
                id=s.id,
                backends=s.backends,
                labels=s.labels,
                free=s.max_jobs - s.running,
                resources=resources,
                running=s.running,
                minor=minor_of(s.protocol),
                checks=checks.get(s.id, frozenset()),
                reserved=(reserved or {}).get(s.id, {}),
                lab=by_host.get(s.id, []),
            )
        )
    return candidates


def _as_queued(seq: int, job_id: str, spec: JobSpec, now: float) -> QueuedJob:
    """A job about to be stored, as the scheduler sees a queued one."""
    key = spec.concurrency.key if spec.concurrency is not None else None
    return QueuedJob(job_id, seq, spec.priority, spec, now, key)
