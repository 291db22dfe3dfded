"""Image tarballs on disk (supervisor.backends.image_tarball) and artifact downloads
(supervisor.artifacts): the caps, the errors, and the tag-stripping rewrite, without an
engine (tests/test_docker_backend.py loads the results into a real one)."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from protocol.exceptions import JobError, JobErrorKind
from supervisor.artifacts import ArtifactTooBig, MemoryArtifactSource, digest_of
from supervisor.backends import image_tarball
from supervisor.backends.image_tarball import Tarball, UnpackedTooBig, unpack

pytestmark = pytest.mark.unit

_MB = 1024 * 1024
CONFIG = json.dumps({"os": "linux", "architecture": "amd64"}).encode()
MANIFEST = [{"Config": "c.json", "RepoTags": ["shadow:latest"], "Layers": ["l/layer.tar"]}]


def tar_of(files: dict[str, bytes], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return out.getvalue()


def image_tar(layer: bytes = b"layer bytes") -> bytes:
    return tar_of(
        {
            "c.json": CONFIG,
            "l/layer.tar": layer,
            "manifest.json": json.dumps(MANIFEST).encode(),
            "repositories": b'{"shadow": {"latest": "x"}}',
        }
    )


@pytest.mark.parametrize(
    "compress", [gzip.compress, bz2.compress, lzma.compress], ids=["gzip", "bzip2", "xz"]
)
def test_unpack_refuses_past_the_cap(tmp_path: Path, compress: Callable[[bytes], bytes]) -> None:
    packed = tmp_path / "artifact"
    packed.write_bytes(compress(bytes(8 * _MB)))
    dest = tmp_path / "unpacked.tar"
    with pytest.raises(UnpackedTooBig) as refused:
        unpack(packed, dest, 4 * _MB)
    assert refused.value.kind == JobErrorKind.IMAGE_INVALID
    assert "unpacks to more than 4 MB" in refused.value.description
    assert not dest.exists()
    assert unpack(packed, dest, 8 * _MB) == dest and dest.stat().st_size == 8 * _MB


def test_unpack_of_a_plain_or_broken_tarball(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(image_tar())
    assert unpack(plain, tmp_path / "unused", _MB) == plain
    assert not (tmp_path / "unused").exists()
    with pytest.raises(UnpackedTooBig):
        unpack(plain, tmp_path / "unused", 1024)
    broken = tmp_path / "broken"
    broken.write_bytes(gzip.compress(image_tar())[:-20])
    with pytest.raises(JobError) as refused:
        unpack(broken, tmp_path / "out", _MB)
    assert "the compressed tarball is broken" in refused.value.description
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_stream_strips_the_tags_and_keeps_everything_else(tmp_path: Path, fmt: int) -> None:
    long_name = "blobs/" + "x" * 150  # needs a long-name header in either format
    path = tmp_path / "image.tar"
    files = {
        "c.json": CONFIG,
        long_name: b"\xff" * 1000,
        "l/layer.tar": bytes(range(256)) * (3 * image_tarball.CHUNK // 256 + 7),
        "manifest.json": json.dumps(MANIFEST).encode(),
        "index.json": json.dumps(
            {"manifests": [{"annotations": {"io.containerd.image.name": "shadow:latest"}}]}
        ).encode(),
        "repositories": b"{}",
    }
    path.write_bytes(tar_of(files, fmt))
    tarball = Tarball(path)
    [(image_id, config)] = tarball.images
    assert image_id == digest_of(CONFIG)
    assert config["_repo_tags"] == ["shadow:latest"] and config["os"] == "linux"
    chunks = list(tarball.stream())
    assert max(len(c) for c in chunks) <= image_tarball.CHUNK
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as rewritten:
        names = rewritten.getnames()
        got = {n: rewritten.extractfile(n).read() for n in names}  # type: ignore[union-attr]
    assert names == ["c.json", long_name, "l/layer.tar", "manifest.json", "index.json"]
    assert got["l/layer.tar"] == files["l/layer.tar"] and got[long_name] == files[long_name]
    assert json.loads(got["manifest.json"])[0]["RepoTags"] is None
    assert json.loads(got["index.json"]) == {"manifests": [{"annotations": {}}]}


def test_tarballs_that_are_not_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cases = {
        "garbage": (b"not a tar" * 100, "not an image tarball"),
        "zeros": (bytes(10240), "lacks manifest.json"),
        "no config": (tar_of({"manifest.json": json.dumps(MANIFEST).encode()}), "lacks c.json"),
        "huge json": (image_tar(), "too big for a JSON document"),
    }
    for name, (data, words) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        if name == "huge json":
            monkeypatch.setattr(image_tarball, "MAX_JSON_BYTES", 64)
        with pytest.raises(JobError) as refused:
            Tarball(path)
        assert refused.value.kind == JobErrorKind.IMAGE_INVALID
        assert words in refused.value.description, (name, refused.value)


def test_too_many_members(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_tarball, "MAX_MEMBERS", 3)
    path = tmp_path / "image.tar"
    path.write_bytes(image_tar())
    with pytest.raises(JobError, match="more than 3 entries"):
        Tarball(path)


async def test_download_verifies_and_caps(tmp_path: Path) -> None:
    source = MemoryArtifactSource()
    data = bytes(range(256)) * 4096
    digest = source.add(data)
    dest = tmp_path / "artifact"
    await source.download(digest, dest, len(data))
    assert dest.read_bytes() == data
    with pytest.raises(ArtifactTooBig) as refused:
        await source.download(digest, tmp_path / "small", len(data) - 1)
    assert refused.value.kind == JobErrorKind.IMAGE_INVALID
    assert not (tmp_path / "small").exists()
    source.blobs["sha256:" + "0" * 64] = data  # a source that lies about the content
    with pytest.raises(JobError, match="wrong content"):
        await source.download("sha256:" + "0" * 64, tmp_path / "lie", len(data))
    assert not (tmp_path / "lie").exists()
