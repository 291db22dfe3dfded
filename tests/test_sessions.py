"""Session rules over a real socket: a newer connection of the same supervisor replaces the
older one, and the session generation grows."""

from __future__ import annotations

from protocol.exceptions import CloseCode
from tests.supervisor_ws import closed_with, connect_ws, handshake


async def test_newer_connection_replaces_older(switchboard):
    token = switchboard.create_token("supervisor", "twin")
    async with connect_ws(switchboard, token) as first:
        welcome_1 = await handshake(first, "twin")
        async with connect_ws(switchboard, token) as second:
            welcome_2 = await handshake(second, "twin")
            assert welcome_2.session > welcome_1.session
            code, reason, _ = await closed_with(first)
            assert code == CloseCode.REPLACED and "replaced" in reason
            await second.ping()  # the newer one lives on
    sups = {s["id"]: s for s in switchboard.client().get("/api/v1/supervisors").json()}
    assert sups["twin"]["session"] == welcome_2.session


async def test_stored_seq_is_returned_on_reconnect(switchboard):
    token = switchboard.create_token("supervisor", "seq-check")
    async with connect_ws(switchboard, token) as ws:
        welcome = await handshake(ws, "seq-check")
        assert welcome.last_seq == 0
    async with connect_ws(switchboard, token) as ws:
        again = await handshake(ws, "seq-check")
        assert again.last_seq == 0 and again.session == welcome.session + 1
