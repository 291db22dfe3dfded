"""Test reports among runs' output files, parsed after the batch of events that listed them
is stored (never inside its transaction: the writer serves every supervisor), a few at a
time. Each report's status (pending, stored, refused with the reason) is kept with the
run's files, so a refused report is visible where the file is listed.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
from collections.abc import Iterable

from switchboard.artifact_blobs import ArtifactBlobs
from switchboard.models import PendingReport, ReportStatus
from switchboard.reports.ingest import store_report
from switchboard.reports.junit import MAX_REPORT_BYTES
from switchboard.store.base import Store

log = logging.getLogger("switchboard.reports")

#: Reports read and handed to the parser at once (it parses one at a time; this bounds
#: the report bytes held in memory while they wait).
CONCURRENCY = 2


class ReportQueue:
    def __init__(
        self, store: Store, artifacts: ArtifactBlobs, max_bytes: int = MAX_REPORT_BYTES
    ) -> None:
        self.store = store
        self.artifacts = artifacts
        self.max_bytes = max_bytes
        #: Reports waiting, oldest first; at most CONCURRENCY workers take them in turn
        #: (a backlog of thousands costs a list entry each, not a task each).
        self._pending: collections.deque[PendingReport] = collections.deque()
        self._workers: set[asyncio.Task[None]] = set()

    def submit(self, reports: Iterable[PendingReport]) -> None:
        """Parse and store these reports in the background."""
        self._pending.extend(reports)
        while self._pending and len(self._workers) < CONCURRENCY:
            # A context of its own: not the submitting connection's (store.fencing), whose
            # session fences that connection's writes only.
            task = asyncio.create_task(self._work(), name="reports", context=contextvars.Context())
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)

    async def drain(self) -> None:
        """Wait for every report submitted so far (tests, shutdown)."""
        while self._workers:
            await asyncio.gather(*list(self._workers), return_exceptions=True)

    def stop(self) -> None:
        self._pending.clear()  # still pending in the store: the next start takes them up
        for task in list(self._workers):
            task.cancel()

    async def _work(self) -> None:
        while self._pending:
            await self._ingest(self._pending.popleft())

    async def _ingest(self, report: PendingReport) -> None:
        try:
            data = await self._read(report.digest)
            status: ReportStatus = "refused"
            error: str | None = "its artifact is no longer stored"
            if data is not None:
                outcome = await store_report(
                    self.store,
                    report.job_id,
                    report.attempt,
                    report.path,
                    data,
                    max_bytes=self.max_bytes,
                )
                if outcome.refused is None:
                    status, error = "stored", None
                else:
                    error = outcome.refused
            await self.store.set_report_status(
                report.job_id, report.attempt, report.path, status, error
            )
        except Exception:  # one report must never stop the others
            log.exception("JUnit report %r of job %s failed", report.path, report.job_id)

    async def _read(self, digest: str) -> bytes | None:
        """The artifact's bytes, at most one past the cap (enough for the parser to refuse
        it as too large without holding a huge file in memory)."""
        file = await self.artifacts.open(digest)
        if file is None:
            return None
        with file:
            return await asyncio.to_thread(file.read, self.max_bytes + 1)
