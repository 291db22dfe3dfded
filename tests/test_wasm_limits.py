"""The wasm backend's limits and its disk cache.

Limits are driven through a BackendSupervisor and a RecordingConnector, because what
matters is the phase a run ends in and the exit report the switchboard gets. The disk
cache (supervisor.backends.wasm_cache) is tested on its own too: it is plain file logic.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import wasmtime

from protocol.messages import (
    JobErrorReport,
    JobExit,
    JobStateChanged,
    StartJob,
    SupervisorEvent,
)
from protocol.spec import WasmBackend as WasmSpec
from supervisor import metrics
from supervisor.artifacts import MemoryArtifactSource as MemoryArtifacts
from supervisor.artifacts import digest_of
from supervisor.backends.wasm import WasmBackend
from supervisor.backends.wasm_cache import MAGIC, DiskCache
from supervisor.jobs import BackendSupervisor
from tests.harness import scaled
from tests.recording import RecordingConnector
from tests.wasm_run import Run, finish

pytestmark = [pytest.mark.wasm, pytest.mark.timeout(60)]

#: The guest must stop within 100 ms of its deadline; asserted loosely (a shared, noisy
#: machine), the measured value is printed.
DEADLINE_SLACK_S = 0.5


class TimedRecorder(RecordingConnector):
    """A RecordingConnector that also notes when each event was sent."""

    def __init__(self, supervisor: BackendSupervisor) -> None:
        super().__init__(supervisor)
        self.times: list[float] = []

    async def send_event(self, event: SupervisorEvent) -> None:
        self.times.append(time.monotonic())
        await super().send_event(event)

    def when(self, job_id: str, phase: str) -> float:
        for event, at in zip(self.events, self.times, strict=True):
            if isinstance(event, JobStateChanged) and event.job_id == job_id:
                if event.phase.value == phase:
                    return at
        raise AssertionError(f"{job_id} never reached {phase}")

    def exit(self, job_id: str) -> JobExit:
        return next(e for e in self.events if isinstance(e, JobExit) and e.job_id == job_id)

    def stages(self, job_id: str) -> list[tuple[str | None, str | None]]:
        return [
            (e.stage, e.message)
            for e in self.events
            if isinstance(e, JobStateChanged) and e.job_id == job_id and e.phase == "initializing"
        ]


class Lab:
    """A supervisor on a wasm backend, with helpers to submit modules and wait."""

    _ids = itertools.count(1)

    def __init__(
        self, backend: WasmBackend, artifacts: MemoryArtifacts, work_dir: Path, build
    ) -> None:
        self.backend = backend
        self.artifacts = artifacts
        self.build = build
        self.supervisor = BackendSupervisor(backend, max_jobs=8, work_dir=work_dir)
        self.rec = TimedRecorder(self.supervisor)

    async def start(
        self,
        module: str | bytes,
        *args: str,
        timeout_s: float | None = None,
        **spec,
    ) -> str:
        data = self.build(module) if isinstance(module, str) else module
        job_id = f"job-{next(self._ids)}"
        backend = WasmSpec(module=self.artifacts.add(data), args=list(args), **spec)
        await self.supervisor.start_job(
            StartJob(job_id=job_id, attempt=1, backend=backend, name="t", timeout_s=timeout_s)
        )
        return job_id

    async def run(self, module: str | bytes, *args: str, **kw) -> tuple[str, str, JobExit]:
        job_id = await self.start(module, *args, **kw)
        phase = await self.rec.wait_ended(job_id)
        return job_id, phase, self.rec.exit(job_id)


@pytest_asyncio.fixture
async def lab_factory(program, tmp_path: Path) -> AsyncIterator[Callable[..., Lab]]:
    backends: list[WasmBackend] = []

    def make(work_dir: Path | None = None, **backend_args) -> Lab:
        artifacts = MemoryArtifacts()
        backend = WasmBackend(artifacts, **backend_args)
        backends.append(backend)
        return Lab(backend, artifacts, work_dir or tmp_path / f"sup{len(backends)}", program)

    yield make
    for backend in backends:
        await backend.close()


@pytest.fixture
def lab(lab_factory) -> Lab:
    return lab_factory()


# --- plain runs through the supervisor ---------------------------------------------------


async def test_exit_code_streams_and_phases(lab: Lab) -> None:
    job, phase, exit_ = await lab.run("HELLO_ARGS_ENV", "7", env={"GREETING": "hi"})
    assert (phase, exit_.exit_code, exit_.reason) == ("failed", 7, "exited")
    assert lab.rec.phases(job) == ["initializing"] * 4 + ["running", "failed"]
    assert [s for s, _ in lab.rec.stages(job)] == ["accepted", "fetching", "compiling", "starting"]
    assert lab.rec.output(job, "stdout").decode().splitlines() == [
        "argv[0]=t",
        "argv[1]=7",
        "GREETING=hi",
        "host fs: hidden",
    ]
    assert lab.rec.output(job, "stderr") == b"hello on stderr\n"


async def test_trap_fails_with_backtrace(lab: Lab) -> None:
    _, phase, exit_ = await lab.run("TRAP")
    assert (phase, exit_.exit_code, exit_.reason) == ("failed", None, "trap")
    assert exit_.message and "wasm backtrace" in exit_.message and "crash_here" in exit_.message


async def test_wrong_digest_is_refused(lab: Lab, program) -> None:
    digest = digest_of(b"what was promised")
    lab.artifacts.blobs[digest] = program("HELLO_ARGS_ENV")
    await lab.supervisor.start_job(
        StartJob(job_id="liar", attempt=1, backend=WasmSpec(module=digest))
    )
    assert await lab.rec.wait_ended("liar") == "rejected"
    [error] = [e for e in lab.rec.events if isinstance(e, JobErrorReport)]
    assert error.kind == "image_invalid"
    assert "running" not in lab.rec.phases("liar")


async def test_scratch_is_deleted_after_the_run(lab: Lab) -> None:
    job, phase, _ = await lab.run("SCRATCH_RW", "kept for the run only")
    assert phase == "succeeded"
    assert lab.rec.output(job) == b"read back: kept for the run only\n"
    runs = lab.supervisor.work_dir / "runs"
    assert not runs.exists() or list(runs.iterdir()) == []


# --- wall-clock timeout --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "args", "spec"),
    [
        ("SPIN", (), {}),
        ("SLEEPER", ("60000",), {}),
        ("SPIN", (), {"fuel": 2**62}),  # the fuel engine is interrupted by epochs too
    ],
    ids=["spinning", "sleeping", "spinning-with-fuel"],
)
async def test_timeout_stops_the_guest_at_its_deadline(
    lab: Lab, source: str, args: tuple[str, ...], spec: dict
) -> None:
    lab.build(source)  # compiled by clang before the clock starts
    # Long enough for wasmtime to compile the module before the deadline even on a loaded
    # machine (the timer runs from the run's acceptance): the guest must be running when
    # it is stopped.
    timeout_s = 1.5
    before = time.monotonic()
    job = await lab.start(source, *args, timeout_s=timeout_s, **spec)
    phase = await lab.rec.wait_ended(job)
    ended = lab.rec.when(job, "timed_out")
    assert phase == "timed_out"
    assert lab.rec.exit(job).reason == "timeout"
    assert lab.rec.phases(job)[-3:] == ["running", "terminating", "timed_out"]
    # The deadline is when the supervisor's timer fired (it reports "terminating" then);
    # `before + timeout_s` is a little earlier still, so that latency is an upper bound.
    latency = ended - lab.rec.when(job, "terminating")
    upper = ended - (before + timeout_s)
    print(
        f"timeout stop ({source}{' with fuel' if spec else ''}): {latency * 1000:.1f} ms "
        f"after the deadline (at most {upper * 1000:.1f} ms)"
    )
    assert latency < DEADLINE_SLACK_S
    assert upper < DEADLINE_SLACK_S


# --- memory ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend_mb", "spec_mb", "cap_mb"),
    [(1024, 16, 16), (24, None, 24), (24, 64, 24)],
    ids=["job-limit", "host-default", "job-asks-more-than-host-maximum"],
)
async def test_memory_bomb_is_stopped_by_its_cap(
    lab_factory, backend_mb: int, spec_mb: int | None, cap_mb: int
) -> None:
    lab = lab_factory(memory_limit_mb=backend_mb)
    job, phase, exit_ = await lab.run("MEMORY_BOMB", memory_limit_mb=spec_mb)
    # malloc returned NULL inside the guest, which then exited 3 by itself.
    assert (phase, exit_.exit_code, exit_.reason) == ("failed", 3, "exited")
    allocated = int(lab.rec.output(job).split()[1])
    assert cap_mb - 4 <= allocated < cap_mb
    assert exit_.message is not None and f"of its {cap_mb} MB limit" in exit_.message
    starting = dict(lab.rec.stages(job))["starting"]
    assert starting is not None and f"memory limit {cap_mb} MB" in starting
    if spec_mb is not None and spec_mb > cap_mb:
        assert "maximum" in starting


#: A WASI command whose memory starts at 4 MiB.
FOUR_MB_MEMORY = bytes(
    wasmtime.wat2wasm('(module (memory (export "memory") 64) (func (export "_start")))')
)


async def test_initial_memory_over_the_cap_fails_to_start(lab: Lab) -> None:
    job, phase, exit_ = await lab.run(FOUR_MB_MEMORY, memory_limit_mb=2)
    assert (phase, exit_.exit_code, exit_.reason) == ("failed", None, "memory_limit")
    assert exit_.message is not None and "memory limit of 2 MB" in exit_.message
    assert "running" not in lab.rec.phases(job)
    _, phase, _ = await lab.run(FOUR_MB_MEMORY, memory_limit_mb=5)
    assert phase == "succeeded"


# --- fuel -----------------------------------------------------------------------------


async def test_fuel_exhaustion_fails_the_run(lab: Lab) -> None:
    job, phase, exit_ = await lab.run("SPIN", fuel=10_000_000)
    assert (phase, exit_.exit_code, exit_.reason) == ("failed", None, "out_of_fuel")
    assert exit_.message is not None and "out of fuel" in exit_.message
    assert lab.rec.output(job) == b"spinning\n"  # it ran until the budget was spent


async def test_enough_fuel_lets_the_guest_finish(lab: Lab) -> None:
    job, phase, exit_ = await lab.run("WRITE_BYTES", "100000", fuel=10**9)
    assert (phase, exit_.exit_code) == ("succeeded", 0)
    assert len(lab.rec.output(job)) == 100000
    assert "fuel 1000000000" in (dict(lab.rec.stages(job))["starting"] or "")


async def test_sleeping_costs_no_fuel(lab: Lab) -> None:
    # Fuel counts instructions, not time: a sleeper uses almost none while it sleeps.
    _, phase, _ = await lab.run("SLEEPER", "20", "5", fuel=10**8)
    assert phase == "succeeded"


# --- scratch quota ----------------------------------------------------------------------

_MB = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A file system of 96 MiB (a tmpfs) for the supervisor's work dir: small enough for a
    guest to fill. Mounting needs root, like the Docker tests: fails (never skips) without."""
    if os.geteuid() != 0:
        pytest.fail("the scratch quota tests mount a small tmpfs: run them as root", pytrace=False)
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _scratch_held(exit_: JobExit) -> float:
    """The MB a scratch_limit exit message says /scratch held."""
    match = re.search(r"/scratch held ([\d.]+) MB", exit_.message or "")
    assert match, exit_
    return float(match.group(1))


