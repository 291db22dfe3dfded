"""How the CLI's client commands talk: the shared connection flags, tables for people,
JSON for scripts, and errors as one line on stderr with exit status 2."""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from switchboard.client import Client, ClientError

_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(text: str) -> float:
    """Seconds, optionally with a unit: 90 (seconds), 90s, 15m, 12h, 30d."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 90, 15m, 12h, 30d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


#: Exit status for "the command itself failed" (as opposed to a job's own exit code).
EXIT_ERROR = 2


def add_connection_flags(parser: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    parser.add_argument("--url", help="switchboard URL ($SWITCHBOARD_URL, config file)")
    given = parser.add_mutually_exclusive_group()
    given.add_argument(
        "--token-file",
        metavar="FILE",
        help="file holding the API token, mode 600 ($SWITCHBOARD_TOKEN_FILE, config file)",
    )
    given.add_argument(
        "--token",
        help="the API token itself ($SWITCHBOARD_TOKEN); avoid: others can read a command line",
    )
    parser.add_argument(
        "--ca-file", help="CA certificate to trust for https ($SWITCHBOARD_CA_FILE, config file)"
    )
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print JSON, for scripts")


def client(args: argparse.Namespace) -> Client:
    return Client(args.url, args.token, ca_file=args.ca_file, token_file=args.token_file)


def when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Left-aligned columns, as wide as their widest cell."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def show(args: argparse.Namespace, data: Any, human: Callable[[Any], str]) -> None:
    """Print `data` as JSON with --json, else as `human(data)` says."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2))
    else:
        print(human(data))


def run(args: argparse.Namespace) -> int:
    """Run a client command; a refusal or an unreachable server is one clear line."""
    try:
        return args.func(args)
    except ClientError as exc:
        print(f"switchboard: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (OSError, json.JSONDecodeError) as exc:
        print(f"switchboard: {exc}", file=sys.stderr)
        return EXIT_ERROR
