"""The report queue: a backlog of reports waits as list entries, taken by at most
CONCURRENCY workers (never a task per report), and every report gets its status, even
one whose artifact is gone."""

from __future__ import annotations

import asyncio

import pytest

from protocol.messages import JobFiles, OutputFile
from protocol.spec import JobSpec, NoopBackend, Reports
from protocol.state import Phase
from switchboard.artifact_blobs import FileBlobs
from switchboard.artifacts import ArtifactFiles
from switchboard.reports.queue import CONCURRENCY, ReportQueue
from tests.store_setup import HELLO, state

pytestmark = pytest.mark.unit

SPEC = JobSpec(name="t", backend=NoopBackend(), reports=Reports(junit=["r/*.xml"]))


async def test_a_backlog_is_worked_by_a_few_workers(store, tmp_path):
    count = 300
    digests = [f"sha256:{i:064x}" for i in range(count)]
    for digest in digests:
        await store.add_artifact(digest, 10, None, None)  # indexed; the files are gone
    await store.create_job("j1", SPEC)
    await store.supervisor_connected(HELLO)
    await store.assign([("j1", "s1")])
    files = [OutputFile(path=f"r/{i}.xml", size=10, digest=d) for i, d in enumerate(digests)]
    applied = await store.apply_events(
        "s1",
        [
            state(1, Phase.RUNNING),
            JobFiles(seq=2, job_id="j1", attempt=1, files=files),
            state(3, Phase.SUCCEEDED),
        ],
    )
    assert len(applied.reports) == count
    queue = ReportQueue(store, FileBlobs(store, ArtifactFiles(tmp_path / "artifacts")))
    most = 0
    before = len(asyncio.all_tasks())
    queue.submit(applied.reports)
    while queue._workers:
        most = max(most, len(asyncio.all_tasks()) - before)
        await asyncio.sleep(0)
    await queue.drain()
    assert 1 <= most <= CONCURRENCY
    listing = await store.run_files("j1")
    assert listing is not None
    assert {f.report for f in listing.files} == {"refused"}
    assert all(f.report_error == "its artifact is no longer stored" for f in listing.files)
    assert await store.pending_reports() == []
