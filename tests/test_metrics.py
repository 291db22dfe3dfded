"""Prometheus metrics of the delivery guarantees: names and types are pinned, and real
processes count connections, stored events, duplicates and reconnects."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from protocol import codec
from protocol.messages import Ack, Output, StopJob
from tests.faults import FaultyProxy
from tests.harness import Switchboard, scaled, start_supervisor, wait_connected, wait_job
from tests.test_bad_input import _handshake, _ws

#: Every metric, as it appears in the exposition: sample name -> family type.
SWITCHBOARD_METRICS = {
    "switchboard_supervisor_connections_total": "counter",
    "switchboard_sessions_replaced_total": "counter",
    "switchboard_events_stored_total": "counter",
    "switchboard_duplicate_events_total": "counter",
    "switchboard_runs_lost_total": "counter",
    "switchboard_zombie_runs_stopped_total": "counter",
    "switchboard_supervisors_connected": "gauge",
    "switchboard_store_commit_seconds": "histogram",
}
SUPERVISOR_METRICS = {
    "supervisor_reconnects_total": "counter",
    "supervisor_events_resent_total": "counter",
    "supervisor_backlog_bytes": "gauge",
    "supervisor_running_jobs": "gauge",
}


def _types(text: str) -> dict[str, str]:
    """Sample name (counters with their _total, histograms by family) -> type. The
    `_created` timestamps prometheus_client adds (as gauges in this format) are left out."""
    found = {}
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):
            continue
        if family.type == "counter":
            found[family.name + "_total"] = family.type
        else:
            found[family.name] = family.type
    return found


def _value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    total = 0.0
    seen = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
                seen = True
    assert seen, f"no sample {name} {labels} in:\n{text}"
    return total


def _scrape(url: str) -> str:
    response = httpx.get(url, timeout=10)  # no token: metrics are open, like health
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return response.text


def _wait_value(url: str, name: str, at_least: float, timeout: float = 20.0) -> str:
    """Scrape until `name` reaches `at_least`; return that scrape."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        text = _scrape(url)
        if _value(text, name) >= at_least:
            return text
        assert time.monotonic() < deadline, f"{name} stayed below {at_least}:\n{text}"
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _noop_job(client: httpx.Client, name: str, **backend: object) -> str:
    response = client.post(
        "/api/v1/jobs", json={"name": name, "backend": {"kind": "noop", **backend}}
    )
    assert response.status_code in (200, 201), response.text
    return response.json()["id"]


@pytest.fixture(scope="module")
def switchboard(tmp_path_factory):
    server = Switchboard(
        tmp_path_factory.mktemp("metrics") / "data",
        extra_args=("--heartbeat-interval", "0.25", "--heartbeat-timeout", "1.5"),
    )
    yield server
    server.stop()


def test_metric_names_and_types_are_pinned():
    from supervisor.metrics import REGISTRY as SUPERVISOR_REGISTRY
    from switchboard.metrics import REGISTRY as SWITCHBOARD_REGISTRY

    assert _types(generate_latest(SWITCHBOARD_REGISTRY).decode()) == SWITCHBOARD_METRICS
    assert _types(generate_latest(SUPERVISOR_REGISTRY).decode()) == SUPERVISOR_METRICS


def test_no_label_names_an_id():
    from supervisor.metrics import REGISTRY as SUPERVISOR_REGISTRY
    from switchboard.metrics import REGISTRY as SWITCHBOARD_REGISTRY

    allowed = {"via", "le"}
    for registry in (SWITCHBOARD_REGISTRY, SUPERVISOR_REGISTRY):
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            for sample in family.samples:
                assert set(sample.labels) <= allowed, sample


