"""Power control of the lab's boards end to end: a real switchboard and a real supervisor
whose config gives a simulated board (tests/simboard.py) its power command lines, a board
whose power command hangs, and one with no power commands at all. An operator turns the
board on (it boots: its status says on); a viewer and a submitter holding no lease get 403,
the holder of the board's lease may; a call while a run holds the board is in the run's
events; a command that never answers gets 504, a board without power commands 409; every
call is in the board's history."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

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
from tests.scrape import sample_value_or_zero
from tests.simboard import SimBoard
from tests.test_lab_e2e import _cli

pytestmark = pytest.mark.process

HOST = "power-host"
#: How long the switchboard waits for a power_result (--power-timeout).
POWER_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def switchboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Switchboard]:
    server = Switchboard(
        tmp_path_factory.mktemp("power") / "data",
        extra_args=("--power-timeout", str(POWER_TIMEOUT_S)),
    )
    yield server
    server.stop()


def _config(board: SimBoard, nodes: Path) -> str:
    """The host's three devices, as a lab admin writes them (docs/lab.md)."""
    power = ", ".join(
        f"{action} = {json.dumps(board.power_argv(action))}"
        for action in ("on", "off", "cycle", "status")
    )
    # A power switch that never answers: its command outlives the switchboard's wait.
    sleeper = json.dumps(["sleep", str(scaled(8))])
    return f"""[[devices]]
name = "board-a"
path = "{board.tty}"
resource = "simboard"
power = {{ {power} }}

[[devices]]
name = "stuck-1"
path = "{nodes / "stuck-1"}"
resource = "stuckboard"
power = {{ status = {sleeper} }}

[[devices]]
name = "bare-1"
path = "{nodes / "bare-1"}"
resource = "bareboard"
"""


@pytest.fixture(scope="module")
def lab(
    switchboard: Switchboard, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[httpx.Client, SimBoard]]:
    root = tmp_path_factory.mktemp("lab")
    board = SimBoard(root / "board-a")
    config = root / "lab.toml"
    for node in ("stuck-1", "bare-1"):  # stand-ins for their device nodes
        (root / node).touch()
    config.write_text(_config(board, root))
    sup: Process | None = None
    client = switchboard.client()
    try:
        sup = start_supervisor(
            switchboard, root, name=HOST, backend="noop", extra_args=("--config", str(config))
        )
        wait_connected(client, HOST)
        yield client, board
    finally:
        if sup is not None:
            sup.stop()
        client.close()
        board.stop()


def _power(client: httpx.Client, device: str, action: str) -> httpx.Response:
    return client.post(f"/api/v1/devices/{device}/power", json={"action": action})


def _refusals(client: httpx.Client) -> float:
    text = httpx.get(f"{client.base_url}/metrics").text
    return sample_value_or_zero(text, "switchboard_power_refusals_total", reason="forbidden")


def test_an_operator_turns_the_board_on_and_strangers_are_refused(
    lab, switchboard: Switchboard
) -> None:
    client, board = lab
    assert board.power("status") == "off"
    on = _power(client, "board-a", "on")
    assert on.status_code == 200, on.text
    answer = on.json()
    assert (answer["ok"], answer["result"], answer["exit_code"]) == (True, "ok", 0)
    status = _power(client, "board-a", "status").json()
    assert status["ok"] and status["output"].strip() == "on", status
    assert board.power("status") == "on"  # the board itself says so
    refused_before = _refusals(client)
    viewer = switchboard.client(switchboard.create_token("viewer"))
    submitter = switchboard.client(switchboard.create_token("submitter"))
    try:
        for stranger in (viewer, submitter):
            refused = _power(stranger, "board-a", "off")
            assert refused.status_code == 403, refused.text
            assert refused.json()["error"] == "forbidden"
            assert "only an operator or the holder of its lease" in refused.json()["message"]
    finally:
        viewer.close()
        submitter.close()
    assert board.power("status") == "on"  # nothing was switched
    assert _refusals(client) == refused_before + 2
    bad = _power(client, "board-a", "explode")
    assert bad.status_code == 400 and bad.json()["field"] == "action"
    assert _power(client, "no-such-board", "on").status_code == 404
    # Each call is in the board's history, newest first, with who asked and how it went.
    calls = client.get("/api/v1/devices/board-a").json()["power_history"]
    assert [(c["action"], c["result"]) for c in calls] == [("status", "ok"), ("on", "ok")]
    assert all("admin" in c["actor"] and c["exit_code"] == 0 for c in calls)
    # The CLI says the same.
    assert "power status of board-a: ok" in _cli(switchboard, "power", "board-a", "status")
    shown = _cli(switchboard, "show", "board-a")
    assert "POWER" in shown and "status" in shown


