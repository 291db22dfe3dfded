"""Everything a peer can send wrong becomes a FrameError with a close code and a reason that
names the problem; nothing else escapes the codec. Job specs fail with errors naming the field.
"""

from __future__ import annotations

import base64
import json

import msgspec
import pytest

from protocol import codec, limits
from protocol.exceptions import CloseCode, FrameError
from protocol.messages import Output
from protocol.versions import negotiate_version

pytestmark = pytest.mark.unit


def _state(**fields: object) -> bytes:
    base: dict[str, object] = {
        "type": "state",
        "seq": 1,
        "job_id": "j",
        "attempt": 1,
        "phase": "running",
    }
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not _DROP}).encode()


def _output(raw: bytes, **fields: object) -> bytes:
    base: dict[str, object] = {
        "type": "output",
        "seq": 1,
        "job_id": "j",
        "attempt": 1,
        "stream": "stdout",
        "offset": 0,
        "data": base64.b64encode(raw).decode(),
    }
    base.update(fields)
    return json.dumps(base).encode()


_DROP = object()


def _refused(frame: bytes | str, *, from_switchboard: bool = False) -> FrameError:
    decode = codec.decode_from_switchboard if from_switchboard else codec.decode_from_supervisor
    with pytest.raises(FrameError) as info:
        decode(frame)
    error = info.value
    assert isinstance(error.code, CloseCode)
    assert len(error.close_reason().encode()) <= 123
    return error


# --- malformed frames ------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"{",
        b"not json",
        b'{"type":"heartbeat"} trailing',
        b'{"type":"heartbeat",}',
        b"{'type':'heartbeat'}",
        b'{"type":"heartbeat","at":NaN}',
        b"\x00",
    ],
)
def test_malformed_json(frame: bytes) -> None:
    error = _refused(frame)
    assert error.code is CloseCode.INVALID_PAYLOAD
    assert error.reason.startswith("malformed JSON")


@pytest.mark.parametrize("frame", [b"[]", b"1", b'"hello"', b"null", b"true"])
def test_json_that_is_not_an_object(frame: bytes) -> None:
    assert _refused(frame).code is CloseCode.INVALID_PAYLOAD


def test_missing_type_tag() -> None:
    error = _refused(b'{"seq":1}')
    assert "missing required field `type`" in error.reason


@pytest.mark.parametrize("tag", ["nope", "HELLO", "", "ack", "welcome", "start_job"])
def test_unknown_or_wrong_direction_type_tag(tag: str) -> None:
    error = _refused(json.dumps({"type": tag}).encode())
    assert error.code is CloseCode.INVALID_PAYLOAD
    assert "`$.type`" in error.reason


def test_type_tag_must_be_a_string() -> None:
    assert "`$.type`" in _refused(b'{"type":1}').reason


def test_switchboard_message_is_not_a_supervisor_message() -> None:
    for frame in (
        b'{"type":"ack","seq":1}',
        b'{"type":"welcome","version":"1.0","session":1,"last_seq":0}',
        b'{"type":"stop_job","job_id":"j","attempt":1}',
        b'{"type":"status_request","request_id":1}',
    ):
        assert "Invalid value" in _refused(frame).reason
        codec.decode_from_switchboard(frame)  # fine the other way round


def test_supervisor_message_is_not_a_switchboard_message() -> None:
    for frame in (
        b'{"type":"hello","supervisor_id":"h","name":"h","versions":["1.0"]}',
        _state(),
        b'{"type":"status","request_id":1}',
    ):
        assert "`$.type`" in _refused(frame, from_switchboard=True).reason
        codec.decode_from_supervisor(frame)


@pytest.mark.parametrize("field", ["seq", "job_id", "attempt", "phase"])
def test_missing_required_field(field: str) -> None:
    error = _refused(_state(**{field: _DROP}))
    assert f"missing required field `{field}`" in error.reason


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("seq", "1", "Expected `int`, got `str` - at `$.seq`"),
        ("seq", 1.5, "Expected `int`, got `float` - at `$.seq`"),
        ("seq", 1.0, "Expected `int`, got `float` - at `$.seq`"),
        ("seq", None, "Expected `int`, got `null` - at `$.seq`"),
        ("seq", -1, "Expected `int` >= 1 - at `$.seq`"),
        ("seq", 0, "Expected `int` >= 1 - at `$.seq`"),
        ("attempt", 0, "Expected `int` >= 1 - at `$.attempt`"),
        ("attempt", True, "Expected `int`, got `bool` - at `$.attempt`"),
        ("phase", "paused", "Invalid enum value 'paused' - at `$.phase`"),
        ("stage", 5, "Expected `str | null`, got `int` - at `$.stage`"),
        ("at", "now", "Expected `float`, got `str` - at `$.at`"),
        ("job_id", ["j"], "Expected `str`, got `array` - at `$.job_id`"),
    ],
)
def test_wrong_field_type_names_the_json_path(field: str, value: object, expected: str) -> None:
    error = _refused(_state(**{field: value}))
    assert error.code is CloseCode.INVALID_PAYLOAD
    assert expected in error.reason


