"""A supervisor's metrics (`supervisor run --metrics-port`): names and types are pinned;
a real Wasm supervisor counts module cache hits and misses, backend errors by kind and
runs by outcome. And `--log-format json` on both processes: every log line is a JSON
object."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
import wasmtime
from prometheus_client import generate_latest

from common import logfmt
from connector import metrics as connector_metrics
from protocol.exceptions import JobError, JobErrorKind
from protocol.messages import RunRef, StartJob
from protocol.spec import NoopBackend as NoopSpec
from protocol.spec import WasmBackend as WasmSpec
from supervisor import metrics
from supervisor.backends.noop import NoopBackend
from supervisor.jobs import BackendSupervisor
from tests.harness import REPO, Switchboard, free_port, start_supervisor, wait_connected, wait_job
from tests.metric_names import SUPERVISOR_METRICS
from tests.recording import RecordingConnector
from tests.scrape import metric_types, sample_value, sample_value_or_zero, scrape, scrape_until

#: A WASI command that does nothing and exits 0.
EMPTY_COMMAND = '(module (func (export "_start")))'
#: What the switchboard prints on stdout (the harness copies it into the same log file).
_ANNOUNCED = ("switchboard listening on ", "  ")


@pytest.fixture(scope="module")
def switchboard(tmp_path_factory):
    server = Switchboard(
        tmp_path_factory.mktemp("supervisor-metrics") / "data",
        extra_args=("--log-format", "json"),
    )
    yield server
    server.stop()


def _upload(switchboard: Switchboard, content: bytes) -> str:
    response = switchboard.client().post("/api/v1/artifacts", content=content)
    assert response.status_code == 201, response.text
    return response.json()["digest"]


def _json_lines(path: Path, skip: tuple[str, ...] = ()) -> list[dict]:
    """Every line of a log file as JSON (lines starting with `skip` left out); fails on
    any line that is not a JSON object with the four fields."""
    entries = []
    for line in path.read_text().splitlines():
        if not line or line.startswith(skip):
            continue
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        assert {"ts", "level", "logger", "message"} <= entry.keys(), line
        assert entry["ts"].endswith("Z"), line
        entries.append(entry)
    return entries


@pytest.mark.unit
def test_metric_names_and_types_are_pinned():
    """The supervisor's own and its connector's: what `--metrics-port` serves together."""
    own = metric_types(generate_latest(metrics.REGISTRY).decode())
    link = metric_types(generate_latest(connector_metrics.REGISTRY).decode())
    assert not own.keys() & link.keys()
    assert own | link == SUPERVISOR_METRICS


def _errors() -> dict[str, float]:
    text = generate_latest(metrics.REGISTRY).decode()
    return {
        kind.value: sample_value(text, "supervisor_backend_errors_total", kind=kind.value)
        for kind in JobErrorKind
    }


@pytest.mark.unit
async def test_each_job_error_is_counted_once_by_the_supervisor(tmp_path):
    """A refusal (start_job raises) and a failure (the backend raises) count once each,
    where the supervisor decides them; the connector that reports them counts nothing."""

    class Missing(NoopBackend):
        async def run(self, ctx):
            raise JobError(JobErrorKind.IMAGE_NOT_FOUND, "no such image")

    sup = BackendSupervisor(Missing(), max_jobs=1, work_dir=tmp_path)
    rec = RecordingConnector(sup)
    before = _errors()
    await sup.start_job(StartJob(job_id="a", attempt=1, backend=NoopSpec()))
    assert await rec.wait_ended("a") == "rejected"
    wrong = StartJob(job_id="b", attempt=1, backend=WasmSpec(module="sha256:" + "0" * 64))
    with pytest.raises(JobError) as refused:
        await sup.start_job(wrong)
    # What the WebSocket connector does with a refusal: report it (not counted again).
    await rec.report_job_error(RunRef("b", 1), refused.value.kind, refused.value.description)
    after = _errors()
    grown = {kind: after[kind] - before[kind] for kind in after if after[kind] != before[kind]}
    assert grown == {"image_not_found": 1, "image_not_compatible": 1}


def test_wasm_supervisor_counts_cache_errors_and_outcomes(switchboard, work_dir):
    client = switchboard.client()
    empty = _upload(switchboard, bytes(wasmtime.wat2wasm(EMPTY_COMMAND)))
    broken = _upload(switchboard, b"this is not a wasm module")
    port = free_port()
    sup = start_supervisor(
        switchboard,
        work_dir,
        name="wasm-metrics",
        backend="wasm",
        extra_args=("--metrics-port", str(port), "--log-format", "json"),
    )
    sup_url = f"http://127.0.0.1:{port}/metrics"
    sb_url = f"{switchboard.url}/metrics"
    try:
        wait_connected(client, "wasm-metrics")
        first = scrape(sup_url)
        assert metric_types(first) == SUPERVISOR_METRICS
        assert sample_value(first, "supervisor_cache_lookups_total") == 0

        def submit(name: str, module: str) -> str:
            body = {"name": name, "backend": {"kind": "wasm", "module": module}}
            response = client.post("/api/v1/jobs", json=body)
            assert response.status_code == 201, response.text
            return response.json()["id"]

        # The same module twice: compiled once (a miss), then found compiled (a hit).
        for name in ("empty-1", "empty-2"):
            job = wait_job(client, submit(name, empty))
            assert job["phase"] == "succeeded", job
        job = wait_job(client, submit("broken", broken))
        assert job["phase"] == "rejected", job
        assert job["runs"][0]["error_kind"] == "image_invalid", job

        text = scrape_until(
            sup_url, lambda t: sample_value(t, "supervisor_running_jobs") == 0, "no run held"
        )
        lookups = "supervisor_cache_lookups_total"
        assert sample_value(text, lookups, cache="wasm_module", result="miss") == 2
        assert sample_value(text, lookups, cache="wasm_module", result="hit") == 1
        assert sample_value(text, lookups, cache="docker_image") == 0
        assert sample_value(text, "supervisor_backend_errors_total", kind="image_invalid") == 1
        assert sample_value(text, "supervisor_backend_errors_total") == 1
        assert sample_value(text, "supervisor_runs_ended_total", outcome="succeeded") == 2
        assert sample_value(text, "supervisor_runs_ended_total", outcome="rejected") == 1
        assert sample_value(text, "supervisor_runs_ended_total") == 3

        # The switchboard's view of the same runs, by backend kind and outcome.
        sb = scrape_until(
            sb_url,
            lambda t: sample_value(t, "switchboard_jobs", phase="rejected") == 1,
            "the rejected job counted",
        )
        runs = "switchboard_run_duration_seconds_count"
        assert sample_value(sb, runs, backend="wasm", outcome="succeeded") == 2
        assert sample_value(sb, runs, backend="wasm", outcome="rejected") == 1
        # The rejected run never ran: only the two others reached running.
        assert sample_value(sb, "switchboard_dispatch_latency_seconds_count", backend="wasm") == 2
        assert (
            sample_value_or_zero(sb, "switchboard_dispatch_latency_seconds_count", backend="noop")
            == 0
        )
    finally:
        sup.stop()

    supervisor_log = _json_lines(work_dir / "wasm-metrics.log")
    assert any(e["message"].startswith("connected to ") for e in supervisor_log), supervisor_log
    assert any(e["message"].startswith("metrics on http://") for e in supervisor_log)
    switchboard_log = _json_lines(switchboard.process.log_path, skip=_ANNOUNCED)
    assert any(
        e["logger"] == "switchboard.hub" and "wasm-metrics connected" in e["message"]
        for e in switchboard_log
    ), switchboard_log
    assert {e["level"] for e in switchboard_log} <= {"DEBUG", "INFO", "WARNING", "ERROR"}


@pytest.mark.unit
def test_json_formatter_keeps_one_line_per_record_with_the_traceback():
    stream = StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        logfmt.configure("json", stream=stream)
        log = logging.getLogger("switchboard.test")
        log.info("two\nlines, and ünïcode: %d", 42)
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("it failed")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "two\nlines, and ünïcode: 42"
    assert first["level"] == "INFO" and first["logger"] == "switchboard.test"
    assert "exc" not in first
    assert second["message"] == "it failed" and second["level"] == "ERROR"
    assert second["exc"].startswith("Traceback") and "ValueError: boom" in second["exc"]


@pytest.mark.process
def test_an_unknown_log_format_is_refused(tmp_path):
    """From the environment (argparse checks the flag itself): one line, exit status 1."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "SUPERVISOR_LOG_FORMAT": "yaml"}
    spec = tmp_path / "spec.json"
    spec.write_text('{"name": "x", "backend": {"kind": "noop"}}')
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "run-local", str(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 1
    assert "unknown log format 'yaml'" in done.stderr
