"""`switchboard serve --database postgresql://…` (real processes, on the private cluster of
tests/postgres.py): a noop supervisor connects, a job succeeds with its output, and all
of it is in the database (the data dir holds no SQLite file; a restart still shows it). A
URI that is no PostgreSQL one, or a server that can't be reached, is said in one line."""

from __future__ import annotations

import itertools

import pytest

from tests.harness import Switchboard, run_cli, start_supervisor, wait_connected, wait_job
from tests.postgres import (
    Cluster,
    postgres_fixture,  # noqa: F401 - one cluster per session
)

pytestmark = pytest.mark.postgres

_names = itertools.count()


def test_a_job_runs_on_a_switchboard_serving_postgresql(tmp_path, postgres: Cluster):
    dsn = postgres.new_database(f"serve_{next(_names)}")
    data = tmp_path / "data"
    server = Switchboard(data, database=dsn)
    sup = start_supervisor(server, tmp_path, name="pg-1", backend="noop")
    try:
        client = server.client()
        wait_connected(client, "pg-1")
        spec = {"name": "on-pg", "backend": {"kind": "noop", "output": "kept in PostgreSQL\n"}}
        job = wait_job(client, client.post("/api/v1/jobs", json=spec).json()["id"])
        assert job["phase"] == "succeeded", job
        output = f"/api/v1/jobs/{job['id']}/output"
        assert client.get(output).content == b"kept in PostgreSQL\n"
        assert not (data / "switchboard.sqlite3").exists()
        # The lab's inventory is in the database too (tests/test_lab_*_postgres.py): this
        # supervisor declares no device, so a reservation of a board is refused saying so.
        assert client.get("/api/v1/devices").json() == []
        refused = client.post("/api/v1/reservations", json={"class": "nrf52840dk"})
        assert refused.status_code == 400, refused.text
        assert "nrf52840dk" in refused.json()["message"], refused.text
        # A job group is placed whole.
        roles = [{"role": r, "spec": {**spec, "name": r}} for r in ("a", "b")]
        group = client.post("/api/v1/groups", json={"name": "g", "roles": roles}).json()
        for role in group["roles"]:
            assert wait_job(client, role["job_id"])["phase"] == "succeeded"
        shown = client.get(f"/api/v1/groups/{group['id']}").json()
        assert shown["state"] == "succeeded" and shown["placed_at"] is not None

        server.restart()
        client = server.client()
        assert client.get(f"/api/v1/jobs/{job['id']}").json()["phase"] == "succeeded"
        assert client.get(output).content == b"kept in PostgreSQL\n"
        wait_connected(client, "pg-1")  # it reconnects, its credential in the database
    finally:
        sup.stop()
        server.process.stop()


def test_a_database_uri_that_is_not_postgresql_is_refused(tmp_path):
    done = run_cli(
        *("-m", "switchboard", "serve", "--data-dir", str(tmp_path / "d")),
        *("--database", "sqlite:///tmp/x.db"),
        check=False,
    )
    assert done.returncode == 2
    assert b"--database takes a PostgreSQL URI" in done.stderr


def test_an_unreachable_database_is_said_in_one_line(tmp_path, postgres: Cluster):
    # The cluster's own port with a database that does not exist: refused by the server.
    missing = postgres.dsn.rsplit("/", 1)[0] + "/no_such_database"
    done = run_cli(
        *("-m", "switchboard", "serve", "--data-dir", str(tmp_path / "d")),
        *("--database", missing),
        check=False,
        timeout=60,
    )
    assert done.returncode == 1
    said = done.stderr.decode()
    assert "Traceback" not in said, said
    last = said.strip().splitlines()[-1]
    assert last == 'switchboard: --database: database "no_such_database" does not exist', said
