"""Artifacts: upload raw bytes, fetch them back by digest."""

from __future__ import annotations

import msgspec
from litestar import Controller, Request, get, post
from litestar.response import File

from protocol.limits import is_valid_digest
from switchboard.api.errors import ApiError
from switchboard.api.security import require
from switchboard.artifacts import TooLarge
from switchboard.auth import Permission
from switchboard.state import AppState


class ArtifactStored(msgspec.Struct):
    digest: str
    size: int


def _state(request: Request) -> AppState:
    return request.app.state.switchboard


class ArtifactController(Controller):
    path = "/api/v1/artifacts"
    tags = ["artifacts"]  # noqa: RUF012 - Litestar reads it as a plain list

    @post("/", guards=require(Permission.SUBMIT), status_code=201)
    async def upload(self, request: Request) -> ArtifactStored:
        """Store the raw request body; the answer names it by its SHA-256 digest.
        Uploading the same bytes twice is harmless."""
        state = _state(request)
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
    )
    async def fetch(self, request: Request, digest: str) -> File:
        """The artifact's bytes."""
        if not is_valid_digest(digest):
            raise ApiError(400, "invalid_request", "digest must be sha256:<64 hex digits>")
        state = _state(request)
        if not state.artifacts.exists(digest):
            raise ApiError(404, "not_found", f"no artifact {digest}")
        return File(state.artifacts.path(digest), media_type="application/octet-stream")
