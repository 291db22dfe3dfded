"""`switchboard supervisor ...`, `switchboard token ...` and `switchboard dispatch ...`:
the operator's commands, each one REST call."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from typing import Any

from switchboard.auth import Role, TokenError, create_token
from switchboard.cli_output import add_connection_flags, client, show, table, when
from switchboard.cli_output import run as run_client
from switchboard.config import Settings
from switchboard.store.choice import database_uri
from switchboard.store.schema import SchemaMismatch


def data_dir(value: str | None) -> Path:
    return Path(value or os.environ.get("SWITCHBOARD_DATA_DIR", "switchboard-data"))


def database_arg(text: str) -> str:
    """An argparse type: a PostgreSQL URI (store.choice.database_uri)."""
    try:
        return database_uri(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def env_flag(name: str) -> bool:
    """A yes/no environment variable (1, true, yes, on; 0, false, no, off or unset);
    anything else stops with one line."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise SystemExit(f"switchboard: {name}={value!r}: give 1 or 0 (true/false, yes/no, on/off)")


def labels_text(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def _supervisor_rows(supervisors: list[dict[str, Any]]) -> str:
    rows = [
        (
            s["id"],
            s["name"],
            "connected" if s["connected"] else "gone",
            "drained" if s["drained"] else "active",
            f"{s['running']}/{s['max_jobs']}",
            ",".join(s["backends"]) or "-",
            labels_text(s["labels"]),
        )
        for s in supervisors
    ]
    return table(rows, ["ID", "NAME", "LINK", "STATE", "RUNS", "BACKENDS", "LABELS"])


def _supervisor_list(args: argparse.Namespace) -> int:
    show(args, client(args).get("/api/v1/supervisors"), _supervisor_rows)
    return 0


def _supervisor_show(args: argparse.Namespace) -> int:
    supervisor = client(args).get(f"/api/v1/supervisors/{args.supervisor_id}")
    show(args, supervisor, lambda s: _supervisor_rows([s]))
    return 0


def _supervisor_action(action: str) -> Any:
    def act(args: argparse.Namespace) -> int:
        supervisor = client(args).post(f"/api/v1/supervisors/{args.supervisor_id}/{action}")
        show(args, supervisor, lambda s: _supervisor_rows([s]))
        return 0

    return act


def _supervisor_label(args: argparse.Namespace) -> int:
    labels = {}
    for pair in args.labels:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"switchboard: a label is KEY=VALUE, got {pair!r}")
        labels[key] = value
    supervisor = client(args).put(
        f"/api/v1/supervisors/{args.supervisor_id}/labels", {"labels": labels}
    )
    show(args, supervisor, lambda s: _supervisor_rows([s]))
    return 0


def _created(token: dict[str, Any]) -> str:
    return f"{token['token']}\n(token id {token['id']}, role {token['role']}; shown only once)"


def _supervisor_rotate(args: argparse.Namespace) -> int:
    token = client(args).post(f"/api/v1/supervisors/{args.supervisor_id}/token")
    show(args, token, _created)
    return 0


def _supervisor_unenroll(args: argparse.Namespace) -> int:
    released = client(args).post(f"/api/v1/supervisors/{args.supervisor_id}/unenroll")

    def human(r: dict[str, Any]) -> str:
        revoked = ", ".join(r["revoked"]) or "none"
        return (
            f"supervisor {r['supervisor_id']} released (tokens revoked: {revoked}); the next"
            " registration token that presents it enrols it"
        )

    show(args, released, human)
    return 0


def _token_create(args: argparse.Namespace) -> int:
    if args.data_dir or args.database:
        # Bootstrap: no server and no token yet, so write the first one into the database.
        return _token_bootstrap(args)
    body = {"role": args.role, "name": args.name or "", "supervisor_id": args.supervisor}
    show(args, client(args).post("/api/v1/tokens", body), _created)
    return 0


def _token_bootstrap(args: argparse.Namespace) -> int:
    from switchboard.store.choice import make_store

    settings = Settings(
        data_dir=data_dir(args.data_dir),
        database=args.database,
        database_pooler=bool(args.database and args.database_pooler),
    )

    async def make() -> str:
        store = make_store(settings)
        await store.open()
        try:
            made = await create_token(
                store, Role(args.role), args.name or "", supervisor_id=args.supervisor
            )
            return made.token
        finally:
            await store.close()

    refused: tuple[type[Exception], ...] = (SchemaMismatch,)
    if args.database:
        import asyncpg  # what a database may refuse or fail with (only when one is named)

        refused += (OSError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError)
    try:
        print(asyncio.run(make()))
    except TokenError as exc:
        raise SystemExit(f"switchboard: --supervisor: {exc}") from None
    except refused as exc:
        raise SystemExit(f"switchboard: {exc}") from None
    return 0


