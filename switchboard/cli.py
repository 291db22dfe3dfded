"""The `switchboard` command."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from common import logfmt
from protocol.spec import MAX_TIMEOUT_S
from switchboard.admin_cli import add_admin_commands, data_dir, database_arg, env_flag
from switchboard.cli_output import duration
from switchboard.config import HealthChecksError, Settings, load_health_checks
from switchboard.db_cli import add_db_commands
from switchboard.device_cli import add_device_commands
from switchboard.group_cli import add_group_commands
from switchboard.health import HealthCheck
from switchboard.jobs_cli import add_job_commands

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


#: Every flag of `serve` defaults to its setting's default (one home: config.Settings).
DEFAULTS = Settings()


def byte_size(text: str) -> int:
    """A number of bytes, optionally with a binary unit: 1048576, 512K, 64M, 10G, 1T
    (also written KiB, MiB, ...)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 1048576, 512K, 64M, 10G)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def _interval(text: str) -> float:
    """A duration greater than 0 (how often something repeats: 0 would spin)."""
    seconds = duration(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration greater than 0")
    return seconds


def _check_pooler(args: argparse.Namespace) -> None:
    """--database-pooler needs --database, and an upgrade needs the server itself."""
    if not args.database_pooler:
        return
    if args.database is None:
        raise SystemExit(
            "switchboard: --database-pooler (SWITCHBOARD_DATABASE_POOLER) needs --database:"
            " it says how the PostgreSQL URI is reached"
        )
    if args.upgrade:
        raise SystemExit(
            "switchboard: --upgrade is refused with --database-pooler: a schema upgrade"
            " takes several transactions under one session's lock; run `switchboard db"
            " upgrade --database URI` with the PostgreSQL server's own address, then start"
            " the replicas through the pooler"
        )


def _serve(args: argparse.Namespace) -> int:
    from switchboard.server import run

    _check_pooler(args)

    run(
        Settings(
            host=args.host,
            port=args.port,
            data_dir=data_dir(args.data_dir),
            database=args.database,
            replica_id=args.replica_id,
            notify=not (args.no_notify or args.database_pooler),
            database_pooler=args.database_pooler,
            leader_lease_s=args.leader_lease,
            heartbeat_interval_s=args.heartbeat_interval,
            heartbeat_timeout_s=args.heartbeat_timeout,
            status_every_heartbeats=args.status_every,
            send_timeout_s=args.send_timeout,
            outbox_max_bytes=args.outbox_max_bytes,
            outbox_max_messages=args.outbox_max_messages,
            lost_after_s=args.lost_after,
            max_queued_jobs=args.max_queued,
            max_queued_per_token=args.max_queued_per_token,
            aging_s=args.aging,
            run_timeout_grace_s=args.run_timeout_grace,
            default_run_timeout_s=args.default_run_timeout or None,
            max_header_bytes=args.max_header_bytes,
            header_timeout_s=args.header_timeout,
            body_timeout_s=args.body_timeout,
            keep_alive_s=args.keep_alive,
            max_connections=args.max_connections,
            max_wait_s=args.max_wait,
            max_run_output_bytes=args.max_run_output,
            max_run_files=args.max_run_files,
            max_run_file_bytes=args.max_run_file_bytes,
            max_run_files_bytes=args.max_run_files_bytes,
            retain_jobs_s=args.retain_jobs,
            max_output_bytes=args.max_output_bytes,
            retention_interval_s=args.retention_interval,
            artifacts_quota_bytes=args.artifacts_quota,
            artifact_cache_bytes=args.artifact_cache,
            max_partial_uploads_per_token=args.max_partial_uploads,
            max_partial_upload_bytes=args.max_partial_upload_bytes,
            retain_artifacts_s=args.retain_artifacts,
            upgrade_schema=args.upgrade,
            tls_cert=Path(args.tls_cert) if args.tls_cert else None,
            tls_key=Path(args.tls_key) if args.tls_key else None,
            log_format=args.log_format,
            secret_key_file=Path(args.secret_key_file) if args.secret_key_file else None,
            # The key itself only ever from the environment: a flag would show it to every
            # local user (command lines are public).
            secret_key=os.environ.get("SWITCHBOARD_SECRET_KEY") or None,
            health_checks=_health_checks(args.health_checks),
            reservation_ttl_s=args.reservation_ttl,
            lease_default_s=args.lease_default,
            lease_max_s=args.lease_max,
            power_timeout_s=args.power_timeout,
        )
    )
    return 0


def _health_checks(path: str | None) -> dict[str, HealthCheck]:
    if path is None:
        return {}
    try:
        return load_health_checks(Path(path))
    except HealthChecksError as exc:
        raise SystemExit(f"switchboard: --health-checks: {exc}") from None


def _count(text: str) -> int:
    """An argparse type: an integer 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 0 or more")
    return value


def _files_count(text: str) -> int:
    """An argparse type: how many output files one run may keep (CollectLimits' range)."""
    value = _count(text)
    if not 1 <= value <= 100_000:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 1 to 100000")
    return value


def _positive_size(text: str) -> int:
    """An argparse type: a byte size greater than 0."""
    value = byte_size(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0 bytes")
    return value


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    """An argparse type: a number of `kind` greater than 0."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r}: a number greater than 0")
        return value

    return parse


def _run_timeout(text: str) -> float:
    """0 (no default) or a timeout a spec could give itself (> 0, at most 7 days)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if seconds == 0 or 0 < seconds <= MAX_TIMEOUT_S:
        return seconds
    raise argparse.ArgumentTypeError(f"{text!r}: 0 or seconds up to {MAX_TIMEOUT_S:.0f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchboard", description="Dispatch jobs to supervisors."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the switchboard server")
    serve.add_argument("--host", default=os.environ.get("SWITCHBOARD_HOST", DEFAULTS.host))
    serve.add_argument(
        "--port", type=int, default=int(os.environ.get("SWITCHBOARD_PORT", DEFAULTS.port))
    )
    serve.add_argument("--data-dir", help="database and artifacts (default ./switchboard-data)")
    serve.add_argument(
        "--database",
        type=database_arg,
        default=os.environ.get("SWITCHBOARD_DATABASE") or None,
        metavar="URI",
        help="keep the records in this PostgreSQL database (postgresql://user@host/db)"
        " instead of the data dir's SQLite file; artifacts stay in the data dir"
        " (env SWITCHBOARD_DATABASE)",
    )
    serve.add_argument(
        "--replica-id",
        default=os.environ.get("SWITCHBOARD_REPLICA_ID") or None,
        metavar="ID",
        help="with --database: this switchboard's name among the replicas serving the"
        " database (default: host, pid and a random part; give a stable one so a restart"
        " forgets its own connections at once; env SWITCHBOARD_REPLICA_ID)",
    )
    serve.add_argument(
        "--no-notify",
        action="store_true",
        help="with --database: send no NOTIFY hints to other replicas and listen for none"
        " (behind PgBouncer in transaction mode); commands left for this replica's"
        " supervisors and jobs queued elsewhere are then found by a sweep each second",
    )
    serve.add_argument(
        "--database-pooler",
        action="store_true",
        default=env_flag("SWITCHBOARD_DATABASE_POOLER"),
        help="with --database: the URI reaches PostgreSQL through a pooler in transaction"
        " mode (PgBouncer's pool_mode = transaction): no prepared statements kept across"
        " transactions, the timeouts set in each transaction, --no-notify implied, and no"
        " --upgrade (upgrade with the server's own address; env"
        " SWITCHBOARD_DATABASE_POOLER=1)",
    )
    serve.add_argument(
        "--leader-lease",
        type=_positive(float),
        default=DEFAULTS.leader_lease_s,
        metavar="SECONDS",
        help="with --database: how long the leader lease lasts unless renewed (claimed every"
        " 2 s; a dead leader is replaced within this plus 2 s; default %(default)s)",
    )
    serve.add_argument(
        "--heartbeat-interval",
        type=float,
        default=DEFAULTS.heartbeat_interval_s,
        metavar="SECONDS",
        help="how often each side of a supervisor connection sends a heartbeat",
    )
    serve.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=DEFAULTS.heartbeat_timeout_s,
        metavar="SECONDS",
        help="silence after which a connection is considered dead",
    )
    serve.add_argument(
        "--status-every",
        type=_count,
        default=_count(
            os.environ.get("SWITCHBOARD_STATUS_EVERY", str(DEFAULTS.status_every_heartbeats))
        ),
        metavar="HEARTBEATS",
        help="ask each supervisor which runs it holds every this many heartbeats, and repair "
        "what drifted from the store (0: never; default %(default)s, with the default "
        "interval every 2 minutes; env SWITCHBOARD_STATUS_EVERY)",
    )
    serve.add_argument(
        "--send-timeout",
        type=_positive(float),
        default=DEFAULTS.send_timeout_s,
        metavar="SECONDS",
        help="how long a message to a supervisor may wait for its socket to take it before "
        "the connection is cut (default 10)",
    )
    serve.add_argument(
        "--outbox-max-bytes",
        type=_positive(int),
        default=DEFAULTS.outbox_max_bytes,
        metavar="BYTES",
        help="most bytes waiting to be sent to one supervisor; more cuts its connection "
        "(default 16 MiB)",
    )
    serve.add_argument(
        "--outbox-max-messages",
        type=_positive(int),
        default=DEFAULTS.outbox_max_messages,
        metavar="N",
        help="most messages waiting to be sent to one supervisor; more cuts its connection "
        "(default 10000)",
    )
    serve.add_argument(
        "--lost-after",
        type=float,
        default=DEFAULTS.lost_after_s,
        metavar="SECONDS",
        help="how long a disconnected supervisor's runs wait before they are lost",
    )
    serve.add_argument(
        "--max-queued",
        type=int,
        default=DEFAULTS.max_queued_jobs,
        metavar="JOBS",
        help="most jobs waiting; a submission beyond it gets 429 (default 100000)",
    )
    serve.add_argument(
        "--max-queued-per-token",
        type=_positive(int),
        default=DEFAULTS.max_queued_per_token,
        metavar="JOBS",
        help="most queued jobs one token may have submitted; a submission beyond it gets 429"
        " (default 10000)",
    )
    serve.add_argument(
        "--aging",
        type=float,
        default=DEFAULTS.aging_s,
        metavar="SECONDS",
        help="a queued job gains one priority level per this much waiting (0: never)",
    )
    serve.add_argument(
        "--run-timeout-grace",
        type=float,
        default=DEFAULTS.run_timeout_grace_s,
        metavar="SECONDS",
        help="how long past a run's timeout the switchboard ends it itself if its supervisor "
        "has not reported the end (silent or gone)",
    )
    serve.add_argument(
        "--default-run-timeout",
        type=_run_timeout,
        default=DEFAULTS.default_run_timeout_s,
        metavar="SECONDS",
        help="the run timeout of a job whose spec gives none (default 3600; 0: none)",
    )
    # HTTP limits (docs/server.md).
    serve.add_argument(
        "--max-header-bytes",
        type=_positive(int),
        default=DEFAULTS.max_header_bytes,
        metavar="BYTES",
        help="largest request head (request line and headers); larger gets 431 (default 65536)",
    )
    serve.add_argument(
        "--header-timeout",
        type=_positive(float),
        default=DEFAULTS.header_timeout_s,
        metavar="SECONDS",
        help="time a request head may take from its first byte (a new connection: from"
        " its start); slower gets 408 (default 10)",
    )
    serve.add_argument(
        "--body-timeout",
        type=_positive(float),
        default=DEFAULTS.body_timeout_s,
        metavar="SECONDS",
        help="longest wait for the next byte of a request body; longer gets 408 (default 30)",
    )
    serve.add_argument(
        "--keep-alive",
        type=_positive(float),
        default=DEFAULTS.keep_alive_s,
        metavar="SECONDS",
        help="an idle keep-alive connection is closed after this long (default 5)",
    )
    serve.add_argument(
        "--max-connections",
        type=_positive(int),
        default=DEFAULTS.max_connections,
        metavar="N",
        help="most HTTP connections open at once, not counting supervisors' WebSockets;"
        " beyond it a new one gets 503 unless it replaces a slow request head or an idle"
        " connection (default 1000)",
    )
    serve.add_argument(
        "--max-wait",
        type=_positive(float),
        default=DEFAULTS.max_wait_s,
        metavar="SECONDS",
        help="longest `?wait=` a request for jobs to end may ask for; longer gets 400 (default 60)",
    )
    serve.add_argument(
        "--max-run-output",
        type=byte_size,
        default=DEFAULTS.max_run_output_bytes,
        metavar="BYTES",
        help="output one run may store, all streams together (e.g. 64M, the default; 0: no "
        "cap): the stream that crosses it ends with a note and the rest is dropped",
    )
    serve.add_argument(
        "--max-run-files",
        type=_files_count,
        default=DEFAULTS.max_run_files,
        metavar="N",
        help="output files one run may keep (1 to 100000; default 1000): the supervisor"
        " refuses the files past it, and the run lists them as refused",
    )
    serve.add_argument(
        "--max-run-file-bytes",
        type=_positive_size,
        default=DEFAULTS.max_run_file_bytes,
        metavar="BYTES",
        help="bytes of one output file a run may keep (default 1G)",
    )
    serve.add_argument(
        "--max-run-files-bytes",
        type=_positive_size,
        default=DEFAULTS.max_run_files_bytes,
        metavar="BYTES",
        help="bytes of all the output files one run keeps together (default 4G)",
    )
    serve.add_argument(
        "--retain-jobs",
        type=duration,
        default=DEFAULTS.retain_jobs_s,
        metavar="DURATION",
        help="delete ended jobs (runs, output, events) this long after they ended, e.g. 30d "
        "(the default), 12h, 90m, 3600 (seconds); 0: keep them",
    )
    serve.add_argument(
        "--max-output-bytes",
        type=byte_size,
        default=DEFAULTS.max_output_bytes,
        metavar="BYTES",
        help="keep all jobs' output together under this (e.g. 10G, the default; 0: no cap): "
        "past it, the output of the jobs that ended first is removed",
    )
    serve.add_argument(
        "--artifacts-quota",
        type=byte_size,
        default=DEFAULTS.artifacts_quota_bytes,
        metavar="BYTES",
        help="all artifacts together may take this much (e.g. 20G, the default; 0: no "
        "quota): an upload past it gets 507",
    )
    serve.add_argument(
        "--artifact-cache",
        type=byte_size,
        default=DEFAULTS.artifact_cache_bytes,
        metavar="BYTES",
        help="with --database: the artifact bytes this replica caches in its data dir (e.g. "
        "10G, the default; 0: none kept past a read); the least recently read go first",
    )
    serve.add_argument(
        "--max-partial-uploads",
        type=_positive(int),
        default=DEFAULTS.max_partial_uploads_per_token,
        metavar="N",
        help="resumable uploads one token may have unfinished at once (default 16): one more"
        " gets 429",
    )
    serve.add_argument(
        "--max-partial-upload-bytes",
        type=byte_size,
        default=DEFAULTS.max_partial_upload_bytes,
        metavar="BYTES",
        help="bytes all unfinished resumable uploads together may hold on disk (e.g. 8G, the"
        " default): a piece past it gets 507",
    )
    serve.add_argument(
        "--retain-artifacts",
        type=duration,
        default=DEFAULTS.retain_artifacts_s,
        metavar="DURATION",
        help="delete artifacts no queued or running job names once nobody has uploaded them "
        "or named them in a job for this long (default 30d; 0: keep them)",
    )
    serve.add_argument(
        "--retention-interval",
        type=_interval,
        default=DEFAULTS.retention_interval_s,
        metavar="DURATION",
        help="how often retention sweeps (default 60 seconds)",
    )
    serve.add_argument(
        "--upgrade",
        action="store_true",
        help="upgrade a database an older release made before serving it (backing it up"
        " first; as `switchboard db upgrade`); without it, the switchboard refuses to start"
        " on one",
    )
    serve.add_argument("--tls-cert", help="PEM certificate: serve https and wss")
    serve.add_argument("--tls-key", help="PEM private key for --tls-cert")
    serve.add_argument(
        "--secret-key-file",
        default=os.environ.get("SWITCHBOARD_SECRET_KEY_FILE"),
        metavar="PATH",
        help="the key that seals secret parameter values (default: DATA_DIR.key beside the"
        " data dir, made at the first start; or the key itself in SWITCHBOARD_SECRET_KEY)",
    )
    serve.add_argument(
        "--health-checks",
        default=os.environ.get("SWITCHBOARD_HEALTH_CHECKS"),
        metavar="FILE",
        help="TOML: the health-check job of each device class (docs/lab.md)",
    )
    serve.add_argument(
        "--reservation-ttl",
        type=_positive(float),
        default=DEFAULTS.reservation_ttl_s,
        metavar="SECONDS",
        help="a waiting reservation its client stops refreshing expires after this (default 60)",
    )
    serve.add_argument(
        "--lease-default",
        type=_positive(float),
        default=DEFAULTS.lease_default_s,
        metavar="SECONDS",
        help="how long a reservation's lease lasts unless it asks (default 3600)",
    )
    serve.add_argument(
        "--lease-max",
        type=_positive(float),
        default=DEFAULTS.lease_max_s,
        metavar="SECONDS",
        help="the longest a lease may last from its grant, extensions included (default 28800)",
    )
    serve.add_argument(
        "--power-timeout",
        type=_positive(float),
        default=DEFAULTS.power_timeout_s,
        metavar="SECONDS",
        help="how long a power call waits for the device's host to answer (default 40)",
    )
    logfmt.add_argument(serve, "SWITCHBOARD_LOG_FORMAT")
    serve.set_defaults(func=_serve)

    add_job_commands(commands)
    add_admin_commands(commands)
    add_db_commands(commands)
    add_device_commands(commands)
    add_group_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "run"):
        return args.run(args)  # client commands: errors become one line and exit status 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
