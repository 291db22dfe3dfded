"""The hardware lab end to end: a real switchboard and a real supervisor whose config
describes two simulated boards (tests/simboard.py: pseudo-terminals with power switches).
The inventory reaches the switchboard in the hello; an operator marks a board bad with the
CLI; jobs then go to the good one only, and a job for a class no board is of is refused
at submit."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.harness import (
    Process,
    Switchboard,
    run_cli,
    start_supervisor,
    wait_connected,
    wait_for,
    wait_job,
)
from tests.simboard import SimBoard
from tests.test_live_api import EventStream

pytestmark = pytest.mark.process

HOST = "lab-host"


def _toml_list(argv: list[str]) -> str:
    return json.dumps(argv)  # a JSON array of strings is a TOML array


def _config(
    boards: dict[str, SimBoard], resource: str = "simboard", *, node_apart: bool = False
) -> str:
    """A host's description of its boards (all of class `resource`), as a lab admin
    writes it (docs/lab.md). Each board's device node is its console's tty, or with
    `node_apart` another path (a probe's interface apart from the console, as on a J-Link;
    nothing opens it in a noop run): then the supervisor reads the console while a run
    holds the board (docs/lab.md "Serial console")."""
    tables = []
    for name, board in boards.items():
        power = ", ".join(
            f"{action} = {_toml_list(board.power_argv(action))}"
            for action in ("on", "off", "cycle", "status")
        )
        tables.append(
            f"""[[devices]]
