"""Health checks end to end: a switchboard told the check job of a device class
(--health-checks) and a supervisor with two simulated boards. Each new board is checked
before it serves any job; a check that is canceled marks its board bad, and jobs then go to
the good one only; after `after_runs` runs a board is checked again."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.harness import Process, Switchboard, start_supervisor, wait_connected, wait_for, wait_job
from tests.simboard import SimBoard
from tests.test_lab_e2e import HOST, _config, _submit

pytestmark = pytest.mark.process

CHECKS = """
[simboard]
after_runs = 2
spec = { name = "selftest", priority = 10, backend = { kind = "noop", delay_s = 1.0 } }
"""


@pytest.fixture(scope="module")
def switchboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Switchboard]:
    root = tmp_path_factory.mktemp("checks")
    checks = root / "checks.toml"
    checks.write_text(CHECKS)
    server = Switchboard(root / "data", extra_args=("--health-checks", str(checks)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def lab(switchboard: Switchboard, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("lab")
    boards = {name: SimBoard(root / name) for name in ("board-a", "board-b")}
    config = root / "lab.toml"
    config.write_text(_config(boards))
    sup: Process | None = None
    client = switchboard.client()
    try:
        sup = start_supervisor(
            switchboard, root, name=HOST, backend="noop", extra_args=("--config", str(config))
        )
        wait_connected(client, HOST)
        yield client
    finally:
        if sup is not None:
            sup.stop()
        client.close()
        for board in boards.values():
            board.stop()


def _device(client: httpx.Client, device_id: str) -> dict[str, Any]:
    return client.get(f"/api/v1/devices/{device_id}").json()


def test_boards_are_checked_first_and_a_failed_check_keeps_jobs_away(lab) -> None:
    client = lab
    # Submitted at once: it must wait for a board's check.
    early = _submit(client, "early", simboard=1)
    assert early.status_code == 201, early.text
    checks = {
        board: wait_for(lambda b=board: _device(client, b)["checking"], f"a check of {board}")
        for board in ("board-a", "board-b")
    }
    check = client.get(f"/api/v1/jobs/{checks['board-a']}").json()
    assert check["name"] == "health check of board-a"
    assert check["spec"]["labels"] == {"switchboard.check": "board-a"}
    assert check["spec"]["timeout_s"] == 3600.0  # the switchboard's default run timeout
    assert client.post(f"/api/v1/jobs/{checks['board-a']}/cancel").status_code == 202
    bad = wait_for(
        lambda: (d := _device(client, "board-a"))["health"] == "bad" and d, "board-a bad"
    )
    assert bad["check_result"] == "fail" and bad["check_job"] == checks["board-a"]
    assert bad["history"][0]["actor"] == "health check"
    good = wait_for(
        lambda: (d := _device(client, "board-b"))["health"] == "good" and d, "board-b good"
    )
    assert good["check_result"] == "pass" and good["check_job"] == checks["board-b"]
    job = wait_job(client, early.json()["id"])
    assert job["phase"] == "succeeded" and job["runs"][0]["devices"] == ["board-b"], job
    # It started only once board-b's check had ended.
    check_b = client.get(f"/api/v1/jobs/{checks['board-b']}").json()
    assert job["runs"][0]["created_at"] >= check_b["runs"][0]["ended_at"]
    # A second run on board-b: after_runs = 2, so it is checked again; board-a never
    # serves, and is not checked (bad boards wait for an operator).
    second = wait_job(client, _submit(client, "second", simboard=1).json()["id"])
    assert second["runs"][0]["devices"] == ["board-b"]
    recheck = wait_for(lambda: _device(client, "board-b")["checking"], "board-b's next check")
    assert recheck != checks["board-b"]
    wait_for(lambda: _device(client, "board-b")["check_job"] == recheck, "board-b checked again")
    assert _device(client, "board-b")["health"] == "good"
    device_a = _device(client, "board-a")
    assert device_a["checking"] is None and device_a["health"] == "bad"
    metrics = httpx.get(f"{client.base_url}/metrics").text
    assert 'switchboard_health_checks_total{result="pass"} 2.0' in metrics
    assert 'switchboard_health_checks_total{result="fail"} 1.0' in metrics
