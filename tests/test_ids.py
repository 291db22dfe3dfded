"""Job ids: unique, valid ids, and in the order they were made (the store's indexes grow
at one end)."""

from __future__ import annotations

import re

import pytest

from protocol.limits import ID_PATTERN
from switchboard.ids import new_job_id

pytestmark = pytest.mark.unit


def test_ids_are_unique_valid_and_in_the_order_made():
    ids = [new_job_id() for _ in range(200_000)]  # far more than one per millisecond
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(re.match(ID_PATTERN, i) and len(i) == 24 for i in ids[::1000])
