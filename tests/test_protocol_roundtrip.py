"""Property tests: every message survives encode -> decode unchanged, output bytes survive
exactly, and the sans-I/O sequencing pieces (EventBacklog, InboundSequence,
negotiate_version) keep their promises under arbitrary operation sequences.

Strategies are written by hand from the Meta constraints in protocol/messages.py and
protocol/spec.py (st.from_type does not honour msgspec's patterns and length limits), and
they stay inside the limits, so every generated message is one a correct peer may send.
"""

from __future__ import annotations

import string
import typing

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from protocol import codec, limits
from protocol.exceptions import CloseCode, FrameError, JobErrorKind, ProblemCode
from protocol.messages import (
    EXIT_REASONS,
    STREAMS,
    Ack,
    ConsoleAttach,
    ConsoleClosed,
    ConsoleData,
    ConsoleDetach,
    ConsoleInput,
    EventProblem,
    FromSupervisor,
    FromSwitchboard,
    Heartbeat,
    HeldRun,
    Hello,
    JobErrorReport,
    JobExit,
    JobFiles,
    JobStateChanged,
    Output,
    OutputFile,
    Power,
    PowerResult,
    ProtocolErrorMessage,
    RefusedFile,
    ServerHeartbeat,
    StartJob,
    StatusReply,
    StatusRequest,
    StopJob,
    Welcome,
)
from protocol.sequencing import EventBacklog, InboundSequence
from protocol.spec import (
    DockerBackend,
    JobSpec,
    LabelExpression,
    NoopBackend,
    Parameter,
    Selector,
    WasmBackend,
)
from protocol.state import Phase
from protocol.versions import negotiate_version, supported_versions

pytestmark = pytest.mark.slow

#: No example database: these tests must not leave a .hypothesis/ directory in the checkout.
FAST = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# --- building blocks, one per Meta-constrained type ------------------------------------

_ALNUM = string.ascii_letters + string.digits
INT64_MAX = 2**63 - 1

ids = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(_ALNUM),
    st.text(alphabet=_ALNUM + "._-", max_size=limits.ID_MAX_LEN - 1),
)
label_keys = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(_ALNUM),
    st.text(alphabet=_ALNUM + "._/-", max_size=62),
)
label_values = st.text(max_size=limits.LABEL_VALUE_MAX_LEN)
labels = st.dictionaries(label_keys, label_values, max_size=6)
resources = st.dictionaries(ids, st.integers(1, 1024), max_size=6)
seqs = st.integers(0, INT64_MAX)
#: Output streams: the three every run has, and (1.6) a device's console.
streams = st.sampled_from(STREAMS) | st.builds(limits.console_stream, ids)
event_seqs = st.integers(1, INT64_MAX)  # an event's seq starts at 1 (protocol 1.2)
attempts = st.integers(1, INT64_MAX)
names = st.text(min_size=1, max_size=limits.NAME_MAX_LEN)
texts = st.one_of(
    st.text(max_size=80),
    st.just("x" * limits.MESSAGE_MAX_LEN),
    st.just("€" * limits.MESSAGE_MAX_LEN),
)
finite = st.floats(allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=0.0, exclude_min=True, allow_infinity=False)
phases = st.sampled_from(list(Phase))
held_runs = st.builds(HeldRun, job_id=ids, attempt=attempts, phase=phases)
digests = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64).map(
    lambda h: "sha256:" + h
)
short_text = st.text(max_size=40)
arg_lists = st.lists(short_text, max_size=8)
env_maps = st.dictionaries(st.text(min_size=1, max_size=256), short_text, max_size=6)
parameters = st.builds(Parameter, value=st.text(max_size=200), secret=st.booleans())

