"""The hardware lab through any replica (real processes on one database of the private
cluster of tests/postgres.py; docs/deployment.md, "Commands between replicas"): replica a
leads, b does not; supervisor on-a is connected to a, on-b to b, with simulated boards
(tests/simboard.py). A power call through one replica for a board whose supervisor is on
the other answers the board's own result and is audited once; a power command that never
answers times out (504) and a supervisor gone is refused (503), as on one switchboard;
the leader's recovery power-cycles a failing board of a supervisor on b; a job group
whose roles need on-a and on-b is placed and both roles run to success."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import (
    Process,
    Switchboard,
    scaled,
    start_supervisor,
    wait_connected,
    wait_for,
    wait_job,
)
from tests.postgres import (
    Cluster,
    postgres_fixture,  # noqa: F401 - one cluster per session
)
from tests.scrape import sample_value, scrape

pytestmark = pytest.mark.postgres

#: How long a power call waits for its answer (--power-timeout).
POWER_TIMEOUT_S = 2.0
#: The failing board's class: its check always fails; one power cycle, then maintenance.
CHECKS = """
[flaky]
recovery_attempts = 1
spec = { name = "selftest", priority = 10, backend = { kind = "noop", exit_code = 1 } }
"""


class Lab:
    def __init__(self, root: Path, dsn: str) -> None:
        from tests.simboard import SimBoard

        self.root = root
        self.boards = {name: SimBoard(root / name) for name in ("board-a", "board-b", "flaky-b")}
        (root / "stuck-b").touch()  # a stand-in for its device node
        checks = root / "checks.toml"
        checks.write_text(CHECKS)
        key = root / "replicas.key"
        key.write_text(base64.urlsafe_b64encode(os.urandom(32)).decode() + "\n")
        key.chmod(0o600)
        common = (
            "--secret-key-file",
            str(key),
            "--power-timeout",
            str(POWER_TIMEOUT_S),
            "--health-checks",
            str(checks),
        )
        self.processes: list[Process] = []
        self.a = Switchboard(
            root / "data-a", extra_args=("--replica-id", "a", *common), database=dsn
        )
        wait_for(lambda: _leading(self.a), "a leads")
        self.b = Switchboard(
            root / "data-b", extra_args=("--replica-id", "b", *common), database=dsn
        )
        self.client_a, self.client_b = self.a.client(), self.b.client()

    def _replica(self, name: str, common: tuple[str, ...], dsn: str) -> Switchboard:
        args = ("--replica-id", name, *common)
        return Switchboard(self.root / f"data-{name}", extra_args=args, database=dsn)

    def supervisor(self, switchboard: Switchboard, name: str, devices: str, at: str) -> Process:
        config = self.root / f"{name}.toml"
        config.write_text(devices)
        sup = start_supervisor(
            switchboard,
            self.root,
            name=name,
            backend="noop",
            labels={"at": at},
            extra_args=("--config", str(config)),
        )
        self.processes.append(sup)
        for client in (self.client_a, self.client_b):
            wait_connected(client, name)
        return sup

    def board(self, name: str, cls: str) -> str:
        board = self.boards[name]
        power = ", ".join(
            f"{action} = {json.dumps(board.power_argv(action))}"
            for action in ("on", "off", "cycle", "status")
        )
        return f"""[[devices]]
name = "{name}"
path = "{board.tty}"
resource = "{cls}"
power = {{ {power} }}
"""

    def close(self) -> None:
        for process in self.processes:
            if process.proc.poll() is None:
                process.stop()
        for client in (self.client_a, self.client_b):
            client.close()
        for server in (self.a, self.b):
            if server.process.proc.poll() is None:
                server.stop()
        for board in self.boards.values():
            board.stop()


def _leading(replica: Switchboard) -> bool:
    try:
        return sample_value(scrape(f"{replica.url}/metrics"), "switchboard_leader") == 1
    except (httpx.HTTPError, AssertionError):
        return False


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, postgres: Cluster) -> Iterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp("replicas-lab"), postgres.new_database("replicas_lab"))
    try:
        lab.supervisor(lab.a, "on-a", lab.board("board-a", "simboard"), "a")
        sleeper = json.dumps(["sleep", str(scaled(8))])  # a power switch that never answers
        stuck = f"""[[devices]]
