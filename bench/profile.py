"""Profile the switchboard process under one benchmark's load with py-spy.
`python -m bench.profile LOAD [--seconds S] [--gil] [--out DIR] [--top N]`

LOAD is one of:
  batch    no-op jobs submitted in batches of 500, 100 simulated supervisors (4 slots each)
  single   no-op jobs submitted one POST at a time from 4 threads, same fleet
  latency  one no-op job at a time on the idle system, same fleet
  peer     the peer part's closed loop: 32 client threads sharing one Client, each
           submitting a no-op job and waiting for it (bench.sb_driver --via client),
           four real noop supervisors
  output   one job streaming stdout as fast as it can, one live follower
  scale    5,000 idle connected supervisors, heartbeats every 5 s
  memory   not py-spy: the switchboard runs under tracemalloc; Python memory allocated
           per connection over 2,000 connections, by package and by line

py-spy is not a dependency: `.venv/bin/pip install py-spy` first (it needs ptrace, i.e.
root or CAP_SYS_PTRACE). The raw samples (collapsed stacks, one line per stack with its
count, per thread) are written to DIR/LOAD.txt, e.g. for speedscope or flamegraph.pl; the
summary printed is the share of busy samples by thread and the functions with the most
own time (the leaf frame). Samples of threads waiting for work (the SQLite thread pools,
the writer's queue, uvloop's C loop) are left out of "busy"; with --gil only samples of
the thread holding the GIL are taken, which leaves out SQLite's own work (it runs without
the GIL) and shows what serializes the Python code.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.bed import NOOP, Bed, testbed
from bench.fleet import PARAM_OUTPUT_BYTES
from bench.output import Follower

LOADS = ("batch", "single", "latency", "peer", "output", "scale", "memory")
#: Connections the memory load adds between its two snapshots.
MEMORY_CONNECTIONS = 2000
#: Leaf frames of a thread that waits rather than works: (file suffix, function).
IDLE_LEAVES = {
    ("concurrent/futures/thread.py", "_worker"),  # a pool thread waiting for a task
    ("switchboard/store/sqlite_engine.py", "_Writer.run"),  # the writer waiting for requests
    ("threading.py", "Condition.wait"),
    ("asyncio/runners.py", "Runner.run"),  # inside uvloop's C loop: polling, C-level I/O
}
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")
_PREFIXES = (r".*/site-packages/", r".*/lib/python3\.\d+/", r"^.*?/(?=switchboard/|protocol/)")


def frame_name(frame: str) -> str:
    """`file:function` of one py-spy frame `function (path:line)`, paths shortened."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match["file"]
    for prefix in _PREFIXES:
        path = re.sub(prefix, "", path)
    return f"{path}:{match['func']}"


@dataclass
class Summary:
    busy: int
    idle: int
    threads: Counter[str]
    own: Counter[str]

    def report(self, top: int) -> str:
        total = self.busy or 1
        by_thread = ", ".join(f"{t} {100 * n / total:.0f}%" for t, n in self.threads.most_common())
        lines = [
            f"busy samples: {self.busy} (waiting ones left out: {self.idle})",
            f"busy by thread: {by_thread}",
            "own time (share of busy samples):",
        ]
        lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in self.own.most_common(top)]
        return "\n".join(lines)


def summarize(raw_lines: Iterable[str]) -> Summary:
    """Busy samples by thread and by leaf function, from py-spy's raw output
    (`thread (tid): Name;frame;...;frame COUNT` per line, with --threads)."""
    summary = Summary(0, 0, Counter(), Counter())
    for line in raw_lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        thread, *frames = stack.split(";")
        leaf = frame_name(frames[-1]) if frames else "?"
        file, _, func = leaf.rpartition(":")
        if any(file.endswith(suffix) and func == f for suffix, f in IDLE_LEAVES):
            summary.idle += int(count)
            continue
        summary.busy += int(count)
        name = thread.split(":", 1)[1].strip() if ":" in thread else thread
        summary.threads[name.split(" ")[0]] += int(count)
        summary.own[leaf] += int(count)
    return summary


# --- the loads ---------------------------------------------------------------------------