wasm_backends = st.builds(WasmBackend, module=digests, args=arg_lists, env=env_maps)
docker_backends = st.builds(
    DockerBackend,
    image=st.text(min_size=1, max_size=512),
    command=arg_lists,
    env=env_maps,
    workdir=st.none() | short_text,
)
noop_backends = st.builds(
    NoopBackend,
    delay_s=st.floats(min_value=0, max_value=7 * 24 * 3600),
    exit_code=st.integers(0, 255),
    output=st.text(max_size=200),
)
backends = st.one_of(wasm_backends, docker_backends, noop_backends)

# --- one strategy per message type -------------------------------------------------------

SUPERVISOR_MESSAGES: dict[type, st.SearchStrategy[typing.Any]] = {
    Hello: st.builds(
        Hello,
        supervisor_id=ids,
        name=names,
        versions=st.lists(st.text(max_size=12), min_size=1, max_size=16),
        backends=st.lists(st.sampled_from(["docker", "wasm", "noop"]), max_size=3),
        labels=labels,
        resources=resources,
        max_jobs=st.integers(1, 100_000),
        runs=st.lists(held_runs, max_size=5),
        last_seq=seqs,
        software=st.text(max_size=128),
    ),
    JobStateChanged: st.builds(
        JobStateChanged,
        seq=event_seqs,
        job_id=ids,
        attempt=attempts,
        phase=phases,
        stage=st.none() | st.text(max_size=64),
        message=st.none() | texts,
        at=finite,
    ),
    JobErrorReport: st.builds(
        JobErrorReport,
        seq=event_seqs,
        job_id=ids,
        attempt=attempts,
        kind=st.sampled_from(list(JobErrorKind)),
        description=texts,
    ),
    Output: st.builds(
        Output,
        seq=event_seqs,
        job_id=ids,
        attempt=attempts,
        stream=streams,
        offset=st.integers(0, INT64_MAX),
        data=st.binary(max_size=2048),
    ),
    JobExit: st.builds(
        JobExit,
        seq=event_seqs,
        job_id=ids,
        attempt=attempts,
        exit_code=st.none() | st.integers(0, 255),
        signal=st.none() | st.integers(1, 64),
        reason=st.sampled_from(sorted(EXIT_REASONS)),
        message=st.none() | texts,
    ),
    JobFiles: st.builds(
        JobFiles,
        seq=event_seqs,
        job_id=ids,
        attempt=attempts,
        files=st.lists(
            st.builds(
                OutputFile,
                path=st.text(min_size=1, max_size=64),
                size=st.integers(0, INT64_MAX),
                digest=digests,
                media_type=st.text(max_size=32),
            ),
            max_size=4,
        ),
        refused=st.lists(
            st.builds(RefusedFile, path=st.text(min_size=1, max_size=64), reason=texts),
            max_size=4,
        ),
        refused_unlisted=st.integers(0, INT64_MAX),
    ),
    StatusReply: st.builds(
        StatusReply,
        request_id=st.integers(0, INT64_MAX),
        runs=st.lists(held_runs, max_size=5),
        running=st.integers(0, 100_000),
    ),
    PowerResult: st.builds(
        PowerResult,
        request_id=st.integers(0, INT64_MAX),
        ok=st.booleans(),
        exit_code=st.none() | st.integers(-(2**63), INT64_MAX),
        output=st.text(max_size=limits.POWER_OUTPUT_MAX_LEN),
        reason=texts,
    ),
    ConsoleData: st.builds(
        ConsoleData,
        session=seqs,
        offset=st.integers(0, INT64_MAX),
        data=st.binary(max_size=4096),
    ),
    ConsoleClosed: st.builds(ConsoleClosed, session=seqs, reason=texts),
    Heartbeat: st.builds(Heartbeat, at=finite),
    ProtocolErrorMessage: st.builds(
        ProtocolErrorMessage, code=st.sampled_from([int(c) for c in CloseCode]), reason=texts
    ),
}

