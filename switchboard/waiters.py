"""Requests waiting for jobs to end (`?wait=` on the jobs API): a registry of futures by job
id, and one loop per switchboard process that wakes them.

The loop reads the store's job change log (filled by triggers, so no code path that ends
a job can forget to tell) after each write, and looks up only the changed jobs someone
waits for. A waiter costs a future and one timer (its request's deadline), never a task
or a poll of its own; the work of a pass grows with the jobs that changed, not with the
requests waiting. With nobody waiting the loop sleeps and reads nothing.

A request registers before it reads the job, then waits: an ending stored after that read
is in the change log past the loop's mark, or, if the loop was idle, found by the look at
every waited-for job the loop takes when it starts watching again. A wake carries the
jobs the pass found ended, each read as GET /api/v1/jobs/{id} shows it in the same read
as the change log (one read for every request woken, none of its own); a wake without
its job (deleted, found by the look, shutdown) is a hint: the request reads the job
again and answers with what it finds.

On shutdown every waiter is woken at once (and later ones do not wait), so each request
answers with the job's current state before the server closes its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping

from protocol.state import TERMINAL
from switchboard import metrics
from switchboard.changes import Changes
from switchboard.models import JobChange, JobFilter, JobView
from switchboard.store.base import Store

log = logging.getLogger("switchboard.waiters")

#: Jobs one request may wait for (GET /api/v1/jobs?ids=...&wait=).
MAX_WAIT_IDS = 500
#: With waiters, the change log is read at least this often (an ending stored by another
#: process signals no write here).
POLL_S = 1.0
#: Changes read per pass, and jobs looked up per store query.
CHANGES_PER_PASS = 2000
LOOKUP_CHUNK = 500

_TERMINAL = sorted(p.value for p in TERMINAL)

#: What a wake carries: the jobs found ended, by id (maybe not all a request waits for,
#: maybe none).
Ended = Mapping[str, JobView]
_NOTHING: Ended = {}


class JobWaiters:
    def __init__(self, store: Store, changes: Changes) -> None:
        self.store = store
        self.changes = changes
        self._waiting: dict[str, set[asyncio.Future[Ended]]] = {}
        self._count = 0
        #: The last change the loop read; None while it watches nothing.
        self._rev: int | None = None
        self._wanted = asyncio.Event()
        self.closed = False
        #: Jobs writes found ended since the last wake they gave (see found_ended).
        self._found: dict[str, JobView] = {}

    @property
    def count(self) -> int:
        """Requests waiting now."""
        return self._count

    @contextlib.contextmanager
    def registered(self, job_ids: Iterable[str]) -> Iterator[asyncio.Future[Ended]]:
        """A future that is done once one of the jobs may have ended (with those found
        ended, see `Ended`), or on shutdown. Register, then read the jobs, then await it
        (bounded by the request's wait)."""
        future: asyncio.Future[Ended] = asyncio.get_running_loop().create_future()
        ids = list(dict.fromkeys(job_ids))
        if self.closed:
            future.set_result(_NOTHING)
        for job_id in ids:
            self._waiting.setdefault(job_id, set()).add(future)
        self._count += 1
        metrics.JOB_WAITERS.set(self._count)
        self._wanted.set()
        try:
            yield future
        finally:
            self._count -= 1
            metrics.JOB_WAITERS.set(self._count)
            for job_id in ids:
                futures = self._waiting.get(job_id)
                if futures is not None:
                    futures.discard(future)
                    if not futures:
                        del self._waiting[job_id]

    async def wait(self, future: asyncio.Future[Ended], timeout_s: float) -> Ended:
        """Until `future` is done or `timeout_s` passed (one timer, no task): the jobs
        the wake carried (none if it timed out). The future is left as it is, so it may
        be waited for again."""
        if timeout_s > 0 and not future.done():
            await asyncio.wait([future], timeout=timeout_s)
        return future.result() if future.done() else _NOTHING

    def close(self) -> None:
        """The server is stopping: every waiter answers now, later ones at once."""
        self.closed = True
        for futures in self._waiting.values():
            for future in futures:
                if not future.done():
                    future.set_result(_NOTHING)

    def is_waited(self, job_id: str) -> bool:
        """Whether a request waits for the job (a dict lookup: safe from the store's
        writer thread, which asks while it stores events)."""
        return job_id in self._waiting

    def found_ended(self, jobs: list[JobView]) -> None:
        """Jobs that a write just stored as ended, read by it: their waiters answer with
        them (the pass over the change log that follows finds them answered). Woken on
        the loop's next turn, with those of the other writes committed in the same group
        (their acknowledgements run in one turn): a request waiting for many jobs answers
        once with all of them, not once per supervisor's batch."""
        if not self._found:
            asyncio.get_running_loop().call_soon(self._wake_found)
        self._found.update((job.id, job) for job in jobs)

    def _wake_found(self) -> None:
        found, self._found = self._found, {}
        self._wake(found, found)

    def _unanswered(self) -> frozenset[str]:
        """The jobs some request still waits for (not woken yet)."""
        return frozenset(
            job_id
            for job_id, futures in self._waiting.items()
            if any(not future.done() for future in futures)
        )

    def _wake(self, job_ids: Iterable[str], ended: Ended = _NOTHING) -> None:
        """Wake the requests waiting for any of the jobs; each gets `ended` (those of
        them it waits for are what it answers with)."""
        for job_id in job_ids:
            for future in self._waiting.get(job_id, ()):
                if not future.done():
                    future.set_result(ended)

    async def run(self) -> None:
        seen = self.changes.count
        while True:
            if not self._waiting:
                self._rev = None  # watch nothing; the next waiter restarts the watch
                self._wanted.clear()
                await self._wanted.wait()
            else:
                await self.changes.wait(seen, POLL_S)
            seen = self.changes.count
            try:
                await self._pass()
            except Exception:  # keep waking; the next pass retries
                log.exception("waking job waiters failed")
                await asyncio.sleep(POLL_S)

    async def _pass(self) -> None:
        # The mark moves only once the pass is done: a pass that fails is read again.
        if self._rev is None:
            # (Re)starting the watch: the mark first, then a look at every waited-for
            # job, so an ending stored before the mark is seen by the look, later by the log.
            rev = await self.store.latest_job_change()
            candidates = list(self._waiting)
        else:
            # The changes and the waited-for jobs among them that ended, in one read: who
            # waits is taken now; those who come while it reads are looked up after it,
            # else an ending read here would pass them by.
            # (A job whose waiters are all answered, by a write that ended it, is not read
            # again: they leave once their handlers run.)
            after, wanted = self._rev, self._unanswered()

            def among(changes: list[JobChange]) -> list[str]:
                if changes[0].rev > after + 1:  # the log was pruned past the mark
                    return list(wanted)
                return list({c.job_id for c in changes if c.job_id in wanted})

            changes, ended = await self.store.ended_among_changes(after, CHANGES_PER_PASS, among)
            if not changes:
                return
            by_id = {job.id: job for job in ended}
            self._wake(by_id, by_id)
            # A deleted job's request answers 404 (or leaves it out of a list).
            self._wake({c.job_id for c in changes if c.deleted})
            rev = changes[-1].rev
            # Waiters that came during the read, for jobs among the changes: looked up now.
            unanswered = self._unanswered()
            candidates = list(
                {c.job_id for c in changes if c.job_id in unanswered and c.job_id not in wanted}
            )
        for start in range(0, len(candidates), LOOKUP_CHUNK):
            chunk = candidates[start : start + LOOKUP_CHUNK]
            where = JobFilter(phases=_TERMINAL, ids=chunk, limit=len(chunk))
            listed = await self.store.list_jobs(where)
            self._wake(summary.id for _, summary in listed)
        self._rev = rev
