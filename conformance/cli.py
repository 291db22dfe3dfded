"""`switchboard-conformance`: the command line of the conformance kit."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchboard-conformance",
        description="Check an implementation of the switchboard supervisor protocol"
        " (docs/protocol.md) against the document.",
    )
    sub = parser.add_subparsers(dest="half", required=True)
    from conformance import check_supervisor, check_switchboard

    check_supervisor.add_arguments(
        sub.add_parser("supervisor", help="drive a supervisor implementation under test")
    )
    check_switchboard.add_arguments(
        sub.add_parser("switchboard", help="check a running switchboard implementation")
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from conformance import check_supervisor, check_switchboard

    half = check_supervisor if args.half == "supervisor" else check_switchboard
    status: int = half.main(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
