"""`switchboard db backup --database URI --to DIR` (switchboard/pg_backup.py) on the private
cluster of tests/postgres.py: a database with jobs is backed up while its switchboard
serves it, restored with pg_restore into a new database, and served from there with
the jobs, their output and their output files; a pg_dump too old or missing is said."""

from __future__ import annotations

import itertools
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness import Switchboard, run_cli, start_supervisor, wait_connected, wait_job
from tests.postgres import (
    PG_BIN,
    Cluster,
    postgres_fixture,  # noqa: F401 - one cluster per session
)

pytestmark = pytest.mark.postgres

_names = itertools.count()


def _backup(dsn: str, data: Path, into: Path) -> subprocess.CompletedProcess:
    return run_cli(
        *("-m", "switchboard", "db", "backup", "--database", dsn),
        *("--data-dir", str(data), "--to", str(into)),
        check=False,
        timeout=120,
    )


def artifacts(data: Path) -> set[str]:
    """The artifact files under the data dir `data`."""
    return {str(f.relative_to(data)) for f in (data / "artifacts").rglob("*") if f.is_file()}


def test_a_backup_made_while_serving_is_restored_and_served(tmp_path, postgres: Cluster):
    dsn = postgres.new_database(f"backup_{next(_names)}")
    data, into = tmp_path / "data", tmp_path / "backup"
    server = Switchboard(data, database=dsn)
    sup = start_supervisor(server, tmp_path, name="pg-b", backend="noop")
    try:
        client = server.client()
        wait_connected(client, "pg-b")
        spec = {
            "name": "kept",
            "backend": {"kind": "noop", "output": "in the backup\n", "files": {"r.txt": "file"}},
            "outputs": {"paths": ["r.txt"]},
        }
        job = wait_job(client, client.post("/api/v1/jobs", json=spec).json()["id"])
        assert job["phase"] == "succeeded", job
        done = _backup(dsn, data, into)  # while it serves
        assert done.returncode == 0, done.stderr.decode()
        said = done.stdout.decode()
        assert "switchboard.pgdump: schema version" in said and "pg_restore" in said

        # The artifacts' bytes (the output file's, the empty one's) are in the dump: no
        # file to copy beside it (the restored switchboard below has none, and serves them).
        assert "0 copied" in said, said
        assert len(artifacts(data)) == 2 and artifacts(into) == set()
        assert (into / "switchboard.pgdump").stat().st_mode & 0o777 == 0o600
        after = client.post("/api/v1/jobs", json={**spec, "name": "after"}).json()["id"]
        wait_job(client, after)
    finally:
        sup.stop()
        server.stop()

    restored = postgres.new_database(f"restored_{next(_names)}")
    subprocess.run(
        [
            *(str(PG_BIN / "pg_restore"), "--no-owner", "--exit-on-error"),
            *(f"--dbname={restored}", str(into / "switchboard.pgdump")),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    shutil.copy(data.with_name(data.name + ".key"), into.with_name(into.name + ".key"))
    again = Switchboard(into, database=restored)
    try:
        client = again.client()
        shown = client.get(f"/api/v1/jobs/{job['id']}").json()
        assert shown["phase"] == "succeeded", shown
        assert client.get(f"/api/v1/jobs/{job['id']}/output").content == b"in the backup\n"
        assert client.get(f"/api/v1/jobs/{job['id']}/files/r.txt").content == b"file"
        assert client.get(f"/api/v1/jobs/{after}").status_code == 404  # made after the backup
    finally:
        again.stop()


def test_a_pg_dump_too_old_or_missing_is_said(tmp_path, postgres: Cluster, monkeypatch):
    dsn = postgres.new_database(f"backup_{next(_names)}")
    server = Switchboard(tmp_path / "data", database=dsn)  # makes the schema
    server.stop()
    # $SWITCHBOARD_PG_BIN, when set, is where pg_dump is looked for, alone. The "old"
    # pg_dump is a script that says a version (no PostgreSQL 9.6 here to run).
    old = tmp_path / "old-bin"
    old.mkdir()
    (old / "pg_dump").write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 9.6.24'\n")
    (old / "pg_dump").chmod(0o755)
    monkeypatch.setenv("SWITCHBOARD_PG_BIN", str(old))
    done = _backup(dsn, tmp_path / "data", tmp_path / "b")
    assert done.returncode == 1
    said = done.stderr.decode()
    assert "pg_dump must be that version or newer" in said, said
    assert f"{old}/pg_dump (9)" in said and "postgresql-client-15" in said
    monkeypatch.setenv("SWITCHBOARD_PG_BIN", str(tmp_path))
    done = _backup(dsn, tmp_path / "data", tmp_path / "b")
    assert done.returncode == 1
    assert f"pg_dump is missing (looked in {tmp_path})" in done.stderr.decode()
    assert not (tmp_path / "b" / "switchboard.pgdump").exists()
    monkeypatch.delenv("SWITCHBOARD_PG_BIN")
    empty = postgres.new_database(f"backup_{next(_names)}")
    done = _backup(empty, tmp_path / "data", tmp_path / "b")
    assert done.returncode == 1
    assert "no switchboard schema in" in done.stderr.decode()
