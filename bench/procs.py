"""What the benchmarks read about processes (Linux /proc) and their file-descriptor limit."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time a process and all its descendants have used so far: its own, its reaped
    children's (the kernel adds them to it when they exit) and its living descendants'.
    For a server that forks a process per connection (PostgreSQL)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    total = sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return total
    for child in children:
        try:
            total += tree_cpu_seconds(int(child))
        except FileNotFoundError:
            pass  # it ended meanwhile: its time is in `total` now, or soon
    return total


def rss_bytes(pid: int) -> int:
    """Resident set size of a process now (VmRSS)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to the hard limit (children started
    afterwards inherit it); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def spawn_child(module: str, channels: int) -> tuple[subprocess.Popen[bytes], list[Connection]]:
    """Start `python -m module FD...` with `channels` socket pairs to talk over (pickled
    messages: multiprocessing.connection.Connection on both sides). Unlike
    multiprocessing's spawn, this never re-imports the caller's __main__."""
    pairs = [socket.socketpair() for _ in range(channels)]
    child_fds = [theirs.fileno() for _, theirs in pairs]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *map(str, child_fds)], pass_fds=child_fds, env=env
    )
    conns = []
    for ours, theirs in pairs:
        theirs.close()
        conns.append(Connection(ours.detach()))
    return proc, conns


def child_channels(argv: list[str]) -> list[Connection]:
    """In the child: the channels spawn_child passed."""
    return [Connection(int(fd)) for fd in argv]


def stop_child(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
