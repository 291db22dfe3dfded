"""Log output of the `switchboard` and `supervisor` commands: text for people, or one JSON
object per line for log collectors (`--log-format json`).

A JSON line holds `ts` (UTC, ISO 8601 with milliseconds), `level`, `logger` and `message`,
plus `exc` (the formatted traceback) when the record carries an exception and `stack` when
it carries a stack. Logs go to stderr either way; stdout stays for what the commands print.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import IO, Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def add_argument(parser: argparse.ArgumentParser, env: str) -> None:
    """Add --log-format to a command, defaulting to $`env` or text."""
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default=os.environ.get(env) or "text",
        help=f"log lines on stderr: text, or one JSON object per line (or ${env}; default text)",
    )


def formatter_config(fmt: str) -> dict[str, Any]:
    """The formatter of `fmt` as a logging.config entry, for a framework that sets up
    logging itself from such a dict (Litestar's LoggingConfig)."""
    return {"()": JsonFormatter} if fmt == "json" else {"format": TEXT_FORMAT}


def configure(fmt: str = "text", level: int = logging.INFO, stream: IO[str] | None = None) -> None:
    """Send the process's logs to `stream` (stderr) in format `fmt`, replacing any handler
    set up before."""
    if fmt not in FORMATS:
        raise SystemExit(f"unknown log format {fmt!r} (choose from {', '.join(FORMATS)})")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