name = "stuck-b"
path = "{lab.root / "stuck-b"}"
resource = "stuckboard"
power = {{ status = {sleeper} }}
"""
        devices = lab.board("board-b", "simboard") + stuck + lab.board("flaky-b", "flaky")
        lab.supervisor(lab.b, "on-b", devices, "b")
        # flaky-b's recovery (its check fails from the start) is over before the tests
        # count commands.
        wait_for(
            lambda: lab.client_a.get("/api/v1/devices/flaky-b").json()["health"] == "maintenance",
            "flaky-b in maintenance after its recovery",
            timeout=60,
        )
        yield lab
    finally:
        lab.close()


def _power(client: httpx.Client, device: str, action: str) -> httpx.Response:
    return client.post(f"/api/v1/devices/{device}/power", json={"action": action})


def _history(client: httpx.Client, device: str) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = client.get(f"/api/v1/devices/{device}").json()["power_history"]
    return calls


def _commands(replica: Switchboard, command: str, step: str) -> float:
    text = scrape(f"{replica.url}/metrics")
    return sample_value(text, "switchboard_supervisor_commands_total", command=command, step=step)


def test_a_power_call_through_either_replica_answers_the_boards_result(lab: Lab) -> None:
    for board, owner, through, client in (
        ("board-a", lab.a, lab.b, lab.client_b),
        ("board-b", lab.b, lab.a, lab.client_a),
    ):
        asked, delivered = (
            _commands(through, "power", "queued"),
            _commands(owner, "power", "delivered"),
        )
        assert lab.boards[board].power("status") == "off"
        on = _power(client, board, "on")
        assert on.status_code == 200, on.text
        assert (on.json()["result"], on.json()["ok"], on.json()["exit_code"]) == ("ok", True, 0)
        assert lab.boards[board].power("status") == "on"  # the board itself says so
        status = _power(client, board, "status").json()
        assert status["ok"] and status["output"].strip() == "on", status
        # Audited once each, whichever replica it went through.
        calls = _history(lab.client_a, board)
        assert [(c["action"], c["result"]) for c in calls] == [("status", "ok"), ("on", "ok")]
        assert _commands(through, "power", "queued") == asked + 2
        assert _commands(owner, "power", "delivered") == delivered + 2
        assert _commands(owner, "power", "answered") >= 2


def test_a_power_command_that_never_answers_times_out_through_another_replica(lab: Lab) -> None:
    stuck = _power(lab.client_a, "stuck-b", "status")
    assert stuck.status_code == 504, stuck.text
    assert stuck.json()["error"] == "timed_out"
    calls = _history(lab.client_b, "stuck-b")
    assert [(c["action"], c["result"]) for c in calls] == [("status", "timed_out")]


def test_the_leaders_recovery_power_cycles_a_board_on_another_replica(lab: Lab) -> None:
    assert _leading(lab.a) and not _leading(lab.b)
    device = lab.client_b.get("/api/v1/devices/flaky-b").json()
    assert device["health"] == "maintenance"  # (the fixture waited for it)
    assert "after 1 power cycle(s)" in device["health_reason"], device
    calls = _history(lab.client_a, "flaky-b")
    assert [(c["action"], c["result"], c["actor"]) for c in calls] == [
        ("cycle", "ok", "switchboard (recovery)")
    ]
    assert lab.boards["flaky-b"].power("status") == "on"  # cycled: it booted
    reasons = [h["reason"] for h in device["history"]]
    assert any("power-cycled (1 of 1)" in r for r in reasons), reasons


def test_a_group_with_hosts_on_two_replicas_is_placed_and_runs(lab: Lab) -> None:
    started = _commands(lab.a, "start", "delivered") + _commands(lab.b, "start", "delivered")

    def role(at: str) -> dict[str, Any]:
        spec = {
            "name": f"on-{at}",
            "backend": {"kind": "noop", "delay_s": 0.5, "output": f"from {at}\n"},
            "selector": {"match_labels": {"at": at}},
        }
        return {"role": f"role-{at}", "spec": spec}

    for client in (lab.client_a, lab.client_b):
        made = client.post(
            "/api/v1/groups", json={"name": "across", "roles": [role("a"), role("b")]}
        )
        assert made.status_code == 201, made.text
        group_id = made.json()["id"]
        url = f"/api/v1/groups/{group_id}"
        group = wait_for(
            lambda c=client, u=url: (g := c.get(u).json())["state"] == "succeeded" and g,
            f"group {group_id} succeeded",
            timeout=30,
        )
        jobs = {r["role"]: wait_job(client, r["job_id"]) for r in group["roles"]}
        assert {k: j["runs"][-1]["supervisor_id"] for k, j in jobs.items()} == {
            "role-a": "on-a",
            "role-b": "on-b",
        }
        assert all(j["phase"] == "succeeded" for j in jobs.values())
        assert client.get(f"/api/v1/jobs/{jobs['role-b']['id']}/output").content == b"from b\n"
    # One of its two StartJobs went through the other replica, each time.
    delivered = _commands(lab.a, "start", "delivered") + _commands(lab.b, "start", "delivered")
    assert delivered == started + 2


def test_a_power_call_for_a_supervisor_gone_is_refused_as_on_one_switchboard(lab: Lab) -> None:
    from tests.simboard import SimBoard

    lab.boards["gone-1"] = SimBoard(lab.root / "gone-1")
    sup = lab.supervisor(lab.b, "gone-b", lab.board("gone-1", "simboard"), "b")
    assert _power(lab.client_a, "gone-1", "on").status_code == 200
    sup.stop()
    wait_for(
        lambda: (
            not any(
                s["connected"]
                for s in lab.client_a.get("/api/v1/supervisors").json()
                if s["id"] == "gone-b"
            )
        ),
        "gone-b disconnected",
    )
    refused = _power(lab.client_a, "gone-1", "off")
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"] == "not_connected"
    assert lab.boards["gone-1"].power("status") == "on"  # nothing was switched
    calls = _history(lab.client_b, "gone-1")
    assert [(c["action"], c["result"]) for c in calls] == [("off", "not_connected"), ("on", "ok")]
