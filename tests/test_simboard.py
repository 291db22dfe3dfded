"""The simulated board the hardware-lab tests stand on (tests/simboard.py): off until
powered, a boot log then a prompt, a health check that can be made to fail, and a power
switch driven by the command line a lab's config would name."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.simboard import BOOT_LOG, Console, SimBoard

pytestmark = pytest.mark.process


def test_off_until_powered_then_boots_and_answers(tmp_path: Path) -> None:
    with SimBoard(tmp_path / "board") as board:
        assert board.tty.resolve() == Path(board.pts)
        assert board.power("status") == "off"
        console = Console(board.tty)
        try:
            console.send("ping")
            assert console.quiet_for(0.2) == b""  # off: nothing answers
            assert board.power("on") == "ok"
            boot = console.read_until(b"> ").decode()
            assert all(line in boot for line in BOOT_LOG)
            console.send("ping")
            assert console.read_until(b"> ") == b"pong\r\n> "
            console.send("run-tests")
            assert b"tests: 3 passed" in console.read_until(b"> ")
            console.send("reboot-now")
            assert b"unknown command: reboot-now" in console.read_until(b"> ")
            assert board.power("status") == "on"
        finally:
            console.close()


def test_health_check_can_be_made_to_fail(tmp_path: Path) -> None:
    with SimBoard(tmp_path / "board", fail_check=True) as board:
        console = Console(board.tty)
        try:
            board.power("on")
            console.read_until(b"> ")
            console.send("selftest")
            assert b"selftest: FAIL" in console.read_until(b"> ")
            assert board.power("fail-check off") == "ok"
            console.send("selftest")
            assert b"selftest: ok" in console.read_until(b"> ")
            # A fault that its next boot clears (a power cycle brings it back).
            assert board.power("fail-check until-boot") == "ok"
            console.send("selftest")
            assert b"selftest: FAIL" in console.read_until(b"> ")
            assert board.power("cycle") == "ok"
            console.read_until(b"simboard ready")
            console.read_until(b"> ")
            console.send("selftest")
            assert b"selftest: ok" in console.read_until(b"> ")
        finally:
            console.close()


def test_power_command_lines_drive_it(tmp_path: Path) -> None:
    with SimBoard(tmp_path / "board") as board:
        console = Console(board.tty)
        try:

            def run(word: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    board.power_argv(word), capture_output=True, text=True, timeout=30
                )

            assert run("on").returncode == 0
            console.read_until(b"simboard ready")
            assert run("status").stdout.strip() == "on"
            assert run("cycle").returncode == 0
            # A cycle boots it again: the boot log comes a second time.
            assert b"SimBoard bootloader" in console.read_until(b"simboard ready")
            assert run("off").returncode == 0
            assert run("status").stdout.strip() == "off"
            bad = run("explode")
            assert bad.returncode == 1 and "unknown command" in bad.stdout
        finally:
            console.close()
    # The board is gone: its power command fails with a reason, not a hang.
    gone = subprocess.run(board.power_argv("status"), capture_output=True, text=True, timeout=30)
    assert gone.returncode == 2 and "simboard-power" in gone.stderr
