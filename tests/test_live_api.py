"""What the dashboard reads: /me, the overview, the live event stream, job search and a
supervisor's connection history, against a real switchboard and supervisor."""

from __future__ import annotations

import json
import queue
import threading
import time

import httpx
import pytest

from tests.harness import (
    Switchboard,
    scaled,
    start_supervisor,
    wait_connected,
    wait_for,
    wait_job,
)

pytestmark = pytest.mark.process


class EventStream:
    """GET /api/v1/live read on a thread; events land in a queue as dicts."""

    def __init__(self, switchboard: Switchboard, token: str | None = None) -> None:
        self.events: queue.Queue[dict] = queue.Queue()
        self.status: int | None = None
        self._client = switchboard.client(token)
        self._client.timeout = httpx.Timeout(30.0, read=None)
        self._opened = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        assert self._opened.wait(scaled(10)), "the event stream did not open"

    def _read(self) -> None:
        try:
            with self._client.stream("GET", "/api/v1/live") as response:
                self.status = response.status_code
                self.content_type = response.headers.get("content-type", "")
                self._opened.set()
                fields: dict[str, str] = {}
                for line in response.iter_lines():
                    if not line:
                        if "data" in fields:
                            self.events.put(fields)
                        fields = {}
                        continue
                    name, _, value = line.partition(":")
                    fields[name] = value.removeprefix(" ")
        except httpx.HTTPError:
            pass
        finally:
            self._opened.set()

    def expect(self, check, what: str, timeout: float = 15.0) -> dict:
        """The first event for which check(kind, data) holds; others are skipped."""
        deadline = time.monotonic() + scaled(timeout)
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                break
            data = json.loads(event["data"])
            if check(event.get("event"), data):
                return data
        raise AssertionError(f"no event: {what}")

    def close(self) -> None:
        self._client.close()


@pytest.fixture(scope="module")
def supervisor(switchboard, work_dir):
    process = start_supervisor(switchboard, work_dir, name="live-noop", backend="noop")
    wait_connected(switchboard.client(), "live-noop")
    yield process
    process.stop()


