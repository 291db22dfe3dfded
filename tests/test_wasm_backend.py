"""The wasm backend, driven directly: real WASI programs compiled from C, real Wasmtime,
a real RunContext and OutputPump whose sends are recorded."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
import wasmtime

from protocol.exceptions import JobError, JobErrorKind
from protocol.limits import MAX_OUTPUT_CHUNK
from protocol.spec import WasmBackend as WasmSpec
from supervisor.artifacts import MemoryArtifactSource as MemoryArtifacts
from supervisor.artifacts import digest_of
from supervisor.backends.base import Outcome
from supervisor.backends.wasm import WasmBackend
from supervisor.backends.wasm_cache import DiskCache
from supervisor.backends.wasm_modules import ENGINE_ID
from tests.wasm_run import Run, finish

pytestmark = [pytest.mark.wasm, pytest.mark.asyncio, pytest.mark.timeout(60)]

#: Generous: the machine is shared. Measured stop latency is ~10-20 ms.
STOP_BOUND_S = 2.0


@pytest.fixture
def artifacts() -> MemoryArtifacts:
    return MemoryArtifacts()


@pytest_asyncio.fixture
async def backend(artifacts: MemoryArtifacts) -> AsyncIterator[WasmBackend]:
    backend = WasmBackend(artifacts)
    yield backend
    await backend.close()


@pytest.fixture
def make_run(
    artifacts: MemoryArtifacts, program: Callable[..., bytes], tmp_path: Path
) -> Callable[..., Run]:
    def make(
        source: str,
        args: list[str] = (),
        env: dict[str, str] | None = None,
        *,
        spec: dict | None = None,
        **kw,
    ) -> Run:
        """A run of tests.wasi.<source>; `spec` adds WasmSpec fields (stdin, fuel...)."""
        digest = artifacts.add(program(source))
        wasm = WasmSpec(module=digest, args=list(args), env=env or {}, **(spec or {}))
        return Run(wasm, tmp_path / "work", **kw)

    return make


def pattern(n: int, *, reverse: bool = False) -> bytes:
    block = bytes(range(255, -1, -1)) if reverse else bytes(range(256))
    return (block * (n // 256 + 1))[:n]


# --- running programs ------------------------------------------------------------------


async def test_args_and_env_reach_the_guest(backend: WasmBackend, make_run) -> None:
    run = make_run(
        "HELLO_ARGS_ENV",
        ["0", "two words", "ünï"],
        env={"GREETING": "from-spec", "OTHER": "x"},
        name="hello",
        params={"GREETING": "from-parameter"},
    )
    outcome = await finish(backend, run)
    assert outcome == Outcome(exit_code=0)
    assert run.data("stdout").decode().splitlines() == [
        "argv[0]=hello",
        "argv[1]=0",
        "argv[2]=two words",
        "argv[3]=ünï",
        "GREETING=from-parameter",  # parameters win over the spec's env
        "host fs: hidden",
    ]
    assert run.data("stderr") == b"hello on stderr\n"
    assert run.stages == ["fetching", "compiling", "starting"]
    assert run.running.is_set()


async def test_argv0_defaults_to_main(backend: WasmBackend, make_run) -> None:
    run = make_run("HELLO_ARGS_ENV", name="")
    await finish(backend, run)
    assert run.data("stdout").startswith(b"argv[0]=main\nGREETING=(unset)\n")


@pytest.mark.parametrize("code", [7, 126, 255])  # wasmtime itself refuses >= 126
async def test_exit_code(backend: WasmBackend, make_run, code: int) -> None:
    outcome = await finish(backend, make_run("HELLO_ARGS_ENV", [str(code)]))
    assert outcome == Outcome(exit_code=code, reason="exited")


#: Calls proc_exit through a declaration without _Noreturn, so no `unreachable` follows:
#: the exit must still end it.
EXIT_THEN_SPIN = r"""
__attribute__((import_module("wasi_snapshot_preview1"), import_name("proc_exit")))
void plain_proc_exit(int code);

