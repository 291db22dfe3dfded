"""Content-addressed artifacts (Wasm modules, image tarballs) as a supervisor gets them.

A job names an artifact by `sha256:<hex>`. A source fetches the bytes; the supervisor
checks the digest before anything uses them, so a source never has to be trusted.
`fetch` returns them in memory (Wasm modules, which are compiled from memory anyway);
`download` streams them to a file with a size cap (image tarballs, which can be large).
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO

import httpx

from protocol.exceptions import JobError, JobErrorKind

#: Bytes hashed or written at a time.
CHUNK = 1024 * 1024


def digest_of(data: bytes) -> str:
    """The artifact digest of `data`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def verify(digest: str, data: bytes) -> bytes:
    """Return `data` if it hashes to `digest`, else raise JobError(image_invalid)."""
    actual = digest_of(data)
    if actual != digest:
        raise JobError(
            JobErrorKind.IMAGE_INVALID, f"artifact {digest} has the wrong content (got {actual})"
        )
    return data


class ArtifactTooBig(JobError):
    """An artifact is larger than the caller's cap (JobError image_invalid)."""

    def __init__(self, digest: str, limit: int) -> None:
        super().__init__(
            JobErrorKind.IMAGE_INVALID,
            f"artifact {digest} is larger than {limit // (1024 * 1024)} MB, this supervisor's "
            "limit",
        )


class ArtifactSource(abc.ABC):
    @abc.abstractmethod
    async def fetch(self, digest: str) -> bytes:
        """The bytes of an artifact, verified. Raises JobError(image_not_found) if the
        source doesn't have it, JobError(image_invalid) if its content doesn't match."""

    async def download(self, digest: str, dest: Path, max_bytes: int) -> None:
        """Write the artifact to `dest`, verified, holding at most CHUNK bytes of it in
        memory. Raises like fetch(), and ArtifactTooBig past `max_bytes`; `dest` is removed
        on any failure."""
        async with _Download(digest, dest, max_bytes) as out:
            async for chunk in self._chunks(digest):
                await out.write(chunk)

    async def _chunks(self, digest: str) -> AsyncIterator[bytes]:
        """The artifact's bytes in pieces (unverified: download() checks them). This
        default goes through fetch(), for sources that hold artifacts in memory anyway."""
        yield await self.fetch(digest)

    async def close(self) -> None:
        """Release connections."""


def switchboard_client(
    base_url: str | Callable[[], str],
    token: str | Callable[[], str],
    *,
    verify_tls: bool | str | ssl.SSLContext = True,
) -> httpx.AsyncClient:
    """An HTTP client for the switchboard's REST API, as a supervisor calls it: every
    request carries the token (`token` may be a function giving the one to use now: a
    supervisor that enrols switches to its own credential) and goes to `base_url` (which
    may be a function too: the replica the supervisor is connected to now). `verify_tls`
    is what httpx's `verify` takes: True (the system's CAs), an SSLContext (e.g. one
    trusting a private CA), or a CA bundle path."""
    current = token if callable(token) else lambda: token
    where = base_url if callable(base_url) else None

    def authorize(request: httpx.Request) -> httpx.Request:
        request.headers["Authorization"] = f"Bearer {current()}"
        if where is not None:
            target = httpx.URL(where())
            request.url = request.url.copy_with(
                scheme=target.scheme, host=target.host, port=target.port
            )
            request.headers["Host"] = request.url.netloc.decode("ascii")
        return request

    return httpx.AsyncClient(
        # A function is asked per request (authorize); until then, a name that goes nowhere.
        base_url="http://switchboard.invalid" if callable(base_url) else base_url,
        auth=authorize,
        timeout=httpx.Timeout(30.0, connect=10.0),
        verify=verify_tls,
    )


