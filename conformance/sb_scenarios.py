"""The switchboard scenarios: each drives one or more fresh scripted supervisors through a
part of docs/protocol.md and records its rows. Section numbers are the document's."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec

from conformance.sb_client import Refused, SupervisorSocket, raw_json
from conformance.sb_kit import Broken, Kit, Rows, describe, goodbye, goodbye_seen
from conformance.sb_rest import TERMINAL
from protocol.messages import (
    Ack,
    Heartbeat,
    HeldRun,
    JobStateChanged,
    Output,
    ServerHeartbeat,
    StartJob,
    StopJob,
    SupervisorMessage,
    Welcome,
)
from protocol.state import Phase
from protocol.tokens import new_token
from protocol.versions import ACK_PROBLEMS_MINOR, minor_of, supported_versions


@dataclass(frozen=True)
class Scenario:
    name: str
    rows: tuple[str, ...]
    run: Callable[[Kit, Rows], Awaitable[None]]
    #: Run only when asked for by name (it takes long).
    opt_in: bool = False


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


async def handshake(kit: Kit, rows: Rows) -> None:
    """§4: welcome after hello, version negotiation, enrolment, refusals."""
    sup = kit.supervisor("handshake")
    ours = supported_versions()
    socket, first, offered = await kit.say_hello(sup)
    welcome = first.message if first else None
    if not isinstance(welcome, Welcome) or first is None:
        raise Broken(f"hello answered with {describe(first)}")
    raw = raw_json(first)
    bad = [
        what
        for what, fine in [
            (f"version {raw.get('version')!r}, not {ours[0]!r}", raw.get("version") == ours[0]),
            (f"session {raw.get('session')!r}, not an integer ≥ 1", _count(raw.get("session"))),
            (f"last_seq {raw.get('last_seq')!r}, not 0 for a new id", raw.get("last_seq") == 0),
        ]
        + [
            (f"{key} {raw[key]!r} not a number > 0", _number(raw[key]) and raw[key] > 0)
            for key in ("heartbeat_interval_s", "heartbeat_timeout_s")
            if key in raw
        ]
        if not fine
    ]
    rows.check(
        "handshake.welcome",
        not bad,
        "; ".join(bad)
        or f"version {welcome.version}, session {welcome.session}, last_seq 0, heartbeat"
        f" {welcome.heartbeat_interval_s:g}/{welcome.heartbeat_timeout_s:g} s",
    )
    await socket.close()
    if not welcome.enrolled or offered is None:
        rows.check(
            "handshake.enrolment",
            False,
            "welcome to a registration token's new id did not say enrolled",
        )
        raise Broken("not enrolled")
    sup.credential = offered
    again, welcome2 = await kit.connect(sup)
    rows.check(
        "handshake.enrolment",
        not welcome2.enrolled,
        "enrolled, then connected with the credential it made"
        if not welcome2.enrolled
        else "a connection with the enrolled credential said enrolled again",
    )
    rows.check(
        "handshake.session",
        welcome2.session > welcome.session,
        f"session {welcome.session} then {welcome2.session}",
    )
    await again.close()

    seen = []
    offers: list[tuple[list[str], Callable[[str], bool]]] = [
        (["1.0"], lambda v: v == "1.0"),
        (["1.9", "2.0", "one"], _at_least(ours[0])),
    ]
    for offer, wanted in offers:
        socket, welcome3 = await kit.connect(sup, versions=offer)
        seen.append((offer, welcome3.version, wanted(welcome3.version)))
        await socket.close()
    rows.check(
        "handshake.version_choice",
        all(fine for *_, fine in seen),
        "; ".join(f"offered {offer}: {version}" for offer, version, _ in seen),
    )

    socket, first, _ = await kit.say_hello(sup, versions=["2.0", "0.9"])
    rows.check("handshake.unsupported_version", *await goodbye(socket, 4001, kit.timeout))

    try:
        await kit.open(new_token())
        rows.check("handshake.wrong_token", False, "a made-up token was let in")
    except Refused as refused:
        try:
            body = msgspec.json.decode(refused.body)
        except msgspec.DecodeError:
            body = {}
        fine = (
            refused.status == 401
            and isinstance(body, dict)
            and body.get("error") == "unauthorized"
            and bool(body.get("message"))
        )
        rows.check("handshake.wrong_token", fine, f"HTTP {refused.status} {refused.body[:160]!r}")

    assert sup.credential is not None
    socket = await kit.open(sup.credential)
    await socket.send(Heartbeat(at=time.time()))
    rows.check("handshake.hello_first", *await goodbye(socket, 4000, kit.timeout))

    socket, _ = await kit.connect(sup)
    await socket.send(kit.hello(sup))
    rows.check("handshake.second_hello", *await goodbye(socket, 4002, kit.timeout))


def _at_least(version: str) -> Callable[[str], bool]:
    """A 1.N offer reads as "up to 1.N" (§4 step 3): the answer is the highest the
    switchboard speaks, at least the one it chose for the kit's own offer."""
    floor = int(version.split(".")[1])
    return lambda v: v.startswith("1.") and v[2:].isdigit() and floor <= int(v[2:]) <= 9


