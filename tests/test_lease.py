"""The leader lease's decisions (switchboard.lease): who holds it, with which term, and
when a holder must stop acting."""

from __future__ import annotations

import pytest

from switchboard.lease import (
    LEASE_TTL_S,
    SAFETY_MARGIN,
    LeaseRow,
    acting_until,
    claim,
    release,
    replica_dead,
)

pytestmark = pytest.mark.unit


def test_the_first_claim_takes_term_one():
    got = claim(None, "a", 100.0)
    assert got.hold and got.taken and got.term == 1
    assert got.row == LeaseRow("a", 1, 100.0 + LEASE_TTL_S)


def test_the_holder_renews_keeping_its_term():
    got = claim(LeaseRow("a", 3, 105.0), "a", 100.0, ttl_s=10)
    assert got.hold and not got.taken and got.term == 3
    assert got.row == LeaseRow("a", 3, 110.0)


def test_a_lease_another_holds_is_left_alone_until_it_expires():
    held = LeaseRow("a", 3, 105.0)
    got = claim(held, "b", 104.9)
    assert not got.hold and got.row is None and got.term == 3
    taken = claim(held, "b", 105.0, ttl_s=10)
    assert taken.hold and taken.taken and taken.term == 4
    assert taken.row == LeaseRow("b", 4, 115.0)


def test_a_holder_whose_lease_lapsed_takes_a_new_term():
    # Writes it began under term 3 must be refused: it comes back with term 4.
    got = claim(LeaseRow("a", 3, 99.0), "a", 100.0)
    assert got.hold and got.taken and got.term == 4


def test_release_expires_only_the_own_lease_and_keeps_the_term():
    assert release(LeaseRow("a", 3, 110.0), "a", 100.0) == LeaseRow("a", 3, 100.0)
    assert release(LeaseRow("a", 3, 110.0), "b", 100.0) is None
    assert release(None, "a", 100.0) is None
    assert claim(LeaseRow("a", 3, 100.0), "b", 100.0).term == 4


def test_a_holder_acts_only_until_before_its_lease_could_expire():
    assert acting_until(50.0, ttl_s=10) == pytest.approx(59.0)
    for ttl in (0.5, 1.0, 10.0, 60.0):
        # Short of the lease, by a margin that grows with it, and never gone.
        assert 50.0 < acting_until(50.0, ttl_s=ttl) == 50.0 + ttl * (1 - SAFETY_MARGIN)


def test_a_replica_silent_past_the_timeout_is_dead():
    assert not replica_dead(100.0, 100.0 + LEASE_TTL_S)
    assert replica_dead(100.0, 100.1 + LEASE_TTL_S)
