"""Job ids that sort by when they were made.

A job's id leads every index that holds it (jobs, runs, run phases, events, output). A
random id lands each new job on a random page of each of them, so every commit rewrites
pages all over the file; an id that grows with time adds at the end, touching a few.
"""

from __future__ import annotations

import random
import threading
import time

_lock = threading.Lock()
_last_ms = 0
_sequence = 0


def new_job_id() -> str:
    """24 hex digits: milliseconds since the epoch (12), a sequence within the millisecond
    (4), random (8). Ids made by one process sort in the order they were made; the random
    part keeps ids apart across processes and clocks set back."""
    global _last_ms, _sequence
    with _lock:
        now_ms = time.time_ns() // 1_000_000
        if now_ms > _last_ms:
            _last_ms, _sequence = now_ms, 0
        else:  # the same millisecond, or the clock went back: keep growing
            _sequence += 1
            if _sequence > 0xFFFF:
                _last_ms, _sequence = _last_ms + 1, 0
        # Not a secret (every route needs a token): the fast generator, not the OS's.
        return f"{_last_ms:012x}{_sequence:04x}{random.getrandbits(32):08x}"
