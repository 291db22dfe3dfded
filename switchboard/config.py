"""Every switchboard setting in one place (the CLI fills it from flags and environment)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec

from protocol.messages import CollectLimits
from protocol.spec import Id
from switchboard.health import HealthCheck


class Settings(msgspec.Struct):
    host: str = "127.0.0.1"
    port: int = 8765
    data_dir: Path = Path("switchboard-data")
    #: A PostgreSQL database (libpq URI) to keep the records in instead of the data dir's
    #: SQLite file; artifacts' bytes are then in it too, and the data dir caches them.
    database: str | None = None
    #: Several replicas on one PostgreSQL database (docs/deployment.md, "Several
    #: replicas"): this process's replica id (None: host, pid and a random part), whether
    #: to send and listen for NOTIFY hints (off behind a pooler in transaction mode:
    #: commands and new jobs are then found by a sweep), how long the leader lease lasts
    #: unless renewed and how often replicas claim it, and how often a replica looks for
    #: commands left for the supervisors it holds.
    replica_id: str | None = None
    notify: bool = True
    #: `database` reaches PostgreSQL through a pooler in transaction mode (PgBouncer):
    #: no prepared statements kept, timeouts set per transaction, no NOTIFY hints
    #: (`notify` is then off), no schema upgrade (store/postgres_engine.py).
    database_pooler: bool = False
    leader_lease_s: float = 10.0
    leader_claim_s: float = 2.0
    command_sweep_s: float = 1.0
    #: How often each side sends a heartbeat, and how long silence may last.
    heartbeat_interval_s: float = 5.0
    heartbeat_timeout_s: float = 20.0
    #: Every this many heartbeats, each ready supervisor is asked which runs it holds
    #: (StatusRequest) and drift from the store is repaired (0: never). With the default
    #: interval, every 2 minutes: drift is rare, and each check costs a message each way.
    status_every_heartbeats: int = 24
    #: How long one message to a supervisor may wait for its socket to take it; past it,
    #: the connection is cut (a supervisor that stopped reading).
    send_timeout_s: float = 10.0
    #: What may wait to be sent to one supervisor, in bytes and in messages; more, and
    #: the connection is cut.
    outbox_max_bytes: int = 16 * 1024 * 1024
    outbox_max_messages: int = 10_000
    #: How long a disconnected supervisor's runs are kept before they become `lost`.
    lost_after_s: float = 60.0
    #: How long a new connection has to send its Hello.
    hello_timeout_s: float = 10.0
    #: Largest artifact upload (Wasm modules, image tarballs).
    max_artifact_bytes: int = 1024 * 1024 * 1024
    #: On PostgreSQL, the bytes of artifact files this replica caches in its data dir
    #: (the least recently read go past it; 0: none kept past a read).
    artifact_cache_bytes: int = 10 * 1024**3
    #: Resumable uploads (PUT /api/v1/uploads/{digest}): the partial uploads one token may
    #: have open at once, and the bytes all partial uploads together may hold on disk.
    max_partial_uploads_per_token: int = 16
    max_partial_upload_bytes: int = 8 * 1024**3
    #: Largest JSON request body (job specs).
    max_request_bytes: int = 1024 * 1024
    #: Most jobs the queue holds; a submission beyond it gets 429.
    max_queued_jobs: int = 100_000
    #: Most queued jobs one token may have submitted, so that one client can't fill the
    #: queue for everyone; a submission beyond it gets 429.
    max_queued_per_token: int = 10_000
    #: Seconds of waiting that raise a queued job's priority by one (0: no aging).
    aging_s: float = 60.0
    #: How long after a run's timeout the switchboard ends it itself if its supervisor
    #: has not (silent, or gone): the supervisor's own timer normally wins.
    run_timeout_grace_s: float = 30.0
    #: The run timeout a submitted spec without `timeout_s` gets (None: such runs have
    #: none), written into the spec, so a spinning job can't hold a slot forever.
    default_run_timeout_s: float | None = 3600.0
    #: HTTP limits (switchboard.http_limits, docs/server.md): the largest request head,
    #: how long a head may take, the longest gap in a body, how long an idle keep-alive
    #: connection stays open, and the most HTTP connections open at once (WebSockets are
    #: not counted).
    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    max_connections: int = 1000
    #: The longest a request may wait for jobs to end (`?wait=` on the jobs API); a longer
    #: wait is refused (400). A waiting request holds its connection that long.
    max_wait_s: float = 60.0
    #: Bytes of output one run may store, all streams together: the stream that crosses
    #: it is cut there with a note saying so, the rest dropped (0: no cap).
    max_run_output_bytes: int = 64 * 1024 * 1024
    #: What one run may keep of its output directory (StartJob.collect_limits): files,
    #: bytes of one file, bytes of all its files together. A file past one is refused by
    #: the supervisor and listed as refused with the run's files.
    max_run_files: int = 1000
    max_run_file_bytes: int = 1024**3
    max_run_files_bytes: int = 4 * 1024**3
    #: Ended jobs (runs, output, events) are deleted this long after they ended (0: kept).
    retain_jobs_s: float = 30 * 86400.0
    #: All runs' output together is kept under this: past it, the output of the ended jobs
    #: that ended first is removed (0: no cap).
    max_output_bytes: int = 10 * 1024**3
    #: All artifacts together may take this much; an upload past it is refused (0: no
    #: quota).
    artifacts_quota_bytes: int = 20 * 1024**3
    #: Artifacts no queued or running job names, not uploaded or named by a job for this
    #: long, are deleted (0: kept).
    retain_artifacts_s: float = 30 * 86400.0
    #: How often retention sweeps.
    retention_interval_s: float = 60.0
    #: Upgrade a database an older release made at start (backing it up first), instead
    #: of refusing to start on it (store/migrations.py).
    upgrade_schema: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: "text" or "json" (common.logfmt).
    log_format: str = "text"
    #: The file holding the key that seals secret parameter values (None: `<data dir>.key`,
    #: made at the first start); see switchboard/secret_keys.py.
    secret_key_file: Path | None = None
    #: The key itself, from the environment only (SWITCHBOARD_SECRET_KEY), never a flag.
    secret_key: str | None = None
    #: Reservations of devices (docs/lab.md): a waiting one its client has not refreshed
    #: for this long expires; a lease lasts `lease_default_s` unless asked otherwise, and
    #: never more than `lease_max_s` from its grant (extensions included).
    reservation_ttl_s: float = 60.0
    #: How long a power call waits for its supervisor's answer (its host kills the
    #: command at 30 s) before the caller gets 504.
    power_timeout_s: float = 40.0
    lease_default_s: float = 3600.0
    lease_max_s: float = 8 * 3600.0
    #: How often the reservation sweep runs, and the most reservations of each kind
    #: (expired, released, granted) one pass handles.
    reservation_sweep_s: float = 0.5
    reservation_sweep_limit: int = 500
    #: Device class -> its health check (--health-checks FILE; docs/lab.md).
    health_checks: dict[str, HealthCheck] = {}

    @property
    def collect_limits(self) -> CollectLimits:
        """The limits sent with the StartJob of a run that keeps files."""
        return CollectLimits(
            max_files=self.max_run_files,
            max_file_bytes=self.max_run_file_bytes,
            max_total_bytes=self.max_run_files_bytes,
        )

    @property
    def database_path(self) -> Path:
        return self.data_dir / "switchboard.sqlite3"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"


class HealthChecksError(ValueError):
    """The --health-checks file is unreadable or wrong; the message names the file and key."""


def load_health_checks(path: Path) -> dict[str, HealthCheck]:
    """The health checks of a TOML file: one table per device class (docs/lab.md)."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise HealthChecksError(f"{path}: {exc}") from None
    try:
        return msgspec.convert(raw, dict[Id, HealthCheck])
    except msgspec.ValidationError as exc:
        raise HealthChecksError(f"{path}: {exc}") from None
