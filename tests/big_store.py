"""A data dir as a big lab leaves it: many supervisors (disconnected now) and many queued
jobs, written straight into the store before a switchboard starts on it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from protocol.messages import Hello
from protocol.spec import JobSpec
from switchboard.config import Settings
from switchboard.store.sqlite import SQLiteStore
from tests.harness import Switchboard

BATCH = 1000


async def _seed(path: Path, supervisors: int, jobs: Sequence[tuple[str, JobSpec]]) -> None:
    store = SQLiteStore(path)
    await store.open()
    try:
        for n in range(supervisors):
            hello = Hello(
                supervisor_id=f"host-{n:03d}",
                name=f"host-{n:03d}",
                versions=["1.0"],
                backends=["noop"],
                labels={"rack": str(n % 20)},
            )
            await store.supervisor_connected(hello)
        await store.forget_connections()
        for start in range(0, len(jobs), BATCH):
            await store.create_jobs(jobs[start : start + BATCH], "seed", max_queued=len(jobs))
    finally:
        await store.close()


def big_switchboard(
    data_dir: Path, supervisors: int, jobs: Sequence[tuple[str, JobSpec]]
) -> Switchboard:
    """A switchboard started on `data_dir` after seeding it with supervisors host-000... and
    `jobs` (id, spec), all queued."""
    data_dir.mkdir(parents=True, exist_ok=True)
    # On a thread of its own: the caller may hold an event loop (Playwright's sync API does).
    with ThreadPoolExecutor(1) as pool:
        path = Settings(data_dir=data_dir).database_path
        pool.submit(asyncio.run, _seed(path, supervisors, jobs)).result()
    return Switchboard(data_dir)
