"""Following output as server-sent events (for browsers): every byte arrives base64-encoded
with its offset, the stream ends with an `end` event, and a reconnect with Last-Event-ID
resumes exactly where the last event stopped."""

from __future__ import annotations

import base64
import json

import pytest

from tests.harness import start_supervisor, wait_connected, wait_job

OUTPUT = "line one\nline two ünïcode\n"


@pytest.fixture(scope="module")
def finished_job(switchboard, work_dir):
    supervisor = start_supervisor(switchboard, work_dir, name="sse-noop", backend="noop")
    client = switchboard.client()
    try:
        wait_connected(client, "sse-noop")
        spec = {"name": "talks", "backend": {"kind": "noop", "delay_s": 0.2, "output": OUTPUT}}
        job_id = client.post("/api/v1/jobs", json=spec).json()["id"]
        assert wait_job(client, job_id)["phase"] == "succeeded"
        yield job_id
    finally:
        supervisor.stop()


def _events(response) -> list[dict]:
    """Parse a text/event-stream body into {event, id, data} dicts."""
    events = []
    for block in response.text.replace("\r\n", "\n").split("\n\n"):
        fields: dict = {}
        for line in block.splitlines():
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        if "data" in fields:
            events.append(fields)
    return events


def _get(switchboard, job_id: str, **headers: str):
    with switchboard.client() as client:
        return client.get(f"/api/v1/jobs/{job_id}/output/events", headers=headers)


def test_events_carry_every_byte_and_end_with_the_phase(switchboard, finished_job):
    response = _get(switchboard, finished_job)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _events(response)
    outputs = [e for e in events if e["event"] == "output"]
    data = b""
    for event in outputs:
        chunk = json.loads(event["data"])
        assert chunk["offset"] == len(data) and chunk["attempt"] == 1
        data += base64.b64decode(chunk["data"])
        assert event["id"] == f"1:{len(data)}"
    assert data == OUTPUT.encode()
    assert events[-1]["event"] == "end"
    assert json.loads(events[-1]["data"]) == {"attempt": 1, "phase": "succeeded"}


def test_last_event_id_resumes_where_the_stream_stopped(switchboard, finished_job):
    events = _events(_get(switchboard, finished_job, **{"Last-Event-ID": "1:5"}))
    first = json.loads(events[0]["data"])
    assert first["offset"] == 5
    rest = b"".join(
        base64.b64decode(json.loads(e["data"])["data"]) for e in events if e["event"] == "output"
    )
    assert rest == OUTPUT.encode()[5:]


def test_unknown_job_is_404(switchboard):
    response = _get(switchboard, "no-such-job")
    assert response.status_code == 404 and response.json()["error"] == "not_found"