SWITCHBOARD_MESSAGES: dict[type, st.SearchStrategy[typing.Any]] = {
    Welcome: st.builds(
        Welcome,
        version=st.text(max_size=12),
        session=st.integers(1, INT64_MAX),
        last_seq=seqs,
        heartbeat_interval_s=positive,
        heartbeat_timeout_s=positive,
    ),
    StartJob: st.builds(
        StartJob,
        job_id=ids,
        attempt=attempts,
        backend=backends,
        name=st.text(max_size=limits.NAME_MAX_LEN),
        parameters=st.dictionaries(
            st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True), parameters, max_size=4
        ),
        resources=resources,
        timeout_s=st.none() | st.floats(min_value=0.001, max_value=7 * 24 * 3600),
    ),
    StopJob: st.builds(
        StopJob,
        job_id=ids,
        attempt=attempts,
        reason=st.sampled_from(["canceled", "timeout", "unwanted", "shutdown"]),
        grace_s=st.floats(min_value=0, max_value=3600),
    ),
    Ack: st.builds(
        Ack,
        seq=seqs,
        problems=st.lists(
            st.builds(
                EventProblem,
                seq=event_seqs,
                code=st.sampled_from(list(ProblemCode)),
                reason=st.text(max_size=64),
            ),
            max_size=4,
        ),
    ),
    StatusRequest: st.builds(StatusRequest, request_id=st.integers(0, INT64_MAX)),
    Power: st.builds(
        Power,
        request_id=st.integers(0, INT64_MAX),
        device_id=ids,
        action=st.sampled_from(["on", "off", "cycle", "status"]),
    ),
    ConsoleAttach: st.builds(ConsoleAttach, session=seqs, device_id=ids),
    ConsoleInput: st.builds(
        ConsoleInput, session=seqs, data=st.binary(max_size=limits.MAX_CONSOLE_INPUT)
    ),
    ConsoleDetach: st.builds(ConsoleDetach, session=seqs),
    ServerHeartbeat: st.builds(ServerHeartbeat, at=finite),
    ProtocolErrorMessage: SUPERVISOR_MESSAGES[ProtocolErrorMessage],
}

label_expressions = st.one_of(
    st.builds(
        LabelExpression,
        key=label_keys,
        operator=st.sampled_from(["In", "NotIn"]),
        values=st.lists(label_values, min_size=1, max_size=4),
    ),
    st.builds(
        LabelExpression, key=label_keys, operator=st.sampled_from(["Exists", "DoesNotExist"])
    ),
)
job_specs = st.builds(
    JobSpec,
    name=names,
    backend=backends,
    labels=labels,
    selector=st.builds(
        Selector,
        match_labels=labels,
        match_expressions=st.lists(label_expressions, max_size=4),
    ),
    resources=resources,
    priority=st.integers(-1000, 1000),
    timeout_s=st.none() | st.floats(min_value=0.001, max_value=7 * 24 * 3600),
    parameters=st.dictionaries(
        st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True), parameters, max_size=4
    ),
)


def test_strategies_cover_both_unions() -> None:
    # A new message type needs a strategy here, or its round trip goes untested.
    assert set(SUPERVISOR_MESSAGES) == set(typing.get_args(FromSupervisor))
    assert set(SWITCHBOARD_MESSAGES) == set(typing.get_args(FromSwitchboard))


# --- round trips ------------------------------------------------------------------------


@FAST
@given(st.one_of(*SUPERVISOR_MESSAGES.values()))
def test_supervisor_messages_round_trip(message: typing.Any) -> None:
    frame = codec.encode(message)
    decoded = codec.decode_from_supervisor(frame)
    assert type(decoded) is type(message)
    assert decoded == message
    assert codec.encode(decoded) == frame
    assert codec.decode_from_supervisor(frame.decode()) == message


@FAST
@given(st.one_of(*SWITCHBOARD_MESSAGES.values()))
def test_switchboard_messages_round_trip(message: typing.Any) -> None:
    frame = codec.encode(message)
    decoded = codec.decode_from_switchboard(frame)
    assert type(decoded) is type(message)
    assert decoded == message
    assert codec.encode(decoded) == frame


