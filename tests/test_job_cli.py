"""`switchboard job submit --follow`: a CI step in one line. Its output is the job's, and
its exit status is the job's exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.harness import REPO, start_supervisor, wait_connected


@pytest.fixture(scope="module")
def supervisor(switchboard, work_dir):
    process = start_supervisor(switchboard, work_dir, name="cli-noop", backend="noop")
    wait_connected(switchboard.client(), "cli-noop")
    yield process
    process.stop()


def _cli(switchboard, *args: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        SWITCHBOARD_URL=switchboard.url,
        SWITCHBOARD_TOKEN=switchboard.admin_token,
        PYTHONPATH=str(REPO),
    )
    return subprocess.run(
        [sys.executable, "-m", "switchboard", *args], capture_output=True, env=env, timeout=60
    )


@pytest.mark.parametrize("code", [0, 3])
def test_submit_follow_exits_with_the_jobs_exit_code(switchboard, supervisor, tmp_path, code):
    spec = tmp_path / "job.json"
    spec.write_text(
        json.dumps(
            {
                "name": "ci",
                "backend": {"kind": "noop", "delay_s": 0.3, "exit_code": code, "output": "built\n"},
            }
        )
    )
    done = _cli(switchboard, "job", "submit", str(spec), "--follow")
    assert done.returncode == code, done.stderr
    assert done.stdout == b"built\n"
    assert (b"succeeded" if code == 0 else b"failed") in done.stderr


def test_submit_without_follow_prints_the_id(switchboard, supervisor, tmp_path):
    spec = tmp_path / "job.json"
    spec.write_text('{"name": "ci", "backend": {"kind": "noop", "output": "x"}}')
    done = _cli(switchboard, "job", "submit", str(spec), "--param", "K=v")
    assert done.returncode == 0
    job_id = done.stdout.decode().strip()
    shown = _cli(switchboard, "job", "show", job_id, "--json")
    assert json.loads(shown.stdout)["spec"]["parameters"] == {"K": {"value": "v"}}
    logs = _cli(switchboard, "job", "logs", job_id, "--follow")
    assert logs.returncode == 0 and logs.stdout == b"x"


def test_bad_spec_and_bad_token_are_clear_errors(switchboard, tmp_path):
    spec = tmp_path / "job.json"
    spec.write_text('{"name": "ci", "backend": {"kind": "noop"}, "oops": 1}')
    done = _cli(switchboard, "job", "submit", str(spec))
    assert done.returncode == 2 and b"oops" in done.stderr
    refused = _cli(switchboard, "job", "show", "x", "--token", "sbt_wrong")
    assert refused.returncode == 2 and b"401" in refused.stderr