@pytest.mark.parametrize(
    "args",
    [(), ("unlink",), ("files", "3500")],
    ids=["file", "deleted-but-open-file", "many-files-first"],
)
async def test_scratch_quota_stops_a_guest_that_fills_it(
    lab_factory, small_disk: Path, args: tuple[str, ...]
) -> None:
    """On a 96 MiB file system, with a 16 MB quota: writing to a file, to a file deleted
    while open, and after 3500 empty files (14 MB counted, and a slow walk)."""
    lab = lab_factory(work_dir=small_disk / "work", scratch_limit_mb=16)
    exceeded = metrics.LIMITS_EXCEEDED.labels("wasm_scratch")
    before = exceeded._value.get()
    job, phase, exit_ = await lab.run("FILL_SCRATCH", *args, timeout_s=scaled(20))
    assert (phase, exit_.exit_code, exit_.reason) == ("failed", None, "scratch_limit")
    assert "scratch quota exceeded" in (exit_.message or "") and "16 MB" in (exit_.message or "")
    held = _scratch_held(exit_)
    print(f"scratch quota 16 MB ({' '.join(args) or 'write'}): stopped holding {held:.1f} MB")
    assert 16 <= held < 64  # what it wrote in the ticks before a check caught it
    assert exceeded._value.get() == before + 1
    assert "scratch 16 MB" in (dict(lab.rec.stages(job))["starting"] or "")
    assert shutil.disk_usage(small_disk).used < _MB  # all gone with the run