async def dispatch(kit: Kit, rows: Rows) -> None:
    """§5.2 start_job, §6.1 acks, §6.2 output: a run reported start to end."""
    sup = kit.supervisor("dispatch")
    socket, _ = await kit.connect(sup)
    backend = {"delay_s": 0.5, "exit_code": 3, "output": "from the spec\n"}
    job_id = await kit.submit(sup, **backend)
    start = await kit.start_of(socket, job_id)
    got = {
        "attempt": start.attempt,
        "kind": getattr(start.backend, "kind", None),
        "delay_s": getattr(start.backend, "delay_s", None),
        "exit_code": getattr(start.backend, "exit_code", None),
        "output": getattr(start.backend, "output", None),
        "name": start.name,
        "timeout_s": start.timeout_s,
    }
    wanted = {"attempt": 1, "kind": "noop", **backend}
    wanted |= {"name": f"conformance {sup.id}", "timeout_s": 600.0}
    rows.check(
        "dispatch.start_job",
        got == wanted,
        f"job {job_id} attempt 1, noop backend and name as submitted"
        if got == wanted
        else f"got {got}, submitted {wanted}",
    )
    stdout = [b"hello, conformance\n", b"\xff\xfe not UTF-8\n"]
    events: list[SupervisorMessage] = [
        sup.state(job_id, Phase.INITIALIZING, stage="accepted"),
        sup.state(job_id, Phase.RUNNING),
        sup.output(job_id, 0, stdout[0]),
        sup.output(job_id, len(stdout[0]), stdout[1]),
        sup.output(job_id, 0, b"warning\n", stream="stderr"),
        sup.exit(job_id, 3),
        sup.state(job_id, Phase.FAILED),
    ]
    await socket.send_many(events)
    acked = await socket.wait_ack(sup.last_seq, kit.timeout)
    named = list(socket.problems)
    rows.check(
        "dispatch.acks",
        acked and not named,
        f"{len(events)} events acked up to {socket.acked}"
        + (f"; problems named: {named}" if named else ""),
    )
    job = await kit.api.wait_job(job_id, TERMINAL, kit.timeout)
    out, err = await kit.api.output(job_id), await kit.api.output(job_id, "stderr")
    fine = (
        job["phase"] == "failed"
        and job.get("exit_code") == 3
        and out == b"".join(stdout)
        and err == b"warning\n"
    )
    rows.check(
        "dispatch.rest",
        fine,
        f"phase {job['phase']}, exit code {job.get('exit_code')}, stdout {out!r}, stderr {err!r}",
    )


