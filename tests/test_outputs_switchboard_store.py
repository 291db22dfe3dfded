"""Runs' output files in the store: a `files` event links the run to stored artifacts and
records refusals (a digest never uploaded, or of another size, among them); a file after the
run ended is a run_ended problem; a linked artifact is held from deletion and retention
while its job exists; a version 5 data dir opens and takes files. And the glob matcher
both sides share."""

from __future__ import annotations

import sqlite3
import time

import pytest

from protocol import globs
from protocol.exceptions import ProblemCode
from protocol.messages import JobFiles, OutputFile, RefusedFile
from protocol.spec import JobSpec, NoopBackend, Reports
from protocol.state import Phase
from switchboard.client import ClientError
from switchboard.job_files import target
from switchboard.store.schema import SCHEMA_VERSION
from switchboard.store.sqlite import SQLiteStore
from tests.store_setup import HELLO, state

pytestmark = pytest.mark.unit

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64
SPEC = JobSpec(name="t", backend=NoopBackend(), reports=Reports(junit=["reports/**/*.xml"]))


def files_event(seq: int, *files: OutputFile, **kw) -> JobFiles:
    return JobFiles(seq=seq, job_id="j1", attempt=1, files=list(files), **kw)


async def _job_with_artifacts(store: SQLiteStore) -> None:
    await store.add_artifact(A, 10, None, None)
    await store.add_artifact(B, 20, None, None)
    await store.create_job("j1", SPEC)
    await store.supervisor_connected(HELLO)
    await store.assign([("j1", "s1")])


async def test_files_are_linked_refused_and_hold_their_artifacts(store):
    await _job_with_artifacts(store)
    applied = await store.apply_events(
        "s1",
        [
            state(1, Phase.RUNNING),
            files_event(
                2,
                OutputFile(path="reports/x/a.xml", size=10, digest=A, media_type="application/xml"),
                OutputFile(path="b.bin", size=20, digest=B),
                OutputFile(path="ghost.bin", size=5, digest="sha256:" + "c" * 64),
                OutputFile(path="short.bin", size=3, digest=A),
                OutputFile(path="../up.bin", size=10, digest=A),
                OutputFile(path="a//b.bin", size=10, digest=A),
                refused=[RefusedFile(path="core", reason="too big")],
                refused_unlisted=2,
            ),
            state(3, Phase.SUCCEEDED),
        ],
    )
    assert applied.problems == []
    assert [(r.path, r.digest) for r in applied.reports] == [("reports/x/a.xml", A)]
    assert await store.pending_reports() == applied.reports  # a restart takes them up
    listing = await store.run_files("j1")
    assert listing is not None and listing.attempt == 1
    assert [(f.path, f.report) for f in listing.files] == [
        ("b.bin", None),
        ("reports/x/a.xml", "pending"),
    ]
    refused = {r.path: r.reason for r in listing.refused}
    assert set(refused) == {"core", "ghost.bin", "short.bin", "../up.bin", "a//b.bin"}
    assert "not a relative path" in refused["../up.bin"]
    assert "never uploaded" in refused["ghost.bin"]
    assert "3 bytes" in refused["short.bin"]
    assert listing.refused_unlisted == 2
    summary = await store.files_summary("j1")
    assert summary is not None and (summary.count, summary.bytes, summary.refused) == (2, 30, 7)
    await store.set_report_status("j1", 1, "reports/x/a.xml", "refused", "not JUnit")
    found = await store.run_file("j1", "reports/x/a.xml")
    assert found is not None and found[1].report_error == "not JUnit"
    assert await store.pending_reports() == []

    # Held while the job exists (it has ended), by deletion and by retention alike.
    assert (await store.delete_artifact(A)).outcome == "in_use"
    assert A not in await store.unused_artifacts(time.time() + 1, 10)
    # A files event after the end is refused as any other event is.
    late = await store.apply_events("s1", [files_event(4)])
    assert [p.code for p in late.problems] == [ProblemCode.RUN_ENDED]
    assert await store.delete_job("j1") == "deleted"
    assert await store.run_files("j1") is None
    assert A in await store.unused_artifacts(time.time() + 1, 10)
    assert (await store.delete_artifact(A)).outcome == "deleted"


async def test_a_version_5_data_dir_opens_and_takes_files(tmp_path):
    path = tmp_path / "db.sqlite3"
    old = SQLiteStore(path)
    await old.open()
    await _job_with_artifacts(old)
    await old.close()
    conn = sqlite3.connect(path)
    conn.executescript(
        "DROP TABLE run_files; DROP TABLE run_files_refused;"
        " ALTER TABLE runs DROP COLUMN files_refused_unlisted; PRAGMA user_version = 5;"
    )
    conn.close()
    upgraded = SQLiteStore(path)
    await upgraded.open()
    try:
        listing = await upgraded.run_files("j1")
        assert listing is not None and listing.attempt is None
        await upgraded.apply_events(
            "s1", [files_event(1, OutputFile(path="b.bin", size=20, digest=B), refused_unlisted=1)]
        )
        listing = await upgraded.run_files("j1")
        assert listing is not None and [f.path for f in listing.files] == ["b.bin"]
        assert listing.refused_unlisted == 1
    finally:
        await upgraded.close()
    (version,) = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()
    assert version == SCHEMA_VERSION


def test_the_cli_never_writes_outside_its_directory(tmp_path):
    into = tmp_path / "into"
    into.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (into / "link").symlink_to(tmp_path / "elsewhere")
    assert target(into, "a/b.txt") == into / "a" / "b.txt"
    for bad in ("../x", "/etc/passwd", "a/../../x", "a//b", "./a", "link/x"):
        with pytest.raises(ClientError):
            target(into, bad)
    assert list((tmp_path / "elsewhere").iterdir()) == []


@pytest.mark.parametrize(
    ("path", "pattern", "expected"),
    [
        ("a.xml", "*.xml", True),
        ("out/a.xml", "*.xml", False),
        ("out/a.xml", "out/**/*.xml", True),
        ("out/x/y/a.xml", "out/**/*.xml", True),
        ("a.xml", "**/*.xml", True),
        (".hidden.xml", "*.xml", True),
        ("b.xml", "[!a].xml", True),
        ("a.xml", "[!a].xml", False),
        ("out/a.xmlx", "out/*.xml", False),
    ],
)
def test_globs_match_as_the_protocol_says(path, pattern, expected):
    assert globs.matches(path, pattern) is expected
