"""Serve the dashboard: its page at `/`, its assets under `/dashboard/`."""

from __future__ import annotations

import functools
from pathlib import Path

from litestar import MediaType, Request, Response, Router, get
from litestar.datastructures import CacheControlHeader
from litestar.static_files import create_static_files_router

from switchboard.api.errors import ApiError

STATIC = Path(__file__).resolve().parent / "static"

#: The page runs only its own modules and talks only to its own origin: data the API
#: returns (job names, output) can never become script, even if it slipped into the DOM.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)

PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@functools.cache
def _page() -> bytes:
    # Read once, not on the event loop at every request.
    return (STATIC / "index.html").read_bytes()


@get("/", include_in_schema=False, sync_to_thread=False)
def dashboard_page(request: Request) -> Response[bytes]:
    """The single page; the hash (#/jobs, #/jobs/ID, ...) picks the view in the browser."""
    return Response(
        _page(),
        media_type=MediaType.HTML,
        headers=PAGE_HEADERS,
    )


def _nosniff(response: Response) -> Response:
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def _no_control_characters(request: Request) -> None:
    """A path holding a control character names no asset (and a NUL byte would make the
    file lookup fail with a 500)."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in request.url.path):
        raise ApiError(404, "not_found", "no such file")


def dashboard_routes() -> list[Router | object]:
    """The route handlers to register on the app."""
    assets = create_static_files_router(
        path="/dashboard",
        directories=[STATIC],
        name="dashboard",
        include_in_schema=False,
        # Revalidated on every load (cheap with ETags): a new version is never half-cached.
        cache_control=CacheControlHeader(no_cache=True),
        before_request=_no_control_characters,
        after_request=_nosniff,
    )
    return [dashboard_page, assets]