async def test_scratch_quota_isolates_neighbours(lab_factory, small_disk: Path) -> None:
    """A guest filling the work dir's file system is stopped at its quota; a neighbour
    writing a little all the while never sees "No space left on device"."""
    lab = lab_factory(work_dir=small_disk / "work", scratch_limit_mb=16)
    neighbour = await lab.start("STEADY_WRITER", "40", "50")
    await lab.rec.wait_output(neighbour, b"started\n")
    bomb = await lab.start("FILL_SCRATCH", timeout_s=scaled(20))
    assert await lab.rec.wait_ended(neighbour) == "succeeded", lab.rec.output(neighbour, "stderr")
    assert lab.rec.output(neighbour) == b"started\nwrote %d bytes\n" % (40 * 65536)
    assert await lab.rec.wait_ended(bomb) == "failed"
    assert lab.rec.exit(bomb).reason == "scratch_limit"


async def test_scratch_quota_counts_every_file(lab_factory) -> None:
    lab = lab_factory(scratch_limit_mb=16)  # each file counts 4 KiB at least: 4096 fit
    job, phase, _ = await lab.run("MANY_FILES", "1000")
    assert (phase, lab.rec.output(job)) == ("succeeded", b"created 1000\n")
    _, phase, exit_ = await lab.run("MANY_FILES", "10000")
    assert (phase, exit_.reason) == ("failed", "scratch_limit")
    assert 16 <= _scratch_held(exit_) <= 10000 * 4096 / _MB


