"""Prometheus metrics of a connector's link to its coordinator: reconnects, events sent
again, and the backlog not yet acknowledged.

They are named `supervisor_*` because the `supervisor` process serves them, next to its own
(supervisor.metrics.serve); docs/metrics.md lists them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics

from protocol.exceptions import ProblemCode

# No `*_created` series: they double the exposition and nothing here reads them.
disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)

RECONNECTS = Counter(
    "supervisor_reconnects_total",
    "Connections to the switchboard established again after the first one.",
    registry=REGISTRY,
)
FAILOVERS = Counter(
    "supervisor_failovers_total",
    "Times the supervisor turned to the next of its switchboard addresses (several"
    " --switchboard URLs: replicas of one lab) after the one it used failed.",
    registry=REGISTRY,
)
EVENTS_RESENT = Counter(
    "supervisor_events_resent_total",
    "Events sent again after a reconnect (sent before, never acknowledged).",
    registry=REGISTRY,
)
EVENT_PROBLEMS = Counter(
    "supervisor_event_problems_total",
    "Events the switchboard acknowledged with a problem (protocol 1.2 ack.problems), by"
    " code: a bug in this supervisor or a run the switchboard gave up on.",
    ["code"],
    registry=REGISTRY,
)
for _code in ProblemCode:
    EVENT_PROBLEMS.labels(_code.value)
PROTOCOL_ERRORS = Counter(
    "supervisor_protocol_errors_total",
    "Connections to the switchboard this supervisor closed for what the switchboard sent,"
    " by the close code it was told in a protocol_error (docs/protocol.md §10): 1003 a"
    " binary message, 1007 an invalid one (not UTF-8, not JSON, a bad field), 1009 one over"
    " 1 MiB, 4000 no welcome first, 4002 a message not allowed then.",
    ["code"],
    registry=REGISTRY,
)
for _close in (1003, 1007, 1009, 4000, 4002):
    PROTOCOL_ERRORS.labels(str(_close))
BACKLOG_BYTES = Gauge(
    "supervisor_backlog_bytes",
    "Encoded size of the events not yet acknowledged by the switchboard.",
    registry=REGISTRY,
)
