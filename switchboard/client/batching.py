"""Natural batching of `run()` (as a database's group commit): calls that come while others
are in flight share requests, and no call waits for a batch to fill.

A call that finds no other run in flight submits and waits in one request, as alone. The
others join: their submissions wait in `Submissions` until no batch request is in flight,
then whoever finds it so sends all of them (up to 1000) as one `POST /api/v1/jobs/batch`;
their waits go as `GET /api/v1/jobs/ended?ids=...&wait=` in `Waits`: a call whose job no
request in flight names asks for it and for every other job none names (up to 500), with
at most a few such requests at once, so each answer (as soon as one of its jobs ended)
brings many jobs, and a call with a short job is not left behind others' long waits.

This module decides who sends what and what an answer settles; it does no I/O. The
blocking and the asyncio client each drive it under their own lock (switchboard.client.sync,
switchboard.client.aio)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

from switchboard.client.core import MAX_BATCH, MAX_WAIT_IDS, Deadline
from switchboard.client.errors import ApiError, ClientError, NotFound
from switchboard.models import JobView

#: Waiting requests in flight at once, beyond which a call whose job none names waits for
#: one to come back (most do within a job's run time)...
MOST_WAIT_REQUESTS = 4
#: ...or starts one anyway once the newest has been waiting this long (they wait for long
#: jobs): a short job is heard of at most this late, and there are never more waiting
#: requests than calls waiting.
PATIENCE_S = 0.1


class Alone:
    """A call's part went wrong for the whole batch (a refused batch, a job of the wait
    deleted, a switchboard without `/ended`): the call does it again by itself, so only
    its own request's answer is its."""

    def __repr__(self) -> str:
        return "ALONE"


ALONE = Alone()

#: What settles one part of a call: its job's id (submitted), the ended job (waited), an
#: error for it to raise, or ALONE.
Result = Union[str, JobView, ClientError, Alone]  # noqa: UP007 - a runtime alias


@dataclass(eq=False)
class Call:
    """One `run()` that joined others: its spec's JSON, its deadline, its job's id once
    submitted, what settled its current part (None: not yet), and how the client wakes
    it (its own condition or event: an answer wakes only the calls it concerns)."""

    body: bytes
    deadline: Deadline
    job_id: str = ""
    result: Result | None = None
    wake: Any = None

    def settled(self) -> Result | None:
        """Its result, taken (the next part starts unsettled)."""
        result, self.result = self.result, None
        return result


def batch_failed(exc: ClientError) -> ClientError | Alone:
    """What a failed batch submission means for each of its calls: refused by the
    switchboard (nothing of it stored: all or none) -> each submits alone, so only a bad
    spec's call is refused; a broken connection -> the error, as it would be alone."""
    return ALONE if isinstance(exc, ApiError) else exc


def wait_failed(exc: ClientError) -> ClientError | Alone:
    """What a failed wait request means for the calls it named: 404 (one of the jobs is
    gone, or the switchboard has no `/ended`) -> each waits alone; another refusal -> the
    error (each would have it alone: a revoked token)."""
    return ALONE if isinstance(exc, NotFound) else exc


class Submissions:
    """Calls waiting to be submitted, and whether a batch request is in flight."""

    def __init__(self) -> None:
        self.pending: list[Call] = []
        self.sending = False

    def add(self, call: Call) -> None:
        self.pending.append(call)

    def take(self) -> list[Call]:
        """The batch to send now (the oldest pending, up to 1000), or [] if one is in
        flight (its sender takes the rest when it is back) or none is pending."""
        if self.sending or not self.pending:
            return []
        batch, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
        self.sending = True
        return batch

    def sent(self, batch: list[Call], outcome: list[str] | ClientError | Alone) -> list[Call]:
        """The batch's answer: each call's job id (in order), or what befell all. The
        calls to wake: the batch's, and the oldest pending (it sends the next batch)."""
        self.sending = False
        if isinstance(outcome, list):
            for call, job_id in zip(batch, outcome, strict=True):
                call.job_id = job_id
                call.result = job_id
        else:
            for call in batch:
                call.result = outcome
        return batch + self.pending[:1]


class Waits:
    """Calls waiting for their jobs to end, which of those jobs a request in flight names,
    and when another request may start."""

    def __init__(self, most: int = MOST_WAIT_REQUESTS, patience_s: float = PATIENCE_S) -> None:
        self.most = most
        self.patience_s = patience_s
        self.waiting: dict[str, Call] = {}
        self.covered: set[str] = set()
        self.in_flight = 0
        self._newest = -math.inf

    def add(self, call: Call) -> None:
        self.waiting[call.job_id] = call

    def leave(self, call: Call) -> None:
        """The call stops waiting (settled, or its own deadline passed)."""
        if self.waiting.get(call.job_id) is call:
            del self.waiting[call.job_id]

    def take(self, call: Call, now: float) -> list[str]:
        """The ids `call` is to ask for now: its own, then others no request names (up to
        MAX_WAIT_IDS); [] if a request in flight names its job, or too many are in flight
        (then ask again after `retry_in`)."""
        if call.result is not None or call.job_id in self.covered:
            return []
        if self.in_flight >= self.most and now - self._newest < self.patience_s:
            return []
        others = (i for i in self.waiting if i not in self.covered and i != call.job_id)
        ids = [call.job_id]
        for job_id in others:
            if len(ids) >= MAX_WAIT_IDS:
                break
            ids.append(job_id)
        self.covered.update(ids)
        self.in_flight += 1
        self._newest = now
        return ids

    def retry_in(self, now: float) -> float | None:
        """Seconds until a call whose job no request names may start one (None: only once
        a request comes back)."""
        if self.in_flight < self.most:
            return None
        return max(0.0, self._newest + self.patience_s - now)

    def pause_s(self, deadline: Deadline, now: float) -> float | None:
        """How long a call that cannot ask now sleeps before looking again, unless woken
        by an answer (None: until woken)."""
        retry = self.retry_in(now)
        most = min(deadline.left(), math.inf if retry is None else retry)
        return None if most == math.inf else most

    def answered(
        self, ids: list[str], outcome: list[JobView] | ClientError | Alone | None
    ) -> list[Call]:
        """The request for `ids` is back: the ended jobs settle their calls (an error or
        ALONE settles all it named; None: nothing). The rest are named by none now: their
        calls ask again. The calls to wake: those settled, and those no request names
        (the first to look asks for all of them; the others find their job named)."""
        self.in_flight -= 1
        self.covered.difference_update(ids)
        woken = []
        if isinstance(outcome, list):
            for job in outcome:
                if (call := self.waiting.pop(job.id, None)) is not None:
                    call.result = job
                    woken.append(call)
        elif outcome is not None:
            for job_id in ids:
                if (call := self.waiting.pop(job_id, None)) is not None:
                    call.result = outcome
                    woken.append(call)
        return woken + [c for i, c in self.waiting.items() if i not in self.covered]
