"""`switchboard group submit|show|list`: job groups (docs/lab.md, "Job groups"), each
command one REST call (`submit --wait` polls the group until it has ended)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from switchboard.admin_cli import command_group
from switchboard.cli_output import client, show, table, when

#: A group's states once every role has ended.
_ENDED = ("succeeded", "failed", "canceled")


def _detail(g: dict[str, Any]) -> str:
    facts = [
        ("id", g["id"]),
        ("name", g["name"]),
        ("state", g["state"]),
        ("created", when(g["created_at"])),
        ("placed", when(g["placed_at"]) if g.get("placed_at") else "-"),
        ("ended", when(g["ended_at"]) if g.get("ended_at") else "-"),
    ]
    if g.get("reason"):
        facts.append(("reason", g["reason"]))
    lines = [f"{name + ':':9} {value}" for name, value in facts]
    rows = [
        (
            r["role"],
            "yes" if r["essential"] else "no",
            r["job_id"],
            r.get("phase") or "deleted",
            r.get("supervisor_id") or "-",
            ",".join(r.get("devices", [])) or "-",
        )
        for r in g["roles"]
    ]
    lines += ["", table(rows, ["ROLE", "ESSENTIAL", "JOB", "PHASE", "HOST", "DEVICES"])]
    return "\n".join(lines)


def _rows(groups: list[dict[str, Any]]) -> str:
    rows = [
        (g["id"], g["name"], g["state"], str(len(g["roles"])), when(g["created_at"]))
        for g in groups
    ]
    return table(rows, ["ID", "NAME", "STATE", "ROLES", "CREATED"])


def _path(group_id: str) -> str:
    return f"/api/v1/groups/{quote(group_id, safe='')}"


def _submit(args: argparse.Namespace) -> int:
    api = client(args)
    made = api.post("/api/v1/groups", json.loads(Path(args.spec).read_bytes()))
    if args.wait:
        while made["state"] not in _ENDED:
            time.sleep(args.poll_every)
            made = api.get(_path(made["id"]))
        show(args, made, _detail)
        return 0 if made["state"] == "succeeded" else 1
    show(args, made, _detail)
    return 0


def _show(args: argparse.Namespace) -> int:
    show(args, client(args).get(_path(args.group_id)), _detail)
    return 0


def _list(args: argparse.Namespace) -> int:
    show(args, client(args).get("/api/v1/groups", limit=args.limit), _rows)
    return 0


def add_group_commands(commands: argparse._SubParsersAction) -> None:
    group = command_group(commands, "group", "job groups: roles placed all or none")
    submit = group("submit", "queue a job group from a JSON file (docs/lab.md)", _submit)
    submit.add_argument("spec", help="the group: {name, roles: [{role, spec, essential}]}")
    submit.add_argument(
        "--wait", action="store_true", help="wait until it has ended (exit 0 if it succeeded)"
    )
    submit.add_argument(
        "--poll-every", type=float, default=1.0, metavar="SECONDS", help=argparse.SUPPRESS
    )
    group("show", "one group: its state and roles", _show).add_argument("group_id")
    listing = group("list", "the newest groups", _list)
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
