"""The benchmark suite: `python -m bench [--quick] [--only NAME] [--json FILE]`.

Runs every benchmark with the floor it is compared to, measured in the same run, and
prints one table: measure | unit | median | spread | floor | ratio | goal | ok?
(ratio = median / the floor's median). docs/performance.md explains each row and records
the figures of a full run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import uvloop

from bench import floors
from bench.bed import Bed, testbed
from bench.dispatch import SINGLE_THREADS
from bench.replicas import FAILOVER_SUPERVISORS
from bench.stats import Summary, machine

BENCHMARKS = (
    "latency",
    "output",
    "dispatch",
    "upload",
    "peer",
    "replicas",
    "scale",
    "wasm",
    "docker",
)


@dataclass(frozen=True)
class Sizes:
    supervisors: int = 100  # simulated fleet for latency, output and dispatch
    max_jobs: int = 4  # per simulated supervisor
    jobs: int = 3000  # per throughput repetition
    batch: int = 500  # jobs per POST /api/v1/jobs/batch
    reps: int = 3  # repetitions of every rate and of every latency series
    latency_jobs: int = 200  # sequential jobs per latency repetition
    live_jobs: int = 10  # jobs watched on /api/v1/live
    connections: int = 5000
    window_s: float = 10.0  # CPU window of the idle connection fleet
    heartbeat_s: float = 5.0  # the switchboard's default
    output_mb: int = 200  # bytes of stdout per output repetition, 10^6
    backlog_mib: int = 4  # unacknowledged output in flight (the supervisor's send window)
    upload_mb: int = 100  # the uploaded output file, 10^6 bytes
    upload_reps: int = 7  # of the upload and of console output alone / while uploading
    echo_trips: int = 2000  # websockets round trips per floor repetition
    sqlite_rows: int = 20000  # job rows per SQLite floor repetition
    wasm_runs: int = 300
    docker_runs: int = 20
    peer_threads: int = 32  # clients of the closed loop, each submit -> wait in turn
    peer_seconds: float = 10.0  # per closed-loop repetition
    peer_trips: int = 300  # idle round trips per repetition
    peer_waiters: int = 1000  # clients waiting at once, each on a job that does not end
    peer_waiters_window_s: float = 5.0  # CPU measured over this, once per repetition
    replica_jobs: int = 1000  # per throughput repetition of the replicas part
    failovers: int = 3  # replica kills of the failover measurement


QUICK = Sizes(
    supervisors=10,
    jobs=60,
    batch=20,
    reps=2,
    latency_jobs=20,
    live_jobs=2,
    connections=50,
    window_s=1.0,
    heartbeat_s=0.05,
    output_mb=4,
    upload_mb=4,
    upload_reps=2,
    echo_trips=200,
    sqlite_rows=1000,
    wasm_runs=20,
    docker_runs=3,
    peer_threads=4,
    peer_seconds=1.0,
    peer_trips=20,
    peer_waiters=50,
    peer_waiters_window_s=0.5,
    replica_jobs=40,
    failovers=1,
)


class Skipped(Exception):
    """A benchmark this machine cannot run (the reason is printed)."""


# --- the benchmarks ----------------------------------------------------------------------


def run_latency(bed: Bed, sizes: Sizes) -> dict[str, Summary]:
    from bench.dispatch import measure_latency, measure_live

    results = measure_latency(bed, sizes.latency_jobs, sizes.reps)
    results.update(measure_live(bed, sizes.live_jobs))
    server = floors.RawServer()
    try:
        p50, p99 = [], []
        for _ in range(sizes.reps):
            trips = sorted(uvloop.run(floors.echo_round_trips(server.url, sizes.echo_trips)))
            s = Summary.of(trips, "ms")
            p50.append(s.median)
            p99.append(s.p99)
    finally:
        server.close()
    results["floor_ws_echo_p50_ms"] = Summary.of(p50, "ms")
    results["floor_ws_echo_p99_ms"] = Summary.of(p99, "ms")
    return results


def run_output(bed: Bed, sizes: Sizes) -> dict[str, Summary]:
    from bench.output import measure_output

    size = sizes.output_mb * 1_000_000
    results = measure_output(bed, size, sizes.reps, sizes.backlog_mib * 1024 * 1024)
    server = floors.RawServer()
    try:
        rates = [uvloop.run(floors.stream_rate(server.url, size)) for _ in range(sizes.reps)]
    finally:
        server.close()
    results["floor_ws_stream_mb_s"] = Summary.of(rates, "MB/s")
    sqlite = [floors.sqlite_output_inserts(size) for _ in range(sizes.reps)]
    results["floor_sqlite_output_mb_s"] = Summary.of(sqlite, "MB/s")
    return results


def run_dispatch(bed: Bed, sizes: Sizes) -> dict[str, Summary]:
    from bench.dispatch import measure_throughput

    results = measure_throughput(bed, sizes.jobs, sizes.reps, sizes.batch)
    inserts = [floors.sqlite_job_inserts(sizes.sqlite_rows) for _ in range(sizes.reps)]
    results["floor_sqlite_job_inserts_per_s"] = Summary.of(inserts, "rows/s")
    return results


def run_upload(bed: Bed, sizes: Sizes) -> dict[str, Summary]:
    from bench.upload import measure_upload

    return measure_upload(
        bed,
        sizes.upload_mb * 1_000_000,
        sizes.output_mb * 1_000_000,
        sizes.upload_reps,
        sizes.backlog_mib * 1024 * 1024,
    )


def run_peer(sizes: Sizes) -> dict[str, Summary]:
    from bench import celery_peer, peer

    try:
        return peer.measure_peer(
            sizes.peer_threads,
            sizes.peer_seconds,
            sizes.peer_trips,
            sizes.reps,
            sizes.peer_waiters,
            sizes.peer_waiters_window_s,
        )
    except celery_peer.PeerMissing as exc:
        raise Skipped(str(exc)) from None


def run_replicas(sizes: Sizes) -> dict[str, Summary]:
    from bench.replicas import measure_replicas
    from tests.postgres import missing

    if problem := missing():
        raise Skipped(f"no PostgreSQL server binaries: {problem}")
    return measure_replicas(
        sizes.replica_jobs,
        sizes.reps,
        sizes.batch,
        sizes.supervisors,
        sizes.max_jobs,
        sizes.latency_jobs,
        sizes.failovers,
    )


def run_scale(sizes: Sizes) -> dict[str, Summary]:
    from bench import scale

    n, hb, window, reps = sizes.connections, sizes.heartbeat_s, sizes.window_s, sizes.reps
    results = scale.measure_floor(n, hb, window, reps)
    results.update(scale.measure_switchboard(n, window, reps, hb))
    return results


def run_wasm(sizes: Sizes) -> dict[str, Summary]:
    from bench import guest
    from bench.wasm_start import Sizes as WasmSizes
    from bench.wasm_start import measure_inprocess

    try:
        wasm = guest.compile_c(guest.STAMP, "stamp")
    except guest.ToolchainMissing as exc:
        raise Skipped(str(exc)) from None
    wasm_sizes = WasmSizes(cached=sizes.wasm_runs, uncached=2, jobs=20, reps=1, warmup=5)
    results = uvloop.run(measure_inprocess(wasm, wasm_sizes))
    return {
        "wasm_start_cached_ms": results["start_cached_ms"],
        "floor_wasm_bare_ms": results["floor_ms"],
    }


def run_docker(sizes: Sizes, docker_host: str | None) -> dict[str, Summary]:
    if shutil.which("docker") is None:
        raise Skipped("the docker CLI is not installed (needed for the `docker run` floor)")
    if docker_host is None:
        from tests.docker_engine import missing

        if problem := missing():
            raise Skipped(f"no private Docker engine: {problem}")
    from bench.docker_overhead import engine_at, measure

    with engine_at(docker_host) as host:
        results = uvloop.run(measure(host, sizes.docker_runs))
    return {
        "docker_job_ms": results["supervisor_ms"],
        "floor_docker_run_ms": results["docker_run_ms"],
    }


# --- the table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    floor: str | None = None
    #: (">=" or "<=", value, "median" or "ratio")
    goal: tuple[str, float, str] | None = None


def rows(sizes: Sizes) -> list[tuple[str, list[Row]]]:
    n, b = sizes.connections, sizes.batch
    return [
        (
            "latency",
            [
                Row("latency_response_p50_ms", "idle: submit -> POST answered, p50"),
                Row("latency_dispatch_p50_ms", "idle: submit -> StartJob at the supervisor, p50"),
                Row(
                    "latency_running_p50_ms",
                    "idle: submit -> running stored, p50",
                    "floor_ws_echo_p50_ms",
                ),
                Row(
                    "latency_running_p99_ms",
                    "idle: submit -> running stored, p99",
                    "floor_ws_echo_p99_ms",
                ),
                Row(
                    "latency_succeeded_p50_ms",
                    "idle: submit -> succeeded stored, p50",
                    "floor_ws_echo_p50_ms",
                    ("<=", 3.0, "median"),
                ),
                Row(
                    "latency_succeeded_p99_ms",
                    "idle: submit -> succeeded stored, p99",
                    "floor_ws_echo_p99_ms",
                    ("<=", 15.0, "median"),
                ),
                Row("latency_live_succeeded_ms", "idle: submit -> succeeded on /api/v1/live"),
                Row("floor_ws_echo_p50_ms", "floor: websockets echo round trip, p50"),
                Row("floor_ws_echo_p99_ms", "floor: websockets echo round trip, p99"),
            ],
        ),
        (
            "output",
            [
                Row(
                    "output_stored_mb_s",
                    "output: one job's stdout stored",
                    "floor_ws_stream_mb_s",
                    (">=", 100.0, "median"),
                ),
                Row("output_follower_mb_s", "output: at the live follower", "floor_ws_stream_mb_s"),
                Row("output_lag_p50_ms", "output: follower lag per chunk, p50"),
                Row(
                    "output_lag_p99_ms",
                    "output: follower lag per chunk, p99",
                    None,
                    ("<=", 250.0, "median"),
                ),
                Row("floor_ws_stream_mb_s", "floor: websockets, Output frames one way"),
                Row("floor_sqlite_output_mb_s", "floor: SQLite output rows, 4 per txn"),
            ],
        ),
        (
            "dispatch",
            [
                Row(
                    "dispatch_batch_jobs_per_s",
                    f"no-op jobs end to end, batches of {b}",
                    "floor_sqlite_job_inserts_per_s",
                    (">=", 2000.0, "median"),
                ),
                Row("dispatch_batch_switchboard_cpu_ms_per_job", "  switchboard CPU per job"),
                Row(
                    "dispatch_single_jobs_per_s",
                    "no-op jobs end to end, single POSTs",
                    "floor_http_health_per_s",
                    (">=", 2000.0, "median"),
                ),
                Row("dispatch_single_submit_per_s", "  single POSTs answered alone"),
                Row("dispatch_single_switchboard_cpu_ms_per_job", "  switchboard CPU per job"),
                Row("floor_sqlite_job_inserts_per_s", "floor: SQLite job rows, 100 per txn"),
                Row(
                    "floor_http_health_per_s",
                    f"floor: GET /api/v1/health, {SINGLE_THREADS} client threads",
                ),
            ],
        ),
        (
            "upload",
            [
                Row(
                    "upload_mb_s",
                    f"upload: one {sizes.upload_mb} MB output file, as a supervisor",
                    "floor_local_copy_mb_s",
                ),
                Row("upload_switchboard_cpu_ms_per_mb", "  switchboard CPU per MB"),
                Row("upload_host_cpu_ms_per_mb", "  uploading process CPU per MB"),
                Row("upload_output_alone_mb_s", "  console output of a run alone, stored"),
                Row(
                    "upload_output_during_mb_s",
                    "  the same while the host uploads",
                    "upload_output_alone_mb_s",
                    (">=", 0.9, "ratio"),
                ),
                Row("upload_during_output_mb_s", "  the uploads meanwhile"),
                Row(
                    "upload_output_during_copy_mb_s",
                    "  console output while the host copies locally",
                    "upload_output_alone_mb_s",
                ),
                Row("floor_local_copy_mb_s", "floor: local copy of the file, sha256'd"),
            ],
        ),
        (
            "peer",
            [
                Row(
                    "peer_client_loop_jobs_per_s",
                    f"submit -> wait, {sizes.peer_threads} threads, one Client: switchboard",
                    "peer_celery_loop_jobs_per_s",
                    (">=", 3.0, "ratio"),
                ),
                Row("peer_client_loop_p50_ms", "  one round trip, p50"),
                Row("peer_client_loop_cpu_ms_per_job", "  switchboard CPU per job"),
                Row(
                    "peer_switchboard_loop_jobs_per_s",
                    "  each trip alone (stdlib, POST ?wait=, a connection per thread)",
                    "peer_celery_loop_jobs_per_s",
                ),
                Row("peer_switchboard_loop_cpu_ms_per_job", "    switchboard CPU per job"),
                Row("peer_celery_loop_jobs_per_s", "peer: Celery + Redis, the same loop"),
                Row("peer_celery_loop_p50_ms", "  one round trip, p50"),
                Row(
                    "peer_switchboard_idle_p50_ms",
                    "idle submit -> result: switchboard p50",
                    "peer_celery_idle_p50_ms",
                    ("<=", 1.0, "ratio"),
                ),
                Row(
                    "peer_switchboard_idle_p99_ms",
                    "  switchboard p99",
                    "peer_celery_idle_p99_ms",
                    ("<=", 15.0, "median"),
                ),
                Row("peer_celery_idle_p50_ms", "peer: Celery + Redis idle p50"),
                Row("peer_celery_idle_p99_ms", "  Celery + Redis p99"),
                Row(
                    "peer_client_idle_p50_ms",
                    "  idle p50 via the client library",
                    "peer_celery_idle_p50_ms",
                ),
                Row("peer_client_idle_p99_ms", "  idle p99 via the client library"),
                Row(
                    "peer_waiters_cpu_pct",
                    f"{sizes.peer_waiters} clients waiting: switchboard CPU",
                    "peer_waiters_idle_cpu_pct",
                ),
                Row(
                    "peer_waiters_cost_cpu_pct",
                    "  what the waiting costs (less the idle switchboard)",
                    None,
                    ("<=", 1.0, "median"),
                ),
                Row("peer_waiters_rss_mib", "  switchboard RSS"),
                Row("peer_waiters_rss_kib_per_waiter", "  RSS per waiting client"),
                Row("peer_waiters_idle_cpu_pct", "  the same switchboard idle, no waiters: CPU"),
                Row("peer_waiters_idle_rss_mib", "  RSS"),
            ],
        ),
        (
            "replicas",
            [
                Row(
                    "replicas_sqlite_single_jobs_per_s",
                    "single POSTs end to end: one switchboard on SQLite",
                ),
                Row("replicas_sqlite_single_cpu_ms_per_job", "  switchboard CPU per job"),
                Row(
                    "replicas_pg1_single_jobs_per_s",
                    "  on PostgreSQL, one replica",
                    "replicas_sqlite_single_jobs_per_s",
                ),
                Row("replicas_pg1_single_cpu_ms_per_job", "  switchboard CPU per job"),
                Row("replicas_pg1_single_server_cpu_ms_per_job", "  PostgreSQL's CPU per job"),
                Row(
                    "replicas_pg2_single_jobs_per_s",
                    "  on PostgreSQL, two replicas",
                    "replicas_sqlite_single_jobs_per_s",
                    (">=", 1.0, "ratio"),
                ),
                Row("replicas_pg2_single_cpu_ms_per_job", "  replicas' CPU per job"),
                Row("replicas_pg2_single_server_cpu_ms_per_job", "  PostgreSQL's CPU per job"),
                Row(
                    "replicas_sqlite_batch_jobs_per_s",
                    f"batches of {b} end to end: one switchboard on SQLite",
                ),
                Row(
                    "replicas_pg1_batch_jobs_per_s",
                    "  on PostgreSQL, one replica",
                    "replicas_sqlite_batch_jobs_per_s",
                ),
                Row(
                    "replicas_pg2_batch_jobs_per_s",
                    "  on PostgreSQL, two replicas",
                    "replicas_sqlite_batch_jobs_per_s",
                ),
                Row("floor_pg_wal_flush_ms", "one WAL flush on this disk (8 kB + fdatasync)"),
                Row("floor_pg_round_trip_ms", "one statement's round trip to PostgreSQL"),
                Row(
                    "replicas_pg1_idle_succeeded_p50_ms",
                    "idle: submit -> succeeded stored on PostgreSQL, p50",
                    "floor_pg_round_trip_ms",
                    ("<=", 5.0, "median"),
                ),
                Row(
                    "replicas_pg1_idle_succeeded_p99_ms",
                    "  p99",
                    None,
                    ("<=", 25.0, "median"),
                ),
                Row(
                    "replicas_pg1_async_idle_succeeded_p50_ms",
                    "  the same, commits not waiting for the flush, p50",
                    "floor_pg_round_trip_ms",
                ),
                Row("replicas_pg1_async_idle_succeeded_p99_ms", "  p99"),
                Row(
                    "replicas_failover_reconnected_s",
                    f"replica killed: its {FAILOVER_SUPERVISORS} supervisors on the other",
                    None,
                    ("<=", 5.0, "median"),
                ),
                Row("replicas_failover_first_job_s", "  the first job after the kill succeeded"),
            ],
        ),
        (
            "scale",
            [
                Row(
                    "scale_rss_kib_per_conn",
                    f"{n} idle supervisors: RSS per connection",
                    "floor_raw_rss_kib_per_conn",
                    ("<=", 40.0, "median"),
                ),
                Row("scale_cpu_pct", f"{n} idle supervisors: switchboard CPU"),
                Row("scale_quiet_cpu_pct", "  the same without heartbeats"),
                Row("scale_heartbeat_cpu_pct", "  heartbeats alone", "floor_raw_cpu_pct"),
                Row(
                    "scale_us_per_heartbeat",
                    "  heartbeats alone, per message",
                    "floor_raw_us_per_heartbeat",
                ),
                Row("scale_warm_cpu_pct", "  switchboard CPU with 10, no heartbeats"),
                Row("scale_connects_per_s", "  connections opened per second"),
                Row("floor_raw_rss_kib_per_conn", "floor: bare websockets server, RSS/conn"),
                Row("floor_raw_cpu_pct", "floor: bare websockets server, CPU"),
                Row("floor_raw_us_per_heartbeat", "floor: bare server, CPU per message"),
            ],
        ),
        (
            "wasm",
            [
                Row(
                    "wasm_start_cached_ms",
                    "wasm start, cached module",
                    "floor_wasm_bare_ms",
                    ("<=", 5.0, "median"),
                ),
                Row("floor_wasm_bare_ms", "floor: bare wasmtime-py, precompiled"),
            ],
        ),
        (
            "docker",
            [
                Row(
                    "docker_job_ms",
                    "docker job: StartJob -> exit reported",
                    "floor_docker_run_ms",
                    ("<=", 1.0, "ratio"),
                ),
                Row("floor_docker_run_ms", "floor: docker run --rm"),
            ],
        ),
    ]


def evaluate(results: dict[str, Summary], sizes: Sizes) -> list[dict[str, Any]]:
    """Every row whose figure was measured: numbers, ratio to its floor, goal verdict."""
    out = []
    for section, section_rows in rows(sizes):
        for row in section_rows:
            s = results.get(row.key)
            if s is None:
                continue
            iqr = s.n >= 8
            floor = results.get(row.floor) if row.floor else None
            ratio = s.median / floor.median if floor and floor.median else None
            entry: dict[str, Any] = {
                "section": section,
                "key": row.key,
                "label": row.label,
                "unit": s.unit,
                "n": s.n,
                "median": s.median,
                "spread": "iqr" if iqr else "range",
                "low": s.p25 if iqr else s.min,
                "high": s.p75 if iqr else s.max,
                "floor": floor.median if floor else None,
                "ratio": ratio,
                "goal": None,
                "met": None,
            }
            if row.goal is not None:
                op, target, on = row.goal
                value = ratio if on == "ratio" else s.median
                entry["goal"] = f"{'ratio ' if on == 'ratio' else ''}{op} {target:g}"
                if value is not None:
                    entry["met"] = value >= target if op == ">=" else value <= target
            out.append(entry)
    return out


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 0.1:
        return f"{value:.2f}"
    return f"{value:.2g}"


def table(evaluated: list[dict[str, Any]]) -> str:
    head = ("measure", "unit", "median", "spread", "floor", "ratio", "goal", "ok?")
    lines = []
    for e in evaluated:
        spread = f"{_num(e['low'])}-{_num(e['high'])}"
        ok = "-" if e["met"] is None else ("yes" if e["met"] else "NO")
        ratio = _ratio(e["ratio"])
        median, floor = _num(e["median"]), _num(e["floor"])
        lines.append((e["label"], e["unit"], median, spread, floor, ratio, e["goal"] or "-", ok))
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]

    def fmt(r: tuple[str, ...]) -> str:
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        return "  ".join(cells)

    out = [fmt(head), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    section = None
    for e, r in zip(evaluated, lines, strict=True):
        if section is not None and e["section"] != section:
            out.append("")
        section = e["section"]
        out.append(fmt(r))
    return "\n".join(out)


def markdown(evaluated: list[dict[str, Any]]) -> str:
    """The same table as Markdown (for docs/performance.md)."""
    lines = [
        "| measure | unit | median | spread | floor | ratio | goal | ok? |",
        "|---|---|--:|--:|--:|--:|---|---|",
    ]
    for e in evaluated:
        ok = "" if e["met"] is None else ("yes" if e["met"] else "**no**")
        spread = f"{_num(e['low'])}–{_num(e['high'])}"
        goal = (e["goal"] or "").replace("<=", "≤").replace(">=", "≥")
        label = e["label"]
        label = "&nbsp;&nbsp;" + label.strip() if label.startswith(" ") else label
        cells = [label, e["unit"], _num(e["median"]), spread, _num(e["floor"])]
        cells += [_ratio(e["ratio"]), goal, ok]
        lines.append("| " + " | ".join(c if c != "-" else "" for c in cells) + " |")
    return "\n".join(lines)


# --- running -----------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    info = machine()
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as meminfo:
            kib = int(meminfo.readline().split()[1])
        info["ram_gib"] = round(kib / 1024 / 1024, 1)
    info["kernel"] = platform.release()
    return info


def run(
    sizes: Sizes,
    only: list[str],
    docker_host: str | None = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    info = _machine()
    results: dict[str, Summary] = {}
    skipped: dict[str, str] = {}
    seconds: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        beds: list[Bed] = []

        def bed() -> Bed:
            if not beds:
                shared = stack.enter_context(testbed())
                shared.connect(sizes.supervisors, max_jobs=sizes.max_jobs)
                beds.append(shared)
            return beds[0]

        runners: dict[str, Callable[[], dict[str, Summary]]] = {
            "latency": lambda: run_latency(bed(), sizes),
            "output": lambda: run_output(bed(), sizes),
            "dispatch": lambda: run_dispatch(bed(), sizes),
            "upload": lambda: run_upload(bed(), sizes),
            "peer": lambda: run_peer(sizes),
            "replicas": lambda: run_replicas(sizes),
            "scale": lambda: run_scale(sizes),
            "wasm": lambda: run_wasm(sizes),
            "docker": lambda: run_docker(sizes, docker_host),
        }
        for name in BENCHMARKS:
            if name not in only:
                continue
            if name in ("peer", "replicas", "scale") and beds:
                stack.close()  # its own switchboard: the shared one goes first
                beds.clear()
            log(f"bench: {name}...")
            started = time.monotonic()
            try:
                results.update(runners[name]())
            except Skipped as exc:
                skipped[name] = str(exc)
                log(f"bench: {name} SKIPPED: {exc}")
            seconds[name] = round(time.monotonic() - started, 1)
    return {
        "machine": info,
        "sizes": asdict(sizes),
        "seconds": seconds,
        "results": {k: v.as_dict() for k, v in results.items()},
        "rows": evaluate(results, sizes),
        "skipped": skipped,
    }


def report(data: dict[str, Any]) -> str:
    m = data["machine"]
    lines = [
        f"machine: {m['cpu_model']}, nproc={m['nproc']}, RAM {m.get('ram_gib', '?')} GiB, "
        f"kernel {m.get('kernel', '?')}, python {m['python']}, load(1m) at start "
        f"{m['loadavg_1m']:.2f}, code {m['code']}",
        "",
        table(data["rows"]),
        "",
        "median over repetitions; spread: min-max over repetitions, or p25-p75 where n >= 8;",
        "ratio = median / floor median; MB = 10^6 bytes; see docs/performance.md",
    ]
    lines += [f"SKIPPED {name}: {why}" for name, why in data["skipped"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument(
        "--only",
        action="append",
        choices=BENCHMARKS,
        metavar="NAME",
        help="repeatable; one of: " + ", ".join(BENCHMARKS),
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also save every number here")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="also save the table here")
    parser.add_argument("--docker-host", help="an engine to use (default: start a private one)")
    parser.add_argument(
        "--supervisors", type=int, help="simulated fleet for latency, output, dispatch, upload"
    )
    parser.add_argument("--max-jobs", type=int, help="slots per simulated supervisor")
    parser.add_argument(
        "--backlog-mib", type=int, help="unacknowledged output the writing supervisor allows"
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    if args.supervisors is not None:
        sizes = replace(sizes, supervisors=args.supervisors)
    if args.max_jobs is not None:
        sizes = replace(sizes, max_jobs=args.max_jobs)
    if args.backlog_mib is not None:
        sizes = replace(sizes, backlog_mib=args.backlog_mib)
    data = run(sizes, args.only or list(BENCHMARKS), args.docker_host)
    print(report(data))
    if args.json is not None:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    if args.markdown is not None:
        args.markdown.write_text(markdown(data["rows"]) + "\n")
    return 0