def _submit(client: httpx.Client, **spec) -> str:
    body = {"name": "live", "backend": {"kind": "noop"}, **spec}
    response = client.post("/api/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_me_names_the_token_and_what_it_may_do(switchboard):
    viewer = switchboard.client(switchboard.create_token("viewer")).get("/api/v1/me")
    assert viewer.status_code == 200
    assert viewer.json()["role"] == "viewer" and viewer.json()["permissions"] == ["view"]
    operator = switchboard.client(switchboard.create_token("operator")).get("/api/v1/me").json()
    assert {"view", "cancel", "operate"} <= set(operator["permissions"])
    assert "administer" not in operator["permissions"]
    refused = switchboard.client(switchboard.create_token("supervisor")).get("/api/v1/me")
    assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
    assert switchboard.client("sbt_nope").get("/api/v1/me").status_code == 401


def test_live_stream_follows_a_job_and_a_supervisor(switchboard, supervisor):
    client = switchboard.client()
    stream = EventStream(switchboard)
    try:
        assert stream.status == 200 and stream.content_type.startswith("text/event-stream")
        job_id = _submit(client, backend={"kind": "noop", "delay_s": 1.0})
        phases = []

        def saw_end(kind, data):
            if kind == "job" and data["id"] == job_id:
                phases.append(data["phase"])
            return kind == "job" and data["id"] == job_id and data["phase"] == "succeeded"

        stream.expect(saw_end, "the job's success")
        assert phases[0] in ("queued", "assigned", "initializing", "running")
        assert "running" in phases or len(phases) >= 2

        assert client.delete(f"/api/v1/jobs/{job_id}").status_code == 204
        stream.expect(
            lambda kind, data: kind == "job_deleted" and data["id"] == job_id, "the deletion"
        )

        client.post("/api/v1/supervisors/live-noop/drain")
        try:
            # Both follow from the drain, in either order (separate passes of the feed).
            seen: dict[str, dict] = {}

            def saw_both(kind, data):
                if kind == "supervisor" and data["drained"]:
                    seen["supervisor"] = data
                if kind == "overview" and data["supervisors"]["draining"] == 1:
                    seen["overview"] = data
                return len(seen) == 2

            stream.expect(saw_both, "the drained supervisor and an overview counting it")
            assert seen["supervisor"]["id"] == "live-noop"
            assert seen["supervisor"]["connected"] is True
        finally:
            client.post("/api/v1/supervisors/live-noop/resume")
    finally:
        stream.close()


def test_overview_counts(switchboard, supervisor):
    client = switchboard.client()
    before = client.get("/api/v1/overview").json()
    ok = [_submit(client) for _ in range(2)]
    bad = _submit(client, backend={"kind": "noop", "exit_code": 3})
    for job_id in [*ok, bad]:
        wait_job(client, job_id)
    stuck = _submit(client, priority=7, selector={"match_labels": {"board": "none-such"}})
    try:
        now = client.get("/api/v1/overview").json()
        assert now["supervisors"]["online"] >= 1
        assert {"priority": 7, "count": 1} in now["queue"]
        assert len(now["finished"]) == 60
        minutes = [m["minute"] for m in now["finished"]]
        assert minutes == sorted(minutes) and minutes[-1] - minutes[0] == 59 * 60

        def ended(overview, key):
            return sum(m[key] for m in overview["finished"])

        assert ended(now, "succeeded") - ended(before, "succeeded") == 2
        assert ended(now, "failed") - ended(before, "failed") == 1
        assert now["recent_failures"][0]["id"] == bad
        assert now["recent_failures"][0]["exit_code"] == 3
    finally:
        client.post(f"/api/v1/jobs/{stuck}/cancel")


def test_search_by_name_or_id(switchboard, supervisor):
    client = switchboard.client()
    wanted = _submit(client, name="Firmware-Build_7%")
    other = _submit(client, name="docs")
    found = client.get("/api/v1/jobs", params={"q": "firmware-build_7%"}).json()["items"]
    assert [job["id"] for job in found] == [wanted]
    by_id = client.get("/api/v1/jobs", params={"q": other[:6]}).json()["items"]
    assert other in [job["id"] for job in by_id]
    # LIKE wildcards in the query are plain characters
    assert client.get("/api/v1/jobs", params={"q": "build%7"}).json()["items"] == []
    assert client.get("/api/v1/jobs", params={"q": ""}).status_code == 400


def test_connection_history(switchboard, work_dir):
    client = switchboard.client()
    for _ in range(2):
        process = start_supervisor(switchboard, work_dir, name="live-history", backend="noop")
        wait_connected(client, "live-history")
        shown = client.get("/api/v1/supervisors/live-history").json()
        assert shown["last_seen"] is not None
        process.stop()
        wait_for(
            lambda: not client.get("/api/v1/supervisors/live-history").json()["connected"],
            "the disconnect",
        )
    history = client.get("/api/v1/supervisors/live-history/connections").json()
    assert [entry["session"] for entry in history] == [2, 1]  # newest first
    for entry in history:
        assert entry["disconnected_at"] >= entry["connected_at"]
        assert entry["reason"]
    missing = client.get("/api/v1/supervisors/nobody/connections")
    assert missing.status_code == 404


def test_shutdown_ends_open_event_streams(tmp_path):
    server = Switchboard(tmp_path / "data")
    stream = EventStream(server)
    try:
        server.stop()
        # uvicorn re-raises the SIGTERM once it has shut down cleanly
        assert server.process.proc.returncode in (0, -15)
        # Ended by the switchboard, not cut off by uvicorn's graceful-shutdown timeout.
        log = server.process.log_path.read_text()
        assert "timeout graceful shutdown exceeded" not in log.lower(), log
    finally:
        stream.close()


def test_heartbeats_say_when_supervisors_were_last_heard(switchboard, supervisor):
    stream = EventStream(switchboard)
    try:
        beat = stream.expect(
            lambda kind, data: kind == "heartbeats" and "live-noop" in data["last_heard"],
            "a heartbeats event naming the supervisor",
        )
        assert beat["at"] - 60 < beat["last_heard"]["live-noop"] <= beat["at"] + 1
    finally:
        stream.close()


def test_a_revoked_token_ends_its_stream(switchboard):
    client = switchboard.client()
    made = client.post("/api/v1/tokens", json={"role": "viewer", "name": "watcher"}).json()
    stream = EventStream(switchboard, made["token"])
    try:
        assert stream.status == 200
        assert client.delete(f"/api/v1/tokens/{made['id']}").status_code == 204
        stream._thread.join(scaled(30))
        assert not stream._thread.is_alive(), "the stream stayed open after the revoke"
        again = switchboard.client(made["token"]).get("/api/v1/live")
        assert again.status_code == 401
    finally:
        stream.close()
