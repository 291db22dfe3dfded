"""Upgrading a PostgreSQL database (store/postgres_migrations.py, `switchboard db version|
upgrade --database`, `serve --database --upgrade`) on the private cluster of
tests/postgres.py: the previous release's database, with its rows, is upgraded by the CLI
and served with them; the upgraded schema is a new database's; an interrupted upgrade
resumes; a newer schema, an older one without --upgrade, and an upgrade while replicas
serve are refused, saying what to do; upgraders and starters take turns."""

from __future__ import annotations

import asyncio
import itertools

import asyncpg
import pytest

from switchboard.store.migrations import SchemaOutdated, SchemaTooNew
from switchboard.store.postgres_migrations import (
    ReplicasServing,
    apply_schema,
    schema_lock,
    schema_version,
)
from switchboard.store.postgres_schema import MIGRATIONS, POSTGRES_BASELINE
from switchboard.store.schema import SCHEMA_VERSION
from tests.harness import Process, Switchboard, run_cli, wait_for
from tests.postgres import (
    Cluster,
    postgres_fixture,  # noqa: F401 - one cluster per session
)
from tests.postgres_previous import (
    ADMIN_ID,
    ADMIN_TOKEN,
    DONE_JOB,
    DONE_OUTPUT,
    PREVIOUS_RELEASE,
    QUEUED_JOB,
    SUPERVISOR,
    older_database,
    previous_release_rows,
    schema_shape,
)

pytestmark = pytest.mark.postgres

_names = itertools.count()


def _db(*args: str, check: bool = False):
    return run_cli("-m", "switchboard", "db", *args, check=check, timeout=120)


def _serve_refused(tmp_path, dsn: str, *extra: str) -> str:
    """Start `switchboard serve --database dsn`, which must refuse: what it said."""
    done = run_cli(
        *("-m", "switchboard", "serve", "--port", "0", "--data-dir", str(tmp_path / "data")),
        *("--database", dsn, *extra),
        check=False,
        timeout=120,
    )
    assert done.returncode == 1, done
    return done.stderr.decode()


async def _fresh(postgres: Cluster) -> str:
    dsn = postgres.new_database(f"upgrade_{next(_names)}")
    conn = await asyncpg.connect(dsn)
    try:
        await apply_schema(conn, dsn)
    finally:
        await conn.close()
    return dsn


async def _previous_release(postgres: Cluster) -> str:
    dsn = postgres.new_database(f"upgrade_{next(_names)}")
    await older_database(dsn, PREVIOUS_RELEASE)
    await previous_release_rows(dsn)
    return dsn


async def test_the_previous_release_s_database_is_upgraded_and_served(tmp_path, postgres):
    dsn = await _previous_release(postgres)
    said = _db("version", "--database", dsn, check=True).stdout.decode()
    assert f"schema version {PREVIOUS_RELEASE}, older than this release's {SCHEMA_VERSION}" in said
    # Not upgraded behind the operator's back: serve refuses, naming the command.
    refused = _serve_refused(tmp_path, dsn)
    assert f"schema version {PREVIOUS_RELEASE}, this switchboard needs {SCHEMA_VERSION}" in refused
    assert f"`switchboard db upgrade --database {dsn}`" in refused
    assert await _version(dsn) == PREVIOUS_RELEASE

    done = _db("upgrade", "--database", dsn, check=True)
    assert (
        f"upgraded from schema version {PREVIOUS_RELEASE} to {SCHEMA_VERSION}"
        in done.stdout.decode()
    )
    assert f"from schema version {PREVIOUS_RELEASE} to {SCHEMA_VERSION}" in done.stderr.decode()
    assert "already at" in _db("upgrade", "--database", dsn, check=True).stdout.decode()
    assert "this release's" in _db("version", "--database", dsn, check=True).stdout.decode()
    assert await schema_shape(dsn) == await schema_shape(await _fresh(postgres))

    server = Switchboard(tmp_path / "data", database=dsn)
    try:
        client = server.client(ADMIN_TOKEN)  # the token the previous release made
        job = client.get(f"/api/v1/jobs/{DONE_JOB}").json()
        assert (job["phase"], job["exit_code"], job["name"]) == ("succeeded", 0, "passes")
        assert client.get(f"/api/v1/jobs/{DONE_JOB}/output").content == DONE_OUTPUT
        assert client.get(f"/api/v1/jobs/{QUEUED_JOB}").json()["phase"] == "queued"
        listed = {j["id"] for j in client.get("/api/v1/jobs").json()["items"]}
        assert {DONE_JOB, QUEUED_JOB} <= listed
        (supervisor,) = client.get("/api/v1/supervisors").json()
        assert supervisor["id"] == SUPERVISOR and not supervisor["connected"]
        assert ADMIN_ID in {t["id"] for t in client.get("/api/v1/tokens").json()}
    finally:
        server.stop()


