"""The wasm backend: runs WASI (preview 1) command modules on Wasmtime.

The sandbox. A guest sees its args (argv[0] is the job's name), the spec's env plus the
job's parameters, the spec's stdin bytes, stdout/stderr (streamed to the switchboard) and
one writable directory, `/scratch`, backed by `<run work dir>/scratch` on the host (the
supervisor deletes it after the run), for a job with inputs the read-only directory `/in`
(`<run work dir>/in`, placed by supervisor.inputs), and for a job that keeps files the
writable directory `/out` (`<run work dir>/out`, supervisor.outputs; its quota is the run's
collect_limits.max_total_bytes, measured like /scratch's). Nothing else of the host: no
other files, no host environment, no network, no inherited stdio. docs/wasm.md describes
it for users.

Limits. Each ends the run with its own outcome:
- the job's `timeout_s` (enforced by supervisor.jobs through a stop): reason "timeout";
- `fuel` (instructions, roughly): reason "out_of_fuel". Counting fuel slows every guest, so
  jobs with a budget run on a second Engine, created on first use, with `consume_fuel`;
- `memory_limit_mb` (capped by the backend's `memory_limit_mb`, also its default): each
  linear memory may grow up to it. Past it `memory.grow` fails (malloc returns NULL and the
  guest decides what to do); a module whose *initial* memory is already larger can't be
  instantiated: reason "memory_limit";
- the backend's `scratch_limit_mb`: once /scratch holds more, the guest is killed (and a
  guest that ends holding more fails too): reason "scratch_limit". Measured, not enforced
  by a file system: wasm_scratch says why and by how much a guest can overshoot;
- a trap: reason "trap", with the trap message and wasm backtrace.

Modules. A module is fetched and compiled once per host, restarts included: compiled
modules are kept in memory and on disk, and checked before they are used (wasm_modules).

Stopping a guest. Both engines use epoch interruption: a ticker thread advances the epoch
every 10 ms and every store has a deadline one tick ahead, with a callback that runs when
the guest reaches it (at a loop back-edge or function entry). The callback either extends
the deadline by a tick or, once the run is being stopped, returns an error, which traps the
guest. That covers guests that compute. A guest that *sleeps* sits in a host call where no
epoch check happens, so the backend also replaces WASI's `poll_oneoff` (what `nanosleep`,
`sleep` and `usleep` call) with a version that waits on the run's kill flag: a stop wakes it
at once and the guest traps at its next epoch check. `proc_exit` is replaced too, because
wasmtime's own turns exit statuses >= 126 into traps. Both replacements live in wasi_host.

What a stop can't interrupt: a guest blocked writing output while the link to the
switchboard is stalled (OutputPump backpressure has no way to be woken). For that case
run() gives up on the thread after a bounded wait and returns the stop outcome anyway; the
thread ends on its own once the output is closed.

WASI preview 1 has no signals, so there is no polite stop: `grace_s` is not used, a stop
always kills at once.

This module holds the backend: its engines and their epoch ticker, and each run from
instantiating its guest to its outcome. One guest's Store and sandbox are wasm_guest,
loading and caching modules is wasm_modules, the replaced WASI functions are wasi_host and
the scratch quota is wasm_scratch.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import wasmtime

from protocol.exceptions import JobError, JobErrorKind
from protocol.limits import clip_message
from protocol.spec import WasmBackend as WasmSpec
from supervisor import metrics
from supervisor.artifacts import ArtifactSource
from supervisor.backends.base import Backend, Outcome, RunContext
from supervisor.backends.wasm_guest import TICK_S, Guest, Sandbox
from supervisor.backends.wasm_modules import Flavour, ModuleStore
from supervisor.inputs import IN_DIR
from supervisor.outputs import OUT_DIR

log = logging.getLogger(__name__)

#: After a stop, how long run() waits for the guest thread before abandoning it.
ABANDON_AFTER_S = 5.0
#: Worker threads: one per running guest (compiles share them). Created on demand.
MAX_THREADS = 256

_MB = 1024 * 1024
_LIMIT_ERROR = re.compile(r"exceeds (memory|table) limits")


class WasmBackend(Backend):
    kind = "wasm"

    def __init__(
        self,
        artifacts: ArtifactSource,
        *,
        cache_dir: Path | None = None,
        cache_max_bytes: int = 512 * _MB,
        module_cache_size: int = 64,
        memory_limit_mb: int = 1024,
        scratch_limit_mb: int = 1024,
    ) -> None:
        if module_cache_size < 0:
            raise ValueError("module_cache_size must be >= 0")
        if not 1 <= memory_limit_mb <= 4096:
            raise ValueError("memory_limit_mb must be between 1 and 4096")
        if scratch_limit_mb < 1:
            raise ValueError("scratch_limit_mb must be at least 1")
        #: Most a guest's /scratch may hold (every run gets this quota).
        self.scratch_limit_mb = scratch_limit_mb
        self._flavours: dict[bool, Flavour] = {False: Flavour("epoch", fuel=False)}
        #: The engines the ticker advances (replaced, never mutated: the ticker reads it).
        self._engines: tuple[wasmtime.Engine, ...] = (self._flavours[False].engine,)
        self.memory_limit_mb = memory_limit_mb
        self._pool = ThreadPoolExecutor(MAX_THREADS, thread_name_prefix="wasm")
        self._modules = ModuleStore(
            artifacts,
            self._pool,
            cache_dir=cache_dir,
            cache_max_bytes=cache_max_bytes,
            module_cache_size=module_cache_size,
        )
        self._ticker: threading.Thread | None = None
        self._ticker_stop = threading.Event()
        #: Guests running now, with the future of their thread.
        self._active: dict[Guest, asyncio.Future[Outcome]] = {}
        self._closed = False

    @property
    def cache_hits(self) -> int:
        """Runs whose compiled module came from a cache (memory or disk)."""
        return self._modules.cache_hits

    @property
    def cache_misses(self) -> int:
        """Runs that had to compile their module."""
        return self._modules.cache_misses

    async def run(self, ctx: RunContext) -> Outcome:
        spec = ctx.start.backend
        if not isinstance(spec, WasmSpec):
            raise TypeError(f"the wasm backend got a {type(spec).__name__} spec")
        if self._closed:
            raise RuntimeError("the wasm backend is closed")
        flavour = self._flavour(fuel=spec.fuel is not None)
        loaded = await ctx.unless_stopped(self._modules.load(ctx, spec.module, flavour))
        if loaded is None:
            return _stopped(ctx)

        memory_mb = min(spec.memory_limit_mb or self.memory_limit_mb, self.memory_limit_mb)
        limits = f"memory limit {memory_mb} MB"
        if spec.memory_limit_mb is not None and spec.memory_limit_mb > memory_mb:
            limits += f" (this host's maximum; the job asked for {spec.memory_limit_mb} MB)"
        if spec.fuel is not None:
            limits += f", fuel {spec.fuel}"
        limits += f", scratch {self.scratch_limit_mb} MB"
        await ctx.stage("starting", limits)
        self._start_ticker()
        guest = Guest(ctx)
        sandbox = Sandbox(
            argv=[ctx.start.name or "main", *spec.args],
            env={**spec.env, **ctx.env},  # parameters win over the spec's env
            stdin=spec.stdin,
            scratch=ctx.work_dir / "scratch",
            scratch_bytes=self.scratch_limit_mb * _MB,
            memory_bytes=memory_mb * _MB,
            fuel=spec.fuel,
            inputs=ctx.work_dir / IN_DIR if ctx.start.inputs else None,
            outputs=ctx.work_dir / OUT_DIR if ctx.start.collect else None,
            outputs_bytes=ctx.out_max_bytes,
        )
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(
                self._pool, guest.instantiate, flavour.engine, loaded, sandbox
            )
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            guest.close()
            if guest.kill_reason == "scratch_limit":  # a start function wrote too much
                return self._scratch_exceeded(ctx, guest.stopped())
            if _LIMIT_ERROR.search(str(exc)):
                return Outcome(
                    exit_code=None,
                    reason="memory_limit",
                    message=clip_message(
                        f"the module needs more memory than its memory limit of {memory_mb} MB "
                        f"allows: {exc}"
                    ),
                )
            if isinstance(exc, wasmtime.Trap) and exc.trap_code == wasmtime.TrapCode.OUT_OF_FUEL:
                return guest.out_of_fuel()
            raise JobError(
                JobErrorKind.IMAGE_NOT_COMPATIBLE,
                clip_message(f"could not instantiate the module: {exc}") or "",
            ) from None
        if ctx.stop_flag.is_set():
            guest.close()
            return _stopped(ctx)

        await ctx.running()
        if self._closed:  # close() ran meanwhile: no ticker any more, so don't start
            guest.close()
            return guest.stopped("shutdown")
        future = loop.run_in_executor(self._pool, guest.call_start)
        self._active[guest] = future
        future.add_done_callback(lambda _: self._active.pop(guest, None))
        outcome = await _wait_guest(ctx, guest, future)
        if outcome.reason == "scratch_limit":
            return self._scratch_exceeded(ctx, outcome)
        return outcome

    @staticmethod
    def _scratch_exceeded(ctx: RunContext, outcome: Outcome) -> Outcome:
        metrics.limit_exceeded("wasm_scratch")
        log.warning("run %s#%d: %s", ctx.run.job_id, ctx.run.attempt, outcome.message)
        return outcome

    async def close(self) -> None:
        self._closed = True
        for guest in self._active:
            guest.kill_reason = "shutdown"
            guest.kill.set()
        # The guests trap at their next epoch check, which needs the ticker still running.
        if self._active:
            await asyncio.wait(list(self._active.values()), timeout=2.0)
        self._ticker_stop.set()
        if self._ticker is not None:
            await asyncio.to_thread(self._ticker.join, 1.0)
        # One more tick puts every deadline in the past: a killed guest that was stuck in a
        # host call traps as soon as it is back in wasm, even with no ticker.
        for engine in self._engines:
            engine.increment_epoch()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._modules.close()

    def _flavour(self, *, fuel: bool) -> Flavour:
        flavour = self._flavours.get(fuel)
        if flavour is None:
            flavour = self._flavours[fuel] = Flavour("fuel", fuel=True)
            self._engines = (*self._engines, flavour.engine)
        return flavour

    # --- epoch ticker -----------------------------------------------------------------

    def _start_ticker(self) -> None:
        if self._ticker is None and not self._closed:
            self._ticker = threading.Thread(target=self._tick, name="wasm-epoch", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._ticker_stop.wait(TICK_S):
            for engine in self._engines:
                engine.increment_epoch()


async def _wait_guest(ctx: RunContext, guest: Guest, future: asyncio.Future[Outcome]) -> Outcome:
    """Wait for the guest thread to end; on a stop, kill the guest and wait (bounded)."""
    stop = asyncio.ensure_future(ctx.stop_requested.wait())
    try:
        either: set[asyncio.Future[Any]] = {future, stop}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if future.done():
            return future.result()
        guest.kill.set()
        try:
            return await asyncio.wait_for(asyncio.shield(future), ABANDON_AFTER_S)
        except TimeoutError:
            log.warning("run %s: guest did not stop in %.0f s; abandoned", ctx.run, ABANDON_AFTER_S)
            outcome = guest.stopped()
            return Outcome(
                exit_code=None,
                reason=outcome.reason,
                message=f"the guest did not stop within {ABANDON_AFTER_S:.0f} s (blocked writing "
                "output?); its thread was abandoned",
            )
    except asyncio.CancelledError:
        guest.kill.set()  # nobody waits for it any more: don't leave it running
        raise
    finally:
        stop.cancel()


def _stopped(ctx: RunContext) -> Outcome:
    return Outcome(exit_code=None, reason=ctx.stopped_reason)