class HttpArtifactSource(ArtifactSource):
    """Fetches from the switchboard's `GET /api/v1/artifacts/{digest}` with a token (see
    switchboard_client for `token` and `verify_tls`)."""

    def __init__(
        self,
        base_url: str | Callable[[], str],
        token: str | Callable[[], str],
        *,
        verify_tls: bool | str | ssl.SSLContext = True,
    ) -> None:
        self._client = switchboard_client(base_url, token, verify_tls=verify_tls)

    async def fetch(self, digest: str) -> bytes:
        try:
            response = await self._client.get(f"/api/v1/artifacts/{digest}")
        except httpx.HTTPError as exc:
            raise JobError(
                JobErrorKind.IMAGE_NOT_FOUND, f"could not fetch artifact {digest}: {exc}"
            ) from None
        _check_status(digest, response.status_code)
        return verify(digest, response.content)

    async def _chunks(self, digest: str) -> AsyncIterator[bytes]:
        try:
            async with self._client.stream("GET", f"/api/v1/artifacts/{digest}") as response:
                _check_status(digest, response.status_code)
                async for chunk in response.aiter_bytes(CHUNK):
                    yield chunk
        except httpx.HTTPError as exc:
            raise JobError(
                JobErrorKind.IMAGE_NOT_FOUND, f"could not fetch artifact {digest}: {exc}"
            ) from None

    async def close(self) -> None:
        await self._client.aclose()


class MemoryArtifactSource(ArtifactSource):
    """Artifacts held in memory (for embedding a supervisor, benchmarks and tests)."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.fetches = 0

    def add(self, data: bytes) -> str:
        """Keep `data`; return its digest."""
        digest = digest_of(data)
        self.blobs[digest] = data
        return digest

    async def fetch(self, digest: str) -> bytes:
        self.fetches += 1
        data = self.blobs.get(digest)
        if data is None:
            raise JobError(JobErrorKind.IMAGE_NOT_FOUND, f"artifact {digest} does not exist")
        return verify(digest, data)


class FileArtifactSource(ArtifactSource):
    """Artifacts given as local files (for `supervisor run-local`)."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths: dict[str, Path] = {}
        for path in paths:
            self._paths[_file_digest(path)] = path

    async def fetch(self, digest: str) -> bytes:
        return verify(digest, self._path(digest).read_bytes())

    async def _chunks(self, digest: str) -> AsyncIterator[bytes]:
        f = await asyncio.to_thread(open, self._path(digest), "rb")
        try:
            while chunk := await asyncio.to_thread(f.read, CHUNK):
                yield chunk
        finally:
            f.close()

    def _path(self, digest: str) -> Path:
        path = self._paths.get(digest)
        if path is None:
            raise JobError(
                JobErrorKind.IMAGE_NOT_FOUND,
                f"artifact {digest} is not among the files given with --artifact",
            )
        return path


def _check_status(digest: str, status: int) -> None:
    if status == 404:
        raise JobError(JobErrorKind.IMAGE_NOT_FOUND, f"artifact {digest} does not exist")
    if status != 200:
        raise JobError(
            JobErrorKind.IMAGE_NOT_FOUND, f"fetching artifact {digest} failed with HTTP {status}"
        )


def _file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
    return "sha256:" + sha.hexdigest()


class _Download:
    """A file being written from an artifact's chunks: counted against a cap, hashed,
    written from a worker thread, checked against the digest at the end; removed if
    anything fails."""

    def __init__(self, digest: str, dest: Path, max_bytes: int) -> None:
        self.digest = digest
        self.dest = dest
        self.max_bytes = max_bytes
        self.size = 0
        self._sha = hashlib.sha256()
        self._file: IO[bytes] | None = None

    async def __aenter__(self) -> _Download:
        self._file = await asyncio.to_thread(open, self.dest, "wb")
        return self

    async def write(self, chunk: bytes) -> None:
        assert self._file is not None
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise ArtifactTooBig(self.digest, self.max_bytes)
        self._sha.update(chunk)
        await asyncio.to_thread(self._file.write, chunk)

    async def __aexit__(self, kind: type[BaseException] | None, *_: object) -> None:
        assert self._file is not None
        await asyncio.to_thread(self._file.close)
        actual = "sha256:" + self._sha.hexdigest()
        if kind is None and actual == self.digest:
            return
        await asyncio.to_thread(self.dest.unlink, missing_ok=True)
        if kind is None:
            raise JobError(
                JobErrorKind.IMAGE_INVALID,
                f"artifact {self.digest} has the wrong content (got {actual})",
            )
