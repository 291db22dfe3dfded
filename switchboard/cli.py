"""The `switchboard` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from protocol import logfmt
from switchboard.admin_cli import add_admin_commands, data_dir
from switchboard.config import Settings
from switchboard.jobs_cli import add_job_commands


def _serve(args: argparse.Namespace) -> int:
    from switchboard.server import run

    run(
        Settings(
            host=args.host,
            port=args.port,
            data_dir=data_dir(args.data_dir),
            heartbeat_interval_s=args.heartbeat_interval,
            heartbeat_timeout_s=args.heartbeat_timeout,
            send_timeout_s=args.send_timeout,
            outbox_max_bytes=args.outbox_max_bytes,
            outbox_max_messages=args.outbox_max_messages,
            lost_after_s=args.lost_after,
            max_queued_jobs=args.max_queued,
            aging_s=args.aging,
            run_timeout_grace_s=args.run_timeout_grace,
            tls_cert=Path(args.tls_cert) if args.tls_cert else None,
            tls_key=Path(args.tls_key) if args.tls_key else None,
            log_format=args.log_format,
        )
    )
    return 0


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """An argparse type: a number of `kind` greater than zero."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, not {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchboard", description="Dispatch jobs to supervisors."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the switchboard server")
    serve.add_argument("--host", default=os.environ.get("SWITCHBOARD_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("SWITCHBOARD_PORT", "8765")))
    serve.add_argument("--data-dir", help="database and artifacts (default ./switchboard-data)")
    serve.add_argument(
        "--heartbeat-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how often each side of a supervisor connection sends a heartbeat",
    )
    serve.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="silence after which a connection is considered dead",
    )
    serve.add_argument(
        "--send-timeout",
        type=_positive(float),
        default=10.0,
        metavar="SECONDS",
        help="how long a message to a supervisor may wait for its socket to take it before "
        "the connection is cut (default 10)",
    )
    serve.add_argument(
        "--outbox-max-bytes",
        type=_positive(int),
        default=16 * 1024 * 1024,
        metavar="BYTES",
        help="most bytes waiting to be sent to one supervisor; more cuts its connection "
        "(default 16 MiB)",
    )
    serve.add_argument(
        "--outbox-max-messages",
        type=_positive(int),
        default=10_000,
        metavar="N",
        help="most messages waiting to be sent to one supervisor; more cuts its connection "
        "(default 10000)",
    )
    serve.add_argument(
        "--lost-after",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long a disconnected supervisor's runs wait before they are lost",
    )
    serve.add_argument(
        "--max-queued",
        type=int,
        default=100_000,
        metavar="JOBS",
        help="most jobs waiting; a submission beyond it gets 429 (default 100000)",
    )
    serve.add_argument(
        "--aging",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="a queued job gains one priority level per this much waiting (0: never)",
    )
    serve.add_argument(
        "--run-timeout-grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long past a run's timeout the switchboard ends it itself if its supervisor "
        "has not reported the end (silent or gone)",
    )
    serve.add_argument("--tls-cert", help="PEM certificate: serve https and wss")
    serve.add_argument("--tls-key", help="PEM private key for --tls-cert")
    logfmt.add_argument(serve, "SWITCHBOARD_LOG_FORMAT")
    serve.set_defaults(func=_serve)

    add_job_commands(commands)
    add_admin_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "run"):
        return args.run(args)  # client commands: errors become one line and exit status 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
