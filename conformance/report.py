"""The kit's results: one row per check, printed as a table."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO


@dataclass(frozen=True)
class Result:
    """One check: its name (stable, for people and scripts), whether it held, and what
    was seen (the evidence when it failed; a short note when it held)."""

    name: str
    passed: bool
    detail: str = ""


def print_table(results: Sequence[Result], out: TextIO = sys.stdout) -> None:
    """Results as a table, then a line counting them."""
    width = max((len(r.name) for r in results), default=5)
    out.write(f"{'check'.ljust(width)}  result  detail\n")
    out.write(f"{'-' * width}  ------  ------\n")
    for result in results:
        verdict = "pass" if result.passed else "FAIL"
        out.write(f"{result.name.ljust(width)}  {verdict:<6}  {result.detail}\n")
    failed = sum(not r.passed for r in results)
    out.write(f"\n{len(results) - failed} passed, {failed} failed\n")


def exit_status(results: Sequence[Result]) -> int:
    """0 when every check held (and there was one), else 1."""
    return 0 if results and all(r.passed for r in results) else 1
