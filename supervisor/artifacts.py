"""Content-addressed artifacts (Wasm modules, image tarballs) as a supervisor gets them.

A job names an artifact by `sha256:<hex>`. A source fetches the bytes; the supervisor
checks the digest before anything uses them, so a source never has to be trusted.
"""

from __future__ import annotations

import abc
import hashlib
import ssl
from collections.abc import Callable
from pathlib import Path

import httpx

from protocol.exceptions import JobError, JobErrorKind


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


class ArtifactSource(abc.ABC):
    @abc.abstractmethod
    async def fetch(self, digest: str) -> bytes:
        """The bytes of an artifact, verified. Raises JobError(image_not_found) if the
        source doesn't have it, JobError(image_invalid) if its content doesn't match."""

    async def close(self) -> None:
        """Release connections."""


class HttpArtifactSource(ArtifactSource):
    """Fetches from the switchboard's `GET /api/v1/artifacts/{digest}` with a token.

    `token` may be a function giving the token to use now (a supervisor that enrols
    switches to its own credential). `verify_tls` is what httpx's `verify` takes: True
    (the system's CAs), an SSLContext (e.g. one trusting a private CA), or a CA bundle path."""

    def __init__(
        self,
        base_url: str,
        token: str | Callable[[], str],
        *,
        verify_tls: bool | str | ssl.SSLContext = True,
    ) -> None:
        current = token if callable(token) else lambda: token

        def authorize(request: httpx.Request) -> httpx.Request:
            request.headers["Authorization"] = f"Bearer {current()}"
            return request

        self._client = httpx.AsyncClient(
            base_url=base_url,
            auth=authorize,
            timeout=httpx.Timeout(30.0, connect=10.0),
            verify=verify_tls,
        )

    async def fetch(self, digest: str) -> bytes:
        try:
            response = await self._client.get(f"/api/v1/artifacts/{digest}")
        except httpx.HTTPError as exc:
            raise JobError(
                JobErrorKind.IMAGE_NOT_FOUND, f"could not fetch artifact {digest}: {exc}"
            ) from None
        if response.status_code == 404:
            raise JobError(JobErrorKind.IMAGE_NOT_FOUND, f"artifact {digest} does not exist")
        if response.status_code != 200:
            raise JobError(
                JobErrorKind.IMAGE_NOT_FOUND,
                f"fetching artifact {digest} failed with HTTP {response.status_code}",
            )
        return verify(digest, response.content)

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
            self._paths[digest_of(path.read_bytes())] = path

    async def fetch(self, digest: str) -> bytes:
        path = self._paths.get(digest)
        if path is None:
            raise JobError(
                JobErrorKind.IMAGE_NOT_FOUND,
                f"artifact {digest} is not among the files given with --artifact",
            )
        return verify(digest, path.read_bytes())