def _batch(bed: Bed, stop: threading.Event) -> None:
    sent = 0
    with ThreadPoolExecutor(2) as pool:
        while not stop.is_set():
            list(pool.map(lambda _: bed.api.call("POST", "/api/v1/jobs/batch", [NOOP] * 500), "ab"))
            sent += 1000
            # Keep about a thousand jobs waiting, asking the fleet rather than the switchboard.
            while sent - bed.fleet.call("counters")["done"] > 1000 and not stop.is_set():
                time.sleep(0.02)


def _single(bed: Bed, stop: threading.Event) -> None:
    with ThreadPoolExecutor(4) as pool:
        while not stop.is_set():
            list(pool.map(lambda _: bed.api.call("POST", "/api/v1/jobs", NOOP), range(200)))


def _latency(bed: Bed, stop: threading.Event) -> None:
    while not stop.is_set():
        time.sleep(0.01)
        bed.api.call("POST", "/api/v1/jobs", NOOP)
        time.sleep(0.01)


def _output(bed: Bed, stop: threading.Event, seconds: float) -> None:
    size = int((seconds + 10) * 300e6)  # more than the recording can take
    spec = {
        "name": "output",
        "backend": {"kind": "noop"},
        "parameters": {PARAM_OUTPUT_BYTES: {"value": str(size)}},
    }
    job_id = bed.api.call("POST", "/api/v1/jobs", spec)["id"]
    follower = Follower(bed.switchboard.port, bed.switchboard.admin_token, job_id)
    follower.start()
    stop.wait()


def _record(pid: int, seconds: float, gil: bool, raw: Path) -> None:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    command = [pyspy, "record", "--pid", str(pid), "--duration", str(int(seconds))]
    command += ["--rate", "250", "--format", "raw", "--threads", "-o", str(raw)]
    subprocess.run([*command, *(["--gil"] if gil else [])], check=True, capture_output=True)


def _peer(seconds: float, gil: bool, raw: Path) -> None:
    """The closed loop of the peer part against its switchboard, recorded meanwhile."""
    from bench import peer

    with peer.switchboard() as (server, env):
        driver = [
            sys.executable,
            "-m",
            "bench.sb_driver",
            "--via",
            "client",
            "loop",
            "--seconds",
            str(seconds + 5),
        ]
        loop = subprocess.Popen(driver, env=env, stdout=subprocess.DEVNULL)
        try:
            time.sleep(3)  # past the start-up transient
            _record(server.process.proc.pid, seconds, gil, raw)
        finally:
            loop.wait(60)


def run(load: str, seconds: float, gil: bool, out: Path, top: int) -> str:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(pyspy).exists():
        raise SystemExit("bench.profile: py-spy is missing (`.venv/bin/pip install py-spy`)")
    out.mkdir(parents=True, exist_ok=True)
    raw = out / f"{load}{'-gil' if gil else ''}.txt"
    if load == "peer":
        _peer(seconds, gil, raw)
        return summarize(raw.read_text().splitlines()).report(top) + f"\nraw samples: {raw}"
    with testbed() as bed:
        stop = threading.Event()
        loads: dict[str, Callable[[], None]] = {
            "batch": lambda: _batch(bed, stop),
            "single": lambda: _single(bed, stop),
            "latency": lambda: _latency(bed, stop),
            "output": lambda: _output(bed, stop, seconds),
        }
        if load == "scale":
            bed.connect(5000)
        else:
            bed.connect(100, max_jobs=4)
        worker = threading.Thread(target=loads.get(load, stop.wait), daemon=True)
        worker.start()
        time.sleep(3)  # past the start-up transient
        _record(bed.pid, seconds, gil, raw)
        stop.set()
        worker.join(30)
    return summarize(raw.read_text().splitlines()).report(top) + f"\nraw samples: {raw}"


# --- memory per connection --------------------------------------------------------------


