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

#: `scratch TEXT`: writes TEXT to /scratch/dir/note.txt (making the directory), reads it back
#: and prints `read back: TEXT`; exits 0 if the bytes match, 1 (with the error) otherwise.
SCRATCH_RW = r"""
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

int main(int argc, char **argv) {
    const char *text = argc > 1 ? argv[1] : "hello scratch";
    if (mkdir("/scratch/dir", 0755) != 0) { perror("mkdir"); return 1; }
    FILE *f = fopen("/scratch/dir/note.txt", "w");
    if (!f) { perror("fopen w"); return 1; }
    fputs(text, f);
    fclose(f);
    char buf[4096] = {0};
    f = fopen("/scratch/dir/note.txt", "r");
    if (!f) { perror("fopen r"); return 1; }
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    printf("read back: %.*s\n", (int)n, buf);
    return strlen(text) == n && memcmp(text, buf, n) == 0 ? 0 : 1;
}
"""

#: Tries to reach host files outside /scratch in every way it can think of and prints one
#: line per attempt, `<what>: blocked (<error>)` or `<what>: OPENED`; one control attempt
#: inside /scratch must open. Always exits 0: the test reads the lines.
ESCAPE = r"""
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void try_open(const char *what, const char *path, int flags) {
    int fd = open(path, flags, 0644);
    if (fd >= 0) { printf("%s: OPENED\n", what); close(fd); }
    else printf("%s: blocked (%s)\n", what, strerror(errno));
}

static void try_dir(const char *what, const char *path) {
    DIR *d = opendir(path);
    if (d) { printf("%s: OPENED\n", what); closedir(d); }
    else printf("%s: blocked (%s)\n", what, strerror(errno));
}

int main(void) {
    try_open("control", "/scratch/inside.txt", O_WRONLY | O_CREAT);
    try_open("/etc/passwd", "/etc/passwd", O_RDONLY);
    try_open("../x", "../x", O_WRONLY | O_CREAT);
    try_open("escape", "escape", O_WRONLY | O_CREAT);
    try_open("/scratch/../escape", "/scratch/../escape", O_WRONLY | O_CREAT);
    try_open("/scratch/../../escape", "/scratch/../../escape", O_WRONLY | O_CREAT);
    try_dir("opendir /", "/");
    try_dir("opendir /scratch/..", "/scratch/..");
    symlink("/etc/passwd", "/scratch/abs-link");  /* may itself be refused: either is fine */
    try_open("absolute symlink", "/scratch/abs-link", O_RDONLY);
    symlink("../escape", "/scratch/rel-link");
    try_open("relative symlink", "/scratch/rel-link", O_WRONLY | O_CREAT);
    return 0;
}
"""

#: Copies standard input to standard output byte for byte, then prints `N bytes` to stderr.
CAT_STDIN = r"""
#include <stdio.h>
#include <unistd.h>

int main(void) {
    static char buf[65536];
    long long total = 0;
    ssize_t n;
    while ((n = read(0, buf, sizeof buf)) > 0) {
        for (ssize_t done = 0; done < n;) {
            ssize_t w = write(1, buf + done, (size_t)(n - done));
            if (w <= 0) return 3;
            done += w;
        }
        total += n;
    }
    fprintf(stderr, "%lld bytes\n", total);
    return n < 0 ? 2 : 0;
}
"""

#: Allocates (and touches) 1 MiB blocks until malloc returns NULL, then prints
#: `allocated N MiB` and exits 3. Exits 0 if it somehow got 8 GiB.
MEMORY_BOMB = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void *volatile last;  /* keeps the compiler from eliding the allocations */