async def duplicates(kit: Kit, rows: Rows) -> None:
    """§6.1: an event resent with a seq already stored is acknowledged and ignored."""
    sup = kit.supervisor("duplicates")
    socket, _ = await kit.connect(sup)
    job_id = await kit.submit(sup)
    await kit.start_of(socket, job_id)
    events: list[SupervisorMessage] = [
        sup.state(job_id, Phase.RUNNING),
        sup.output(job_id, 0, b"once\n"),
        sup.output(job_id, 5, b"only once\n"),
    ]
    await socket.send_many(events)
    if not await socket.wait_ack(sup.last_seq, kit.timeout):
        raise Broken(f"events up to {sup.last_seq} not acked")
    mark = len(socket.received)
    await socket.send_many(events)
    again = await socket.expect(
        lambda m: isinstance(m, Ack) and m.seq >= sup.last_seq, kit.timeout, after=mark
    )
    named = list(socket.problems)
    rows.check(
        "duplicates.acked",
        again is not None and not named,
        f"resent seqs {events[0].seq}-{sup.last_seq} (already acked): "  # type: ignore[attr-defined]
        + (f"acked again ({again.seq})" if again else "no ack")
        + (f"; problems named: {named}" if named else ""),
    )
    await socket.send_many([sup.exit(job_id, 0), sup.state(job_id, Phase.SUCCEEDED)])
    await socket.wait_ack(sup.last_seq, kit.timeout)
    job = await kit.api.wait_job(job_id, TERMINAL, kit.timeout)
    out = await kit.api.output(job_id)
    rows.check(
        "duplicates.output_once",
        out == b"once\nonly once\n" and job["phase"] == "succeeded",
        f"phase {job['phase']}, stdout {out!r}",
    )


async def problems(kit: Kit, rows: Rows) -> None:
    """§6.5: the events not taken as sent are named in the ack that covers them."""
    sup = kit.supervisor("problems")
    socket, welcome = await kit.connect(sup)
    if minor_of(welcome.version) < ACK_PROBLEMS_MINOR:
        raise Broken(f"version {welcome.version} negotiated: ack.problems needs 1.2")
    job_id = await kit.submit(sup)
    await kit.start_of(socket, job_id)

    async def sent(event: SupervisorMessage) -> tuple[list[str], str]:
        seq = event.seq  # type: ignore[attr-defined]
        await socket.send(event)
        if not await socket.wait_ack(seq, kit.timeout):
            return [], f"seq {seq} not acked within {kit.timeout:g} s"
        codes = socket.problems_of(seq)
        return codes, f"seq {seq}: " + (", ".join(codes) or "no problem named")

    codes, seen = await sent(sup.state(job_id, Phase.RUNNING))
    if codes or "not acked" in seen:
        raise Broken(f"a plain running state: {seen}")
    sup.last_seq += 1  # skip one number
    codes, seen = await sent(sup.output(job_id, 0, b"kept\n"))
    rows.check("problems.seq_gap", codes == ["seq_gap"], seen)
    codes, seen = await sent(sup.state(job_id, Phase.QUEUED))
    rows.check("problems.phase_not_reportable", codes == ["phase_not_reportable"], seen)
    codes, seen = await sent(sup.state(job_id, Phase.RUNNING))
    rows.check("problems.invalid_transition", codes == ["invalid_transition"], seen)
    codes, seen = await sent(sup.output(job_id, 1000, b"past the end\n"))
    rows.check("problems.output_gap", codes == ["output_gap"], seen)

    stranger = f"{sup.id}-nosuchjob"
    mark = len(socket.received)
    codes, seen = await sent(sup.state(stranger, Phase.RUNNING))
    stop = await _stop_of(kit, socket, stranger, mark)
    rows.check(
        "problems.unknown_run",
        codes == ["unknown_run"] and stop is not None and stop.reason == "unwanted",
        f"{seen}; " + (f"stop_job reason {stop.reason}" if stop else "no stop_job"),
    )

    await socket.send_many([sup.exit(job_id, 0), sup.state(job_id, Phase.SUCCEEDED)])
    socket.held.clear()
    mark = len(socket.received)
    codes, seen = await sent(sup.output(job_id, 5, b"too late\n"))
    stop = await _stop_of(kit, socket, job_id, mark)
    rows.check(
        "problems.run_ended",
        codes == ["run_ended"] and stop is not None and stop.reason == "unwanted",
        f"{seen}; " + (f"stop_job reason {stop.reason}" if stop else "no stop_job"),
    )
    job = await kit.api.wait_job(job_id, TERMINAL, kit.timeout)
    out = await kit.api.output(job_id)
    rows.check(
        "problems.stored",
        job["phase"] == "succeeded" and out == b"kept\n",
        f"phase {job['phase']} (the queued and second running dropped), stdout {out!r}"
        " (the gap and late output dropped)",
    )


