"""The noop backend: runs nothing, ends after a delay with a chosen exit code.

For scheduler tests and benchmarks, where the cost of a real program would hide the cost
of the switchboard and the protocol. Its spec's `files` are written into the run's output
directory (a run that keeps files has one) when it "starts", so that collecting outputs
can be tested without a real program; a run that keeps nothing writes none.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from protocol.spec import NoopBackend as NoopSpec
from supervisor.backends.base import Backend, Outcome, RunContext
from supervisor.outputs import OUT_DIR


class NoopBackend(Backend):
    kind = "noop"

    async def run(self, ctx: RunContext) -> Outcome:
        spec = ctx.start.backend
        assert isinstance(spec, NoopSpec)
        await ctx.running()
        if spec.output:
            ctx.write("stdout", spec.output.encode())
        if spec.files and ctx.start.collect:
            await asyncio.to_thread(_write_files, ctx.work_dir / OUT_DIR, spec.files)
        if spec.delay_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.stop_requested.wait(), spec.delay_s)
        if ctx.stop_requested.is_set():
            return Outcome(exit_code=None, reason=ctx.stopped_reason)
        return Outcome(exit_code=spec.exit_code)


def _write_files(out: Path, files: dict[str, str]) -> None:
    """Write each file (paths are checked relative ones: no `..`, no leading `/`)."""
    for path, text in files.items():
        dest = out / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text, encoding="utf-8")
