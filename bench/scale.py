"""Connection scale: many idle supervisor connections on one switchboard process.

The simulated fleet (one process, real sockets, the real protocol) first opens WARM
connections, then `count` more. RSS per connection is the switchboard's VmRSS growth over
those `count`, divided by `count`; it is read again at the start of every window (it
should not creep). CPU is the switchboard's CPU time (all threads) over windows of an idle
fleet, as % of one core. Two switchboard processes are measured the same way: one with
heartbeats every `interval_s` (each connection sends one and receives one per interval),
one with heartbeats every hour, which shows what the idle switchboard spends besides
heartbeats (timers, periodic scans of the supervisor table). The difference is the CPU
heartbeats cost, also given per heartbeat message.

The floor is a bare `websockets` server (bench.floors.RawServer) holding the same number
of connections from the same fleet code, each sending a heartbeat-sized frame at the same
interval, which it echoes: one message in and one out per interval, like a switchboard.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from bench.bed import testbed
from bench.fleet import FleetProcess
from bench.floors import RawServer
from bench.procs import cpu_seconds, rss_bytes
from bench.stats import Summary

#: The heartbeat interval of the comparison run: no heartbeat falls in its windows.
QUIET_INTERVAL_S = 3600.0
#: Connections opened before the baseline, so one-time costs (code paths run once,
#: thread pools, caches) are not counted per connection.
WARM = 10


def _windows(
    pid: int,
    counters: Callable[[], dict],
    count: int,
    rss_before: int,
    window_s: float,
    windows: int,
) -> dict[str, list[float]]:
    """Per window: RSS growth per connection (KiB), CPU (% of one core), heartbeat
    messages (sent + received by the fleet), and the window's length (s)."""
    out: dict[str, list[float]] = {"rss": [], "cpu": [], "messages": [], "took": []}
    for _ in range(windows):
        out["rss"].append((rss_bytes(pid) - rss_before) / count / 1024)
        before, cpu_before, started = counters(), cpu_seconds(pid), time.monotonic()
        time.sleep(window_s)
        after, cpu, took = counters(), cpu_seconds(pid) - cpu_before, time.monotonic() - started
        if after["disconnects"] or after["error_count"]:
            raise RuntimeError(f"the fleet lost connections: {after}")
        out["cpu"].append(cpu / took * 100)
        out["took"].append(took)
        out["messages"].append(
            sum(after[k] - before[k] for k in ("heartbeats_sent", "heartbeats_received"))
        )
    return out


def _heartbeat_args(interval_s: float) -> tuple[str, ...]:
    timeout = max(20.0, 4 * interval_s)
    return ("--heartbeat-interval", str(interval_s), "--heartbeat-timeout", str(timeout))


def _switchboard(
    count: int, window_s: float, windows: int, interval_s: float
) -> tuple[dict[str, list[float]], float, float]:
    """One switchboard process: its windows with `count` connections, connections opened
    per second, and its CPU (% of a core) over one window with only WARM connections."""
    with testbed(extra_args=_heartbeat_args(interval_s)) as bed:
        bed.connect(WARM, prefix="warm")
        time.sleep(min(2.0, window_s))

        def counters() -> dict:
            return bed.fleet.call("counters")

        warm = _windows(bed.pid, counters, WARM, rss_bytes(bed.pid), window_s, 1)
        rss_before = rss_bytes(bed.pid)
        took = bed.connect(count)
        time.sleep(min(2.0, window_s))
        return (
            _windows(bed.pid, counters, count, rss_before, window_s, windows),
            count / took,
            warm["cpu"][0],
        )


def measure_switchboard(
    count: int, window_s: float, windows: int, interval_s: float
) -> dict[str, Summary]:
    """Two switchboard processes: one with heartbeats every `interval_s`, one with
    heartbeats every hour (none in the windows). What the second spends is the
    background (timers, periodic scans); the difference is what heartbeats cost."""
    beat, connects, _ = _switchboard(count, window_s, windows, interval_s)
    quiet, quiet_connects, warm_cpu = _switchboard(count, window_s, windows, QUIET_INTERVAL_S)
    if min(beat["messages"]) == 0:
        raise RuntimeError("no heartbeats in a whole window: make the window longer")
    background = statistics.median(quiet["cpu"])
    heartbeat_pct = [cpu - background for cpu in beat["cpu"]]
    per_message = [
        pct / 100 * took / messages * 1e6
        for pct, took, messages in zip(heartbeat_pct, beat["took"], beat["messages"], strict=True)
    ]
    return {
        "scale_rss_kib_per_conn": Summary.of(beat["rss"] + quiet["rss"], "KiB"),
        "scale_cpu_pct": Summary.of(beat["cpu"], "%core"),
        "scale_quiet_cpu_pct": Summary.of(quiet["cpu"], "%core"),
        "scale_heartbeat_cpu_pct": Summary.of(heartbeat_pct, "%core"),
        "scale_us_per_heartbeat": Summary.of(per_message, "us"),
        "scale_warm_cpu_pct": Summary.of([warm_cpu], "%core"),
        "scale_connects_per_s": Summary.of([connects, quiet_connects], "conn/s"),
    }


def measure_floor(
    count: int, interval_s: float, window_s: float, windows: int
) -> dict[str, Summary]:
    server = RawServer()
    try:
        fleet = FleetProcess()
        try:
            fleet.call("connect_raw", url=server.url, count=WARM, interval_s=interval_s)
            time.sleep(0.5)
            rss_before = rss_bytes(server.pid)
            fleet.call("connect_raw", url=server.url, count=count, interval_s=interval_s)
            time.sleep(min(2.0, window_s))

            def counters() -> dict:
                return fleet.call("counters")

            raw = _windows(server.pid, counters, count, rss_before, window_s, windows)
        finally:
            fleet.close()
    finally:
        server.close()
    per_message = [
        cpu / 100 * took / messages * 1e6
        for cpu, took, messages in zip(raw["cpu"], raw["took"], raw["messages"], strict=True)
    ]
    return {
        "floor_raw_rss_kib_per_conn": Summary.of(raw["rss"], "KiB"),
        "floor_raw_cpu_pct": Summary.of(raw["cpu"], "%core"),
        "floor_raw_us_per_heartbeat": Summary.of(per_message, "us"),
    }
