"""Text from peers can't forge or flood log lines: free text is cut and, in text logs,
control characters are escaped, in the formatter (common.logfmt), so every logger of a
real switchboard process is covered."""

from __future__ import annotations

import io
import json
import logging
import re
import time

import httpx
import pytest
import websockets

from common import logfmt
from protocol import codec, limits
from protocol.messages import Hello, ProtocolErrorMessage
from protocol.versions import supported_versions
from tests.harness import Switchboard, scaled

#: A line a forger would like the log to show.
FORGED = "2026-01-01 00:00:00,000 switchboard CRITICAL forged by a client"
#: A log line as the text format starts it.
RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \S+ [A-Z]+ ")


def _wait_for_log(switchboard: Switchboard, needle: str) -> str:
    deadline = time.monotonic() + scaled(10)
    while needle not in (log := switchboard.process.log_path.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"{needle!r} never logged"
        time.sleep(0.05)
    return log


def _lines_with(log: str, needle: str) -> list[str]:
    return [line for line in log.splitlines() if needle in line]


def test_request_path_with_newline_forges_no_log_line(switchboard: Switchboard):
    # A NUL byte in a dashboard asset path was a 500, whose log line named the path: the
    # %0a in it started a line of the attacker's choosing.
    path = "/dashboard/%00x%0a" + FORGED.replace(" ", "%20")
    response = httpx.get(switchboard.url + path)
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"
    log = switchboard.process.log()
    assert "forged by a client" not in log
    assert "unhandled error" not in log


async def _report_protocol_error(switchboard: Switchboard, name: str, reason: str) -> None:
    token = switchboard.create_token("supervisor", supervisor_id=name)
    async with websockets.connect(
        f"{switchboard.ws_url}/ws/supervisor",
        additional_headers={"Authorization": f"Bearer {token}"},
        subprotocols=[websockets.Subprotocol(limits.SUBPROTOCOL)],
        max_size=None,
    ) as ws:
        hello = Hello(supervisor_id=name, name=name, versions=supported_versions())
        await ws.send(codec.encode(hello), text=True)
        await ws.recv()  # welcome
        await ws.send(codec.encode(ProtocolErrorMessage(code=4000, reason=reason)), text=True)
        await ws.wait_closed()


async def test_supervisor_reason_is_escaped_and_cut(switchboard: Switchboard):
    # A supervisor's protocol_error reason was logged as sent: 900,004 characters on one
    # line, and any newline in it started a forged line.
    reason = "x" * 900_000 + "\n" + FORGED + "\x1b[2J"
    await _report_protocol_error(switchboard, "chatty-1", reason)
    log = _wait_for_log(switchboard, "chatty-1 reported a protocol error")
    [line] = _lines_with(log, "chatty-1 reported a protocol error")
    assert len(line) < logfmt.MAX_ARG_CHARS + 200
    cut = len(reason) - logfmt.MAX_ARG_CHARS
    assert line.endswith(f"x…[{cut} more characters] (4000)"), line[-80:]
    assert not [line for line in log.splitlines() if "forged by a client" in line]
    # Uncut, the newline and the escape sequence are shown as escapes, on the same line.
    short = "short\n" + FORGED + "\x1b[2J\u2028"
    await _report_protocol_error(switchboard, "chatty-2", short)
    log = _wait_for_log(switchboard, "chatty-2 reported a protocol error")
    [line] = _lines_with(log, "chatty-2 reported a protocol error")
    assert "short\\n" + FORGED + "\\x1b[2J\\u2028 (4000)" in line
    assert not [line for line in log.splitlines() if line.startswith(FORGED)]


def _format(fmt: str, *args: object, exc: BaseException | None = None) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logfmt.formatter(fmt))
    logger = logging.getLogger(f"test.logfmt.{fmt}")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.error(*args, exc_info=exc)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def _raised(message: str) -> BaseException:
    try:
        raise ValueError(message)
    except ValueError as exc:
        return exc


@pytest.mark.unit
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_formatter_escapes_and_cuts_every_part(fmt: str):
    path = "/x\n" + FORGED + "\u2028"
    text = _format(fmt, "refused %s %r %d %.1f", path, path, 7, 2.5, exc=_raised("bad\n" + FORGED))
    lines = text.splitlines()  # which breaks at \u2028 too
    if fmt == "json":
        # One line; JSON's own escapes keep the text as it was.
        [line] = lines
        entry = json.loads(line)
        assert entry["message"].startswith("refused " + path)
        assert entry["message"].endswith(" 7 2.5")
        assert entry["exc"].endswith("ValueError: bad\n" + FORGED)
    else:
        assert RECORD_START.match(lines[0])
        assert "refused /x\\n" + FORGED + "\\u2028" in lines[0] and lines[0].endswith(" 7 2.5")
        # The traceback follows, every line indented: only a record starts in column 0.
        assert lines[1] == "    Traceback (most recent call last):"
        assert all(line.startswith("    ") for line in lines[1:])
        assert lines[-2:] == ["    ValueError: bad", "    " + FORGED]
    huge = _format(fmt, "%s and %s", "a" * 10**6, "b" * 10)
    assert len(huge) < logfmt.MAX_ARG_CHARS + 200
    assert f"…[{10**6 - logfmt.MAX_ARG_CHARS} more characters] and bbbbbbbbbb" in huge
    assert len(_format(fmt, "c" * 10**6)) < logfmt.MAX_MESSAGE_CHARS + 200
