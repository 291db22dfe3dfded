"""Resumable uploads: `PUT /api/v1/uploads/{digest}` appends a piece (`Content-Range: bytes
START-END/TOTAL`) to the caller's partial upload of that digest; `HEAD` says how many bytes
are held (`Upload-Offset`) and whether the artifact is already stored. The last piece makes
the artifact, exactly as a POST to /api/v1/artifacts would, if the bytes hash to the digest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated

import msgspec
from litestar import Controller, Request, Response, head, put
from litestar.exceptions import InternalServerException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)
from litestar.params import FromPath, HeaderParameter

from protocol.limits import is_valid_digest
from switchboard import metrics
from switchboard.api.security import actor, require
from switchboard.auth import Permission
from switchboard.state import AppState, app_state
from switchboard.uploads import (
    BodyMismatch,
    ContentRange,
    PartialUploads,
    parse_content_range,
    partial_uploads,
)

log = logging.getLogger("switchboard.api")

#: The response header naming the bytes held (HEAD, every PUT answer, a 409).
OFFSET_HEADER = "Upload-Offset"
#: "true" when the artifact is stored already (nothing more to send).
STORED_HEADER = "Upload-Stored"


class UploadState(msgspec.Struct):
    """Where an upload stands: `offset` bytes held (the artifact's size once stored)."""

    digest: str
    offset: int
    stored: bool


class UploadRefused(msgspec.Struct):
    """The API's error body, plus the bytes held when the client should resume from them."""

    error: str
    message: str
    offset: int | None = None


@dataclass
class _PieceOperation(Operation):
    """The piece is read as a stream (see ArtifactController's upload)."""

    def __post_init__(self) -> None:
        binary = Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY)
        self.request_body = RequestBody(
            content={"application/octet-stream": OpenAPIMediaType(schema=binary)}, required=True
        )


def _responses(*statuses: int) -> dict[int, ResponseSpec]:
    described = {
        400: "Invalid digest, Content-Range, or a body that doesn't match it",
        401: "No token, or not a valid one",
        403: "The token's role may not do this",
        409: "START is not the bytes held (`offset` says what is), or a piece is being written",
        413: "TOTAL is past the largest artifact",
        422: "The complete upload doesn't hash to the digest: it was discarded",
        429: "The token has as many unfinished uploads as it may",
        507: "No room: the partial uploads' space or the artifacts quota",
    }
    return {
        status: ResponseSpec(UploadRefused, description=described[status], generate_examples=False)
        for status in sorted({400, 401, 403, *statuses})
    }


class UploadController(Controller):
    path = "/api/v1/uploads"
    tags = ["artifacts"]  # noqa: RUF012 - Litestar reads it as a plain list
    #: A piece may be as large as an artifact: its length is checked against its
    #: Content-Range (whose TOTAL is capped) while it is read, not by the app-wide limit.
    request_max_body_size = None

    @head("/{digest:str}", guards=require(Permission.UPLOAD), responses=_responses())
    async def offset(self, request: Request, digest: FromPath[str]) -> Response[None]:
        """How many bytes of this upload the switchboard holds for the calling token
        (`Upload-Offset`), and whether the artifact is stored already (`Upload-Stored:
        true`, the offset then being its size). Resume with a PUT from that offset."""
        state = app_state(request)
        if not is_valid_digest(digest):
            _count("invalid_request", f"HEAD of {digest!r}: not sha256:<64 hex digits>")
            return Response(None, status_code=400)  # a HEAD answer has no body: the status says
        upload = await _standing(state, request.state.token.id, digest)
        return Response(None, headers=_headers(upload))

    @put(
        "/{digest:str}",
        guards=require(Permission.UPLOAD),
        status_code=200,
        responses=_responses(409, 413, 422, 429, 507),
        operation_class=_PieceOperation,
    )
    async def piece(
        self,
        request: Request,
        digest: FromPath[str],
        # Optional here so that its absence is refused like any other bad range (counted).
        content_range: Annotated[str | None, HeaderParameter(name="Content-Range")] = None,
    ) -> Response[UploadState | UploadRefused]:
        """Append bytes START..END (inclusive) of an upload of TOTAL bytes. START must be
        the bytes held (HEAD says), else 409 with the offset. The piece that completes it
        is answered 201 once the bytes hash to the digest and are stored as an artifact
        (the same quota and uploader rules as POST /api/v1/artifacts); 422 if they don't
        (the partial upload is discarded). Bytes of a piece cut short are kept: resume
        after them."""
        state = app_state(request)
        token = request.state.token
        if not is_valid_digest(digest):
            return _refuse("invalid_request", 400, "digest must be sha256:<64 hex digits>")
        try:
            piece = parse_content_range(content_range)
        except ValueError as exc:
            return _refuse("invalid_request", 400, str(exc))
        partials = partial_uploads(state.artifacts.files)
        path = partials.path(token.id, digest)
        upload = await _standing(state, token.id, digest)
        if upload.stored:
            # The same bytes again are not stored twice: nothing to read, counted as a use.
            await state.artifacts.used(digest, upload.offset, token.id)
            partials.discard(path)
            return Response(upload, headers=_headers(upload))
        if partials.busy(path):
            return _refuse(
                "busy", 409, f"a piece of {digest} is being written: retry", upload.offset
            )
        partials.begin(path)  # before any await: a second piece is refused from here on
        try:
            held = partials.held(token.id, digest)  # again: a piece may have ended meanwhile
            refused = await _check_room(state, partials, token.id, digest, piece, held)
            if refused is not None:
                return refused
            announced = request.headers.get("content-length")
            if announced is not None and announced.isdigit() and int(announced) != piece.length:
                message = f"Content-Length {announced} is not the {piece.length} bytes of the range"
                return _refuse("invalid_request", 400, message)
            partials.reserved += piece.length
            try:
                return await _receive(request, state, partials, digest, piece)
            finally:
                partials.reserved -= piece.length
        finally:
            partials.end(path)


