"""Switchboard replicas on one PostgreSQL database for tests (tests/postgres.py's private
cluster): start them, ask which leads, read the database directly, stop them."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
from pathlib import Path

import asyncpg
import httpx

from tests.harness import Process, Switchboard
from tests.scrape import sample_value, scrape

#: Quick heartbeats, so a supervisor notices a paused replica in seconds.
FAST = ("--heartbeat-interval", "0.5", "--heartbeat-timeout", "3")


def sql(dsn: str, query: str, *args: object) -> list[asyncpg.Record]:
    """The rows of `query` on `dsn`, on a connection of its own."""

    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


def leading(replica: Switchboard) -> bool:
    """Whether `replica` says it leads (False when it does not answer)."""
    try:
        return sample_value(scrape(f"{replica.url}/metrics"), "switchboard_leader") == 1
    except (httpx.HTTPError, AssertionError):
        return False


def start_replicas(
    tmp_path: Path, dsn: str, count: int, *extra: str, shared_data: bool = False
) -> list[Switchboard]:
    """Replicas a, b, c (the first `count`) on `dsn`, each with its own data dir and one
    secret key for all (what one seals, another must open). `shared_data`: the data dirs
    are one (on shared storage, across hosts; an artifact uploaded through one replica is
    fetched through another), each replica reaching it by its own path here, so that their
    logs do not mix."""
    key = tmp_path / "replicas.key"
    if not key.exists():
        key.write_text(base64.urlsafe_b64encode(os.urandom(32)).decode() + "\n")
        key.chmod(0o600)
    if shared_data:
        shared = tmp_path / "shared"
        shared.mkdir(mode=0o700)
        for name in "abc"[:count]:
            (tmp_path / f"data-{name}").symlink_to(shared)
    return [
        Switchboard(
            tmp_path / f"data-{name}",
            extra_args=("--replica-id", name, "--secret-key-file", str(key), *extra),
            database=dsn,
        )
        for name in "abc"[:count]
    ]


def replica_id(replica: Switchboard) -> str:
    """The `--replica-id` `replica` was started with."""
    args = replica.extra_args
    return args[args.index("--replica-id") + 1]


def stop(*processes: Process | Switchboard) -> None:
    """Stop (SIGTERM) those still running, a paused one woken first."""
    for process in processes:
        if isinstance(process, Switchboard):
            process = process.process
        if process.proc.poll() is None:
            os.kill(process.proc.pid, signal.SIGCONT)
            process.stop()
