"""Long-lived responses (the dashboard's live feed, a run's output followed live) and the
rule they share: a stream ends soon after the token that opened it is revoked.

A guard checks the token when a request arrives; a stream outlives that check by hours. So
each stream's source yields None whenever it has waited TICK_S with nothing to send, and
`until_revoked` drops those ticks and, at least once per TICK_S, looks the token up again.
The lookup is the one every request makes (cached; the store forgets its cache at every
revocation made through this process), so a revocation through the API ends the stream
within about two ticks, and one written by another process (`switchboard token revoke
--data-dir`) once the cached lookup expires.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TypeVar

import msgspec
from litestar import Request
from litestar.response import ServerSentEventMessage

from switchboard import metrics
from switchboard.api.errors import ErrorBody
from switchboard.auth import authenticate
from switchboard.state import app_state

log = logging.getLogger("switchboard.api")

T = TypeVar("T")

#: The longest a stream's source waits before yielding a tick (None), and how often the
#: token is looked up again.
TICK_S = 1.0


async def until_revoked(
    request: Request,
    source: AsyncGenerator[T | None, None],
    route: str,
    farewell: Callable[[], T] | None = None,
) -> AsyncIterator[T]:
    """What `source` yields, ticks left out, until it ends or the request's token is
    revoked; then `farewell()` (if given) is the last item, telling the client why.
    `route` names it in the log and metrics (one of metrics.LONG_ROUTES)."""
    store = app_state(request).store
    authorization = request.headers.get("authorization")
    token = request.state.token
    checked = time.monotonic()
    async with contextlib.aclosing(source):
        async for item in source:
            if time.monotonic() - checked >= TICK_S:
                checked = time.monotonic()
                if await authenticate(store, authorization) is None:
                    metrics.STREAMS_REVOKED.labels(route).inc()
                    log.info("%s stream of token %s ended: the token was revoked", route, token.id)
                    if farewell is not None:
                        yield farewell()
                    return
            if item is not None:
                yield item


def revoked_event() -> ServerSentEventMessage:
    """The farewell of an event stream whose token was revoked: a `revoked` event with the
    API's error body (reconnecting, the client gets a 401)."""
    body = ErrorBody("unauthorized", "the token was revoked")
    return ServerSentEventMessage(data=msgspec.json.encode(body).decode(), event="revoked")
