"""The WASI functions the wasm backend replaces: poll_oneoff and proc_exit.

Why they exist: a guest that sleeps sits in wasmtime's poll_oneoff, where no epoch check
happens, so a stop could not reach it; this poll_oneoff waits on the run's kill flag
instead. wasmtime's proc_exit turns exit statuses >= 126 into traps; this one accepts any.
Why a module of its own: they are host code reading guest memory by the WASI ABI, not
part of running a job. The guest whose thread calls them is found in `guest_of_thread`.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from typing import Protocol

import wasmtime
from wasmtime import _ffi as ffi

log = logging.getLogger(__name__)

_WASI = "wasi_snapshot_preview1"


class HostGuest(Protocol):
    """What the replaced functions need of the running guest (wasm_guest.Guest)."""

    #: Set to make the guest trap; ends a sleep at once.
    kill: threading.Event
    #: Set by proc_exit: the status the guest is unwinding to report.
    exit_code: int | None
    #: Host monotonic time at which the guest's monotonic clock reads 0.
    clock_base_ns: int


#: `.guest`: the guest running on this worker thread (a HostGuest), or None.
guest_of_thread = threading.local()

_SUBSCRIPTION = 48  # sizeof(__wasi_subscription_t)
_EVENT = struct.Struct("<QHB5xQH6x")  # __wasi_event_t: userdata, error, type, nbytes, flags
_CLOCK = struct.Struct("<I4xQQH")  # clock id, timeout, precision, flags (at offset 16)
_EVENTTYPE_CLOCK, _EVENTTYPE_FD_READ, _EVENTTYPE_FD_WRITE = 0, 1, 2
_CLOCK_REALTIME, _CLOCK_MONOTONIC = 0, 1
_SUBSCRIPTION_CLOCK_ABSTIME = 1
_ERRNO_FAULT, _ERRNO_INVAL = 21, 28
_U32 = 0xFFFF_FFFF


def make_linker(engine: wasmtime.Engine) -> wasmtime.Linker:
    """A linker with WASI, poll_oneoff and proc_exit replaced by the functions below."""
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    linker.allow_shadowing = True
    i32 = wasmtime.ValType.i32()
    linker.define_func(
        _WASI, "poll_oneoff", wasmtime.FuncType([i32] * 4, [i32]), _poll_oneoff, access_caller=True
    )
    linker.define_func(
        _WASI, "proc_exit", wasmtime.FuncType([i32], []), _proc_exit, access_caller=True
    )
    return linker


def _proc_exit(caller: wasmtime.Caller, code: int) -> None:
    """WASI proc_exit that accepts every exit status.

    Wasmtime's own refuses statuses >= 126 (a trap instead of an exit), but programs do
    `exit(255)`. This records the status, as the low 8 bits like a POSIX parent sees it, and
    moves the epoch deadline to now: the guest then hits the `unreachable` compilers put
    after a noreturn call, or at the latest its next epoch check, and call_start reports the
    exit. Not by raising: see _poll_oneoff.
    """
    guest: HostGuest | None = getattr(guest_of_thread, "guest", None)
    if guest is not None:
        guest.exit_code = code & 0xFF
    ffi.wasmtime_context_set_epoch_deadline(caller._context(), 0)


def _poll_oneoff(caller: wasmtime.Caller, subs: int, events: int, nsubs: int, nout: int) -> int:
    """WASI poll_oneoff whose clock waits end early when the run is killed.

    Never raises: wasmtime-py turns a raise into a trap through a process-wide variable
    that another guest's thread could pick up.
    """
    try:
        return _poll(caller, subs & _U32, events & _U32, nsubs & _U32, nout & _U32)
    except Exception:
        log.exception("poll_oneoff failed")
        return _ERRNO_FAULT


def _poll(caller: wasmtime.Caller, subs: int, events: int, nsubs: int, nout: int) -> int:
    guest: HostGuest | None = getattr(guest_of_thread, "guest", None)
    memory = caller.get("memory")
    if not isinstance(memory, wasmtime.Memory):
        return _ERRNO_FAULT
    if nsubs == 0:
        return _ERRNO_INVAL
    size = memory.data_len(caller)
    in_end, out_end = subs + nsubs * _SUBSCRIPTION, events + nsubs * _EVENT.size
    if in_end > size or out_end > size or nout + 4 > size:
        return _ERRNO_FAULT
    raw = memory.read(caller, subs, in_end)

    now = time.monotonic_ns()
    ready: list[bytes] = []  # fd events: always ready
    clocks: list[tuple[int, int]] = []  # (userdata, deadline in host monotonic ns)
    for offset in range(0, len(raw), _SUBSCRIPTION):
        userdata, tag = struct.unpack_from("<QB", raw, offset)
        if tag == _EVENTTYPE_CLOCK:
            clock, timeout, _precision, flags = _CLOCK.unpack_from(raw, offset + 16)
            if clock not in (_CLOCK_REALTIME, _CLOCK_MONOTONIC):
                return _ERRNO_INVAL  # as wasmtime does for the CPU-time clocks
            if flags & _SUBSCRIPTION_CLOCK_ABSTIME:
                base = guest.clock_base_ns if guest else now
                current = time.time_ns() if clock == _CLOCK_REALTIME else now - base
                timeout = max(0, timeout - current)
            clocks.append((userdata, now + timeout))
        elif tag in (_EVENTTYPE_FD_READ, _EVENTTYPE_FD_WRITE):
            # stdin is bytes in memory, stdout/stderr are pipes to us and the rest regular
            # files in /scratch: always ready. (An fd that isn't open is "ready" too; the
            # read or write that follows fails with EBADF.)
            ready.append(_EVENT.pack(userdata, 0, tag, 1, 0))  # like wasmtime: 1 byte ready
        else:
            return _ERRNO_INVAL

    if not ready:
        kill = guest.kill if guest else threading.Event()
        wake = min(deadline for _, deadline in clocks)
        while not kill.is_set() and (left := wake - time.monotonic_ns()) > 0:
            kill.wait(min(left / 1e9, 3600.0))  # a stop ends the sleep; the epoch check traps
        now = max(time.monotonic_ns(), wake)
        ready = [
            _EVENT.pack(userdata, 0, _EVENTTYPE_CLOCK, 0, 0)
            for userdata, deadline in clocks
            if deadline <= now
        ]
    memory.write(caller, b"".join(ready), events)
    memory.write(caller, struct.pack("<I", len(ready)), nout)
    return 0
