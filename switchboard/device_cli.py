"""`switchboard device list|show|set-health|power|console|reserve|reservations|extend|release`:
the lab's devices and their reservations (docs/lab.md), each command one REST call
(`reserve --wait` refreshes its reservation until it is held)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any
from urllib.parse import quote

from protocol.messages import POWER_ACTIONS
from switchboard.admin_cli import command_group, labels_text
from switchboard.cli_output import client, duration, show, table, when
from switchboard.console_cli import add_console_command
from switchboard.health import HEALTH_STATES


def _rows(devices: list[dict[str, Any]]) -> str:
    rows = [
        (
            d["id"],
            d["class"],
            d["supervisor_id"],
            d["health"],
            d["holder"] or d.get("reservation") or "-",
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
        ("reserved", d.get("reservation") or "-"),
    ]
    lines = [f"{name + ':':12} {value}" for name, value in facts]
    history = [
        (when(c["at"]), c.get("from") or "-", c["to"], c["actor"], c.get("job_id"), c["reason"])
        for c in d.get("history", [])
    ]
    if history:
        lines += ["", table(history, ["WHEN", "FROM", "TO", "BY", "JOB", "WHY"])]
    calls = [
        (when(c["at"]), c["action"], c["result"], c["actor"], c.get("job_id"), c["reason"])
        for c in d.get("power_history", [])
    ]
    if calls:
        lines += ["", table(calls, ["WHEN", "POWER", "RESULT", "BY", "JOB", "WHY"])]
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


def _power_answer(a: dict[str, Any]) -> str:
    status = "-" if a["exit_code"] is None else str(a["exit_code"])
    lines = [f"power {a['action']} of {a['device_id']}: {a['result']} (exit status {status})"]
    if a["reason"]:
        lines.append(a["reason"])
    if a["output"]:
        lines.append(a["output"].rstrip("\n"))
    return "\n".join(lines)


def _power(args: argparse.Namespace) -> int:
    answer = client(args).post(f"{_path(args.device_id)}/power", {"action": args.action})
    show(args, answer, _power_answer)
    return 0 if answer["ok"] else 1


def _reservation_rows(found: list[dict[str, Any]]) -> str:
    rows = [
        (
            r["id"],
            r["state"],
            r["actor"],
            f"{r['count']} {r.get('class') or 'device(s)'}",
            ",".join(r["devices"]) or "-",
            when(r["expires_at"]) if r["state"] == "held" else "-",
        )
        for r in found
    ]
    return table(rows, ["ID", "STATE", "HOLDER", "WANTS", "DEVICES", "UNTIL"])


def _reservation(r: dict[str, Any]) -> str:
    facts = [
        ("id", r["id"]),
        ("state", r["state"] + (f" ({r['end_reason']})" if r["end_reason"] else "")),
        ("holder", r["actor"]),
        ("wants", f"{r['count']} {r.get('class') or 'device(s)'}"),
        ("devices", ", ".join(r["devices"]) or "-"),
        ("until" if r["state"] == "held" else "expires", when(r["expires_at"])),
    ]
    return "\n".join(f"{name + ':':9} {value}" for name, value in facts)


def _reservation_path(reservation_id: str) -> str:
    return f"/api/v1/reservations/{quote(reservation_id, safe='')}"


def _selector(pairs: list[str]) -> dict[str, Any]:
    labels = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise SystemExit(f"switchboard: --selector {pair!r}: KEY=VALUE expected")
        labels[key] = value
    return {"match_labels": labels}


def _reserve(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"count": args.count, "priority": args.priority}
    if args.class_:
        body["class"] = args.class_
    if args.selector:
        body["selector"] = _selector(args.selector)
    if args.for_s is not None:
        body["for_s"] = args.for_s
    api = client(args)
    made = api.post("/api/v1/reservations", body)
    if args.wait:
        # The reservation expires unless refreshed while it waits: refresh it well inside
        # the switchboard's TTL until it is held (or has ended).
        path = _reservation_path(made["id"])
        print(f"waiting for {made['id']}...", file=sys.stderr)
        try:
            while made["state"] == "waiting":
                time.sleep(args.refresh_every)
                made = api.post(f"{path}/refresh")
        except KeyboardInterrupt:
            api.request("DELETE", path)
            print(f"released {made['id']}", file=sys.stderr)
            return 130
    show(args, made, _reservation)
    return 0 if made["state"] in ("waiting", "held") else 1


def _reservations(args: argparse.Namespace) -> int:
    show(args, client(args).get("/api/v1/reservations"), _reservation_rows)
    return 0


def _extend(args: argparse.Namespace) -> int:
    path = f"{_reservation_path(args.reservation_id)}/extend"
    show(args, client(args).post(path, {"by_s": args.by}), _reservation)
    return 0


def _release(args: argparse.Namespace) -> int:
    response = client(args).request("DELETE", _reservation_path(args.reservation_id))
    show(args, response.json(), _reservation)
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
    power = device(
        "power", "run a device's power command on its host (operators, its lease holder)", _power
    )
    power.add_argument("device_id")
    power.add_argument("action", choices=POWER_ACTIONS)
    add_console_command(device)
    reserve = device(
        "reserve", "reserve devices: all of them at once, for a lease that ends by itself", _reserve
    )
    reserve.add_argument("--class", dest="class_", help="the devices' class")
    reserve.add_argument(
        "--selector", action="append", default=[], metavar="KEY=VALUE", help="a device label"
    )
    reserve.add_argument("--count", type=int, default=1, help="how many devices (default 1)")
    reserve.add_argument("--priority", type=int, default=0, help="among waiting reservations")
    reserve.add_argument(
        "--for", dest="for_s", type=duration, help="the lease (e.g. 2h; default: the server's)"
    )
    reserve.add_argument(
        "--wait", action="store_true", help="refresh it until it is held, then print it"
    )
    reserve.add_argument(
        "--refresh-every", type=float, default=10.0, metavar="SECONDS", help=argparse.SUPPRESS
    )
    device("reservations", "the reservations waiting or held", _reservations)
    extend = device("extend", "lengthen a reservation's lease", _extend)
    extend.add_argument("reservation_id")
    extend.add_argument("--by", type=duration, required=True, help="e.g. 30m")
    device("release", "release a reservation now", _release).add_argument("reservation_id")
