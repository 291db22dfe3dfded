"""A switchboard told to stop (SIGTERM, SIGINT) tells each supervisor first, as
docs/protocol.md §5.1 and §10 say: protocol_error 1013 with retry_after_s, then close 1013."""

from __future__ import annotations

import asyncio
import signal

import pytest
from websockets.exceptions import ConnectionClosed

from protocol import codec
from protocol.exceptions import CloseCode
from protocol.messages import ProtocolErrorMessage
from tests.harness import Switchboard, scaled
from tests.supervisor_ws import connect_ws, handshake

pytestmark = pytest.mark.process


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_stopping_switchboard_says_try_again_later(tmp_path, sig):
    server = Switchboard(tmp_path / "data")
    try:
        token = server.create_token("supervisor")
        async with connect_ws(server, token) as ws:
            await handshake(ws, "leaving")
            server.process.proc.send_signal(sig)
            goodbye = None
            with pytest.raises(ConnectionClosed):
                while True:
                    frame = await asyncio.wait_for(ws.recv(decode=False), scaled(10))
                    message = codec.decode_from_switchboard(frame)
                    if isinstance(message, ProtocolErrorMessage):
                        goodbye = message
            assert goodbye is not None, "closed without a protocol_error first"
            assert goodbye.code == CloseCode.TRY_AGAIN_LATER
            assert goodbye.retry_after_s == 2.0
            assert ws.close_code == CloseCode.TRY_AGAIN_LATER
            assert ws.close_reason == goodbye.reason
    finally:
        server.stop()
