"""No shared fate with a supervisor that stops reading: real processes, one supervisor
frozen with SIGSTOP while large StartJobs fill its socket. Everyone else's jobs flow as
fast as before, requests answer at once, and the frozen one is cut (by the heartbeat
timeout, the send timeout or its outbox limit) and handled by the normal reconnect rules."""

from __future__ import annotations

import os
import signal
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
from tests.scrape import sample_value, scrape

pytestmark = pytest.mark.process

INTERVAL, TIMEOUT = 0.5, 10.0
#: Runs the frozen supervisor takes, each a StartJob of about 1 MB: far more than the
#: kernel's socket buffers on loopback hold (about 4 MB), so the switchboard's sends wait.
FROZEN_SLOTS = 8
FAST_JOBS = 100


def _big_job(pool: str, delay_s: float = 0.0) -> dict:
    """A job whose StartJob is about 1 MB, within the frame limit (1 MiB)."""
    return {
        "name": "big",
        "backend": {"kind": "noop", "delay_s": delay_s},
        "selector": {"match_labels": {"pool": pool}},
        "parameters": {f"P{i:02d}": {"value": "x" * 65536} for i in range(15)},
    }


FAST_JOB = {
    "name": "fast",
    "backend": {"kind": "noop"},
    "selector": {"match_labels": {"pool": "fast"}},
}


def _timed_post(client: httpx.Client, path: str, body: dict | None = None) -> tuple[dict, float]:
    started = time.monotonic()
    response = client.post(path, json=body)
    elapsed = time.monotonic() - started
    assert response.status_code in (201, 202), response.text
    return response.json(), elapsed


def _flows(client: httpx.Client, times: int = 2) -> tuple[list[float], list[float]]:
    """`_flow` a few times: the latencies of the flow with the lowest median (the
    machine is shared: one flow may meet another process's burst, a stall meets all of
    them) and every POST's time."""
    flows = [_flow(client) for _ in range(times)]
    best = min((latencies for latencies, _ in flows), key=statistics.median)
    return best, [t for _, posts in flows for t in posts]


def _flow(client: httpx.Client) -> tuple[list[float], list[float]]:
    """FAST_JOBS no-op jobs submitted as fast as one client can: each job's latency
    (submitted -> ended, as the switchboard recorded them) and each POST's time."""
    ids, posts = [], []
    for _ in range(FAST_JOBS):
        made, elapsed = _timed_post(client, "/api/v1/jobs", FAST_JOB)
        ids.append(made["id"])
        posts.append(elapsed)
    latencies = []
    for job_id in ids:
        job = wait_job(client, job_id, timeout=120)
        assert job["phase"] == "succeeded", job
        latencies.append(job["runs"][-1]["ended_at"] - job["created_at"])
    return latencies, posts


def _supervisor(client: httpx.Client, supervisor_id: str) -> dict:
    return client.get(f"/api/v1/supervisors/{supervisor_id}").json()


def _last_connection(client: httpx.Client, supervisor_id: str) -> dict:
    return client.get(f"/api/v1/supervisors/{supervisor_id}/connections").json()[0]


def _cuts(switchboard: Switchboard, reason: str) -> float:
    return sample_value(
        scrape(f"{switchboard.url}/metrics"), "switchboard_sessions_cut_total", reason=reason
    )


@contextmanager
def _frozen(sup: Process) -> Iterator[float]:
    """SIGSTOP the process; yields when (wall clock); SIGCONT on the way out."""
    os.kill(sup.proc.pid, signal.SIGSTOP)
    try:
        yield time.time()
    finally:
        os.kill(sup.proc.pid, signal.SIGCONT)


def _fill(
    client: httpx.Client, pool: str, phase: str = "assigned", delay_s: float = 0.0
) -> tuple[list[str], list[float]]:
    """Submit a big job for each slot of the supervisor of `pool` and wait until all are
    in `phase` (assigned: placed, their StartJobs queued for its socket); the ids and the
    POSTs' times."""
    ids, posts = [], []
    for _ in range(FROZEN_SLOTS):
        made, elapsed = _timed_post(client, "/api/v1/jobs", _big_job(pool, delay_s))
        ids.append(made["id"])
        posts.append(elapsed)
    wait_for(
        lambda: all(client.get(f"/api/v1/jobs/{i}").json()["phase"] == phase for i in ids),
        f"the big jobs to be {phase}",
    )
    return ids, posts


