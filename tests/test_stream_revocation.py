"""Long-lived responses end when their token is revoked: the dashboard's live feed and a
running job's output followed as bytes and as server-sent events, against a real
switchboard and supervisor. Streams opened with another token stay open."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.harness import Switchboard, scaled, start_supervisor, wait_connected, wait_running
from tests.scrape import sample_value, scrape


class OpenStream:
    """A GET read to its end on a thread of its own; `body` is what arrived."""

    def __init__(self, switchboard: Switchboard, token: str, path: str, **params: str) -> None:
        self.body = b""
        self.status: int | None = None
        self.error: Exception | None = None
        self._client = switchboard.client(token)
        self._client.timeout = httpx.Timeout(30.0, read=None)
        self._opened = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(path, params), daemon=True)
        self._thread.start()
        assert self._opened.wait(scaled(10)), f"{path} did not open"
        assert self.status == 200, f"{path}: {self.status}"

    def _read(self, path: str, params: dict[str, str]) -> None:
        try:
            with self._client.stream("GET", path, params=params) as response:
                self.status = response.status_code
                self._opened.set()
                for chunk in response.iter_raw():
                    self.body += chunk
        except httpx.HTTPError as exc:
            self.error = exc
        finally:
            self._opened.set()

    @property
    def open(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def close(self) -> None:
        self._client.close()


@pytest.fixture(scope="module")
def running_job(switchboard, work_dir):
    supervisor = start_supervisor(switchboard, work_dir, name="revoke-noop", backend="noop")
    client = switchboard.client()
    try:
        wait_connected(client, "revoke-noop")
        spec = {
            "name": "long",
            "backend": {"kind": "noop", "delay_s": 600, "output": "started\n"},
        }
        job_id = client.post("/api/v1/jobs", json=spec).json()["id"]
        wait_running(client, job_id)
        yield job_id
        client.post(f"/api/v1/jobs/{job_id}/cancel")
    finally:
        supervisor.stop()


def _viewer(client: httpx.Client, name: str) -> dict:
    made = client.post("/api/v1/tokens", json={"role": "viewer", "name": name})
    assert made.status_code == 201, made.text
    return made.json()


def _streams(switchboard: Switchboard, token: str, job_id: str) -> dict[str, OpenStream]:
    return {
        "follow": OpenStream(switchboard, token, f"/api/v1/jobs/{job_id}/output/follow"),
        "events": OpenStream(switchboard, token, f"/api/v1/jobs/{job_id}/output/events"),
        "live": OpenStream(switchboard, token, "/api/v1/live"),
    }


def test_revoking_a_token_ends_its_streams_and_no_others(switchboard, running_job):
    admin = switchboard.client()
    doomed, kept = _viewer(admin, "doomed"), _viewer(admin, "kept")
    metrics = f"{switchboard.url}/metrics"
    revoked = "switchboard_streams_revoked_total"
    before = {
        r: sample_value(scrape(metrics), revoked, route=r) for r in ("live", "follow", "events")
    }
    mine = _streams(switchboard, doomed["token"], running_job)
    others = _streams(switchboard, kept["token"], running_job)
    try:
        # Both sets stay open while nothing happens (the ticks don't end them)...
        time.sleep(scaled(3))
        assert all(s.open for s in [*mine.values(), *others.values()])
        assert admin.delete(f"/api/v1/tokens/{doomed['id']}").status_code == 204
        for name, stream in mine.items():
            stream.join(scaled(15))
            assert not stream.open, f"the {name} stream stayed open after the revoke"
            assert stream.error is None, f"{name}: {stream.error!r}"
        # ...and the job they followed is still running: they did not end with it.
        assert admin.get(f"/api/v1/jobs/{running_job}").json()["phase"] == "running"
        assert all(s.open for s in others.values()), "another token's stream ended"

        assert b"started\n" in mine["follow"].body
        # The event streams say why they end; the output one never says `end`.
        for name in ("events", "live"):
            text = mine[name].body.decode()
            assert "event: revoked" in text, text[-500:]
            assert '"error":"unauthorized"' in text
        assert "event: end" not in mine["events"].body.decode()
        after = scrape(metrics)
        for route, count in before.items():
            assert sample_value(after, revoked, route=route) == count + 1, route
        again = switchboard.client(doomed["token"]).get(f"/api/v1/jobs/{running_job}")
        assert again.status_code == 401
    finally:
        for stream in [*mine.values(), *others.values()]:
            stream.close()