def test_scrape_after_jobs(switchboard, work_dir):
    client = switchboard.client()
    metrics_url = f"{switchboard.url}/metrics"
    first = _scrape(metrics_url)
    # The switchboard's is fixed (prometheus_client's own server, the supervisor's, negotiates).
    assert httpx.get(metrics_url).headers["content-type"] == CONTENT_TYPE_LATEST
    assert _types(first) == SWITCHBOARD_METRICS
    sup = start_supervisor(switchboard, work_dir, name="metrics-jobs", backend="noop")
    try:
        wait_connected(client, "metrics-jobs")
        jobs = [_noop_job(client, f"m{i}", output=f"out {i}\n") for i in range(5)]
        events = 0
        for job_id in jobs:
            job = wait_job(client, job_id)
            assert job["phase"] == "succeeded", job
            # Each phase but `assigned` (the switchboard's own) came as an event, and so
            # did the output chunk and the exit status.
            phases = [p["phase"] for p in job["runs"][0]["phases"]]
            events += len([p for p in phases if p != "assigned"]) + 2
        text = _wait_value(metrics_url, "switchboard_events_stored_total", events)
        print(f"{events} events expected, {_value(text, 'switchboard_events_stored_total')} stored")
        assert _value(text, "switchboard_supervisor_connections_total") >= 1
        assert _value(text, "switchboard_supervisors_connected") == 1
        assert _value(text, "switchboard_store_commit_seconds_count") >= 1
        assert _value(text, "switchboard_duplicate_events_total") == 0
        assert _value(text, "switchboard_runs_lost_total") == 0
    finally:
        sup.stop()
    deadline = time.monotonic() + scaled(10)
    while _value(_scrape(metrics_url), "switchboard_supervisors_connected") != 0:
        assert time.monotonic() < deadline, "the gauge did not drop when the supervisor left"
        time.sleep(0.05)


async def test_resends_replacements_and_zombies_are_counted(switchboard):
    """Raw protocol: events for a run nobody assigned (each refused: a StopJob), then the
    same seqs again (duplicates), then a second connection (a replacement)."""
    metrics_url = f"{switchboard.url}/metrics"
    before = await asyncio.to_thread(_scrape, metrics_url)
    token = switchboard.create_token("supervisor")

    def output(seq: int) -> bytes:
        event = Output(seq=seq, job_id="nobody", attempt=1, stream="stdout", offset=0, data=b"x")
        return codec.encode(event)

    async def until_ack(ws, seq: int) -> int:
        stops = 0
        while True:
            message = codec.decode_from_switchboard(await ws.recv(decode=False))
            stops += isinstance(message, StopJob)
            if isinstance(message, Ack) and message.seq >= seq:
                return stops

    async with _ws(switchboard, token) as ws:
        await _handshake(ws, "metrics-raw")
        for seq in (1, 2):
            await ws.send(output(seq), text=True)
        await until_ack(ws, 2)
        for seq in (1, 2, 3):  # a resend of 1 and 2, and one new event
            await ws.send(output(seq), text=True)
        await until_ack(ws, 3)
        async with _ws(switchboard, token) as newer:
            welcome = await _handshake(newer, "metrics-raw")
            assert welcome.last_seq == 3
    after = await asyncio.to_thread(_scrape, metrics_url)

    def grew(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert grew("switchboard_events_stored_total") == 3
    assert grew("switchboard_duplicate_events_total") == 2
    assert grew("switchboard_zombie_runs_stopped_total", via="events") == 3
    assert grew("switchboard_supervisor_connections_total") == 2
    assert grew("switchboard_sessions_replaced_total") == 1


def test_reconnect_is_counted_on_both_sides(switchboard, work_dir):
    client = switchboard.client()
    switchboard_metrics = f"{switchboard.url}/metrics"
    proxy = FaultyProxy(switchboard.port)
    port = _free_port()
    sup = start_supervisor(
        switchboard,
        work_dir,
        name="metrics-cut",
        backend="noop",
        url=f"ws://127.0.0.1:{proxy.port}",
        extra_args=("--metrics-port", str(port)),
    )
    supervisor_metrics = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_connected(client, "metrics-cut")
        connections = _value(
            _scrape(switchboard_metrics), "switchboard_supervisor_connections_total"
        )
        text = _scrape(supervisor_metrics)
        assert _types(text) == SUPERVISOR_METRICS
        assert _value(text, "supervisor_reconnects_total") == 0

        job_id = _noop_job(client, "cut-mid-job", output="before the cut\n", delay_s=2.0)
        _wait_value(supervisor_metrics, "supervisor_running_jobs", 1)
        assert proxy.cut() == 1
        _wait_value(supervisor_metrics, "supervisor_reconnects_total", 1)
        job = wait_job(client, job_id)
        assert job["phase"] == "succeeded", job

        text = _scrape(supervisor_metrics)
        assert _value(text, "supervisor_reconnects_total") >= 1
        _wait_value(
            switchboard_metrics, "switchboard_supervisor_connections_total", connections + 1
        )
        # Everything sent is acknowledged in the end; nothing is held any more.
        deadline = time.monotonic() + scaled(10)
        while True:
            text = _scrape(supervisor_metrics)
            if (
                _value(text, "supervisor_backlog_bytes") == 0
                and _value(text, "supervisor_running_jobs") == 0
            ):
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.05)
        assert proxy.accepted >= 2
    finally:
        sup.stop()
        proxy.close()
