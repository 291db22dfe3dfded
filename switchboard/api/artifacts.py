"""Artifacts: upload raw bytes, fetch them back by digest."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
from litestar import Controller, Request, get, post
from litestar.openapi.spec import (
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)
from litestar.response import File

from protocol.limits import is_valid_digest
from switchboard.api.errors import ApiError, error_responses
from switchboard.api.security import require
from switchboard.artifacts import TooLarge
from switchboard.auth import Permission
from switchboard.state import app_state


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
        responses=error_responses(413),
        operation_class=_UploadOperation,
    )
    async def upload(self, request: Request) -> ArtifactStored:
        """Store the raw request body; the answer names it by its SHA-256 digest.
        Uploading the same bytes twice is harmless."""
        state = app_state(request)
        try:
            digest, size = await state.artifacts.save(
                request.stream(), state.settings.max_artifact_bytes
            )
        except TooLarge as exc:
            raise ApiError(413, "too_large", str(exc)) from None
        if size == 0:
            raise ApiError(400, "invalid_request", "the artifact is empty")
        await state.store.add_artifact(digest, size)
        return ArtifactStored(digest, size)

    @get(
        "/{digest:str}",
        guards=require(Permission.FETCH_ARTIFACTS),
        media_type="application/octet-stream",
        responses=error_responses(404),
    )
    async def fetch(self, request: Request, digest: str) -> File:
        """The artifact's bytes."""
        if not is_valid_digest(digest):
            raise ApiError(400, "invalid_request", "digest must be sha256:<64 hex digits>")
        state = app_state(request)
        if not state.artifacts.exists(digest):
            raise ApiError(404, "not_found", f"no artifact {digest}")
        return File(state.artifacts.path(digest), media_type="application/octet-stream")