async def test_serve_upgrade_upgrades_at_start(tmp_path, postgres):
    dsn = await _previous_release(postgres)
    server = Switchboard(tmp_path / "data", database=dsn, extra_args=("--upgrade",))
    try:
        job = server.client(ADMIN_TOKEN).get(f"/api/v1/jobs/{DONE_JOB}").json()
        assert job["phase"] == "succeeded"
    finally:
        server.stop()
    assert await _version(dsn) == SCHEMA_VERSION
    assert "upgrading the PostgreSQL database" in server.process.log_path.read_text()


async def test_the_baseline_upgraded_is_a_new_database(postgres):
    dsn = postgres.new_database(f"upgrade_{next(_names)}")
    await older_database(dsn, POSTGRES_BASELINE)
    conn = await asyncpg.connect(dsn)
    try:
        with pytest.raises(SchemaOutdated, match=f"db upgrade --database {dsn}"):
            await apply_schema(conn, dsn)
        await apply_schema(conn, dsn, upgrade=True)
    finally:
        await conn.close()
    assert await schema_shape(dsn) == await schema_shape(await _fresh(postgres))


async def test_an_interrupted_upgrade_resumes_at_the_step_that_did_not_finish(postgres):
    dsn = postgres.new_database(f"upgrade_{next(_names)}")
    await older_database(dsn, POSTGRES_BASELINE)
    # Step 9 creates `reservations` (and adds jobs.reservation): a table of that name in
    # the way makes it fail, after steps 7 and 8 are done.
    conn = await asyncpg.connect(dsn)
    await conn.execute("CREATE TABLE reservations (in_the_way INTEGER)")
    failed = _db("upgrade", "--database", dsn)
    assert failed.returncode == 1
    assert "cannot upgrade" in failed.stderr.decode()
    assert 'relation "reservations" already exists' in failed.stderr.decode()
    assert await _version(dsn) == 8
    columns = {
        r[0]
        for r in await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'jobs'"
        )
    }
    assert "waiting_for" in columns and "reservation" not in columns  # 7 done, 9 not at all
    await conn.execute("DROP TABLE reservations")
    await conn.close()

    done = _db("upgrade", "--database", dsn, check=True)
    assert f"upgraded from schema version 8 to {SCHEMA_VERSION}" in done.stdout.decode()
    assert await schema_shape(dsn) == await schema_shape(await _fresh(postgres))


async def test_a_newer_schema_is_refused(tmp_path, postgres):
    dsn = await _fresh(postgres)
    conn = await asyncpg.connect(dsn)
    await conn.execute("UPDATE switchboard_schema SET version = version + 1")
    await conn.close()
    newer = f"schema version {SCHEMA_VERSION + 1}, made by a newer switchboard"
    refused = _db("upgrade", "--database", dsn)
    assert refused.returncode == 1 and newer in refused.stderr.decode()
    for extra in ((), ("--upgrade",)):
        assert newer in _serve_refused(tmp_path, dsn, *extra)
    said = _db("version", "--database", dsn, check=True).stdout.decode()
    assert f"newer than this release's {SCHEMA_VERSION}" in said
    assert await _version(dsn) == SCHEMA_VERSION + 1