int main(void) {
    plain_proc_exit(42);
    volatile int n = 0;
    for (;;) n++;
}
"""


async def test_exit_ends_a_guest_that_would_go_on(
    backend: WasmBackend, artifacts: MemoryArtifacts, program, tmp_path: Path
) -> None:
    run = wasm_run(artifacts, program("EXIT_THEN_SPIN", EXIT_THEN_SPIN), tmp_path)
    assert await finish(backend, run) == Outcome(exit_code=42)


async def test_streams_are_separate_and_byte_exact(backend: WasmBackend, make_run) -> None:
    run = make_run("WRITE_BYTES", ["1000", "777"])
    assert await finish(backend, run) == Outcome(exit_code=0)
    stdout, stderr = run.data("stdout"), run.data("stderr")
    assert stdout == pattern(1000)
    assert stderr == pattern(777, reverse=True)
    with pytest.raises(UnicodeDecodeError):
        stdout.decode()


async def test_ten_megabytes_of_output(backend: WasmBackend, make_run) -> None:
    size = 10 * 1024 * 1024
    run = make_run("WRITE_BYTES", [str(size)])
    assert await finish(backend, run) == Outcome(exit_code=0)
    data = run.data("stdout")  # checks chunk sizes and contiguous offsets
    assert len(data) == size
    assert hashlib.sha256(data).digest() == hashlib.sha256(pattern(size)).digest()
    assert len([c for c in run.chunks if c[0] == "stdout"]) >= size // MAX_OUTPUT_CHUNK
    assert run.data("stderr") == b""


async def test_output_arrives_while_the_guest_runs(backend: WasmBackend, make_run) -> None:
    run = make_run("SLEEPER", ["50"])  # a tick every 50 ms, forever
    task = asyncio.ensure_future(backend.run(run.ctx))
    await run.wait_for_output(b"tick 2\n")
    assert not task.done()
    run.ctx.request_stop("canceled", 10.0)
    outcome = await asyncio.wait_for(task, 10)
    assert outcome == Outcome(exit_code=None, reason="canceled")
    await run.output.close()
    assert run.data("stdout").startswith(b"tick 0\ntick 1\ntick 2\n")


async def test_sleeps_last_as_long_as_asked(backend: WasmBackend, make_run) -> None:
    # WASI poll_oneoff is replaced (to make sleeps interruptible): it must still sleep.
    run = make_run("SLEEPER", ["100", "3"])
    started = time.monotonic()
    assert await finish(backend, run) == Outcome(exit_code=0)
    assert time.monotonic() - started >= 0.3
    assert run.data("stdout") == b"tick 0\ntick 1\ntick 2\n"


async def test_trap_reports_message_and_backtrace(backend: WasmBackend, make_run) -> None:
    run = make_run("TRAP")
    outcome = await finish(backend, run)
    assert (outcome.exit_code, outcome.reason) == (None, "trap")
    assert outcome.message is not None
    assert "wasm backtrace" in outcome.message and "crash_here" in outcome.message
    assert run.data("stdout") == b"about to trap\n"


# --- the sandbox -----------------------------------------------------------------------


async def test_scratch_directory_is_writable(backend: WasmBackend, make_run) -> None:
    run = make_run("SCRATCH_RW", ["notes from the guest"])
    assert await finish(backend, run) == Outcome(exit_code=0), run.data("stderr")
    assert run.data("stdout") == b"read back: notes from the guest\n"
    # /scratch is <work dir>/scratch on the host (supervisor.jobs deletes the work dir).
    host_file = run.ctx.work_dir / "scratch" / "dir" / "note.txt"
    assert host_file.read_text() == "notes from the guest"


async def test_nothing_outside_scratch_is_reachable(backend: WasmBackend, make_run) -> None:
    run = make_run("ESCAPE")
    assert await finish(backend, run) == Outcome(exit_code=0)
    lines = run.data("stdout").decode().splitlines()
    print("\n".join(lines))
    assert lines[0] == "control: OPENED"
    attempts = lines[1:]
    assert len(attempts) == 9
    assert all(": blocked (" in line for line in attempts), attempts
    work = run.ctx.work_dir
    assert not (work / "escape").exists() and not (work.parent / "escape").exists()
    assert not (work / "x").exists() and not (work.parent / "x").exists()


async def test_stdin_bytes_reach_the_guest(backend: WasmBackend, make_run) -> None:
    data = pattern(200_000) + b"\0end\xff"
    run = make_run("CAT_STDIN", spec={"stdin": data})
    assert await finish(backend, run) == Outcome(exit_code=0)
    assert run.data("stdout") == data
    assert run.data("stderr") == f"{len(data)} bytes\n".encode()


async def test_no_stdin_is_an_empty_stdin(backend: WasmBackend, make_run) -> None:
    run = make_run("CAT_STDIN")
    assert await finish(backend, run) == Outcome(exit_code=0)
    assert (run.data("stdout"), run.data("stderr")) == (b"", b"0 bytes\n")


# --- stopping --------------------------------------------------------------------------


async def stop_after_start(run: Run, task: asyncio.Future[Outcome], reason: str) -> float:
    """Wait until the guest runs, stop it, return how long the stop took."""
    await asyncio.wait_for(run.running.wait(), 10)
    await asyncio.sleep(0.2)  # let the guest get going (spinning or deep in a sleep)
    assert not task.done()
    started = time.monotonic()
    run.ctx.request_stop(reason, 10.0)
    await asyncio.wait_for(asyncio.shield(task), 10)
    return time.monotonic() - started


async def test_stop_interrupts_a_spinning_guest(backend: WasmBackend, make_run) -> None:
    run = make_run("SPIN")
    task = asyncio.ensure_future(backend.run(run.ctx))
    await run.wait_for_output(b"spinning\n")
    latency = await stop_after_start(run, task, "canceled")
    assert task.result() == Outcome(exit_code=None, reason="canceled")
    assert latency < STOP_BOUND_S
    print(f"stop latency (spinning guest): {latency * 1000:.1f} ms")


async def test_stop_interrupts_a_long_sleep(backend: WasmBackend, make_run) -> None:
    run = make_run("SLEEPER", ["60000", "1"])  # one 60 s sleep, then exit 0
    task = asyncio.ensure_future(backend.run(run.ctx))
    latency = await stop_after_start(run, task, "timeout")
    # Killed, not "exited 0" although the guest would return normally after its sleep.
    assert task.result() == Outcome(exit_code=None, reason="timeout")
    assert latency < STOP_BOUND_S
    print(f"stop latency (sleeping guest): {latency * 1000:.1f} ms")


async def test_stop_before_start_never_runs_the_guest(backend: WasmBackend, make_run) -> None:
    run = make_run("HELLO_ARGS_ENV")
    run.ctx.request_stop("canceled", 0.0)
    assert await finish(backend, run) == Outcome(exit_code=None, reason="canceled")
    assert not run.running.is_set()
    assert run.chunks == []


async def test_close_stops_running_guests(artifacts: MemoryArtifacts, make_run) -> None:
    backend = WasmBackend(artifacts)
    run = make_run("SPIN")
    task = asyncio.ensure_future(backend.run(run.ctx))
    await run.wait_for_output(b"spinning\n")
    await asyncio.wait_for(backend.close(), 5)
    assert await asyncio.wait_for(task, 5) == Outcome(exit_code=None, reason="shutdown")
    assert not any(t.name == "wasm-epoch" for t in threading.enumerate())


# --- modules: cache and errors ---------------------------------------------------------


async def test_second_run_uses_the_compiled_module(
    backend: WasmBackend, artifacts: MemoryArtifacts, make_run
) -> None:
    first = make_run("HELLO_ARGS_ENV", ["3"])
    assert await finish(backend, first) == Outcome(exit_code=3)
    second = make_run("HELLO_ARGS_ENV", ["4"])
    assert await finish(backend, second) == Outcome(exit_code=4)
    assert first.stages == ["fetching", "compiling", "starting"]
    assert second.stages == ["cached", "starting"]
    assert artifacts.fetches == 1


async def test_counters_and_flavours(
    backend: WasmBackend, artifacts: MemoryArtifacts, make_run
) -> None:
    stages = []
    for spec in ({}, {}, {"fuel": 10**9}, {"fuel": 5 * 10**8}):
        run = make_run("HELLO_ARGS_ENV", spec=spec)
        assert await finish(backend, run) == Outcome(exit_code=0)
        stages.append(run.stages[0])
    # Code compiled with fuel metering is another flavour: compiled (not fetched) once more.
    assert stages == ["fetching", "cached", "fetching", "cached"]
    assert (backend.cache_hits, backend.cache_misses) == (2, 2)


async def test_concurrent_runs_compile_a_module_once(
    backend: WasmBackend, artifacts: MemoryArtifacts, make_run
) -> None:
    runs = [make_run("HELLO_ARGS_ENV", [str(i)]) for i in range(4)]
    outcomes = await asyncio.gather(*(finish(backend, run) for run in runs))
    assert outcomes == [Outcome(exit_code=i) for i in range(4)]
    assert sorted(run.stages[0] for run in runs) == ["cached"] * 3 + ["fetching"]
    assert (backend.cache_hits, backend.cache_misses, artifacts.fetches) == (3, 1, 1)


async def test_disk_cache_survives_a_restart(
    artifacts: MemoryArtifacts, make_run, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    first = WasmBackend(artifacts, cache_dir=cache_dir)
    try:
        run = make_run("HELLO_ARGS_ENV", ["5"])
        started = time.monotonic()
        assert await finish(first, run) == Outcome(exit_code=5)
        uncached = time.monotonic() - started
        assert run.stages == ["fetching", "compiling", "starting"]
    finally:
        await first.close()
    names = sorted(p.name for p in cache_dir.iterdir())
    digest = run.ctx.start.backend.module.removeprefix("sha256:")
    assert names == [f"{digest}.epoch.{ENGINE_ID}.cwasm", f"{digest}.wasm"]

    second = WasmBackend(artifacts, cache_dir=cache_dir)  # a restarted supervisor
    try:
        run = make_run("HELLO_ARGS_ENV", ["6"])
        started = time.monotonic()
        assert await finish(second, run) == Outcome(exit_code=6)
        cached = time.monotonic() - started
        assert run.stages == ["cached", "starting"]  # not fetched, not compiled
        assert (second.cache_hits, second.cache_misses, artifacts.fetches) == (1, 0, 1)
        print(f"run, fetched+compiled: {uncached * 1e3:.1f} ms; from disk: {cached * 1e3:.1f} ms")
        # The fuel flavour compiles again, but from the module bytes on disk: no fetch.
        run = make_run("HELLO_ARGS_ENV", spec={"fuel": 10**9})
        assert await finish(second, run) == Outcome(exit_code=0)
        assert run.stages == ["fetching", "compiling", "starting"]
        assert artifacts.fetches == 1
    finally:
        await second.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "foreign"])
async def test_corrupt_disk_cache_file_is_compiled_again(
    artifacts: MemoryArtifacts, make_run, tmp_path: Path, damage: str
) -> None:
    cache_dir = tmp_path / "cache"
    first = WasmBackend(artifacts, cache_dir=cache_dir)
    try:
        assert await finish(first, make_run("HELLO_ARGS_ENV")) == Outcome(exit_code=0)
    finally:
        await first.close()
    [compiled] = cache_dir.glob("*.cwasm")
    good = compiled.read_bytes()
    if damage == "flip":  # a bit flipped in the machine code: only a checksum sees that
        middle = len(good) // 2
        bad = good[:middle] + bytes([good[middle] ^ 0x10]) + good[middle + 1 :]
    elif damage == "truncate":
        bad = good[: len(good) // 3]
    elif damage == "empty":
        bad = b""
    else:  # checksummed, but not code for this Wasmtime: Wasmtime must refuse it
        DiskCache(cache_dir, 1 << 30).put(compiled.name, b"\x7fELF" + bytes(4096))
        bad = compiled.read_bytes()
    compiled.write_bytes(bad)

    second = WasmBackend(artifacts, cache_dir=cache_dir)
    try:
        run = make_run("HELLO_ARGS_ENV", ["9"])
        assert await finish(second, run) == Outcome(exit_code=9)
        assert run.stages == ["fetching", "compiling", "starting"]
        assert artifacts.fetches == 1  # the module bytes were still good
        assert (second.cache_hits, second.cache_misses) == (0, 1)
    finally:
        await second.close()
    assert compiled.read_bytes() == good  # replaced by a good copy


async def test_module_bytes_on_disk_are_checked_against_the_digest(
    artifacts: MemoryArtifacts, make_run, program, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    digest = artifacts.add(program("HELLO_ARGS_ENV")).removeprefix("sha256:")
    # Well-formed cache files, wrong content: the module bytes name another module.
    DiskCache(cache_dir, 1 << 30).put(f"{digest}.wasm", program("SPIN"))
    backend = WasmBackend(artifacts, cache_dir=cache_dir)
    try:
        run = make_run("HELLO_ARGS_ENV", ["2"])
        assert await finish(backend, run) == Outcome(exit_code=2)
        assert run.stages == ["fetching", "compiling", "starting"]
        assert artifacts.fetches == 1  # fetched: the cached bytes were refused
    finally:
        await backend.close()


async def test_module_cache_is_bounded(artifacts: MemoryArtifacts, make_run) -> None:
    backend = WasmBackend(artifacts, module_cache_size=1)
    try:
        stages = []
        for source in ("HELLO_ARGS_ENV", "WRITE_BYTES", "HELLO_ARGS_ENV"):
            run = make_run(source)
            await finish(backend, run)
            stages.append(run.stages[0])
        assert stages == ["fetching", "fetching", "fetching"]  # the first was evicted
    finally:
        await backend.close()


def wasm_run(artifacts: MemoryArtifacts, data: bytes, tmp_path: Path) -> Run:
    return Run(WasmSpec(module=artifacts.add(data)), tmp_path)


async def expect_job_error(backend: WasmBackend, run: Run, kind: JobErrorKind) -> JobError:
    with pytest.raises(JobError) as info:
        await backend.run(run.ctx)
    await run.output.close()
    assert info.value.kind == kind, info.value
    assert not run.running.is_set()
    return info.value


async def test_missing_artifact(backend: WasmBackend, tmp_path: Path) -> None:
    run = Run(WasmSpec(module=digest_of(b"nobody uploaded this")), tmp_path)
    await expect_job_error(backend, run, JobErrorKind.IMAGE_NOT_FOUND)


async def test_artifact_with_wrong_content(
    backend: WasmBackend, artifacts: MemoryArtifacts, program, tmp_path: Path
) -> None:
    digest = digest_of(b"what was promised")
    artifacts.blobs[digest] = program("HELLO_ARGS_ENV")
    run = Run(WasmSpec(module=digest), tmp_path)
    await expect_job_error(backend, run, JobErrorKind.IMAGE_INVALID)


@pytest.mark.parametrize(
    "data",
    [
        b"this is not a wasm module at all \xff\xfe",
        b"(module)",  # WebAssembly text: not accepted as an artifact
        b"\0asm\x01\0\0\0\x01\xff\xff\xff",  # a binary cut short
        b"",
    ],
    ids=["garbage", "wat-text", "truncated", "empty"],
)
async def test_invalid_module(
    backend: WasmBackend, artifacts: MemoryArtifacts, tmp_path: Path, data: bytes
) -> None:
    run = wasm_run(artifacts, data, tmp_path)
    await expect_job_error(backend, run, JobErrorKind.IMAGE_INVALID)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (bytes(wasmtime.wat2wasm('(module (func (export "f")))')), "_start"),
        (
            bytes(
                wasmtime.wat2wasm(
                    '(module (import "env" "host_thing" (func)) (func (export "_start")))'
                )
            ),
            "host_thing",
        ),
        (b"\0asm\x0d\x00\x01\x00", "component"),
    ],
    ids=["no-start", "non-wasi-import", "component"],
)
async def test_incompatible_module(
    backend: WasmBackend, artifacts: MemoryArtifacts, tmp_path: Path, data: bytes, needle: str
) -> None:
    run = wasm_run(artifacts, data, tmp_path)
    error = await expect_job_error(backend, run, JobErrorKind.IMAGE_NOT_COMPATIBLE)
    assert needle in error.description