def test_the_holder_of_the_boards_lease_may_and_another_submitter_may_not(
    lab, switchboard: Switchboard
) -> None:
    client, board = lab
    holder = switchboard.client(switchboard.create_token("submitter"))
    stranger = switchboard.client(switchboard.create_token("submitter"))
    try:
        made = holder.post("/api/v1/reservations", json={"class": "simboard"})
        assert made.status_code == 201, made.text
        lease = made.json()["id"]
        wait_for(
            lambda: client.get(f"/api/v1/reservations/{lease}").json()["state"] == "held",
            "the lease is granted",
        )
        cycled = _power(holder, "board-a", "cycle")
        assert cycled.status_code == 200 and cycled.json()["ok"], cycled.text
        assert board.power("status") == "on"  # off, then on again
        refused = _power(stranger, "board-a", "off")
        assert refused.status_code == 403, refused.text
        assert holder.delete(f"/api/v1/reservations/{lease}").status_code == 200
        # Once released, the former holder is a stranger too.
        assert _power(holder, "board-a", "off").status_code == 403
    finally:
        holder.close()
        stranger.close()
    [last, *_] = client.get("/api/v1/devices/board-a").json()["power_history"]
    assert (last["action"], last["result"]) == ("cycle", "ok")


def test_a_call_during_a_run_is_in_the_runs_events(lab) -> None:
    client, _ = lab
    spec = {
        "name": "flash",
        "backend": {"kind": "noop", "delay_s": scaled(3)},
        "resources": {"simboard": 1},
    }
    job_id = client.post("/api/v1/jobs", json=spec).json()["id"]
    wait_for(
        lambda: client.get("/api/v1/devices/board-a").json()["holder"] == f"{job_id}#1",
        "the run holds the board",
    )
    answer = _power(client, "board-a", "status")
    assert answer.status_code == 200 and answer.json()["job_id"] == job_id, answer.text
    assert wait_job(client, job_id)["phase"] == "succeeded"
    events = client.get(f"/api/v1/jobs/{job_id}/events").json()
    power = [e for e in events if e["kind"] == "power"]
    assert len(power) == 1, events
    assert power[0]["message"] == "power status of device board-a: ok, exit status 0"
    assert power[0]["attempt"] == 1 and "admin" in power[0]["actor"]
    [last, *_] = client.get("/api/v1/devices/board-a").json()["power_history"]
    assert last["job_id"] == job_id


def test_no_answer_is_504_and_no_power_commands_409(lab) -> None:
    client, _ = lab
    stuck = _power(client, "stuck-1", "status")
    assert stuck.status_code == 504, stuck.text
    assert stuck.json()["error"] == "timed_out"
    # It has only `status`: its host says so...
    no_on = _power(client, "stuck-1", "on")
    assert no_on.status_code == 200 and not no_on.json()["ok"], no_on.text
    assert "has no power.on command" in no_on.json()["reason"]
    bare = _power(client, "bare-1", "on")  # ...and this one has no power commands at all
    assert bare.status_code == 409 and bare.json()["error"] == "no_power", bare.text
    results = [c["result"] for c in client.get("/api/v1/devices/stuck-1").json()["power_history"]]
    assert results == ["failed", "timed_out"]
    [call] = client.get("/api/v1/devices/bare-1").json()["power_history"]
    assert call["result"] == "no_power"
    metrics = httpx.get(f"{client.base_url}/metrics").text
    calls = "switchboard_power_calls_total"
    assert sample_value_or_zero(metrics, calls, action="on", result="ok") >= 1
    assert sample_value_or_zero(metrics, calls, action="status", result="timed_out") == 1
