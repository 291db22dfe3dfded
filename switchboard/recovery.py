"""Recovery of devices whose health check failed (docs/lab.md "Recovery"). Pure: the checks
loop (switchboard/checks.py) asks here what to do, does it, and writes the answer.

A device class whose health check says `recovery_attempts = K` gets its failing devices
power-cycled: after a failed check, a device that has power commands is cycled and put back
to `unknown`, so that its check runs again; up to K times in a row. A check that passes ends
the series; a device still failing after K cycles, or whose power cycle did not succeed,
goes to `maintenance` with the reason, for an operator.
"""

from __future__ import annotations

from typing import Literal

import msgspec

#: Who the device's health and power history name for the steps of a recovery.
ACTOR = "switchboard (recovery)"


class Step(msgspec.Struct, frozen=True):
    """What to do with a device now: `cycle` its power (then `recheck` it), `recheck` it
    (its health back to unknown, so its check runs again), put it in `maintenance`, or
    leave it as it is (`none`); `attempt` is the power cycle's number (1 for the first),
    `reason` what its history says."""

    action: Literal["cycle", "recheck", "maintenance", "none"]
    reason: str = ""
    attempt: int = 0


def after_check(
    result: str,
    health: str,
    cycles_done: int,
    attempts: int | None,
    has_power: bool,
    check_job: str,
) -> Step:
    """What follows a health check that ended with `result` ("pass", "fail", "error") and
    gave the device `health`, after `cycles_done` recovery cycles in a row, for a class
    that allows `attempts` (None: no recovery)."""
    if result != "fail" or health != "bad" or not attempts:
        return Step("none")
    if not has_power:
        return Step("none", "it has no power commands to recover it with")
    if cycles_done >= attempts:
        return Step(
            "maintenance",
            f"health check still failing after {cycles_done} power cycle(s)"
            f" (last check {check_job})",
        )
    attempt = cycles_done + 1
    return Step(
        "cycle",
        f"health check {check_job} failed: power cycle {attempt} of {attempts}",
        attempt,
    )


def after_power(result: str, reason: str, attempt: int, attempts: int, check_job: str) -> Step:
    """What follows recovery power cycle number `attempt` (of `attempts`) that ended with
    `result` (models.POWER_RESULTS) after the failed check `check_job`: check the device
    again if it was cycled, otherwise maintenance (a board that cannot be cycled will not
    recover by itself)."""
    if result == "ok":
        return Step(
            "recheck",
            f"power-cycled ({attempt} of {attempts}) after failed health check {check_job}:"
            " checking it again",
            attempt,
        )
    why = f"{result}: {reason}" if reason else result
    return Step(
        "maintenance",
        f"power cycle {attempt} of {attempts} after failed health check {check_job}"
        f" did not succeed ({why})",
        attempt,
    )


def cycles_after(result: str, cycles_done: int) -> int:
    """How many recovery cycles in a row a device has after a check with `result`: a pass
    ends the series, anything else leaves it as it is."""
    return 0 if result == "pass" else cycles_done
