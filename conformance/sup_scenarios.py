"""The scenarios the kit drives a supervisor through, each filling in its rows of the
table (docs/conformance.md lists them and what each proves): those about the connection
here (handshake, heartbeats, bad messages, retry-after, refusals), those about runs in
conformance.sup_jobs. Jobs use the `noop` backend.

A scenario takes the established connection (`kit.connected()`), or, when `fresh`, a
process the runner has just started. It raises KitFailure when it cannot go on; the rows
it had not filled in then fail.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from protocol import codec, limits
from protocol.exceptions import CloseCode
from protocol.messages import (
    ConsoleAttach,
    ConsoleClosed,
    Power,
    PowerResult,
    ProtocolErrorMessage,
)
from protocol.versions import CONSOLE_MINOR, POWER_MINOR, negotiate_version

from . import sup_files
from .sup_jobs import ack_problems, cut, duplicate, start, status, stopping, timeout
from .sup_kit import Checks, Kit
from .sup_link import HEARTBEAT_INTERVAL_S, KitFailure, read_hello
from .sup_server import PATH


@dataclass(frozen=True)
class Scenario:
    name: str
    rows: tuple[str, ...]
    run: Callable[[Kit, Checks], Awaitable[None]]
    #: Needs a process of its own, started just before.
    fresh: bool = False
    budget_s: float = 20.0


async def handshake(kit: Kit, checks: Checks) -> None:
    peer = await kit.accept()
    upgrade, problems = peer.upgrade, []
    if upgrade.path != PATH:
        problems.append(f"path {upgrade.path!r}, not {PATH}")
    if limits.SUBPROTOCOL not in upgrade.subprotocols:
        problems.append(f"subprotocols {list(upgrade.subprotocols)} lack {limits.SUBPROTOCOL}")
    if upgrade.authorization is None:
        problems.append("no Authorization header")
    elif upgrade.authorization != f"Bearer {kit.process.token}":
        problems.append("Authorization is not `Bearer <the token of {token_file}>`")
    checks.require(
        "handshake.upgrade", problems, f"{PATH}, {limits.SUBPROTOCOL}, Bearer <its token>"
    )
    hello = await read_hello(peer)
    problems = []
    if "noop" not in hello.backends:
        problems.append(f"backends {hello.backends} lack noop, which the kit's jobs use")
    if hello.runs or hello.last_seq:
        problems.append(f"a fresh start holds runs {hello.runs}, last_seq {hello.last_seq}")
    checks.require(
        "handshake.hello",
        problems,
        f"first, valid: id {hello.supervisor_id!r}, backends {hello.backends},"
        f" max_jobs {hello.max_jobs}",
    )
    version = negotiate_version(hello.versions) if _speaks_1(hello.versions) else None
    checks.require(
        "handshake.versions",
        [] if version else [f"no 1.x version in {hello.versions}"],
        f"offered {hello.versions}; the kit speaks up to 1.{limits.PROTOCOL_MINOR},"
        f" answers {version}",
    )
    link = await kit.establish(peer, hello)
    reply = await link.status(1)
    checks.require(
        "handshake.welcome",
        [f"status lists runs {reply.runs} after a fresh start"] if reply.runs else [],
        f"welcome {version} taken: status_request answered, no runs",
    )


def _speaks_1(versions: list[str]) -> bool:
    try:
        negotiate_version(versions)
    except Exception:
        return False
    return True


async def heartbeat(kit: Kit, checks: Checks) -> None:
    link = await kit.connected()
    start = time.monotonic()
    await link.idle(2.6 * HEARTBEAT_INTERVAL_S)
    end = time.monotonic()
    beats = [t for t in link.heartbeats if t >= start]
    limit = 1.5 * HEARTBEAT_INTERVAL_S + 0.25
    gaps = [b - a for a, b in zip([start, *beats], [*beats, end], strict=True)]
    checks.require(
        "heartbeat.sent",
        [f"gaps between heartbeats up to {max(gaps):.2f} s (interval {HEARTBEAT_INTERVAL_S:g} s)"]
        if max(gaps) > limit
        else [],
        f"{len(beats)} in {end - start:.1f} s (interval {HEARTBEAT_INTERVAL_S:g} s)",
    )
    await link.status(2)
    checks.add("heartbeat.tolerated", True, "the kit's heartbeats every 1 s: connection kept")


#: A device id no supervisor the kit starts declares.
NO_SUCH_DEVICE = "cf-no-such-board"


async def power(kit: Kit, checks: Checks) -> None:
    """(1.5) A `power` for a device the host does not have is answered, not ok, with why."""
    link = await kit.connected()
    if link.minor < POWER_MINOR:
        checks.add("power.answer", True, f"n/a: {link.welcome.version} has no power")
        return
    await link.peer.send(Power(request_id=91, device_id=NO_SUCH_DEVICE, action="status"))
    answer = await link.expect(
        lambda m: isinstance(m, PowerResult) and m.request_id == 91,
        5.0,
        "power_result answering power 91",
    )
    assert isinstance(answer, PowerResult)
    problems = []
    if answer.ok:
        problems.append(f"ok for a device it never declared ({NO_SUCH_DEVICE})")
    if not answer.reason:
        problems.append("no reason given")
    await link.status(92)  # and the connection carries on
    checks.require(
        "power.answer", problems, f"power_result 91: ok {answer.ok}, reason {answer.reason!r}"
    )


async def console(kit: Kit, checks: Checks) -> None:
    """(1.6) A `console_attach` for a device the host does not have is refused with a
    `console_closed` of that session saying why."""
    link = await kit.connected()
    if link.minor < CONSOLE_MINOR:
        checks.add("console.refused", True, f"n/a: {link.welcome.version} has no console")
        return
    await link.peer.send(ConsoleAttach(session=93, device_id=NO_SUCH_DEVICE))
    answer = await link.expect(
        lambda m: isinstance(m, ConsoleClosed) and m.session == 93,
        5.0,
        "console_closed of session 93",
    )
    assert isinstance(answer, ConsoleClosed)
    problems = [] if answer.reason else ["no reason given"]
    await link.status(94)  # and the connection carries on
    checks.require("console.refused", problems, f"console_closed 93: {answer.reason!r}")


#: (row, message, close code §10 gives for it); None: a second welcome.
BAD_FRAMES: tuple[tuple[str, str | None, int], ...] = (
    ("bad_frame.malformed_json", '{"type":"ack","seq":', CloseCode.INVALID_PAYLOAD),
    ("bad_frame.unknown_type", '{"type":"reboot_host","now":true}', CloseCode.INVALID_PAYLOAD),
    ("bad_frame.invalid_field", '{"type":"ack","seq":"7"}', CloseCode.INVALID_PAYLOAD),
    ("bad_frame.second_welcome", None, CloseCode.UNEXPECTED_MESSAGE),
)


async def bad_frames(kit: Kit, checks: Checks) -> None:
    for row, text, code in BAD_FRAMES:
        link = await kit.connected()
        await link.ack_all()
        await link.peer.send_text(text or codec.encode(link.welcome).decode())
        sent = time.monotonic()
        problems = []
        said = ""
        try:
            error = await link.expect(
                lambda m: isinstance(m, ProtocolErrorMessage), 3, "a protocol_error"
            )
            assert isinstance(error, ProtocolErrorMessage)
            said = f"protocol_error {error.code} {error.reason[:50]!r}"
            if error.code != code:
                problems.append(f"{said}, expected code {code}")
        except KitFailure as exc:
            problems.append(str(exc))
        closed = await kit.closed(link.peer, 3)
        if closed is None:
            problems.append("the connection stayed open")
            link.peer.abort()
        elif closed.code != code:
            problems.append(f"closed with {closed.code}, expected {code}")
        kit.link = None
        peer, hello = await kit.accept_hello(10)
        back = peer.upgrade.at - sent
        await kit.establish(peer, hello)
        checks.require(row, problems, f"{said}, close {code}, back in {back:.2f} s")


async def retry_after(kit: Kit, checks: Checks) -> None:
    link = await kit.connected()
    await link.ack_all()
    await link.peer.send(
        ProtocolErrorMessage(
            code=CloseCode.TRY_AGAIN_LATER,
            reason="the switchboard is shutting down (conformance kit)",
            retry_after_s=2.0,
        )
    )
    sent = time.monotonic()
    await link.peer.close(CloseCode.TRY_AGAIN_LATER, "shutting down")
    kit.link = None
    peer, hello = await kit.accept_hello(12)
    waited = peer.upgrade.at - sent
    checks.require(
        "shutdown.retry_after",
        [f"reconnected {waited:.2f} s after retry_after_s 2"] if waited < 1.9 else [],
        f"reconnected {waited:.2f} s after protocol_error 1013 retry_after_s 2",
    )
    await kit.establish(peer, hello)


REFUSAL_WINDOW_S = 4.0


async def refusal_backoff(kit: Kit, checks: Checks) -> None:
    link = await kit.connected()
    await link.ack_all()
    await link.peer.close(CloseCode.NORMAL, "conformance kit: reconnect")
    kit.link = None
    peer, _ = await kit.accept_hello(10)
    attempts = []
    while True:
        attempts.append(peer.upgrade.at)
        await peer.send(
            ProtocolErrorMessage(code=CloseCode.POLICY_VIOLATION, reason="refused by the kit")
        )
        await peer.close(CloseCode.POLICY_VIOLATION, "refused by the kit")
        left = attempts[0] + REFUSAL_WINDOW_S - time.monotonic()
        try:
            peer, _ = await kit.accept_hello(max(left, 0.01))
        except KitFailure:
            break
    gaps = " ".join(f"{b - a:.2f}" for a, b in itertools.pairwise(attempts))
    problems = []
    if len(attempts) < 2:
        problems.append("no reconnect after a refused hello (1008: reconnect with backoff)")
    if len(attempts) > 10:
        problems.append(f"{len(attempts)} attempts in {REFUSAL_WINDOW_S:g} s: a busy loop")
    checks.require(
        "refusal.backoff",
        problems,
        f"{len(attempts)} hellos in {REFUSAL_WINDOW_S:g} s, refused 1008; gaps {gaps} s",
    )


async def refusal_fatal(kit: Kit, checks: Checks) -> None:
    peer, _ = await kit.accept_hello()
    await peer.send(
        ProtocolErrorMessage(
            code=CloseCode.UNSUPPORTED_VERSION, reason="no common protocol version (kit)"
        )
    )
    await peer.close(CloseCode.UNSUPPORTED_VERSION, "no common protocol version")
    closed = time.monotonic()
    try:
        again, _ = await kit.accept_hello(3)
    except KitFailure:
        code = kit.process.exit_code()
        gone = "" if code is None else f"; it exited with code {code}"
        checks.add("refusal.fatal", True, f"4001: no reconnect within 3 s{gone}")
        return
    checks.add(
        "refusal.fatal",
        False,
        f"reconnected {again.upgrade.at - closed:.2f} s after 4001 (must stop, §10)",
    )


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "handshake",
        ("handshake.upgrade", "handshake.hello", "handshake.versions", "handshake.welcome"),
        handshake,
        fresh=True,
    ),
    Scenario("heartbeat", ("heartbeat.sent", "heartbeat.tolerated"), heartbeat),
    Scenario(
        "start",
        ("start.phases", "start.output", "start.exit", "start.failed", "start.unsupported_kind"),
        start,
    ),
    Scenario("duplicate", ("duplicate.held", "duplicate.ended"), duplicate),
    Scenario("stop", ("stop.canceled", "stop.unknown"), stopping),
    Scenario("timeout", ("timeout",), timeout),
    Scenario("status", ("status.held", "status.ended"), status),
    Scenario("ack", ("ack.problems",), ack_problems),
    Scenario("power", ("power.answer",), power),
    Scenario("console", ("console.refused",), console),
    Scenario("files", sup_files.ROWS, sup_files.files),
    Scenario(
        "cut",
        (
            "cut.reconnect",
            "cut.hello_last_seq",
            "cut.hello_runs",
            "cut.resend",
            "cut.resend_again",
            "cut.output",
            "reconcile.status",
            "reconcile.unwanted",
        ),
        cut,
        budget_s=30,
    ),
    Scenario("bad_frames", tuple(row for row, _, _ in BAD_FRAMES), bad_frames, budget_s=50),
    Scenario("shutdown", ("shutdown.retry_after",), retry_after),
    Scenario("refusal", ("refusal.backoff",), refusal_backoff),
    Scenario("refusal_fatal", ("refusal.fatal",), refusal_fatal, fresh=True),
)
