"""Real WASI programs for tests: C sources compiled with clang to wasm32-wasi.

The toolchain (clang, lld, wasi-libc, the wasm32 compiler-rt builtins) is a test
dependency like Docker: when it is missing the test fails and says how to get it,
it never skips, so a CI machine without it can't go green by testing nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

SYSROOT = Path("/usr")
CFLAGS = ("--target=wasm32-wasi", f"--sysroot={SYSROOT}", "-O2")
_MISSING = (
    "WASI toolchain missing: run scripts/test.sh, which installs clang, lld, wasi-libc, "
    "libclang-rt-14-dev-wasm32"
)


def compile_c(source: str, out_dir: Path, name: str) -> Path:
    """Compile `source` to a WASI command module in `out_dir` and return its path.

    The file name carries a hash of the source and flags, so a cache directory that
    outlives the test session is never stale.
    """
    clang = shutil.which("clang")
    if clang is None or not (SYSROOT / "include/wasm32-wasi/stdio.h").exists():
        pytest.fail(_MISSING)
    key = hashlib.sha256("\0".join((*CFLAGS, source)).encode()).hexdigest()[:16]
    out = out_dir / f"{name}-{key}.wasm"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / f"{name}-{key}.c"
    src.write_text(source)
    # Compile to a private name and rename: parallel test workers may share out_dir.
    tmp = out_dir / f".{name}-{key}.{os.getpid()}.wasm"
    result = subprocess.run(
        [clang, *CFLAGS, "-o", str(tmp), str(src)], capture_output=True, text=True
    )
    if result.returncode != 0:
        # A broken toolchain (no lld, no builtins) shows up here, not as a missing file.
        pytest.fail(f"clang failed on {name}.c:\n{result.stderr}\n({_MISSING})")
    tmp.replace(out)
    return out


#: Prints argv (one `argv[i]=...` line each), the GREETING variable and whether any host
#: file is visible, to stdout; one line to stderr; exits with argv[1] if it is a number.
HELLO_ARGS_ENV = r"""
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    for (int i = 0; i < argc; i++) printf("argv[%d]=%s\n", i, argv[i]);
    const char *greeting = getenv("GREETING");
    printf("GREETING=%s\n", greeting ? greeting : "(unset)");
    FILE *f = fopen("/etc/hostname", "r");
    printf("host fs: %s\n", f ? "visible" : "hidden");
    fprintf(stderr, "hello on stderr\n");
    return argc > 1 ? atoi(argv[1]) : 0;
}
"""

#: `write_bytes N [M]`: N bytes of 0,1,..,255,0,1.. to stdout, then M bytes of 255,254,..
#: to stderr (neither is valid UTF-8), written in 64 KiB blocks.
WRITE_BYTES = r"""
#include <stdlib.h>
#include <unistd.h>

static unsigned char buf[65536];

static void emit(int fd, long long n, int reverse) {
    for (int i = 0; i < (int)sizeof buf; i++) buf[i] = reverse ? 255 - (i & 255) : (i & 255);
    while (n > 0) {
        size_t want = n < (long long)sizeof buf ? (size_t)n : sizeof buf;
        size_t done = 0;
        while (done < want) {  /* 64 KiB is a multiple of 256, so the pattern runs on */
            ssize_t w = write(fd, buf + done, want - done);
            if (w <= 0) exit(3);
            done += (size_t)w;
        }
        n -= (long long)want;
    }
}

int main(int argc, char **argv) {
    emit(1, argc > 1 ? atoll(argv[1]) : 0, 0);
    emit(2, argc > 2 ? atoll(argv[2]) : 0, 1);
    return 0;
}
"""

#: Says "spinning" and then loops forever without a single host call.
SPIN = r"""
#include <stdio.h>

int main(void) {
    puts("spinning");
    fflush(stdout);
    volatile unsigned long long n = 0;
    for (;;) n++;
}
"""

#: `sleeper MS [COUNT]`: COUNT times (forever if 0 or absent) sleeps MS milliseconds
#: (nanosleep, i.e. WASI poll_oneoff) and prints `tick I`; exits 0 after COUNT ticks.
SLEEPER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv) {
    long ms = argc > 1 ? atol(argv[1]) : 100;
    long count = argc > 2 ? atol(argv[2]) : 0;
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    for (long i = 0; count == 0 || i < count; i++) {
        nanosleep(&ts, NULL);
        printf("tick %ld\n", i);
        fflush(stdout);
    }
    return 0;
}
"""

#: Traps (wasm `unreachable`) inside a function named `crash_here`.
TRAP = r"""
#include <stdio.h>

__attribute__((noinline)) void crash_here(void) { __builtin_trap(); }

int main(void) {
    puts("about to trap");
    fflush(stdout);
    crash_here();
    return 0;
}
"""
