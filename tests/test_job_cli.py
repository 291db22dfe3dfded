"""`switchboard job submit --follow`: a CI step in one line. Its output is the job's, and
its exit status is the job's exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.harness import REPO, start_supervisor, token_file_for, wait_connected


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


def test_list_shows_a_table_and_json(switchboard, supervisor, tmp_path):
    spec = tmp_path / "job.json"
    spec.write_text('{"name": "listed", "labels": {"team": "cli"}, "backend": {"kind": "noop"}}')
    ids = [_cli(switchboard, "job", "submit", str(spec)).stdout.decode().strip() for _ in range(3)]
    table = _cli(switchboard, "job", "list", "--label", "team=cli")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.decode().splitlines()
    assert lines[0].split()[:2] == ["ID", "NAME"]
    assert [line.split()[0] for line in lines[1:]] == ids[::-1]  # newest first
    # --limit walks pages for the caller and stops at the limit
    two = json.loads(
        _cli(switchboard, "job", "list", "--label", "team=cli", "--limit", "2", "--json").stdout
    )
    assert [job["id"] for job in two] == ids[:0:-1]


def test_follow_says_why_a_job_waits(switchboard, supervisor, tmp_path):
    spec = tmp_path / "job.json"
    spec.write_text(
        json.dumps(
            {
                "name": "nowhere",
                "selector": {"match_labels": {"board": "no-such-board"}},
                "queue_timeout_s": 2,
                "backend": {"kind": "noop"},
            }
        )
    )
    done = _cli(switchboard, "job", "submit", str(spec), "--follow")
    assert done.returncode == 1
    assert b"matches the selector (board=no-such-board)" in done.stderr, done.stderr
    assert b"timed_out" in done.stderr


def test_url_and_token_come_from_a_config_file(switchboard, supervisor, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'url = "{switchboard.url}"\ntoken = "{switchboard.admin_token}"\n')
    env = dict(os.environ, SWITCHBOARD_CONFIG=str(config), PYTHONPATH=str(REPO))
    env.pop("SWITCHBOARD_URL", None)
    env.pop("SWITCHBOARD_TOKEN", None)
    command = [sys.executable, "-m", "switchboard", "supervisor", "list", "--json"]
    # A config file holding a token must be private to its owner.
    config.chmod(0o644)
    exposed = subprocess.run(command, capture_output=True, env=env, timeout=60)
    assert exposed.returncode == 2
    assert f"{config} holds a token".encode() in exposed.stderr
    assert b"chmod 600" in exposed.stderr
    config.chmod(0o600)
    listed = subprocess.run(command, capture_output=True, env=env, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "cli-noop" in [s["id"] for s in json.loads(listed.stdout)]
    # a flag beats the file
    refused = subprocess.run(
        [sys.executable, "-m", "switchboard", "supervisor", "list", "--token", "sbt_wrong"],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert refused.returncode == 2 and b"401" in refused.stderr
    config.write_text('colour = "blue"\n')
    broken = subprocess.run(
        [sys.executable, "-m", "switchboard", "supervisor", "list"],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert broken.returncode == 2 and b"colour" in broken.stderr


def test_the_token_comes_from_a_private_file(switchboard, tmp_path):
    token_file = token_file_for(tmp_path / "admin.token", switchboard.admin_token)
    env = dict(os.environ, SWITCHBOARD_URL=switchboard.url, PYTHONPATH=str(REPO))
    env.pop("SWITCHBOARD_TOKEN", None)
    env["SWITCHBOARD_CONFIG"] = str(tmp_path / "none.toml")
    command = [sys.executable, "-m", "switchboard", "dispatch", "status"]

    by_flag = subprocess.run(
        [*command, "--token-file", str(token_file)], capture_output=True, env=env, timeout=60
    )
    assert by_flag.returncode == 0, by_flag.stderr
    by_env = subprocess.run(
        command,
        capture_output=True,
        env=dict(env, SWITCHBOARD_TOKEN_FILE=str(token_file)),
        timeout=60,
    )
    assert by_env.returncode == 0, by_env.stderr
    token_file.chmod(0o644)
    refused = subprocess.run(
        [*command, "--token-file", str(token_file)], capture_output=True, env=env, timeout=60
    )
    assert refused.returncode == 2
    assert f"{token_file} may be read or changed by others (mode 0644)".encode() in (refused.stderr)
    both = subprocess.run(
        [*command, "--token-file", str(token_file), "--token", "sbt_x"],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert both.returncode == 2 and b"not allowed with" in both.stderr


def test_operator_commands(switchboard, supervisor):
    drained = json.loads(_cli(switchboard, "supervisor", "drain", "cli-noop", "--json").stdout)
    assert drained["drained"] is True
    table = _cli(switchboard, "supervisor", "list").stdout.decode()
    assert (
        "drained"
        in table.splitlines()[
            1 + [line.split()[0] for line in table.splitlines()[1:]].index("cli-noop")
        ]
    )
    resumed = json.loads(_cli(switchboard, "supervisor", "resume", "cli-noop", "--json").stdout)
    assert resumed["drained"] is False
    labelled = json.loads(
        _cli(switchboard, "supervisor", "label", "cli-noop", "rack=7", "--json").stdout
    )
    assert labelled["operator_labels"] == {"rack": "7"} and labelled["labels"]["rack"] == "7"
    _cli(switchboard, "supervisor", "label", "cli-noop")  # no labels: clears them

    paused = _cli(switchboard, "dispatch", "pause")
    assert paused.returncode == 0 and b"paused" in paused.stdout
    assert json.loads(_cli(switchboard, "dispatch", "status", "--json").stdout)["paused"] is True
    assert b"running" in _cli(switchboard, "dispatch", "resume").stdout

    missing = _cli(switchboard, "supervisor", "drain", "no-such-supervisor")
    assert missing.returncode == 2 and b"not_found" in missing.stderr


def test_token_commands(switchboard):
    created = json.loads(
        _cli(
            switchboard, "token", "create", "--role", "viewer", "--name", "ci-view", "--json"
        ).stdout
    )
    assert created["token"].startswith("sbt_") and created["role"] == "viewer"
    listed = _cli(switchboard, "token", "list", "--json")
    tokens = {t["id"]: t for t in json.loads(listed.stdout)}
    assert tokens[created["id"]]["name"] == "ci-view"
    assert created["token"].encode() not in listed.stdout  # the secret is shown once only
    viewer = _cli(switchboard, "job", "list", "--token", created["token"])
    assert viewer.returncode == 0, viewer.stderr
    assert _cli(switchboard, "token", "revoke", created["id"]).returncode == 0
    refused = _cli(switchboard, "job", "list", "--token", created["token"])
    assert refused.returncode == 2 and b"401" in refused.stderr
    forbidden = _cli(switchboard, "token", "list", "--token", created["token"])
    assert forbidden.returncode == 2


def test_only_supervisor_tokens_are_bound(switchboard, tmp_path):
    """The rule holds on both paths a token is made by: REST, and the bootstrap one."""
    refused = _cli(switchboard, "token", "create", "--role", "admin", "--supervisor", "x")
    assert refused.returncode == 2 and b"only supervisor tokens" in refused.stderr
    data = str(tmp_path / "data")
    bootstrap = ["token", "create", "--data-dir", data, "--supervisor", "x", "--role"]
    assert _cli(switchboard, *bootstrap, "admin").returncode == 1
    bound = _cli(switchboard, *bootstrap, "supervisor")
    assert bound.returncode == 0 and bound.stdout.startswith(b"sbt_")