name = "{name}"
path = "{board.dir / "probe" if node_apart else board.tty}"
resource = "{resource}"
labels = {{ slot = "{name[-1]}" }}
console = {{ path = "{board.tty}", baud = 115200 }}
power = {{ {power} }}
"""
        )
    return "\n".join(tables)


@pytest.fixture(scope="module")
def lab(
    switchboard: Switchboard, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[httpx.Client, dict[str, SimBoard]]]:
    root = tmp_path_factory.mktemp("lab")
    boards = {name: SimBoard(root / name) for name in ("board-a", "board-b")}
    config = root / "lab.toml"
    config.write_text(_config(boards))
    sup: Process | None = None
    client = switchboard.client()
    try:
        sup = start_supervisor(
            switchboard,
            root,
            name=HOST,
            backend="noop",
            extra_args=("--config", str(config)),
        )
        wait_connected(client, HOST)
        yield client, boards
    finally:
        if sup is not None:
            sup.stop()
        client.close()
        for board in boards.values():
            board.stop()


def _cli(switchboard: Switchboard, *args: str, check: bool = True) -> str:
    done = run_cli(
        *("-m", "switchboard", "device", *args),
        *("--url", switchboard.url, "--token", switchboard.admin_token),
        check=check,
    )
    return (done.stdout + done.stderr).decode()


def _submit(client: httpx.Client, name: str, **resources: int) -> httpx.Response:
    spec = {"name": name, "backend": {"kind": "noop", "delay_s": 0.2}, "resources": resources}
    return client.post("/api/v1/jobs", json=spec)


def test_the_hosts_boards_are_in_the_inventory(lab, switchboard: Switchboard) -> None:
    client, boards = lab
    devices = client.get("/api/v1/devices").json()
    assert [(d["id"], d["class"], d["supervisor_id"], d["health"]) for d in devices] == [
        ("board-a", "simboard", HOST, "unknown"),
        ("board-b", "simboard", HOST, "unknown"),
    ]
    assert all(d["console"] and d["power"] for d in devices)
    assert devices[0]["labels"] == {"slot": "a"}
    assert client.get("/api/v1/devices", params={"host": "elsewhere"}).json() == []
    assert client.get("/api/v1/devices", params={"class": "simboard"}).json() == devices
    bad_filter = client.get("/api/v1/devices", params={"health": "sick"})
    assert bad_filter.status_code == 400 and bad_filter.json()["field"] == "health"
    assert client.get("/api/v1/devices/nope").status_code == 404
    listing = _cli(switchboard, "list")
    assert "board-a" in listing and "simboard" in listing and HOST in listing
    # The power command lines the config names drive the boards (what health checks and
    # operators will use): here run as the supervisor would, with the fields substituted.
    assert boards["board-a"].power("status") == "off"


def test_a_bad_board_never_gets_a_job(lab, switchboard: Switchboard) -> None:
    client, _ = lab
    out = _cli(switchboard, "set-health", "board-a", "bad", "--reason", "selftest fails")
    assert "health:" in out and "bad" in out
    refused = _cli(switchboard, "set-health", "board-a", "bad", "--reason", " ", check=False)
    assert "say why" in refused
    jobs = [_submit(client, f"flash-{i}", simboard=1).json()["id"] for i in range(4)]
    for job_id in jobs:
        job = wait_job(client, job_id)
        assert job["phase"] == "succeeded", job
        assert job["runs"][-1]["devices"] == ["board-b"], job
    shown = client.get("/api/v1/devices/board-a").json()
    assert shown["holder"] is None
    [change, declared] = shown["history"]
    assert (change["from"], change["to"], change["reason"]) == ("unknown", "bad", "selftest fails")
    assert "admin" in change["actor"] and declared["to"] == "unknown"
    assert "selftest fails" in _cli(switchboard, "show", "board-a")
    # Both boards out of service: a job waits (it is not refused: they may come back)...
    client.put("/api/v1/devices/board-b/health", json={"health": "maintenance", "reason": "probe"})
    waiting = _submit(client, "waits", simboard=1).json()["id"]
    wait_for(lambda: client.get(f"/api/v1/jobs/{waiting}").json()["phase"] == "queued", "queued")
    # ...until one is back: then it runs there.
    client.put("/api/v1/devices/board-a/health", json={"health": "good", "reason": "reflashed"})
    job = wait_job(client, waiting)
    assert job["phase"] == "succeeded" and job["runs"][-1]["devices"] == ["board-a"], job
    client.put("/api/v1/devices/board-b/health", json={"health": "good", "reason": "done"})


def test_a_job_no_board_could_ever_serve_is_refused_at_submit(lab) -> None:
    client, _ = lab
    response = _submit(client, "impossible", stm32=1)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "unsatisfiable" and body["field"] == "resources"
    assert "no device of class 'stm32' is in the lab" in body["message"]
    too_many = _submit(client, "greedy", simboard=3)
    assert too_many.status_code == 400
    assert "no supervisor has 3 'simboard' device(s)" in too_many.json()["message"]
    # Retired boards never serve again: a job only they could serve is refused too.
    for board in ("board-a", "board-b"):
        client.put(f"/api/v1/devices/{board}/health", json={"health": "retired", "reason": "eol"})
    try:
        assert _submit(client, "late", simboard=1).status_code == 400
    finally:
        for board in ("board-a", "board-b"):
            client.put(f"/api/v1/devices/{board}/health", json={"health": "good", "reason": "x"})
    metrics = httpx.get(f"{client.base_url}/metrics").text
    assert 'switchboard_submissions_refused_total{reason="no_device"} 3.0' in metrics
    assert 'switchboard_devices{class="simboard",health="good"} 2.0' in metrics


def test_the_live_feed_tells_of_a_change_of_health(lab, switchboard: Switchboard) -> None:
    client, _ = lab
    stream = EventStream(switchboard)
    try:
        client.put("/api/v1/devices/board-b/health", json={"health": "looping", "reason": "flaky"})
        event = stream.expect(
            lambda kind, data: kind == "device" and data["health"] == "looping", "looping"
        )
        assert (event["id"], event["health_reason"], event["history"]) == ("board-b", "flaky", [])
    finally:
        stream.close()
        client.put("/api/v1/devices/board-b/health", json={"health": "good", "reason": "done"})