async def _stop_of(kit: Kit, socket: SupervisorSocket, job_id: str, after: int) -> StopJob | None:
    stop: StopJob | None = await socket.expect(
        lambda m: isinstance(m, StopJob) and m.job_id == job_id, kit.timeout, after=after
    )
    return stop


async def stop(kit: Kit, rows: Rows) -> None:
    """§5.2 stop_job: a job canceled over the API is stopped on its supervisor."""
    sup = kit.supervisor("stop")
    socket, _ = await kit.connect(sup)
    job_id = await kit.submit(sup, delay_s=600)
    await kit.start_of(socket, job_id)
    await socket.send_many(
        [sup.state(job_id, Phase.INITIALIZING, stage="accepted"), sup.state(job_id, Phase.RUNNING)]
    )
    socket.held[(job_id, 1)] = HeldRun(job_id, 1, Phase.RUNNING)
    if not await socket.wait_ack(sup.last_seq, kit.timeout):
        raise Broken("the run's states were not acked")
    await kit.api.cancel(job_id)
    got = await _stop_of(kit, socket, job_id, 0)
    fine = (
        got is not None
        and got.attempt == 1
        and got.reason == "canceled"
        and (got.grace_s is None or 0 <= got.grace_s <= 3600)
    )
    rows.check(
        "stop.stop_job",
        fine,
        f"stop_job reason {got.reason}, grace_s {got.grace_s}" if got else "no stop_job",
    )
    await socket.send_many(
        [
            sup.state(job_id, Phase.TERMINATING),
            sup.exit(job_id, None, signal=15, reason="canceled"),
            sup.state(job_id, Phase.CANCELED),
        ]
    )
    socket.held.clear()
    acked = await socket.wait_ack(sup.last_seq, kit.timeout)
    job = await kit.api.wait_job(job_id, TERMINAL, kit.timeout)
    rows.check(
        "stop.canceled",
        acked and job["phase"] == "canceled" and not socket.problems,
        f"phase {job['phase']}, acked {acked}, problems {socket.problems or 'none'}",
    )


