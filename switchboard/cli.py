"""The `switchboard` command."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from switchboard.auth import Role, create_token
from switchboard.config import Settings
from switchboard.jobs_cli import add_job_commands
from switchboard.jobs_cli import run as run_job_command
from switchboard.store.sqlite import SQLiteStore


def _data_dir(value: str | None) -> Path:
    return Path(value or os.environ.get("SWITCHBOARD_DATA_DIR", "switchboard-data"))


def _serve(args: argparse.Namespace) -> int:
    from switchboard.server import run

    run(
        Settings(
            host=args.host,
            port=args.port,
            data_dir=_data_dir(args.data_dir),
            heartbeat_interval_s=args.heartbeat_interval,
            heartbeat_timeout_s=args.heartbeat_timeout,
            lost_after_s=args.lost_after,
            tls_cert=Path(args.tls_cert) if args.tls_cert else None,
            tls_key=Path(args.tls_key) if args.tls_key else None,
        )
    )
    return 0


def _token_create(args: argparse.Namespace) -> int:
    settings = Settings(data_dir=_data_dir(args.data_dir))

    async def make() -> str:
        store = SQLiteStore(settings.database_path)
        await store.open()
        try:
            return await create_token(store, Role(args.role), args.name or "")
        finally:
            await store.close()

    print(asyncio.run(make()))
    return 0


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
        "--lost-after",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long a disconnected supervisor's runs wait before they are lost",
    )
    serve.add_argument("--tls-cert", help="PEM certificate: serve https and wss")
    serve.add_argument("--tls-key", help="PEM private key for --tls-cert")
    serve.set_defaults(func=_serve)

    token = commands.add_parser("token", help="manage API and supervisor tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    create = token_commands.add_parser("create", help="create a token and print it (once)")
    create.add_argument("--role", required=True, choices=[r.value for r in Role])
    create.add_argument("--name", help="a label to recognise the token by")
    create.add_argument("--data-dir", help="the server's data dir (default ./switchboard-data)")
    create.set_defaults(func=_token_create)

    add_job_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "job":
        return run_job_command(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
