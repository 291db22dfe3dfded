"""The switchboard half of the conformance kit (`switchboard-conformance switchboard`), run as
a command: our switchboard passes it, and a switchboard that breaks the protocol fails it
on the right rows."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets

from conformance.sb_scenarios import SCENARIOS
from protocol import limits
from tests.harness import REPO, Switchboard, _env, scaled, token_file_for

pytestmark = pytest.mark.process

#: Every row, the opt-in heartbeat timeout included (the switchboard below has a short one).
ALL_ROWS = {row for scenario in SCENARIOS for row in scenario.rows}
ROW = re.compile(r"^(\S+)\s+(pass|FAIL)\s+(.*)$")


def rows(stdout: str) -> dict[str, tuple[str, str]]:
    """The table's rows: name -> (verdict, detail)."""
    found = {}
    for line in stdout.splitlines():
        if match := ROW.match(line):
            found[match[1]] = (match[2], match[3])
    return found


def kit_command(ws_url: str, api: str, token_file: Path, api_token_file: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "conformance",
        "switchboard",
        *("--url", ws_url, "--api", api),
        *("--token-file", str(token_file), "--admin-token-file", str(api_token_file)),
    ]


@pytest.fixture(scope="module")
def kit_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.CompletedProcess]:
    """One run of the whole kit against our switchboard (heartbeats fast enough for the
    opt-in heartbeat-timeout check to take seconds)."""
    home = tmp_path_factory.mktemp("conformance")
    server = Switchboard(
        home / "data", extra_args=("--heartbeat-interval", "1", "--heartbeat-timeout", "3")
    )
    try:
        registration = token_file_for(
            home / "registration.token", server.create_token("supervisor")
        )
        api_token = token_file_for(home / "api.token", server.create_token("submitter"))
        command = kit_command(server.ws_url, server.url, registration, api_token)
        yield subprocess.run(
            [*command, "--heartbeat-timeout-check", "--timeout", str(scaled(5))],
            capture_output=True,
            text=True,
            env=_env(),
            cwd=REPO,
            timeout=scaled(180),
        )
    finally:
        server.stop()


def test_our_switchboard_passes_the_kit(kit_run):
    table = rows(kit_run.stdout)
    assert set(table) == ALL_ROWS, kit_run.stdout + kit_run.stderr
    failed = {name: detail for name, (verdict, detail) in table.items() if verdict == "FAIL"}
    assert not failed, kit_run.stdout
    assert kit_run.returncode == 0


async def test_a_wrong_switchboard_fails_the_kit(tmp_path):
    """A switchboard that welcomes everyone with version 1.0 and nothing else: the kit says
    which of its answers break the document, and exits 1."""

    async def welcome_anyone(ws):
        async for frame in ws:
            if json.loads(frame).get("type") == "hello":
                welcome = {"type": "welcome", "version": "1.0", "session": 1, "last_seq": 0}
                await ws.send(json.dumps({**welcome, "enrolled": True}))

    registration = token_file_for(tmp_path / "registration.token", "sbt_" + "r" * 43)
    api_token = token_file_for(tmp_path / "api.token", "sbt_" + "a" * 43)
    async with websockets.serve(
        welcome_anyone, "127.0.0.1", 0, subprotocols=[websockets.Subprotocol("switchboard.v1")]
    ) as server:
        port = server.sockets[0].getsockname()[1]
        command = kit_command(
            f"ws://127.0.0.1:{port}", f"http://127.0.0.1:{port}", registration, api_token
        )
        kit = await asyncio.create_subprocess_exec(
            *command,
            "--only",
            "handshake",
            "--timeout",
            "1",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_env(),
            cwd=REPO,
        )
        out, err = await asyncio.wait_for(kit.communicate(), scaled(60))
    stdout = out.decode()
    table = rows(stdout)
    assert kit.returncode == 1, stdout + err.decode()
    assert table["handshake.welcome"][0] == "FAIL"
    newest = f"{limits.PROTOCOL_MAJOR}.{limits.PROTOCOL_MINOR}"
    assert f"version '1.0', not '{newest}'" in table["handshake.welcome"][1]
    assert table["handshake.session"] == ("FAIL", "session 1 then 1")
    assert table["handshake.unsupported_version"][0] == "FAIL"
    assert table["handshake.wrong_token"] == ("FAIL", "a made-up token was let in")
    assert table["handshake.second_hello"][0] == "FAIL"
    # What it got right passes: a 1.0 offer is answered 1.0.
    assert "offered ['1.0']: 1.0" in table["handshake.version_choice"][1]
