"""Artifacts: upload raw bytes, fetch them back by digest, delete them."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import BinaryIO

import msgspec
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
from litestar.response import Stream

from protocol.limits import is_valid_digest
from switchboard import metrics
from switchboard.api.errors import ApiError, error_responses
from switchboard.api.security import actor, require
from switchboard.artifacts import TooLarge
from switchboard.auth import Permission, allows
from switchboard.state import app_state

log = logging.getLogger("switchboard.api")


class ArtifactStored(msgspec.Struct):
    digest: str
    size: int


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
            added = await state.store.add_artifact(upload.digest, upload.size, token.id, quota)
            if added.outcome == "full":
                message = (
                    f"the artifacts stored take {added.stored_bytes} of the {quota} bytes"
                    f" allowed; this one needs {upload.size} more: delete artifacts no job"
                    " needs, or raise --artifacts-quota"
                )
                _refused("quota", f"upload of {upload.digest} refused: {message}")
                raise ApiError(507, "insufficient_storage", message)
            state.artifacts.keep(upload)
        finally:
            state.artifacts.discard(upload)  # nothing left to discard once kept
        return ArtifactStored(upload.digest, upload.size)

    @get(
        "/{digest:str}",
        guards=require(Permission.FETCH_ARTIFACTS),
        media_type="application/octet-stream",
        responses=error_responses(404),
    )
    async def fetch(self, request: Request, digest: str) -> Stream:
        """The artifact's bytes."""
        _check_digest(digest)
        file = app_state(request).artifacts.open(digest)
        if file is None:
            raise ApiError(404, "not_found", f"no artifact {digest}")
        size = os.fstat(file.fileno()).st_size
        return Stream(
            _read_closing(file),
            media_type="application/octet-stream",
            headers={"content-length": str(size)},
        )

    @delete(
        "/{digest:str}",
        guards=require(Permission.SUBMIT),
        status_code=204,
        responses=error_responses(409),
    )
    async def remove(self, request: Request, digest: str) -> None:
        """Delete an artifact. Operators and admins may delete any; a submitter only those
        its own token uploaded. 409 while a job that has not ended names it (cancel the job
        or let it end first). Deleting an artifact that is already gone succeeds too."""
        _check_digest(digest)
        state = app_state(request)
        token = request.state.token
        artifact = await state.store.get_artifact(digest)
        if artifact is None:
            state.artifacts.remove(digest)  # a file the index forgot (a crash): goes too
            return
        if not allows(token.role, Permission.OPERATE) and artifact.uploaded_by != token.id:
            raise ApiError(
                403,
                "forbidden",
                f"role {token.role!r} may delete only artifacts its own token uploaded",
            )
        deleted = await state.store.delete_artifact(digest)
        if deleted.outcome == "in_use":
            jobs = ", ".join(deleted.needed_by)
            message = f"artifact {digest} is named by jobs that have not ended: {jobs}"
            _refused("in_use", f"delete refused: {message}")
            raise ApiError(409, "artifact_in_use", message)
        state.artifacts.remove(digest)
        log.info("artifact %s deleted by %s", digest, actor(request))


def _check_digest(digest: str) -> None:
    if not is_valid_digest(digest):
        raise ApiError(400, "invalid_request", "digest must be sha256:<64 hex digits>")


def _refused(why: str, message: str) -> None:
    metrics.ARTIFACTS_REFUSED.labels(why).inc()
    log.info("artifacts: %s", message)


#: A download is read in pieces of this size, so memory does not grow with the artifact.
_READ_PIECE = 256 * 1024


async def _read_closing(file: BinaryIO) -> AsyncIterator[bytes]:
    """The open file's bytes in pieces, read in a thread (the loop serves everyone), then
    closed."""
    with file:
        while piece := await asyncio.to_thread(file.read, _READ_PIECE):
            yield piece
