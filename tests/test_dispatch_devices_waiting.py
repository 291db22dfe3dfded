"""A job waiting for a board is never taken for one no supervisor could ever run. A
supervisor that declares its boards as devices (protocol 1.4) and leaves them out of its
hello's `resources` offers them all the same: the job that finds every board busy waits,
says nothing is wrong, and runs when one is free (bench.fleet: the real protocol over
real sockets)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench.e2e import Api
from bench.fleet import DEVICE_CLASS, PARAM_HOLD, FleetProcess
from tests.harness import Switchboard, scaled

pytestmark = pytest.mark.process


def _board_job(name: str, *, hold: bool = False) -> dict:
    spec: dict = {"name": name, "backend": {"kind": "noop"}, "resources": {DEVICE_CLASS: 1}}
    if hold:
        spec["parameters"] = {PARAM_HOLD: {"value": "1"}}
    return spec


def test_a_job_waiting_for_a_busy_board_is_placed_when_it_is_free(tmp_path: Path) -> None:
    sb = Switchboard(tmp_path / "data")
    fleet = FleetProcess()
    try:
        token = sb.create_token("supervisor")
        # Two slots, one board, declared as a device only (no hello resources).
        fleet.call(
            "connect",
            url=f"{sb.ws_url}/ws/supervisor",
            token=token,
            count=1,
            prefix="host",
            max_jobs=2,
            devices=1,
        )
        api = Api(sb.port, sb.admin_token)
        holder = api.call("POST", "/api/v1/jobs", _board_job("holder", hold=True))["id"]
        deadline = time.monotonic() + scaled(20)
        while api.call("GET", f"/api/v1/jobs/{holder}")["phase"] != "running":
            assert time.monotonic() < deadline, "the first job never ran"
            time.sleep(0.05)
        waiter = api.call("POST", "/api/v1/jobs", _board_job("waiter"))["id"]
        # Several passes see it wait (a supervisor's heartbeat, the safety net's period).
        time.sleep(scaled(2))
        job = api.call("GET", f"/api/v1/jobs/{waiter}")
        assert job["phase"] == "queued", job
        assert job.get("unschedulable") is None, job
        fleet.call("release", job_id=holder)
        fleet.call("wait_done", count=2, limit_s=scaled(20), timeout_s=scaled(30))
        deadline = time.monotonic() + scaled(20)
        while api.call("GET", f"/api/v1/jobs/{waiter}")["phase"] != "succeeded":
            assert time.monotonic() < deadline, api.call("GET", f"/api/v1/jobs/{waiter}")
            time.sleep(0.05)
    finally:
        fleet.close()
        sb.stop()
