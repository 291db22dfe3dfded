"""Prometheus metrics of the switchboard: the queue, the runs, the supervisors' links and
the store.

Module-level objects in a registry of their own (not prometheus_client's global one), so
that nothing else imported into the process adds to or collides with them. Labels are
bounded sets of words, never ids: a label per supervisor or job would grow without end.
Served as Prometheus text by GET /metrics (switchboard.api.metrics), which first calls
`refresh` for the gauges that are counts of stored rows. docs/metrics.md lists them all.

Run observations (dispatch latency, run duration) are made inside the store's write
transaction, where the run's times are at hand, but only *staged* there: they reach the
histograms once that transaction commits, so a rolled-back change is never counted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from protocol.messages import STREAMS, Output
from protocol.spec import BACKEND_KINDS
from protocol.state import TERMINAL, Phase

if TYPE_CHECKING:
    from switchboard.sessions import Hub
    from switchboard.store.base import Store

log = logging.getLogger("switchboard.metrics")

# No `*_created` series: they double the exposition and nothing here reads them.
disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)

#: Queued jobs split by why they wait: placeable now, waiting out a restart backoff, or
#: matching no registered supervisor.
QUEUE_STATES = ("ready", "backoff", "unschedulable")
#: Connected supervisors: taking jobs, or drained (finishing what they hold).
SUPERVISOR_STATES = ("connected", "draining")
#: Why the switchboard cuts a supervisor's session short.
CUT_REASONS = ("heartbeat_timeout", "send_timeout", "outbox_full")
#: The label a backend kind outside the known set gets (keeps the label bounded).
OTHER = "other"
#: Scrapes closer together than this reuse the counts of stored rows.
REFRESH_MIN_S = 1.0

_SECONDS_SHORT = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SECONDS_WAIT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
_SECONDS_RUN = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 12 * 3600)

# --- supervisors and their links ------------------------------------------------------

SUPERVISOR_CONNECTIONS = Counter(
    "switchboard_supervisor_connections_total",
    "Supervisor sessions accepted (a Hello answered with a Welcome).",
    registry=REGISTRY,
)
SUPERVISOR_RECONNECTS = Counter(
    "switchboard_supervisor_reconnects_total",
    "Sessions accepted from a supervisor that had connected before (a dropped link, or a"
    " supervisor or switchboard restart).",
    registry=REGISTRY,
)
SESSIONS_REPLACED = Counter(
    "switchboard_sessions_replaced_total",
    "Supervisor sessions closed because the same supervisor connected again.",
    registry=REGISTRY,
)
SESSIONS_CUT = Counter(
    "switchboard_sessions_cut_total",
    "Supervisor sessions the switchboard ended because the supervisor went silent past"
    " the heartbeat timeout (reason=heartbeat_timeout), let a message wait on its socket"
    " past the send timeout (send_timeout), or let more wait than its outbox holds"
    " (outbox_full).",
    ["reason"],
    registry=REGISTRY,
)
SUPERVISORS_CONNECTED = Gauge(
    "switchboard_supervisors_connected",
    "Supervisors connected to this switchboard process, by state (draining: drained by"
    " an operator, finishing what it holds).",
    ["state"],
    registry=REGISTRY,
)

# --- events ---------------------------------------------------------------------------

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
OUTPUT_BYTES = Counter(
    "switchboard_output_bytes_total",
    "Bytes of job output received in new (not resent) output events, by stream.",
    ["stream"],
    registry=REGISTRY,
)
EVENT_BATCH_SECONDS = Histogram(
    "switchboard_event_batch_seconds",
    "Time to store one batch of a supervisor's events (until durable, before its Ack).",
    buckets=_SECONDS_SHORT,
    registry=REGISTRY,
)

# --- jobs and runs --------------------------------------------------------------------

JOBS = Gauge(
    "switchboard_jobs",
    "Stored jobs by phase (ended jobs count until they are deleted).",
    ["phase"],
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "switchboard_queue_depth",
    "Queued jobs by state: ready to place, waiting out a restart backoff, or matching no"
    " registered supervisor.",
    ["state"],
    registry=REGISTRY,
)
DISPATCH_LATENCY = Histogram(
    "switchboard_dispatch_latency_seconds",
    "From a job being queued for an attempt (or its restart backoff ending) until the"
    " switchboard stores that run as running, by backend kind.",
    ["backend"],
    buckets=_SECONDS_WAIT,
    registry=REGISTRY,
)
RUN_DURATION = Histogram(
    "switchboard_run_duration_seconds",
    "Ended runs: from running (or from assignment, if it never ran) to the end, by"
    " backend kind and outcome (the run's terminal phase).",
    ["backend", "outcome"],
    buckets=_SECONDS_RUN,
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

RUNS_UNDELIVERABLE = Counter(
    "switchboard_runs_undeliverable_total",
    "Runs never sent because their StartJob would be larger than the protocol's message"
    " limit (a job stored before its size was checked); each ends rejected.",
    registry=REGISTRY,
)
SPECS_TOO_LARGE = Counter(
    "switchboard_specs_too_large_total",
    "Job specs refused at submission (400) because the StartJob they make would be larger"
    " than the protocol's message limit.",
    registry=REGISTRY,
)

RUNS_PLACED = Counter(
    "switchboard_runs_placed_total",
    "Runs given to a supervisor: with the job's submission, when nothing else waited and"
    " a slot was known free (via=submission), or by a dispatch pass (via=pass).",
    ["via"],
    registry=REGISTRY,
)

# --- store ----------------------------------------------------------------------------

STORE_COMMIT_SECONDS = Histogram(
    "switchboard_store_commit_seconds",
    "Time of one store write transaction, from BEGIN to COMMIT (a group of requests).",
    buckets=_SECONDS_SHORT,
    registry=REGISTRY,
)

# Every label value of a counter or gauge exists from the start, so a scrape shows 0
# instead of nothing. (Histograms get theirs when first observed.)
for _via in ("grace_period", "reconcile"):
    RUNS_LOST.labels(_via)
for _via in ("reconcile", "events"):
    ZOMBIE_RUNS_STOPPED.labels(_via)
for _via in ("submission", "pass"):
    RUNS_PLACED.labels(_via)
for _reason in CUT_REASONS:
    SESSIONS_CUT.labels(_reason)
for _stream in STREAMS:
    OUTPUT_BYTES.labels(_stream)
for _phase in Phase:
    JOBS.labels(_phase.value)
for _state in QUEUE_STATES:
    QUEUE_DEPTH.labels(_state)
for _state in SUPERVISOR_STATES:
    SUPERVISORS_CONNECTED.labels(_state)


def backend_label(kind: str) -> str:
    return kind if kind in BACKEND_KINDS else OTHER


def count_output(events: Iterable[object]) -> None:
    """Count the bytes of the output events among `events` (just stored)."""
    for event in events:
        if isinstance(event, Output):
            OUTPUT_BYTES.labels(event.stream).inc(len(event.data))


# --- observations staged inside a store transaction ------------------------------------


class _Staged(threading.local):
    def __init__(self) -> None:
        self.items: list[Callable[[], None]] = []


_staged = _Staged()


def staged_mark() -> int:
    """Where the current request of a transaction starts (see `staged_drop`)."""
    return len(_staged.items)


def staged_drop(mark: int = 0) -> None:
    """Forget what was staged since `mark`: that part of the transaction was undone."""
    del _staged.items[mark:]


def staged_commit() -> None:
    """The transaction committed: make what it staged count."""
    items, _staged.items = _staged.items, []
    for observe in items:
        try:
            observe()
        except Exception:  # the transaction stands whatever happens here
            log.exception("metrics: an observation failed")


def run_running(kind: str, waited_s: float) -> None:
    """Stage a run reaching running after `waited_s` in the queue."""
    _staged.items.append(
        lambda: DISPATCH_LATENCY.labels(backend_label(kind)).observe(max(0.0, waited_s))
    )


def run_ended(kind: str, phase: Phase, duration_s: float) -> None:
    """Stage a run's end."""
    outcome = phase.value if phase in TERMINAL else OTHER
    _staged.items.append(
        lambda: RUN_DURATION.labels(backend_label(kind), outcome).observe(max(0.0, duration_s))
    )


