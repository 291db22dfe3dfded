"""What the events of one run must look like (docs/protocol.md §6.2, §6.3, §7): pure
judgements over a list of events, each returning the problems found (none: it holds)."""

from __future__ import annotations

from collections.abc import Sequence

from protocol.messages import (
    EXIT_REASONS,
    JobErrorReport,
    JobExit,
    JobStateChanged,
    Output,
    SupervisorEvent,
)
from protocol.state import SUPERVISOR_REPORTABLE, Phase, can_transition, is_terminal


def phases(events: Sequence[SupervisorEvent]) -> list[str]:
    return [e.phase.value for e in events if isinstance(e, JobStateChanged)]


def terminal(events: Sequence[SupervisorEvent]) -> str | None:
    ends = [p for p in phases(events) if is_terminal(p)]
    return ends[-1] if ends else None


def describe(events: Sequence[object]) -> str:
    """The run's story in one line, e.g. `initializing(accepted) running output exit(0)
    succeeded`."""
    words = []
    for event in events:
        if isinstance(event, JobStateChanged):
            words.append(f"{event.phase.value}({event.stage})" if event.stage else event.phase)
        elif isinstance(event, Output):
            if not words or words[-1] != "output":
                words.append("output")
        elif isinstance(event, JobExit):
            code = event.exit_code if event.exit_code is not None else event.reason
            words.append(f"exit({code})")
        elif isinstance(event, JobErrorReport):
            words.append(f"error({event.kind.value})")
    return " ".join(words)


def phase_problems(events: Sequence[SupervisorEvent]) -> list[str]:
    """§7.1/§7.2: every state reportable and allowed after the one before (from
    `assigned`)."""
    problems = []
    current = Phase.ASSIGNED
    for phase in phases(events):
        if phase not in SUPERVISOR_REPORTABLE:
            problems.append(f"{phase} is not a phase a supervisor reports")
        elif not can_transition(current, phase):
            problems.append(f"{phase} may not follow {current.value}")
        current = Phase(phase)
    return problems


def order_problems(events: Sequence[SupervisorEvent]) -> list[str]:
    """§6.3: output, then error, then exit, then the terminal state, last; one of each
    end; an exit reason from §5.1's list."""
    problems = []
    ends = [
        i for i, e in enumerate(events) if isinstance(e, JobStateChanged) and is_terminal(e.phase)
    ]
    exits = [i for i, e in enumerate(events) if isinstance(e, JobExit)]
    errors = [i for i, e in enumerate(events) if isinstance(e, JobErrorReport)]
    outputs = [i for i, e in enumerate(events) if isinstance(e, Output)]
    if len(ends) != 1:
        problems.append(f"{len(ends)} terminal states")
    elif ends[0] != len(events) - 1:
        problems.append("events follow the terminal state")
    if len(exits) > 1:
        problems.append(f"{len(exits)} exit events")
    if exits and outputs and max(outputs) > exits[0]:
        problems.append("output after exit")
    if exits and errors and max(errors) > exits[0]:
        problems.append("error after exit")
    problems += [
        f"exit reason {e.reason!r} is not one of §5.1's"
        for e in events
        if isinstance(e, JobExit) and e.reason not in EXIT_REASONS
    ]
    return problems


def stream(events: Sequence[SupervisorEvent], name: str) -> tuple[bytes, list[str]]:
    """The bytes of one output stream, and what is wrong with its offsets (§6.2: each
    chunk starts where the one before ended, from 0). Resends (a seq seen before) are
    skipped."""
    data = bytearray()
    problems = []
    seen: set[int] = set()
    for event in events:
        if not isinstance(event, Output) or event.stream != name or event.seq in seen:
            continue
        seen.add(event.seq)
        if event.offset != len(data):
            problems.append(f"seq {event.seq}: offset {event.offset}, expected {len(data)}")
        data += event.data
    return bytes(data), problems