def _after_thaw(client: httpx.Client, supervisor_id: str, session: int, ids: list[str]) -> list:
    """Once thawed, the supervisor reconnects (a new session) and reconciles: every big
    job it was given runs to its end. Their final phases."""
    wait_for(
        lambda: (s := _supervisor(client, supervisor_id))["connected"] and s["session"] > session,
        "the thawed supervisor to reconnect",
        timeout=60,
    )
    return [wait_job(client, i, timeout=120)["phase"] for i in ids]


@pytest.fixture(scope="module")
def switchboard(tmp_path_factory):
    server = Switchboard(
        tmp_path_factory.mktemp("frozen") / "data",
        extra_args=(
            "--heartbeat-interval",
            str(INTERVAL),
            "--heartbeat-timeout",
            str(TIMEOUT),
            "--send-timeout",
            str(3 * TIMEOUT),
            "--lost-after",
            "120",
        ),
    )
    yield server
    server.stop()


def test_a_frozen_supervisor_stalls_no_one(switchboard, work_dir: Path):
    """The send timeout is longer than the heartbeat timeout here: the heartbeat timeout
    must be able to cut a session whose socket is stuck."""
    client = switchboard.client()
    fast = [
        start_supervisor(
            switchboard, work_dir, name=f"fast-{i}", backend="noop", labels={"pool": "fast"}
        )
        for i in range(2)
    ]
    frozen, holder = (
        start_supervisor(
            switchboard,
            work_dir,
            name=name,
            backend="noop",
            max_jobs=FROZEN_SLOTS,
            labels={"pool": name},
        )
        for name in ("frozen", "holder")
    )
    try:
        names = ("fast-0", "fast-1", "frozen", "holder")
        for sup_id in names:
            wait_connected(client, sup_id)
        sessions = {i: _supervisor(client, i)["session"] for i in names}
        cuts_before = _cuts(switchboard, "heartbeat_timeout")
        # The run to compare with: while as many big runs as the frozen supervisor will
        # hold are held elsewhere (the store's work for the runs the fleet holds grows
        # with their specs' size, and that is not what is measured here). Not on the
        # supervisor to be frozen: its socket's buffers would grow to take them all.
        held, _ = _fill(client, "holder", "running", delay_s=600)
        unfrozen, unfrozen_posts = _flows(client)
        for job_id in held:
            _timed_post(client, f"/api/v1/jobs/{job_id}/cancel")
        assert all(wait_job(client, i)["phase"] == "canceled" for i in held)

        with _frozen(frozen) as frozen_at:
            big, big_posts = _fill(client, "frozen")
            _, cancel_time = _timed_post(client, f"/api/v1/jobs/{big[0]}/cancel")
            while_frozen, frozen_posts = _flows(client)
            flowed_at = time.time()
            wait_for(
                lambda: not _supervisor(client, "frozen")["connected"],
                "the frozen supervisor to be cut",
                timeout=TIMEOUT + 30,
            )
            cut = _last_connection(client, "frozen")
            assert cut["session"] == sessions["frozen"]
            time.sleep(0.5)  # frozen a little longer: it must not have noticed anything

        ratio = statistics.median(while_frozen) / statistics.median(unfrozen)
        print(
            f"job latency p50 {statistics.median(unfrozen) * 1000:.1f} ms unfrozen, "
            f"{statistics.median(while_frozen) * 1000:.1f} ms with a frozen peer "
            f"(ratio {ratio:.2f}); POST p50 {statistics.median(unfrozen_posts) * 1000:.1f} / "
            f"{statistics.median(frozen_posts) * 1000:.1f} ms; big POSTs max "
            f"{max(big_posts) * 1000:.1f} ms; cancel {cancel_time * 1000:.1f} ms; "
            f"cut {cut['disconnected_at'] - frozen_at:.2f}s after the freeze "
            f"(100 jobs done {flowed_at - frozen_at:.2f}s after it)"
        )
        # Everyone else's jobs flowed as fast as before while the peer was frozen.
        assert flowed_at < cut["disconnected_at"], "the jobs flowed only after the cut"
        assert ratio <= 2.0
        # Requests touching the frozen peer answered without waiting on its socket (the
        # cut, which would have released them, came a whole heartbeat timeout later).
        assert max([*big_posts, cancel_time, *frozen_posts]) < TIMEOUT / 4
        # Cut by the heartbeat timeout, counted, with the reason recorded.
        assert cut["disconnected_at"] - frozen_at <= TIMEOUT + INTERVAL + scaled(1.0)
        assert "heartbeat" in cut["reason"]
        assert _cuts(switchboard, "heartbeat_timeout") == cuts_before + 1
        # The healthy supervisors never lost their connection.
        for sup_id in ("fast-0", "fast-1", "holder"):
            view = _supervisor(client, sup_id)
            assert view["connected"] and view["session"] == sessions[sup_id]
        # Thawed, it reconnects and reconciles: the canceled run ends canceled, the others
        # run to success.
        phases = _after_thaw(client, "frozen", sessions["frozen"], big)
        assert phases == ["canceled"] + ["succeeded"] * (FROZEN_SLOTS - 1)
    finally:
        for sup in (*fast, frozen, holder):
            sup.stop()


