"""Receivers are lenient with names, strict with values; the job spec people type is strict.

Within major version 1 a receiver skips fields it does not know (docs/protocol.md §2), so a
newer switchboard's added field, even inside a `start_job`'s backend, does not break an
older supervisor. A known field of the wrong type or out of range is still refused. The
REST API's job spec decoder (`decode_job_spec`) refuses unknown fields, naming them.
"""

from __future__ import annotations

import json

import msgspec
import pytest

from protocol import codec
from protocol.exceptions import FrameError
from protocol.messages import FromSupervisor, LenientFromSwitchboard, StartJob
from protocol.spec import DockerBackend, JobSpec, NoopBackend, Parameter, WasmBackend

pytestmark = pytest.mark.unit

DIGEST = "sha256:" + "ab" * 32


def _frame(obj: dict) -> bytes:
    return json.dumps(obj).encode()


def _start_job(backend: dict, **extra: object) -> dict:
    return {"type": "start_job", "job_id": "j", "attempt": 1, "backend": backend, **extra}


# --- a supervisor skips what it does not know ------------------------------------------


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        ({"kind": "noop", "delay_s": 1, "future": [1, {"x": None}]}, NoopBackend(delay_s=1.0)),
        (
            {"kind": "wasm", "module": DIGEST, "fuel": 10, "gpu_fraction": 0.5},
            WasmBackend(module=DIGEST, fuel=10),
        ),
        (
            {"kind": "docker", "image": "alpine", "memory_mb": 64, "seccomp": "x"},
            DockerBackend(image="alpine", memory_mb=64),
        ),
    ],
)
def test_start_job_with_unknown_fields_decodes_on_the_supervisor_side(
    backend: dict, expected: msgspec.Struct
) -> None:
    frame = _start_job(
        backend,
        name="n",
        parameters={"A": {"value": "v", "secret": True, "rotates_at": 5}},
        priority_hint=3,
        nested={"deep": [1, 2]},
    )
    decoded = codec.decode_from_switchboard(_frame(frame))
    assert decoded == StartJob(
        job_id="j",
        attempt=1,
        backend=expected,
        name="n",
        parameters={"A": Parameter("v", secret=True)},
    )
    # Plain types come out, not the decoder's lenient twins: they compare, encode and
    # match like any other StartJob.
    assert type(decoded) is StartJob
    assert type(decoded.backend) is type(expected)
    assert type(decoded.parameters["A"]) is Parameter
    assert codec.decode_from_switchboard(codec.encode(decoded)) == decoded


@pytest.mark.parametrize(
    ("frame", "path"),
    [
        (_start_job({"kind": "noop", "delay_s": "soon", "future": 1}), "$.backend.delay_s"),
        (_start_job({"kind": "noop", "exit_code": 256}), "$.backend.exit_code"),
        (_start_job({"kind": "wasm", "module": "sha256:xyz"}), "$.backend.module"),
        (_start_job({"kind": "docker", "memory_mb": 64}), "$.backend"),  # no image at all
        (_start_job({"kind": "fpga", "bitstream": "x"}), "$.backend"),
        (_start_job({"kind": "noop"}, parameters={"A": {"secret": True}}), "$.parameters"),
        (_start_job({"kind": "noop"}, name="x" * 129), "$.name"),
        (_start_job({"kind": "noop"}, attempt=0), "$.attempt"),
        ({"type": "ack", "seq": -1, "future": True}, "$.seq"),
        ({"type": "stop_job", "job_id": "j", "attempt": 1, "reason": "bored"}, "$.reason"),
    ],
)
def test_lenient_decode_still_refuses_wrong_values(frame: dict, path: str) -> None:
    with pytest.raises(FrameError) as caught:
        codec.decode_from_switchboard(_frame(frame))
    assert caught.value.code == 1007
    assert path in caught.value.reason


def test_switchboard_skips_unknown_fields_of_supervisor_messages() -> None:
    hello = codec.decode_from_supervisor(
        _frame(
            {
                "type": "hello",
                "supervisor_id": "h",
                "name": "h",
                "versions": ["1.3"],
                "gpu_model": "x",
                "runs": [{"job_id": "a", "attempt": 1, "phase": "running", "pid": 4}],
            }
        )
    )
    assert hello.runs[0].job_id == "a"  # type: ignore[union-attr]


def _structs(tp: object) -> list[msgspec.inspect.StructType]:
    """Every Struct type reachable from `tp`."""
    found: dict[type, msgspec.inspect.StructType] = {}

    def walk(info: msgspec.inspect.Type) -> None:
        if isinstance(info, msgspec.inspect.StructType):
            if info.cls in found:
                return
            found[info.cls] = info
            for field in info.fields:
                walk(field.type)
        elif isinstance(info, msgspec.inspect.UnionType):
            for inner in info.types:
                walk(inner)
        elif isinstance(info, msgspec.inspect.Metadata):
            walk(info.type)
        elif isinstance(info, msgspec.inspect.ListType):
            walk(info.item_type)
        elif isinstance(info, msgspec.inspect.DictType):
            walk(info.key_type)
            walk(info.value_type)

    walk(msgspec.inspect.type_info(tp))
    return list(found.values())


def test_every_object_a_receiver_decodes_is_lenient() -> None:
    # A strict Struct added to a message (say a new nested spec object) would break the
    # rule; this names it.
    for union in (FromSupervisor, LenientFromSwitchboard):
        strict = [s.cls.__name__ for s in _structs(union) if s.forbid_unknown_fields]
        assert not strict, f"{strict} refuse unknown fields on the wire (docs/protocol.md §2)"


def test_every_object_of_a_typed_job_spec_is_strict() -> None:
    lenient = [s.cls.__name__ for s in _structs(JobSpec) if not s.forbid_unknown_fields]
    assert not lenient, f"{lenient} would silently drop a mistyped job spec field"


# --- the job spec people type stays strict ---------------------------------------------


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"name": "x", "backend": {"kind": "noop"}, "tmeout_s": 5}, "tmeout_s"),
        ({"name": "x", "backend": {"kind": "noop", "dealy_s": 1}}, "dealy_s"),
        ({"name": "x", "backend": {"kind": "docker", "image": "a", "mem_mb": 1}}, "mem_mb"),
        (
            {"name": "x", "backend": {"kind": "noop"}, "parameters": {"A": {"value": "v", "s": 1}}},
            "`s`",
        ),
    ],
)
def test_a_typed_job_spec_refuses_unknown_fields(spec: dict, field: str) -> None:
    with pytest.raises(msgspec.ValidationError, match="unknown field") as caught:
        codec.decode_job_spec(json.dumps(spec))
    assert field in str(caught.value)