async def cut(kit: Kit, rows: Rows) -> None:
    """§6.1: events sent before a cut and not acked are resent after welcome.last_seq."""
    sup = kit.supervisor("cut")
    socket, _ = await kit.connect(sup)
    job_id = await kit.submit(sup, delay_s=600)
    await kit.start_of(socket, job_id)
    lines = [f"line {n}\n".encode() for n in range(20)]
    offsets = [sum(len(x) for x in lines[:n]) for n in range(len(lines))]
    before = sup.last_seq
    events: list[Output | JobStateChanged] = [sup.state(job_id, Phase.RUNNING)]
    events += [sup.output(job_id, at, line) for at, line in zip(offsets, lines, strict=True)]
    # The tail never reaches the wire: the cut took it (what a real cut may or may not do
    # to the rest, sent just before).
    sent = events[:12]
    await socket.send_many(list(sent))
    await socket.cut()

    held = [HeldRun(job_id, 1, Phase.RUNNING)]
    # A status_request may come right after welcome (§6.6): it is answered after the resend.
    socket, welcome = await kit.connect(sup, runs=held, hold_status=True)
    rows.check(
        "cut.welcome_last_seq",
        before <= welcome.last_seq <= sent[-1].seq,
        f"events {before + 1}-{sup.last_seq} unacked, {before + 1}-{sent[-1].seq} of them sent,"
        f" then a cut: welcome.last_seq {welcome.last_seq}",
    )
    await socket.send_many([e for e in events if e.seq > welcome.last_seq])
    await socket.release_status()
    await socket.send_many([sup.exit(job_id, 0), sup.state(job_id, Phase.SUCCEEDED)])
    socket.held.clear()
    acked = await socket.wait_ack(sup.last_seq, kit.timeout)
    job = await kit.api.wait_job(job_id, TERMINAL, kit.timeout)
    out = await kit.api.output(job_id)
    fine = acked and job["phase"] == "succeeded" and out == b"".join(lines)
    rows.check(
        "cut.no_loss_no_duplicates",
        fine,
        f"resent {sum(e.seq > welcome.last_seq for e in events)} events; phase {job['phase']},"
        f" stdout {len(out)} bytes" + ("" if out == b"".join(lines) else f": {out[:200]!r}"),
    )


async def reconcile(kit: Kit, rows: Rows) -> None:
    """§4 step 5: the runs of a reconnecting hello against the switchboard's own."""
    sup = kit.supervisor("reconcile")
    socket, _ = await kit.connect(sup)
    started, assigned = await kit.submit(sup, delay_s=600), await kit.submit(sup, delay_s=600)
    await kit.start_of(socket, started)
    await kit.start_of(socket, assigned)
    await socket.send(sup.state(started, Phase.RUNNING))
    if not await socket.wait_ack(sup.last_seq, kit.timeout):
        raise Broken("the running state was not acked")
    await socket.close()

    stranger = HeldRun(f"{sup.id}-nosuchjob", 1, Phase.RUNNING)
    socket, _ = await kit.connect(sup, runs=[stranger])
    run = await kit.api.wait_run(started, 1, {"lost"}, kit.timeout)
    rows.check(
        "reconcile.lost",
        run is not None and run.get("phase") == "lost",
        f"a running run left out of hello.runs: {run.get('phase') if run else 'no run'}",
    )
    start = await socket.expect(
        lambda m: isinstance(m, StartJob) and m.job_id == assigned,
        kit.timeout,
    )
    rows.check(
        "reconcile.resend_start_job",
        start is not None and start.attempt == 1,
        "an assigned run left out of hello.runs: "
        + (f"start_job attempt {start.attempt} again" if start else "no start_job again"),
    )
    stop = await _stop_of(kit, socket, stranger.job_id, 0)
    rows.check(
        "reconcile.unknown_held_run",
        stop is not None and stop.reason == "unwanted",
        "a run in hello.runs the switchboard never assigned: "
        + (f"stop_job reason {stop.reason}" if stop else "no stop_job"),
    )
    await socket.send_many(
        [
            sup.state(assigned, Phase.RUNNING),
            sup.exit(assigned, 0),
            sup.state(assigned, Phase.SUCCEEDED),
        ]
    )
    await socket.wait_ack(sup.last_seq, kit.timeout)


