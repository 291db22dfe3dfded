"""Valid tokens remembered for a while: every request looks its token up.

Any revocation made through this process forgets them all at once, and a lookup that raced
with one is not remembered, so a revoked token fails on its very next request; the time
bounds how long one revoked by another process is still taken.
"""

from __future__ import annotations

import time

from switchboard.models import TokenView

#: How long a valid token's lookup is reused, and how many are kept.
TOKEN_CACHE_S = 10.0
TOKEN_CACHE_SIZE = 10_000


class TokenCache:
    def __init__(self, ttl_s: float = TOKEN_CACHE_S, size: int = TOKEN_CACHE_SIZE) -> None:
        self._ttl_s = ttl_s
        self._size = size
        #: digest -> (valid token, when it was read)
        self._tokens: dict[bytes, tuple[TokenView, float]] = {}
        #: Grows with every forget: a lookup started before one is not remembered.
        self.generation = 0

    def get(self, digest: bytes) -> TokenView | None:
        cached = self._tokens.get(digest)
        if cached is not None and time.monotonic() - cached[1] < self._ttl_s:
            return cached[0]
        return None

    def put(self, digest: bytes, token: TokenView, generation: int) -> None:
        """Remember `token`, read when the cache was at `generation`, unless a revocation
        came since."""
        if generation != self.generation:
            return
        if len(self._tokens) >= self._size:
            self._tokens.clear()
        self._tokens[digest] = (token, time.monotonic())

    def forget(self) -> None:
        self.generation += 1
        self._tokens.clear()