async def _standing(state: AppState, token_id: str, digest: str) -> UploadState:
    """Stored (in the index, and its file there), or what this token's partial holds."""
    stored = await state.store.get_artifact(digest)
    if stored is not None and await state.artifacts.exists(digest):
        return UploadState(digest, stored.size, stored=True)
    held = partial_uploads(state.artifacts.files).held(token_id, digest)
    return UploadState(digest, held, False)


async def _check_room(
    state: AppState,
    partials: PartialUploads,
    token_id: str,
    digest: str,
    piece: ContentRange,
    held: int,
) -> Response[UploadState | UploadRefused] | None:
    """The refusal of a piece that may not be written, before a byte of it is read."""
    settings = state.settings
    if piece.total > settings.max_artifact_bytes:
        message = f"an artifact is at most {settings.max_artifact_bytes} bytes, not {piece.total}"
        return _refuse("too_large", 413, message, held)
    if piece.start != held:
        message = f"the piece starts at byte {piece.start}, but {held} bytes are held: resume there"
        return _refuse("offset_mismatch", 409, message, held)
    if held == 0:  # a new upload
        open_now = partials.count(token_id, besides=partials.path(token_id, digest))
        if open_now >= settings.max_partial_uploads_per_token:
            message = (
                f"this token has {open_now} unfinished uploads, the most it may: finish"
                " them, or wait for retention to remove the stale ones"
            )
            return _refuse("too_many_uploads", 429, message, held)
        quota = settings.artifacts_quota_bytes
        stored = await state.store.stored_artifact_bytes()
        if quota and stored + piece.total > quota:
            message = (
                f"the artifacts stored take {stored} of the {quota} bytes allowed; this one"
                f" needs {piece.total} more: delete artifacts no job needs, or raise"
                " --artifacts-quota"
            )
            return _refuse("quota", 507, message, held)
    on_disk = partials.bytes_on_disk() + partials.reserved
    if on_disk + piece.length > settings.max_partial_upload_bytes:
        message = (
            f"unfinished uploads hold {on_disk} of the {settings.max_partial_upload_bytes}"
            f" bytes they may; this piece needs {piece.length} more: retry later, or raise"
            " --max-partial-upload-bytes"
        )
        return _refuse("partial_space", 507, message, held)
    return None


async def _receive(
    request: Request,
    state: AppState,
    partials: PartialUploads,
    digest: str,
    piece: ContentRange,
) -> Response[UploadState | UploadRefused]:
    token = request.state.token
    path = partials.path(token.id, digest)
    try:
        held = await partials.append(path, piece, request.stream())
    except BodyMismatch as exc:
        return _refuse("invalid_request", 400, str(exc), partials.held(token.id, digest))
    except InternalServerException:
        # The client went away mid-piece (no refusal: nobody is there to tell). What
        # arrived is kept, for it to resume after.
        held = partials.held(token.id, digest)
        log.info("upload of %s by %s cut at byte %d", digest, actor(request), held)
        body = UploadRefused("invalid_request", "the body ended early", held)
        return Response(body, status_code=400, headers={OFFSET_HEADER: str(held)})
    if held < piece.total:
        upload = UploadState(digest, held, stored=False)
        return Response(upload, headers=_headers(upload))
    complete = await partials.finish(path)
    try:
        if complete.digest != digest:
            message = (
                f"the {complete.size} bytes uploaded hash to {complete.digest}, not {digest}:"
                " discarded, upload again from byte 0"
            )
            return _refuse("digest_mismatch", 422, message, 0)
        quota = state.settings.artifacts_quota_bytes or None
        added = await state.artifacts.keep(complete, token.id, quota)
        if added.outcome == "full":
            message = (
                f"the artifacts stored take {added.stored_bytes} of the {quota} bytes allowed;"
                f" this one needs {complete.size} more: delete artifacts no job needs, or"
                " raise --artifacts-quota"
            )
            return _refuse("quota", 507, message, 0)
    finally:
        partials.discard(path)  # nothing left to discard once kept
    log.info("artifact %s (%d bytes) uploaded in pieces by %s", digest, held, actor(request))
    upload = UploadState(digest, held, stored=True)
    return Response(upload, status_code=201, headers=_headers(upload))


def _headers(upload: UploadState) -> dict[str, str]:
    return {OFFSET_HEADER: str(upload.offset), STORED_HEADER: str(upload.stored).lower()}


#: The body's `error` for each refusal reason (the metric's label).
_KINDS = {
    "invalid_request": "invalid_request",
    "too_large": "too_large",
    "too_many_uploads": "too_many_requests",
    "partial_space": "insufficient_storage",
    "quota": "insufficient_storage",
    "offset_mismatch": "offset_mismatch",
    "busy": "upload_busy",
    "digest_mismatch": "digest_mismatch",
}


def _refuse(
    reason: str, status: int, message: str, offset: int | None = None
) -> Response[UploadState | UploadRefused]:
    """Tell the client why (the offset to resume from, if any, in the body and a header),
    count it, log it once."""
    _count(reason, message)
    # The piece's body may be unread: the connection ends with the answer (said, so the
    # client does not send its next request on a connection the server then closes).
    headers = {"Connection": "close"}
    if offset is not None:
        headers[OFFSET_HEADER] = str(offset)
    body = UploadRefused(_KINDS[reason], message, offset)
    return Response(body, status_code=status, headers=headers)


def _count(reason: str, message: str) -> None:
    metrics.UPLOAD_REFUSALS.labels(reason).inc()
    log.info("upload refused (%s): %s", reason, message)
