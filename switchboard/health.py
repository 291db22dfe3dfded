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

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from protocol.spec import JobSpec
from protocol.state import Phase

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


# --- health checks -----------------------------------------------------------------------
# A device class may have a check: a job spec the switchboard runs on one device of the
# class (it is granted that device and no other) when the device's health is unknown, when
# its last check is older than `period_s`, after `after_runs` runs since it (configurable),
# and after every run while it is `looping`. Until its check has ended the device is given
# no other job. The check's ending decides the health (check_outcome).


class HealthCheck(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The health check of one device class (the switchboard's --health-checks file)."""

    #: The job that checks a device (its `resources` are set to one device of the class).
    spec: JobSpec
    #: A check older than this is run again.
    period_s: Annotated[float, Meta(gt=0)] = 86400.0
    #: Run it again after this many runs on the device since its last check (None: never
    #: for that reason).
    after_runs: Annotated[int, Meta(ge=1)] | None = None
    #: After a failed check, power-cycle the device (if it has power commands) and check it
    #: again, up to this many times in a row; still failing: maintenance (switchboard/
    #: recovery.py). None: a failed check leaves the device bad, for an operator.
    recovery_attempts: Annotated[int, Meta(ge=1, le=10)] | None = None


#: After a check that ended by an infrastructure error, the next waits this long (so a
#: host that loses every run does not run checks back to back).
RECHECK_AFTER_ERROR_S = 60.0


class DeviceFacts(msgspec.Struct, frozen=True):
    """What deciding whether a device needs a check looks at."""

    id: str
    class_: str
    health: str
    #: When its last check ended, and how ("pass", "fail", "error"); None: never checked.
    check_at: float | None = None
    check_result: str | None = None
    #: A check job of it has not ended yet.
    checking: bool = False
    #: Runs it was granted (checks left out) that began after its last check.
    runs_since_check: int = 0


def check_due(device: DeviceFacts, check: HealthCheck, now: float) -> str | None:
    """Why `device` needs its check now (None: it does not)."""
    if device.checking or device.health in HELD_BACK | OUT_OF_SERVICE:
        return None
    if device.check_result == "error" and device.check_at is not None:
        if now - device.check_at < RECHECK_AFTER_ERROR_S:
            return None
    if device.health == "unknown" or device.check_at is None:
        return "its health is unknown"
    if now - device.check_at >= check.period_s:
        return f"its last check is older than {check.period_s:g} s"
    if device.health == "looping" and device.runs_since_check >= 1:
        return "it is looping: a check follows every run"
    if check.after_runs is not None and device.runs_since_check >= check.after_runs:
        return f"{device.runs_since_check} runs since its last check"
    return None


#: How a check job's ending becomes the check's result: its program said the device is
#: fine, or not (a cancel counts against the device: whoever canceled it saw something);
#: or it never got to say (the host, the supervisor or the switchboard failed it).
_RESULTS = {
    Phase.SUCCEEDED: "pass",
    Phase.FAILED: "fail",
    Phase.TIMED_OUT: "fail",
    Phase.CANCELED: "fail",
}


def check_outcome(phase: Phase, current: str) -> tuple[str, str]:
    """(the check's result, the health it gives) for a check job that ended in `phase` on
    a device whose health is `current`: pass -> good, fail -> bad, an infrastructure error
    (lost, rejected, exhausted) -> unknown, so that another check runs before any other
    job. A looping device stays looping whatever the result (its checks go on after every
    run), and one an operator took out of service while its check ran (bad, maintenance,
    retired) stays so: the result is only recorded."""
    result = _RESULTS.get(phase, "error")
    if current == "looping" or current in HELD_BACK | OUT_OF_SERVICE:
        return result, current
    return result, {"pass": "good", "fail": "bad"}.get(result, "unknown")


#: Why a run granted a device may end without the device being the job's fault: its host
#: was lost, or its supervisor could not give it the device (unplugged, or held by a run
#: the switchboard thought ended).
DOUBT_PHASES = (Phase.LOST,)
DOUBT_ERRORS = ("max_concurrent_jobs",)


def in_doubt(phase: Phase, error_kind: str | None) -> bool:
    """A run that held a device ended by an infrastructure error (see DOUBT_PHASES)."""
    return phase in DOUBT_PHASES or (phase == Phase.REJECTED and error_kind in DOUBT_ERRORS)


def after_run(health: str, phase: Phase, error_kind: str | None = None) -> str | None:
    """The health a device takes when a regular run that held it ended in `phase` (None:
    unchanged): an infrastructure error (in_doubt) leaves its state in doubt, so a check
    runs before its next job."""
    if in_doubt(phase, error_kind) and health in PLACEABLE and health != "unknown":
        return "unknown"
    return None