# --- the disk cache, through the backend ------------------------------------------------


async def test_disk_cache_stays_within_its_bound(program, tmp_path: Path) -> None:
    artifacts = MemoryArtifacts()
    order = ["TRAP", "WRITE_BYTES", "CAT_STDIN", "HELLO_ARGS_ENV"]
    digests = {name: artifacts.add(program(name)).removeprefix("sha256:") for name in order}

    async def run_all(backend: WasmBackend, names: list[str], cache: DiskCache) -> list[str]:
        stages = []
        try:
            for name in names:
                run = _run(artifacts, program(name), tmp_path)
                await finish(backend, run)
                stages.append(run.stages[0])
                assert cache.total_bytes() <= cache.max_bytes
        finally:
            await backend.close()
        return stages

    # What each module takes on disk (bytes + compiled code), with room for all.
    probe = DiskCache(tmp_path / "probe", 1 << 30)
    await run_all(WasmBackend(artifacts, cache_dir=probe.root), order, probe)
    size = {n: sum(e.size for e in probe.entries() if e.name.startswith(digests[n])) for n in order}

    # Room for exactly the last two: the first two must go, oldest first.
    bound = size["CAT_STDIN"] + size["HELLO_ARGS_ENV"]
    cache = DiskCache(tmp_path / "cache", bound)
    await run_all(WasmBackend(artifacts, cache_dir=cache.root, cache_max_bytes=bound), order, cache)
    kept = {e.name.split(".")[0] for e in cache.entries()}
    assert kept == {digests["CAT_STDIN"], digests["HELLO_ARGS_ENV"]}

    again = WasmBackend(artifacts, cache_dir=cache.root, cache_max_bytes=bound)
    assert await run_all(again, ["HELLO_ARGS_ENV", "TRAP"], cache) == ["cached", "fetching"]


