"""Session rules over a real socket: a newer connection of the same supervisor replaces the
older one, and the session generation grows."""

from __future__ import annotations

from protocol.exceptions import CloseCode
from tests.test_bad_input import _closed_with, _handshake, _ws


async def test_newer_connection_replaces_older(switchboard):
    token = switchboard.create_token("supervisor", "twin")
    async with _ws(switchboard, token) as first:
        welcome_1 = await _handshake(first, "twin")
        async with _ws(switchboard, token) as second:
            welcome_2 = await _handshake(second, "twin")
            assert welcome_2.session > welcome_1.session
            code, reason, _ = await _closed_with(first)
            assert code == CloseCode.REPLACED and "replaced" in reason
            await second.ping()  # the newer one lives on
    sups = {s["id"]: s for s in switchboard.client().get("/api/v1/supervisors").json()}
    assert sups["twin"]["session"] == welcome_2.session


async def test_stored_seq_is_returned_on_reconnect(switchboard):
    token = switchboard.create_token("supervisor", "seq-check")
    async with _ws(switchboard, token) as ws:
        welcome = await _handshake(ws, "seq-check")
        assert welcome.last_seq == 0
    async with _ws(switchboard, token) as ws:
        again = await _handshake(ws, "seq-check")
        assert again.last_seq == 0 and again.session == welcome.session + 1
