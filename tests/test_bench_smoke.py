"""The start-latency benchmark runs with tiny sizes (--quick, a few seconds) and reports
sane numbers under the keys bench/README.md documents."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.harness import run_cli

pytestmark = pytest.mark.timeout(60)

RESULTS = {
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
RATIOS = {
    "start_cached_vs_floor",
    "start_uncached_vs_floor_uncached",
    "start_uncached_vs_floor",
    "inprocess_vs_floor_rate",
    "e2e_vs_floor_rate",
}


def test_quick_run_reports_sane_numbers(tmp_path: Path) -> None:
    saved = tmp_path / "results.json"
    done = run_cli("-m", "bench.wasm_start", "--quick", "--json", str(saved), check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert "start latency, cached" in done.stdout.decode()

    data = json.loads(saved.read_text())
    assert data["machine"]["nproc"] >= 1 and data["machine"]["wasmtime_py"]
    results = data["results"]
    assert set(results) == RESULTS
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
    assert set(data["ratios"]) == RATIOS
    assert all(math.isfinite(r) and r > 0 for r in data["ratios"].values())
