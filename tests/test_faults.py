"""Delivery under faults, with real processes: connections cut and stalled by a proxy,
the switchboard SIGKILLed. Nothing acknowledged is lost, nothing is stored twice."""

from __future__ import annotations

import hashlib
import random
import time

import pytest

from tests.faults import FaultyProxy
from tests.harness import Switchboard, start_supervisor, wait_connected, wait_job, wait_running
from tests.wasi import STREAM_OUT, compile_c, stream_pattern

pytestmark = pytest.mark.wasm


@pytest.fixture(scope="module")
def switchboard(tmp_path_factory):
    server = Switchboard(
        tmp_path_factory.mktemp("faults") / "data",
        extra_args=(
            "--heartbeat-interval",
            "0.25",
            "--heartbeat-timeout",
            "1.5",
            "--lost-after",
            "120",
        ),
    )
    yield server
    server.stop()


@pytest.fixture
def proxy(switchboard):
    faulty = FaultyProxy(switchboard.port)
    yield faulty
    faulty.close()


def _phases(job: dict) -> list[str]:
    return [p["phase"] for p in job["runs"][0]["phases"]]


def test_twenty_cuts_during_twenty_megabytes(switchboard, proxy, work_dir, tmp_path):
    client = switchboard.client()
    module = compile_c(STREAM_OUT, tmp_path, "stream_out").read_bytes()
    digest = client.post("/api/v1/artifacts", content=module).json()["digest"]
    sup = start_supervisor(switchboard, work_dir, name="cut-me", url=f"ws://127.0.0.1:{proxy.port}")
    try:
        wait_connected(client, "cut-me")
        chunks, size = 100, 200 * 1024  # 20 MiB over ~10 s
        job_id = client.post(
            "/api/v1/jobs",
            json={
                "name": "20MB",
                "backend": {
                    "kind": "wasm",
                    "module": digest,
                    "args": [str(chunks), str(size), "100"],
                },
            },
        ).json()["id"]
        wait_running(client, job_id)
        rng = random.Random(20)
        cuts = 0
        started = time.monotonic()
        while cuts < 20:
            time.sleep(rng.uniform(0.2, 0.5))
            cuts += 1 if proxy.cut() else 0
        cutting = time.monotonic() - started
        # Reconnects are prompt (the backoff starts over after every established link).
        assert cutting < 20
        job = wait_job(client, job_id, timeout=120)
        assert job["phase"] == "succeeded", job
        stdout = client.get(f"/api/v1/jobs/{job_id}/output").content
        assert len(stdout) == chunks * size
        expected = stream_pattern(chunks * size)
        assert hashlib.sha256(stdout).digest() == hashlib.sha256(expected).digest()
        phases = _phases(job)
        assert phases[0] == "assigned" and phases[-2:] == ["running", "succeeded"]
        assert phases.count("running") == 1 and phases.count("succeeded") == 1
        assert proxy.accepted > 20  # it really reconnected after each cut
        print(
            f"{cuts} cuts in {cutting:.1f}s, {len(stdout)} bytes checked, "
            f"{proxy.accepted} connections"
        )
    finally:
        sup.stop()


def test_stalled_connection_is_detected_and_replaced(switchboard, proxy, work_dir):
    client = switchboard.client()
    sup = start_supervisor(
        switchboard, work_dir, name="stall-me", backend="noop", url=f"ws://127.0.0.1:{proxy.port}"
    )
    try:
        wait_connected(client, "stall-me")
        before = next(s for s in client.get("/api/v1/supervisors").json() if s["id"] == "stall-me")[
            "session"
        ]
        assert proxy.stall() == 1
        stalled_at = time.monotonic()
        while True:
            sup_view = next(
                s for s in client.get("/api/v1/supervisors").json() if s["id"] == "stall-me"
            )
            if sup_view["connected"] and sup_view["session"] > before:
                break
            assert time.monotonic() - stalled_at < 20, "stall was not detected"
            time.sleep(0.05)
        detected = time.monotonic() - stalled_at
        print(f"half-open link replaced after {detected:.2f}s (heartbeat timeout 1.5s)")
        assert detected >= 1.0
        # The fresh connection works.
        job_id = client.post(
            "/api/v1/jobs", json={"name": "after", "backend": {"kind": "noop", "output": "ok"}}
        ).json()["id"]
        assert wait_job(client, job_id)["phase"] == "succeeded"
    finally:
        sup.stop()


def test_switchboard_sigkill_with_fifty_jobs_running(switchboard, work_dir):
    client = switchboard.client()
    sup = start_supervisor(switchboard, work_dir, name="fifty", backend="noop", max_jobs=50)
    try:
        wait_connected(client, "fifty")
        jobs = [
            client.post(
                "/api/v1/jobs",
                json={
                    "name": f"j{i}",
                    "selector": {"match_labels": {}},
                    "backend": {"kind": "noop", "delay_s": 2.0, "output": f"job {i}\n"},
                },
            ).json()["id"]
            for i in range(50)
        ]
        for job_id in jobs:
            wait_running(client, job_id)
        switchboard.kill_and_restart()
        client = switchboard.client()
        for i, job_id in enumerate(jobs):
            job = wait_job(client, job_id, timeout=60)
            assert job["phase"] == "succeeded", job
            assert len(job["runs"]) == 1  # never run twice
            assert _phases(job).count("running") == 1
            out = client.get(f"/api/v1/jobs/{job_id}/output").content
            assert out == f"job {i}\n".encode()
    finally:
        sup.stop()
