"""`switchboard-conformance supervisor`: the reference supervisor and the minimal one of
examples/ pass every check; a minimal supervisor that drops unacknowledged events on a
reconnect fails the resend check, and the kit exits 1.

The three kit runs start together (each is a real kit process driving a real supervisor
process), so the module takes as long as the slowest one.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.harness import REPO

pytestmark = pytest.mark.process

PYTHON = shlex.quote(sys.executable)
MINIMAL = f"{PYTHON} {shlex.quote(str(REPO / 'examples' / 'minimal_supervisor.py'))}"
COMMANDS = {
    "reference": f"{PYTHON} -m supervisor run --switchboard {{url}} --token-file {{token_file}}"
    " --work-dir {work_dir} --backend noop --name sut",
    "minimal": f"{MINIMAL} --url {{url}} --token-file {{token_file}}",
    # Only the scenario that must catch it: the rest of the kit passes it (as "minimal").
    "no-resend": f"{MINIMAL} --url {{url}} --token-file {{token_file}} --no-resend",
}
ONLY = {"no-resend": ["--scenario", "cut"]}


@pytest.fixture(scope="module")
def kit_runs() -> Iterator[dict[str, subprocess.Popen[str]]]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    runs = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "conformance",
                "supervisor",
                "--command",
                command,
                *ONLY.get(name, []),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=REPO,
        )
        for name, command in COMMANDS.items()
    }
    yield runs
    for process in runs.values():
        if process.poll() is None:
            process.kill()
            process.wait()


def finish(process: subprocess.Popen[str]) -> tuple[int, dict[str, str]]:
    """The kit's exit status and its table: check name -> `pass` or `FAIL`."""
    out, _ = process.communicate(timeout=120)
    print(out)
    rows = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 2 and words[1] in ("pass", "FAIL"):
            rows[words[0]] = words[1]
    return process.returncode, rows


@pytest.mark.parametrize("name", ["reference", "minimal"])
def test_a_conforming_supervisor_passes_every_check(kit_runs, name: str) -> None:
    status, rows = finish(kit_runs[name])
    assert status == 0
    assert len(rows) >= 30, "every scenario ran"
    assert "FAIL" not in rows.values()
    for check in ("handshake.hello", "cut.resend", "refusal.fatal", "events.seq"):
        assert rows[check] == "pass"


def test_dropping_unacknowledged_events_fails_the_resend_check(kit_runs) -> None:
    status, rows = finish(kit_runs["no-resend"])
    assert status == 1
    assert rows["cut.resend"] == rows["cut.resend_again"] == "FAIL"
    # The rest of that scenario holds: the kit names the one fault.
    assert rows["cut.reconnect"] == rows["cut.hello_last_seq"] == "pass"
