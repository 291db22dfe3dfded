"""Every switchboard setting in one place (the CLI fills it from flags and environment)."""

from __future__ import annotations

from pathlib import Path

import msgspec


class Settings(msgspec.Struct):
    host: str = "127.0.0.1"
    port: int = 8765
    data_dir: Path = Path("switchboard-data")
    #: How often each side sends a heartbeat, and how long silence may last.
    heartbeat_interval_s: float = 5.0
    heartbeat_timeout_s: float = 20.0
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
    #: Largest JSON request body (job specs).
    max_request_bytes: int = 1024 * 1024
    #: Most jobs the queue holds; a submission beyond it gets 429.
    max_queued_jobs: int = 100_000
    #: Seconds of waiting that raise a queued job's priority by one (0: no aging).
    aging_s: float = 60.0
    #: How long after a run's timeout the switchboard ends it itself if its supervisor
    #: has not (silent, or gone): the supervisor's own timer normally wins.
    run_timeout_grace_s: float = 30.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: "text" or "json" (protocol.logfmt).
    log_format: str = "text"

    @property
    def database_path(self) -> Path:
        return self.data_dir / "switchboard.sqlite3"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"