def _run(artifacts: MemoryArtifacts, data: bytes, tmp_path: Path) -> Run:
    return Run(WasmSpec(module=artifacts.add(data)), tmp_path / "work")


# --- DiskCache on its own ---------------------------------------------------------------


def test_cache_round_trip(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "c", 10_000)
    assert cache.get("a.bin") is None
    assert cache.put("a.bin", b"\0payload\xff")
    assert cache.get("a.bin") == b"\0payload\xff"
    assert cache.put("a.bin", b"replaced")
    assert cache.get("a.bin") == b"replaced"
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["a.bin"]  # no temp files left
    assert (tmp_path / "c" / "a.bin").read_bytes().startswith(MAGIC)
    cache.discard("a.bin")
    cache.discard("a.bin")
    assert cache.get("a.bin") is None


def test_cache_evicts_least_recently_used(tmp_path: Path) -> None:
    entry = 1000
    size = len(MAGIC) + 32 + entry
    cache = DiskCache(tmp_path, 3 * size)
    for name in "abc":
        cache.put(name, name.encode() * entry)
    assert cache.get("a") is not None  # a is now more recent than b
    cache.put("d", b"d" * entry)
    assert sorted(e.name for e in cache.entries()) == ["a", "c", "d"]
    assert cache.total_bytes() == 3 * size
    cache.put("big", b"x" * (2 * entry))  # needs two places: c and a (in that order) go
    assert sorted(e.name for e in cache.entries()) == ["big", "d"]
    assert cache.total_bytes() <= 3 * size


def test_cache_refuses_an_entry_over_the_bound(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 500)
    cache.put("small", b"s")
    assert not cache.put("huge", bytes(1000))
    assert cache.get("huge") is None
    assert cache.get("small") == b"s"  # nothing was evicted for it


def test_processes_sharing_a_directory_stay_within_the_bound(tmp_path: Path) -> None:
    one, two = DiskCache(tmp_path, 5000), DiskCache(tmp_path, 5000)
    for i in range(20):
        (one if i % 2 else two).put(f"e{i}", bytes(1000))
        assert one.total_bytes() <= 5000


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[:-1],  # cut short
        lambda raw: raw[:10],  # cut inside the header
        lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]),  # one bit flipped
        lambda raw: b"",  # empty
        lambda raw: b"not a cache file at all",
    ],
    ids=["truncated", "header-only", "bit-flip", "empty", "foreign"],
)
def test_corrupt_entry_reads_as_a_miss_and_is_deleted(tmp_path: Path, damage) -> None:
    cache = DiskCache(tmp_path, 10_000)
    cache.put("entry", b"good content " * 10)
    path = tmp_path / "entry"
    path.write_bytes(damage(path.read_bytes()))
    assert cache.get("entry") is None
    assert not path.exists()
    cache.put("entry", b"fresh")
    assert cache.get("entry") == b"fresh"


def test_stale_temporary_files_are_removed(tmp_path: Path) -> None:
    stale, fresh = tmp_path / ".tmp-x.1.aa", tmp_path / ".tmp-y.2.bb"
    stale.write_bytes(b"left by a crash")
    fresh.write_bytes(b"being written by another process")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    cache = DiskCache(tmp_path, 10_000)
    assert not stale.exists() and fresh.exists()
    assert cache.entries() == []  # temporaries are never entries


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x" * 300])
def test_entry_names_cannot_leave_the_directory(tmp_path: Path, name: str) -> None:
    cache = DiskCache(tmp_path / "c", 10_000)
    with pytest.raises(ValueError):
        cache.put(name, b"x")
    with pytest.raises(ValueError):
        cache.get(name)


async def test_cache_calls_are_thread_safe(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, 20 * 1100)

    def churn(worker: int) -> None:
        for i in range(50):
            name = f"k{(worker + i) % 30}"
            cache.put(name, bytes([worker]) * 1000)
            got = cache.get(name)
            assert got is None or (len(got) == 1000 and len(set(got)) == 1)

    await asyncio.gather(*(asyncio.to_thread(churn, w) for w in range(8)))
    assert cache.total_bytes() <= 20 * 1100
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]