def test_nested_path_is_named() -> None:
    frame = (
        b'{"type":"hello","supervisor_id":"h","name":"h","versions":["1.0"],'
        b'"runs":[{"job_id":"a","attempt":1,"phase":"running"},{"job_id":"b","attempt":"2",'
        b'"phase":"running"}]}'
    )
    assert "at `$.runs[1].attempt`" in _refused(frame).reason


def test_wrong_stream_name() -> None:
    assert "`$.stream`" in _refused(_output(b"x", stream="stdin")).reason


def test_text_fields_are_bounded() -> None:
    long = "x" * (limits.MESSAGE_MAX_LEN + 1)
    assert "`$.message`" in _refused(_state(message=long)).reason
    codec.decode_from_supervisor(_state(message="é" * limits.MESSAGE_MAX_LEN))


def test_stop_job_fields() -> None:
    frame = b'{"type":"stop_job","job_id":"j","attempt":1,"reason":"bored"}'
    error = _refused(frame, from_switchboard=True)
    assert "`$.reason`" in error.reason
    error = _refused(
        b'{"type":"stop_job","job_id":"j","attempt":1,"grace_s":3601}', from_switchboard=True
    )
    assert "`$.grace_s`" in error.reason


def test_welcome_heartbeat_settings_must_be_positive() -> None:
    frame = b'{"type":"welcome","version":"1.0","session":1,"last_seq":0,"heartbeat_interval_s":0}'
    assert "`$.heartbeat_interval_s`" in _refused(frame, from_switchboard=True).reason
    frame = b'{"type":"welcome","version":"1.0","session":0,"last_seq":0}'
    assert "`$.session`" in _refused(frame, from_switchboard=True).reason


def test_hello_needs_a_version() -> None:
    frame = b'{"type":"hello","supervisor_id":"h","name":"h","versions":[]}'
    assert "`$.versions`" in _refused(frame).reason
    frame = b'{"type":"hello","supervisor_id":"h","name":"","versions":["1.0"]}'
    assert "`$.name`" in _refused(frame).reason


# --- size limits -----------------------------------------------------------------------


def _padded_heartbeat(size: int) -> bytes:
    head, tail = b'{"type":"heartbeat","pad":"', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def test_frame_at_the_limit_is_accepted() -> None:
    frame = _padded_heartbeat(limits.MAX_FRAME_BYTES)
    assert len(frame) == limits.MAX_FRAME_BYTES
    codec.decode_from_supervisor(frame)
    codec.decode_from_supervisor(frame.decode())


@pytest.mark.parametrize("as_text", [False, True])
def test_oversized_frame(as_text: bool) -> None:
    frame = _padded_heartbeat(limits.MAX_FRAME_BYTES + 1)
    error = _refused(frame.decode() if as_text else frame)
    assert error.code is CloseCode.MESSAGE_TOO_BIG
    assert str(limits.MAX_FRAME_BYTES) in error.reason
    error = _refused(frame, from_switchboard=True)
    assert error.code is CloseCode.MESSAGE_TOO_BIG


def test_oversized_frame_is_refused_before_parsing() -> None:
    # Garbage that large is "too big", not "malformed": the size check comes first.
    error = _refused(b"\xff" * (limits.MAX_FRAME_BYTES + 1))
    assert error.code is CloseCode.MESSAGE_TOO_BIG


