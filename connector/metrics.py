"""Prometheus metrics of a connector's link to its coordinator: reconnects, events sent
again, and the backlog not yet acknowledged.

They are named `supervisor_*` because the `supervisor` process serves them, next to its own
(supervisor.metrics.serve); docs/metrics.md lists them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics

# No `*_created` series: they double the exposition and nothing here reads them.
disable_created_metrics()
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