def _token_list(args: argparse.Namespace) -> int:
    def human(tokens: list[dict[str, Any]]) -> str:
        rows = [
            (
                t["id"],
                t["role"],
                t["name"] or "-",
                t["supervisor_id"],
                when(t["created_at"]),
                "revoked" if t["revoked"] else "active",
            )
            for t in tokens
        ]
        return table(rows, ["ID", "ROLE", "NAME", "SUPERVISOR", "CREATED", "STATE"])

    show(args, client(args).get("/api/v1/tokens"), human)
    return 0


def _token_revoke(args: argparse.Namespace) -> int:
    client(args).delete(f"/api/v1/tokens/{args.token_id}")
    print(f"token {args.token_id} revoked")
    return 0


def _dispatch(path: str) -> Any:
    def act(args: argparse.Namespace) -> int:
        api = client(args)
        state = api.post(f"/api/v1/dispatch/{path}") if path else api.get("/api/v1/dispatch")
        show(
            args,
            state,
            lambda s: f"dispatch {'paused' if s['paused'] else 'running'}, {s['queued']} queued",
        )
        return 0

    return act


def command_group(commands: argparse._SubParsersAction, name: str, help: str) -> Any:
    group = commands.add_parser(name, help=help).add_subparsers(dest=f"{name}_command")
    group.required = True

    def command(sub: str, sub_help: str, func: Any) -> argparse.ArgumentParser:
        parser = group.add_parser(sub, help=sub_help)
        add_connection_flags(parser)
        parser.set_defaults(func=func, run=run_client)
        return parser

    return command


def add_admin_commands(commands: argparse._SubParsersAction) -> None:
    supervisor = command_group(commands, "supervisor", "list, drain and label supervisors")
    supervisor("list", "every supervisor the switchboard knows", _supervisor_list)
    for name, help, func in [
        ("show", "one supervisor", _supervisor_show),
        ("drain", "finish its runs, take no new ones", _supervisor_action("drain")),
        ("resume", "take new runs again", _supervisor_action("resume")),
        ("rotate-token", "a new bound token; the old ones stop working", _supervisor_rotate),
        (
            "unenroll",
            "revoke its credentials, so a registration token may enrol the id again",
            _supervisor_unenroll,
        ),
    ]:
        supervisor(name, help, func).add_argument("supervisor_id")
    label = supervisor(
        "label", "set operator labels (replaces the previous set)", _supervisor_label
    )
    label.add_argument("supervisor_id")
    label.add_argument("labels", nargs="*", metavar="KEY=VALUE")

    token = command_group(commands, "token", "create, list and revoke tokens")
    create = token("create", "create a token and print it (shown once)", _token_create)
    create.add_argument("--role", required=True, choices=[r.value for r in Role])
    create.add_argument("--name", help="a label to recognise the token by")
    create.add_argument("--supervisor", help="bind a supervisor token to this supervisor id")
    create.add_argument(
        "--data-dir",
        help="write it straight into this server data dir instead (the first admin token)",
    )
    create.add_argument(
        "--database",
        type=database_arg,
        default=os.environ.get("SWITCHBOARD_DATABASE") or None,
        metavar="URI",
        help="write it straight into this PostgreSQL database instead (the first admin"
        " token of a switchboard serving it; env SWITCHBOARD_DATABASE)",
    )
    create.add_argument(
        "--database-pooler",
        action="store_true",
        default=env_flag("SWITCHBOARD_DATABASE_POOLER"),
        help="with --database: the URI goes through a pooler in transaction mode (as"
        " `serve --database-pooler`; env SWITCHBOARD_DATABASE_POOLER=1)",
    )
    token("list", "every token (never the secrets)", _token_list)
    revoke = token("revoke", "revoke a token; its connections are closed", _token_revoke)
    revoke.add_argument("token_id")

    dispatch = command_group(commands, "dispatch", "pause or resume placing jobs")
    dispatch("status", "whether dispatch runs, and how many jobs wait", _dispatch(""))
    dispatch("pause", "place no new jobs (running ones go on)", _dispatch("pause"))
    dispatch("resume", "place jobs again", _dispatch("resume"))