# --- gauges that count stored rows, refreshed by a scrape ------------------------------

_refreshed_at = float("-inf")
_drained: frozenset[str] = frozenset()


async def refresh(store: Store, hub: Hub) -> None:
    """Bring the gauges that count stored rows (jobs, queue) up to date with one store
    read, at most once per REFRESH_MIN_S however often /metrics is scraped; the connected
    supervisors are counted on every scrape. A failing store leaves the last values (and
    says so in the log): the rest is still served."""
    global _refreshed_at, _drained
    now = time.monotonic()
    if now - _refreshed_at >= REFRESH_MIN_S:
        _refreshed_at = now  # also holds off scrapes arriving while this one reads
        try:
            counts = await store.counts()
        except Exception:
            log.exception("metrics: reading the counts from the store failed")
        else:
            for phase in Phase:
                JOBS.labels(phase.value).set(counts.jobs.get(phase.value, 0))
            for state in QUEUE_STATES:
                QUEUE_DEPTH.labels(state).set(counts.queued.get(state, 0))
            _drained = frozenset(counts.drained)
    draining = sum(1 for s in hub.sessions if s in _drained)
    SUPERVISORS_CONNECTED.labels("connected").set(len(hub.sessions) - draining)
    SUPERVISORS_CONNECTED.labels("draining").set(draining)
