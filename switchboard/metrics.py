"""Prometheus metrics of the switchboard: the queue, the runs, the supervisors' links and
the store.

Module-level objects in a registry of their own (not prometheus_client's global one), so
that nothing else imported into the process adds to or collides with them. Labels are
bounded sets of words, never ids: a label per supervisor or job would grow without end.
Served as Prometheus text by GET /metrics (switchboard.api.metrics), which first brings
the gauges that are counts of stored rows up to date. docs/metrics.md lists them all.

Run observations (dispatch latency, run duration) are made inside the store's write
transaction, where the run's times are at hand, but only *staged* there: they reach the
histograms once that transaction commits, so a rolled-back change is never counted.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from protocol.exceptions import ProblemCode
from protocol.limits import console_device
from protocol.messages import STREAMS, Output
from protocol.spec import BACKEND_KINDS
from protocol.state import TERMINAL, Phase
from switchboard.health import HEALTH_STATES

log = logging.getLogger("switchboard.metrics")

# No `*_created` series: they double the exposition and nothing here reads them.
disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)

#: Queued jobs split by why they wait: placeable now, waiting out a restart backoff, or
#: matching no registered supervisor.
QUEUE_STATES = ("ready", "backoff", "unschedulable")
#: Connected supervisors: taking jobs, or drained (finishing what they hold).
SUPERVISOR_STATES = ("connected", "draining")
#: Why a supervisor connection was refused (see SUPERVISOR_REFUSALS).
SUPERVISOR_REFUSAL_REASONS = (
    "unauthorized",
    "other_supervisor",
    "no_credential_digest",
    "enrolled",
    "credential_taken",
    "token_revoked",
)
#: Why the switchboard cuts a supervisor's session short.
CUT_REASONS = ("heartbeat_timeout", "send_timeout", "outbox_full")
#: The label a backend kind outside the known set gets (keeps the label bounded).
OTHER = "other"

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
SUPERVISOR_REFUSALS = Counter(
    "switchboard_supervisor_refusals_total",
    "Supervisor connections refused, by reason: unauthorized (no valid supervisor token at"
    " the upgrade), other_supervisor (a credential of another id), no_credential_digest (a"
    " registration token without credential_sha256), enrolled (a registration token for an"
    " id that has a credential), credential_taken, token_revoked.",
    ["reason"],
    registry=REGISTRY,
)
SUPERVISOR_ENROLMENTS = Counter(
    "switchboard_supervisor_enrolments_total",
    "Supervisor ids enrolled: a registration token's connection stored the supervisor's"
    " own credential.",
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
#: Close codes of the protocol errors a supervisor's messages can cause (PROTOCOL_ERRORS):
#: binary message, invalid message (JSON, UTF-8, a field), too big, no hello first, no
#: version in common, a message not allowed at that point.
PROTOCOL_ERROR_CODES = (1003, 1007, 1009, 4000, 4001, 4002)
PROTOCOL_ERRORS = Counter(
    "switchboard_protocol_errors_total",
    "Supervisor connections the switchboard closed for what the supervisor sent, by the"
    " close code it was told in a protocol_error (docs/protocol.md §10): 1003 a binary"
    " message, 1007 an invalid one (not UTF-8, not JSON, a bad field), 1009 one over 1 MiB,"
    " 4000 no hello first, 4001 no version in common, 4002 a message not allowed then.",
    ["code"],
    registry=REGISTRY,
)
SUPERVISORS_CONNECTED = Gauge(
    "switchboard_supervisors_connected",
    "Supervisors connected to this switchboard process, by state (draining: drained by"
    " an operator, finishing what it holds).",
    ["state"],
    registry=REGISTRY,
)

# --- replicas on one database (docs/deployment.md, "Several replicas") ------------------

LEADER = Gauge(
    "switchboard_leader",
    "1 while this switchboard holds the leader lease and runs the singleton work"
    " (timeouts, lost hosts, retention, sweeps); 0 while another replica does. Always 1"
    " on SQLite.",
    registry=REGISTRY,
)
LEASE_CHANGES = Counter(
    "switchboard_lease_changes_total",
    "Times this switchboard took the leader lease (change=gained) or stopped holding it"
    " (change=lost: another replica took it, or it could not renew in time).",
    ["change"],
    registry=REGISTRY,
)
FENCED_WRITES = Counter(
    "switchboard_fenced_writes_total",
    "Writes refused because this replica was superseded: singleton work under a lease"
    " term that has ended (fence=term), or a supervisor connection's write after its"
    " session moved on (fence=session).",
    ["fence"],
    registry=REGISTRY,
)
SUPERVISOR_COMMANDS = Counter(
    "switchboard_supervisor_commands_total",
    "Commands for a supervisor whose socket another replica holds (command=stop: a"
    " StopJob; start: a job group's StartJob; power: a power request): left in the"
    " database for it (step=queued), taken from there and sent on a socket held here"
    " (step=delivered), and for power, its answer written back (step=answered).",
    ["command", "step"],
    registry=REGISTRY,
)
SESSIONS_REAPED = Counter(
    "switchboard_sessions_reaped_total",
    "Supervisor sessions the leader ended because the replica holding them stopped answering.",
    registry=REGISTRY,
)

# --- HTTP connections -----------------------------------------------------------------

#: Why a connection was refused or closed by a limit (switchboard.http_limits).
HTTP_REFUSAL_REASONS = (
    "header_too_large",
    "header_timeout",
    "body_timeout",
    "connection_cap",
    "slow_head_evicted",
    "idle_evicted",
    "bad_request",
)
HTTP_CONNECTIONS = Gauge(
    "switchboard_http_connections",
    "Open HTTP connections, the ones --max-connections counts (not WebSockets, not"
    " refused connections being closed).",
    registry=REGISTRY,
)
HTTP_REFUSALS = Counter(
    "switchboard_http_refusals_total",
    "HTTP connections closed by a limit (answered with an error, but for idle_evicted), by reason.",
    ["reason"],
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
OUTPUT_TRUNCATED = Counter(
    "switchboard_output_truncated_total",
    "Streams of a run cut at the per-run output cap (--max-run-output), by stream.",
    ["stream"],
    registry=REGISTRY,
)
OUTPUT_DROPPED_BYTES = Counter(
    "switchboard_output_dropped_bytes_total",
    "Bytes of new output dropped because their run had reached the output cap, by stream.",
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
    " (via=grace_period), came back without them (via=reconcile), or no longer listed"
    " them in a StatusReply (via=status).",
    ["via"],
    registry=REGISTRY,
)
EVENT_PROBLEMS = Counter(
    "switchboard_event_problems_total",
    "Supervisor events acknowledged with a problem (docs/protocol.md §6.5), by code:"
    " stored in part or with a seq gap (seq_gap, output_capped), or dropped (the others).",
    ["code"],
    registry=REGISTRY,
)
SEQ_RESYNCS = Counter(
    "switchboard_seq_resyncs_total",
    "Reconnects of a supervisor that had numbered events the store does not have and could"
    " not send again (the store restored from an older copy, or wiped): reconciled from its"
    " status reply instead of waiting for them.",
    registry=REGISTRY,
)

ZOMBIE_RUNS_STOPPED = Counter(
    "switchboard_zombie_runs_stopped_total",
    "StopJob sent for runs the switchboard no longer wants: found when a supervisor"
    " reconnects (via=reconcile), when their events arrive (via=events), or in a"
    " StatusReply (via=status).",
    ["via"],
    registry=REGISTRY,
)

SUBMISSIONS_REFUSED = Counter(
    "switchboard_submissions_refused_total",
    "Job submissions (a job or a batch) refused: with 429, the queue holds --max-queued"
    " jobs (reason=queue_full), or the submitting token has --max-queued-per-token queued"
    " (reason=token_quota); with 400, no device of the lab could ever serve a job"
    " (reason=no_device).",
    ["reason"],
    registry=REGISTRY,
)
DEVICES = Gauge(
    "switchboard_devices",
    "Devices of the lab's inventory by health and class (docs/lab.md).",
    ["health", "class"],
    registry=REGISTRY,
)
DEVICE_HEALTH_CHANGES = Counter(
    "switchboard_device_health_changes_total",
    "Changes of a device's health, by the health it was given.",
    ["health"],
    registry=REGISTRY,
)
HEALTH_CHECKS = Counter(
    "switchboard_health_checks_total",
    "Health checks of devices that ended: passed (the device is good), failed (bad), or"
    " ended by an infrastructure error (unknown: it is checked again).",
    ["result"],
    registry=REGISTRY,
)
#: The states of a reservation of devices (docs/lab.md).
RESERVATION_STATES = ("waiting", "held", "released", "expired")
RESERVATIONS = Gauge(
    "switchboard_reservations",
    "Reservations of devices by state (docs/lab.md): waiting, held, released, expired.",
    ["state"],
    registry=REGISTRY,
)
RESERVATION_WAIT_SECONDS = Histogram(
    "switchboard_reservation_wait_seconds",
    "How long a reservation waited, from being asked for to being granted its devices.",
    buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600),
    registry=REGISTRY,
)
RESERVATION_REFUSALS = Counter(
    "switchboard_reservation_refusals_total",
    "Reservation requests refused: 400 invalid_request (an unknown class, a count or lease"
    " out of range, nothing in the lab could serve it), 403 forbidden (release, extend"
    " or use by a token that is neither the holder nor an operator).",
    ["reason"],
    registry=REGISTRY,
)
POWER_CALLS = Counter(
    "switchboard_power_calls_total",
    "Power calls on devices (docs/lab.md), by action and result: ok, failed (the command"
    " failed or was killed past its deadline), no_power, not_connected, timed_out.",
    ["action", "result"],
    registry=REGISTRY,
)
#: Why an attach to a device's console is refused (docs/lab.md "Serial console").
CONSOLE_REFUSAL_REASONS = ("forbidden", "not_found", "no_console", "unavailable")
#: Who ended an attached console session: the client left, the supervisor ended it (or
#: its connection ended), the client did not keep up and was dropped, or it may no longer
#: attach (its token revoked, the lease it attached by ended).
CONSOLE_END_REASONS = ("client", "supervisor", "too_slow", "revoked")
CONSOLE_REFUSALS = Counter(
    "switchboard_console_refusals_total",
    "Console attaches refused: forbidden (401/403), not_found (no such device), no_console"
    " (409), unavailable (503: its supervisor is not connected or speaks no 1.6).",
    ["reason"],
    registry=REGISTRY,
)
CONSOLE_SESSIONS = Gauge(
    "switchboard_console_sessions",
    "Console sessions attached now.",
    registry=REGISTRY,
)
CONSOLE_SESSIONS_ENDED = Counter(
    "switchboard_console_sessions_ended_total",
    "Console sessions ended, by who ended them: client, supervisor, too_slow (dropped),"
    " revoked (the client may no longer attach).",
    ["reason"],
    registry=REGISTRY,
)
POWER_REFUSALS = Counter(
    "switchboard_power_refusals_total",
    "Power requests refused before reaching a supervisor: 400 invalid_request (an"
    " unknown action), 403 forbidden (neither an operator nor the device's lease holder).",
    ["reason"],
    registry=REGISTRY,
)
DEVICES_REFUSED = Counter(
    "switchboard_device_declarations_refused_total",
    "Devices a supervisor's hello declared that were not taken into the inventory: another"
    " supervisor declares a device of that id.",
    registry=REGISTRY,
)
RUNS_UNDELIVERABLE = Counter(
    "switchboard_runs_undeliverable_total",
    "Runs never sent because their StartJob would be larger than the protocol's message"
    " limit (a job stored before its size was checked), or their supervisor reconnected"
    " speaking a protocol version too old for the job since it was placed; each ends"
    " rejected.",
    registry=REGISTRY,
)
SPECS_TOO_LARGE = Counter(
    "switchboard_specs_too_large_total",
    "Job specs refused at submission (400) because the StartJob they make would be larger"
    " than the protocol's message limit.",
    registry=REGISTRY,
)

CHAINED_JOBS = Counter(
    "switchboard_chained_jobs_total",
    "Jobs whose inputs name earlier jobs' output files, once those jobs ended: inputs"
    " resolved (outcome=resolved) or the job rejected because a file never came"
    " (outcome=rejected). Those resolved when submitted are not counted.",
    ["outcome"],
    registry=REGISTRY,
)
GROUPS_STOPPED = Counter(
    "switchboard_groups_stopped_total",
    "Job groups stopped because an essential role ended without succeeding (their other"
    " roles canceled).",
    registry=REGISTRY,
)
#: Why a `?wait=` request was refused (400): a wait over the maximum, more job ids than
#: one request may wait for, or a listing's wait with no `ids`.
WAIT_REFUSAL_REASONS = ("wait_too_long", "too_many_ids", "no_ids", "unknown_ids")
WAIT_REFUSALS = Counter(
    "switchboard_wait_refusals_total",
    "Requests to wait for jobs (`?wait=` on the jobs API) refused (400, or 404 for unknown"
    " ids), by reason.",
    ["reason"],
    registry=REGISTRY,
)
JOB_WAITERS = Gauge(
    "switchboard_job_waiters",
    "Requests waiting for a job to end (`?wait=` on the jobs API) now.",
    registry=REGISTRY,
)

RUNS_PLACED = Counter(
    "switchboard_runs_placed_total",
    "Runs given to a supervisor: with the job's submission, when nothing else waited and"
    " a slot was known free (via=submission), by a dispatch pass (via=pass), or as a role"
    " of a job group placed all at once (via=group).",
    ["via"],
    registry=REGISTRY,
)

SECRETS_UNREADABLE = Counter(
    "switchboard_secrets_unreadable_total",
    "Jobs rejected unstarted because no key of this switchboard opens their secret"
    " parameter values: when placed (via=placement), or when a reconnecting supervisor"
    " needed their StartJob again (via=reconcile).",
    ["via"],
    registry=REGISTRY,
)

# --- retention ------------------------------------------------------------------------

#: What retention removes (switchboard.retention): ended jobs, the output of ended jobs
#: (to keep all output under its cap), artifacts.
RETAINED = ("job", "output", "artifact")
RETENTION_REMOVED = Counter(
    "switchboard_retention_removed_total",
    "What retention removed: ended jobs past --retain-jobs (what=job), the output of ended"
    " jobs to keep all output under --max-output-bytes (what=output), artifacts no job"
    " needs (what=artifact).",
    ["what"],
    registry=REGISTRY,
)
#: What the data dir holds, in bytes: job output (in the database), artifacts (files).
STORED = ("output", "artifact")
STORED_BYTES = Gauge(
    "switchboard_stored_bytes",
    "Bytes stored: all runs' output together (what=output), all artifacts (what=artifact);"
    " as of the last retention sweep.",
    ["what"],
    registry=REGISTRY,
)

# --- artifacts ------------------------------------------------------------------------

#: Why an artifact request was refused: an upload larger than one may be (too_large) or
#: past the artifacts quota (quota), a delete of one a job still names (in_use).
ARTIFACT_REFUSALS = ("too_large", "quota", "in_use")
ARTIFACTS_REFUSED = Counter(
    "switchboard_artifact_refusals_total",
    "Artifact requests refused: uploads too large (why=too_large) or past the artifacts"
    " quota (why=quota), deletes of an artifact a job that has not ended names (why=in_use).",
    ["why"],
    registry=REGISTRY,
)

#: A replica's cache of artifact bytes on PostgreSQL (switchboard.postgres_blobs): reads
#: served from its data dir (hit) or fetched from the database's chunks first (miss);
#: files evicted to stay under --artifact-cache (why=cap) or because the artifact was
#: deleted (why=deleted); the bytes the cache holds.
ARTIFACT_CACHE = Counter(
    "switchboard_artifact_cache_total",
    "Artifact reads on a switchboard serving PostgreSQL: served from this replica's cache"
    " (result=hit), or fetched from the database's chunks into it first (result=miss).",
    ["result"],
    registry=REGISTRY,
)
CACHE_EVICTIONS = ("cap", "deleted")
ARTIFACT_CACHE_EVICTIONS = Counter(
    "switchboard_artifact_cache_evictions_total",
    "Artifact files this replica's cache let go: to stay under --artifact-cache (why=cap),"
    " or because the artifact was deleted (why=deleted).",
    ["why"],
    registry=REGISTRY,
)
ARTIFACT_CACHE_BYTES = Gauge(
    "switchboard_artifact_cache_bytes",
    "Bytes of artifact files this replica's cache holds (PostgreSQL only).",
    registry=REGISTRY,
)

UPLOAD_REFUSAL_REASONS = (
    "invalid_request",
    "too_large",
    "too_many_uploads",
    "partial_space",
    "quota",
    "offset_mismatch",
    "busy",
    "digest_mismatch",
)
UPLOAD_REFUSALS = Counter(
    "switchboard_upload_refusals_total",
    "Pieces of resumable uploads (PUT /api/v1/uploads/{digest}) refused, by reason.",
    ["reason"],
    registry=REGISTRY,
)

#: What became of a file a run's `files` event listed: kept (linked to the run), refused
#: by the supervisor, or refused here: listed under a digest never uploaded (or of another
#: size), or under a path that is not relative.
OUTPUT_FILE_OUTCOMES = ("kept", "refused", "not_uploaded", "invalid_path")
OUTPUT_FILES = Counter(
    "switchboard_output_files_total",
    "Output files runs listed in their files events: kept, refused by the supervisor (a"
    " limit, a link, ...), or refused here: listed under a digest never uploaded, or under"
    " a path that is not relative.",
    ["outcome"],
    registry=REGISTRY,
)

# --- test reports ---------------------------------------------------------------------

#: A test case's result in a JUnit report (switchboard.models.TEST_RESULTS).
TEST_RESULTS = ("passed", "failed", "error", "skipped")
TEST_CASES = Counter(
    "switchboard_test_cases_total",
    "Test cases stored from runs' JUnit reports, by result (passed, failed, error, skipped).",
    ["result"],
    registry=REGISTRY,
)
#: Why a report was refused unparsed or unstored (switchboard.reports.junit.REFUSAL_KINDS).
REPORT_REFUSALS = (
    "too_large",
    "too_many_cases",
    "too_deep",
    "dtd",
    "not_xml",
    "not_junit",
    "crashed",
)
REPORTS_REFUSED = Counter(
    "switchboard_reports_refused_total",
    "JUnit reports refused: over the size or test-case cap, nested too deep, declaring a"
    " DTD or entities, not well-formed XML, not JUnit, or the parser process died.",
    ["why"],
    registry=REGISTRY,
)

# --- API streams ----------------------------------------------------------------------

#: The long-lived responses (switchboard.api.streams): the dashboard's live feed, a run's
#: output followed as bytes, and as server-sent events.
LONG_ROUTES = ("live", "follow", "events")
STREAMS_REVOKED = Counter(
    "switchboard_streams_revoked_total",
    "Long-lived responses ended because their token was revoked, by route (live, follow, events).",
    ["route"],
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
for _via in ("grace_period", "reconcile", "status"):
    RUNS_LOST.labels(_via)
for _change in ("gained", "lost"):
    LEASE_CHANGES.labels(_change)
for _fence in ("term", "session"):
    FENCED_WRITES.labels(_fence)
for _command, _steps in (
    ("stop", ("queued", "delivered")),
    ("start", ("queued", "delivered")),
    ("power", ("queued", "delivered", "answered")),
):
    for _step in _steps:
        SUPERVISOR_COMMANDS.labels(_command, _step)
for _via in ("reconcile", "events", "status"):
    ZOMBIE_RUNS_STOPPED.labels(_via)
for _via in ("submission", "pass", "group"):
    RUNS_PLACED.labels(_via)
for _outcome in ("resolved", "rejected"):
    CHAINED_JOBS.labels(_outcome)
for _via in ("placement", "reconcile"):
    SECRETS_UNREADABLE.labels(_via)
for _reason in HTTP_REFUSAL_REASONS:
    HTTP_REFUSALS.labels(_reason)
for _health in HEALTH_STATES:
    DEVICE_HEALTH_CHANGES.labels(_health)
for _result in ("pass", "fail", "error"):
    HEALTH_CHECKS.labels(_result)
for _state in RESERVATION_STATES:
    RESERVATIONS.labels(_state)
for _reason in ("invalid_request", "forbidden"):
    RESERVATION_REFUSALS.labels(_reason)
for _reason in ("queue_full", "token_quota", "no_device"):
    SUBMISSIONS_REFUSED.labels(_reason)
for _reason in WAIT_REFUSAL_REASONS:
    WAIT_REFUSALS.labels(_reason)
for _reason in CUT_REASONS:
    SESSIONS_CUT.labels(_reason)
for _close in PROTOCOL_ERROR_CODES:
    PROTOCOL_ERRORS.labels(str(_close))
for _code in ProblemCode:
    EVENT_PROBLEMS.labels(_code.value)
for _stream in STREAMS:
    OUTPUT_BYTES.labels(_stream)
    OUTPUT_TRUNCATED.labels(_stream)
    OUTPUT_DROPPED_BYTES.labels(_stream)
for _route in LONG_ROUTES:
    STREAMS_REVOKED.labels(_route)
for _why in ARTIFACT_REFUSALS:
    ARTIFACTS_REFUSED.labels(_why)
for _reason in UPLOAD_REFUSAL_REASONS:
    UPLOAD_REFUSALS.labels(_reason)
for _result in ("hit", "miss"):
    ARTIFACT_CACHE.labels(_result)
for _why in CACHE_EVICTIONS:
    ARTIFACT_CACHE_EVICTIONS.labels(_why)
for _what in RETAINED:
    RETENTION_REMOVED.labels(_what)
for _result in TEST_RESULTS:
    TEST_CASES.labels(_result)
for _why in REPORT_REFUSALS:
    REPORTS_REFUSED.labels(_why)
for _outcome in OUTPUT_FILE_OUTCOMES:
    OUTPUT_FILES.labels(_outcome)
for _what in STORED:
    STORED_BYTES.labels(_what)
for _phase in Phase:
    JOBS.labels(_phase.value)
for _state in QUEUE_STATES:
    QUEUE_DEPTH.labels(_state)
for _state in SUPERVISOR_STATES:
    SUPERVISORS_CONNECTED.labels(_state)
for _reason in SUPERVISOR_REFUSAL_REASONS:
    SUPERVISOR_REFUSALS.labels(_reason)
for _reason in CONSOLE_REFUSAL_REASONS:
    CONSOLE_REFUSALS.labels(_reason)
for _reason in CONSOLE_END_REASONS:
    CONSOLE_SESSIONS_ENDED.labels(_reason)


def backend_label(kind: str) -> str:
    return kind if kind in BACKEND_KINDS else OTHER


def stream_label(stream: str) -> str:
    """The `stream` label of an output stream: a device's console (`console:<device>`)
    counts as `console`, so the label has three values whatever the lab."""
    return "console" if console_device(stream) is not None else stream


def count_output(events: Iterable[object]) -> None:
    """Count the bytes of the output events among `events` (just stored)."""
    for event in events:
        if isinstance(event, Output):
            OUTPUT_BYTES.labels(stream_label(event.stream)).inc(len(event.data))


# --- observations staged inside a store transaction ------------------------------------


class _Staged(threading.local):
    def __init__(self) -> None:
        self.items: list[Callable[[], None]] = []


_staged = _Staged()
#: A task's own staging list (see `staged_in_task`); None: the thread's.
_task_staged: contextvars.ContextVar[list[Callable[[], None]] | None] = contextvars.ContextVar(
    "staged", default=None
)


def _staging() -> list[Callable[[], None]]:
    items = _task_staged.get()
    return _staged.items if items is None else items


@contextlib.contextmanager
def staged_in_task() -> Iterator[None]:
    """Stage what this block observes apart from everything else on the thread: for a
    store whose transactions interleave on the event loop (PostgreSQL), where the thread's
    list would mix them. The block calls staged_commit once its transaction committed;
    what it staged otherwise is forgotten when it ends."""
    token = _task_staged.set([])
    try:
        yield
    finally:
        _task_staged.reset(token)


def staged_mark() -> int:
    """Where the current request of a transaction starts (see `staged_drop`)."""
    return len(_staging())


def staged_drop(mark: int = 0) -> None:
    """Forget what was staged since `mark`: that part of the transaction was undone."""
    del _staging()[mark:]


def staged_commit() -> None:
    """The transaction committed: make what it staged count."""
    items = _staging()[:]
    _staging().clear()
    for observe in items:
        try:
            observe()
        except Exception:  # the transaction stands whatever happens here
            log.exception("metrics: an observation failed")


def run_running(kind: str, waited_s: float) -> None:
    """Stage a run reaching running after `waited_s` in the queue."""
    _staging().append(
        lambda: DISPATCH_LATENCY.labels(backend_label(kind)).observe(max(0.0, waited_s))
    )


def secrets_unreadable(via: str) -> None:
    """Stage a job rejected because its secret values can't be opened."""
    _staging().append(lambda: SECRETS_UNREADABLE.labels(via).inc())


def run_ended(kind: str, phase: Phase, duration_s: float) -> None:
    """Stage a run's end."""
    outcome = phase.value if phase in TERMINAL else OTHER
    _staging().append(
        lambda: RUN_DURATION.labels(backend_label(kind), outcome).observe(max(0.0, duration_s))
    )


def output_truncated(stream: str, dropped: int) -> None:
    """Stage a stream cut at the output cap, and the bytes of its chunk left out."""

    def observe() -> None:
        OUTPUT_TRUNCATED.labels(stream_label(stream)).inc()
        OUTPUT_DROPPED_BYTES.labels(stream_label(stream)).inc(dropped)

    _staging().append(observe)


def output_dropped(stream: str, dropped: int) -> None:
    """Stage output dropped because its stream was cut at the output cap."""
    _staging().append(lambda: OUTPUT_DROPPED_BYTES.labels(stream_label(stream)).inc(dropped))
