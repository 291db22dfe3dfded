"""Health checks in Docker and recovery by power cycles, end to end: a switchboard with a
health-checks file whose check of class `simboard` is a Docker job talking to the board
through its console, a supervisor with the Docker backend (a private engine) and two
simulated boards, each with its pty as the device node (bind-mounted into the container).
The check's result is the board's own answer to `selftest`.

- board-a fails its selftest until its next boot: its check fails, the switchboard
  power-cycles it and checks it again: it passes, and the board is good;
- board-b fails for good: two power cycles later (`recovery_attempts = 2`) it is in
  maintenance, with the reason;
- every step is in the boards' health and power histories (the switchboard, the check job),
  and a job then runs on the good board, its output the board's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.docker_engine import BUSYBOX_IMAGE, Engine
from tests.harness import Process, Switchboard, start_supervisor, wait_connected, wait_for, wait_job
from tests.simboard import SimBoard
from tests.test_lab_e2e import _toml_list

pytestmark = pytest.mark.docker

HOST = "lab-dock"

#: The check: ask the board for its selftest on its console, and say what it answered.
SELFTEST = r"""
exec 3<>"$SWITCHBOARD_DEVICE_SIMBOARD"
printf 'selftest\r' >&3
while read -t 3 -r line <&3; do
  case "$line" in
    *"selftest: ok"*) echo "board: selftest: ok"; exit 0 ;;
    *"selftest: FAIL"*) echo "board: $(echo "${line#> }" | tr -d '\r')"; exit 1 ;;
  esac
done
echo "no answer from the board"
exit 1
"""

CHECKS = f"""
[simboard]
recovery_attempts = 2

[simboard.spec]
name = "selftest"
priority = 10
timeout_s = 60

[simboard.spec.backend]
kind = "docker"
image = "{BUSYBOX_IMAGE}"
command = ["sh", "-c", '''{SELFTEST}''']
"""


def _config(boards: dict[str, SimBoard]) -> str:
    tables = []
    for name, board in boards.items():
        power = ", ".join(
            f"{action} = {_toml_list(board.power_argv(action))}"
            for action in ("on", "off", "cycle", "status")
        )
        tables.append(
            f"""[[devices]]
name = "{name}"
resource = "simboard"
path = "{board.tty}"
container_path = "/dev/ttyACM0"
power = {{ {power} }}
"""
        )
    return "\n".join(tables)


@pytest.fixture(scope="module")
def lab(
    tmp_path_factory: pytest.TempPathFactory, docker_engine: Engine
) -> Iterator[tuple[httpx.Client, dict[str, SimBoard]]]:
    root = tmp_path_factory.mktemp("lab-docker")
    boards = {name: SimBoard(root / name) for name in ("board-a", "board-b")}
    for board in boards.values():
        board.power("on")
    boards["board-a"].power("fail-check until-boot")  # a power cycle clears it
    boards["board-b"].power("fail-check on")  # it stays
    checks = root / "checks.toml"
    checks.write_text(CHECKS)
    config = root / "lab.toml"
    config.write_text(_config(boards))
    server = Switchboard(root / "data", extra_args=("--health-checks", str(checks)))
    client = server.client()
    sup: Process | None = None
    try:
        sup = start_supervisor(
            server,
            root,
            name=HOST,
            backend="docker",
            extra_args=("--config", str(config), "--docker-host", docker_engine.host),
        )
        wait_connected(client, HOST)
        yield client, boards
    finally:
        if sup is not None:
            sup.stop()
        client.close()
        server.stop()
        for board in boards.values():
            board.stop()


def _device(client: httpx.Client, device_id: str) -> dict[str, Any]:
    return client.get(f"/api/v1/devices/{device_id}").json()


def _output(client: httpx.Client, job_id: str) -> str:
    return client.get(f"/api/v1/jobs/{job_id}/output").text


def _steps(device: dict[str, Any]) -> list[tuple[str | None, str, str]]:
    """Its health changes, oldest first: (from, to, who)."""
    return [(h["from"], h["to"], h["actor"]) for h in reversed(device["history"])]


def test_a_board_that_a_power_cycle_fixes_is_recovered(lab) -> None:
    client, _ = lab
    good = wait_for(
        lambda: (d := _device(client, "board-a"))["health"] == "good" and d,
        "board-a recovered",
        timeout=90,
    )
    assert _steps(good) == [
        (None, "unknown", f"supervisor {HOST}"),
        ("unknown", "bad", "health check"),
        ("bad", "unknown", "switchboard (recovery)"),
        ("unknown", "good", "health check"),
    ]
    history = list(reversed(good["history"]))
    failed_check, recovery, passed = history[1]["job_id"], history[2], history[3]
    assert recovery["job_id"] == failed_check
    assert recovery["reason"] == (
        f"power-cycled (1 of 2) after failed health check {failed_check}: checking it again"
    )
    assert passed["job_id"] == good["check_job"] != failed_check
    # The board said so itself, through its console in the container.
    assert _output(client, failed_check) == "board: selftest: FAIL (radio not responding)\n"
    assert _output(client, good["check_job"]) == "board: selftest: ok\n"
    [cycle] = good["power_history"]
    assert (cycle["actor"], cycle["action"], cycle["result"], cycle["job_id"]) == (
        "switchboard (recovery)",
        "cycle",
        "ok",
        failed_check,
    )
    # The failed check's timeline says its board was cycled for it.
    events = client.get(f"/api/v1/jobs/{failed_check}/events").json()
    [power] = [e for e in events if e["kind"] == "power"]
    assert power["message"] == "power cycle of device board-a: ok, exit status 0"
    assert power["actor"] == "switchboard (recovery)"


def test_a_board_still_failing_after_its_attempts_goes_to_maintenance(lab) -> None:
    client, _ = lab
    device = wait_for(
        lambda: (d := _device(client, "board-b"))["health"] == "maintenance" and d,
        "board-b in maintenance",
        timeout=120,
    )
    assert _steps(device) == [
        (None, "unknown", f"supervisor {HOST}"),
        ("unknown", "bad", "health check"),
        ("bad", "unknown", "switchboard (recovery)"),
        ("unknown", "bad", "health check"),
        ("bad", "unknown", "switchboard (recovery)"),
        ("unknown", "bad", "health check"),
        ("bad", "maintenance", "switchboard (recovery)"),
    ]
    last_check = device["check_job"]
    assert device["health_reason"] == (
        f"health check still failing after 2 power cycle(s) (last check {last_check})"
    )
    assert device["history"][0]["job_id"] == last_check
    assert _output(client, last_check) == "board: selftest: FAIL (radio not responding)\n"
    cycles = device["power_history"]
    assert [(c["action"], c["result"], c["actor"]) for c in cycles] == [
        ("cycle", "ok", "switchboard (recovery)")
    ] * 2
    checks = [h["job_id"] for h in reversed(device["history"]) if h["actor"] == "health check"]
    assert [c["job_id"] for c in reversed(cycles)] == checks[:2]
    # In maintenance, it is checked no more.
    assert device["checking"] is None
    metrics = httpx.get(f"{client.base_url}/metrics").text
    assert 'switchboard_device_health_changes_total{health="maintenance"} 1.0' in metrics


def test_a_job_runs_on_the_recovered_board(lab) -> None:
    client, _ = lab
    wait_for(lambda: _device(client, "board-a")["health"] == "good", "board-a good", timeout=90)
    script = (
        'exec 3<>"$SWITCHBOARD_DEVICE_SIMBOARD"; printf "run-tests\\r" >&3; '
        'while read -t 3 -r line <&3; do line=$(echo "$line" | tr -d "\\r"); '
        'case "$line" in *"test "*|*"tests:"*) echo "${line#> }";; esac; '
        'case "$line" in *"tests:"*) exit 0;; esac; done; exit 1'
    )
    spec = {
        "name": "board tests",
        "resources": {"simboard": 1},
        "backend": {"kind": "docker", "image": BUSYBOX_IMAGE, "command": ["sh", "-c", script]},
    }
    created = client.post("/api/v1/jobs", json=spec)
    assert created.status_code == 201, created.text
    job = wait_job(client, created.json()["id"], timeout=60)
    assert job["phase"] == "succeeded", job
    assert job["runs"][0]["devices"] == ["board-a"]
    assert _output(client, job["id"]) == (
        "test gpio ... ok\ntest uart ... ok\ntest radio ... ok\ntests: 3 passed\n"
    )