def test_text_frame_size_counts_utf8_bytes() -> None:
    # The limit is in bytes: a text frame of fewer characters but more UTF-8 bytes than
    # MAX_FRAME_BYTES is too big (here ~1.5 MiB of UTF-8 in ~0.5 M characters).
    head, tail = '{"type":"heartbeat","pad":"', '"}'
    text = head + "€" * (limits.MAX_FRAME_BYTES // 2) + tail
    assert len(text) <= limits.MAX_FRAME_BYTES < len(text.encode())
    assert _refused(text).code is CloseCode.MESSAGE_TOO_BIG


def test_output_chunk_at_the_limit_is_accepted() -> None:
    data = bytes(range(256)) * (limits.MAX_OUTPUT_CHUNK // 256)
    assert len(data) == limits.MAX_OUTPUT_CHUNK
    frame = _output(data)
    assert len(frame) < limits.MAX_FRAME_BYTES
    decoded = codec.decode_from_supervisor(frame)
    assert isinstance(decoded, Output)
    assert decoded.data == data


def test_output_chunk_over_the_limit_is_refused() -> None:
    frame = _output(b"\x00" * (limits.MAX_OUTPUT_CHUNK + 1))
    assert len(frame) < limits.MAX_FRAME_BYTES  # refused for the chunk size, not the frame
    error = _refused(frame)
    assert error.code is CloseCode.INVALID_PAYLOAD
    assert "`$.data`" in error.reason


@pytest.mark.parametrize("data", ["AA", "AA=", "_-8=", "AA==\n", "A A=", "!!!!", "AAAAA"])
def test_output_data_must_be_standard_padded_base64(data: str) -> None:
    error = _refused(_output(b"", data=data))
    assert "Invalid base64" in error.reason
    assert "`$.data`" in error.reason


def test_negative_offset_is_refused() -> None:
    assert "`$.offset`" in _refused(_output(b"x", offset=-1)).reason


def test_integers_must_fit_64_bits() -> None:
    # A seq or exit code beyond int64 can't be stored (SQLite INTEGER is 64-bit); it must be
    # refused at the edge with a clear error rather than fail later in the store.
    assert "`$.seq`" in _refused(_state(seq=2**63)).reason
    exit_frame = b'{"type":"exit","seq":1,"job_id":"j","attempt":1,"exit_code":%d}' % 2**64
    assert "`$.exit_code`" in _refused(exit_frame).reason
    codec.decode_from_supervisor(_state(seq=2**63 - 1))


# --- encoding problems -----------------------------------------------------------------


def test_invalid_utf8_in_a_field() -> None:
    error = _refused(b'{"type":"state","seq":1,"job_id":"j","attempt":1,"phase":"runn\xffing"}')
    assert error.code is CloseCode.INVALID_PAYLOAD
    assert "UTF-8" in error.reason


def test_invalid_utf8_anywhere_is_refused() -> None:
    # A frame that is not UTF-8 is not JSON, even where the bad bytes sit in a field the
    # receiver would skip (an unknown one) or a value it ignores.
    for frame in (
        b'{"type":"heartbeat","at":1.0,"future":"\xff\xfe"}',
        b'{"type":"heartbeat","\xc3":1}',
        b'{"type":"heartbeat","x":"\xed\xa0\x80"}',  # an encoded surrogate
    ):
        assert _refused(frame).code is CloseCode.INVALID_PAYLOAD


def test_lone_surrogate_in_a_text_frame() -> None:
    assert _refused('{"type":"heartbeat","x":"\ud800"}').code is CloseCode.INVALID_PAYLOAD


def test_deeply_nested_json_is_a_frame_error() -> None:
    # Small enough for the frame limit, deep enough to exhaust the parser's recursion guard.
    depth = 20_000
    frame = b'{"type":"heartbeat","x":' + b"[" * depth + b"]" * depth + b"}"
    assert len(frame) < limits.MAX_FRAME_BYTES
    assert _refused(frame).code is CloseCode.INVALID_PAYLOAD


# --- identifiers -----------------------------------------------------------------------

GOOD_IDS = ["a", "0", "build-1842", "A.b_c-d", "x" * 64, "9" + "-" * 63]
BAD_IDS = [
    "",
    "-lead",
    ".hidden",
    "_x",
    "has space",
    "slash/no",
    "x" * 65,
    "ünï",
    "tab\t",
    "new\nline",
    "trailing\n",
    "\nleading",
    "nul\x00",
]


@pytest.mark.parametrize("value", GOOD_IDS)
def test_valid_ids(value: str) -> None:
    assert limits.is_valid_id(value)
    codec.decode_from_supervisor(_state(job_id=value))


@pytest.mark.parametrize("value", BAD_IDS, ids=[repr(v) for v in BAD_IDS])
def test_invalid_ids_are_refused(value: str) -> None:
    assert not limits.is_valid_id(value)
    assert "`$.job_id`" in _refused(_state(job_id=value)).reason
    hello = {"type": "hello", "supervisor_id": value, "name": "n", "versions": ["1.0"]}
    assert "`$.supervisor_id`" in _refused(json.dumps(hello).encode()).reason
    stop = {"type": "stop_job", "job_id": value, "attempt": 1}
    assert "`$.job_id`" in _refused(json.dumps(stop).encode(), from_switchboard=True).reason


def test_invalid_label_keys_and_resource_names_are_refused() -> None:
    hello = {"type": "hello", "supervisor_id": "h", "name": "n", "versions": ["1.0"]}
    for key in ("", "-x", "a b", "x" * 64, "ü", "trailing\n"):
        error = _refused(json.dumps({**hello, "labels": {key: "v"}}).encode())
        assert "`$.labels" in error.reason, key
    for key in ("", "-x", "a b", "x" * 65, "a/b", "trailing\n"):
        error = _refused(json.dumps({**hello, "resources": {key: 1}}).encode())
        assert "`$.resources" in error.reason, key
    good = {**hello, "labels": {"lab.example/board": "", "a": "v" * 128}, "resources": {"gpu": 1}}
    codec.decode_from_supervisor(json.dumps(good).encode())
    too_long = {**hello, "labels": {"a": "v" * 129}}
    assert "`$.labels" in _refused(json.dumps(too_long).encode()).reason
    zero = {**hello, "resources": {"gpu": 0}}
    assert "`$.resources" in _refused(json.dumps(zero).encode()).reason


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("sha256:" + "0" * 64, True),
        ("sha256:" + "ab" * 32, True),
        ("sha256:" + "AB" * 32, False),
        ("sha256:" + "0" * 63, False),
        ("sha256:" + "0" * 65, False),
        ("sha512:" + "0" * 64, False),
        ("sha256:" + "0" * 64 + "\n", False),
        ("0" * 64, False),
    ],
)
def test_digest_grammar(value: str, valid: bool) -> None:
    assert limits.is_valid_digest(value) is valid


