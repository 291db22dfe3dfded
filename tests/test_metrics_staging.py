"""Metrics staged inside a store transaction count once it commits
(switchboard.metrics.staged_*). The PostgreSQL store's transactions interleave on the
event loop: each task stages apart (staged_in_task), so one's commit never counts
another's observations, and a transaction that fails counts nothing."""

from __future__ import annotations

import asyncio

import pytest

from switchboard import metrics

pytestmark = pytest.mark.unit


def _rejected() -> float:
    value = metrics.REGISTRY.get_sample_value(
        "switchboard_secrets_unreadable_total", {"via": "placement"}
    )
    return value or 0.0


async def test_tasks_stage_apart_and_count_only_their_own_once_committed():
    before = _rejected()
    both_staged = asyncio.Event()
    staged = 0

    async def transaction(name: str, *, fail: bool) -> None:
        nonlocal staged
        with metrics.staged_in_task():
            metrics.secrets_unreadable("placement")  # staged, not counted yet
            staged += 1
            if staged == 2:
                both_staged.set()
            await both_staged.wait()  # the two interleave: both have staged by now
            if fail:
                raise RuntimeError("rolled back")
            metrics.staged_commit()

    results = await asyncio.gather(
        transaction("committed", fail=False),
        transaction("rolled back", fail=True),
        return_exceptions=True,
    )
    assert isinstance(results[1], RuntimeError)
    assert _rejected() == before + 1  # the committed one's only
    assert metrics.staged_mark() == 0  # nothing left on the thread's own list
