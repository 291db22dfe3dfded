"""Uploading a file to the switchboard as an artifact, in pieces, resuming after a cut.

The switchboard's resumable upload (`PUT /api/v1/uploads/{digest}`, docs/jobs.md) keeps
what arrived; a client asks how much (`HEAD`, `Upload-Offset`) and sends the rest. The
file's size is taken once, when it is opened: a file still growing is uploaded as it was
then (its first `size` bytes), and the digest of those bytes is what the switchboard checks.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import httpx

#: Bytes sent per PUT (and the most of the file held in memory at once).
CHUNK = 8 * 1024 * 1024
#: Failures in a row (a cut, a 5xx, a 409) before giving up; each success resets the count.
ATTEMPTS = 8
#: The first wait after a failure; it doubles after each, up to MAX_BACKOFF_S.
BACKOFF_S = 0.2
MAX_BACKOFF_S = 5.0
_HASH_PIECE = 1024 * 1024


class UploadError(Exception):
    """The upload did not complete; the message says why (the switchboard's words when it
    refused). `status` is the HTTP status of a refusal, None for a link that kept failing."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _Retry(Exception):
    """Something worth another try after a pause: a cut, a 5xx, an offset out of step."""


async def upload_file(
    client: httpx.AsyncClient,
    base_url: str,
    token: str | Callable[[], str] | None,
    path: Path | BinaryIO,
    digest: str | None = None,
    chunk: int = CHUNK,
    *,
    size: int | None = None,
    attempts: int = ATTEMPTS,
    backoff_s: float = BACKOFF_S,
) -> str:
    """Upload `path` as an artifact; return its digest (`sha256:<hex>`).

    `client` is one made by supervisor.artifacts.switchboard_client (its TLS settings and
    token), or any httpx client: `token`, if given, is sent with every request too.
    `digest`, if known, saves hashing the file first (the switchboard checks it anyway: a
    wrong one fails with status 422). `path` may be a file already open for reading (left
    open): e.g. one opened without following links. `size`, if given, uploads only the
    file's first `size` bytes (UploadError if it has fewer). Raises UploadError."""
    if chunk <= 0:
        raise ValueError("chunk must be at least 1 byte")
    if isinstance(path, Path):
        with path.open("rb") as file:
            return await _upload(
                client, base_url, token, file, digest, chunk, size, attempts, backoff_s
            )
    return await _upload(client, base_url, token, path, digest, chunk, size, attempts, backoff_s)


async def _upload(
    client: httpx.AsyncClient,
    base_url: str,
    token: str | Callable[[], str] | None,
    file: BinaryIO,
    digest: str | None,
    chunk: int,
    size: int | None,
    attempts: int,
    backoff_s: float,
) -> str:
    # Reads go to threads (pread). A file opened from a descriptor is named by its number.
    path = file.name if isinstance(file.name, str) else "the file"
    if size is None:
        size = os.fstat(file.fileno()).st_size
    if size == 0:
        raise UploadError(f"{path} is empty: an artifact has at least one byte")
    if digest is None:
        digest = await asyncio.to_thread(_hash_prefix, file, size)
    url = f"{base_url.rstrip('/')}/api/v1/uploads/{digest}"
    upload = _Upload(client, url, token, file, size)
    failures = 0
    while True:
        try:
            await upload.run(chunk)
            return digest
        except (httpx.TransportError, _Retry) as exc:
            failures = 0 if upload.progressed else failures + 1
            upload.progressed = False
            if failures >= attempts:
                raise UploadError(
                    f"upload of {path} ({digest}) failed {failures} times in a row, last:"
                    f" {exc or type(exc).__name__}"
                ) from None
            await asyncio.sleep(min(backoff_s * 2 ** max(failures - 1, 0), MAX_BACKOFF_S))


class _Upload:
    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        token: str | Callable[[], str] | None,
        file: BinaryIO,
        size: int,
    ) -> None:
        self.client = client
        self.url = url
        self.token = token
        self.file = file
        self.size = size
        #: Set when a piece was taken since the last failure (so a link that cuts every
        #: piece after some progress keeps going, one that makes none gives up).
        self.progressed = False

    def _headers(self) -> dict[str, str]:
        if self.token is None:
            return {}
        token = self.token() if callable(self.token) else self.token
        return {"Authorization": f"Bearer {token}"}

    async def run(self, chunk: int) -> None:
        """Ask where the switchboard stands, then send the rest; returns once stored."""
        response = await self.client.head(self.url, headers=self._headers())
        _check(response, "HEAD")
        if response.headers.get("upload-stored") == "true":
            return
        offset = _offset(response)
        while True:
            length = min(chunk, self.size - offset)
            piece = await asyncio.to_thread(_read_at, self.file, offset, length)
            headers = {
                **self._headers(),
                "Content-Type": "application/octet-stream",
                "Content-Range": f"bytes {offset}-{offset + length - 1}/{self.size}",
            }
            response = await self.client.put(self.url, content=piece, headers=headers)
            del piece  # one piece in memory at a time
            if response.status_code == 409:
                raise _Retry(_said(response))  # out of step (or a piece still being written)
            _check(response, "PUT")
            if response.status_code == 201 or response.headers.get("upload-stored") == "true":
                return
            held = _offset(response)
            if held <= offset:
                raise _Retry(f"the switchboard took nothing of bytes {offset}..")
            offset = held
            self.progressed = True


def _check(response: httpx.Response, method: str) -> None:
    if response.status_code >= 500:
        raise _Retry(f"{method} answered {response.status_code}")
    if response.status_code >= 300:
        raise UploadError(
            f"{method} {response.url.path} refused ({response.status_code}): {_said(response)}",
            response.status_code,
        )


def _offset(response: httpx.Response) -> int:
    value = response.headers.get("upload-offset", "")
    if not value.isdigit():
        raise _Retry(f"no Upload-Offset in the answer ({response.status_code})")
    return int(value)


def _said(response: httpx.Response) -> str:
    """The switchboard's message, from its JSON error body."""
    try:
        return str(response.json().get("message", response.text))
    except ValueError:
        return response.text[:200] or response.reason_phrase


def _read_at(file: BinaryIO, offset: int, length: int) -> bytes:
    data = os.pread(file.fileno(), length, offset)
    if len(data) != length:
        raise UploadError(f"{file.name} shrank while being uploaded")
    return data


def _hash_prefix(file: BinaryIO, size: int) -> str:
    """The digest of the file's first `size` bytes."""
    hasher = hashlib.sha256()
    offset = 0
    while offset < size:
        piece = os.pread(file.fileno(), min(_HASH_PIECE, size - offset), offset)
        if not piece:
            raise UploadError(f"{file.name} shrank while being hashed")
        hasher.update(piece)
        offset += len(piece)
    return "sha256:" + hasher.hexdigest()
