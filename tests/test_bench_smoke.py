"""The benchmarks run with tiny sizes (--quick) and report sane numbers under the keys
docs/performance.md and bench/README.md document, so they don't rot. Benchmarks are not
tests: no figure is held to its goal here, only to being measured."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.harness import run_cli, scaled

pytestmark = [
    pytest.mark.bench,
    pytest.mark.process,
    pytest.mark.docker,
    pytest.mark.wasm,
    pytest.mark.postgres,
    pytest.mark.timeout(500),
]

#: What each benchmark of `python -m bench` reports, its floors included.
SUITE_RESULTS = {
    "latency": {
        "latency_response_p50_ms",
        "latency_response_p99_ms",
        "latency_dispatch_p50_ms",
        "latency_dispatch_p99_ms",
        "latency_running_p50_ms",
        "latency_running_p99_ms",
        "latency_succeeded_p50_ms",
        "latency_succeeded_p99_ms",
        "latency_live_succeeded_ms",
        "floor_ws_echo_p50_ms",
        "floor_ws_echo_p99_ms",
    },
    "output": {
        "output_stored_mb_s",
        "output_follower_mb_s",
        "output_lag_p50_ms",
        "output_lag_p99_ms",
        "output_lag_max_ms",
        "floor_ws_stream_mb_s",
        "floor_sqlite_output_mb_s",
    },
    "dispatch": {
        f"dispatch_{mode}_{what}"
        for mode in ("batch", "single")
        for what in (
            "jobs_per_s",
            "submit_per_s",
            "switchboard_cpu_ms_per_job",
            "fleet_cpu_ms_per_job",
        )
    }
    | {"floor_sqlite_job_inserts_per_s", "floor_http_health_per_s"},
    "upload": {
        "upload_mb_s",
        "upload_switchboard_cpu_ms_per_mb",
        "upload_host_cpu_ms_per_mb",
        "upload_output_alone_mb_s",
        "upload_output_during_mb_s",
        "upload_during_output_mb_s",
        "upload_output_during_copy_mb_s",
        "floor_local_copy_mb_s",
    },
    "peer": {
        f"peer_{side}_{what}"
        for side in ("switchboard", "celery")
        for what in ("loop_jobs_per_s", "loop_p50_ms", "loop_p99_ms", "idle_p50_ms", "idle_p99_ms")
    }
    | {
        f"peer_client_{what}"
        for what in ("loop_jobs_per_s", "loop_p50_ms", "loop_p99_ms", "idle_p50_ms", "idle_p99_ms")
    }
    | {
        "peer_switchboard_loop_cpu_ms_per_job",
        "peer_client_loop_cpu_ms_per_job",
        "peer_waiters_cpu_pct",
        "peer_waiters_cost_cpu_pct",
        "peer_waiters_idle_cpu_pct",
        "peer_waiters_rss_mib",
        "peer_waiters_idle_rss_mib",
        "peer_waiters_rss_kib_per_waiter",
    },
    "replicas": {
        f"replicas_{store}_{mode}_{what}"
        for store in ("sqlite", "pg1", "pg2")
        for mode in ("single", "batch")
        for what in ("jobs_per_s", "cpu_ms_per_job")
    }
    | {f"replicas_{store}_single_server_cpu_ms_per_job" for store in ("pg1", "pg2")}
    | {f"replicas_{store}_batch_server_cpu_ms_per_job" for store in ("pg1", "pg2")}
    | {
        "floor_pg_wal_flush_ms",
        "floor_pg_round_trip_ms",
        "replicas_pg1_idle_succeeded_p50_ms",
        "replicas_pg1_idle_succeeded_p99_ms",
        "replicas_pg1_async_idle_succeeded_p50_ms",
        "replicas_pg1_async_idle_succeeded_p99_ms",
        "replicas_failover_reconnected_s",
        "replicas_failover_first_job_s",
    },
    "scale": {
        "scale_rss_kib_per_conn",
        "scale_cpu_pct",
        "scale_quiet_cpu_pct",
        "scale_heartbeat_cpu_pct",
        "scale_us_per_heartbeat",
        "scale_warm_cpu_pct",
        "scale_connects_per_s",
        "floor_raw_rss_kib_per_conn",
        "floor_raw_cpu_pct",
        "floor_raw_us_per_heartbeat",
    },
    "wasm": {"wasm_start_cached_ms", "floor_wasm_bare_ms"},
    "docker": {"docker_job_ms", "floor_docker_run_ms"},
}
#: Differences of two measurements (heartbeats = with them - without them).
DIFFERENCES = {"scale_heartbeat_cpu_pct", "scale_us_per_heartbeat"}
#: Differences near nothing (what waiting costs): noise may make them negative.
NEAR_ZERO = {"peer_waiters_cost_cpu_pct", "peer_waiters_rss_kib_per_waiter"}
#: Rows with a goal: each must carry a verdict (and a ratio where it has a floor).
GOALS = {
    "latency_succeeded_p50_ms",
    "latency_succeeded_p99_ms",
    "output_stored_mb_s",
    "output_lag_p99_ms",
    "dispatch_batch_jobs_per_s",
    "dispatch_single_jobs_per_s",
    "upload_output_during_mb_s",
    "peer_client_loop_jobs_per_s",
    "peer_switchboard_idle_p50_ms",
    "peer_switchboard_idle_p99_ms",
    "peer_waiters_cost_cpu_pct",
    "replicas_pg2_single_jobs_per_s",
    "replicas_pg1_idle_succeeded_p50_ms",
    "replicas_pg1_idle_succeeded_p99_ms",
    "replicas_failover_reconnected_s",
    "scale_rss_kib_per_conn",
    "wasm_start_cached_ms",
    "docker_job_ms",
}


def _suite(tmp: Path, *args: str) -> tuple[dict[str, Any], str]:
    saved, table = tmp / "suite.json", tmp / "suite.md"
    done = run_cli(
        *("-m", "bench", "--quick", "--json", str(saved), "--markdown", str(table), *args),
        check=False,
        timeout=scaled(400),
    )
    assert done.returncode == 0, done.stderr.decode()[-4000:]
    data = json.loads(saved.read_text())
    data["markdown"] = table.read_text()
    return data, done.stdout.decode()


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    return _suite(tmp_path_factory.mktemp("bench"))


def _sane(name: str, s: dict[str, Any]) -> None:
    values = [s[k] for k in ("median", "p25", "p75", "p90", "p99", "min", "max")]
    assert all(math.isfinite(v) for v in values), name
    assert s["n"] >= 1, name
    assert s["min"] <= s["p25"] <= s["median"] <= s["p75"] <= s["max"], name
    if name in NEAR_ZERO:
        pass  # finite and ordered is all
    elif name in DIFFERENCES:
        assert s["median"] > 0, name  # single windows may dip below the other run's median
    elif "cpu" in name or "per_heartbeat" in name:
        # CPU time comes in 10 ms ticks: a tiny run may not use one.
        assert s["min"] >= 0, name
    else:
        assert s["min"] > 0, name  # times, rates, sizes: all positive


@pytest.mark.parametrize("benchmark", sorted(SUITE_RESULTS))
def test_each_benchmark_reports_sane_figures(
    suite: tuple[dict[str, Any], str], benchmark: str
) -> None:
    data, _ = suite
    # The test setup provides Docker, the WASI toolchain and the rest: nothing may be left out.
    assert benchmark not in data["skipped"], data["skipped"][benchmark]
    results = data["results"]
    expected = SUITE_RESULTS[benchmark]
    assert expected <= set(results), expected - set(results)
    for name in expected:
        _sane(name, results[name])


def test_figures_are_consistent(suite: tuple[dict[str, Any], str]) -> None:
    results = {k: v["median"] for k, v in suite[0]["results"].items()}
    # One job's marks come in this order, so do the percentiles of each repetition.
    assert (
        results["latency_dispatch_p50_ms"]
        <= results["latency_running_p50_ms"]
        <= results["latency_succeeded_p50_ms"]
    )
    for prefix in ("latency_succeeded", "floor_ws_echo", "output_lag"):
        assert results[f"{prefix}_p50_ms"] <= results[f"{prefix}_p99_ms"], prefix
    # Jobs end after they were submitted.
    for mode in ("batch", "single"):
        assert results[f"dispatch_{mode}_jobs_per_s"] <= results[f"dispatch_{mode}_submit_per_s"]


def test_one_table_with_ratios_and_verdicts(suite: tuple[dict[str, Any], str]) -> None:
    data, stdout = suite
    assert stdout.splitlines()[0].startswith("machine: ")
    assert "measure" in stdout and "ratio" in stdout and "ok?" in stdout
    rows = {row["key"]: row for row in data["rows"]}
    for row in rows.values():
        assert row["label"] in stdout, row["label"]
    assert not data["skipped"], data["skipped"]
    for key in GOALS:
        row = rows[key]
        assert row["goal"] and isinstance(row["met"], bool), row
        if row["floor"] is not None:
            assert row["ratio"] == pytest.approx(row["median"] / row["floor"]), row
    assert data["machine"]["nproc"] >= 1 and data["machine"]["kernel"]
    # The same rows as a Markdown table (what docs/performance.md holds).
    markdown = data["markdown"].splitlines()
    assert markdown[0].startswith("| measure |") and len(markdown) == 2 + len(rows)


def test_only_runs_the_named_benchmark(tmp_path: Path) -> None:
    data, stdout = _suite(tmp_path, "--only", "wasm")
    assert set(data["results"]) == SUITE_RESULTS["wasm"]
    assert "wasm start, cached module" in stdout and "no-op jobs" not in stdout


def test_profile_summary_leaves_out_waiting_threads() -> None:
    """bench.profile's reading of py-spy's raw output (py-spy itself is not installed
    for the tests): waiting leaves are not busy, own time goes to the leaf frame."""
    from bench.profile import summarize

    raw = [
        "thread (1): MainThread;Runner.run (/x/lib/python3.11/asyncio/runners.py:118) 50",
        "thread (1): MainThread;Runner.run (/x/lib/python3.11/asyncio/runners.py:118);"
        "_read_loop (/w/switchboard/sessions.py:148) 30",
        "thread (2): sqlite-writer;run (/w/switchboard/store/sqlite_engine.py:123);"
        "_set_run_phase (/w/switchboard/store/sqlite.py:881) 15",
        "thread (2): sqlite-writer;_Writer.run (/w/switchboard/store/sqlite_engine.py:60) 40",
        "thread (3): sqlite-read_0;_worker (/x/lib/python3.11/concurrent/futures/thread.py:81) 9",
        "",
    ]
    summary = summarize(raw)
    assert (summary.busy, summary.idle) == (45, 99)
    assert summary.threads == {"MainThread": 30, "sqlite-writer": 15}
    assert summary.own.most_common(1) == [("switchboard/sessions.py:_read_loop", 30)]
    assert "66.7%  switchboard/sessions.py:_read_loop" in summary.report(5)


# --- bench.wasm_start on its own (the suite's wasm rows come from it) --------------------

WASM_START_RESULTS = {
    "start_cached_ms",
    "start_cached_to_starting_ms",
    "start_cached_to_running_ms",
    "floor_ms",
    "start_uncached_ms",
    "floor_uncached_ms",
    "inprocess_jobs_per_s",
    "inprocess_cpu_ms_per_job",
    "inprocess_refused_starts",
    "floor_sequential_runs_per_s",
    "e2e_jobs_per_s",
    "e2e_submit_per_s",
    "e2e_switchboard_cpu_ms_per_job",
    "e2e_supervisor_cpu_ms_per_job",
    "e2e_extra_attempts",
}
WASM_START_RATIOS = {
    "start_cached_vs_floor",
    "start_uncached_vs_floor_uncached",
    "start_uncached_vs_floor",
    "inprocess_vs_floor_rate",
    "e2e_vs_floor_rate",
}


def test_wasm_start_quick_run_reports_sane_numbers(tmp_path: Path) -> None:
    saved = tmp_path / "results.json"
    done = run_cli("-m", "bench.wasm_start", "--quick", "--json", str(saved), check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert "start latency, cached" in done.stdout.decode()

    data = json.loads(saved.read_text())
    assert data["machine"]["nproc"] >= 1 and data["machine"]["wasmtime_py"]
    results = data["results"]
    assert set(results) == WASM_START_RESULTS
    for name, s in results.items():
        values = [s["median"], s["p90"], s["min"], s["max"]]
        assert all(math.isfinite(v) for v in values), name
        assert s["n"] >= 1 and s["min"] <= s["median"] <= s["p90"] <= s["max"], name
        # counts may be 0; times and rates must be positive
        assert s["min"] >= 0 if s["unit"] == "count" else s["min"] > 0, name

    starting, running, guest = (
        results[k]["median"]
        for k in ("start_cached_to_starting_ms", "start_cached_to_running_ms", "start_cached_ms")
    )
    assert starting <= running <= guest  # stages in the order they happen
    assert set(data["ratios"]) == WASM_START_RATIOS
    assert all(math.isfinite(r) and r > 0 for r in data["ratios"].values())
