"""`switchboard device console DEVICE`: attach to a device's serial console (docs/lab.md
"Serial console") through the switchboard's WebSocket `/api/v1/devices/{id}/console`.

What the console prints goes to stdout, byte for byte; what is typed goes to the board. On
a terminal, stdin is put in raw mode (every key goes to the board as typed) and Ctrl-]
detaches. From a pipe or file, its bytes are sent as they come; at its end the console is
still shown for `--linger` seconds, then the command exits (so a script can send a
command and capture the answer). A refusal (403: neither an operator nor the holder of
the device's lease; 409: no console; 503: its supervisor is unreachable) is one line on
stderr, exit status 1; a session the switchboard ends says why, exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import ssl
import sys
import termios
import tty
from typing import Any
from urllib.parse import quote

import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from switchboard.client.errors import ClientError
from switchboard.client.settings import settings

#: The key that detaches from a terminal: Ctrl-] (as telnet).
DETACH = b"\x1d"
#: Bytes read from stdin at once (the switchboard takes at most 64 KiB a message).
READ_BYTES = 4096


def _ws_url(url: str, device_id: str) -> str:
    base = url.rstrip("/")
    scheme, _, rest = base.partition("://")
    ws_scheme = "wss" if scheme == "https" else "ws"
    return f"{ws_scheme}://{rest}/api/v1/devices/{quote(device_id, safe='')}/console"


def console(args: argparse.Namespace) -> int:
    found = settings(args.url, args.token, args.ca_file, args.token_file)
    context = None
    if found.url.startswith("https"):
        context = ssl.create_default_context(cafile=found.ca_file)
    interactive = os.isatty(sys.stdin.fileno())
    saved = termios.tcgetattr(sys.stdin.fileno()) if interactive else None
    try:
        if interactive:
            tty.setraw(sys.stdin.fileno())
            print("attached; Ctrl-] detaches\r", file=sys.stderr)
        return asyncio.run(
            _session(_ws_url(found.url, args.device_id), found.token, context, args.linger)
        )
    except InvalidStatus as exc:
        body = exc.response.body or b""
        try:
            message = json.loads(body)["message"]
        except (ValueError, KeyError, TypeError):
            message = body.decode(errors="replace") or "refused"
        raise ClientError(f"{exc.response.status_code}: {message}") from None
    finally:
        if saved is not None:
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)


async def _session(url: str, token: str, context: ssl.SSLContext | None, linger: float) -> int:
    async with websockets.connect(
        url, additional_headers={"Authorization": f"Bearer {token}"}, ssl=context
    ) as ws:
        reader = asyncio.create_task(_show(ws))
        writer = asyncio.create_task(_type(ws))
        done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        if writer in done and reader not in done and writer.result() == "eof":
            # Input ended: keep showing the console for a while (the board's answer).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader), linger)
        for task in (reader, writer):
            task.cancel()
        results = await asyncio.gather(reader, writer, return_exceptions=True)
        ended = results[0]
        if isinstance(ended, str):  # the switchboard ended the session
            print(f"\r\nswitchboard: console closed: {ended}\r", file=sys.stderr)
            return 1
        return 0


async def _show(ws: Any) -> str | None:
    """Print what the console says; why the switchboard ended the session (None: it
    closed normally)."""
    out = sys.stdout.buffer
    while True:
        try:
            raw = await ws.recv()
        except ConnectionClosed as exc:
            if exc.rcvd is None or exc.rcvd.code == 1000:
                return None
            return exc.rcvd.reason or f"closed ({exc.rcvd.code})"
        message = json.loads(raw)
        if message.get("type") == "data":
            out.write(base64.b64decode(message["data"]))
            out.flush()
        elif message.get("type") == "closed":
            return str(message.get("reason") or "ended")


async def _read(fd: int) -> bytes:
    """The next bytes of `fd` (b"" at its end), without a thread that could outlive us:
    a terminal or pipe is waited for on the loop, a regular file never blocks."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    try:
        loop.add_reader(fd, readable)
    except PermissionError:  # a regular file: epoll can't wait on it, and needn't
        return os.read(fd, READ_BYTES)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
    try:
        return os.read(fd, READ_BYTES)
    except BlockingIOError:
        return await _read(fd)


async def _type(ws: Any) -> str:
    """Send what is typed (or piped in); "eof" at the end of input, "detach" on Ctrl-]."""
    fd = sys.stdin.fileno()
    while True:
        data = await _read(fd)
        if not data:
            return "eof"
        if DETACH in data:
            data = data[: data.index(DETACH)]
            if data:
                await ws.send(data)
            return "detach"
        await ws.send(data)


def add_console_command(device: Any) -> None:
    """`device console` in the `device` command group (`device` adds a subcommand)."""
    parser = device(
        "console",
        "attach to a device's serial console (operators, its lease holder); Ctrl-] detaches",
        console,
    )
    parser.add_argument("device_id")
    parser.add_argument(
        "--linger",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="when input is not a terminal: after its end, show the console this long",
    )
