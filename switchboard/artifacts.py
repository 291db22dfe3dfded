"""Artifact bytes on disk, named by digest: `<data dir>/artifacts/sha256/<hex>`.

Uploads stream to a temporary file while being hashed, then are renamed into place, so a
half-written file never carries a valid name.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from switchboard import datadir


class TooLarge(Exception):
    pass


class ArtifactFiles:
    def __init__(self, root: Path) -> None:
        self.root = root
        datadir.private_dir(root)
        datadir.private_dir(root / "sha256")  # files in it are made 0600 (mkstemp)

    def path(self, digest: str) -> Path:
        algorithm, _, hexdigest = digest.partition(":")
        return self.root / algorithm / hexdigest

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    async def save(self, chunks: AsyncIterator[bytes], max_bytes: int) -> tuple[str, int]:
        """Store an upload; return (digest, size). Raises TooLarge past `max_bytes`."""
        hasher = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLarge(f"artifact exceeds {max_bytes} bytes")
                    hasher.update(chunk)
                    out.write(chunk)
            digest = "sha256:" + hasher.hexdigest()
            os.replace(tmp, self.path(digest))
            return digest, size
        except BaseException:
            Path(tmp).unlink(missing_ok=True)  # noqa: ASYNC240 - one quick unlink
            raise
