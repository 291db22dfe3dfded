"""Log output of the `switchboard` and `supervisor` commands: text for people, or one JSON
object per line for log collectors (`--log-format json`).

A JSON line holds `ts` (UTC, ISO 8601 with milliseconds), `level`, `logger` and `message`,
plus `exc` (the formatted traceback) when the record carries an exception and `stack` when
it carries a stack. Logs go to stderr either way; stdout stays for what the commands print.

Messages carry text from peers (request paths, a supervisor's error reason), so both
formats make it safe here, once for every logger: each argument is cut to MAX_ARG_CHARS
and the message to MAX_MESSAGE_CHARS (so are the lines of a traceback). In text, control
characters (newlines, escape sequences, Unicode line separators) are written as escapes
(`\\n`, `\\x1b`, `\\u2028`): a record is one line, followed only by the lines of its
traceback, each indented, so a line that starts in column 0 always starts a record and no
input can forge one. JSON escapes control characters itself; the line separators it would
leave raw are written as JSON escapes too, so a record stays one line for any reader.
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
#: The most characters one argument of a log call shows (a peer's reason, a path).
MAX_ARG_CHARS = 2048
#: The most characters one message shows, and one line of a traceback.
MAX_MESSAGE_CHARS = 8192

#: C0 and C1 control characters, DEL and the Unicode line and paragraph separators.
_CONTROLS = [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]
_NAMED = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}
_ESCAPES = {
    code: _NAMED.get(code, f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    for code in _CONTROLS
}


def clip(text: str, most: int) -> str:
    """`text`, cut to `most` characters saying how much was left out."""
    if len(text) <= most:
        return text
    return f"{text[:most]}…[{len(text) - most} more characters]"


def escape(text: str) -> str:
    """`text` with every control character written as an escape: one line, inert."""
    return text.translate(_ESCAPES)


class _Clipped:
    """An argument of a log call whose str() and repr() are cut to MAX_ARG_CHARS (numbers
    are passed as they are, so `%d` and `%.2f` still work)."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        return clip(str(self.value), MAX_ARG_CHARS)

    def __repr__(self) -> str:
        return clip(repr(self.value), MAX_ARG_CHARS)


def _clipped(value: object) -> object:
    return value if isinstance(value, int | float) else _Clipped(value)


def clipped_message(record: logging.LogRecord) -> str:
    """The record's message with its arguments clipped, then clipped whole."""
    args = record.args
    if isinstance(args, dict):
        record.args = {key: _clipped(value) for key, value in args.items()}
    elif args:
        record.args = tuple(_clipped(value) for value in args)
    try:
        message = record.getMessage()
    finally:
        record.args = args
    return clip(message, MAX_MESSAGE_CHARS)


def _clipped_lines(text: str) -> list[str]:
    """A traceback's lines, each clipped."""
    return [clip(line, MAX_MESSAGE_CHARS) for line in text.splitlines()]


#: What json.dumps(ensure_ascii=False) leaves raw but str.splitlines() and many log
#: readers take for a line break.
_JSON_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, one line per record; a traceback or stack follows, indented."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape(clipped_message(record))
        record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        extra = []
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            extra.append(record.exc_text)
        if record.stack_info:
            extra.append(self.formatStack(record.stack_info))
        lines = [escape(line) for part in extra for line in _clipped_lines(part)]
        return "\n".join([text, *(f"    {line}" for line in lines)])


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": clipped_message(record),
        }
        if record.exc_info:
            entry["exc"] = "\n".join(_clipped_lines(self.formatException(record.exc_info)))
        elif record.exc_text:
            entry["exc"] = "\n".join(_clipped_lines(record.exc_text))
        if record.stack_info:
            entry["stack"] = "\n".join(_clipped_lines(self.formatStack(record.stack_info)))
        return json.dumps(entry, ensure_ascii=False, default=str).translate(_JSON_LINE_BREAKS)


def add_argument(parser: argparse.ArgumentParser, env: str) -> None:
    """Add --log-format to a command, defaulting to $`env` or text."""
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default=os.environ.get(env) or "text",
        help=f"log lines on stderr: text, or one JSON object per line (or ${env}; default text)",
    )


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


def formatter_config(fmt: str) -> dict[str, Any]:
    """The formatter of `fmt` as a logging.config entry, for a framework that sets up
    logging itself from such a dict (Litestar's LoggingConfig)."""
    return {"()": JsonFormatter if fmt == "json" else TextFormatter}


def configure(fmt: str = "text", level: int = logging.INFO, stream: IO[str] | None = None) -> None:
    """Send the process's logs to `stream` (stderr) in format `fmt`, replacing any handler
    set up before."""
    if fmt not in FORMATS:
        raise SystemExit(f"unknown log format {fmt!r} (choose from {', '.join(FORMATS)})")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
