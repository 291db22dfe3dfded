"""What a scenario works with: the kit's switchboard, the process under test, one ledger
of events per process, the established connection if there is one; and the rows a
scenario fills in."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from protocol.messages import Hello

from .report import Result
from .sup_link import KitFailure, Ledger, Link, establish, read_hello
from .sup_process import SupervisorProcess
from .sup_server import Closed, KitServer, Peer, PeerTimeout


class Kit:
    def __init__(
        self, server: KitServer, process: SupervisorProcess, startup_timeout_s: float
    ) -> None:
        self.server = server
        self.process = process
        self.startup_timeout_s = startup_timeout_s
        #: One per process started, the current one last.
        self.ledgers: list[Ledger] = []
        self.link: Link | None = None
        self.sessions = 0

    @property
    def ledger(self) -> Ledger:
        return self.ledgers[-1]

    async def stop_process(self) -> None:
        """Stop the process under test and forget its connections."""
        self.link = None
        self.server.drop_all()
        await asyncio.to_thread(self.process.stop)
        self.server.drop_all()  # what connected while it stopped

    async def restart(self) -> None:
        """A fresh process of the command under test (the previous one stopped)."""
        await self.stop_process()
        self.ledgers.append(Ledger())
        self.process.start()

    async def accept(self, timeout_s: float | None = None) -> Peer:
        """The next connection (KitFailure if none comes in time)."""
        try:
            return await self.server.accept(timeout_s or self.startup_timeout_s)
        except PeerTimeout as exc:
            code = self.process.exit_code()
            exited = "" if code is None else f" (it exited with code {code})"
            raise KitFailure(f"{exc}{exited}") from None

    async def accept_hello(self, timeout_s: float | None = None) -> tuple[Peer, Hello]:
        """The next connection and its hello."""
        peer = await self.accept(timeout_s)
        return peer, await read_hello(peer)

    async def establish(self, peer: Peer, hello: Hello, last_seq: int | None = None) -> Link:
        self.sessions += 1
        self.link = await establish(peer, hello, self.ledger, self.sessions, last_seq)
        return self.link

    async def connected(self) -> Link:
        """The established connection; a fresh process's if there is none."""
        link = self.link
        if link is not None and link.peer.closed is None and self.process.exit_code() is None:
            return link
        await self.restart()
        return await self.establish(*await self.accept_hello())

    async def closed(self, peer: Peer, timeout_s: float) -> Closed | None:
        """How the connection ended, once it has (None: still open after `timeout_s`);
        whatever comes meanwhile is dropped."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            left = deadline - asyncio.get_running_loop().time()
            try:
                item = await peer.next(max(left, 0.0))
            except PeerTimeout:
                return None
            if isinstance(item, Closed):
                return item

    async def close(self) -> None:
        await asyncio.to_thread(self.process.stop)
        await self.server.stop()


class Checks:
    """The rows of one scenario, in their stable order."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self._results: dict[str, Result] = {}

    def add(self, name: str, passed: bool, detail: str) -> None:
        assert name in self.names, name
        self._results[name] = Result(name, passed, detail)

    def require(self, name: str, problems: Sequence[str], detail: str) -> None:
        """Pass with `detail` if there are no problems, else fail naming them."""
        self.add(name, not problems, "; ".join(problems) if problems else detail)

    def finish(self, failure: str | None) -> list[Result]:
        """Every row: those not filled in fail, the first with `failure` (why the scenario
        stopped), the others as not reached."""
        rows = []
        for name in self.names:
            if name in self._results:
                rows.append(self._results[name])
            elif failure is not None:
                rows.append(Result(name, False, failure))
                failure = None
            else:
                rows.append(Result(name, False, "not reached: an earlier step failed"))
        return rows