@pytest.mark.parametrize(
    "cls", [*SUPERVISOR_MESSAGES, *SWITCHBOARD_MESSAGES], ids=lambda c: c.__name__
)
def test_each_message_type_round_trips(cls: type) -> None:
    if cls in SUPERVISOR_MESSAGES:
        strategy, decode = SUPERVISOR_MESSAGES[cls], codec.decode_from_supervisor
    else:
        strategy, decode = SWITCHBOARD_MESSAGES[cls], codec.decode_from_switchboard

    @settings(FAST, max_examples=25)
    @given(strategy)
    def check(message: typing.Any) -> None:
        assert decode(codec.encode(message)) == message

    check()


@FAST
@given(job_specs)
def test_job_specs_round_trip(spec: JobSpec) -> None:
    data = codec.encode(spec)
    assert codec.decode_job_spec(data) == spec


@FAST
@given(st.binary(max_size=4096), streams, st.integers(0, INT64_MAX))
def test_output_bytes_survive_exactly(data: bytes, stream: str, offset: int) -> None:
    message = Output(seq=1, job_id="j", attempt=1, stream=stream, offset=offset, data=data)
    frame = codec.encode(message)
    frame.decode("ascii")  # raw bytes never leak into the JSON text
    decoded = codec.decode_from_supervisor(frame)
    assert isinstance(decoded, Output)
    assert decoded.data == data
    assert decoded.offset == offset


@pytest.mark.parametrize(
    "stream",
    [
        "console:",
        "console:-x",
        "console:a/b",
        "console:" + "a" * 65,
        "stdout\n",
        "console:nrf-1\n",
        "Console:nrf-1",
        "debug",
        "",
    ],
)
def test_a_stream_name_outside_the_grammar_is_refused(stream: str) -> None:
    """`stream` is stdout, stderr, console or console:<device id>: anything else is an
    invalid message (1007) naming the field."""
    frame = (
        b'{"type":"output","seq":1,"job_id":"j","attempt":1,"stream":'
        + msgspec.json.encode(stream)
        + b',"offset":0,"data":""}'
    )
    with pytest.raises(FrameError) as refused:
        codec.decode_from_supervisor(frame)
    assert refused.value.code == CloseCode.INVALID_PAYLOAD and "$.stream" in refused.value.reason
    assert not limits.is_valid_stream(stream)


def test_stream_names_of_device_consoles() -> None:
    assert limits.console_stream("nrf-1") == "console:nrf-1"
    assert limits.console_device("console:nrf-1") == "nrf-1"
    assert limits.console_device("console") is None and limits.console_device("stdout") is None
    for stream in ("stdout", "stderr", "console", "console:nrf-1", "console:" + "a" * 64):
        assert limits.is_valid_stream(stream), stream


