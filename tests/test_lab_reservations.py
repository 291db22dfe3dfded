"""Reservations of the lab's boards end to end: a real switchboard (a one-second TTL for
waiting reservations, so expiry is quick to see) and a real supervisor whose config
describes two simulated boards (tests/simboard.py). A held lease runs only the jobs naming
it while other jobs go to the other board; a reservation waits holding nothing until all
its boards are free; one whose client stopped refreshing it expires within the TTL and one
sweep; a lease ends on time; a revoked token's lease is released; bad requests get 400,
strangers 403."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.harness import (
    Process,
    Switchboard,
    _env,
    run_cli,
    scaled,
    start_supervisor,
    wait_connected,
    wait_for,
    wait_job,
)
from tests.scrape import sample_value_or_zero
from tests.simboard import SimBoard
from tests.test_lab_e2e import _cli, _config

pytestmark = pytest.mark.process

HOST = "lab-host"
#: The switchboard's settings for this module (docs/lab.md: --reservation-ttl etc.).
TTL_S = 1.0
LEASE_MAX_S = 60.0
#: The sweep's period (Settings.reservation_sweep_s).
SWEEP_S = 0.5


@pytest.fixture(scope="module")
def switchboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Switchboard]:
    server = Switchboard(
        tmp_path_factory.mktemp("reservations") / "data",
        extra_args=(
            *("--reservation-ttl", str(TTL_S)),
            *("--lease-default", "30"),
            *("--lease-max", str(LEASE_MAX_S)),
        ),
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def lab(
    switchboard: Switchboard, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
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


def _reserve(client: httpx.Client, **body: object) -> dict:
    response = client.post("/api/v1/reservations", json={"class": "simboard", **body})
    assert response.status_code == 201, response.text
    return response.json()


def _get(client: httpx.Client, reservation_id: str) -> dict:
    return client.get(f"/api/v1/reservations/{reservation_id}").json()


def _held(client: httpx.Client, reservation_id: str) -> dict:
    return wait_for(
        lambda: (r := _get(client, reservation_id))["state"] == "held" and r, "reservation held"
    )


def _job(client: httpx.Client, name: str, reservation: str | None = None) -> httpx.Response:
    spec: dict = {
        "name": name,
        "backend": {"kind": "noop", "delay_s": 0.3},
        "resources": {"simboard": 1},
    }
    if reservation is not None:
        spec["reservation"] = reservation
    return client.post("/api/v1/jobs", json=spec)


def _release(client: httpx.Client, reservation_id: str) -> None:
    client.delete(f"/api/v1/reservations/{reservation_id}")


def test_a_held_lease_runs_only_its_holders_jobs(lab: httpx.Client, switchboard: Switchboard):
    admin = lab
    holder = switchboard.client(switchboard.create_token("submitter"))
    stranger = switchboard.client(switchboard.create_token("submitter"))
    try:
        made = _reserve(holder, count=1)
        held = _held(holder, made["id"])
        [mine] = held["devices"]
        other = "board-b" if mine == "board-a" else "board-a"
        assert admin.get(f"/api/v1/devices/{mine}").json()["reservation"] == made["id"]
        assert made["id"] in _cli(switchboard, "list") and made["id"] in _cli(
            switchboard, "show", mine
        )
        # The holder's jobs run on its board; everyone else's go to the other one.
        ours = [_job(holder, f"mine-{i}", made["id"]).json()["id"] for i in range(2)]
        theirs = [_job(admin, f"theirs-{i}").json()["id"] for i in range(4)]
        for job_id in ours:
            job = wait_job(admin, job_id)
            assert job["phase"] == "succeeded" and job["runs"][-1]["devices"] == [mine], job
        for job_id in theirs:
            job = wait_job(admin, job_id)
            assert job["phase"] == "succeeded" and job["runs"][-1]["devices"] == [other], job
        # A stranger may neither use it nor end it.
        refused = _job(stranger, "sneaky", made["id"])
        assert refused.status_code == 403 and refused.json()["field"] == "reservation"
        for call in (
            stranger.delete(f"/api/v1/reservations/{made['id']}"),
            stranger.post(f"/api/v1/reservations/{made['id']}/extend", json={"by_s": 5}),
        ):
            assert call.status_code == 403 and call.json()["error"] == "forbidden", call.text
        assert _get(admin, made["id"])["state"] == "held"
        # While the board is held, a job naming nothing waits for the other board only:
        # with that one in maintenance, it stays queued.
        admin.put(f"/api/v1/devices/{other}/health", json={"health": "maintenance", "reason": "t"})
        waiting = _job(admin, "waits").json()["id"]
        queued = _job(holder, "queued-for-lease", made["id"]).json()["id"]
        wait_for(lambda: wait_job(admin, queued)["phase"] == "succeeded", "the lease's job ran")
        assert admin.get(f"/api/v1/jobs/{waiting}").json()["phase"] == "queued"
        # Released by its holder: the board is free, and the waiting job takes it.
        released = holder.delete(f"/api/v1/reservations/{made['id']}")
        assert released.status_code == 200 and released.json()["state"] == "released"
        job = wait_job(admin, waiting)
        assert job["phase"] == "succeeded" and job["runs"][-1]["devices"] == [mine], job
        # A job naming an ended reservation is refused.
        late = _job(holder, "late", made["id"])
        assert late.status_code == 400 and "has released" in late.json()["message"]
    finally:
        admin.put("/api/v1/devices/board-a/health", json={"health": "good", "reason": "t"})
        admin.put("/api/v1/devices/board-b/health", json={"health": "good", "reason": "t"})
        holder.close()
        stranger.close()


def test_a_reservation_waits_holding_nothing_and_expires_when_its_client_dies(lab: httpx.Client):
    blocker = _held(lab, _reserve(lab, count=1)["id"])
    try:
        # Two boards asked for, one held elsewhere: it waits, holding neither (all or none).
        both = _reserve(lab, count=2)
        time.sleep(SWEEP_S * 2)
        assert _get(lab, both["id"])["state"] == "waiting"
        devices = lab.get("/api/v1/devices").json()
        assert [d["reservation"] for d in devices].count(blocker["id"]) == 1
        assert all(d["reservation"] in (None, blocker["id"]) for d in devices)
        # Its client died (nobody refreshes it): it expires within the TTL and one sweep.
        ended = wait_for(
            lambda: (r := _get(lab, both["id"]))["state"] != "waiting" and r, "expired"
        )
        assert ended["state"] == "expired" and "not refreshed" in ended["end_reason"], ended
        late = ended["ended_at"] - ended["created_at"]
        assert TTL_S <= late <= TTL_S + SWEEP_S + scaled(1.0), late
    finally:
        _release(lab, blocker["id"])


def test_the_cli_refreshes_a_waiting_reservation_until_it_is_held(
    lab: httpx.Client, switchboard: Switchboard
):
    blocker = _held(lab, _reserve(lab, count=1)["id"])
    waiter = subprocess.Popen(
        [
            sys.executable,
            *("-m", "switchboard", "device", "reserve", "--class", "simboard", "--count", "2"),
            *("--wait", "--refresh-every", "0.3", "--for", "1m", "--json"),
            *("--url", switchboard.url, "--token", switchboard.admin_token),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    try:
        mine = wait_for(
            lambda: [r for r in lab.get("/api/v1/reservations").json() if r["count"] == 2],
            "the CLI's reservation",
        )[0]
        # Three TTLs later it still waits: the CLI refreshes it.
        time.sleep(TTL_S * 3)
        assert _get(lab, mine["id"])["state"] == "waiting"
        _release(lab, blocker["id"])
        out, err = waiter.communicate(timeout=scaled(20))
        assert waiter.returncode == 0, err
        assert b'"state": "held"' in out and b"board-a" in out and b"board-b" in out
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
        _release(lab, blocker["id"])
        for r in lab.get("/api/v1/reservations").json():
            _release(lab, r["id"])


def test_a_lease_ends_on_time_and_extends_only_up_to_the_maximum(lab: httpx.Client):
    held = _held(lab, _reserve(lab, count=1, for_s=2)["id"])
    assert held["expires_at"] - held["granted_at"] == pytest.approx(2.0)
    too_far = lab.post(f"/api/v1/reservations/{held['id']}/extend", json={"by_s": LEASE_MAX_S})
    assert too_far.status_code == 400 and too_far.json()["field"] == "by_s", too_far.text
    longer = lab.post(f"/api/v1/reservations/{held['id']}/extend", json={"by_s": 1})
    assert longer.status_code == 200, longer.text
    assert longer.json()["expires_at"] == pytest.approx(held["expires_at"] + 1)
    ended = wait_for(
        lambda: (r := _get(lab, held["id"]))["state"] != "held" and r, "lease ended", timeout=30
    )
    assert ended["state"] == "expired" and "lease ended" in ended["end_reason"], ended
    # On time: ended by the first sweep after its end, never before it.
    assert 0 <= ended["ended_at"] - ended["expires_at"] <= SWEEP_S + scaled(1.0), ended
    assert all(d["reservation"] is None for d in lab.get("/api/v1/devices").json())


def test_a_revoked_tokens_reservations_are_released(lab: httpx.Client, switchboard: Switchboard):
    holder = switchboard.client(switchboard.create_token("submitter"))
    try:
        token_id = holder.get("/api/v1/me").json()["id"]
        held = _held(holder, _reserve(holder, count=1)["id"])
        assert lab.delete(f"/api/v1/tokens/{token_id}").status_code in (200, 204)
        ended = wait_for(lambda: (r := _get(lab, held["id"]))["state"] != "held" and r, "released")
        assert ended["state"] == "released" and "revoked" in ended["end_reason"], ended
    finally:
        holder.close()


def test_bad_requests_get_a_clear_400(lab: httpx.Client, switchboard: Switchboard):
    cases = [
        ({"class": "stm32"}, "class", "no device of class 'stm32'"),
        ({"class": "simboard", "count": 0}, "count", "between 1 and"),
        ({"class": "simboard", "count": 3}, "class", "only 2"),
        ({"class": "simboard", "for_s": LEASE_MAX_S + 1}, "for_s", "at most"),
        ({}, "class", "say which devices"),
    ]
    for body, field, words in cases:
        response = lab.post("/api/v1/reservations", json=body)
        assert response.status_code == 400, (body, response.text)
        answer = response.json()
        assert answer["field"] == field and words in answer["message"], answer
    unknown = _job(lab, "nowhere", "r-nope")
    assert unknown.status_code == 400 and "is unknown" in unknown.json()["message"]
    done = run_cli(
        *("-m", "switchboard", "device", "reserve", "--class", "stm32"),
        *("--url", switchboard.url, "--token", switchboard.admin_token),
        check=False,
    )
    assert done.returncode != 0 and b"no device of class 'stm32'" in done.stderr
    metrics = httpx.get(f"{switchboard.url}/metrics").text
    assert 'switchboard_reservation_refusals_total{reason="invalid_request"}' in metrics
    assert 'switchboard_reservations{state="expired"}' in metrics
    # Every grant of this module's tests observed how long it waited.
    assert sample_value_or_zero(metrics, "switchboard_reservation_wait_seconds_count") >= 5


def test_a_job_queued_again_after_its_reservation_ended_is_canceled(lab: httpx.Client):
    held = _held(lab, _reserve(lab, count=1)["id"])
    spec = {
        "name": "flaky",
        "backend": {"kind": "noop", "delay_s": 1.0, "exit_code": 1},
        "resources": {"simboard": 1},
        "reservation": held["id"],
        "restart": {"policy": "on_failure", "max_restarts": 5},
    }
    job_id = lab.post("/api/v1/jobs", json=spec).json()["id"]
    wait_for(lambda: lab.get(f"/api/v1/jobs/{job_id}").json()["phase"] == "running", "running")
    _release(lab, held["id"])  # its run goes on; the restart after it could never be placed
    job = wait_job(lab, job_id)
    assert job["phase"] == "canceled", job
    assert f"its reservation {held['id']} has released" in job["reason"], job
