"""The Request class of every route.

Litestar decodes a JSON body without a type first (then converts it to the handler's
`data` type), and msgspec's untyped decoder recurses once per level of nesting: a body of
`[[[[...]]]]` a few thousand levels deep raises RecursionError. That is the client's
mistake, so it is a 400, the same way protocol.codec answers a supervisor's frame.
"""

from __future__ import annotations

from typing import Any

from litestar import Request

from switchboard.api.errors import ApiError


class SwitchboardRequest(Request):
    async def json(self) -> Any:
        try:
            return await super().json()
        except RecursionError:
            raise ApiError(400, "invalid_request", "the JSON body is nested too deeply") from None
