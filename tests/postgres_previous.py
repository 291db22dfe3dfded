"""A PostgreSQL database as an older release left it, and what a schema is made of.

`older_database` makes the schema of `version` the way that release made it (the baseline
postgres_schema.SCHEMA, then the steps of MIGRATIONS up to `version`, and the version
recorded); `previous_release_rows` puts in what release 12 (the release before replicas)
wrote for a supervisor that ran one job and a job still queued, with the columns that
release had. `schema_shape` reads a database's columns, indexes, constraints, triggers
and functions, to compare an upgraded database with a new one.
"""

from __future__ import annotations

import time
from typing import Any

import asyncpg
import msgspec

from protocol.spec import JobSpec, NoopBackend
from protocol.tokens import token_sha256
from switchboard.store.postgres_schema import MIGRATIONS, POSTGRES_BASELINE, SCHEMA

#: The release before this one's schema work: replicas came with 13. Written as a number,
#: not SCHEMA_VERSION - 1, so that the tests hold whatever SCHEMA_VERSION becomes.
PREVIOUS_RELEASE = 12

#: The rows previous_release_rows writes (tokens made for this file, valid nowhere else).
ADMIN_TOKEN = "sbt_" + "previous-release-admin-token-0123456789ab"
ADMIN_ID = "0a1b2c3d4e5f"
SUPERVISOR_TOKEN = "sbt_" + "previous-release-host-token-0123456789abc"
SUPERVISOR = "old-host"
DONE_JOB = "01a2513091290000de2fa94f"
QUEUED_JOB = "01a25130936a000023d5f84e"
DONE_OUTPUT = b"made by schema 12\n"


async def older_database(dsn: str, version: int) -> None:
    """Make the schema of `version` (POSTGRES_BASELINE or later) in the empty database
    `dsn` names, as the release of that version made it."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(SCHEMA)
            for to, step in MIGRATIONS[: version - POSTGRES_BASELINE]:
                assert isinstance(step, str), f"step {to} is not SQL: make it as its release did"
                await conn.execute(step)
            await conn.execute("INSERT INTO switchboard_schema (version) VALUES ($1)", version)
    finally:
        await conn.close()


def _spec(spec: JobSpec) -> bytes:
    return msgspec.json.encode(spec)


async def previous_release_rows(dsn: str) -> None:
    """The rows release PREVIOUS_RELEASE wrote: an admin token, a supervisor enrolled
    with its own credential, a job it ran to success with output, and a job queued."""
    now = time.time() - 3600
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            assert await conn.fetchval("SELECT version FROM switchboard_schema") == 12
            add_token = (
                "INSERT INTO tokens (id, role, name, hash, created_at, supervisor_id)"
                " VALUES ($1, $2, $3, $4, $5, $6)"
            )
            await conn.execute(
                add_token, ADMIN_ID, "admin", "admin", token_sha256(ADMIN_TOKEN), now, None
            )
            await conn.execute(
                add_token,
                "6f5e4d3c2b1a",
                "supervisor",
                "enrolled with supervisor",
                token_sha256(SUPERVISOR_TOKEN),
                now,
                SUPERVISOR,
            )
            await conn.execute(
                "INSERT INTO supervisors (id, name, labels, backends, resources, max_jobs,"
                " software, session, last_seq, connected, drained, operator_labels,"
                " first_seen, connected_at, last_seen, protocol)"
                " VALUES ($1, $1, '{}', '[\"noop\"]', '{}', 2, 'switchboard-supervisor/0.1',"
                " 1, 10, 0, 0, '{\"room\": \"b\"}', $2, $2, $3, '1.3')",
                SUPERVISOR,
                now,
                now + 5,
            )
            await conn.execute(
                "INSERT INTO supervisor_sessions"
                " VALUES ($1, 1, $2, $3, 'closed by the supervisor')",
                SUPERVISOR,
                now,
                now + 5,
            )
            add_job = (
                "INSERT INTO jobs (id, name, spec, phase, labels, timeout_s, owner, queued_at,"
                " attempts, exit_code, reason, created_at, updated_at)"
                ' VALUES ($1, $2, $3, $4, \'{"suite": "upgrade"}\', 3600, $5, $6, $7, $8,'
                " $9, $6, $10)"
            )
            done = JobSpec(
                name="passes",
                backend=NoopBackend(output=DONE_OUTPUT.decode()),
                labels={"suite": "upgrade"},
            )
            await conn.execute(
                add_job, DONE_JOB, "passes", _spec(done), "succeeded", ADMIN_ID, now, 1, 0,
                "exited", now + 2,
            )  # fmt: skip
            waits = JobSpec(name="waits", backend=NoopBackend(), labels={"suite": "upgrade"})
            await conn.execute(
                add_job, QUEUED_JOB, "waits", _spec(waits), "queued", ADMIN_ID, now + 3, 0,
                None, None, now + 3,
            )  # fmt: skip
            await conn.execute(
                "INSERT INTO runs (job_id, attempt, supervisor_id, phase, exit_code, reason,"
                " created_at, started_at, ended_at, output_bytes)"
                " VALUES ($1, 1, $2, 'succeeded', 0, 'exited', $3, $4, $5, $6)",
                DONE_JOB,
                SUPERVISOR,
                now,
                now + 1,
                now + 2,
                len(DONE_OUTPUT),
            )
            for offset, phase in enumerate(("assigned", "running", "succeeded")):
                await conn.execute(
                    "INSERT INTO run_phases (job_id, attempt, phase, at) VALUES ($1, 1, $2, $3)",
                    DONE_JOB,
                    phase,
                    now + offset,
                )
            await conn.execute(
                'INSERT INTO output (job_id, attempt, stream, "offset", data)'
                " VALUES ($1, 1, 'stdout', 0, $2)",
                DONE_JOB,
                DONE_OUTPUT,
            )
            for job_id, name, at in ((DONE_JOB, "passes", now), (QUEUED_JOB, "waits", now + 3)):
                await conn.execute(
                    "INSERT INTO job_events (job_id, at, kind, message, actor)"
                    " VALUES ($1, $2, 'submitted', $3, $4)",
                    job_id,
                    at,
                    f"submitted as {name!r}",
                    f"admin ({ADMIN_ID})",
                )
    finally:
        await conn.close()


async def schema_shape(dsn: str) -> dict[str, Any]:
    """What the schema of the database `dsn` names is made of: every column (type,
    nullability, default, identity), index, constraint, trigger and function, and the
    version. Not the order columns were added in."""
    conn = await asyncpg.connect(dsn)
    try:
        columns = await conn.fetch(
            "SELECT table_name, column_name, data_type, is_nullable, column_default,"
            " is_identity FROM information_schema.columns WHERE table_schema = 'public'"
        )
        indexes = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
        )
        constraints = await conn.fetch(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)"
            " FROM pg_constraint WHERE connamespace = 'public'::regnamespace"
        )
        triggers = await conn.fetch(
            "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal"
        )
        functions = await conn.fetch(
            "SELECT proname, prosrc FROM pg_proc WHERE pronamespace = 'public'::regnamespace"
        )
        return {
            "columns": sorted(tuple(r) for r in columns),
            "indexes": sorted(tuple(r) for r in indexes),
            "constraints": sorted(tuple(r) for r in constraints),
            "triggers": sorted(tuple(r) for r in triggers),
            "functions": sorted(tuple(r) for r in functions),
            "version": await conn.fetchval("SELECT version FROM switchboard_schema"),
        }
    finally:
        await conn.close()
