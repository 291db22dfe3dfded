"""The PostgreSQL driver benchmark (bench/pg_driver.py) runs with tiny sizes and reports
a figure of each kind for every driver, so it doesn't rot. No figure is held to a goal."""

from __future__ import annotations

import json

import pytest

from bench.pg_driver import VARIANTS
from tests.harness import run_cli

pytestmark = [pytest.mark.bench, pytest.mark.process, pytest.mark.postgres]


def test_every_driver_is_measured(tmp_path):
    out = tmp_path / "pg.json"
    done = run_cli("-m", "bench.pg_driver", "--quick", "--json", str(out), timeout=300)
    assert "| psycopg pipeline |" in done.stdout.decode()
    report = json.loads(out.read_text())
    assert report["fsync"] is True
    assert [f["variant"] for f in report["figures"]] == [v.name for v in VARIANTS]
    for figure in report["figures"]:
        for key in ("txn_per_s", "latency_ms", "cpu_us_per_txn"):
            assert figure[key]["median"] > 0, (figure["variant"], key)
        assert figure["latency_ms"]["p99"] >= figure["latency_ms"]["median"]