@settings(FAST, max_examples=5)
@given(st.binary(min_size=1, max_size=64))
def test_full_size_output_chunk_survives(pattern: bytes) -> None:
    data = (pattern * (limits.MAX_OUTPUT_CHUNK // len(pattern) + 1))[: limits.MAX_OUTPUT_CHUNK]
    frame = codec.encode(Output(seq=1, job_id="j", attempt=1, stream="stdout", offset=0, data=data))
    assert len(frame) <= limits.MAX_FRAME_BYTES
    decoded = codec.decode_from_supervisor(frame)
    assert isinstance(decoded, Output)
    assert decoded.data == data


@FAST
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_chunks_reassemble_by_offset(chunks: list[bytes]) -> None:
    # A stream cut into Output events, each continuing where the last ended, reassembles to
    # the original bytes.
    frames, offset = [], 0
    for seq, chunk in enumerate(chunks, 1):
        frames.append(
            codec.encode(
                Output(seq=seq, job_id="j", attempt=1, stream="stderr", offset=offset, data=chunk)
            )
        )
        offset += len(chunk)
    stream = bytearray()
    for frame in frames:
        event = codec.decode_from_supervisor(frame)
        assert isinstance(event, Output)
        assert event.offset == len(stream)
        stream += event.data
    assert bytes(stream) == b"".join(chunks)


# --- EventBacklog -------------------------------------------------------------------------


def _frame(seq: int, size: int) -> bytes:
    return b"%d:" % seq + b"x" * size


class BacklogMachine(RuleBasedStateMachine):
    """Random appends, acks and resumes against a plain model of what must be kept."""

    def __init__(self) -> None:
        super().__init__()
        self.backlog = EventBacklog(max_bytes=2000)
        self.model: list[tuple[int, bytes]] = []
        self.last_seq = 0
        self.acked = 0

    @rule(size=st.integers(0, 300))
    def add(self, size: int) -> None:
        seq = self.backlog.next_seq()
        assert seq == self.last_seq + 1
        self.last_seq = seq
        frame = _frame(seq, size)
        self.backlog.append(seq, frame)
        self.model.append((seq, frame))

    @rule(data=st.data())
    def acknowledge(self, data: st.DataObject) -> None:
        seq = data.draw(st.integers(0, self.last_seq + 3))
        before = len(self.model)
        self.model = [(s, f) for s, f in self.model if s > seq]
        assert self.backlog.acknowledge(seq) == before - len(self.model)
        self.acked = max(self.acked, seq)

    @rule(data=st.data())
    def resume(self, data: st.DataObject) -> None:
        # A Welcome: the switchboard stored up to `stored` (possibly more than this backlog
        # ever numbered, after a supervisor restart).
        stored = data.draw(st.integers(0, self.last_seq + 5))
        self.backlog.resume(stored)
        self.model = [(s, f) for s, f in self.model if s > stored]
        self.last_seq = max(self.last_seq, stored)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def append_out_of_order_is_refused(self, data: st.DataObject) -> None:
        last = self.model[-1][0]
        bad = data.draw(st.integers(0, last + 10).filter(lambda s: s != last + 1))
        with pytest.raises(ValueError):
            self.backlog.append(bad, b"bad")

    @invariant()
    def matches_model(self) -> None:
        assert list(self.backlog.pending()) == self.model
        assert len(self.backlog) == len(self.model)
        assert self.backlog.last_seq == self.last_seq

    @invariant()
    def size_accounting(self) -> None:
        size = sum(len(f) for _, f in self.model)
        assert self.backlog.size_bytes == size
        assert self.backlog.has_room() is (size < self.backlog.max_bytes)

    @invariant()
    def contiguous_and_above_acks(self) -> None:
        seqs = [s for s, _ in self.model]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else True
        assert all(s > 0 for s in seqs)

    @invariant()
    def pending_and_frames_after_agree(self) -> None:
        for after in {0, self.acked, self.last_seq // 2, self.last_seq}:
            expected = [(s, f) for s, f in self.model if s > after]
            assert list(self.backlog.pending(after)) == expected
            assert self.backlog.frames_after(after, 3) == expected[:3]
            assert self.backlog.frames_after(after, 10**6) == expected


TestBacklogMachine = BacklogMachine.TestCase
TestBacklogMachine.settings = settings(FAST, max_examples=40, stateful_step_count=30)


@FAST
@given(st.lists(st.integers(0, 200), max_size=30), st.integers(0, 40))
def test_acknowledge_never_drops_unacked_events(sizes: list[int], ack: int) -> None:
    backlog = EventBacklog()
    for size in sizes:
        seq = backlog.next_seq()
        backlog.append(seq, _frame(seq, size))
    dropped = backlog.acknowledge(ack)
    assert dropped == min(ack, len(sizes))
    assert [s for s, _ in backlog.pending()] == list(range(ack + 1, len(sizes) + 1))
    # Acking everything empties it and the size accounting returns to 0.
    backlog.acknowledge(backlog.last_seq)
    assert len(backlog) == 0
    assert backlog.size_bytes == 0
    assert backlog.has_room()


def test_acknowledge_is_cumulative_and_idempotent() -> None:
    backlog = EventBacklog()
    for _ in range(5):
        seq = backlog.next_seq()
        backlog.append(seq, b"e%d" % seq)
    assert backlog.acknowledge(3) == 3
    assert backlog.acknowledge(3) == 0
    assert backlog.acknowledge(1) == 0  # an old ack changes nothing
    assert [s for s, _ in backlog.pending()] == [4, 5]


def test_resume_after_reconnect_resends_the_rest_in_order() -> None:
    backlog = EventBacklog()
    for _ in range(10):
        seq = backlog.next_seq()
        backlog.append(seq, b"e%d" % seq)
    backlog.resume(7)  # Welcome.last_seq: 1..7 stored
    assert [s for s, _ in backlog.pending()] == [8, 9, 10]
    assert backlog.next_seq() == 11


def test_resume_after_a_restart_continues_after_the_switchboard() -> None:
    backlog = EventBacklog()  # a restarted supervisor: empty, last_seq 0
    backlog.resume(41)
    assert len(backlog) == 0
    assert backlog.next_seq() == 42


def test_resume_with_an_older_stored_seq_keeps_everything() -> None:
    backlog = EventBacklog()
    for _ in range(4):
        seq = backlog.next_seq()
        backlog.append(seq, b"x")
    backlog.acknowledge(2)
    backlog.resume(1)
    assert [s for s, _ in backlog.pending()] == [3, 4]
    assert backlog.next_seq() == 5


def test_has_room_is_backpressure_not_a_hard_cap() -> None:
    backlog = EventBacklog(max_bytes=10)
    backlog.append(backlog.next_seq(), b"x" * 8)
    assert backlog.has_room()
    backlog.append(backlog.next_seq(), b"x" * 8)  # may overshoot once; the caller waits after
    assert not backlog.has_room()
    backlog.acknowledge(1)
    assert backlog.has_room()
    assert backlog.size_bytes == 8


# --- exactly once, across reconnects -------------------------------------------------------


@settings(FAST, max_examples=150)
@given(
    st.lists(
        st.sampled_from(["produce", "send", "deliver", "deliver_ack", "lose_ack", "disconnect"]),
        max_size=80,
    )
)
def test_every_event_is_stored_exactly_once_in_order(steps: list[str]) -> None:
    """Supervisor backlog + switchboard dedupe over a lossy connection: acks get lost and
    connections drop with messages in flight, yet the store ends with 1..n, once each."""
    backlog = EventBacklog()
    inbound = InboundSequence(stored_seq=0)
    stored: list[int] = []
    to_switchboard: list[tuple[int, bytes]] = []
    to_supervisor: list[int] = []
    sent_upto = 0

    def reconnect() -> None:
        nonlocal sent_upto
        to_switchboard.clear()
        to_supervisor.clear()
        backlog.resume(inbound.stored_seq)  # Welcome.last_seq
        sent_upto = inbound.stored_seq

    def deliver() -> None:
        seq, frame = to_switchboard.pop(0)
        event = codec.decode_from_supervisor(frame)
        assert isinstance(event, JobStateChanged)
        assert event.seq == seq
        if inbound.is_new(seq):
            assert seq == inbound.stored_seq + 1, "a gap: an event was lost"
            stored.append(seq)
            inbound.stored(seq)
        to_supervisor.append(inbound.stored_seq)  # duplicates are acknowledged too

    for step in steps:
        if step == "produce":
            seq = backlog.next_seq()
            event = JobStateChanged(seq=seq, job_id="j", attempt=1, phase=Phase.INITIALIZING)
            backlog.append(seq, codec.encode(event))
        elif step == "send":
            for seq, frame in backlog.frames_after(sent_upto, 4):
                to_switchboard.append((seq, frame))
                sent_upto = seq
        elif step == "deliver" and to_switchboard:
            deliver()
        elif step == "deliver_ack" and to_supervisor:
            backlog.acknowledge(to_supervisor.pop(0))
        elif step == "lose_ack" and to_supervisor:
            to_supervisor.pop(0)
        elif step == "disconnect":
            reconnect()

    reconnect()
    while True:
        batch = backlog.frames_after(sent_upto, 4)
        if not batch:
            break
        for seq, frame in batch:
            to_switchboard.append((seq, frame))
            sent_upto = seq
        while to_switchboard:
            deliver()
        while to_supervisor:
            backlog.acknowledge(to_supervisor.pop(0))
    assert stored == list(range(1, backlog.last_seq + 1))
    assert len(backlog) == 0
    assert backlog.size_bytes == 0


@FAST
@given(st.integers(0, 1000), st.lists(st.integers(0, 1200), max_size=40))
def test_inbound_sequence_ignores_what_is_stored(start: int, seqs: list[int]) -> None:
    inbound = InboundSequence(start)
    high = start
    for seq in seqs:
        assert inbound.is_new(seq) is (seq > high)
        inbound.stored(seq)
        high = max(high, seq)
        assert inbound.stored_seq == high
        assert not inbound.is_new(seq)  # a resend of what was just stored


def test_inbound_sequence_never_moves_back() -> None:
    inbound = InboundSequence(10)
    inbound.stored(4)
    assert inbound.stored_seq == 10
    assert not inbound.is_new(10)
    assert inbound.is_new(11)


# --- version negotiation -------------------------------------------------------------------

current = f"{limits.PROTOCOL_MAJOR}.{limits.PROTOCOL_MINOR}"
same_major = st.integers(0, 10_000).map(lambda m: f"{limits.PROTOCOL_MAJOR}.{m}")
other_major = st.tuples(
    st.integers(0, 99).filter(lambda m: m != limits.PROTOCOL_MAJOR), st.integers(0, 99)
).map(lambda t: f"{t[0]}.{t[1]}")
junk = st.text(alphabet="0123456789.v ²³١٠-+x", max_size=8)


def test_supported_versions() -> None:
    versions = supported_versions()
    assert versions[0] == current
    minors = range(limits.PROTOCOL_MINOR, -1, -1)
    assert versions == [f"{limits.PROTOCOL_MAJOR}.{m}" for m in minors]
    assert negotiate_version(versions) == current
    assert limits.SUBPROTOCOL == f"switchboard.v{limits.PROTOCOL_MAJOR}"


@FAST
@given(st.lists(st.one_of(same_major, other_major, junk), max_size=10))
def test_negotiation_picks_the_highest_common_version_or_refuses(offered: list[str]) -> None:
    valid_minors = [
        int(v.split(".")[1])
        for v in offered
        if v.count(".") == 1
        and all(part.isascii() and part.isdecimal() for part in v.split("."))
        and int(v.split(".")[0]) == limits.PROTOCOL_MAJOR
    ]
    if valid_minors:
        expected = f"{limits.PROTOCOL_MAJOR}.{min(max(valid_minors), limits.PROTOCOL_MINOR)}"
        assert negotiate_version(offered) == expected
        assert negotiate_version(list(reversed(offered))) == expected
    else:
        with pytest.raises(FrameError) as info:
            negotiate_version(offered)
        assert info.value.code is CloseCode.UNSUPPORTED_VERSION


@FAST
@given(st.lists(same_major, min_size=1, max_size=5), st.lists(st.one_of(other_major, junk)))
def test_extra_entries_never_lower_the_result(offered: list[str], extra: list[str]) -> None:
    assert negotiate_version(offered + extra) == negotiate_version(offered)
    assert negotiate_version(offered) in supported_versions()


def test_a_newer_minor_is_served_our_highest() -> None:
    newer = f"{limits.PROTOCOL_MAJOR}.{limits.PROTOCOL_MINOR + 5}"
    assert negotiate_version([newer]) == current
