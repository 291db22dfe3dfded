"""API errors: one body shape for every failure, `{"error": kind, "message": text}`.

Statuses: 400 invalid request or spec, 401 no or bad token, 403 role not allowed,
404 unknown id, 409 conflict, 413 body too large, 429 too many requests, 503 not ready,
507 a storage quota used up, 500 anything unexpected (whose details go to the log, never
to the client).
"""

from __future__ import annotations

import logging

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec

log = logging.getLogger("switchboard.api")

_KINDS = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    416: "range_not_satisfiable",
    429: "too_many_requests",
    503: "unavailable",
    507: "insufficient_storage",
}


class ErrorBody(msgspec.Struct):
    error: str
    message: str
    field: str | None = None


_DESCRIPTIONS = {
    400: "Invalid request or spec",
    401: "No token, or not a valid one",
    403: "The token's role may not do this",
    404: "No such id",
    409: "Conflicts with the current state",
    413: "Body too large",
    416: "The Range asked for starts past the end",
    429: "Too many requests (the queue, or the token's share of it, is full)",
    503: "A host it needs is not connected",
    504: "The host did not answer in time",
    507: "The switchboard's storage quota is used up",
}


def error_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """The `responses=` of a guarded route: 400, 401 and 403, plus `statuses`, each with
    the ErrorBody this module answers with (the OpenAPI schema then names the real shape,
    not Litestar's default error body)."""
    return {
        status: ResponseSpec(ErrorBody, description=_DESCRIPTIONS[status], generate_examples=False)
        for status in sorted({400, 401, 403, *statuses})
    }


class ApiError(HTTPException):
    """An error with a specific kind (e.g. `invalid_spec`) rather than the status's default."""

    def __init__(
        self,
        status_code: int,
        kind: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.kind = kind
        self.field = field


def invalid_spec(exc: msgspec.ValidationError) -> ApiError:
    """A 400 naming the field msgspec pointed at (`... - at `$.backend.module``)."""
    text, _, where = str(exc).partition(" - at `$.")
    field = where.rstrip("`") or None
    return ApiError(400, "invalid_spec", f"{field}: {text}" if field else text, field)


def _body(
    status: int, body: ErrorBody, headers: dict[str, str] | None = None
) -> Response[ErrorBody]:
    return Response(body, status_code=status, headers=headers)


def http_error(_: Request, exc: HTTPException) -> Response[ErrorBody]:
    if isinstance(exc, ApiError):
        return _body(exc.status_code, ErrorBody(exc.kind, exc.detail, exc.field), exc.headers)
    if isinstance(exc, ValidationException):
        return validation_error(_, exc)
    kind = _KINDS.get(exc.status_code, "error")
    if exc.status_code >= 500:
        return _body(exc.status_code, ErrorBody(kind, "the switchboard failed to handle this"))
    return _body(exc.status_code, ErrorBody(kind, exc.detail))


def validation_error(_: Request, exc: ValidationException) -> Response[ErrorBody]:
    """Name the offending field, e.g. `backend.module: Expected str matching regex ...`."""
    problems = exc.extra if isinstance(exc.extra, list) else []
    if problems:
        first = problems[0]
        key = first.get("key") if isinstance(first, dict) else None
        if key == "data":  # the whole body: the message itself names the field
            key = None
            # Litestar drops a location starting with an index (a list body, e.g. a
            # batch's `[1].backend.delay_s`); msgspec's own error still has it.
            cause = str(exc.__cause__ or "")
            if " - at `$.data[" in cause:
                key = cause.partition(" - at `$.data")[2].rstrip("`")
        text = first.get("message", exc.detail) if isinstance(first, dict) else str(first)
        message = f"{key}: {text}" if key else str(text)
        return _body(400, ErrorBody("invalid_request", message, key))
    return _body(400, ErrorBody("invalid_request", exc.detail))


def internal_error(request: Request, exc: Exception) -> Response[ErrorBody]:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _body(500, ErrorBody("internal", "the switchboard failed to handle this"))


EXCEPTION_HANDLERS = {
    HTTPException: http_error,
    ValidationException: validation_error,
    Exception: internal_error,
}
