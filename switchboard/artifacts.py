"""Artifact bytes on disk, named by digest: `<data dir>/artifacts/sha256/<hex>`; and which
artifacts a job spec names.

An upload streams into a temporary file while being hashed; only once the store has taken
it (it may refuse: the artifacts quota) is the file renamed into place, so a half-written
file never carries a valid name and a refused one never appears. The store's artifacts
table is the index: size, uploader, when it was uploaded and last named by a job.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

from protocol.limits import EMPTY_DIGEST
from protocol.spec import DockerBackend, JobSpec, WasmBackend
from switchboard import datadir
from switchboard.disk_writes import ThreadedWriter

#: Temporary upload files older than this are leftovers of a crash: retention removes them.
STALE_UPLOAD_S = 24 * 3600.0
_UPLOAD_PREFIX = ".upload-"


def named_artifacts(spec: JobSpec) -> list[tuple[str, str]]:
    """(field, digest) of every artifact a spec names: its backend's, then its inputs'
    (those given by digest: an earlier job's output is named once resolved)."""
    named: list[tuple[str, str]] = []
    match spec.backend:
        case WasmBackend(module=module):
            named.append(("backend.module", module))
        case DockerBackend(image_artifact=str(digest)):
            named.append(("backend.image_artifact", digest))
    named += [(f"inputs[{path!r}]", digest) for path, digest in spec.input_digests().items()]
    return named


class TooLarge(Exception):
    pass


class Upload(NamedTuple):
    """Bytes received, hashed, waiting in a temporary file to be kept or discarded."""

    digest: str
    size: int
    path: Path


class ArtifactFiles:
    def __init__(self, root: Path) -> None:
        self.root = root
        datadir.private_dir(root)
        datadir.private_dir(root / "sha256")  # files in it are made 0600 (mkstemp)
        # The artifact of no bytes is always there (empty output files are listed under
        # it, never uploaded; the store holds its row from migration 10 on).
        datadir.private_file(self.path(EMPTY_DIGEST))

    def path(self, digest: str) -> Path:
        algorithm, _, hexdigest = digest.partition(":")
        return self.root / algorithm / hexdigest

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def open(self, digest: str) -> BinaryIO | None:
        """The artifact opened for reading, or None if there is none. A download reads
        from this open file, so retention or a DELETE unlinking the name meanwhile cannot
        cut the response short."""
        try:
            return self.path(digest).open("rb")
        except (FileNotFoundError, IsADirectoryError):
            return None

    async def receive(self, chunks: AsyncIterator[bytes], max_bytes: int) -> Upload:
        """Hash an upload into a temporary file. Raises TooLarge past `max_bytes`."""
        hasher = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=_UPLOAD_PREFIX)
        try:
            with os.fdopen(fd, "wb", buffering=0) as out:
                # Hashed and written from a thread, a batch at a time (disk_writes).
                writer = ThreadedWriter(out, hasher)
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLarge(f"artifact exceeds {max_bytes} bytes")
                    await writer.write(chunk)
                await writer.flush()
        except BaseException:
            Path(tmp).unlink(missing_ok=True)  # noqa: ASYNC240 - one quick unlink
            raise
        return Upload("sha256:" + hasher.hexdigest(), size, Path(tmp))

    def keep(self, upload: Upload) -> None:
        """Give the upload its name (the same bytes again just replace the file)."""
        os.replace(upload.path, self.path(upload.digest))

    def discard(self, upload: Upload) -> None:
        upload.path.unlink(missing_ok=True)

    def remove(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def remove_stale_uploads(self) -> int:
        """Remove temporary files a crash left behind; return how many."""
        removed = 0
        limit = time.time() - STALE_UPLOAD_S
        for path in self.root.glob(_UPLOAD_PREFIX + "*"):
            try:
                if path.stat().st_mtime < limit:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed
