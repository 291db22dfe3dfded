"""Prometheus metrics of the switchboard: how the delivery guarantees are doing.

Module-level objects in a registry of their own (not prometheus_client's global one), so
that nothing else imported into the process adds to or collides with them. Labels are
bounded sets of words, never ids: a label per supervisor or job would grow without end.
Served as Prometheus text by GET /metrics (switchboard.api.metrics).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

SUPERVISOR_CONNECTIONS = Counter(
    "switchboard_supervisor_connections_total",
    "Supervisor sessions accepted (a Hello answered with a Welcome).",
    registry=REGISTRY,
)
SESSIONS_REPLACED = Counter(
    "switchboard_sessions_replaced_total",
    "Supervisor sessions closed because the same supervisor connected again.",
    registry=REGISTRY,
)
EVENTS_STORED = Counter(
    "switchboard_events_stored_total",
    "Supervisor events stored (each once; resends are counted as duplicates instead).",
    registry=REGISTRY,
)
DUPLICATE_EVENTS = Counter(
    "switchboard_duplicate_events_total",
    "Supervisor events dropped because their seq was already stored (resends).",
    registry=REGISTRY,
)
RUNS_LOST = Counter(
    "switchboard_runs_lost_total",
    "Runs given up as lost: their supervisor stayed away past the grace period"
    " (via=grace_period) or came back without them (via=reconcile).",
    ["via"],
    registry=REGISTRY,
)
ZOMBIE_RUNS_STOPPED = Counter(
    "switchboard_zombie_runs_stopped_total",
    "StopJob sent for runs the switchboard no longer wants: found when a supervisor"
    " reconnects (via=reconcile) or when their events arrive (via=events).",
    ["via"],
    registry=REGISTRY,
)
SUPERVISORS_CONNECTED = Gauge(
    "switchboard_supervisors_connected",
    "Supervisors connected to this switchboard process now.",
    registry=REGISTRY,
)
STORE_COMMIT_SECONDS = Histogram(
    "switchboard_store_commit_seconds",
    "Time to store one batch of supervisor events (one transaction), before its Ack.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY,
)

# Every label value exists from the start, so a scrape shows 0 instead of nothing.
for _via in ("grace_period", "reconcile"):
    RUNS_LOST.labels(_via)
for _via in ("reconcile", "events"):
    ZOMBIE_RUNS_STOPPED.labels(_via)
