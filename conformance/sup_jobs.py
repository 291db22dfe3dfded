"""The scenarios about runs (docs/conformance.md): noop jobs started, repeated, stopped,
timed out, listed in `status`, acknowledged with problems, and carried across a cut
connection. Each fills in its rows; KitFailure when it cannot go on."""

from __future__ import annotations

import time
from collections.abc import Sequence

from protocol.exceptions import ProblemCode
from protocol.messages import (
    EventProblem,
    HeldRun,
    Hello,
    JobErrorReport,
    JobExit,
    Output,
    StartJob,
    StopJob,
    StopReason,
)
from protocol.spec import DockerBackend, NoopBackend, WasmBackend

from . import sup_rules as rules
from .sup_kit import Checks, Kit
from .sup_link import KitFailure, Link, of_run
from .sup_server import Peer

#: Longest a short noop run may take from start_job to its terminal state.
RUN_TIMEOUT_S = 5.0
#: The grace the kit's stop_job gives.
GRACE_S = 1.0


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
