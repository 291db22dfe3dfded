"""Reconnect policy: a pure delay generator and a classifier of connection errors.

Both are plain functions so they can be swapped and tested without a network.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Iterator

from websockets.exceptions import ConnectionClosed, InvalidStatus

from protocol.exceptions import CloseCode, FrameError


def backoff(
    initial: float = 0.5,
    factor: float = 2.0,
    cap: float = 30.0,
    rand: Callable[[], float] = random.random,
) -> Iterator[float]:
    """Delays before successive reconnect attempts: exponential with full jitter.

    Attempt n waits a uniform random time in [0, min(cap, initial * factor**n)], so a
    fleet that lost the switchboard at the same instant doesn't reconnect in lockstep.
    """
    ceiling = initial
    while True:
        yield rand() * ceiling
        ceiling = min(cap, ceiling * factor)


class Verdict(enum.Enum):
    RETRY = "retry"
    FATAL = "fatal"


#: HTTP statuses during the upgrade that retrying won't fix.
_FATAL_STATUSES = frozenset({400, 401, 403, 404, 426})
#: Close codes after which reconnecting won't help.
_FATAL_CLOSE_CODES = frozenset({CloseCode.UNAUTHORIZED, CloseCode.UNSUPPORTED_VERSION})


def classify(exc: BaseException) -> Verdict:
    """Sort a connection failure into retryable and fatal (wrong token, wrong version)."""
    if isinstance(exc, InvalidStatus):
        return Verdict.FATAL if exc.response.status_code in _FATAL_STATUSES else Verdict.RETRY
    if isinstance(exc, ConnectionClosed):
        close = exc.rcvd
        if close is not None and close.code in _FATAL_CLOSE_CODES:
            return Verdict.FATAL
    if isinstance(exc, FrameError) and exc.code in _FATAL_CLOSE_CODES:
        return Verdict.FATAL  # the switchboard refused our Hello (e.g. a token bound elsewhere)
    return Verdict.RETRY


def is_unauthorized(exc: BaseException) -> bool:
    """True if the switchboard refused the token presented: HTTP 401 at the upgrade, or
    close code 4401 (after the Hello, or later when the token is revoked)."""
    if isinstance(exc, InvalidStatus):
        return exc.response.status_code == 401
    if isinstance(exc, ConnectionClosed):
        return exc.rcvd is not None and exc.rcvd.code == CloseCode.UNAUTHORIZED
    return isinstance(exc, FrameError) and exc.code == CloseCode.UNAUTHORIZED
