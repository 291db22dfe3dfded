"""What store tests start from: a noop spec, supervisor s1's Hello, a job assigned to it,
short builders of the events a supervisor sends, and the database of a data dir the
previous release made. (The `store` fixture, an SQLite store on disk, is in conftest.py.)"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from protocol.messages import Hello, JobStateChanged, Output
from protocol.spec import JobSpec, NoopBackend

SPEC = JobSpec(name="t", backend=NoopBackend())
FIXTURES = Path(__file__).parent / "fixtures"


def version_5_database(path: Path) -> Path:
    """At `path`, the database of a data dir the release with schema version 5 made
    (tests/fixtures/datadir_v5.sql says what it holds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.executescript((FIXTURES / "datadir_v5.sql").read_text())
    conn.close()
    return path


HELLO = Hello(supervisor_id="s1", name="s1", versions=["1.0"], backends=["noop"], max_jobs=4)


async def assigned_job(store, job_id="j1"):
    """Create `job_id`, connect s1 and assign the job to it; return the new run."""
    await store.create_job(job_id, SPEC)
    await store.supervisor_connected(HELLO)
    [made] = await store.assign([(job_id, "s1")])
    return made


def state(seq, phase, job="j1", attempt=1, **kw):
    return JobStateChanged(seq=seq, job_id=job, attempt=attempt, phase=phase, **kw)


def out(seq, offset, data, job="j1", stream="stdout"):
    return Output(seq=seq, job_id=job, attempt=1, stream=stream, offset=offset, data=data)
