"""Prometheus metrics of a supervisor: its load, the errors it reports and its caches.

Module-level objects in a registry of their own; `supervisor run --metrics-port PORT`
serves them, with the connector's (connector.metrics: its link to the switchboard), from
prometheus_client's HTTP server, on 127.0.0.1 unless --metrics-host says otherwise.
Labels are bounded sets of words (error kinds, phases, cache names), never ids.
docs/metrics.md lists them all.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    start_http_server,
)

from protocol.exceptions import JobErrorKind
from protocol.state import TERMINAL, Phase

# No `*_created` series: they double the exposition and nothing here reads them.
disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)

#: The caches that count hits and misses: compiled Wasm modules (memory or disk), and
#: image artifacts already loaded into the Docker engine.
CACHES = ("wasm_module", "docker_image", "input")
#: Per-run limits whose overruns are counted: an image artifact bigger (unpacked) than the
#: Docker config allows, a Wasm guest writing more to /scratch than its quota, and a run's
#: inputs taking more than --inputs-max-mb.
LIMITS = ("image_unpacked", "wasm_scratch", "inputs")

RUNNING_JOBS = Gauge(
    "supervisor_running_jobs",
    "Runs this supervisor holds now (started and not yet ended).",
    registry=REGISTRY,
)
RUNS_ENDED = Counter(
    "supervisor_runs_ended_total",
    "Runs this supervisor ended, by outcome (the terminal phase it reported).",
    ["outcome"],
    registry=REGISTRY,
)
BACKEND_ERRORS = Counter(
    "supervisor_backend_errors_total",
    "Job errors reported to the switchboard, by kind: runs refused (e.g."
    " max_concurrent_jobs, image_not_found) or failed inside the supervisor.",
    ["kind"],
    registry=REGISTRY,
)
CACHE_LOOKUPS = Counter(
    "supervisor_cache_lookups_total",
    "Runs that found what they need already prepared (hit) or had to fetch and prepare it"
    " (miss): cache=wasm_module (a compiled module), cache=docker_image (an image"
    " artifact loaded into the engine), cache=input (an input artifact, per input).",
    ["cache", "result"],
    registry=REGISTRY,
)
LIMITS_EXCEEDED = Counter(
    "supervisor_limits_exceeded_total",
    "Runs refused or stopped because they went past a per-run limit: limit=image_unpacked"
    " (an image artifact larger, unpacked, than max_image_unpacked_mb; the run is rejected),"
    " limit=wasm_scratch (a Wasm guest wrote more to /scratch than its quota; the run fails),"
    " limit=inputs (a run's inputs took more than --inputs-max-mb; the run is rejected).",
    ["limit"],
    registry=REGISTRY,
)

OUTPUT_FILES = Counter(
    "supervisor_output_files_total",
    "Output files of ended runs that matched a collect rule: kept (uploaded, or copied by"
    " run-local) or refused (over a cap, a link, not a regular file, unreadable, or the"
    " upload failed; docs/jobs.md Outputs).",
    ["result"],
    registry=REGISTRY,
)


# Every label value exists from the start, so a scrape shows 0 instead of nothing.
for _phase in sorted(TERMINAL):
    RUNS_ENDED.labels(_phase.value)
for _kind in JobErrorKind:
    BACKEND_ERRORS.labels(_kind.value)
for _cache in CACHES:
    for _result in ("hit", "miss"):
        CACHE_LOOKUPS.labels(_cache, _result)
for _limit in LIMITS:
    LIMITS_EXCEEDED.labels(_limit)
for _result in ("kept", "refused"):
    OUTPUT_FILES.labels(_result)


def run_ended(phase: Phase) -> None:
    if phase in TERMINAL:  # a run dropped unfinished (shutdown) did not end
        RUNS_ENDED.labels(phase.value).inc()


def job_error(kind: JobErrorKind) -> None:
    """Count a run refused or failed with `kind` (once: where the supervisor decides it)."""
    BACKEND_ERRORS.labels(JobErrorKind(kind).value).inc()


def cache_lookup(cache: str, hit: bool) -> None:
    CACHE_LOOKUPS.labels(cache, "hit" if hit else "miss").inc()


def limit_exceeded(limit: str) -> None:
    LIMITS_EXCEEDED.labels(limit).inc()


def output_files(*, kept: int, refused: int) -> None:
    """Count one run's output files."""
    if kept:
        OUTPUT_FILES.labels("kept").inc(kept)
    if refused:
        OUTPUT_FILES.labels("refused").inc(refused)


def serve(port: int, host: str = "127.0.0.1", also: Iterable[CollectorRegistry] = ()) -> int:
    """Serve these metrics and those in `also` (the connector's) over HTTP from a daemon
    thread, as one exposition; return the port (useful for 0)."""
    served = CollectorRegistry(auto_describe=True)
    for registry in (*also, REGISTRY):
        served.register(registry)  # a registry is a collector too
    server, _ = start_http_server(port, addr=host, registry=served)
    return int(server.server_port)
