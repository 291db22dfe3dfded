"""Placeholder: the supervisor half of the kit (see conformance/__init__.py)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This half's options."""


def main(args: argparse.Namespace) -> int:
    raise SystemExit("not written yet")