async def _version(dsn: str) -> int | None:
    conn = await asyncpg.connect(dsn)
    try:
        return await schema_version(conn)
    finally:
        await conn.close()


def _next_step(
    ran: list[str], name: str, pause_s: float = 0.0, started: asyncio.Event | None = None
):
    """A step past this release, a function of the connection: a data move (with a
    pause, so that others come while it runs; `started` set as it begins)."""

    async def step(conn) -> None:
        ran.append(name)
        if started is not None:
            started.set()
        await conn.execute("SELECT pg_sleep($1)", pause_s)
        await conn.execute("UPDATE jobs SET priority = priority + 1")

    return (SCHEMA_VERSION + 1, step)


async def test_upgraders_and_starters_take_turns(postgres):
    dsn = await _previous_release(postgres)
    await _upgrade(dsn)
    ran: list[str] = []
    started = asyncio.Event()
    steps = (*MIGRATIONS, _next_step(ran, "step", pause_s=1.0, started=started))
    first, second, starter = [await asyncpg.connect(dsn) for _ in range(3)]
    try:
        # Two upgraders at once: the step runs once; a switchboard of the next release
        # starting meanwhile waits for them and then serves the version they reached.
        upgrading = [
            asyncio.ensure_future(apply_schema(conn, dsn, upgrade=True, steps=steps))
            for conn in (first, second)
        ]
        await started.wait()  # the step runs (under the schema's lock): a switchboard starts
        await asyncio.gather(*upgrading, apply_schema(starter, dsn, steps=steps))
        assert ran == ["step"]
        assert await schema_version(first) == SCHEMA_VERSION + 1
        assert [r[0] for r in await first.fetch("SELECT priority FROM jobs")] == [1, 1]
        # This release, on the database the next one upgraded: refused.
        with pytest.raises(SchemaTooNew):
            await apply_schema(starter, dsn)
    finally:
        for conn in (first, second, starter):
            await conn.close()


async def _upgrade(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await apply_schema(conn, dsn, upgrade=True)
    finally:
        await conn.close()


async def test_a_switchboard_starting_during_an_upgrade_waits_for_it(tmp_path, postgres):
    dsn = await _previous_release(postgres)
    upgrader = await asyncpg.connect(dsn)
    try:
        async with schema_lock(upgrader):  # an upgrade under way
            serving = Process(
                [
                    *("-m", "switchboard", "serve", "--port", "0"),
                    *("--data-dir", str(tmp_path / "data"), "--database", dsn),
                ],
                tmp_path / "serve.log",
            )
            wait_for(
                lambda: "waiting for it to finish" in (tmp_path / "serve.log").read_text(),
                "the starting switchboard to wait",
            )
            await apply_schema(upgrader, dsn, upgrade=True)
            await asyncio.sleep(0.5)
            assert serving.proc.poll() is None  # still waiting: not refused, not serving
            assert "listening on" not in (tmp_path / "serve.log").read_text()
        # The upgrade done, it finds this release's version and serves.
        serving.wait_for_line(r"listening on", timeout=30)
        serving.stop()
    finally:
        await upgrader.close()


async def test_an_upgrade_is_refused_while_replicas_serve(tmp_path, postgres):
    dsn = await _fresh(postgres)
    server = Switchboard(tmp_path / "data", database=dsn, extra_args=("--replica-id", "sb-1"))
    ran: list[str] = []
    steps = (*MIGRATIONS, _next_step(ran, "step"))
    conn = await asyncpg.connect(dsn)
    try:
        with pytest.raises(ReplicasServing, match=r"replicas alive within 10 s: sb-1 \("):
            await apply_schema(conn, dsn, upgrade=True, steps=steps)
        assert ran == [] and await schema_version(conn) == SCHEMA_VERSION
        server.stop()  # a replica stopping says it leaves
        await apply_schema(conn, dsn, upgrade=True, steps=steps)
        assert ran == ["step"] and await schema_version(conn) == SCHEMA_VERSION + 1
    finally:
        server.process.stop()
        await conn.close()
