"""How a docker run ended, as the Outcome the switchboard is told.

Why a module of its own: it is pure (a container's state and what the supervisor did to it
in, an Outcome out), and the wording matters to users: a stop names the signal that ended
the program, Docker's OOM flag becomes reason "oom", and notes (a replayed log that changed)
are appended to the message.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any

from protocol.limits import clip_message
from supervisor.backends.base import Outcome, RunContext


@dataclass
class Stopping:
    """What the supervisor did to end a container."""

    signals: list[str] = field(default_factory=list)
    grace_s: float = 0.0
    took_s: float = 0.0


def outcome(
    ctx: RunContext,
    state: dict[str, Any],
    stopping: Stopping | None,
    notes: list[str],
    memory_mb: int | None,
) -> Outcome:
    """How a container ended, from its state, what the supervisor did to it and the
    container's memory limit (the spec's `memory_mb`, for the message)."""
    code = state.get("ExitCode")
    if stopping is not None:
        reason = "timeout" if ctx.stop_reason == "timeout" else "canceled"
        why = "run timeout" if reason == "timeout" else f"stopped ({ctx.stop_reason})"
        sig = None
        for name in reversed(stopping.signals):
            number = _signal_number(name)
            if number is not None and code == 128 + number:
                sig = number
                break
        if not stopping.signals:
            text = f"{why}: the program had already ended (exit code {code})"
        elif stopping.signals[-1] == "SIGKILL" and len(stopping.signals) > 1:
            text = (
                f"{why}: still running {stopping.grace_s:g} s after {stopping.signals[0]}; "
                "killed with SIGKILL"
            )
        elif stopping.signals[-1] == "SIGKILL":
            text = f"{why}: killed with SIGKILL"
        else:
            text = (
                f"{why}: the program ended {stopping.took_s:.2f} s after "
                f"{stopping.signals[-1]} (exit code {code})"
            )
        return Outcome(exit_code=code, signal=sig, reason=reason, message=_with(text, notes))
    if state.get("OOMKilled") and code != 0:
        limit = f" of {memory_mb} MB" if memory_mb else ""
        return Outcome(
            exit_code=code,
            signal=int(signal.SIGKILL) if code == 128 + signal.SIGKILL else None,
            reason="oom",
            message=_with(
                f"out of memory: the kernel killed the program at the memory limit{limit}",
                notes,
            ),
        )
    return Outcome(exit_code=code, message=_with(None, notes))


def _with(text: str | None, notes: list[str]) -> str | None:
    if not notes:
        return text
    return clip_message("; ".join([t for t in (text, *notes) if t]))


def _signal_number(name: str) -> int | None:
    """SIGTERM, TERM or 15 -> 15."""
    if name.isdigit():
        return int(name)
    try:
        return int(signal.Signals[name if name.startswith("SIG") else f"SIG{name}"])
    except KeyError:
        return None


def stopped_early(ctx: RunContext) -> Outcome:
    reason = "timeout" if ctx.stop_reason == "timeout" else "canceled"
    return Outcome(
        exit_code=None, reason=reason, message=f"stopped ({ctx.stop_reason}) before it started"
    )
