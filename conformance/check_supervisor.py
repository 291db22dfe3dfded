"""`switchboard-conformance supervisor --command "..."`: start the supervisor under test
against the kit's scripted switchboard, drive it through the scenarios of
conformance.sup_scenarios and print a row per check (docs/conformance.md).

Scenarios share one process while they pass (a scenario marked fresh gets a new one);
after a failure the process is stopped and the next scenario starts a new one, so one
fault does not cascade.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from .report import Result, exit_status, print_table
from .sup_kit import Checks, Kit
from .sup_link import KitFailure
from .sup_process import PLACEHOLDERS, CommandError, SupervisorProcess, expand
from .sup_scenarios import SCENARIOS, Scenario
from .sup_server import KitServer

NEVER_CONNECTED = "not run: the supervisor never connected to the kit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This half's options."""
    names = ", ".join("{" + name + "}" for name in PLACEHOLDERS)
    parser.add_argument(
        "--command",
        required=True,
        help=f"the supervisor to check, as a shell-style command line with placeholders"
        f' ({names}), e.g. "supervisor run --switchboard {{url}} --token-file'
        f' {{token_file}} --work-dir {{work_dir}} --backend noop --name sut"',
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long the command may take to connect after it starts (default 10)",
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=[s.name for s in SCENARIOS],
        metavar="NAME",
        help="run only this scenario (repeatable; default: all): "
        + ", ".join(s.name for s in SCENARIOS),
    )


def main(args: argparse.Namespace) -> int:
    try:
        expand(args.command, dict.fromkeys(PLACEHOLDERS, "x"))
    except CommandError as exc:
        print(f"switchboard-conformance: {exc}", file=sys.stderr)
        return 2
    chosen = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]
    try:
        results, reports = asyncio.run(run(args.command, chosen, args.startup_timeout))
    except CommandError as exc:
        print(f"switchboard-conformance: {exc}", file=sys.stderr)
        return 2
    print_table(results)
    for report in reports:
        print(report)
    return exit_status(results)


async def run(
    command: str, scenarios: list[Scenario], startup_timeout_s: float
) -> tuple[list[Result], list[str]]:
    """Every row, and for each failed scenario the tail of the command's output."""
    results: list[Result] = []
    reports: list[str] = []
    with tempfile.TemporaryDirectory(prefix="switchboard-conformance-") as scratch:
        server = KitServer()
        await server.start()
        kit = Kit(server, SupervisorProcess(command, server.url, Path(scratch)), startup_timeout_s)
        ran = False
        try:
            for scenario in scenarios:
                if ran and not server.upgrades:
                    # Each would wait for it in vain: say so at once.
                    results += Checks(scenario.rows).finish(NEVER_CONNECTED)
                    continue
                if scenario.fresh:
                    await kit.restart()
                ran = True
                rows = await _run_one(kit, scenario)
                results += rows
                if not all(row.passed for row in rows):
                    # Stopped first, so that what it writes as it goes is in the tail; the
                    # next scenario starts a fresh process (kit.connected()).
                    await kit.stop_process()
                    tail = kit.process.output_tail()
                    reports.append(
                        f"\n--- {scenario.name} failed; the supervisor's last output:\n{tail}"
                    )
            results.append(sequence_result(kit))
        finally:
            await kit.close()
    return results, reports


async def _run_one(kit: Kit, scenario: Scenario) -> list[Result]:
    checks = Checks(scenario.rows)
    failure = None
    try:
        await asyncio.wait_for(scenario.run(kit, checks), scenario.budget_s)
    except KitFailure as exc:
        failure = str(exc)
    except TimeoutError:
        failure = f"the scenario took longer than {scenario.budget_s:g} s"
    return checks.finish(failure)


def sequence_result(kit: Kit) -> Result:
    """`events.seq`: over every process, each new event's seq was one more than the last
    (from 1), a resend repeated an event unchanged, nothing acknowledged came back."""
    if not kit.server.upgrades:
        return Result("events.seq", False, NEVER_CONNECTED)
    violations = [v for ledger in kit.ledgers for v in ledger.violations]
    events = sum(len(ledger.events) for ledger in kit.ledgers)
    resent = sum(ledger.resent for ledger in kit.ledgers)
    if not events:
        return Result("events.seq", True, "n/a: no events came")
    if violations:
        shown = "; ".join(violations[:3]) + (" ..." if len(violations) > 3 else "")
        return Result("events.seq", False, shown)
    return Result("events.seq", True, f"{events} events numbered 1, 2, 3, ...; {resent} resent")
