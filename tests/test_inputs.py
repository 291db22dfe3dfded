"""Job inputs without processes: the spec's paths, the StartJob they become, which
supervisors may be sent them, and the supervisor placing them (files, tar archives,
hostile archives, the size limit, the cache)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import msgspec
import pytest

from protocol import codec
from protocol.exceptions import JobError, JobErrorKind
from protocol.messages import InputFile, StartJob, minor_needed, start_job
from protocol.spec import JobSpec, NoopBackend
from supervisor import metrics
from supervisor.artifacts import MemoryArtifactSource
from supervisor.inputs import InputCache, place_inputs, remove_run_dir
from switchboard.artifacts import named_artifacts
from switchboard.models import QueuedJob
from switchboard.scheduler import Candidate, FleetMember, plan, unsatisfiable_reason

pytestmark = pytest.mark.unit

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def _spec(inputs: dict[str, str]) -> bytes:
    return msgspec.json.encode({"name": "j", "backend": {"kind": "noop"}, "inputs": inputs})


# --- the spec ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["data.txt", "fw/zephyr.bin", "tests/", "a/b/c/", ".hidden", "..a", "v1.2+x_y-z"]
)
def test_good_input_paths(path: str) -> None:
    assert codec.decode_job_spec(_spec({path: D1})).inputs == {path: D1}


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/etc/passwd",
        "..",
        "../x",
        "a/../b",
        "a/..",
        "./a",
        "a/./b",
        "a/.",
        ".",
        "a//b",
        "/",
        "a b",
        "a\n",
        "x" * 257,
        "ü",
    ],
)
def test_bad_input_paths_are_refused_naming_the_field(path: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$\.inputs"):
        codec.decode_job_spec(_spec({path: D1}))


def test_a_bad_digest_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$\.inputs\[\.\.\.\]"):
        codec.decode_job_spec(_spec({"a": "sha256:XYZ"}))


@pytest.mark.parametrize(
    "paths", [("a", "a/b"), ("t/", "t/x"), ("a", "a/"), ("d/", "d/e/"), ("x/y", "x/y/z/")]
)
def test_overlapping_inputs_are_refused(paths: tuple[str, str]) -> None:
    with pytest.raises(msgspec.ValidationError, match="overlap"):
        codec.decode_job_spec(_spec(dict.fromkeys(paths, D1)))


def test_side_by_side_inputs_are_fine() -> None:
    spec = codec.decode_job_spec(_spec({"a": D1, "ab": D1, "a.b/": D2, "sub/x": D1, "sub/y": D2}))
    assert len(spec.inputs) == 5


def test_at_most_64_inputs() -> None:
    codec.decode_job_spec(_spec({f"f{i}": D1 for i in range(64)}))
    with pytest.raises(msgspec.ValidationError, match="64"):
        codec.decode_job_spec(_spec({f"f{i}": D1 for i in range(65)}))


# --- the wire ----------------------------------------------------------------------------


def test_start_job_carries_the_inputs_and_needs_1_3() -> None:
    spec = JobSpec(name="j", backend=NoopBackend(), inputs={"fw.bin": D1, "tests/": D2})
    start = start_job("job-1", 1, spec)
    assert start.inputs == [
        InputFile(path="fw.bin", digest=D1),
        InputFile(path="tests", digest=D2, unpack=True),
    ]
    assert minor_needed(spec) == 3
    assert minor_needed(JobSpec(name="j", backend=NoopBackend())) == 0
    decoded = codec.decode_from_switchboard(codec.encode(start))
    assert isinstance(decoded, StartJob) and decoded.inputs == start.inputs
    # Without inputs the field is left out: what a 1.2 supervisor always got.
    plain = JobSpec(name="j", backend=NoopBackend())
    assert b"inputs" not in codec.encode(start_job("job-1", 1, plain))


def test_the_switchboard_keeps_what_inputs_name() -> None:
    spec = JobSpec(name="j", backend=NoopBackend(), inputs={"fw.bin": D1, "tests/": D2})
    assert named_artifacts(spec) == [("inputs['fw.bin']", D1), ("inputs['tests/']", D2)]


# --- placement ---------------------------------------------------------------------------


def _queued(spec: JobSpec) -> QueuedJob:
    return QueuedJob("job-1", 1, 0, spec, 0.0, None)


def test_a_job_with_inputs_goes_only_to_a_1_3_supervisor() -> None:
    spec = JobSpec(name="j", backend=NoopBackend(), inputs={"a": D1})
    old = Candidate(id="old", backends=["noop"], labels={}, free=1, minor=2)
    new = Candidate(id="new", backends=["noop"], labels={}, free=1, running=3, minor=3)
    assert plan([_queued(spec)], [old], now=0.0) == []
    assert plan([_queued(spec)], [old, new], now=0.0) == [("job-1", "new")]
    # Without inputs, the less loaded old one is fine.
    plain = JobSpec(name="j", backend=NoopBackend())
    assert plan([_queued(plain)], [old, new], now=0.0) == [("job-1", "old")]


def test_unschedulable_says_the_version_is_too_old() -> None:
    spec = JobSpec(name="j", backend=NoopBackend(), inputs={"a": D1})
    old = FleetMember(id="old", backends=["noop"], labels={}, resources={}, max_jobs=1, minor=2)
    reason = unsatisfiable_reason(spec, [old])
    assert reason is not None and "1.3" in reason and "1.2" in reason
    new = FleetMember(id="new", backends=["noop"], labels={}, resources={}, max_jobs=1, minor=3)
    assert unsatisfiable_reason(spec, [old, new]) is None


# --- the supervisor places them ----------------------------------------------------------


def _tar(members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None, mode="w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for member in members:
            body = (data or {}).get(member.name)
            if body is not None:
                member.size = len(body)
            tar.addfile(member, io.BytesIO(body) if body is not None else None)
    return buf.getvalue()


def _file(name: str, mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = mode
    return info


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _cache(tmp_path: Path, *blobs: bytes) -> tuple[InputCache, list[str]]:
    source = MemoryArtifactSource()
    digests = [source.add(b) for b in blobs]
    return InputCache(source, tmp_path / "cache", 1 << 30), digests


async def test_files_and_an_unpacked_archive_are_placed_read_only(tmp_path: Path) -> None:
    archive = _tar(
        [_dir("suite"), _file("suite/case.txt"), _file("run.sh", 0o755)],
        {"suite/case.txt": b"case one\n", "run.sh": b"#!/bin/sh\n"},
        mode="w:gz",
    )
    cache, (data, tests) = _cache(tmp_path, b"hello input\n", archive)
    work = tmp_path / "run"
    inputs = [InputFile("data.txt", data), InputFile("deep/tests", tests, unpack=True)]
    root = await place_inputs(inputs, work, cache, 1 << 20)
    assert root == work / "in"
    assert (root / "data.txt").read_bytes() == b"hello input\n"
    assert (root / "deep/tests/suite/case.txt").read_bytes() == b"case one\n"
    assert stat.S_IMODE((root / "data.txt").stat().st_mode) == 0o444
    assert stat.S_IMODE((root / "deep/tests/run.sh").stat().st_mode) == 0o555
    for directory in (root, root / "deep", root / "deep/tests", root / "deep/tests/suite"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o555, directory
    if os.geteuid() != 0:  # root writes anyway; the backends' read-only mounts stop it
        with pytest.raises(PermissionError):
            (root / "data.txt").write_bytes(b"changed")
    # The same artifacts again: from the cache, checked, not fetched again.
    await place_inputs(inputs, tmp_path / "run2", cache, 1 << 20)
    assert (cache.downloads, cache.hits) == (2, 2)
    remove_run_dir(work)
    assert not work.exists()


async def test_links_inside_an_archive_are_kept(tmp_path: Path) -> None:
    members = [_file("a.txt"), _link("s", "a.txt"), _link("h", "a.txt", tarfile.LNKTYPE)]
    cache, (digest,) = _cache(tmp_path, _tar(members, {"a.txt": b"linked"}))
    root = await place_inputs([InputFile("t", digest, unpack=True)], tmp_path / "r", cache, 1 << 20)
    assert (root / "t/s").is_symlink() and (root / "t/s").read_bytes() == b"linked"
    assert (root / "t/h").read_bytes() == b"linked"


@pytest.mark.parametrize(
    ("members", "why"),
    [
        ([_file("../escape")], "outside"),
        ([_file("ok/../../escape")], "outside"),
        ([_file("/etc/evil")], "absolute"),
        ([_link("out", "/etc/passwd")], "absolute"),
        ([_link("out", "../../x")], "outside"),
        ([_link("hard", "../x", tarfile.LNKTYPE)], "outside"),
        ([_link("dev", "", tarfile.CHRTYPE)], "special"),
        ([_link("fifo", "", tarfile.FIFOTYPE)], "special"),
    ],
)
async def test_a_hostile_archive_fails_the_run(tmp_path: Path, members, why: str) -> None:
    blob = _tar(members, {m.name: b"x" for m in members if m.isfile()})
    cache, (digest,) = _cache(tmp_path, blob)
    with pytest.raises(JobError) as caught:
        await place_inputs([InputFile("t", digest, unpack=True)], tmp_path / "run", cache, 1 << 20)
    assert caught.value.kind == JobErrorKind.INPUT_INVALID
    assert "input 't/'" in caught.value.description and why in caught.value.description.lower()
    assert not (tmp_path / "escape").exists() and not (tmp_path / "run" / "escape").exists()


async def test_not_an_archive_fails_the_run(tmp_path: Path) -> None:
    cache, (digest,) = _cache(tmp_path, b"just some bytes, not a tar" * 40)
    with pytest.raises(JobError, match="input_invalid: input 't/'") as caught:
        await place_inputs([InputFile("t", digest, unpack=True)], tmp_path / "run", cache, 1 << 20)
    assert "ReadError" in caught.value.description


async def test_inputs_over_the_limit_fail_the_run(tmp_path: Path) -> None:
    big = _tar([_file("zeros")], {"zeros": bytes(300_000)}, mode="w:gz")
    cache, (small, packed) = _cache(tmp_path, b"x" * 100_000, big)
    limit = 200_000
    exceeded = metrics.LIMITS_EXCEEDED.labels("inputs")
    before = exceeded._value.get()
    await place_inputs([InputFile("a", small)], tmp_path / "r1", cache, limit)
    with pytest.raises(JobError, match="more than") as caught:  # unpacks to more
        await place_inputs([InputFile("t", packed, unpack=True)], tmp_path / "r2", cache, limit)
    assert caught.value.kind == JobErrorKind.INPUT_INVALID
    with pytest.raises(JobError, match="more than"):  # together more
        files = [InputFile("a", small), InputFile("b", small), InputFile("c", small)]
        await place_inputs(files, tmp_path / "r3", cache, limit)
    assert exceeded._value.get() == before + 2  # counted


async def test_an_unknown_artifact_fails_the_run(tmp_path: Path) -> None:
    cache, _ = _cache(tmp_path)
    with pytest.raises(JobError, match=f"input 'a' \\({D1}\\): artifact {D1} does not exist"):
        await place_inputs([InputFile("a", D1)], tmp_path / "run", cache, 1 << 20)


async def test_a_damaged_cached_copy_is_fetched_again(tmp_path: Path) -> None:
    cache, (digest,) = _cache(tmp_path, b"the real content")
    await place_inputs([InputFile("a", digest)], tmp_path / "r1", cache, 1 << 20)
    cached = tmp_path / "cache" / digest.replace(":", "-")
    os.chmod(cached, 0o644)
    cached.write_bytes(b"tampered")
    root = await place_inputs([InputFile("a", digest)], tmp_path / "r2", cache, 1 << 20)
    assert (root / "a").read_bytes() == b"the real content"
    assert cache.downloads == 2


async def test_the_cache_keeps_to_its_bound(tmp_path: Path) -> None:
    source = MemoryArtifactSource()
    digests = [source.add(bytes([i]) * 1000) for i in range(5)]
    cache = InputCache(source, tmp_path / "cache", 2500)
    for i, digest in enumerate(digests):
        await place_inputs([InputFile("a", digest)], tmp_path / f"r{i}", cache, 1 << 20)
    assert sum(p.stat().st_size for p in (tmp_path / "cache").iterdir()) <= 2500
    assert (tmp_path / "cache" / digests[-1].replace(":", "-")).exists()
