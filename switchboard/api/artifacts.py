"""Artifacts: upload raw bytes, fetch them back by digest, delete them."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import quote

from litestar import Controller, Request, delete, get, post
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.openapi.spec import (
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)
from litestar.params import FromPath
from litestar.response import Stream

from protocol.limits import is_valid_digest
from switchboard import metrics
from switchboard.api.errors import ApiError, error_responses
from switchboard.api.security import actor, require
from switchboard.artifacts import TooLarge
from switchboard.auth import Permission, allows
from switchboard.models import ArtifactStored
from switchboard.state import app_state

log = logging.getLogger("switchboard.api")


@dataclass
class _UploadOperation(Operation):
    """The upload reads its body as a stream (a `data` parameter would hold it all in
    memory), so Litestar can't see it: the OpenAPI document is told here."""

    def __post_init__(self) -> None:
        binary = Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY)
        self.request_body = RequestBody(
            content={"application/octet-stream": OpenAPIMediaType(schema=binary)}, required=True
        )


class ArtifactController(Controller):
    path = "/api/v1/artifacts"
    tags = ["artifacts"]  # noqa: RUF012 - Litestar reads it as a plain list

    @post(
        "/",
        guards=require(Permission.SUBMIT),
        status_code=201,
        responses=error_responses(413, 507),
        operation_class=_UploadOperation,
    )
    async def upload(self, request: Request) -> ArtifactStored:
        """Store the raw request body; the answer names it by its SHA-256 digest.
        Uploading the same bytes twice is harmless (and counts as a use, for retention).
        507 if it would take all artifacts together past the switchboard's quota."""
        state = app_state(request)
        try:
            upload = await state.artifacts.receive(
                request.stream(), state.settings.max_artifact_bytes
            )
        except (TooLarge, RequestEntityTooLarge):
            # Litestar's own limit on the body (the same) may be the one that says so.
            message = f"an artifact is at most {state.settings.max_artifact_bytes} bytes"
            _refused("too_large", f"upload refused: {message}")
            raise ApiError(413, "too_large", message) from None
        try:
            if upload.size == 0:
                raise ApiError(400, "invalid_request", "the artifact is empty")
            quota = state.settings.artifacts_quota_bytes or None
            token = request.state.token
            added = await state.artifacts.keep(upload, token.id, quota)
            if added.outcome == "full":
                message = (
                    f"the artifacts stored take {added.stored_bytes} of the {quota} bytes"
                    f" allowed; this one needs {upload.size} more: delete artifacts no job"
                    " needs, or raise --artifacts-quota"
                )
                _refused("quota", f"upload of {upload.digest} refused: {message}")
                raise ApiError(507, "insufficient_storage", message)
        finally:
            state.artifacts.discard(upload)  # nothing left to discard once kept
        return ArtifactStored(upload.digest, upload.size)

    @get(
        "/{digest:str}",
        guards=require(Permission.FETCH_ARTIFACTS),
        media_type="application/octet-stream",
        responses=error_responses(404, 416),
    )
    async def fetch(self, request: Request, digest: FromPath[str]) -> Stream:
        """The artifact's bytes; a `Range: bytes=START-END` asks for a part (206), one
        starting past the end gets 416."""
        _check_digest(digest)
        file = await app_state(request).artifacts.open(digest)
        if file is None:
            raise ApiError(404, "not_found", f"no artifact {digest}")
        return download(file, request.headers.get("range"), "application/octet-stream")

    @delete(
        "/{digest:str}",
        guards=require(Permission.SUBMIT),
        status_code=204,
        responses=error_responses(409),
    )
    async def remove(self, request: Request, digest: FromPath[str]) -> None:
        """Delete an artifact. Operators and admins may delete any; a submitter only those
        its own token uploaded. 409 while a job that has not ended names it (cancel the job
        or let it end first), or while a job that kept it as an output file exists.
        Deleting an artifact that is already gone succeeds too."""
        _check_digest(digest)
        state = app_state(request)
        token = request.state.token
        artifact = await state.store.get_artifact(digest)
        if artifact is None:
            await state.artifacts.forget(digest)  # a file the index forgot (a crash): goes too
            return
        if not allows(token.role, Permission.OPERATE) and artifact.uploaded_by != token.id:
            raise ApiError(
                403,
                "forbidden",
                f"role {token.role!r} may delete only artifacts its own token uploaded",
            )
        deleted = await state.store.delete_artifact(digest)
        if deleted.outcome == "always_kept":
            message = f"artifact {digest} holds no bytes: it is always kept (empty files)"
            _refused("in_use", f"delete refused: {message}")
            raise ApiError(409, "artifact_in_use", message)
        if deleted.outcome == "in_use":
            jobs = ", ".join(deleted.needed_by)
            message = (
                f"artifact {digest} is held by jobs (named by one that has not ended, or"
                f" kept as a run's output file until the job is deleted): {jobs}"
            )
            _refused("in_use", f"delete refused: {message}")
            raise ApiError(409, "artifact_in_use", message)
        await state.artifacts.forget(digest)
        log.info("artifact %s deleted by %s", digest, actor(request))


