"""The supervisor's settings are built once from its flags, the environment and the config
file; the flags' defaults are the settings' defaults."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from supervisor.cli import build_parser, build_settings
from supervisor.config import LinkSettings, SupervisorSettings, WasmSettings

pytestmark = pytest.mark.unit


def settings(*argv: str) -> SupervisorSettings:
    return build_settings(build_parser().parse_args(list(argv)))


def test_run_defaults_are_the_settings_defaults(monkeypatch):
    monkeypatch.delenv("SUPERVISOR_CA_FILE", raising=False)
    got = settings("run", "--switchboard", "http://sb.example:8765", "--name", "host-1")
    assert got.supervisor_id == got.name == "host-1"
    assert got.work_dir == Path("supervisor-work")
    assert got.wasm == WasmSettings(cache_dir=Path("supervisor-work/wasm-cache"))
    assert got.link == LinkSettings(urls=["ws://sb.example:8765/ws/supervisor"])
    defaults = SupervisorSettings(supervisor_id="x", work_dir=Path("w"), wasm=got.wasm)
    for field in ("backend", "max_jobs", "metrics_port", "metrics_host", "labels"):
        assert getattr(got, field) == getattr(defaults, field), field
    with pytest.raises(AttributeError):
        got.max_jobs = 9  # type: ignore[misc]  # frozen: nothing changes it at run time


def test_flags_env_and_config_file_reach_the_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERVISOR_CA_FILE", "/etc/lab-ca.pem")
    config = tmp_path / "supervisor.toml"
    config.write_text("[docker]\nallowed_networks = ['none', 'bridge']\n")
    got = settings(
        "run", "--switchboard", "wss://sb:8443", "--id", "h-2", "--name", "Host 2",
        "--label", "arch=x86_64", "--max-jobs", "7", "--max-backlog-mb", "8",
        "--work-dir", str(tmp_path), "--wasm-cache-dir", "/var/cache/wasm",
        "--wasm-scratch-mb", "5", "--config", str(config), "--docker-host", "tcp://e:2375",
    )  # fmt: skip
    assert (got.supervisor_id, got.name) == ("h-2", "Host 2")
    assert got.labels == {"arch": "x86_64"} and got.max_jobs == 7
    assert got.link == LinkSettings(["wss://sb:8443/ws/supervisor"], "/etc/lab-ca.pem", 8)
    assert got.wasm.cache_dir == Path("/var/cache/wasm") and got.wasm.scratch_mb == 5
    assert got.config.docker.allowed_networks == ["none", "bridge"]
    assert got.docker_host == "tcp://e:2375"


def test_run_local_gets_a_fresh_id_and_no_link(tmp_path):
    spec = tmp_path / "spec.json"
    first, second = settings("run-local", str(spec)), settings("run-local", str(spec))
    assert first.link is None
    assert first.supervisor_id.startswith("local-")
    assert first.supervisor_id != second.supervisor_id


def test_bad_values_stop_the_command_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match="must match"):
        settings("run", "--switchboard", "ws://sb:1", "--id", "no spaces allowed")
    bad = tmp_path / "bad.toml"
    bad.write_text("[docker]\nallowed_netwroks = []\n")
    with pytest.raises(SystemExit, match="allowed_netwroks"):
        settings("run-local", "spec.json", "--config", str(bad))


def test_settings_are_one_plain_value():
    """No argparse object inside: the settings encode as plain data (what a repr or a log
    of them shows), and hold no token."""
    got = settings("run", "--switchboard", "ws://sb:1", "--token", "sb_secret_value")
    assert b"sb_secret_value" not in msgspec.json.encode(got, enc_hook=str)
    assert "sb_secret_value" not in repr(got)
