"""The private PostgreSQL cluster of the tests (tests/postgres.py): it serves on loopback
and its own socket, and leaves no server and no file behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.harness import wait_for
from tests.postgres import (
    Cluster,
    postgres_fixture,  # noqa: F401 - one cluster per session
    private_cluster,
)

pytestmark = pytest.mark.postgres


def test_the_cluster_serves_on_loopback_and_its_own_socket(postgres: Cluster):
    assert postgres.psql("SELECT 40 + 2") == "42"
    assert postgres.psql("SHOW listen_addresses") == "127.0.0.1"
    assert postgres.psql("SHOW unix_socket_directories") == str(postgres.socket_dir)
    assert postgres.psql("SHOW port") == str(postgres.port)


def test_a_cluster_is_stopped_and_removed_at_the_end():
    with private_cluster() as cluster:
        pid = int((cluster.root / "data" / "postmaster.pid").read_text().split()[0])
        assert cluster.psql("SHOW fsync") == "on"  # durable by default (benchmarks)
        os.kill(pid, 0)  # the server runs
    # pg_ctl has waited for the server to remove its pid file; its exit may lag by moments.
    wait_for(lambda: _gone(pid), f"the server (pid {pid}) to exit", timeout=10)
    assert not cluster.root.exists() and not cluster.socket_dir.exists()


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its parent to reap it counts)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status