int main(void) {
    int mib = 0;
    for (; mib < 8192; mib++) {
        char *p = malloc(1 << 20);
        if (!p) {
            printf("allocated %d MiB\n", mib);
            return 3;
        }
        memset(p, 0xab, 1 << 20);
        *(void **)p = last;  /* a chain of every block */
        last = p;
    }
    return 0;
}
"""

#: `fill_scratch [unlink | files N]`: writes 64 KiB blocks to /scratch/fill until a write
#: fails, then prints `full after N bytes: <error>` and sleeps (keeping what it wrote) until
#: it is stopped. With `unlink`, the file is deleted as soon as it is open: it still takes
#: space. With `files N`, it first creates N empty files.
FILL_SCRATCH = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static char block[65536];

int main(int argc, char **argv) {
    memset(block, 'x', sizeof block);
    if (argc > 2 && strcmp(argv[1], "files") == 0) {
        char name[64];
        for (int i = 0; i < atoi(argv[2]); i++) {
            snprintf(name, sizeof name, "/scratch/empty%d", i);
            int empty = open(name, O_WRONLY | O_CREAT, 0644);
            if (empty < 0) { perror("open"); return 1; }
            close(empty);
        }
    }
    int fd = open("/scratch/fill", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { perror("open"); return 1; }
    if (argc > 1 && strcmp(argv[1], "unlink") == 0 && unlink("/scratch/fill") != 0) {
        perror("unlink");
        return 1;
    }
    long long total = 0;
    for (;;) {
        ssize_t w = write(fd, block, sizeof block);
        if (w <= 0) break;
        total += w;
    }
    printf("full after %lld bytes: %s\n", total, strerror(errno));
    fflush(stdout);
    struct timespec second = {1, 0};
    for (;;) nanosleep(&second, NULL);
}
"""

#: `steady_writer BLOCKS MS`: appends BLOCKS blocks of 64 KiB to /scratch/steady, one every
#: MS milliseconds, printing `started` after the first; then `wrote N bytes` and exits 0.
#: Exits 1 with the error if a write fails.
STEADY_WRITER = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static char block[65536];

int main(int argc, char **argv) {
    int blocks = argc > 1 ? atoi(argv[1]) : 16;
    long ms = argc > 2 ? atol(argv[2]) : 50;
    struct timespec pause = {ms / 1000, (ms % 1000) * 1000000L};
    int fd = open("/scratch/steady", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { perror("open"); return 1; }
    for (int i = 0; i < blocks; i++) {
        if (write(fd, block, sizeof block) != (ssize_t)sizeof block) { perror("write"); return 1; }
        if (fsync(fd) != 0) { perror("fsync"); return 1; }
        if (i == 0) { puts("started"); fflush(stdout); }
        nanosleep(&pause, NULL);
    }
    if (close(fd) != 0) { perror("close"); return 1; }
    printf("wrote %d bytes\n", blocks * (int)sizeof block);
    return 0;
}
"""

#: `many_files N`: creates N empty files in /scratch, then prints `created N` and exits 0.
MANY_FILES = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 10;
    char name[64];
    for (int i = 0; i < n; i++) {
        snprintf(name, sizeof name, "/scratch/f%d", i);
        int fd = open(name, O_WRONLY | O_CREAT, 0644);
        if (fd < 0) { perror("open"); return 1; }
        close(fd);
    }
    printf("created %d\n", n);
    return 0;
}
"""

#: `stream_out CHUNKS BYTES MS`: CHUNKS times, writes BYTES of a deterministic binary pattern
#: to stdout, then sleeps MS milliseconds.
STREAM_OUT = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv) {
    long chunks = atol(argv[1]), size = atol(argv[2]), ms = atol(argv[3]);
    unsigned char *buf = malloc(size);
    struct timespec pause = {ms / 1000, (ms % 1000) * 1000000L};
    unsigned long long pos = 0;
    for (long c = 0; c < chunks; c++) {
        for (long i = 0; i < size; i++, pos++) buf[i] = (unsigned char)(pos * 31 + (pos >> 9));
        fwrite(buf, 1, size, stdout);
        fflush(stdout);
        nanosleep(&pause, NULL);
    }
    return 0;
}
"""


def stream_pattern(n: int) -> bytes:
    """The first `n` bytes STREAM_OUT writes: byte p is (p * 31 + (p >> 9)) mod 256, so each
    512-byte block k is one of 256 blocks (k mod 256)."""
    blocks = [bytes((i * 31 + k) & 0xFF for i in range(512)) for k in range(256)]
    return b"".join(blocks[k & 0xFF] for k in range(n // 512 + 1))[:n]
