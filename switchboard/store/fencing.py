"""Fences on writes of a store several switchboard replicas share (PostgreSQL).

Two kinds of work must never write once another replica has taken it over:
- singleton work (timeouts, lost hosts, retention, sweeps) runs under the leader lease's
  term (switchboard.lease): its writes check, in their transaction, that the term is still
  the lease's, under a share lock on the lease row (a takeover waits for them);
- a supervisor's connection writes under its session, the epoch its connect was given:
  its writes check, in their transaction, that the supervisor is still connected with
  that session (a reconnect anywhere, or the leader reaping a dead replica's sessions,
  moves it on).

The term and the session ride in context variables, set once by the task that does the
work (the leader's singleton tasks, a connection's serving task) and inherited by the
tasks it starts, so no store method needs another argument. A store that one process
serves (SQLite) never reads them.
"""

from __future__ import annotations

import contextvars

#: The NOTIFY channel replicas hint each other on: payloads are hints (the id of a
#: supervisor with commands waiting, JOBS_QUEUED, or ANSWERED and a command's seq), never
#: the commands themselves.
CHANNEL = "switchboard"
JOBS_QUEUED = "+jobs"
#: A hint that the answer to a power command was written: this prefix, then its seq.
ANSWERED = "="

#: The lease term singleton work runs under (None: not singleton work).
LEADER_TERM: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "leader_term", default=None
)
#: (supervisor id, session) a connection writes for (None: not a connection's write).
SESSION: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "session", default=None
)


class Fenced(Exception):
    """A write refused because the replica making it was superseded; nothing was written."""

    fence = ""


class StaleTerm(Fenced):
    """Singleton work under a lease term that has moved on (another replica leads)."""

    fence = "term"


class SessionSuperseded(Fenced):
    """A connection's write after its supervisor's session moved on (it reconnected, or
    its replica was taken for dead)."""

    fence = "session"