def _serve_traced(argv: list[str]) -> None:
    """`switchboard` with tracemalloc on; SIGUSR1 writes a snapshot to $BENCH_SNAPSHOT.N."""
    import itertools
    import os
    import signal
    import tracemalloc

    from switchboard.cli import main as switchboard_main

    tracemalloc.start(1)
    count = itertools.count()

    def dump(signum: int, frame: object) -> None:
        path = f"{os.environ['BENCH_SNAPSHOT']}.{next(count)}"
        tracemalloc.take_snapshot().dump(path)
        print(f"snapshot written: {path}", flush=True)

    signal.signal(signal.SIGUSR1, dump)
    sys.exit(switchboard_main(argv))


def _group(filename: str) -> str:
    """The package (or standard-library module) a file belongs to."""
    if "/site-packages/" in filename:
        return filename.split("/site-packages/", 1)[1].split("/")[0]
    if match := re.search(r"/lib/python3\.\d+/([^/]+)", filename):
        return f"stdlib {match.group(1).removesuffix('.py')}"
    match = re.search(r"(switchboard|protocol)/", filename)
    return match.group(1) if match else filename


def memory(out: Path, top: int, count: int = MEMORY_CONNECTIONS) -> str:
    import os
    import signal
    import tempfile
    import tracemalloc

    from bench.fleet import FleetProcess
    from bench.procs import raise_fd_limit
    from tests.harness import Process, run_cli

    raise_fd_limit()
    out.mkdir(parents=True, exist_ok=True)
    base = out / "memory.snapshot"
    os.environ["BENCH_SNAPSHOT"] = str(base)  # inherited by the switchboard process
    with tempfile.TemporaryDirectory(prefix="sb-bench-") as tmp:
        data = Path(tmp) / "data"
        args = ["-m", "bench.profile", "serve-traced", "serve", "--port", "0"]
        server = Process([*args, "--data-dir", str(data)], Path(tmp) / "switchboard.log")
        try:
            port = server.wait_for_line(r"listening on https?://[\d.]+:(\d+)", 60).group(1)
            role = ["token", "create", "--role", "supervisor", "--data-dir", str(data)]
            token = run_cli("-m", "switchboard", *role).stdout.decode().strip()
            url = f"ws://127.0.0.1:{port}/ws/supervisor"
            fleet = FleetProcess()
            try:
                fleet.call("connect", url=url, token=token, count=10, prefix="warm")
                time.sleep(2)
                server.proc.send_signal(signal.SIGUSR1)
                server.wait_for_line("snapshot written", 60)
                fleet.call("connect", url=url, token=token, count=count)
                time.sleep(5)
                server.proc.send_signal(signal.SIGUSR1)
                server.wait_for_line("snapshot written", 60)
            finally:
                fleet.close()
        finally:
            server.stop()
    before = tracemalloc.Snapshot.load(f"{base}.0")
    after = tracemalloc.Snapshot.load(f"{base}.1")
    by_line = after.compare_to(before, "lineno")
    groups: Counter[str] = Counter()
    for stat in by_line:
        groups[_group(stat.traceback[0].filename)] += stat.size_diff
    total = sum(groups.values())
    lines = [f"Python memory per connection over {count}: {total / count / 1024:.1f} KiB"]
    lines += [f"  {n / count / 1024:5.1f} KiB  {name}" for name, n in groups.most_common(8)]
    lines.append("by line:")
    for stat in by_line[:top]:
        frame = stat.traceback[0]
        where = re.sub(r".*/(site-packages|lib/python3\.\d+)/", "", frame.filename)
        where = re.sub(r"^.*?/(?=switchboard/|protocol/)", "", where)
        lines.append(f"  {stat.size_diff / count:6.0f} B  {where}:{frame.lineno}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve-traced"]:
        _serve_traced(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("load", choices=LOADS)
    parser.add_argument("--seconds", type=float, default=15.0, help="recording length (15)")
    parser.add_argument("--gil", action="store_true", help="only samples holding the GIL")
    parser.add_argument("--out", type=Path, default=Path("profiles"), help="raw samples here")
    parser.add_argument("--top", type=int, default=25, help="functions listed (25)")
    args = parser.parse_args(argv)
    if args.load == "memory":
        print(memory(args.out, args.top))
    else:
        print(run(args.load, args.seconds, args.gil, args.out, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
