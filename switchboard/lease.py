"""The leader lease of switchboard replicas sharing one database, as pure decisions.

Work that must run once for the whole lab (run and queue timeouts, lost hosts, retention,
the lab's sweeps, reaping dead replicas' sessions) runs only on the replica holding the
lease: a row in the database with its holder, its term and when it expires (the database's
clock). Every replica tries to claim it every few seconds: the holder renews it; another
takes it once it has expired, with the next term. Writes made by singleton work carry the
term they were started under and are refused once the term has moved on (a fence), so a
leader that stalled (paused, partitioned) and wakes up changes nothing.

A holder also stops acting on its own clock: its lease is good only until `ttl_s` after
the renewal *started* (less a margin), so it steps down before any other replica could
take over, even if it can't reach the database to hear so.
"""

from __future__ import annotations

from dataclasses import dataclass

#: How long a lease lasts unless renewed, and how often replicas claim it. A leader that
#: dies is replaced within ttl + one claim period (about 12 s with these).
LEASE_TTL_S = 10.0
CLAIM_EVERY_S = 2.0
#: A holder steps down this share of its lease before the lease could expire on the
#: database's clock (1 s of the default 10 s).
SAFETY_MARGIN = 0.1


@dataclass(frozen=True)
class LeaseRow:
    """The lease as stored: its holder (a replica id), term and expiry (epoch seconds)."""

    holder: str
    term: int
    expires_at: float


@dataclass(frozen=True)
class Claim:
    """What a claim decides. `hold`: the claimant holds the lease (for `term`) after it;
    `row`: what to store (None: leave the row as it is); `taken`: the claimant holds a new
    term (it was not the holder before, or its own lease had lapsed)."""

    hold: bool
    term: int
    row: LeaseRow | None
    taken: bool = False


def claim(current: LeaseRow | None, me: str, now: float, ttl_s: float = LEASE_TTL_S) -> Claim:
    """Replica `me` claims the lease at `now` (the database's clock). The holder renews a
    lease that has not expired, keeping its term; anyone takes an expired lease (its own
    too: writes begun under a lapsed term must be refused) with the next term; a lease
    another holds and that has not expired is left alone."""
    if current is None:
        return Claim(True, 1, LeaseRow(me, 1, now + ttl_s), taken=True)
    if current.expires_at > now:
        if current.holder == me:
            return Claim(True, current.term, LeaseRow(me, current.term, now + ttl_s))
        return Claim(False, current.term, None)
    term = current.term + 1
    return Claim(True, term, LeaseRow(me, term, now + ttl_s), taken=True)


def release(current: LeaseRow | None, me: str, now: float) -> LeaseRow | None:
    """A holder stopping: its lease expires now, so the next claim anywhere takes it (the
    term stays: the next holder's is one higher). None: not `me`'s, leave it."""
    if current is None or current.holder != me:
        return None
    return LeaseRow(me, current.term, min(current.expires_at, now))


def acting_until(claim_started: float, ttl_s: float = LEASE_TTL_S) -> float:
    """Until when (on the claimant's own monotonic clock, from when its successful claim
    started) a holder may act: before the lease could expire on the database's clock."""
    return claim_started + ttl_s * (1 - SAFETY_MARGIN)


def replica_dead(last_seen: float, now: float, dead_after_s: float = LEASE_TTL_S) -> bool:
    """A replica that has not renewed its row for `dead_after_s` is taken for dead: the
    leader ends the sessions it held (their supervisors reconnect elsewhere)."""
    return now - last_seen > dead_after_s