@pytest.mark.parametrize(
    ("reason", "flags"),
    [
        # The heartbeat timeout is long: the send deadline cuts it.
        ("send_timeout", ("--heartbeat-timeout", "120", "--send-timeout", "2")),
        # Both timeouts are long: the outbox overflows once the socket is full. StartJobs
        # take at most half of it (one, here); the heartbeats fill the rest.
        (
            "outbox_full",
            (
                "--heartbeat-timeout",
                "120",
                "--send-timeout",
                "120",
                "--outbox-max-bytes",
                "2000000",
                "--outbox-max-messages",
                "4",
            ),
        ),
    ],
)
def test_a_supervisor_that_does_not_read_is_cut(tmp_path, reason: str, flags: tuple[str, ...]):
    server = Switchboard(
        tmp_path / "data", extra_args=("--heartbeat-interval", str(INTERVAL), *flags)
    )
    client = server.client()
    sup = start_supervisor(
        server, tmp_path, name="stuck", backend="noop", max_jobs=FROZEN_SLOTS, labels={"pool": "s"}
    )
    try:
        wait_connected(client, "stuck")
        session = _supervisor(client, "stuck")["session"]
        with _frozen(sup) as frozen_at:
            big, posts = _fill(client, "s")
            wait_for(
                lambda: not _supervisor(client, "stuck")["connected"],
                "the stuck supervisor to be cut",
                timeout=60,
            )
            cut = _last_connection(client, "stuck")
        waited = cut["disconnected_at"] - frozen_at
        print(f"{reason}: cut {waited:.2f}s after the freeze: {cut['reason']}")
        assert _cuts(server, reason) == 1
        assert _cuts(server, "heartbeat_timeout") == 0
        if reason == "send_timeout":
            # The POSTs placing the runs never waited on the socket, which the cut freed
            # only after the send timeout.
            assert max(posts) < 2.0 / 2
            assert 2.0 <= waited <= 2.0 + 1.0 + scaled(2.0)
            assert "waited" in cut["reason"]
        else:
            assert "already wait" in cut["reason"]
        # Thawed, it reconnects; the StartJobs sent again wait their turn for its outbox,
        # so even when they are more than it holds it is not cut again.
        phases = _after_thaw(client, "stuck", session, big)
        assert phases == ["succeeded"] * FROZEN_SLOTS
        assert _cuts(server, reason) == 1
    finally:
        sup.stop()
        server.stop()


def test_one_pass_of_large_starts_does_not_cut_a_healthy_supervisor(tmp_path):
    """A pass that gives a supervisor more large StartJobs than its outbox holds (8 of
    about 1 MB, with a 2 MB outbox) sends them as the outbox drains: the supervisor is
    not cut, and runs them all."""
    server = Switchboard(
        tmp_path / "data",
        extra_args=("--heartbeat-interval", str(INTERVAL), "--outbox-max-bytes", "2000000"),
    )
    client = server.client()
    sup = start_supervisor(
        server, tmp_path, name="busy", backend="noop", max_jobs=FROZEN_SLOTS, labels={"pool": "b"}
    )
    try:
        wait_connected(client, "busy")
        session = _supervisor(client, "busy")["session"]
        # Held back, then placed by one pass.
        assert client.post("/api/v1/dispatch/pause").status_code in (200, 204)
        ids = [_timed_post(client, "/api/v1/jobs", _big_job("b"))[0]["id"] for _ in range(8)]
        assert client.post("/api/v1/dispatch/resume").status_code in (200, 204)
        assert [wait_job(client, i, timeout=60)["phase"] for i in ids] == ["succeeded"] * 8
        assert _cuts(server, "outbox_full") == 0
        assert _supervisor(client, "busy")["session"] == session
    finally:
        sup.stop()
        server.stop()
