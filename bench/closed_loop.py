"""A closed loop of client threads, each doing one round trip (submit a no-op job, wait for
its result) after the other; and the idle round trip, one client alone. The same code
drives the switchboard and its peer (bench.celery_peer runs it in Celery's virtualenv), so
it imports nothing but the standard library.

    loop --threads 32 --seconds 10   -> {"jobs", "seconds", "jobs_per_s", "p50_ms", "p99_ms"}
    idle --trips 200                 -> {"trips", "p50_ms", "p99_ms"}
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable

#: Round trips each client makes before the clock starts (connections, caches).
WARM_TRIPS = 3


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def loop(round_trip: Callable[[], None], threads: int, seconds: float) -> dict:
    """`threads` clients for `seconds`: jobs done per second, and each trip's time."""
    times: list[list[float]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    clock = [0.0, 0.0]  # began, stop at: set by the last thread to reach the barrier

    def start_clock() -> None:
        clock[0] = time.perf_counter()
        clock[1] = clock[0] + seconds

    ready = threading.Barrier(threads + 1, action=start_clock)

    def client(mine: list[float]) -> None:
        try:
            for _ in range(WARM_TRIPS):
                round_trip()
            ready.wait()
            while (start := time.perf_counter()) < clock[1]:
                round_trip()
                mine.append(time.perf_counter() - start)
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)
            ready.abort()

    workers = [threading.Thread(target=client, args=(t,), daemon=True) for t in times]
    for worker in workers:
        worker.start()
    ready.wait()
    for worker in workers:
        worker.join()
    # Trips started before the stop count whole: the window ends when the last one does.
    elapsed = time.perf_counter() - clock[0]
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed, e.g. {errors[0]!r}")
    every = [t for mine in times for t in mine]
    return {
        "jobs": len(every),
        "seconds": elapsed,
        "jobs_per_s": len(every) / elapsed,
        "p50_ms": statistics.median(every) * 1e3,
        "p99_ms": _percentile(every, 0.99) * 1e3,
    }


def idle(round_trip: Callable[[], None], trips: int) -> dict:
    """One client alone, `trips` round trips one after the other."""
    for _ in range(WARM_TRIPS):
        round_trip()
    times = []
    for _ in range(trips):
        start = time.perf_counter()
        round_trip()
        times.append(time.perf_counter() - start)
    return {
        "trips": trips,
        "p50_ms": statistics.median(times) * 1e3,
        "p99_ms": _percentile(times, 0.99) * 1e3,
    }


def main(round_trip: Callable[[], None], argv: list[str]) -> None:
    """The driver's command line: prints one JSON object."""
    parser = argparse.ArgumentParser(prog="closed_loop")
    commands = parser.add_subparsers(dest="command", required=True)
    looping = commands.add_parser("loop")
    looping.add_argument("--threads", type=int, default=32)
    looping.add_argument("--seconds", type=float, default=10.0)
    alone = commands.add_parser("idle")
    alone.add_argument("--trips", type=int, default=200)
    args = parser.parse_args(argv)
    if args.command == "loop":
        result = loop(round_trip, args.threads, args.seconds)
    else:
        result = idle(round_trip, args.trips)
    print(json.dumps(result))
