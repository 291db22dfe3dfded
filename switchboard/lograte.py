"""Log lines a flood could repeat without end (one per refused connection), at most one per
kind in an interval: the first at once, the next after the interval saying how many were
left out meanwhile. Metrics keep the exact counts."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLimitedLog:
    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        #: kind -> (when its last line was written, lines left out since).
        self._kinds: dict[str, tuple[float, int]] = {}

    def warning(self, kind: str, message: str, *args: object) -> None:
        """Log `message % args` unless a line of `kind` was written within the interval."""
        now = self._clock()
        last, left_out = self._kinds.get(kind, (float("-inf"), 0))
        if now - last < self._interval_s:
            self._kinds[kind] = (last, left_out + 1)
            return
        self._kinds[kind] = (now, 0)
        if left_out:
            message += " (and %d more like it since the last such line)"
            args = (*args, left_out)
        self._logger.warning(message, *args)
