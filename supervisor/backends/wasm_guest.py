"""One Wasm guest: its Store with the run's limits and sandbox, and how it ended.

A Guest is created per run. On a worker thread it builds the Store (memory and table
limits, fuel, the epoch deadline and its callback) and the WASI context (argv, env, stdin,
stdout/stderr written to the run, /scratch preopened, /in read-only and /out for a run
that has them, and nothing else of the host), then
runs `_start` to its end and turns the ending (exit status, trap, a kill, fuel or scratch
quota used up) into an Outcome. The event loop kills it through `kill`; the epoch callback
is where a kill, a proc_exit and the scratch quota take effect. /out has a quota of its own
(the run's collect_limits.max_total_bytes: more could never be kept), measured and
enforced the same way, with the same outcome (scratch_limit).

Why a module of its own: this is everything that touches one Store, on the guest's own
thread, apart from the backend's engines, module cache and run bookkeeping (wasm.py).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wasmtime
from wasmtime import _ffi as ffi

from protocol.limits import clip_message
from protocol.messages import Stream
from supervisor.backends.base import Outcome, RunContext
from supervisor.backends.wasi_host import guest_of_thread
from supervisor.backends.wasm_scratch import ScratchQuota

log = logging.getLogger(__name__)

#: Epoch tick; a stop takes effect within about one tick of a guest's next epoch check.
TICK_S = 0.01
#: Where the run's scratch directory appears inside the guest.
SCRATCH = "/scratch"
#: Where the run's inputs appear inside the guest (read-only).
INPUTS = "/in"
#: Where the run's output directory appears inside the guest (writable).
OUTPUTS = "/out"
#: Table elements a store may hold (8 bytes of host memory each); C and Rust need a few k.
MAX_TABLE_ELEMENTS = 1_000_000

_MB = 1024 * 1024

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


@dataclass(frozen=True)
class Sandbox:
    """What one guest gets to see and use."""

    argv: list[str]
    env: dict[str, str]
    stdin: bytes
    scratch: Path  # on the host
    scratch_bytes: int
    memory_bytes: int
    fuel: int | None
    #: The run's input directory on the host, shown read-only at INPUTS (None: no inputs).
    inputs: Path | None = None
    #: The run's output directory on the host, shown writable at OUTPUTS (None: the run
    #: keeps no files), and the most it may hold.
    outputs: Path | None = None
    outputs_bytes: int = 0


class Guest:
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
        self.sandbox: Sandbox | None = None
        self.quota: ScratchQuota | None = None
        #: The quotas measured: /scratch's, and /out's for a run that has one.
        self.quotas: list[tuple[str, ScratchQuota]] = []
        #: The one the guest went over.
        self.over: tuple[str, ScratchQuota] | None = None
        self._store: wasmtime.Store | None = None
        self._start: wasmtime.Func | None = None
        self._memory: wasmtime.Memory | None = None
        # Must outlive the store, which calls it; the guest object holds both.
        self._on_deadline = _DeadlineCallback(self._deadline)

    def instantiate(
        self, engine: wasmtime.Engine, loaded: wasmtime.InstancePre, sandbox: Sandbox
    ) -> None:
        """Create the store and instance (worker thread)."""
        self.sandbox = sandbox
        sandbox.scratch.mkdir(parents=True, exist_ok=True)
        self.quota = ScratchQuota(sandbox.scratch, sandbox.scratch_bytes, min_interval_s=TICK_S)
        self.quotas = [(SCRATCH, self.quota)]
        if sandbox.outputs is not None:
            sandbox.outputs.mkdir(parents=True, exist_ok=True)
            out = ScratchQuota(sandbox.outputs, sandbox.outputs_bytes, min_interval_s=TICK_S)
            self.quotas.append((OUTPUTS, out))
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
        if sandbox.inputs is not None:
            # Read-only: neither the directory nor a file in it may be changed.
            wasi.preopen_dir(str(sandbox.inputs), INPUTS, fs_mutable=False)
        if sandbox.outputs is not None:
            wasi.preopen_dir(str(sandbox.outputs), OUTPUTS)
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
        stopped = self.ctx.stopped_reason if self.ctx.stop_reason else None
        reason = stopped or kill_reason or self.kill_reason or "canceled"
        over = self.over or (self.quotas[0] if self.quotas else None)
        if reason == "scratch_limit" and over is not None:
            where, quota = over
            return Outcome(
                exit_code=None,
                reason=reason,
                message=f"scratch quota exceeded: {where} held {quota.used / _MB:.1f} MB, "
                f"more than the {_amount(quota.limit)} a run may write there",
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
        """Whether /scratch (or /out) holds more than its quota: measured if due (at the
        end, now)."""
        for where, quota in self.quotas:
            try:
                over = quota.check_now() if final else quota.check()
            except Exception:  # a measurement must never break the callback or the outcome
                log.exception("%s quota check failed", where)
                continue
            if over:
                self.over = (where, quota)
                return True
        return False

    def _writer(self, stream: Stream) -> Callable[[bytes], int]:
        def write(data: bytes) -> int:
            try:
                self.ctx.write(stream, data)  # may block: backpressure
            except Exception:  # the output is closed: the run was given up
                return -errno.EIO
            return len(data)

        return write


def _amount(limit: int) -> str:
    """A quota for people: whole megabytes, or bytes (/out's is the run's byte cap)."""
    return f"{limit // _MB} MB" if limit % _MB == 0 else f"{limit} bytes"


def _set_stdin(wasi: wasmtime.WasiConfig, data: bytes) -> None:
    """Give the guest `data` as its standard input (WasiConfig has no method for it)."""
    vec = ffi.wasm_byte_vec_t()
    buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    ffi.wasm_byte_vec_new(ctypes.byref(vec), len(data), buffer)  # a copy ...
    ffi.wasi_config_set_stdin_bytes(wasi.ptr(), ctypes.byref(vec))  # ... that this takes
