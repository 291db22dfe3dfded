"""Resumable uploads: the bytes of an artifact arriving in pieces, possibly over a link that
breaks, kept on disk between the pieces.

Each token's upload of one digest has a partial file, `<artifacts dir>/.upload-part-<token
id>-<hex>`; its size is the offset the next piece must start at. State lives on disk only,
so a restarted switchboard resumes where the file ends, and retention's sweep of stale
`.upload-*` files (ArtifactFiles.remove_stale_uploads) removes partials nobody came back
for. When the file reaches its declared total it is hashed; only a file whose hash is the
digest it was uploaded under becomes the artifact (ArtifactFiles.keep, as a POST does).

Several pieces of one partial never run at once: a second is refused (409) while the first
is written, so the bytes held are always a prefix of what was sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import weakref
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import NamedTuple

from switchboard.artifacts import ArtifactFiles, Upload
from switchboard.disk_writes import ThreadedWriter

_PARTIAL_PREFIX = ".upload-part-"
_RANGE = re.compile(r"bytes (\d{1,19})-(\d{1,19})/(\d{1,19})")
_SAFE_ID = re.compile(r"[A-Za-z0-9_]{1,64}")
#: Bytes hashed at a time when a partial file is complete.
_HASH_PIECE = 1024 * 1024


class ContentRange(NamedTuple):
    """`Content-Range: bytes START-END/TOTAL` (END inclusive)."""

    start: int
    end: int
    total: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def parse_content_range(value: str | None) -> ContentRange:
    """The range a piece carries; ValueError (saying why) if absent or inconsistent."""
    if value is None:
        raise ValueError("Content-Range is required: bytes START-END/TOTAL")
    match = _RANGE.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"Content-Range {value!r} is not bytes START-END/TOTAL")
    start, end, total = (int(g) for g in match.groups())
    if not start <= end < total:
        raise ValueError(f"Content-Range {value!r}: needs START <= END < TOTAL")
    return ContentRange(start, end, total)


class BodyMismatch(Exception):
    """A piece's body was longer or shorter than its Content-Range said."""


class PartialUploads:
    """The partial files under an artifacts root, and which of them are being written."""

    def __init__(self, files: ArtifactFiles) -> None:
        self.files = files
        self._writing: set[Path] = set()
        #: Bytes announced by pieces being written, not yet on disk: counted against the
        #: cap on all partial bytes, so pieces arriving at once can't overshoot it together.
        self.reserved = 0

    def path(self, token_id: str, digest: str) -> Path:
        return self.files.root / f"{_PARTIAL_PREFIX}{_owner(token_id)}-{digest.partition(':')[2]}"

    def held(self, token_id: str, digest: str) -> int:
        """Bytes held for this token's upload of `digest` (0: none)."""
        try:
            return self.path(token_id, digest).stat().st_size
        except FileNotFoundError:
            return 0

    def exists(self, token_id: str, digest: str) -> bool:
        return self.path(token_id, digest).exists()

    def _partials(self, token_id: str | None = None) -> Iterator[Path]:
        owner = "" if token_id is None else f"{_owner(token_id)}-"
        return self.files.root.glob(f"{_PARTIAL_PREFIX}{owner}*")

    def count(self, token_id: str, besides: Path) -> int:
        """Partial uploads this token has open other than `besides` (on disk, or having
        their first piece written: two new uploads at once must not both slip under the
        cap)."""
        owner = f"{_PARTIAL_PREFIX}{_owner(token_id)}-"
        writing = {path for path in self._writing if path.name.startswith(owner)}
        return len(writing.union(self._partials(token_id)) - {besides})

    def bytes_on_disk(self) -> int:
        """Bytes all partial files hold together."""
        total = 0
        for path in self._partials():
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass  # completed or discarded meanwhile
        return total

    def busy(self, path: Path) -> bool:
        return path in self._writing

    def begin(self, path: Path) -> None:
        self._writing.add(path)

    def end(self, path: Path) -> None:
        self._writing.discard(path)

    async def append(self, path: Path, piece: ContentRange, body: AsyncIterator[bytes]) -> int:
        """Append the body to the partial file; return the bytes held after it.

        Bytes of a body cut short stay (they are in their right place: the client resumes
        after them), then BodyMismatch is raised if the body simply ended. A body longer
        than the range is refused whole (the file goes back to `piece.start`)."""
        written = 0
        try:
            # Written behind from a thread (disk_writes), unbuffered: the file's size is the
            # bytes held but for those still on their way (a HEAD meanwhile may see less;
            # a piece starting there is refused as busy until this one has ended).
            with path.open("ab", buffering=0) as out:
                writer = ThreadedWriter(out)
                try:
                    async for chunk in body:
                        if written + len(chunk) > piece.length:
                            await writer.discard()
                            out.truncate(piece.start)
                            raise BodyMismatch(
                                f"the body is longer than the {piece.length} bytes its"
                                " Content-Range names"
                            )
                        await writer.write(chunk)
                        written += len(chunk)
                finally:
                    await writer.flush()  # a body cut short: what came is in its place
        finally:
            # A partial file holding nothing is no upload: it must not count as one.
            if path.exists() and path.stat().st_size == 0:  # noqa: ASYNC240 - one quick stat
                path.unlink(missing_ok=True)  # noqa: ASYNC240 - one quick unlink
        if written < piece.length:
            raise BodyMismatch(
                f"the body ended after {written} of the {piece.length} bytes its Content-Range"
                " names"
            )
        return piece.start + written

    async def finish(self, path: Path) -> Upload:
        """Hash a complete partial file (in a thread: it may be large)."""
        digest, size = await asyncio.to_thread(_hash_file, path)
        return Upload(digest, size, path)

    def discard(self, path: Path) -> None:
        path.unlink(missing_ok=True)


def _owner(token_id: str) -> str:
    """The token id as it appears in a file name (ids are hex; anything else is hashed)."""
    if _SAFE_ID.fullmatch(token_id):
        return token_id
    return hashlib.sha256(token_id.encode()).hexdigest()[:24]


def _hash_file(path: Path) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    with path.open("rb") as file:
        while piece := file.read(_HASH_PIECE):
            hasher.update(piece)
            size += len(piece)
    return "sha256:" + hasher.hexdigest(), size


_BY_ROOT: weakref.WeakKeyDictionary[ArtifactFiles, PartialUploads] = weakref.WeakKeyDictionary()


def partial_uploads(files: ArtifactFiles) -> PartialUploads:
    """The one PartialUploads of an artifacts store (which pieces are being written is
    known in this process only, so every request must see the same one)."""
    partials = _BY_ROOT.get(files)
    if partials is None:
        partials = _BY_ROOT[files] = PartialUploads(files)
    return partials
