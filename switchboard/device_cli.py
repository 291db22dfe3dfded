"""`switchboard device list|show|set-health`: the lab's devices (docs/lab.md), each
command one REST call."""

from __future__ import annotations

import argparse
from typing import Any
from urllib.parse import quote

from switchboard.admin_cli import command_group, labels_text
from switchboard.cli_output import client, show, table, when
from switchboard.health import HEALTH_STATES


def _rows(devices: list[dict[str, Any]]) -> str:
    rows = [
        (
            d["id"],
            d["class"],
            d["supervisor_id"],
            d["health"],
            d["holder"] or "-",
            labels_text(d["labels"]),
        )
        for d in devices
    ]
    return table(rows, ["ID", "CLASS", "HOST", "HEALTH", "HOLDER", "LABELS"])


def _detail(d: dict[str, Any]) -> str:
    check = "-"
    if d["check_result"] is not None:
        check = f"{d['check_result']} at {when(d['check_at'])} (job {d['check_job'] or '-'})"
    facts = [
        ("id", d["id"]),
        ("class", d["class"]),
        ("host", d["supervisor_id"]),
        ("labels", labels_text(d["labels"])),
        ("console", "yes" if d["console"] else "no"),
        ("power", "yes" if d["power"] else "no"),
        ("health", f"{d['health']} since {when(d['health_at'])}"),
        ("reason", d["health_reason"] or "-"),
        ("last check", check),
        ("holder", d["holder"] or "-"),
    ]
    lines = [f"{name + ':':12} {value}" for name, value in facts]
    history = [
        (when(c["at"]), c.get("from") or "-", c["to"], c["actor"], c.get("job_id"), c["reason"])
        for c in d.get("history", [])
    ]
    if history:
        lines += ["", table(history, ["WHEN", "FROM", "TO", "BY", "JOB", "WHY"])]
    return "\n".join(lines)


def _path(device_id: str) -> str:
    return f"/api/v1/devices/{quote(device_id, safe='')}"


def _list(args: argparse.Namespace) -> int:
    found = client(args).get(
        "/api/v1/devices", **{"class": args.class_, "health": args.health, "host": args.host}
    )
    show(args, found, _rows)
    return 0


def _show(args: argparse.Namespace) -> int:
    show(args, client(args).get(_path(args.device_id)), _detail)
    return 0


def _set_health(args: argparse.Namespace) -> int:
    body = {"health": args.health, "reason": args.reason}
    show(args, client(args).put(f"{_path(args.device_id)}/health", body), _detail)
    return 0


def add_device_commands(commands: argparse._SubParsersAction) -> None:
    device = command_group(commands, "device", "the lab's devices: list, show, set health")
    listing = device("list", "the devices the supervisors declare", _list)
    listing.add_argument("--class", dest="class_", help="only devices of this class")
    listing.add_argument("--health", choices=HEALTH_STATES, help="only devices in this health")
    listing.add_argument("--host", help="only the devices of this supervisor")
    device("show", "one device, with its history of health", _show).add_argument("device_id")
    set_health = device(
        "set-health", "set a device's health (kept in its history, with who and why)", _set_health
    )
    set_health.add_argument("device_id")
    set_health.add_argument("health", choices=HEALTH_STATES)
    set_health.add_argument("--reason", required=True, help="why (kept in its history)")