# --- FrameError itself ------------------------------------------------------------------


def test_close_reason_fits_a_close_frame() -> None:
    short = FrameError(CloseCode.INVALID_PAYLOAD, "bad")
    assert short.close_reason() == "bad"
    assert str(short) == "bad (close code 1007)"
    exact = FrameError(CloseCode.INVALID_PAYLOAD, "x" * 123)
    assert exact.close_reason() == "x" * 123
    for reason in ("x" * 124, "é" * 200, "€" * 100, "a" + "😀" * 60, "ab" + "€" * 41):
        cut = FrameError(CloseCode.POLICY_VIOLATION, reason).close_reason()
        assert len(cut.encode()) <= 123
        assert cut.endswith("...")
        assert reason.startswith(cut[:-3])


def test_close_reason_of_a_real_error_fits() -> None:
    error = _refused(_state(phase="p" * 1000))  # msgspec quotes the bad value
    assert len(error.reason.encode()) > 123
    assert len(error.close_reason().encode()) <= 123


def test_frame_error_is_a_protocol_error() -> None:
    from protocol.exceptions import SwitchboardProtocolError

    assert issubclass(FrameError, SwitchboardProtocolError)


# --- version negotiation with hostile input ---------------------------------------------


@pytest.mark.parametrize(
    "offered",
    [[], ["2.0"], ["0.9"], ["1"], ["v1.0"], ["1.0.0"], ["1.-1"], [" 1.0"], ["1.x"], ["."]],
)
def test_no_common_version(offered: list[str]) -> None:
    with pytest.raises(FrameError) as info:
        negotiate_version(offered)
    assert info.value.code is CloseCode.UNSUPPORTED_VERSION


@pytest.mark.parametrize(
    "offered",
    [["1.²"], ["²."], ["1.⁰"], ["1." + "9" * 5000], ["9" * 5000 + ".0"], ["١.٠"], ["1.٣"]],
    ids=[
        "superscript-minor",
        "superscript-major",
        "superscript-zero",
        "huge-minor",
        "huge-major",
        "arabic-indic",
        "arabic-indic-minor",
    ],
)
def test_non_ascii_or_huge_version_numbers_are_no_version(offered: list[str]) -> None:
    # Only ASCII decimal digits count; anything else is ignored like any other junk entry,
    # never a crash (int() refuses "²" and numbers over 4300 digits).
    with pytest.raises(FrameError) as info:
        negotiate_version(offered)
    assert info.value.code is CloseCode.UNSUPPORTED_VERSION
    assert negotiate_version([*offered, "1.0"]) == "1.0"


