"""The switchboard half of the kit: a scripted supervisor checks a running switchboard
against docs/protocol.md and prints one row per check (docs/conformance.md, "Checking a
switchboard")."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import ssl
import sys
import time
from urllib.parse import urlsplit, urlunsplit

from common.secret_files import SecretFileError, read_secret_file
from conformance.report import Result, exit_status, print_table
from conformance.sb_kit import Broken, Kit, Rows
from conformance.sb_rest import SwitchboardApi
from conformance.sb_scenarios import SCENARIOS, Scenario

#: The supervisor endpoint's path (docs/protocol.md §1), added to a URL that names none.
WS_PATH = "/ws/supervisor"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This half's options."""
    parser.add_argument(
        "--url",
        required=True,
        help=f"the supervisor WebSocket, e.g. ws://127.0.0.1:8765{WS_PATH} (the path is"
        " added when the URL has none)",
    )
    parser.add_argument(
        "--token-file",
        required=True,
        help="a supervisor registration token (role supervisor, bound to no id): the kit"
        " enrols a fresh supervisor id with it for each scenario",
    )
    parser.add_argument(
        "--api", required=True, help="the REST API's base URL, e.g. http://127.0.0.1:8765"
    )
    parser.add_argument(
        "--admin-token-file",
        "--api-token-file",
        dest="api_token_file",
        required=True,
        help="a token that may submit, cancel and read jobs over the API (admin, operator"
        " or submitter)",
    )
    parser.add_argument("--ca-file", help="PEM CA to trust for wss:// and https://")
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds to wait for each answer of the switchboard (default 10)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=[s.name for s in SCENARIOS],
        metavar="SCENARIO",
        help="run only this scenario (repeatable): "
        + ", ".join(s.name for s in SCENARIOS if not s.opt_in),
    )
    parser.add_argument(
        "--heartbeat-timeout-check",
        action="store_true",
        help="also check that a silent supervisor is closed after heartbeat_timeout_s"
        " (the heartbeat_timeout scenario: as long as that timeout, 20 s by default)",
    )
    parser.add_argument(
        "--id-prefix",
        default=f"conformance-{secrets.token_hex(4)}",
        help="prefix of the supervisor ids the kit enrols (default conformance-<random>)",
    )


def main(args: argparse.Namespace) -> int:
    try:
        registration = read_secret_file(args.token_file)
        api_token = read_secret_file(args.api_token_file)
    except SecretFileError as exc:
        print(f"switchboard-conformance: {exc}", file=sys.stderr)
        return 2
    chosen = [
        s
        for s in SCENARIOS
        if (s.name in args.only if args.only else not s.opt_in)
        or (s.opt_in and args.heartbeat_timeout_check)
    ]
    results = asyncio.run(_run(args, registration, api_token, chosen))
    print_table(results)
    return exit_status(results)


def supervisor_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.path in ("", "/"):
        parts = parts._replace(path=WS_PATH)
    return urlunsplit(parts)


async def _run(
    args: argparse.Namespace, registration: str, api_token: str, chosen: list[Scenario]
) -> list[Result]:
    context = ssl.create_default_context(cafile=args.ca_file) if args.ca_file else None
    url = supervisor_url(args.url)
    api = SwitchboardApi(args.api, api_token, verify=context or True)
    kit = Kit(
        url=url,
        registration_token=registration,
        api=api,
        prefix=args.id_prefix,
        timeout=args.timeout,
        ssl_context=context if url.startswith("wss:") else None,
    )
    results: list[Result] = []
    try:
        for scenario in chosen:
            results += await _scenario(kit, scenario)
    finally:
        await kit.cleanup()
        await api.close()
    return results


async def _scenario(kit: Kit, scenario: Scenario) -> list[Result]:
    """One scenario's rows; a step that broke fails the rows not yet checked, saying why."""
    rows = Rows(scenario.rows)
    began = time.monotonic()
    # A scenario waits at most `timeout` per answer; the bound is for one that hangs.
    budget = None if scenario.opt_in else kit.timeout * 12
    why = "the scenario ended before it"
    try:
        await asyncio.wait_for(scenario.run(kit, rows), budget)
    except Broken as exc:
        why = str(exc)
    except TimeoutError:
        why = f"the scenario took longer than {budget:g} s"
    except Exception as exc:  # the switchboard's doing, reported as a row, not a crash
        why = f"{type(exc).__name__}: {exc}"
    print(f"{scenario.name}: {time.monotonic() - began:.2f} s", file=sys.stderr)
    return rows.finish(why)