async def heartbeats(kit: Kit, rows: Rows) -> None:
    """§8: both sides heartbeat; silence past heartbeat_timeout_s closes with 4004."""
    sup = kit.supervisor("heartbeats")
    socket, welcome = await kit.connect(sup, keep_alive=False)
    interval = welcome.heartbeat_interval_s
    await socket.send(Heartbeat(at=time.time()))
    began, within = time.monotonic(), interval * 2 + 1
    beat = await socket.expect(lambda m: isinstance(m, ServerHeartbeat), within)
    rows.check(
        "heartbeat.sent",
        beat is not None,
        f"a heartbeat after {time.monotonic() - began:.1f} s (interval {interval:g} s)"
        if beat
        else f"no heartbeat within {within:g} s (interval {interval:g} s)",
    )
    for _ in range(3):
        await socket.send(Heartbeat(at=time.time()))
    mark = len(socket.received)
    beat = await socket.expect(
        lambda m: isinstance(m, ServerHeartbeat), interval * 2 + 1, after=mark
    )
    rows.check(
        "heartbeat.tolerated",
        beat is not None and not socket.closed,
        "after 4 heartbeats from the kit, still open and heartbeating"
        if beat
        else f"after 4 heartbeats from the kit: {goodbye_seen(socket)}",
    )
    await socket.close()


async def heartbeat_timeout(kit: Kit, rows: Rows) -> None:
    """§8: a supervisor silent for heartbeat_timeout_s is closed with 4004 (opt-in: it
    takes that long, 20 s by default)."""
    sup = kit.supervisor("silent")
    socket, welcome = await kit.connect(sup, keep_alive=False)
    began, limit = time.monotonic(), welcome.heartbeat_timeout_s
    fine, seen = await goodbye(socket, 4004, limit + welcome.heartbeat_interval_s + kit.timeout)
    waited = (socket.closed_at or time.monotonic()) - began
    rows.check(
        "heartbeat.timeout",
        fine and waited >= limit * 0.9,
        f"silent: {seen} after {waited:.1f} s (heartbeat_timeout_s {limit:g})",
    )


async def bad_frames(kit: Kit, rows: Rows) -> None:
    """§2, §10: a frame that is not a valid message closes the connection with its code."""
    sup = kit.supervisor("bad-frames")
    frames: list[tuple[str, str | bytes, int]] = [
        ("bad_frames.malformed_json", '{"type": "heartbeat", "at": ', 1007),
        ("bad_frames.unknown_type", '{"type": "frobnicate"}', 1007),
        ("bad_frames.binary", b'{"type":"heartbeat","at":0.0}', 1003),
    ]
    for row, frame, code in frames:
        socket, _ = await kit.connect(sup)
        await socket.send_raw(frame)
        rows.check(row, *await goodbye(socket, code, kit.timeout))


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "handshake",
        (
            "handshake.welcome",
            "handshake.enrolment",
            "handshake.session",
            "handshake.version_choice",
            "handshake.unsupported_version",
            "handshake.wrong_token",
            "handshake.hello_first",
            "handshake.second_hello",
        ),
        handshake,
    ),
    Scenario("dispatch", ("dispatch.start_job", "dispatch.acks", "dispatch.rest"), dispatch),
    Scenario("duplicates", ("duplicates.acked", "duplicates.output_once"), duplicates),
    Scenario(
        "problems",
        (
            "problems.seq_gap",
            "problems.phase_not_reportable",
            "problems.invalid_transition",
            "problems.output_gap",
            "problems.unknown_run",
            "problems.run_ended",
            "problems.stored",
        ),
        problems,
    ),
    Scenario("stop", ("stop.stop_job", "stop.canceled"), stop),
    Scenario("cut", ("cut.welcome_last_seq", "cut.no_loss_no_duplicates"), cut),
    Scenario(
        "reconcile",
        ("reconcile.lost", "reconcile.resend_start_job", "reconcile.unknown_held_run"),
        reconcile,
    ),
    Scenario("heartbeats", ("heartbeat.sent", "heartbeat.tolerated"), heartbeats),
    Scenario("heartbeat_timeout", ("heartbeat.timeout",), heartbeat_timeout, opt_in=True),
    Scenario(
        "bad_frames",
        ("bad_frames.malformed_json", "bad_frames.unknown_type", "bad_frames.binary"),
        bad_frames,
    ),
)
