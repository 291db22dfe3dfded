"""Retention: what the switchboard forgets, so that its data dir does not grow without end.

Every --retention-interval, one sweep:

1. deletes the ended jobs (with their runs, output and events) that ended longer than
   --retain-jobs ago;
2. while the output all runs store together exceeds --max-output-bytes, removes the output
   of the ended jobs that ended first, a whole job at a time (the job's record stays, and its
   events say the output was removed). Output of runs still active is never touched;
3. deletes the artifacts (index and bytes) that no queued or running job names and that
   nobody has uploaded or named in a job for --retain-artifacts, and the temporary files
   of uploads a crash cut short.

The store does the work in short write transactions (at most OUTPUT_ROWS_PER_WRITE pieces of
output, or one job's remaining rows, each), so supervisors' events and submissions are
stored in between: the one writer is never held long.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from switchboard import metrics
from switchboard.artifact_blobs import ArtifactBlobs
from switchboard.config import Settings
from switchboard.store.base import Store
from switchboard.store.fencing import Fenced

log = logging.getLogger("switchboard.retention")

#: Stored pieces of output (each at most 256 KiB) one write transaction deletes.
OUTPUT_ROWS_PER_WRITE = 64
#: Jobs read per query while sweeping.
JOBS_PER_READ = 100


@dataclass
class Swept:
    """What one sweep removed."""

    jobs: int = 0
    outputs: int = 0
    output_bytes: int = 0
    artifacts: int = 0


class Retention:
    def __init__(self, store: Store, blobs: ArtifactBlobs, settings: Settings) -> None:
        self.store = store
        self.blobs = blobs
        self.settings = settings
        #: The output cap can't be met (active runs hold more): said once, not every sweep.
        self._told_over_cap = False

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.retention_interval_s)
            try:
                await self.sweep()
            except Fenced:  # another replica leads now: this work stops (store.fencing)
                return
            except Exception:  # keep sweeping; the next pass retries
                log.exception("retention sweep failed")

    async def sweep(self) -> Swept:
        swept = Swept()
        if self.settings.retain_jobs_s > 0:
            await self._expire_jobs(time.time() - self.settings.retain_jobs_s, swept)
        stored = await self.store.stored_output_bytes()
        if self.settings.max_output_bytes > 0 and stored > self.settings.max_output_bytes:
            stored -= await self._trim_output(stored, swept)
        metrics.STORED_BYTES.labels("output").set(stored)
        if self.settings.retain_artifacts_s > 0:
            await self._expire_artifacts(time.time() - self.settings.retain_artifacts_s, swept)
        self.blobs.files.remove_stale_uploads()
        metrics.STORED_BYTES.labels("artifact").set(await self.store.stored_artifact_bytes())
        if swept.artifacts:
            log.info(
                "retention: deleted %d artifacts no job named for %s",
                swept.artifacts,
                _days(self.settings.retain_artifacts_s),
            )
        if swept.jobs or swept.outputs:
            log.info(
                "retention: deleted %d jobs ended over %s ago; removed the output of %d jobs"
                " (%d bytes) to keep all output under %d bytes",
                swept.jobs,
                _days(self.settings.retain_jobs_s),
                swept.outputs,
                swept.output_bytes,
                self.settings.max_output_bytes,
            )
        return swept

    async def _expire_jobs(self, ended_before: float, swept: Swept) -> None:
        while jobs := await self.store.ended_jobs(ended_before=ended_before, limit=JOBS_PER_READ):
            deleted = 0
            for job_id in jobs:
                while await self.store.drop_output(job_id, OUTPUT_ROWS_PER_WRITE):
                    pass
                if await self.store.delete_job(job_id) == "deleted":
                    deleted += 1
                    metrics.RETENTION_REMOVED.labels("job").inc()
            swept.jobs += deleted
            if not deleted:
                return  # none of these may go yet (a run still active): the next sweep

    async def _expire_artifacts(self, unused_before: float, swept: Swept) -> None:
        while digests := await self.store.unused_artifacts(unused_before, JOBS_PER_READ):
            deleted = 0
            for digest in digests:
                # Checked again where submissions are stored: a job naming it since wins.
                found = await self.store.delete_artifact(digest, unused_before=unused_before)
                if found.outcome == "deleted":
                    await self.blobs.forget(digest)
                    deleted += 1
                    metrics.RETENTION_REMOVED.labels("artifact").inc()
            swept.artifacts += deleted
            if not deleted:
                return

    async def _trim_output(self, stored: int, swept: Swept) -> int:
        """Remove the output of the ended jobs that ended first until what is stored fits
        under the cap; return the bytes freed."""
        cap = self.settings.max_output_bytes
        reason = f"output removed: all jobs' output together exceeded {cap} bytes"
        freed = 0
        while stored - freed > cap:
            jobs = await self.store.ended_jobs(with_output=True, limit=JOBS_PER_READ)
            if not jobs:
                if not self._told_over_cap:
                    log.warning(
                        "retention: %d bytes of output stored, over the cap of %d, all of it"
                        " held by runs still active",
                        stored - freed,
                        cap,
                    )
                    self._told_over_cap = True
                return freed
            before = freed
            for job_id in jobs:
                job_freed = 0
                while step := await self.store.drop_output(job_id, OUTPUT_ROWS_PER_WRITE, reason):
                    job_freed += step
                if job_freed:
                    freed += job_freed
                    swept.outputs += 1
                    swept.output_bytes += job_freed
                    metrics.RETENTION_REMOVED.labels("output").inc()
                if stored - freed <= cap:
                    break
            if freed == before:
                break  # nothing of these could go: the next sweep
        self._told_over_cap = False
        return freed


def _days(seconds: float) -> str:
    return f"{seconds / 86400:g} days" if seconds >= 86400 else f"{seconds:g}s"
