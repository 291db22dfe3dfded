"""Prometheus metrics of a supervisor: its link to the switchboard and its load.

Module-level objects in a registry of their own; `supervisor run --metrics-port PORT`
serves them (prometheus_client's HTTP server, on 127.0.0.1 unless --metrics-host says
otherwise). Labels would be bounded words, never ids; none are needed yet.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

RECONNECTS = Counter(
    "supervisor_reconnects_total",
    "Connections to the switchboard established again after the first one.",
    registry=REGISTRY,
)
EVENTS_RESENT = Counter(
    "supervisor_events_resent_total",
    "Events sent again after a reconnect (sent before, never acknowledged).",
    registry=REGISTRY,
)
BACKLOG_BYTES = Gauge(
    "supervisor_backlog_bytes",
    "Encoded size of the events not yet acknowledged by the switchboard.",
    registry=REGISTRY,
)
RUNNING_JOBS = Gauge(
    "supervisor_running_jobs",
    "Runs this supervisor holds now (started and not yet ended).",
    registry=REGISTRY,
)


def serve(port: int, host: str = "127.0.0.1") -> int:
    """Serve the metrics over HTTP from a daemon thread; return the port (useful for 0)."""
    server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    return int(server.server_port)
