"""Device health (docs/lab.md): the states, which of them may be given a job, and who may
set which. Pure: the store reads a device's health, asks here, and writes the answer.

- `unknown`: nobody has said (a device just declared, or one whose state is in doubt);
- `good`: its last health check passed;
- `bad`: its last health check failed, or an operator saw it fail;
- `maintenance`: an operator is working on it;
- `looping`: under observation: its check runs after every run, whatever the result;
- `retired`: out of service for good (it stays in the inventory, with its history).

Placement never gives a job a device that is `bad`, in `maintenance` or `retired`; a
device that is `unknown`, `good` or `looping` may be given one.
"""

from __future__ import annotations

from typing import Literal

Health = Literal["unknown", "good", "bad", "maintenance", "looping", "retired"]
HEALTH_STATES: tuple[Health, ...] = ("unknown", "good", "bad", "maintenance", "looping", "retired")
#: The states a device may be given a job in.
PLACEABLE: frozenset[str] = frozenset({"unknown", "good", "looping"})
#: The states a device can leave only by an operator's hand: it never serves a job until
#: then, so a job that only such devices could serve waits (retired: is refused).
HELD_BACK: frozenset[str] = frozenset({"bad", "maintenance"})
#: A device in this state will never serve a job again (unless an operator brings it back).
OUT_OF_SERVICE: frozenset[str] = frozenset({"retired"})
#: Longest reason an operator may give.
MAX_REASON = 1024


def placeable(health: str) -> bool:
    return health in PLACEABLE


def refuse_change(wanted: str, reason: str) -> str | None:
    """Why an operator may not set a device's health to `wanted` with this reason (None:
    allowed). Every state may follow every other by an operator's hand; each change is
    kept in the device's history with who made it and why, so a reason is required."""
    if wanted not in HEALTH_STATES:
        return f"unknown health {wanted!r} (one of: {', '.join(HEALTH_STATES)})"
    if len(reason) > MAX_REASON:
        return f"the reason is longer than {MAX_REASON} characters"
    if not reason.strip():
        return "say why: the reason is kept in the device's history"
    return None
