"""The wasm backend: runs WASI (preview 1) command modules on Wasmtime.

The sandbox. A guest sees its args (argv[0] is the job's name), the spec's env plus the
job's parameters, the spec's stdin bytes, stdout/stderr (streamed to the switchboard) and
one writable directory, `/scratch`, backed by `<run work dir>/scratch` on the host (the
supervisor deletes it after the run). Nothing else of the host: no other files, no host
environment, no network, no inherited stdio. docs/wasm.md describes it for users.

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

Modules. Compiled modules live in an in-memory LRU (`module_cache_size`) in front of an
optional disk cache (`cache_dir`, wasm_cache.py, at most `cache_max_bytes`) that holds
both the module bytes (`<sha256>.wasm`) and the compiled code
(`<sha256>.<flavour>.<wasmtime version>-<arch>.cwasm`; flavour "epoch" or "fuel"), so a
module is fetched and compiled once per host, restarts included. Compiled code is only
loaded from the cache after its checksum matches; a file Wasmtime still refuses (another
version, another config) is deleted and the module compiled again.

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
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import importlib.metadata
import logging
import platform
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import wasmtime
from wasmtime import _ffi as ffi

from protocol.exceptions import JobError, JobErrorKind
from protocol.limits import clip_message
from protocol.messages import Stream
from protocol.spec import WasmBackend as WasmSpec
from supervisor import metrics
from supervisor.artifacts import ArtifactSource, digest_of, verify
from supervisor.backends.base import Backend, Outcome, RunContext
from supervisor.backends.keylocks import KeyLocks
from supervisor.backends.wasi_host import guest_of_thread, make_linker
from supervisor.backends.wasm_cache import DiskCache
from supervisor.backends.wasm_scratch import ScratchQuota

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Epoch tick; a stop takes effect within about one tick of a guest's next epoch check.
TICK_S = 0.01
#: After a stop, how long run() waits for the guest thread before abandoning it.
ABANDON_AFTER_S = 5.0
#: Worker threads: one per running guest (compiles share them). Created on demand.
MAX_THREADS = 256
#: Where the run's scratch directory appears inside the guest.
SCRATCH = "/scratch"
#: Table elements a store may hold (8 bytes of host memory each); C and Rust need a few k.
MAX_TABLE_ELEMENTS = 1_000_000
#: Names the compiled code in the disk cache: it only loads into the Wasmtime that made it.
ENGINE_ID = f"wasmtime-{importlib.metadata.version('wasmtime')}-{platform.machine()}"

_MB = 1024 * 1024
_LIMIT_ERROR = re.compile(r"exceeds (memory|table) limits")

# wasmtime_store_epoch_deadline_callback's callback: (context, data, *delta, *kind) -> error*
_DeadlineCallback = ctypes.CFUNCTYPE(
    ctypes.c_size_t,
    ctypes.POINTER(ffi.wasmtime_context_t),
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint64),
    ctypes.POINTER(ctypes.c_uint8),
)
# A NULL function pointer (ctypes takes None for NULL; typeshed doesn't say so).
_NO_FINALIZER = ctypes.cast(None, ctypes.CFUNCTYPE(None, ctypes.c_void_p))  # type: ignore[arg-type]
_UPDATE_DEADLINE_CONTINUE = 0  # WASMTIME_UPDATE_DEADLINE_CONTINUE


class _Flavour:
    """An Engine configuration, with its Linker. Compiled code only fits its own flavour."""

    def __init__(self, name: str, *, fuel: bool) -> None:
        self.name = name
        config = wasmtime.Config()
        config.epoch_interruption = True
        config.consume_fuel = fuel
        self.engine = wasmtime.Engine(config)
        self.linker = make_linker(self.engine)


@dataclass(frozen=True)
class _Sandbox:
    """What one guest gets to see and use."""

    argv: list[str]
    env: dict[str, str]
    stdin: bytes
    scratch: Path  # on the host
    scratch_bytes: int
    memory_bytes: int
    fuel: int | None


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
        self._artifacts = artifacts
        self._flavours: dict[bool, _Flavour] = {False: _Flavour("epoch", fuel=False)}
        #: The engines the ticker advances (replaced, never mutated: the ticker reads it).
        self._engines: tuple[wasmtime.Engine, ...] = (self._flavours[False].engine,)
        self._disk = DiskCache(cache_dir, cache_max_bytes) if cache_dir is not None else None
        #: Compiled, import-resolved modules by (digest, flavour), least recently used first.
        self._cache: OrderedDict[tuple[str, str], wasmtime.InstancePre] = OrderedDict()
        self._cache_size = module_cache_size
        self._loading = KeyLocks()  # one compile/load per key at a time
        self.memory_limit_mb = memory_limit_mb
        #: Runs whose compiled module came from a cache (memory or disk), and runs that
        #: had to compile it.
        self.cache_hits = 0
        self.cache_misses = 0
        self._pool = ThreadPoolExecutor(MAX_THREADS, thread_name_prefix="wasm")
        self._ticker: threading.Thread | None = None
        self._ticker_stop = threading.Event()
        #: Guests running now, with the future of their thread.
        self._active: dict[_Guest, asyncio.Future[Outcome]] = {}
        self._closed = False

    async def run(self, ctx: RunContext) -> Outcome:
        spec = ctx.start.backend
        if not isinstance(spec, WasmSpec):
            raise TypeError(f"the wasm backend got a {type(spec).__name__} spec")
        if self._closed:
            raise RuntimeError("the wasm backend is closed")
        flavour = self._flavour(fuel=spec.fuel is not None)
        loaded = await ctx.unless_stopped(self._load(ctx, spec.module, flavour))
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
        guest = _Guest(ctx)
        sandbox = _Sandbox(
            argv=[ctx.start.name or "main", *spec.args],
            env={**spec.env, **ctx.env},  # parameters win over the spec's env
            stdin=spec.stdin,
            scratch=ctx.work_dir / "scratch",
            scratch_bytes=self.scratch_limit_mb * _MB,
            memory_bytes=memory_mb * _MB,
            fuel=spec.fuel,
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
        self._cache.clear()

    def _flavour(self, *, fuel: bool) -> _Flavour:
        flavour = self._flavours.get(fuel)
        if flavour is None:
            flavour = self._flavours[fuel] = _Flavour("fuel", fuel=True)
            self._engines = (*self._engines, flavour.engine)
        return flavour

    # --- modules --------------------------------------------------------------------

    async def _load(self, ctx: RunContext, digest: str, flavour: _Flavour) -> wasmtime.InstancePre:
        """The compiled module for `digest`: from memory, from disk, or fetched and compiled.
        Runs wanting the same module wait for each other, so it is compiled once."""
        key = (digest, flavour.name)
        async with self._loading.hold(key):
            cached = self._cache.get(key)
            if cached is not None:
                # Content-addressed: the digest names exact bytes, so no need to fetch again.
                self._cache.move_to_end(key)
                self.cache_hits += 1
                metrics.cache_lookup("wasm_module", hit=True)
                if self._disk is not None and not self._closed:  # in use: keep it on disk
                    self._pool.submit(self._disk.touch, _compiled_name(digest, flavour))
                await ctx.stage("cached", "module compiled by an earlier run")
                return cached
            loop = asyncio.get_running_loop()
            if self._disk is not None:
                cached = await loop.run_in_executor(self._pool, self._from_disk, digest, flavour)
                if cached is not None:
                    self._remember(key, cached)
                    self.cache_hits += 1
                    metrics.cache_lookup("wasm_module", hit=True)
                    await ctx.stage("cached", "compiled module from the disk cache")
                    return cached
            self.cache_misses += 1
            metrics.cache_lookup("wasm_module", hit=False)
            data = None
            if self._disk is not None:
                data = await loop.run_in_executor(self._pool, self._bytes_from_disk, digest)
            if data is not None:
                await ctx.stage("fetching", "module bytes from the disk cache")
                store_bytes = False
            else:
                await ctx.stage("fetching")
                data = await self._artifacts.fetch(digest)
                verify(digest, data)  # the cache trusts the digest: don't trust the source
                store_bytes = True
            await ctx.stage("compiling")
            started = time.monotonic()
            loaded = await loop.run_in_executor(
                self._pool, self._compile, digest, data, flavour, store_bytes
            )
            log.debug(
                "compiled %s for %s (%d bytes) in %.3f s",
                digest,
                flavour.name,
                len(data),
                time.monotonic() - started,
            )
            self._remember(key, loaded)
            return loaded

    def _remember(self, key: tuple[str, str], loaded: wasmtime.InstancePre) -> None:
        if self._cache_size:
            self._cache[key] = loaded
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _from_disk(self, digest: str, flavour: _Flavour) -> wasmtime.InstancePre | None:
        """Compiled code from the disk cache (worker thread); None on a miss."""
        assert self._disk is not None
        name = _compiled_name(digest, flavour)
        try:
            code = self._disk.get(name)
            if code is None:
                return None
            # Only checksummed bytes get here; Wasmtime checks version and config itself.
            return flavour.linker.instantiate_pre(wasmtime.Module.deserialize(flavour.engine, code))
        except wasmtime.WasmtimeError as exc:
            log.warning("disk cache: %s does not load (%s); compiling again", name, exc)
            self._disk.discard(name)
        except OSError as exc:
            log.warning("disk cache: %s", exc)
        return None

    def _bytes_from_disk(self, digest: str) -> bytes | None:
        assert self._disk is not None
        name = _bytes_name(digest)
        try:
            data = self._disk.get(name)
        except OSError as exc:
            log.warning("disk cache: %s", exc)
            return None
        if data is not None and digest_of(data) != digest:
            log.warning("disk cache: %s does not hash to its name; discarded", name)
            self._disk.discard(name)
            return None
        return data

    def _compile(
        self, digest: str, data: bytes, flavour: _Flavour, store_bytes: bool
    ) -> wasmtime.InstancePre:
        """Compile and check a module, then keep it on disk (worker thread). Raises JobError."""
        if data[:4] != b"\0asm":
            # Checked here because wasmtime-py would otherwise parse non-binary input as WAT.
            raise JobError(
                JobErrorKind.IMAGE_INVALID, "not a WebAssembly binary (no \\0asm header)"
            )
        if data[6:8] == b"\x01\x00":  # layer 1: a component, not a core module
            raise JobError(
                JobErrorKind.IMAGE_NOT_COMPATIBLE,
                "this is a WebAssembly component; only WASI preview 1 core modules can run here",
            )
        try:
            module = wasmtime.Module(flavour.engine, data)
        except wasmtime.WasmtimeError as exc:
            raise JobError(
                JobErrorKind.IMAGE_INVALID,
                clip_message(f"not a valid WebAssembly module: {exc}") or "",
            ) from None
        start = next((e.type for e in module.exports if e.name == "_start"), None)
        if not (isinstance(start, wasmtime.FuncType) and not start.params and not start.results):
            raise JobError(
                JobErrorKind.IMAGE_NOT_COMPATIBLE,
                "the module exports no `_start` function: not a WASI command",
            )
        try:
            # Resolves every import now, so a non-WASI module fails before it is "running".
            loaded = flavour.linker.instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            raise JobError(
                JobErrorKind.IMAGE_NOT_COMPATIBLE,
                clip_message(f"the module needs imports WASI preview 1 lacks: {exc}") or "",
            ) from None
        if self._disk is not None:  # only modules that will run are worth the space
            try:
                if store_bytes:
                    self._disk.put(_bytes_name(digest), data)
                self._disk.put(_compiled_name(digest, flavour), bytes(module.serialize()))
            except (OSError, wasmtime.WasmtimeError) as exc:
                log.warning("disk cache: could not store %s: %s", digest, exc)
        return loaded

    # --- epoch ticker -----------------------------------------------------------------

    def _start_ticker(self) -> None:
        if self._ticker is None and not self._closed:
            self._ticker = threading.Thread(target=self._tick, name="wasm-epoch", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._ticker_stop.wait(TICK_S):
            for engine in self._engines:
                engine.increment_epoch()


def _bytes_name(digest: str) -> str:
    return digest.removeprefix("sha256:") + ".wasm"


def _compiled_name(digest: str, flavour: _Flavour) -> str:
    return f"{digest.removeprefix('sha256:')}.{flavour.name}.{ENGINE_ID}.cwasm"


class _Guest:
    """One run's Store and the state its callbacks share with the event loop."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        #: Set to make the guest trap (stop requested, run cancelled, backend closing).
        self.kill = threading.Event()
        self.kill_reason: str | None = None
        #: Set by proc_exit: the guest is unwinding to report this status.
        self.exit_code: int | None = None
        #: Host monotonic time at which the guest's monotonic clock reads 0 (for poll_oneoff).
        self.clock_base_ns = 0
        self.sandbox: _Sandbox | None = None
        self.quota: ScratchQuota | None = None
        self._store: wasmtime.Store | None = None
        self._start: wasmtime.Func | None = None
        self._memory: wasmtime.Memory | None = None
        # Must outlive the store, which calls it; the guest object holds both.
        self._on_deadline = _DeadlineCallback(self._deadline)

    def instantiate(
        self, engine: wasmtime.Engine, loaded: wasmtime.InstancePre, sandbox: _Sandbox
    ) -> None:
        """Create the store and instance (worker thread)."""
        self.sandbox = sandbox
        sandbox.scratch.mkdir(parents=True, exist_ok=True)
        self.quota = ScratchQuota(sandbox.scratch, sandbox.scratch_bytes, min_interval_s=TICK_S)
        store = self._store = wasmtime.Store(engine)
        ffi.wasmtime_store_epoch_deadline_callback(
            store.ptr(), self._on_deadline, None, _NO_FINALIZER
        )
        store.set_epoch_deadline(1)  # a store without a deadline would trap at once
        store.set_limits(memory_size=sandbox.memory_bytes, table_elements=MAX_TABLE_ELEMENTS)
        if sandbox.fuel is not None:
            store.set_fuel(sandbox.fuel)  # on the fuel engine, a store without fuel traps
        wasi = wasmtime.WasiConfig()  # nothing of the host but what is configured here
        wasi.argv = sandbox.argv
        wasi.env = list(sandbox.env.items())
        _set_stdin(wasi, sandbox.stdin)
        wasi.stdout_custom = self._writer("stdout")
        wasi.stderr_custom = self._writer("stderr")
        wasi.preopen_dir(str(sandbox.scratch), SCRATCH)
        store.set_wasi(wasi)
        # Wasmtime's WASI monotonic clock starts at 0 when set_wasi builds the context.
        self.clock_base_ns = time.monotonic_ns()
        guest_of_thread.guest = self  # a start function may already sleep
        try:
            instance = loaded.instantiate(store)
        finally:
            guest_of_thread.guest = None
        exports = instance.exports(store)
        start = exports["_start"]
        assert isinstance(start, wasmtime.Func)  # checked at compile time
        self._start = start
        memory = exports.get("memory")
        self._memory = memory if isinstance(memory, wasmtime.Memory) else None

    def call_start(self) -> Outcome:
        """Run `_start` to its end (worker thread)."""
        assert self._store is not None and self._start is not None
        guest_of_thread.guest = self
        code: int | None = None
        trap: wasmtime.Trap | wasmtime.WasmtimeError | None = None
        try:
            self._start(self._store)
            code = 0
        except wasmtime.ExitTrap as exc:  # wasmtime's proc_exit (replaced: see wasi_host)
            code = exc.code
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            code = self.exit_code  # our proc_exit ends the guest with a trap
            trap = exc
        finally:
            guest_of_thread.guest = None
            note = self._memory_note()
            self.close()
        if self.kill.is_set():
            # Even if it then ended by itself: a guest whose sleep a stop cut short is killed.
            return self.stopped()
        if self._over_scratch_quota(final=True):  # its last writes count too
            return self.stopped("scratch_limit")
        if code is not None:
            return Outcome(exit_code=code, message=note if code else None)
        if isinstance(trap, wasmtime.Trap) and trap.trap_code == wasmtime.TrapCode.OUT_OF_FUEL:
            return self.out_of_fuel()
        message = f"{note}\n{trap}" if note else str(trap)
        return Outcome(exit_code=None, reason="trap", message=clip_message(message))

    def stopped(self, kill_reason: str | None = None) -> Outcome:
        reason = self.ctx.stop_reason or kill_reason or self.kill_reason or "canceled"
        if reason == "scratch_limit" and self.quota is not None:
            return Outcome(
                exit_code=None,
                reason=reason,
                message=f"scratch quota exceeded: /scratch held {self.quota.used / _MB:.1f} MB, "
                f"more than the {self.quota.limit // _MB} MB a run may write there",
            )
        return Outcome(exit_code=None, reason=reason)

    def out_of_fuel(self) -> Outcome:
        fuel = self.sandbox.fuel if self.sandbox else None
        return Outcome(
            exit_code=None,
            reason="out_of_fuel",
            message=f"out of fuel: the guest used up its budget of {fuel} units",
        )

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
        self._start = self._memory = None

    def _memory_note(self) -> str | None:
        """A hint for a guest that failed: its memory reached (nearly) the limit."""
        if self._memory is None or self._store is None or self.sandbox is None:
            return None
        try:
            size = self._memory.data_len(self._store)
        except Exception:  # only a hint: never let it spoil the outcome
            return None
        if size < self.sandbox.memory_bytes * 0.9:
            return None
        limit = self.sandbox.memory_bytes // _MB
        return (
            f"its memory reached {size / _MB:.1f} of its {limit} MB limit: "
            "an allocation may have failed"
        )

    def _deadline(self, _context: Any, _data: Any, delta: Any, kind: Any) -> int:
        """Epoch deadline reached: trap if the run is being stopped, else one more tick.
        Must not raise (ctypes would print and return 0 without setting `delta`)."""
        if self.exit_code is not None:
            error = ffi.wasmtime_error_new(b"the guest called proc_exit")
            return ctypes.cast(error, ctypes.c_void_p).value or 0
        if self.kill.is_set() or self.ctx.stop_flag.is_set():
            self.kill.set()
            error = ffi.wasmtime_error_new(b"the run was stopped")
            return ctypes.cast(error, ctypes.c_void_p).value or 0
        if self._over_scratch_quota():
            self.kill_reason = "scratch_limit"
            self.kill.set()
            error = ffi.wasmtime_error_new(b"the guest wrote more than its scratch quota")
            return ctypes.cast(error, ctypes.c_void_p).value or 0
        delta[0] = 1
        kind[0] = _UPDATE_DEADLINE_CONTINUE
        return 0

    def _over_scratch_quota(self, final: bool = False) -> bool:
        """Whether /scratch holds more than the quota: measured if due (at the end, now)."""
        if self.quota is None:
            return False
        try:
            return self.quota.check_now() if final else self.quota.check()
        except Exception:  # a measurement must never break the callback or the outcome
            log.exception("scratch quota check failed")
            return False

    def _writer(self, stream: Stream) -> Callable[[bytes], int]:
        def write(data: bytes) -> int:
            try:
                self.ctx.write(stream, data)  # may block: backpressure
            except Exception:  # the output is closed: the run was given up
                return -errno.EIO
            return len(data)

        return write


def _set_stdin(wasi: wasmtime.WasiConfig, data: bytes) -> None:
    """Give the guest `data` as its standard input (WasiConfig has no method for it)."""
    vec = ffi.wasm_byte_vec_t()
    buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    ffi.wasm_byte_vec_new(ctypes.byref(vec), len(data), buffer)  # a copy ...
    ffi.wasi_config_set_stdin_bytes(wasi.ptr(), ctypes.byref(vec))  # ... that this takes


async def _wait_guest(ctx: RunContext, guest: _Guest, future: asyncio.Future[Outcome]) -> Outcome:
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
    return Outcome(exit_code=None, reason=ctx.stop_reason or "canceled")
