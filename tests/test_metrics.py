"""Prometheus metrics of the switchboard: names, types and labels are pinned, and real
processes count jobs, runs, output, connections, duplicates and reconnects. The
supervisor's own metrics are in test_supervisor_metrics.py; the helpers here serve both."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from protocol import codec
from protocol.exceptions import JobErrorKind, ProblemCode
from protocol.messages import (
    POWER_ACTIONS,
    STREAMS,
    Ack,
    Hello,
    JobStateChanged,
    Output,
    StopJob,
)
from protocol.spec import BACKEND_KINDS, JobSpec, NoopBackend
from protocol.state import TERMINAL, Phase
from protocol.versions import supported_versions
from switchboard.health import HEALTH_STATES
from switchboard.models import POWER_RESULTS
from tests.faults import FaultyProxy
from tests.harness import (
    Switchboard,
    free_port,
    start_supervisor,
    wait_connected,
    wait_for,
    wait_job,
)
from tests.metric_names import SUPERVISOR_METRICS
from tests.scrape import metric_types, sample_value, sample_value_or_zero, scrape, scrape_until
from tests.supervisor_ws import connect_ws, handshake

#: Every metric of the switchboard, as it appears in the exposition: name -> type.
SWITCHBOARD_METRICS = {
    "switchboard_supervisor_connections_total": "counter",
    "switchboard_supervisor_reconnects_total": "counter",
    "switchboard_sessions_replaced_total": "counter",
    "switchboard_supervisor_refusals_total": "counter",
    "switchboard_supervisor_enrolments_total": "counter",
    "switchboard_sessions_cut_total": "counter",
    "switchboard_protocol_errors_total": "counter",
    "switchboard_event_problems_total": "counter",
    "switchboard_seq_resyncs_total": "counter",
    "switchboard_supervisors_connected": "gauge",
    "switchboard_events_stored_total": "counter",
    "switchboard_duplicate_events_total": "counter",
    "switchboard_output_bytes_total": "counter",
    "switchboard_output_truncated_total": "counter",
    "switchboard_output_dropped_bytes_total": "counter",
    "switchboard_event_batch_seconds": "histogram",
    "switchboard_jobs": "gauge",
    "switchboard_queue_depth": "gauge",
    "switchboard_dispatch_latency_seconds": "histogram",
    "switchboard_run_duration_seconds": "histogram",
    "switchboard_runs_lost_total": "counter",
    "switchboard_zombie_runs_stopped_total": "counter",
    "switchboard_runs_placed_total": "counter",
    "switchboard_chained_jobs_total": "counter",
    "switchboard_groups_stopped_total": "counter",
    "switchboard_secrets_unreadable_total": "counter",
    "switchboard_submissions_refused_total": "counter",
    "switchboard_wait_refusals_total": "counter",
    "switchboard_job_waiters": "gauge",
    "switchboard_runs_undeliverable_total": "counter",
    "switchboard_specs_too_large_total": "counter",
    "switchboard_store_commit_seconds": "histogram",
    "switchboard_http_connections": "gauge",
    "switchboard_http_refusals_total": "counter",
    "switchboard_streams_revoked_total": "counter",
    "switchboard_retention_removed_total": "counter",
    "switchboard_stored_bytes": "gauge",
    "switchboard_artifact_refusals_total": "counter",
    "switchboard_artifact_cache_total": "counter",
    "switchboard_artifact_cache_evictions_total": "counter",
    "switchboard_artifact_cache_bytes": "gauge",
    "switchboard_upload_refusals_total": "counter",
    "switchboard_test_cases_total": "counter",
    "switchboard_reports_refused_total": "counter",
    "switchboard_output_files_total": "counter",
    "switchboard_devices": "gauge",
    "switchboard_device_health_changes_total": "counter",
    "switchboard_device_declarations_refused_total": "counter",
    "switchboard_health_checks_total": "counter",
    "switchboard_reservations": "gauge",
    "switchboard_reservation_wait_seconds": "histogram",
    "switchboard_reservation_refusals_total": "counter",
    "switchboard_power_calls_total": "counter",
    "switchboard_power_refusals_total": "counter",
    "switchboard_leader": "gauge",
    "switchboard_lease_changes_total": "counter",
    "switchboard_fenced_writes_total": "counter",
    "switchboard_supervisor_commands_total": "counter",
    "switchboard_sessions_reaped_total": "counter",
    "switchboard_console_refusals_total": "counter",
    "switchboard_console_sessions": "gauge",
    "switchboard_console_sessions_ended_total": "counter",
}
_OUTCOMES = {p.value for p in TERMINAL}
#: Every label a metric may carry, with every value it may take (bounded: no ids).
LABEL_VALUES: dict[str, set[str]] = {
    "via": {
        *("grace_period", "reconcile", "events", "submission", "pass", "placement", "status"),
        "group",
    },
    "stream": set(STREAMS),
    "phase": {p.value for p in Phase},
    "state": {
        *("ready", "backoff", "unschedulable", "connected", "draining"),
        *("waiting", "held", "released", "expired"),
    },
    "backend": {*BACKEND_KINDS, "other"},
    "outcome": _OUTCOMES | {"other", "kept", "refused", "not_uploaded", "invalid_path", "resolved"},
    "kind": {k.value for k in JobErrorKind},
    "cache": {"wasm_module", "docker_image", "input"},
    "result": {
        *("hit", "miss", "passed", "failed", "error", "skipped", "kept", "refused"),
        *("pass", "fail"),
        *POWER_RESULTS,
    },
    "action": set(POWER_ACTIONS),
    "change": {"gained", "lost"},
    "fence": {"term", "session"},
    "step": {"queued", "delivered", "answered"},
    "command": {"stop", "start", "power"},
    "limit": {"image_unpacked", "wasm_scratch", "inputs"},
    "reason": {
        "header_too_large",
        "header_timeout",
        "body_timeout",
        "connection_cap",
        "slow_head_evicted",
        "idle_evicted",
        "bad_request",
        "unauthorized",
        "other_supervisor",
        "no_credential_digest",
        "enrolled",
        "credential_taken",
        "token_revoked",
        "queue_full",
        "token_quota",
        "no_device",
        "heartbeat_timeout",
        "send_timeout",
        "outbox_full",
        "invalid_request",
        "too_large",
        "too_many_uploads",
        "partial_space",
        "quota",
        "offset_mismatch",
        "busy",
        "digest_mismatch",
        "wait_too_long",
        "too_many_ids",
        "no_ids",
        "unknown_ids",
        "forbidden",
        *("not_found", "no_console", "unavailable", "client", "supervisor", "too_slow"),
        "revoked",
    },
    "route": {"live", "follow", "events"},
    "health": set(HEALTH_STATES),
    # A device's class is the lab's own word, as bounded as its inventory.
    "class": {"simboard"},
    "what": {"job", "output", "artifact"},
    "why": {
        "cap",
        "deleted",
        "too_large",
        "quota",
        "in_use",
        "too_many_cases",
        "too_deep",
        "dtd",
        "not_xml",
        "not_junit",
        "crashed",
    },
    # Event problems by name; protocol errors by close code.
    "code": {c.value for c in ProblemCode} | {"1003", "1007", "1009", "4000", "4001", "4002"},
}


def _labels_seen(text: str) -> dict[str, set[str]]:
    """Label name -> the values it has in an exposition (le and quantile left out)."""
    seen: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for name, value in sample.labels.items():
                if name != "le":
                    seen.setdefault(name, set()).add(value)
    return seen


def _wait_value(url: str, name: str, at_least: float, timeout: float = 20.0) -> str:
    """Scrape until `name` reaches `at_least`; return that scrape."""
    return scrape_until(
        url, lambda t: sample_value_or_zero(t, name) >= at_least, f"{name} >= {at_least}", timeout
    )


def _noop_job(client: httpx.Client, name: str, **fields: object) -> str:
    backend = {"kind": "noop", **fields.pop("backend", {})}  # type: ignore[dict-item]
    response = client.post("/api/v1/jobs", json={"name": name, "backend": backend, **fields})
    assert response.status_code in (200, 201), response.text
    return response.json()["id"]


def _metrics_supervisor(switchboard: Switchboard, work_dir, name: str, **kwargs):
    """A noop supervisor serving its metrics; returns (process, its metrics URL)."""
    port = free_port()
    extra = ("--metrics-port", str(port), *kwargs.pop("extra_args", ()))
    sup = start_supervisor(
        switchboard, work_dir, name=name, backend="noop", extra_args=extra, **kwargs
    )
    return sup, f"http://127.0.0.1:{port}/metrics"


@pytest.fixture(scope="module")
def switchboard(tmp_path_factory):
    server = Switchboard(
        tmp_path_factory.mktemp("metrics") / "data",
        extra_args=("--heartbeat-interval", "0.25", "--heartbeat-timeout", "1.5"),
    )
    yield server
    server.stop()


@pytest.mark.unit
def test_metric_names_and_types_are_pinned():
    from switchboard.metrics import REGISTRY

    assert metric_types(generate_latest(REGISTRY).decode()) == SWITCHBOARD_METRICS


@pytest.mark.unit
def test_labels_are_bounded_words():
    """Every label value a fresh registry shows is from a fixed set (no ids), and no
    `*_created` series double the exposition."""
    from connector.metrics import REGISTRY as CONNECTOR_REGISTRY
    from supervisor.metrics import REGISTRY as SUPERVISOR_REGISTRY
    from switchboard.metrics import REGISTRY as SWITCHBOARD_REGISTRY

    for registry in (SWITCHBOARD_REGISTRY, SUPERVISOR_REGISTRY, CONNECTOR_REGISTRY):
        text = generate_latest(registry).decode()
        assert "_created" not in text
        for name, values in _labels_seen(text).items():
            assert name in LABEL_VALUES, name
            assert values <= LABEL_VALUES[name], (name, values - LABEL_VALUES[name])


@pytest.mark.unit
async def test_run_metrics_count_once_committed(tmp_path):
    """In-process store: what a rolled-back request staged is never observed; a run's
    running and its end each count once, after their transaction commits."""
    from switchboard.metrics import REGISTRY
    from switchboard.store import sqlite, sqlite_runs

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    store = sqlite.SQLiteStore(tmp_path / "switchboard.sqlite3")
    await store.open()
    try:
        hello = Hello(
            supervisor_id="s1", name="s1", versions=supported_versions(), backends=["noop"]
        )
        await store.supervisor_connected(hello)
        await store.create_job("job-1", JobSpec(name="one", backend=NoopBackend()))
        assert [a.job_id for a in await store.assign([("job-1", "s1")])] == ["job-1"]
        latency = "switchboard_dispatch_latency_seconds_count"
        duration = "switchboard_run_duration_seconds_count"
        commits = sample("switchboard_store_commit_seconds_count")
        latency_before = sample(latency, backend="noop")
        bucket = "switchboard_run_duration_seconds_bucket"
        under_1s = sample(bucket, backend="noop", outcome="succeeded", le="1.0")
        under_5s = sample(bucket, backend="noop", outcome="succeeded", le="5.0")

        def running_then_fail(conn) -> None:
            sqlite_runs.set_run_phase(conn, "job-1", 1, Phase.RUNNING, None, None, time.time())
            raise RuntimeError("undone")

        with pytest.raises(RuntimeError):
            await store._write(running_then_fail)
        assert await store.run_phase("job-1", 1) == Phase.ASSIGNED
        assert sample(latency, backend="noop") == latency_before

        now = time.time()
        events = [
            JobStateChanged(seq=1, job_id="job-1", attempt=1, phase=Phase.RUNNING, at=now),
            JobStateChanged(seq=2, job_id="job-1", attempt=1, phase=Phase.SUCCEEDED, at=now + 2),
        ]
        await store.apply_events("s1", events)
        assert sample(latency, backend="noop") == latency_before + 1
        ended = sample(duration, backend="noop", outcome="succeeded")
        assert ended >= 1
        # The duration is the supervisor's: 2 s from its running to its end.
        assert sample(bucket, backend="noop", outcome="succeeded", le="1.0") == under_1s
        assert sample(bucket, backend="noop", outcome="succeeded", le="5.0") == under_5s + 1
        # The failed request was alone in its transaction, which was rolled back, not
        # committed: only the events' transaction counts.
        assert sample("switchboard_store_commit_seconds_count") == commits + 1
        # A resend of the same events changes nothing.
        await store.apply_events("s1", events)
        assert sample(duration, backend="noop", outcome="succeeded") == ended

        counts = await store.counts()
        assert counts.jobs == {"succeeded": 1}
        assert counts.queued == {}
        assert counts.drained == []
    finally:
        await store.close()


def test_scrape_after_jobs(switchboard, work_dir):
    """Five noop jobs exit 0 and one exits 1 on a real supervisor: both scrapes count them."""
    client = switchboard.client()
    url = f"{switchboard.url}/metrics"
    before = scrape(url)
    # The switchboard's is fixed (prometheus_client's own server, the supervisor's, negotiates).
    assert httpx.get(url).headers["content-type"] == CONTENT_TYPE_LATEST
    assert metric_types(before) == SWITCHBOARD_METRICS
    sup, sup_url = _metrics_supervisor(switchboard, work_dir, "metrics-jobs")
    try:
        wait_connected(client, "metrics-jobs")
        assert metric_types(scrape(sup_url)) == SUPERVISOR_METRICS
        jobs = [_noop_job(client, f"m{i}", backend={"output": f"out {i}\n"}) for i in range(5)]
        failing = _noop_job(client, "m-fail", backend={"output": "bad\n", "exit_code": 1})
        events = 0
        for job_id in [*jobs, failing]:
            job = wait_job(client, job_id)
            assert job["phase"] == ("failed" if job_id == failing else "succeeded"), job
            # Each phase but `assigned` (the switchboard's own) came as an event, and so
            # did the output chunk and the exit status.
            phases = [p["phase"] for p in job["runs"][0]["phases"]]
            events += len([p for p in phases if p != "assigned"]) + 2

        def grew(text: str, name: str, **labels: str) -> float:
            return sample_value_or_zero(text, name, **labels) - sample_value_or_zero(
                before, name, **labels
            )

        def settled(text: str) -> bool:
            return (
                grew(text, "switchboard_events_stored_total") >= events
                and grew(text, "switchboard_jobs", phase="succeeded") == 5
            )

        text = scrape_until(url, settled, "the six jobs counted")
        assert grew(text, "switchboard_events_stored_total") == events
        assert grew(text, "switchboard_jobs", phase="failed") == 1
        assert sample_value(text, "switchboard_queue_depth") == 0
        runs = "switchboard_run_duration_seconds_count"
        assert grew(text, runs, backend="noop", outcome="succeeded") == 5
        assert grew(text, runs, backend="noop", outcome="failed") == 1
        assert grew(text, runs) == 6
        assert grew(text, "switchboard_dispatch_latency_seconds_count", backend="noop") == 6
        assert grew(text, "switchboard_output_bytes_total", stream="stdout") == 5 * 6 + 4
        assert grew(text, "switchboard_output_bytes_total", stream="stderr") == 0
        assert sample_value(text, "switchboard_supervisors_connected", state="connected") == 1
        assert sample_value(text, "switchboard_supervisors_connected", state="draining") == 0
        assert grew(text, "switchboard_supervisor_connections_total") == 1
        assert grew(text, "switchboard_supervisor_reconnects_total") == 0
        assert grew(text, "switchboard_event_batch_seconds_count") >= 1
        assert grew(text, "switchboard_store_commit_seconds_count") >= 1
        assert grew(text, "switchboard_duplicate_events_total") == 0
        assert sample_value(text, "switchboard_runs_lost_total") == 0

        sup_text = scrape_until(
            sup_url, lambda t: sample_value(t, "supervisor_running_jobs") == 0, "no run held"
        )
        assert sample_value(sup_text, "supervisor_runs_ended_total", outcome="succeeded") == 5
        assert sample_value(sup_text, "supervisor_runs_ended_total", outcome="failed") == 1
        assert sample_value(sup_text, "supervisor_runs_ended_total") == 6
        assert sample_value(sup_text, "supervisor_backend_errors_total") == 0
        assert sample_value(sup_text, "supervisor_cache_lookups_total") == 0  # noop has no cache
        assert sample_value(sup_text, "supervisor_reconnects_total") == 0
        assert sample_value(sup_text, "supervisor_events_resent_total") == 0

        # A drained supervisor is still connected, as `draining`.
        assert client.post("/api/v1/supervisors/metrics-jobs/drain").status_code == 200
        scrape_until(
            url,
            lambda t: (
                sample_value(t, "switchboard_supervisors_connected", state="draining") == 1
                and sample_value(t, "switchboard_supervisors_connected", state="connected") == 0
            ),
            "the supervisor counted as draining",
        )
        assert client.post("/api/v1/supervisors/metrics-jobs/resume").status_code == 200
    finally:
        sup.stop()
    scrape_until(
        url,
        lambda t: sample_value(t, "switchboard_supervisors_connected") == 0,
        "the gauge to drop when the supervisor left",
    )


def test_queue_depth_by_state(switchboard, work_dir):
    """Queued jobs: one waiting out a restart backoff, one no supervisor matches, one ready
    while dispatch is paused."""
    client = switchboard.client()
    url = f"{switchboard.url}/metrics"
    before = scrape(url)
    latency_before = sample_value_or_zero(before, "switchboard_dispatch_latency_seconds_count")
    sup, _ = _metrics_supervisor(switchboard, work_dir, "metrics-queue")
    cancel = []
    try:
        wait_connected(client, "metrics-queue")
        restart = {"policy": "on_failure", "backoff": {"first_s": 3600, "jitter": "none"}}
        backoff = _noop_job(client, "m-backoff", backend={"exit_code": 1}, restart=restart)
        cancel.append(backoff)
        nowhere = _noop_job(client, "m-nowhere", selector={"match_labels": {"pool": "nowhere"}})
        cancel.append(nowhere)
        wait_for(
            lambda: client.get(f"/api/v1/jobs/{nowhere}").json().get("unschedulable"),
            "the job marked unschedulable",
        )
        assert client.post("/api/v1/dispatch/pause").status_code == 200
        ready = _noop_job(client, "m-ready")
        cancel.append(ready)
        text = scrape_until(
            url,
            lambda t: (
                [sample_value(t, "switchboard_queue_depth", state=s) for s in ("ready", "backoff")]
                == [1, 1]
            ),
            "one ready and one backing off",
        )
        assert sample_value(text, "switchboard_queue_depth", state="unschedulable") == 1
        assert sample_value(text, "switchboard_jobs", phase="queued") == 3
        # The backoff job ran once (and failed) before it was queued again.
        assert (
            sample_value(text, "switchboard_dispatch_latency_seconds_count") == latency_before + 1
        )
    finally:
        for job_id in cancel:
            client.post(f"/api/v1/jobs/{job_id}/cancel")
        client.post("/api/v1/dispatch/resume")
        sup.stop()
    scrape_until(
        url,
        lambda t: (
            sample_value(t, "switchboard_queue_depth") == 0
            and sample_value(t, "switchboard_jobs", phase="queued") == 0
        ),
        "the queue empty after the cancels",
    )


async def test_resends_replacements_and_zombies_are_counted(switchboard):
    """Raw protocol: events for a run nobody assigned (each refused: a StopJob), then the
    same seqs again (duplicates), then a second connection (a replacement)."""
    metrics_url = f"{switchboard.url}/metrics"
    before = await asyncio.to_thread(scrape, metrics_url)
    token = switchboard.create_token("supervisor", "metrics-raw")

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

    async with connect_ws(switchboard, token) as ws:
        await handshake(ws, "metrics-raw")
        for seq in (1, 2):
            await ws.send(output(seq), text=True)
        await until_ack(ws, 2)
        for seq in (1, 2, 3):  # a resend of 1 and 2, and one new event
            await ws.send(output(seq), text=True)
        await until_ack(ws, 3)
        async with connect_ws(switchboard, token) as newer:
            welcome = await handshake(newer, "metrics-raw")
            assert welcome.last_seq == 3
    after = await asyncio.to_thread(scrape, metrics_url)

    def grew(name: str, **labels: str) -> float:
        return sample_value(after, name, **labels) - sample_value(before, name, **labels)

    assert grew("switchboard_events_stored_total") == 3
    assert grew("switchboard_duplicate_events_total") == 2
    assert grew("switchboard_output_bytes_total", stream="stdout") == 3  # new events only
    assert grew("switchboard_zombie_runs_stopped_total", via="events") == 3
    assert grew("switchboard_supervisor_connections_total") == 2
    assert grew("switchboard_supervisor_reconnects_total") == 1
    assert grew("switchboard_sessions_replaced_total") == 1


def test_reconnect_is_counted_on_both_sides(switchboard, work_dir):
    client = switchboard.client()
    switchboard_metrics = f"{switchboard.url}/metrics"
    proxy = FaultyProxy(switchboard.port)
    sup, supervisor_metrics = _metrics_supervisor(
        switchboard, work_dir, "metrics-cut", url=f"ws://127.0.0.1:{proxy.port}"
    )
    try:
        wait_connected(client, "metrics-cut")
        first = scrape(switchboard_metrics)
        text = scrape(supervisor_metrics)
        assert metric_types(text) == SUPERVISOR_METRICS
        assert sample_value(text, "supervisor_reconnects_total") == 0

        job_id = _noop_job(
            client, "cut-mid-job", backend={"output": "before the cut\n", "delay_s": 2.0}
        )
        _wait_value(supervisor_metrics, "supervisor_running_jobs", 1)
        assert proxy.cut() == 1
        _wait_value(supervisor_metrics, "supervisor_reconnects_total", 1)
        job = wait_job(client, job_id)
        assert job["phase"] == "succeeded", job

        text = scrape(supervisor_metrics)
        assert sample_value(text, "supervisor_reconnects_total") >= 1
        _wait_value(
            switchboard_metrics,
            "switchboard_supervisor_reconnects_total",
            sample_value(first, "switchboard_supervisor_reconnects_total") + 1,
        )
        # Everything sent is acknowledged in the end; nothing is held any more.
        scrape_until(
            supervisor_metrics,
            lambda t: (
                sample_value(t, "supervisor_backlog_bytes") == 0
                and sample_value(t, "supervisor_running_jobs") == 0
            ),
            "an empty backlog and no run held",
            timeout=10,
        )
        assert sample_value(scrape(supervisor_metrics), "supervisor_runs_ended_total") == 1
        assert proxy.accepted >= 2
    finally:
        sup.stop()
        proxy.close()
