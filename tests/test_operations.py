"""Operator controls end to end: draining supervisors, pausing dispatch (across a
restart), operator labels, tokens (create, revoke, bind, rotate), and the run timeout the
switchboard enforces itself when a supervisor goes silent."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import (
    Process,
    Switchboard,
    scaled,
    start_supervisor,
    token_file_for,
    wait_connected,
    wait_for,
    wait_job,
    wait_running,
)

#: The switchboard ends a run this long after its timeout if the supervisor has not.
RUN_TIMEOUT_GRACE_S = 1.0
#: Far longer than any silence in these tests: a stopped supervisor must stay connected
#: (and its runs not become lost) while the run timeout is enforced.
HEARTBEAT_TIMEOUT_S = 60.0

_log_numbers = itertools.count()


@pytest.fixture(scope="module")
def switchboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Switchboard]:
    server = Switchboard(
        tmp_path_factory.mktemp("operations") / "data",
        extra_args=(
            "--run-timeout-grace",
            str(RUN_TIMEOUT_GRACE_S),
            "--heartbeat-timeout",
            str(HEARTBEAT_TIMEOUT_S),
            "--lost-after",
            "120",
        ),
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fleet(switchboard: Switchboard, work_dir: Path) -> Iterator[None]:
    """Two noop supervisors, `ops-a` (node=a) and `ops-b` (node=b)."""
    processes = [
        start_supervisor(
            switchboard, work_dir, name=f"ops-{n}", backend="noop", max_jobs=2, labels={"node": n}
        )
        for n in ("a", "b")
    ]
    with switchboard.client() as client:
        for n in ("a", "b"):
            wait_connected(client, f"ops-{n}")
    yield
    for process in processes:
        process.stop()


@pytest.fixture
def client(switchboard: Switchboard, fleet: None) -> Iterator[httpx.Client]:
    with switchboard.client() as api:
        yield api


def start_with_token(
    switchboard: Switchboard, work: Path, supervisor_id: str, token: str
) -> Process:
    """A noop supervisor connecting with the given token as `supervisor_id`."""
    number = next(_log_numbers)
    token_file = token_file_for(work / f"{supervisor_id}.{number}.token", token)
    args = [
        "-m",
        "supervisor",
        "run",
        "--switchboard",
        switchboard.ws_url,
        "--token-file",
        str(token_file),
        "--id",
        supervisor_id,
        "--name",
        supervisor_id,
        "--backend",
        "noop",
        "--max-jobs",
        "1",
        "--work-dir",
        str(work / supervisor_id),
    ]
    return Process(args, work / f"{supervisor_id}.{number}.log")


def exit_code(process: Process, timeout: float = 20.0) -> tuple[int, str]:
    """Wait for the process to end; its exit status and log."""
    try:
        code = process.proc.wait(scaled(timeout))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the supervisor kept running; log:\n{process.log()}") from None
    log = process.log()
    process.stop()
    return code, log


def stays(check: Callable[[], bool], seconds: float = 1.0) -> None:
    """Assert `check` holds throughout a short window (long enough for dispatch passes)."""
    deadline = time.monotonic() + scaled(seconds)
    while time.monotonic() < deadline:
        assert check()
        time.sleep(0.1)


def submit(client: httpx.Client, name: str, **fields: Any) -> str:
    body = {"name": name, "backend": {"kind": "noop", **fields.pop("backend", {})}, **fields}
    response = client.post("/api/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def on(node: str) -> dict[str, Any]:
    return {"match_labels": {"node": node}}


def phase(client: httpx.Client, job_id: str) -> str:
    return client.get(f"/api/v1/jobs/{job_id}").json()["phase"]


def supervisor(client: httpx.Client, supervisor_id: str) -> dict[str, Any]:
    response = client.get(f"/api/v1/supervisors/{supervisor_id}")
    assert response.status_code == 200, response.text
    return response.json()


def token_view(client: httpx.Client, token_id: str) -> dict[str, Any]:
    [view] = [t for t in client.get("/api/v1/tokens").json() if t["id"] == token_id]
    return view


# --- tokens ----------------------------------------------------------------------------


def test_token_create_list_and_revoke(client, switchboard):
    response = client.post("/api/v1/tokens", json={"role": "viewer", "name": "dashboard"})
    assert response.status_code == 201, response.text
    made = response.json()
    secret = made["token"]
    assert secret.startswith("sbt_")
    assert (made["role"], made["name"], made["supervisor_id"]) == ("viewer", "dashboard", None)

    listing = client.get("/api/v1/tokens")
    assert secret not in listing.text
    view = token_view(client, made["id"])
    assert "token" not in view
    assert (view["role"], view["name"], view["revoked"]) == ("viewer", "dashboard", False)

    with switchboard.client(secret) as viewer:
        assert viewer.get("/api/v1/jobs").status_code == 200
        assert viewer.post("/api/v1/jobs", json={}).status_code == 403
        assert viewer.get("/api/v1/tokens").status_code == 403
        assert client.delete(f"/api/v1/tokens/{made['id']}").status_code == 204
        refused = viewer.get("/api/v1/jobs")
        assert refused.status_code == 401
        assert refused.json()["error"] == "unauthorized"
    assert token_view(client, made["id"])["revoked"] is True
    assert client.delete(f"/api/v1/tokens/{made['id']}").status_code == 204  # idempotent
    assert client.delete("/api/v1/tokens/no-such-token").status_code == 404


def test_token_requests_are_checked(client):
    bound_viewer = {"role": "viewer", "supervisor_id": "ops-a"}
    response = client.post("/api/v1/tokens", json=bound_viewer)
    assert response.status_code == 400
    assert response.json()["field"] == "supervisor_id"
    for body in ({"role": "root"}, {"role": "viewer", "extra": 1}, {"name": "no role"}):
        assert client.post("/api/v1/tokens", json=body).status_code == 400, body


def test_revoking_a_token_disconnects_its_supervisor(client, switchboard, work_dir):
    # A host credential: with it revoked, the supervisor has nothing left to present. (A
    # registration token's revocation leaves credentials enrolled with it working; see
    # test_enrolment.py.)
    made = client.post(
        "/api/v1/tokens",
        json={"role": "supervisor", "name": "doomed", "supervisor_id": "ops-revoked"},
    ).json()
    process = start_with_token(switchboard, work_dir, "ops-revoked", made["token"])
    try:
        wait_connected(client, "ops-revoked")
        assert client.delete(f"/api/v1/tokens/{made['id']}").status_code == 204
        wait_for(lambda: not supervisor(client, "ops-revoked")["connected"], "the supervisor to go")
        # Its reconnect is refused, which the supervisor takes as final.
        code, log = exit_code(process)
        assert code == 2
        assert "refused this supervisor" in log
    finally:
        process.kill()


def test_a_bound_token_works_only_for_its_supervisor(client, switchboard, work_dir):
    made = client.post(
        "/api/v1/tokens", json={"role": "supervisor", "supervisor_id": "ops-bound"}
    ).json()
    assert made["supervisor_id"] == "ops-bound"
    impostor = start_with_token(switchboard, work_dir, "ops-impostor", made["token"])
    try:
        # Refused at the handshake, which no retry can mend: the supervisor says why and
        # exits 2 rather than knocking forever; it never registered, let alone connected.
        code, log = exit_code(impostor)
        assert code == 2 and "belongs to supervisor 'ops-bound'" in log, log
        assert client.get("/api/v1/supervisors/ops-impostor").status_code == 404
    finally:
        impostor.kill()
        impostor.stop()
    rightful = start_with_token(switchboard, work_dir, "ops-bound", made["token"])
    try:
        wait_connected(client, "ops-bound")
    finally:
        rightful.stop()


def test_rotating_a_supervisor_token(client, switchboard, work_dir):
    first = client.post(
        "/api/v1/tokens", json={"role": "supervisor", "supervisor_id": "ops-rotated"}
    ).json()
    old = start_with_token(switchboard, work_dir, "ops-rotated", first["token"])
    try:
        wait_connected(client, "ops-rotated")
        response = client.post("/api/v1/supervisors/ops-rotated/token")
        assert response.status_code == 201, response.text
        rotated = response.json()
        assert rotated["supervisor_id"] == "ops-rotated" and rotated["role"] == "supervisor"
        assert rotated["token"] != first["token"]
        # The old token is revoked, and the connection made with it is closed.
        assert token_view(client, first["id"])["revoked"] is True
        assert token_view(client, rotated["id"])["revoked"] is False
        assert exit_code(old)[0] == 2
    finally:
        old.kill()
    assert not supervisor(client, "ops-rotated")["connected"]
    again = start_with_token(switchboard, work_dir, "ops-rotated", first["token"])
    try:
        code, log = exit_code(again)
        assert code == 2
        assert "401" in log
    finally:
        again.kill()
    fresh = start_with_token(switchboard, work_dir, "ops-rotated", rotated["token"])
    try:
        wait_connected(client, "ops-rotated")
    finally:
        fresh.stop()
    assert client.post("/api/v1/supervisors/no-such/token").status_code == 404


# --- operator labels -------------------------------------------------------------------


def test_operator_labels_make_a_selector_match(client):
    waiting = submit(client, "wants-gpu", selector={"match_labels": {"gpu": "yes"}})
    try:
        wait_for(
            lambda: client.get(f"/api/v1/jobs/{waiting}").json()["unschedulable"],
            "the job to be marked unschedulable",
        )
        response = client.put("/api/v1/supervisors/ops-b/labels", json={"labels": {"gpu": "yes"}})
        assert response.status_code == 200, response.text
        view = response.json()
        assert view["labels"] == {"node": "b", "gpu": "yes"}
        assert view["operator_labels"] == {"gpu": "yes"}
        assert supervisor(client, "ops-b")["labels"] == {"node": "b", "gpu": "yes"}
        job = wait_job(client, waiting)
        assert job["phase"] == "succeeded"
        assert job["runs"][0]["supervisor_id"] == "ops-b"
        assert job["unschedulable"] is None
    finally:
        client.put("/api/v1/supervisors/ops-b/labels", json={"labels": {}})
        client.post(f"/api/v1/jobs/{waiting}/cancel")


def test_operator_labels_override_advertised_ones(client):
    try:
        view = client.put("/api/v1/supervisors/ops-b/labels", json={"labels": {"node": "z"}})
        assert view.json()["labels"] == {"node": "z"}
        moved = submit(client, "to-z", selector=on("z"))
        assert wait_job(client, moved)["runs"][0]["supervisor_id"] == "ops-b"
        stranded = submit(client, "to-b", selector=on("b"))
        wait_for(
            lambda: client.get(f"/api/v1/jobs/{stranded}").json()["unschedulable"],
            "the job to be marked unschedulable",
        )
        # Clearing the operator labels brings back what the supervisor advertises.
        cleared = client.put("/api/v1/supervisors/ops-b/labels", json={"labels": {}})
        assert cleared.json()["labels"] == {"node": "b"}
        assert cleared.json()["operator_labels"] == {}
        assert wait_job(client, stranded)["phase"] == "succeeded"
    finally:
        client.put("/api/v1/supervisors/ops-b/labels", json={"labels": {}})


def test_operator_label_requests_are_checked(client, switchboard):
    path = "/api/v1/supervisors/ops-a/labels"
    assert client.put(path, json={"labels": {"bad key": "x"}}).status_code == 400
    assert client.put(path, json={"labels": {}, "extra": 1}).status_code == 400
    missing = client.put("/api/v1/supervisors/no-such/labels", json={"labels": {}})
    assert missing.status_code == 404
    with switchboard.client(switchboard.create_token("submitter")) as submitter:
        assert submitter.put(path, json={"labels": {"x": "y"}}).status_code == 403
    assert supervisor(client, "ops-a")["operator_labels"] == {}


# --- drain -----------------------------------------------------------------------------


def test_drain_lets_runs_finish_and_takes_nothing_new(client, switchboard):
    running = submit(client, "before-drain", selector=on("a"), backend={"delay_s": 3})
    wait_running(client, running)
    try:
        response = client.post("/api/v1/supervisors/ops-a/drain")
        assert response.status_code == 200, response.text
        assert response.json()["drained"] is True
        assert response.json()["running"] == 1
        pinned = submit(client, "pinned-to-a", selector=on("a"))
        anywhere = submit(client, "anywhere")
        # The run already there finishes; new work goes elsewhere or waits.
        done = wait_job(client, running)
        assert done["phase"] == "succeeded" and done["runs"][0]["supervisor_id"] == "ops-a"
        placed = wait_job(client, anywhere)
        assert placed["phase"] == "succeeded" and placed["runs"][0]["supervisor_id"] == "ops-b"
        stays(lambda: phase(client, pinned) == "queued")
        # Drained is not unschedulable: ops-a could run it, it just may not now.
        assert client.get(f"/api/v1/jobs/{pinned}").json()["unschedulable"] is None
        # Drain is idempotent.
        assert client.post("/api/v1/supervisors/ops-a/drain").json()["drained"] is True
    finally:
        resumed = client.post("/api/v1/supervisors/ops-a/resume")
    assert resumed.status_code == 200 and resumed.json()["drained"] is False
    job = wait_job(client, pinned)
    assert job["phase"] == "succeeded" and job["runs"][0]["supervisor_id"] == "ops-a"
    assert client.post("/api/v1/supervisors/no-such/drain").status_code == 404
    with switchboard.client(switchboard.create_token("viewer")) as viewer:
        assert viewer.post("/api/v1/supervisors/ops-a/drain").status_code == 403
    assert supervisor(client, "ops-a")["drained"] is False


# --- dispatch pause --------------------------------------------------------------------


def test_paused_dispatch_holds_jobs_across_a_restart(client, switchboard):
    before = client.get("/api/v1/dispatch").json()
    assert before["paused"] is False
    paused = client.post("/api/v1/dispatch/pause")
    assert paused.status_code == 200
    assert paused.json()["paused"] is True
    try:
        held = [submit(client, f"held-{i}") for i in range(2)]
        stays(lambda: all(phase(client, j) == "queued" for j in held))
        state = client.get("/api/v1/dispatch").json()
        assert state == {"paused": True, "queued": before["queued"] + 2}

        switchboard.kill_and_restart()
        with switchboard.client() as after:
            assert after.get("/api/v1/dispatch").json() == state
            for name in ("ops-a", "ops-b"):
                wait_connected(after, name)
            stays(lambda: all(phase(after, j) == "queued" for j in held))
            resumed = after.post("/api/v1/dispatch/resume").json()
            assert resumed["paused"] is False
            for job_id in held:
                assert wait_job(after, job_id)["phase"] == "succeeded"
            assert after.get("/api/v1/dispatch").json()["queued"] == before["queued"]
    finally:
        with switchboard.client() as api:
            api.post("/api/v1/dispatch/resume")


# --- the switchboard's own run timeout -------------------------------------------------


def test_run_timeout_is_enforced_when_the_supervisor_goes_silent(client, switchboard, work_dir):
    timeout_s = 3.0
    process = start_supervisor(
        switchboard, work_dir, name="ops-frozen", backend="noop", max_jobs=1, labels={"node": "f"}
    )
    try:
        wait_connected(client, "ops-frozen")
        job_id = submit(
            client, "frozen", selector=on("f"), timeout_s=timeout_s, backend={"delay_s": 60}
        )
        wait_running(client, job_id)
        session = supervisor(client, "ops-frozen")["session"]
        # Frozen, the supervisor can neither end the run itself nor report anything.
        os.kill(process.proc.pid, signal.SIGSTOP)
        try:
            job = wait_job(client, job_id, timeout=timeout_s + RUN_TIMEOUT_GRACE_S + 5)
            # Still connected: the heartbeat timeout has not passed, so nothing is lost.
            assert supervisor(client, "ops-frozen")["connected"] is True
        finally:
            os.kill(process.proc.pid, signal.SIGCONT)
        assert job["phase"] == "timed_out"
        [run] = job["runs"]
        assert run["phase"] == "timed_out"
        assert "enforced by the switchboard" in run["message"]
        assert "lost" not in [p["phase"] for p in run["phases"]]
        assert run["ended_at"] - run["started_at"] >= timeout_s
        events = client.get(f"/api/v1/jobs/{job_id}/events").json()
        assert [e["attempt"] for e in events if e["kind"] == "run_timeout"] == [1]

        # Thawed, the supervisor's late report changes nothing, and it works on, on the
        # same connection (the StopJob the switchboard sent it is a valid message).
        after = submit(client, "after-thaw", selector=on("f"))
        assert wait_job(client, after)["phase"] == "succeeded"
        assert supervisor(client, "ops-frozen")["session"] == session
        final = client.get(f"/api/v1/jobs/{job_id}").json()
        assert final["phase"] == "timed_out"
        assert final["runs"][0]["message"] == run["message"]
    finally:
        process.stop()
