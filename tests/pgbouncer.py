"""A private PgBouncer in front of the private PostgreSQL cluster (tests/postgres.py).

Each use writes its own pgbouncer.ini in a fresh directory under /tmp, runs `pgbouncer` in
the foreground on a free loopback port (no Unix socket), in transaction pooling mode with
a small pool per database and user (`pool_size`, 5 by default: the switchboards' 10
connections each really share server sessions), and stops it at the end. Authentication
is `trust` (the user must still be in the auth file): loopback only, for the seconds a
test runs. Any database name is passed on to the cluster's.

Needs the Debian package pgbouncer (scripts/test.sh installs it; Debian 12's is 1.18).
As root, it runs as the `postgres` user (PgBouncer refuses to run as root). Without it,
the tests that use it FAIL, never skip.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.harness import free_port
from tests.postgres import Cluster

PGBOUNCER = Path(os.environ.get("SWITCHBOARD_PGBOUNCER", "/usr/sbin/pgbouncer"))
SETUP_HINT = (
    f"the PgBouncer tests need the pgbouncer package ({PGBOUNCER}); run scripts/test.sh,"
    " which installs it (the tests start their own)"
)
START_TIMEOUT_S = 20


@dataclass
class Bouncer:
    """A running private PgBouncer."""

    root: Path  # pgbouncer.ini, userlist.txt, pgbouncer.log
    port: int
    user: str
    ini: str  # the configuration it runs with

    def dsn(self, database: str) -> str:
        """A libpq URI for `database` (on the cluster) through the bouncer."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def log(self) -> str:
        path = self.root / "pgbouncer.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def missing() -> str | None:
    """What this machine lacks to run a private PgBouncer (None: nothing)."""
    if not PGBOUNCER.exists():
        return f"{PGBOUNCER} is missing"
    return None


def version() -> str:
    """`pgbouncer --version`'s first line (e.g. "PgBouncer 1.18.0")."""
    done = subprocess.run(
        [str(PGBOUNCER), "--version"], capture_output=True, text=True, timeout=10, check=True
    )
    return done.stdout.splitlines()[0].strip()


def _as_owner(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


@contextlib.contextmanager
def private_bouncer(
    cluster: Cluster, *, pool_size: int = 5, extra: tuple[str, ...] = ()
) -> Iterator[Bouncer]:
    """A PgBouncer in transaction mode before `cluster`, until the block ends. `extra`:
    more lines of its [pgbouncer] section (e.g. ignore_startup_parameters = ...)."""
    reason = missing()
    if reason is not None:
        raise RuntimeError(f"{reason}: {SETUP_HINT}")
    root = Path(tempfile.mkdtemp(prefix="sb-pgb-"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(root, owner.pw_uid, owner.pw_gid)
    proc: subprocess.Popen[bytes] | None = None
    try:
        (root / "userlist.txt").write_text(f'"{cluster.user}" ""\n')
        for _ in range(3):  # the free port may be taken before the bouncer binds it
            port = free_port()
            ini = "\n".join(
                [
                    "[databases]",
                    f"* = host=127.0.0.1 port={cluster.port}",
                    "[pgbouncer]",
                    "listen_addr = 127.0.0.1",
                    f"listen_port = {port}",
                    "unix_socket_dir =",
                    "auth_type = trust",
                    f"auth_file = {root / 'userlist.txt'}",
                    "pool_mode = transaction",
                    f"default_pool_size = {pool_size}",
                    "max_client_conn = 500",
                    f"logfile = {root / 'pgbouncer.log'}",
                    *extra,
                ]
            )
            (root / "pgbouncer.ini").write_text(ini + "\n")
            proc = subprocess.Popen(
                _as_owner([str(PGBOUNCER), str(root / "pgbouncer.ini")]),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + START_TIMEOUT_S
            while proc.poll() is None and time.monotonic() < deadline:
                if _listening(port):
                    break
                time.sleep(0.05)
            if proc.poll() is None and _listening(port):
                break
            _stop(proc)
            proc = None
        if proc is None:
            log = (root / "pgbouncer.log").read_text(errors="replace")[-4000:]
            raise RuntimeError(f"PgBouncer did not start:\n{log}")
        yield Bouncer(root=root, port=port, user=cluster.user, ini=ini)
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM is PgBouncer's immediate shutdown (runuser passes it on)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
