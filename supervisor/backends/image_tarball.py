"""A `docker save` tarball on disk, read with bounded memory: unpacked under a size cap,
its tags stripped, streamed to the engine.

Why a module of its own: an image artifact is untrusted input that can be far larger
unpacked than uploaded (a few hundred KB of gzip can hold gigabytes of zeros). Everything
here works in chunks of CHUNK bytes from files under the supervisor's work dir, so the
supervisor's memory does not grow with the image: the decompressed bytes are counted as
they are written and refused past the cap, only the small JSON documents (manifest, index,
image configs) are ever read whole, and the member index is bounded by MAX_MEMBERS.

All functions block (file I/O, decompression): call them from a worker thread, and iterate
`Tarball.stream()` from one.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from protocol.exceptions import JobError, JobErrorKind
from protocol.limits import clip_message

#: Bytes read, decompressed or sent at a time.
CHUNK = 1024 * 1024
#: Entries a tarball may have (an image has a few per layer).
MAX_MEMBERS = 50_000
#: Largest manifest, index or image config read.
MAX_JSON_BYTES = 16 * 1024 * 1024

_MB = 1024 * 1024
_BLOCK = tarfile.BLOCKSIZE
#: Compressed formats the engine's `docker load` accepts too, by their magic bytes.
_COMPRESSIONS = (
    (b"\x1f\x8b", "gzip", gzip.open),
    (b"BZh", "bzip2", bz2.open),
    (b"\xfd7zXZ\x00", "xz", lzma.open),
)


class UnpackedTooBig(JobError):
    """The tarball unpacks to more than the cap (JobError image_invalid)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            JobErrorKind.IMAGE_INVALID,
            f"the image tarball unpacks to more than {limit // _MB} MB, this supervisor's "
            "limit (docker config max_image_unpacked_mb)",
        )


def unpack(path: Path, dest: Path, limit: int) -> Path:
    """The uncompressed tarball: `path` itself if it isn't compressed, else `dest`, written
    from `path` decompressed. Raises UnpackedTooBig past `limit` bytes (`dest` is then
    removed), JobError(image_invalid) if the compressed data is broken."""
    with open(path, "rb") as raw:
        head = raw.read(8)
    opener = next((op for magic, _, op in _COMPRESSIONS if head.startswith(magic)), None)
    if opener is None:
        if path.stat().st_size > limit:
            raise UnpackedTooBig(limit)
        return path
    written = 0
    try:
        with opener(path, "rb") as source, open(dest, "wb") as out:
            while chunk := source.read(CHUNK):  # at most CHUNK decompressed bytes at once
                written += len(chunk)
                if written > limit:
                    raise UnpackedTooBig(limit)
                out.write(chunk)
    except JobError:
        dest.unlink(missing_ok=True)
        raise
    except (OSError, EOFError, lzma.LZMAError) as exc:  # gzip.BadGzipFile is an OSError
        dest.unlink(missing_ok=True)
        raise JobError(
            JobErrorKind.IMAGE_INVALID,
            clip_message(f"the compressed tarball is broken: {exc}") or "",
        ) from None
    return dest


