"""The reconnect policy: full-jitter exponential delays and the error classifier."""

from __future__ import annotations

from itertools import islice

import pytest
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.frames import Close
from websockets.http11 import Response

from connector.backoff import Verdict, backoff, classify
from protocol.exceptions import CloseCode, FrameError

pytestmark = pytest.mark.unit


def test_ceiling_grows_exponentially_to_the_cap():
    delays = list(islice(backoff(initial=0.5, factor=2, cap=4, rand=lambda: 1.0), 6))
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_full_jitter_spreads_between_zero_and_the_ceiling():
    delays = list(islice(backoff(initial=1, factor=2, cap=8), 200))
    assert all(0 <= d <= 8 for d in delays)
    late = delays[10:]
    assert min(late) < 2 and max(late) > 6  # spread over the whole range, not lockstep


def test_zero_random_means_immediate_retry():
    assert next(backoff(rand=lambda: 0.0)) == 0.0


def _status(code: int) -> InvalidStatus:
    return InvalidStatus(Response(code, "x", {}, b""))  # type: ignore[arg-type]


def test_auth_and_version_refusals_are_fatal():
    assert classify(_status(401)) is Verdict.FATAL
    assert classify(_status(400)) is Verdict.FATAL
    closed = ConnectionClosedError(Close(CloseCode.UNAUTHORIZED, "revoked"), None)
    assert classify(closed) is Verdict.FATAL
    refused_hello = FrameError(CloseCode.UNAUTHORIZED, "token belongs to another supervisor")
    assert classify(refused_hello) is Verdict.FATAL


def test_transient_failures_are_retried():
    assert classify(_status(503)) is Verdict.RETRY
    assert classify(ConnectionRefusedError()) is Verdict.RETRY
    assert classify(TimeoutError()) is Verdict.RETRY
    closed = ConnectionClosedError(Close(CloseCode.GOING_AWAY, "restart"), None)
    assert classify(closed) is Verdict.RETRY
    assert classify(FrameError(CloseCode.PROTOCOL_ERROR, "garbled")) is Verdict.RETRY