# --- job specs ---------------------------------------------------------------------------


def _spec(**fields: object) -> bytes:
    spec: dict[str, object] = {"name": "job", "backend": {"kind": "noop"}}
    spec.update(fields)
    return json.dumps(spec).encode()


def _spec_error(data: bytes) -> str:
    with pytest.raises(msgspec.ValidationError) as info:
        codec.decode_job_spec(data)
    return str(info.value)


def test_unknown_spec_field_is_named() -> None:
    assert "unknown field `timeout`" in _spec_error(_spec(timeout=5))
    message = _spec_error(_spec(backend={"kind": "docker", "image": "x", "comand": ["ls"]}))
    assert "unknown field `comand`" in message
    assert "`$.backend`" in message
    message = _spec_error(_spec(selector={"match_label": {"a": "b"}}))
    assert "unknown field `match_label`" in message
    message = _spec_error(_spec(parameters={"A": {"value": "v", "hidden": True}}))
    assert "unknown field `hidden`" in message


def test_unknown_backend_kind() -> None:
    assert "`$.backend.kind`" in _spec_error(_spec(backend={"kind": "lxc"}))
    assert "`kind`" in _spec_error(_spec(backend={"image": "x"}))


@pytest.mark.parametrize(
    "module",
    ["sha256:abc", "sha256:" + "G" * 64, "md5:" + "0" * 64, "sha256:" + "A" * 64, ""],
)
def test_bad_digest(module: str) -> None:
    message = _spec_error(_spec(backend={"kind": "wasm", "module": module}))
    assert "`$.backend.module`" in message


def test_good_digest() -> None:
    spec = codec.decode_job_spec(_spec(backend={"kind": "wasm", "module": "sha256:" + "f" * 64}))
    assert spec.backend.module == "sha256:" + "f" * 64  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("expression", "problem"),
    [
        ({"key": "a", "operator": "In"}, "operator In needs at least one value"),
        ({"key": "a", "operator": "NotIn", "values": []}, "NotIn needs at least one value"),
        ({"key": "a", "operator": "Exists", "values": ["x"]}, "operator Exists takes no values"),
        (
            {"key": "a", "operator": "DoesNotExist", "values": ["x"]},
            "operator DoesNotExist takes no values",
        ),
        ({"key": "a", "operator": "Gt", "values": ["1"]}, "Invalid enum value 'Gt'"),
        ({"key": "a", "operator": "in", "values": ["1"]}, "Invalid enum value 'in'"),
        ({"key": "-a", "operator": "Exists"}, "`$.selector.match_expressions[0].key`"),
        ({"operator": "Exists"}, "missing required field `key`"),
    ],
)
def test_selector_rules(expression: dict[str, object], problem: str) -> None:
    message = _spec_error(_spec(selector={"match_expressions": [expression]}))
    assert problem in message
    assert "$.selector.match_expressions[0]" in message


@pytest.mark.parametrize(
    "expression",
    [
        {"key": "a", "operator": "In", "values": ["x", "y"]},
        {"key": "a", "operator": "NotIn", "values": [""]},
        {"key": "lab.example/board", "operator": "Exists"},
        {"key": "a", "operator": "DoesNotExist", "values": []},
    ],
)
def test_valid_selector_expressions(expression: dict[str, object]) -> None:
    codec.decode_job_spec(_spec(selector={"match_expressions": [expression]}))


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"name": ""}, "$.name"),
        ({"name": "x" * 129}, "$.name"),
        ({"priority": 1001}, "$.priority"),
        ({"timeout_s": 0}, "$.timeout_s"),
        ({"timeout_s": -1}, "$.timeout_s"),
        ({"resources": {"gpu": 0}}, "$.resources"),
        ({"parameters": {"1BAD": {"value": "v"}}}, "$.parameters"),
        ({"labels": {"a b": "c"}}, "$.labels"),
        ({"backend": {"kind": "noop", "exit_code": 256}}, "$.backend.exit_code"),
        ({"backend": {"kind": "docker", "image": ""}}, "$.backend.image"),
    ],
)
def test_spec_limits_name_the_field(fields: dict[str, object], path: str) -> None:
    assert f"`{path}" in _spec_error(_spec(**fields))


def test_malformed_spec_json() -> None:
    with pytest.raises(msgspec.DecodeError):
        codec.decode_job_spec(b"{name: job}")