def _check_digest(digest: str) -> None:
    if not is_valid_digest(digest):
        raise ApiError(400, "invalid_request", "digest must be sha256:<64 hex digits>")


def _refused(why: str, message: str) -> None:
    metrics.ARTIFACTS_REFUSED.labels(why).inc()
    log.info("artifacts: %s", message)


#: A download is read in pieces of this size, so memory does not grow with the artifact.
_READ_PIECE = 256 * 1024


async def _read_closing(file: BinaryIO, start: int, end: int) -> AsyncIterator[bytes]:
    """Bytes [start, end) of the open file in pieces, read in a thread (the loop serves
    everyone), then closed."""
    with file:
        file.seek(start)
        left = end - start
        while left > 0 and (piece := await asyncio.to_thread(file.read, min(_READ_PIECE, left))):
            left -= len(piece)
            yield piece


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The span [start, end) a `Range` header asks of `size` bytes (None: all of them:
    no header, or one this does not serve, such as several ranges, which HTTP allows a
    server to ignore); RangeNotSatisfiable if it starts past the end."""
    match = _RANGE.fullmatch(header.strip()) if header else None
    if match is None or not (match.group(1) or match.group(2)):
        return None
    first, last = match.groups()
    if not first:  # the last N bytes
        start, end = max(size - int(last), 0), size
        if int(last) == 0:
            raise RangeNotSatisfiable(size)
    else:
        start = int(first)
        end = min(int(last) + 1, size) if last else size
        if last and int(last) < start:
            return None  # not a valid range: ignored, as HTTP says
    if start >= size:
        raise RangeNotSatisfiable(size)
    return start, end


class RangeNotSatisfiable(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def download(
    file: BinaryIO, range_header: str | None, media_type: str, filename: str | None = None
) -> Stream:
    """The response streaming an open stored file (an artifact, a run's output file): all
    of it, or the part a `Range` header asks for (206); 416 for a range past its end.
    `filename`: the name a browser should save it under."""
    size = os.fstat(file.fileno()).st_size
    headers = {"accept-ranges": "bytes"}
    if filename is not None:
        headers["content-disposition"] = f"attachment; filename*=UTF-8''{quote(filename)}"
    try:
        span = byte_range(range_header, size)
    except RangeNotSatisfiable:
        file.close()
        raise ApiError(
            416,
            "range_not_satisfiable",
            f"the range {range_header!r} starts past the end of the {size} bytes",
            headers={"content-range": f"bytes */{size}"},
        ) from None
    start, end = span if span is not None else (0, size)
    headers["content-length"] = str(end - start)
    if span is not None:
        headers["content-range"] = f"bytes {start}-{end - 1}/{size}"
    return Stream(
        _read_closing(file, start, end),
        media_type=media_type,
        headers=headers,
        status_code=206 if span is not None else 200,
    )
