"""The noop backend: runs nothing, ends after a delay with a chosen exit code.

For scheduler tests and benchmarks, where the cost of a real program would hide the cost
of the switchboard and the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib

from protocol.spec import NoopBackend as NoopSpec
from supervisor.backends.base import Backend, Outcome, RunContext


class NoopBackend(Backend):
    kind = "noop"

    async def run(self, ctx: RunContext) -> Outcome:
        spec = ctx.start.backend
        assert isinstance(spec, NoopSpec)
        await ctx.running()
        if spec.output:
            ctx.write("stdout", spec.output.encode())
        if spec.delay_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.stop_requested.wait(), spec.delay_s)
        if ctx.stop_requested.is_set():
            return Outcome(exit_code=None, reason=ctx.stopped_reason)
        return Outcome(exit_code=spec.exit_code)
