"""Wasm job start latency and throughput. `python -m bench.wasm_start [--quick] [--json PATH]`

Start latency is measured from the guest's side: the guest's first action reads the wall
clock and prints it; the host subtracts its time.time_ns() from just before start_job.
Every latency is also taken for bare wasmtime-py in the same process (the floor), with
the two interleaved round by round so that a noisy neighbour hits both alike.
See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import uvloop

from bench import guest
from bench.inprocess import BareWasmtime, Bench, MemoryArtifacts, new_work_dir
from bench.stats import Summary, machine, table

#: The issue's goal for the median cached start latency.
GOAL_MS = 5.0


@dataclass(frozen=True)
class Sizes:
    cached: int = 300  # interleaved rounds: one bare run, one supervisor run
    uncached: int = 40  # same, each with a never-seen module (compile included)
    jobs: int = 1000  # tiny jobs per throughput repetition
    reps: int = 3  # throughput repetitions (in-process and end to end)
    max_jobs: int = 4
    warmup: int = 5


QUICK = Sizes(cached=30, uncached=5, jobs=20, reps=2, warmup=2)


async def measure_inprocess(wasm: bytes, sizes: Sizes) -> dict[str, Summary]:
    artifacts = MemoryArtifacts()
    digest = artifacts.add(wasm)
    bare = BareWasmtime(wasm)
    work_dir = new_work_dir()
    bench = Bench(artifacts, sizes.max_jobs, work_dir)
    try:
        for _ in range(sizes.warmup):  # compiles the module once, starts threads
            bare.timed_run()
            await bench.timed_run(digest)

        floor, cached, running, starting = [], [], [], []
        for _ in range(sizes.cached):
            floor.append(bare.timed_run())
            marks = await bench.timed_run(digest)
            cached.append(marks["guest"])
            starting.append(marks["starting"])
            running.append(marks["running"])

        floor_uncached, uncached = [], []
        for i in range(sizes.uncached):
            floor_uncached.append(bare.timed_run(guest.with_nonce(wasm, 2 * i)))
            unique = artifacts.add(guest.with_nonce(wasm, 2 * i + 1))
            uncached.append((await bench.timed_run(unique))["guest"])
            del artifacts.blobs[unique]

        rates, cpu, refused = [], [], 0
        for _ in range(sizes.reps):
            rate, cpu_ms, refusals = await bench.throughput(digest, sizes.jobs)
            rates.append(rate)
            cpu.append(cpu_ms)
            refused += refusals
        bare_rates = [bare.throughput(sizes.jobs) for _ in range(sizes.reps)]
    finally:
        await bench.close()
        shutil.rmtree(work_dir, ignore_errors=True)
    return {
        "start_cached_ms": Summary.of(cached, "ms"),
        "start_cached_to_starting_ms": Summary.of(starting, "ms"),
        "start_cached_to_running_ms": Summary.of(running, "ms"),
        "floor_ms": Summary.of(floor, "ms"),
        "start_uncached_ms": Summary.of(uncached, "ms"),
        "floor_uncached_ms": Summary.of(floor_uncached, "ms"),
        "inprocess_jobs_per_s": Summary.of(rates, "jobs/s"),
        "inprocess_cpu_ms_per_job": Summary.of(cpu, "ms"),
        "inprocess_refused_starts": Summary.of([float(refused)], "count"),
        "floor_sequential_runs_per_s": Summary.of(bare_rates, "runs/s"),
    }


LABELS = {
    "start_cached_ms": "start latency, cached: start_job -> guest entry",
    "start_cached_to_starting_ms": "  of which start_job -> 'starting' reported",
    "start_cached_to_running_ms": "  of which start_job -> 'running' reported",
    "floor_ms": "floor: bare wasmtime-py, precompiled -> guest entry",
    "start_uncached_ms": "start latency, uncached (compile included)",
    "floor_uncached_ms": "floor: bare wasmtime-py, compile -> guest entry",
    "inprocess_jobs_per_s": "throughput, in-process BackendSupervisor",
    "inprocess_cpu_ms_per_job": "  process CPU per job, all threads",
    "inprocess_refused_starts": "  start_job refused for a busy slot (total)",
    "floor_sequential_runs_per_s": "floor: bare wasmtime-py, sequential, 1 thread",
    "e2e_jobs_per_s": "throughput, end to end (REST -> switchboard -> supervisor)",
    "e2e_submit_per_s": "  REST submissions alone (POST /api/v1/jobs)",
    "e2e_switchboard_cpu_ms_per_job": "  switchboard process CPU per job",
    "e2e_supervisor_cpu_ms_per_job": "  supervisor process CPU per job",
    "e2e_extra_attempts": "  runs beyond one per job (total)",
}


def ratios(results: dict[str, Summary]) -> dict[str, float]:
    """Medians over their floor's median (1.0 = as fast as bare wasmtime-py)."""
    pairs = {
        "start_cached_vs_floor": ("start_cached_ms", "floor_ms"),
        "start_uncached_vs_floor_uncached": ("start_uncached_ms", "floor_uncached_ms"),
        "start_uncached_vs_floor": ("start_uncached_ms", "floor_ms"),
    }
    out = {k: results[a].median / results[b].median for k, (a, b) in pairs.items()}
    floor_rate = results["floor_sequential_runs_per_s"].median
    for key in ("inprocess_jobs_per_s", "e2e_jobs_per_s"):
        if key in results:
            out[f"{key.removesuffix('_jobs_per_s')}_vs_floor_rate"] = (
                results[key].median / floor_rate
            )
    return out


def run(sizes: Sizes, *, e2e: bool = True) -> dict[str, Any]:
    """Every measurement; the dict that --json saves."""
    info = machine()
    wasm = guest.compile_c(guest.STAMP, "stamp")
    results = uvloop.run(measure_inprocess(wasm, sizes))  # as the supervisor CLI runs
    if e2e:
        from bench.e2e import measure_e2e  # starts real processes

        results.update(measure_e2e(wasm, sizes.jobs, sizes.reps, sizes.max_jobs))
    return {
        "machine": info,
        "sizes": asdict(sizes),
        "module_bytes": len(wasm),
        "results": {k: v.as_dict() for k, v in results.items()},
        "ratios": ratios(results),
        "goal_ms": GOAL_MS,
    }


def report(data: dict[str, Any]) -> str:
    m = data["machine"]
    lines = [
        f"machine: {m['cpu_model']}, nproc={m['nproc']}, load(1m)={m['loadavg_1m']:.2f}; "
        f"python {m['python']}, wasmtime-py {m['wasmtime_py']}; "
        f"module {data['module_bytes']} bytes; code {m['code']}",
        "",
        table([(LABELS[k], Summary(**v)) for k, v in data["results"].items()]),
        "",
    ]
    lines += [f"ratio {name}: {value:.2f}" for name, value in data["ratios"].items()]
    median = data["results"]["start_cached_ms"]["median"]
    verdict = "met" if median <= data["goal_ms"] else "NOT met"
    lines.append(f"goal: cached start <= {data['goal_ms']:g} ms median: {verdict} ({median:.3f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wasm_start", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also save results here")
    parser.add_argument("--no-e2e", action="store_true", help="skip the real-process part")
    parser.add_argument("--jobs", type=int, help="tiny jobs per throughput repetition")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    if args.jobs is not None:
        sizes = replace(sizes, jobs=args.jobs)
    try:
        data = run(sizes, e2e=not args.no_e2e)
    except guest.ToolchainMissing as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    print(report(data))
    if args.json is not None:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
