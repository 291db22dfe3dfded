"""The benchmark's guest program, compiled from C with clang (no pytest needed), and a way
to make byte-distinct copies of a module so each one misses every compile cache."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SYSROOT = Path("/usr")
CFLAGS = ("--target=wasm32-wasi", f"--sysroot={SYSROOT}", "-O2")
CACHE_DIR = Path(tempfile.gettempdir()) / "switchboard-bench-wasm"

#: Reads the wall clock as its very first action and prints it (ns since the epoch) to
#: stdout, then exits 0. The host subtracts its own time.time_ns() from before the start.
STAMP = r"""
#include <stdio.h>
#include <time.h>

int main(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    printf("%lld\n", (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
    return 0;
}
"""


class ToolchainMissing(RuntimeError):
    """clang or the wasm32-wasi sysroot is not installed (scripts/test.sh installs them)."""


def compile_c(source: str, name: str, out_dir: Path = CACHE_DIR) -> bytes:
    """`source` compiled to a WASI command module; cached by a hash of source and flags."""
    clang = shutil.which("clang")
    if clang is None or not (SYSROOT / "include/wasm32-wasi/stdio.h").exists():
        raise ToolchainMissing("clang with a wasm32-wasi sysroot is needed: run scripts/test.sh")
    key = hashlib.sha256("\0".join((*CFLAGS, source)).encode()).hexdigest()[:16]
    out = out_dir / f"{name}-{key}.wasm"
    if not out.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        src = out_dir / f"{name}-{key}.c"
        src.write_text(source)
        tmp = out_dir / f".{name}-{key}.{os.getpid()}.wasm"  # rename: concurrent runs
        done = subprocess.run(
            [clang, *CFLAGS, "-o", str(tmp), str(src)], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise ToolchainMissing(f"clang failed on {name}.c:\n{done.stderr}")
        tmp.replace(out)
    return out.read_bytes()


def with_nonce(module: bytes, nonce: int) -> bytes:
    """`module` plus a custom section holding `nonce`: the same program, a new digest (and
    a new key for any compile cache, which hashes the whole module)."""
    name = b"bench-nonce"
    body = _leb128(len(name)) + name + nonce.to_bytes(8, "little")
    return module + b"\x00" + _leb128(len(body)) + body


def _leb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
