"""A Wasm guest's /out, in process: writable, and with a quota of its own, the run's total
output cap; a guest writing more is killed (scratch_limit, naming /out), and no more than
the cap is kept when the run's outputs are collected."""

from __future__ import annotations

import msgspec
import pytest

from protocol.messages import CollectLimits, CollectRule
from protocol.spec import WasmBackend as WasmSpec
from supervisor.artifacts import MemoryArtifactSource
from supervisor.backends.wasm import WasmBackend
from supervisor.outputs import OUT_DIR, DirectorySink, caps_for, keep_outputs, make_out_dir
from tests.test_outputs_supervisor_e2e import WRITE_OUTPUTS
from tests.wasi import compile_c
from tests.wasm_run import Run, finish

pytestmark = pytest.mark.wasm

_MB = 1024 * 1024


@pytest.mark.parametrize("limit", [64 * _MB, _MB])
async def test_out_is_writable_within_the_runs_total_cap(tmp_path, limit):
    artifacts = MemoryArtifactSource()
    digest = artifacts.add(compile_c(WRITE_OUTPUTS, tmp_path, "write_outputs").read_bytes())
    backend = WasmBackend(artifacts)
    run = Run(WasmSpec(module=digest, args=["0", str(4 * _MB)]), tmp_path / "work")
    run.ctx.start = msgspec.structs.replace(
        run.ctx.start,
        collect=[CollectRule("**")],
        collect_limits=CollectLimits(max_total_bytes=limit),
    )
    run.ctx.out_max_bytes = caps_for(run.ctx.start.collect_limits).max_total_bytes  # as jobs does
    make_out_dir(run.ctx.work_dir)
    try:
        outcome = await finish(backend, run)
    finally:
        await backend.close()
    kept = await keep_outputs(
        run.ctx.work_dir / OUT_DIR,
        ["**"],
        caps_for(run.ctx.start.collect_limits),
        DirectorySink(tmp_path / "kept"),
    )
    if limit > 4 * _MB:
        assert (outcome.reason, outcome.exit_code) == ("exited", 0), outcome
        assert [f.path for f in kept.files] == [
            "big.bin",
            "logs/a.log",
            "other.txt",
            "reports/junit.xml",
        ]
        assert kept.files[0].size == 4 * _MB
    else:
        assert outcome.reason == "scratch_limit", outcome
        assert "/out held" in (outcome.message or "")
        assert "more than the 1 MB a run may write there" in (outcome.message or "")
        # Whatever the guest got onto disk before the kill, no more than the cap is kept:
        # big.bin is refused whole, or (killed early, its blocks counted before its size
        # caught up) kept cut short of the 4 MB the guest meant to write.
        assert sum(f.size for f in kept.files) <= limit, kept
        refused = {r.path: r.reason for r in kept.refused}
        sizes = {f.path: f.size for f in kept.files}
        if "big.bin" in refused:
            assert "would take the total over the cap of 1048576" in refused["big.bin"], refused
        else:
            assert sizes.get("big.bin", 0) < 4 * _MB, kept
        assert "reports/junit.xml" in sizes
