"""Fault injection: a loopback TCP proxy that can cut, stall or slow the connections it
carries. It runs its own event loop in a thread, so synchronous tests can drive it while
real supervisor and switchboard processes talk through it."""

from __future__ import annotations

import asyncio
import contextlib
import threading


class FaultyProxy:
    """Forwards 127.0.0.1:<port> to 127.0.0.1:<target_port>."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.cuts = 0
        self.accepted = 0
        self._stalled: set[asyncio.StreamWriter] = set()
        self._delay_s = 0.0
        self._cut_next_reply = False
        #: Bytes clients may still send before their connection is cut (None: no limit).
        self._send_budget: int | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faulty-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    # --- controls (call from the test's thread) --------------------------------------

    def cut(self) -> int:
        """Close every carried connection abruptly; returns how many were cut."""
        return asyncio.run_coroutine_threadsafe(self._cut(), self._loop).result(10)

    def stall(self) -> int:
        """Stop forwarding bytes on the connections carried now, without closing them (a
        half-open link); new connections flow normally. Returns how many were stalled."""
        pairs = list(self._pairs)
        for pair in pairs:
            self._stalled.update(pair)
        return len(pairs)

    def cut_next_reply(self) -> None:
        """Cut the next connection (both ends, abruptly) when the server sends its second
        piece of data, which is not forwarded: on a WebSocket, the upgrade response gets
        through and the first message (a Welcome) is lost."""
        self._cut_next_reply = True

    def cut_after_sent(self, n_bytes: int) -> None:
        """Cut the connection that carries the client's `n_bytes`-th byte from now (both
        ends, abruptly), having forwarded at most that many: a link lost mid-request.
        Once: later bytes flow normally."""
        self._send_budget = n_bytes

    def slow(self, delay_s: float) -> None:
        """Delay every forwarded piece of data by `delay_s`."""
        self._delay_s = delay_s

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # --- the proxy itself -------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter):
        try:
            upstream_r, upstream_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        self.accepted += 1
        pair = (client_w, upstream_w)
        self._pairs.add(pair)
        forward = None
        if self._cut_next_reply:
            self._cut_next_reply = False
            forward = 1
        try:
            await asyncio.gather(
                self._pipe(client_r, upstream_w, pair, sending=True),
                self._pipe(upstream_r, client_w, pair, forward),
            )
        finally:
            self._pairs.discard(pair)
            for writer in pair:
                self._stalled.discard(writer)
                writer.close()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter] | None = None,
        forward: int | None = None,
        *,
        sending: bool = False,
    ) -> None:
        """Copy until EOF; with `forward`, cut `pair` at the read after that many; when
        `sending` (client to server), within the send budget."""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if sending and self._send_budget is not None and pair is not None:
                    if len(data) >= self._send_budget:
                        writer.write(data[: self._send_budget])
                        await writer.drain()
                        self._send_budget = None
                        self.cuts += 1
                        for end in pair:
                            end.transport.abort()
                        return
                    self._send_budget -= len(data)
                if forward is not None and pair is not None:
                    if forward == 0:
                        self.cuts += 1
                        for end in pair:
                            end.transport.abort()
                        return
                    forward -= 1
                while writer in self._stalled:  # noqa: ASYNC110 - a test tool; polling is fine
                    await asyncio.sleep(0.05)
                if self._delay_s:
                    await asyncio.sleep(self._delay_s)
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()

    async def _cut(self) -> int:
        pairs = list(self._pairs)
        for pair in pairs:
            for writer in pair:
                transport = writer.transport
                transport.abort()  # RST, no goodbye: like a cable pulled
        self.cuts += len(pairs)
        return len(pairs)

    async def _shutdown(self) -> None:
        await self._cut()
        self._server.close()
