"""The scenarios the kit drives a supervisor through, each filling in its rows of the
table (docs/conformance.md lists them and what each proves). Jobs use the `noop` backend.

A scenario takes the established connection (`kit.connected()`), or, when `fresh`, a
process the runner has just started. It raises KitFailure when it cannot go on; the rows
it had not filled in then fail.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from protocol import codec, limits
from protocol.exceptions import CloseCode, ProblemCode
from protocol.messages import (
    EventProblem,
    HeldRun,
    Hello,
    JobErrorReport,
    JobExit,
    Output,
    ProtocolErrorMessage,
    StartJob,
    StopJob,
    StopReason,
)
from protocol.spec import DockerBackend, NoopBackend, WasmBackend
from protocol.versions import negotiate_version

from . import sup_rules as rules
from .sup_kit import Checks, Kit
from .sup_link import HEARTBEAT_INTERVAL_S, KitFailure, Link, of_run, read_hello
from .sup_server import PATH, Peer

#: Longest a short noop run may take from start_job to its terminal state.
RUN_TIMEOUT_S = 5.0
#: The grace the kit's stop_job gives.
GRACE_S = 1.0


@dataclass(frozen=True)
class Scenario:
    name: str
    rows: tuple[str, ...]
    run: Callable[[Kit, Checks], Awaitable[None]]
    #: Needs a process of its own, started just before.
    fresh: bool = False
    budget_s: float = 20.0


def noop(
    job_id: str,
    *,
    delay_s: float = 0.0,
    exit_code: int = 0,
    output: str = "",
    timeout_s: float | None = None,
) -> StartJob:
    return StartJob(
        job_id=job_id,
        attempt=1,
        backend=NoopBackend(delay_s=delay_s, exit_code=exit_code, output=output),
        name=f"conformance {job_id}",
        timeout_s=timeout_s,
    )


def stop(job_id: str, reason: StopReason = "canceled") -> StopJob:
    return StopJob(job_id=job_id, attempt=1, reason=reason, grace_s=GRACE_S)


def held(runs: Sequence[HeldRun]) -> dict[tuple[str, int], str]:
    """A hello's or status's runs: (job_id, attempt) -> phase."""
    return {(r.job_id, r.attempt): r.phase.value for r in runs}


def exits(events: Sequence[object]) -> list[JobExit]:
    return [e for e in events if isinstance(e, JobExit)]


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


async def start(kit: Kit, checks: Checks) -> None:
    link = await kit.connected()
    text = "line one\nline two \u2713\n"
    await link.peer.send(noop("cf-start", delay_s=0.3, output=text))
    events = await link.until_end("cf-start", RUN_TIMEOUT_S)
    problems = rules.phase_problems(events)
    if "running" not in rules.phases(events):
        problems.append("no running")
    if rules.terminal(events) != "succeeded":
        problems.append(f"ended {rules.terminal(events)}, not succeeded (exit code 0)")
    checks.require("start.phases", problems, rules.describe(events))
    data, problems = rules.stream(events, "stdout")
    if data != text.encode():
        problems.append(f"stdout {data!r}, expected {text.encode()!r}")
    chunks = sum(isinstance(e, Output) for e in events)
    checks.require("start.output", problems, f"{chunks} chunk(s), {len(data)} bytes, contiguous")
    problems = rules.order_problems(events)
    ends = exits(events)
    if [(e.exit_code, e.reason) for e in ends] != [(0, "exited")]:
        problems.append(f"exit events {ends}, expected one with exit_code 0")
    checks.require("start.exit", problems, "exit(0), then the terminal state, last")

    await link.peer.send(noop("cf-fail", exit_code=3))
    events = await link.until_end("cf-fail", RUN_TIMEOUT_S)
    problems = rules.phase_problems(events) + rules.order_problems(events)
    if rules.terminal(events) != "failed":
        problems.append(f"ended {rules.terminal(events)}, not failed")
    if [e.exit_code for e in exits(events)] != [3]:
        problems.append("no exit with exit_code 3")
    checks.require("start.failed", problems, rules.describe(events))

    kinds = [kind for kind in ("docker", "wasm") if kind not in link.hello.backends]
    if not kinds:
        checks.add("start.unsupported_kind", True, "n/a: it runs every kind")
        return
    backend = (
        DockerBackend(image="alpine:3.20")
        if kinds[0] == "docker"
        else WasmBackend(module="sha256:" + "0" * 64)
    )
    await link.peer.send(StartJob(job_id="cf-kind", attempt=1, backend=backend))
    events = await link.until_end("cf-kind", RUN_TIMEOUT_S)
    story = rules.describe(events)
    checks.require(
        "start.unsupported_kind",
        [] if story == "error(image_not_compatible) rejected" else [f"got {story}"],
        f"{kinds[0]}: {story}",
    )


async def duplicate(kit: Kit, checks: Checks) -> None:
    link = await kit.connected()
    job = noop("cf-dup", delay_s=1.0)
    await link.peer.send(job)
    events = await link.until_phase("cf-dup", "running", RUN_TIMEOUT_S)
    await link.peer.send(job)
    events += await link.until_end("cf-dup", RUN_TIMEOUT_S)
    await link.idle(0.3)
    extra = link.take(of_run("cf-dup"))
    problems = rules.phase_problems(events) + rules.order_problems(events)
    if rules.phases(events).count("running") != 1 or len(exits(events)) != 1:
        problems.append("ran more than once")
    if any(isinstance(e, JobErrorReport) for e in events):
        problems.append("answered with an error")
    if extra:
        problems.append(f"events after its end: {rules.describe(extra)}")
    checks.require(
        "duplicate.held", problems, f"repeat while held ignored: {rules.describe(events)}"
    )

    await link.peer.send(job)
    events = await link.until_end("cf-dup", RUN_TIMEOUT_S)
    story = rules.describe(events)
    checks.require(
        "duplicate.ended",
        [] if story == "error(job_already_exists) rejected" else [f"got {story}"],
        f"repeat after the end: {story}",
    )


async def stopping(kit: Kit, checks: Checks) -> None:
    link = await kit.connected()
    await link.peer.send(noop("cf-stop", delay_s=30))
    events = await link.until_phase("cf-stop", "running", RUN_TIMEOUT_S)
    sent = time.monotonic()
    await link.peer.send(stop("cf-stop"))
    events += await link.until_end("cf-stop", GRACE_S + 3)
    took = time.monotonic() - sent
    problems = rules.phase_problems(events) + rules.order_problems(events)
    if "terminating" not in rules.phases(events):
        problems.append("no terminating")
    if rules.terminal(events) != "canceled":
        problems.append(f"ended {rules.terminal(events)}, not canceled")
    if not exits(events):
        problems.append("no exit")
    checks.require("stop.canceled", problems, f"{rules.describe(events)} in {took:.2f} s")

    await link.peer.send(stop("cf-never"))
    await link.idle(0.5)
    stray = link.take(of_run("cf-never"))
    await link.status(3)
    checks.require(
        "stop.unknown",
        [f"answered {rules.describe(stray)}"] if stray else [],
        "stop_job for a run it never had: ignored",
    )


async def timeout(kit: Kit, checks: Checks) -> None:
    link = await kit.connected()
    await link.peer.send(noop("cf-timeout", delay_s=30, timeout_s=1.0))
    events = await link.until_phase("cf-timeout", "running", RUN_TIMEOUT_S)
    running = time.monotonic()
    events += await link.until_end("cf-timeout", RUN_TIMEOUT_S)
    took = time.monotonic() - running
    problems = rules.phase_problems(events) + rules.order_problems(events)
    if rules.terminal(events) != "timed_out":
        problems.append(f"ended {rules.terminal(events)}, not timed_out")
    if [e.reason for e in exits(events)] != ["timeout"]:
        problems.append("no exit with reason timeout")
    if took < 0.8:
        problems.append(f"ended {took:.2f} s after running, before its timeout_s 1")
    checks.require("timeout", problems, f"{rules.describe(events)} after {took:.2f} s")


async def status(kit: Kit, checks: Checks) -> None:
    link = await kit.connected()
    await link.peer.send(noop("cf-held", delay_s=30))
    await link.until_phase("cf-held", "running", RUN_TIMEOUT_S)
    reply = await link.status(41)
    runs = held(reply.runs)
    checks.require(
        "status.held",
        [] if runs.get(("cf-held", 1)) == "running" else [f"status lists {runs}"],
        f"lists cf-held#1 running (running: {reply.running})",
    )
    await link.peer.send(stop("cf-held"))
    await link.until_end("cf-held", GRACE_S + 3)
    runs = held((await link.status(42)).runs)
    checks.require(
        "status.ended",
        [f"still lists {runs}"] if ("cf-held", 1) in runs else [],
        "an ended run is no longer listed",
    )


async def ack_problems(kit: Kit, checks: Checks) -> None:
    link = await kit.connected()
    if link.minor < 2:
        checks.add("ack.problems", True, f"n/a: {link.welcome.version} has no ack.problems")
        return
    link.auto_ack = False
    await link.peer.send(noop("cf-problem", output="some output\n"))
    events = await link.until_end("cf-problem", RUN_TIMEOUT_S)
    named = next((e for e in events if isinstance(e, Output)), events[0])
    problem = EventProblem(
        seq=named.seq, code=ProblemCode.OUTPUT_CAPPED, reason="named by the conformance kit"
    )
    await link.ack_all([problem])
    link.auto_ack = True
    await link.peer.send(noop("cf-after-problem"))
    events = await link.until_end("cf-after-problem", RUN_TIMEOUT_S)
    checks.require(
        "ack.problems",
        [] if rules.terminal(events) == "succeeded" else [f"next run: {rules.describe(events)}"],
        f"ack naming seq {named.seq} output_capped: next run {rules.describe(events)}",
    )


async def cut(kit: Kit, checks: Checks) -> None:
    link = await kit.connected()
    await link.ack_all()
    link.auto_ack = False
    ledger = kit.ledger
    acked = ledger.stored
    text = "before the cut\n"
    await link.peer.send(noop("cf-cut", delay_s=30, output=text))
    await link.until_phase("cf-cut", "running", RUN_TIMEOUT_S)
    await link.expect(
        lambda m: isinstance(m, Output) and m.job_id == "cf-cut", 3, "output of cf-cut#1"
    )
    await link.idle(0.3)
    last = ledger.highest
    if last - acked < 2:
        raise KitFailure(f"only {last - acked} event(s) unacknowledged: the check needs 2")
    link.peer.abort()
    kit.link = None
    cut_at = time.monotonic()
    peer, hello = await kit.accept_hello(10)
    checks.add("cut.reconnect", True, f"back {peer.upgrade.at - cut_at:.2f} s after the cut")
    checks.require(
        "cut.hello_last_seq",
        [] if hello.last_seq == last else [f"hello.last_seq {hello.last_seq}, sent up to {last}"],
        f"hello.last_seq {last}",
    )
    runs = held(hello.runs)
    checks.require(
        "cut.hello_runs",
        [] if runs.get(("cf-cut", 1)) == "running" else [f"hello.runs {runs}"],
        "hello.runs lists cf-cut#1 running",
    )
    # The kit says it stored one event more than it acknowledged: the one after is the
    # first to come again.
    want = list(range(acked + 2, last + 1))
    link, problems = await _resent(kit, peer, hello, acked + 1, want)
    checks.require("cut.resend", problems, f"seqs {want[0]}..{want[-1]} resent as they were")
    # Still not acknowledged: after another cut they must come again (§6.1: kept until an
    # ack covers them).
    link.peer.abort()
    kit.link = None
    peer, hello = await kit.accept_hello(10)
    link, problems = await _resent(kit, peer, hello, acked + 1, want)
    checks.require("cut.resend_again", problems, "after a second cut, resent again unchanged")
    link.take(of_run("cf-cut"))
    mine = [ledger.events[s] for s in sorted(ledger.events) if of_run("cf-cut")(ledger.events[s])]
    data, problems = rules.stream(mine, "stdout")
    if data != text.encode():
        problems.append(f"stdout of cf-cut#1 {data!r}, expected {text.encode()!r}")
    checks.require("cut.output", problems, f"{len(data)} bytes, each once")

    runs = held((await link.status(43)).runs)
    checks.require(
        "reconcile.status",
        [] if runs.get(("cf-cut", 1)) == "running" else [f"status lists {runs}"],
        "status after the reconnect lists cf-cut#1 running",
    )
    await link.peer.send(stop("cf-cut", "unwanted"))
    events = await link.until_end("cf-cut", GRACE_S + 3)
    link.auto_ack = True
    await link.ack_all()
    runs = held((await link.status(44)).runs)
    problems = rules.phase_problems(events) + rules.order_problems(events)
    if rules.terminal(events) != "canceled":
        problems.append(f"ended {rules.terminal(events)}, not canceled")
    if ("cf-cut", 1) in runs:
        problems.append(f"status still lists {runs}")
    checks.require("reconcile.unwanted", problems, f"stop_job unwanted: {rules.describe(events)}")


async def _resent(
    kit: Kit, peer: Peer, hello: Hello, stored: int, want: list[int]
) -> tuple[Link, list[str]]:
    """Welcome with `stored` as last_seq, acknowledge nothing, and see whether the events
    `want`ed come first, in order, unchanged."""
    link = await kit.establish(peer, hello, last_seq=stored)
    link.auto_ack = False
    deadline = time.monotonic() + 5
    while len(link.events) < len(want) and time.monotonic() < deadline:
        await link.idle(0.1)
    got = link.events[: len(want)]
    problems = (
        []
        if [e.seq for e in got] == want
        else [f"resent seqs {[e.seq for e in got]}, expected {want}"]
    )
    problems += [f"seq {e.seq} came back changed" for e in got if kit.ledger.events.get(e.seq) != e]
    return link, problems


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
