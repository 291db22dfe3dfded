"""A private PostgreSQL cluster for tests and benchmarks.

Each user (a test session, a benchmark) makes its own cluster with `initdb` in a fresh
directory under /tmp, serves it with `pg_ctl` on a free loopback port and a socket
directory of its own, and removes it all at the end: no test touches a host's server or
its databases. Authentication is `trust`: the server listens on 127.0.0.1 and its own
socket only, for the few seconds a test runs.

Needs the Debian package postgresql (scripts/test.sh installs it; the binaries are in
/usr/lib/postgresql/15/bin). As root, the cluster runs as the `postgres` user (the server
refuses to run as root). Without them the tests that use it FAIL, never skip.

Use in a test module::

    from tests.postgres import postgres_fixture  # noqa: F401  (registers it)

    def test_x(postgres): ...  # a Cluster; postgres.dsn
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import free_port

PG_BIN = Path(os.environ.get("SWITCHBOARD_PG_BIN", "/usr/lib/postgresql/15/bin"))
SETUP_HINT = (
    "the PostgreSQL tests need the postgresql package (initdb and pg_ctl in"
    f" {PG_BIN}); run scripts/test.sh, which installs it (the tests start their own server)"
)
#: How long the server may take to accept connections once started.
START_TIMEOUT_S = 60


@dataclass
class Cluster:
    """A running private PostgreSQL server."""

    root: Path  # holds data/ (the cluster) and server.log
    socket_dir: Path
    port: int
    user: str  # the database superuser (initdb's --username)

    @property
    def dsn(self) -> str:
        """A libpq URI for its `postgres` database over loopback TCP."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def new_database(self, name: str) -> str:
        """A new empty database `name` (a test's own); its libpq URI."""
        self.psql(f'CREATE DATABASE "{name}"')
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{name}"

    def psql(self, sql: str) -> str:
        """Run `sql` with psql on the cluster's socket; its output, unaligned."""
        done = subprocess.run(
            [
                *(str(PG_BIN / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"),
                *("-h", str(self.socket_dir), "-p", str(self.port), "-U", self.user),
                *("-d", "postgres", "-c", sql),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"psql failed: {done.stderr}")
        return done.stdout.strip()


def missing() -> str | None:
    """What this machine lacks to run a private cluster (None: nothing)."""
    for tool in ("initdb", "pg_ctl", "psql"):
        if not (PG_BIN / tool).exists():
            return f"{PG_BIN / tool} is missing"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "no `postgres` user to run the server as (running as root)"
        if shutil.which("runuser") is None:
            return "no runuser to run the server as `postgres`"
    return None


def _as_owner(args: list[str]) -> list[str]:
    """`args` run as the cluster's owner: `postgres` when we are root, else ourselves."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


def _give_to_owner(path: Path) -> None:
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(path, owner.pw_uid, owner.pw_gid)


@contextlib.contextmanager
def private_cluster(*, durable: bool = True) -> Iterator[Cluster]:
    """A new cluster, served until the block ends, then stopped and removed.
    `durable=False` turns fsync off (tests: nothing needs to survive a power cut)."""
    reason = missing()
    if reason is not None:
        raise RuntimeError(f"{reason}: {SETUP_HINT}")
    root = Path(tempfile.mkdtemp(prefix="sb-pg-"))
    socket_dir = Path(tempfile.mkdtemp(prefix="sb-pgsock-"))
    for path in (root, socket_dir):
        _give_to_owner(path)
    user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    data = root / "data"
    started = False
    try:
        subprocess.run(
            _as_owner(
                [
                    *(str(PG_BIN / "initdb"), "-D", str(data), "--auth=trust"),
                    *("--username", user, "--encoding=UTF8", "--locale=C.UTF-8"),
                    "--no-instructions",
                ]
            ),
            capture_output=True,
            check=True,
            timeout=120,
        )
        options = [
            "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={socket_dir}",
        ]
        if not durable:
            options.append("-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        for _ in range(3):  # the free port may be taken before the server binds it
            port = free_port()
            done = subprocess.run(
                _as_owner(
                    [
                        *(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log")),
                        *("-w", "-t", str(START_TIMEOUT_S), "-o", f"-p {port} {' '.join(options)}"),
                        "start",
                    ]
                ),
                capture_output=True,
                timeout=START_TIMEOUT_S + 30,
                check=False,
            )
            if done.returncode == 0:
                started = True
                break
        if not started:
            log = (root / "server.log").read_text(errors="replace")[-4000:]
            raise RuntimeError(f"the PostgreSQL server did not start:\n{log}")
        yield Cluster(root=root, socket_dir=socket_dir, port=port, user=user)
    finally:
        try:
            if started:
                _stop(data)
        finally:
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(socket_dir, ignore_errors=True)


def _stop(data: Path) -> None:
    """Stop the server: SIGINT is its fast shutdown (what `pg_ctl -m fast stop` sends),
    sent from here so that stopping needs no process of its own; then wait for it."""
    pid = int((data / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if not (data / "postmaster.pid").exists():
            return  # it has shut down (its parent, init, reaps it)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session", name="postgres")
def postgres_fixture() -> Iterator[Cluster]:
    """One private cluster per test session (fsync off); fails, never skips, without it."""
    reason = missing()
    if reason is not None:
        pytest.fail(f"{reason}: {SETUP_HINT}")
    with private_cluster(durable=False) as cluster:
        yield cluster
