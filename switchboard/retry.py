"""Restart backoff: the delay before a job's next run (formulas in protocol.spec.Backoff)."""

from __future__ import annotations

import random
from collections.abc import Callable

from protocol.spec import Backoff


def restart_delay(
    backoff: Backoff,
    restart: int,
    previous_s: float | None = None,
    rand: Callable[[float, float], float] = random.uniform,
) -> float:
    """Seconds to wait before restart number `restart` (1 for the first)."""
    ceiling = min(backoff.max_s, backoff.first_s * backoff.factor ** (restart - 1))
    match backoff.jitter:
        case "none":
            return ceiling
        case "full":
            return rand(0.0, ceiling)
        case "equal":
            return ceiling / 2 + rand(0.0, ceiling / 2)
        case "decorrelated":
            previous = backoff.first_s if previous_s is None else previous_s
            return min(backoff.max_s, rand(backoff.first_s, max(backoff.first_s, 3 * previous)))
    raise ValueError(f"unknown jitter {backoff.jitter!r}")