class Tarball:
    """An uncompressed `docker save` tarball: which images it holds, and its bytes without
    the tags (so loading it can't replace an image the host has under some name)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        #: Regular members: name -> (offset of the data, size).
        self._files: dict[str, tuple[int, int]] = {}
        count = 0
        for member in _members(path):
            count += 1
            if count > MAX_MEMBERS:
                raise JobError(
                    JobErrorKind.IMAGE_INVALID,
                    f"the image tarball has more than {MAX_MEMBERS} entries",
                )
            if member.issparse():
                raise JobError(
                    JobErrorKind.IMAGE_INVALID,
                    clip_message(f"the image tarball has a sparse file: {member.name}") or "",
                )
            if member.isreg():
                self._files[_member_name(member.name)] = (member.offset_data, member.size)
        self._manifest, self._index, self.images = self._read_images()

    def _read_images(self) -> tuple[list[Any], Any, list[tuple[str, dict[str, Any]]]]:
        """The manifest with its tags removed, the index (OCI layout) with its names
        removed, and per image its engine id and config (its tags under `_repo_tags`)."""
        try:
            manifest = json.loads(self._read("manifest.json"))
            if not isinstance(manifest, list) or not manifest:
                raise ValueError("manifest.json lists no images")
            images: list[tuple[str, dict[str, Any]]] = []
            for item in manifest:
                config_bytes = self._read(item["Config"])
                config = json.loads(config_bytes)
                if not isinstance(config, dict):
                    raise ValueError(f"{item['Config']} is not an image config")
                config["_repo_tags"] = [str(t) for t in item.get("RepoTags") or []]
                item["RepoTags"] = None
                images.append(("sha256:" + hashlib.sha256(config_bytes).hexdigest(), config))
            index = json.loads(self._read("index.json")) if "index.json" in self._files else None
        except JobError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
            raise JobError(
                JobErrorKind.IMAGE_INVALID, clip_message(f"not a usable image tarball: {exc}") or ""
            ) from None
        if isinstance(index, dict):  # OCI layout: names live in annotations
            for descriptor in index.get("manifests") or []:
                if not isinstance(descriptor, dict):
                    continue
                annotations = descriptor.get("annotations")
                if isinstance(annotations, dict):
                    annotations.pop("io.containerd.image.name", None)
                    annotations.pop("org.opencontainers.image.ref.name", None)
        return manifest, index, images

    def _read(self, name: str) -> bytes:
        """A small member's bytes (JobError if it is missing or too big to be JSON)."""
        found = self._files.get(_member_name(str(name)))
        if found is None:
            raise JobError(JobErrorKind.IMAGE_INVALID, f"the image tarball lacks {name}")
        offset, size = found
        if size > MAX_JSON_BYTES:
            raise JobError(
                JobErrorKind.IMAGE_INVALID,
                f"{name} in the image tarball is {size} bytes, too big for a JSON document",
            )
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def stream(self) -> Iterator[bytes]:
        """The tarball's bytes without its tags, in chunks of at most CHUNK bytes: the
        same members in the same order, but no `repositories` and the manifest and index
        rewritten."""
        replaced = {
            "manifest.json": json.dumps(self._manifest).encode(),
            "index.json": json.dumps(self._index).encode(),
        }
        with open(self.path, "rb") as data:
            for member in _members(self.path):
                name = _member_name(member.name)
                if name == "repositories":
                    continue
                if name in replaced and member.isreg():
                    body = replaced[name]
                    member.size = len(body)
                    yield _header(member)
                    yield body + _padding(len(body))
                    continue
                if not member.isreg():
                    member.size = 0  # links, directories: a header only
                    yield _header(member)
                    continue
                yield _header(member)
                yield from _copy(data, member.offset_data, member.size)
                yield _padding(member.size)
        yield b"\0" * (2 * _BLOCK)  # end of archive


def _members(path: Path) -> Iterator[tarfile.TarInfo]:
    """The members of the tar file at `path`, headers only (data is skipped over, never
    read), without keeping them (TarFile remembers every member it has read)."""
    try:
        with tarfile.open(path, mode="r:") as archive:
            while (member := archive.next()) is not None:
                archive.members.clear()  # type: ignore[attr-defined]  # not in typeshed
                yield member
    except tarfile.TarError as exc:
        raise JobError(
            JobErrorKind.IMAGE_INVALID, clip_message(f"not an image tarball: {exc}") or ""
        ) from None


def _copy(f: IO[bytes], offset: int, size: int) -> Iterator[bytes]:
    f.seek(offset)
    left = size
    while left > 0:
        chunk = f.read(min(CHUNK, left))
        if not chunk:
            raise JobError(JobErrorKind.IMAGE_INVALID, "the image tarball is cut short")
        left -= len(chunk)
        yield chunk


def _header(member: tarfile.TarInfo) -> bytes:
    return member.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


def _padding(size: int) -> bytes:
    return b"\0" * (-size % _BLOCK)


def _member_name(name: str) -> str:
    return name.removeprefix("./").rstrip("/")
