"""A data dir the previous release made (schema 5, tests/fixtures/datadir_v5.sql) under
this release's processes: `serve` refuses it and names the command, `switchboard db
upgrade` backs it up and upgrades it, and the switchboard then serves it with its jobs,
output and tokens intact and runs the job left queued. `serve --upgrade` does the same at
start; a database from a newer release is refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from switchboard.store.schema import SCHEMA_VERSION
from tests.harness import Switchboard, run_cli, start_supervisor, wait_connected, wait_job
from tests.store_setup import version_5_database

pytestmark = pytest.mark.process

#: The admin token the previous release made for the fixture (valid nowhere else).
OLD_ADMIN = "sbt_w86NqKQHlbTZV8NG-91tv-R4PhIHsH751rBIPHnMVhc"
SUCCEEDED, FAILED, QUEUED = (
    "01a2513091290000de2fa94f",
    "01a25130912c000012d29c0d",
    "01a25130936a000023d5f84e",
)


def _old_data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    version_5_database(data / "switchboard.sqlite3")
    return data


def _serve(data: Path, *extra: str):
    return run_cli(
        *("-m", "switchboard", "serve", "--port", "0", "--data-dir", str(data), *extra),
        check=False,
        timeout=60,
    )


def _version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def _served_intact(server: Switchboard, work: Path) -> None:
    """The old jobs, their output and the old admin token, then the queued job run."""
    client = server.client(OLD_ADMIN)
    jobs = {j["id"]: j for j in client.get("/api/v1/jobs", params={"limit": 10}).json()["items"]}
    assert {i: jobs[i]["phase"] for i in (SUCCEEDED, FAILED, QUEUED)} == {
        SUCCEEDED: "succeeded",
        FAILED: "failed",
        QUEUED: "queued",
    }
    assert jobs[FAILED]["exit_code"] == 3
    assert client.get(f"/api/v1/jobs/{SUCCEEDED}/output").content == b"made by schema 5\n"
    supervisor = start_supervisor(server, work, name="new-host", backend="noop")
    try:
        wait_connected(client, "new-host")
        job = wait_job(client, QUEUED)
        assert job["phase"] == "succeeded", job
        # What schema 6 added works on it: a run's output files.
        made = client.post(
            "/api/v1/jobs",
            json={
                "name": "files",
                "backend": {"kind": "noop", "files": {"a.txt": "new"}},
                "outputs": {"paths": ["*.txt"]},
            },
        )
        assert made.status_code == 201, made.text
        assert wait_job(client, made.json()["id"])["phase"] == "succeeded"
        listing = client.get(f"/api/v1/jobs/{made.json()['id']}/files").json()
        assert [f["path"] for f in listing["files"]] == ["a.txt"], listing
    finally:
        supervisor.stop()


def test_the_previous_release_s_data_dir_is_upgraded_by_the_cli_and_served(tmp_path):
    data = _old_data_dir(tmp_path)
    db = data / "switchboard.sqlite3"

    refused = _serve(data)
    assert refused.returncode != 0
    said = refused.stderr.decode()
    assert f"schema version 5, this switchboard needs {SCHEMA_VERSION}" in said, said
    assert f"`switchboard db upgrade --data-dir {data}`" in said, said
    assert _version(db) == 5

    shown = run_cli("-m", "switchboard", "db", "version", "--data-dir", str(data))
    assert f"schema version 5, older than this release's {SCHEMA_VERSION}" in shown.stdout.decode()

    done = run_cli("-m", "switchboard", "db", "upgrade", "--data-dir", str(data), timeout=60)
    assert f"upgraded from schema version 5 to {SCHEMA_VERSION}" in done.stdout.decode()
    (copy,) = data.glob("switchboard.sqlite3.schema-5.*.bak")
    assert f"a copy of it as it was is at {copy}" in done.stderr.decode()
    assert _version(copy) == 5 and _version(db) == SCHEMA_VERSION

    again = run_cli("-m", "switchboard", "db", "upgrade", "--data-dir", str(data))
    assert "already at schema version" in again.stdout.decode()

    server = Switchboard(data)
    try:
        _served_intact(server, tmp_path / "work")
    finally:
        server.stop()


def test_serve_upgrade_upgrades_at_start(tmp_path):
    data = _old_data_dir(tmp_path)
    server = Switchboard(data, extra_args=("--upgrade",))
    try:
        assert "upgrading the database" in server.process.log()
        assert len(list(data.glob("*.bak"))) == 1
        _served_intact(server, tmp_path / "work")
    finally:
        server.stop()


def test_a_database_from_a_newer_release_is_refused(tmp_path):
    data = _old_data_dir(tmp_path)
    db = data / "switchboard.sqlite3"
    sqlite3.connect(db).execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}").connection.close()
    for extra in ((), ("--upgrade",)):
        refused = _serve(data, *extra)
        assert refused.returncode != 0
        assert "made by a newer switchboard" in refused.stderr.decode()
    upgrade = run_cli(*("-m", "switchboard", "db", "upgrade", "--data-dir", str(data)), check=False)
    assert upgrade.returncode != 0
    assert "made by a newer switchboard" in upgrade.stderr.decode()
    assert _version(db) == SCHEMA_VERSION + 1 and not list(data.glob("*.bak"))


def test_no_upgrade_while_a_switchboard_serves_the_data_dir(tmp_path):
    server = Switchboard(tmp_path / "data")
    try:
        for command in (
            ("db", "upgrade", "--data-dir", str(server.data_dir)),
            ("serve", "--port", "0", "--data-dir", str(server.data_dir), "--upgrade"),
        ):
            refused = run_cli("-m", "switchboard", *command, check=False, timeout=60)
            assert refused.returncode != 0, command
            said = refused.stderr.decode()
            assert f"a switchboard is serving the data dir {server.data_dir}: stop it" in said
        # It serves on, as before.
        assert server.client().get("/api/v1/health").status_code == 200
    finally:
        server.stop()
    done = run_cli("-m", "switchboard", "db", "upgrade", "--data-dir", str(server.data_dir))
    assert "already at schema version" in done.stdout.decode()


def test_a_file_that_is_no_database_is_one_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "switchboard.sqlite3").write_bytes(b"not a database at all, but long enough\n" * 4)
    for command in ("version", "upgrade"):
        done = run_cli(*("-m", "switchboard", "db", command, "--data-dir", str(data)), check=False)
        assert done.returncode != 0
        assert "file is not a database" in done.stderr.decode()
        assert "Traceback" not in done.stderr.decode()
