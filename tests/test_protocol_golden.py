"""Golden wire shapes: the exact JSON bytes of every message type and of a job spec per backend.

docs/protocol.md quotes these bytes, and supervisors in other languages are written against
them, so a change here is a protocol change: it needs a version bump (or a new optional field
with a default), not a quick fix of the golden. Every type in the FromSupervisor and
FromSwitchboard unions, and every backend kind, must have at least one golden (checked by
introspecting the unions, so a new message can't slip in without one).
"""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import msgspec
import pytest

from protocol import codec
from protocol.exceptions import JobErrorKind
from protocol.messages import (
    Ack,
    CollectLimits,
    CollectRule,
    ConsoleAttach,
    ConsoleClosed,
    ConsoleData,
    ConsoleDetach,
    ConsoleInput,
    DeviceInfo,
    FromSupervisor,
    FromSwitchboard,
    Heartbeat,
    HeldRun,
    Hello,
    InputFile,
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
from protocol.spec import (
    BackendSpec,
    DockerBackend,
    JobSpec,
    LabelExpression,
    NoopBackend,
    Parameter,
    Selector,
    WasmBackend,
)
from protocol.state import Phase

pytestmark = pytest.mark.unit

DIGEST = "sha256:" + "ab" * 32

SUPERVISOR_GOLDENS: list[tuple[msgspec.Struct, bytes]] = [
    (
        Hello(
            supervisor_id="host-07",
            name="Host 07 (bench B)",
            versions=["1.0"],
            backends=["docker", "wasm"],
            labels={"arch": "x86_64", "lab.example/board": "rpi4"},
            resources={"gpu": 1},
            max_jobs=4,
            runs=[HeldRun("build-1842", 1, Phase.RUNNING)],
            last_seq=41,
            software="acme-supervisor/2.3",
        ),
        (
            b'{"type":"hello","supervisor_id":"host-07","name":"Host 07 (bench B)","versions":["1.0'
            b'"],"backends":["docker","wasm"],"labels":{"arch":"x86_64","lab.example/board":"rpi4"}'
            b',"resources":{"gpu":1},"max_jobs":4,"runs":[{"job_id":"build-1842","attempt":1,"phase'
            b'":"running"}],"last_seq":41,"software":"acme-supervisor/2.3"}'
        ),
    ),
    (
        Hello(supervisor_id="host-07", name="host-07", versions=["1.0"]),
        b'{"type":"hello","supervisor_id":"host-07","name":"host-07","versions":["1.0"]}',
    ),
    (
        # 1.1: enrolling with a registration token, offering the digest of its credential.
        Hello(
            supervisor_id="host-07",
            name="host-07",
            versions=["1.1", "1.0"],
            credential_sha256="9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        ),
        (
            b'{"type":"hello","supervisor_id":"host-07","name":"host-07","versions":["1.1","1.0"]'
            b',"credential_sha256":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00'
            b'a08"}'
        ),
    ),
    (
        # 1.4: the host's devices, its inventory (docs/lab.md).
        Hello(
            supervisor_id="lab-host-3",
            name="lab-host-3",
            versions=["1.4", "1.3", "1.2", "1.1", "1.0"],
            backends=["docker"],
            resources={"nrf52840dk": 2},
            devices=[
                DeviceInfo(
                    id="nrf-1",
                    class_="nrf52840dk",
                    labels={"serial": "000683012345"},
                    console=True,
                    power=True,
                ),
                DeviceInfo(id="nrf-2", class_="nrf52840dk"),
            ],
        ),
        (
            b'{"type":"hello","supervisor_id":"lab-host-3","name":"lab-host-3","versions":["1.4","1'
            b'.3","1.2","1.1","1.0"],"backends":["docker"],"resources":{"nrf52840dk":2},"devices":['
            b'{"id":"nrf-1","class":"nrf52840dk","labels":{"serial":"000683012345"},"console":true,'
            b'"power":true},{"id":"nrf-2","class":"nrf52840dk"}]}'
        ),
    ),
    (
        JobStateChanged(
            seq=42,
            job_id="build-1842",
            attempt=1,
            phase=Phase.INITIALIZING,
            stage="fetching",
            message="pulling alpine:3.20",
            at=1767225600.25,
        ),
        (
            b'{"type":"state","seq":42,"job_id":"build-1842","attempt":1,"phase":"initializing","st'
            b'age":"fetching","message":"pulling alpine:3.20","at":1767225600.25}'
        ),
    ),
    (
        JobStateChanged(seq=1, job_id="j", attempt=2, phase=Phase.RUNNING),
        b'{"type":"state","seq":1,"job_id":"j","attempt":2,"phase":"running"}',
    ),
    (
        JobErrorReport(
            seq=43,
            job_id="build-1843",
            attempt=1,
            kind=JobErrorKind.IMAGE_NOT_FOUND,
            description="no such image",
        ),
        (
            b'{"type":"error","seq":43,"job_id":"build-1843","attempt":1,"kind":"image_not_found","'
            b'description":"no such image"}'
        ),
    ),
    (
        JobErrorReport(seq=7, job_id="j", attempt=1, kind=JobErrorKind.INTERNAL_ERROR),
        b'{"type":"error","seq":7,"job_id":"j","attempt":1,"kind":"internal_error"}',
    ),
    (
        Output(
            seq=45,
            job_id="build-1842",
            attempt=1,
            stream="stdout",
            offset=1024,
            data=b"ok\n\xff\xfe",
        ),
        (
            b'{"type":"output","seq":45,"job_id":"build-1842","attempt":1,"stream":"stdout","offset'
            b'":1024,"data":"b2sK//4="}'
        ),
    ),
    (
        Output(seq=10, job_id="j", attempt=1, stream="console:nrf-1", offset=7, data=b"> "),
        (
            b'{"type":"output","seq":10,"job_id":"j","attempt":1,"stream":"console:nrf-1","offset'
            b'":7,"data":"PiA="}'
        ),
    ),
    (
        Output(seq=8, job_id="j", attempt=1, stream="console", offset=0, data=b""),
        (
            b'{"type":"output","seq":8,"job_id":"j","attempt":1,"stream":"console","offset":0,"data'
            b'":""}'
        ),
    ),
    (
        Output(seq=9, job_id="j", attempt=1, stream="stderr", offset=3, data=bytes(range(256))),
        (
            b'{"type":"output","seq":9,"job_id":"j","attempt":1,"stream":"stderr","offset":3,"data"'
            b':"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4vMDEyMzQ1Njc4OTo7PD0'
            b"+P0BBQkNERUZHSElKS0xNTk9QUVJTVFVWV1hZWltcXV5fYGFiY2RlZmdoaWprbG1ub3BxcnN0dXZ3eHl6e3x9"
            b"fn+AgYKDhIWGh4iJiouMjY6PkJGSk5SVlpeYmZqbnJ2en6ChoqOkpaanqKmqq6ytrq+wsbKztLW2t7i5uru8v"
            b"b6/wMHCw8TFxsfIycrLzM3Oz9DR0tPU1dbX2Nna29zd3t/g4eLj5OXm5+jp6uvs7e7v8PHy8/T19vf4+fr7/P"
            b'3+/w=="}'
        ),
    ),
    (
        JobExit(seq=46, job_id="build-1842", attempt=1, exit_code=1),
        b'{"type":"exit","seq":46,"job_id":"build-1842","attempt":1,"exit_code":1}',
    ),
    (
        JobExit(
            seq=46,
            job_id="build-1842",
            attempt=1,
            signal=9,
            reason="oom",
            message="memory limit 512 MiB reached",
        ),
        (
            b'{"type":"exit","seq":46,"job_id":"build-1842","attempt":1,"signal":9,"reason":"oom","'
            b'message":"memory limit 512 MiB reached"}'
        ),
    ),
    (
        JobExit(seq=5, job_id="j", attempt=1),
        b'{"type":"exit","seq":5,"job_id":"j","attempt":1}',
    ),
    (
        # (1.3) the run's kept output files, uploaded, and one refused (docs/protocol.md §5.1).
        JobFiles(
            seq=47,
            job_id="test-9",
            attempt=1,
            files=[
                OutputFile(
                    path="reports/junit.xml",
                    size=18231,
                    digest=DIGEST,
                    media_type="application/xml",
                )
            ],
            refused=[RefusedFile(path="core", reason="larger than the 1073741824-byte limit")],
        ),
        (
            b'{"type":"files","seq":47,"job_id":"test-9","attempt":1,"files":[{"path":"reports/juni'
            b't.xml","size":18231,"digest":"sha256:abababababababababababababababababababababababab'
            b'abababababababab","media_type":"application/xml"}],"refused":[{"path":"core","reason":'
            b'"larger than the 1073741824-byte limit"}]}'
        ),
    ),
    (
        StatusReply(
            request_id=3,
            runs=[HeldRun("build-1842", 1, Phase.TERMINATING)],
            running=1,
        ),
        (
            b'{"type":"status","request_id":3,"runs":[{"job_id":"build-1842","attempt":1,"phase":"t'
            b'erminating"}],"running":1}'
        ),
    ),
    (
        StatusReply(request_id=0),
        b'{"type":"status","request_id":0}',
    ),
    (
        # 1.5: a power command's answer.
        ConsoleData(session=3, offset=4096, data=b"pong\r\n> "),
        b'{"type":"console_data","session":3,"offset":4096,"data":"cG9uZw0KPiA="}',
    ),
    (
        ConsoleClosed(session=3, reason="device nrf-9 has no console on this host"),
        (
            b'{"type":"console_closed","session":3,'
            b'"reason":"device nrf-9 has no console on this host"}'
        ),
    ),
    (
        ConsoleClosed(session=4),
        b'{"type":"console_closed","session":4}',
    ),
    (
        PowerResult(request_id=7, ok=True, exit_code=0, output="on\n"),
        b'{"type":"power_result","request_id":7,"ok":true,"exit_code":0,"output":"on\\n"}',
    ),
    (
        PowerResult(
            request_id=8,
            output="relay busy",
            reason="power command exited with status 1",
            exit_code=1,
        ),
        (
            b'{"type":"power_result","request_id":8,"exit_code":1,"output":"relay busy",'
            b'"reason":"power command exited with status 1"}'
        ),
    ),
    (
        Heartbeat(at=1767225605.0),
        b'{"type":"heartbeat","at":1767225605.0}',
    ),
    (
        Heartbeat(),
        b'{"type":"heartbeat"}',
    ),
    (
        ProtocolErrorMessage(code=4000, reason="the first message must be hello"),
        b'{"type":"protocol_error","code":4000,"reason":"the first message must be hello"}',
    ),
]


SWITCHBOARD_GOLDENS: list[tuple[msgspec.Struct, bytes]] = [
    (
        Welcome(
            version="1.0",
            session=7,
            last_seq=41,
            heartbeat_interval_s=2.0,
            heartbeat_timeout_s=10.0,
        ),
        (
            b'{"type":"welcome","version":"1.0","session":7,"last_seq":41,"heartbeat_interval_s":2.'
            b'0,"heartbeat_timeout_s":10.0}'
        ),
    ),
    (
        Welcome(version="1.0", session=7, last_seq=41),
        b'{"type":"welcome","version":"1.0","session":7,"last_seq":41}',
    ),
    (
        Welcome(version="1.1", session=1, last_seq=0, enrolled=True),
        b'{"type":"welcome","version":"1.1","session":1,"last_seq":0,"enrolled":true}',
    ),
    (
        StartJob(
            job_id="build-1842",
            attempt=1,
            backend=DockerBackend(
                image="alpine:3.20",
                command=["sh", "-c", "make test"],
                env={"CI": "1"},
                workdir="/src",
            ),
            name="nightly build",
            parameters={"API_KEY": Parameter("s3cr3t", secret=True)},
            resources={"gpu": 1},
            timeout_s=3600.0,
        ),
        (
            b'{"type":"start_job","job_id":"build-1842","attempt":1,"backend":{"kind":"docker","ima'
            b'ge":"alpine:3.20","command":["sh","-c","make test"],"env":{"CI":"1"},"workdir":"/src"'
            b'},"name":"nightly build","parameters":{"API_KEY":{"value":"s3cr3t","secret":true}},"r'
            b'esources":{"gpu":1},"timeout_s":3600.0}'
        ),
    ),
    (
        StartJob(job_id="j", attempt=3, backend=NoopBackend()),
        b'{"type":"start_job","job_id":"j","attempt":3,"backend":{"kind":"noop"}}',
    ),
    (
        StartJob(
            job_id="wasm-job",
            attempt=1,
            backend=WasmBackend(module=DIGEST, args=["--size", "10"]),
            parameters={"MODE": Parameter("fast")},
        ),
        (
            b'{"type":"start_job","job_id":"wasm-job","attempt":1,"backend":{"kind":"wasm","module"'
            b':"sha256:abababababababababababababababababababababababababababababababab","args":["-'
            b'-size","10"]},"parameters":{"MODE":{"value":"fast"}}}'
        ),
    ),
    (
        # (1.3) output files to keep (docs/protocol.md §5.2).
        StartJob(
            job_id="test-9",
            attempt=1,
            backend=DockerBackend(image="tester:1"),
            collect=[CollectRule("logs/**/*.log", "on_failure"), CollectRule("reports/*.xml")],
            collect_limits=CollectLimits(max_files=100),
        ),
        (
            b'{"type":"start_job","job_id":"test-9","attempt":1,"backend":{"kind":"docker","image":'
            b'"tester:1"},"collect":[{"pattern":"logs/**/*.log","when":"on_failure"},{"pattern":"rep'
            b'orts/*.xml"}],"collect_limits":{"max_files":100}}'
        ),
    ),
    (
        # (1.3) inputs: a file, and a tar archive to unpack (docs/protocol.md §5.2).
        StartJob(
            job_id="flash-7",
            attempt=1,
            backend=DockerBackend(image="flasher:1"),
            inputs=[
                InputFile(path="zephyr.bin", digest=DIGEST),
                InputFile(path="tests", digest="sha256:" + "cd" * 32, unpack=True),
            ],
        ),
        (
            b'{"type":"start_job","job_id":"flash-7","attempt":1,"backend":{"kind":"docker","image":'
            b'"flasher:1"},"inputs":[{"path":"zephyr.bin","digest":"sha256:ababababababababababababa'
            b'bababababababababababababababababababab"},{"path":"tests","digest":"sha256:cdcdcdcdcdc'
            b'dcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd","unpack":true}]}'
        ),
    ),
    (
        # (1.4) the device granted to the run, by id.
        StartJob(
            job_id="flash-8",
            attempt=1,
            backend=DockerBackend(image="flasher:1"),
            resources={"nrf52840dk": 1},
            devices=["nrf-1"],
        ),
        (
            b'{"type":"start_job","job_id":"flash-8","attempt":1,"backend":{"kind":"docker","image":'
            b'"flasher:1"},"resources":{"nrf52840dk":1},"devices":["nrf-1"]}'
        ),
    ),
    (
        StopJob(job_id="build-1842", attempt=1, reason="timeout", grace_s=5.0),
        (b'{"type":"stop_job","job_id":"build-1842","attempt":1,"reason":"timeout","grace_s":5.0}'),
    ),
    (
        StopJob(job_id="build-1842", attempt=1),
        b'{"type":"stop_job","job_id":"build-1842","attempt":1}',
    ),
    (
        Ack(seq=46),
        b'{"type":"ack","seq":46}',
    ),
    (
        Ack(seq=0),
        b'{"type":"ack","seq":0}',
    ),
    (
        StatusRequest(request_id=3),
        b'{"type":"status_request","request_id":3}',
    ),
    (
        # 1.5: run a device's power command.
        Power(request_id=7, device_id="nrf-1", action="cycle"),
        b'{"type":"power","request_id":7,"device_id":"nrf-1","action":"cycle"}',
    ),
    (
        ConsoleAttach(session=3, device_id="nrf-1"),
        b'{"type":"console_attach","session":3,"device_id":"nrf-1"}',
    ),
    (
        ConsoleInput(session=3, data=b"ping\r"),
        b'{"type":"console_input","session":3,"data":"cGluZw0="}',
    ),
    (
        ConsoleDetach(session=3),
        b'{"type":"console_detach","session":3}',
    ),
    (
        ServerHeartbeat(at=1767225605.5),
        b'{"type":"heartbeat","at":1767225605.5}',
    ),
    (
        ServerHeartbeat(),
        b'{"type":"heartbeat"}',
    ),
    (
        ProtocolErrorMessage(code=1009, reason="message of 2000000 bytes is too big"),
        b'{"type":"protocol_error","code":1009,"reason":"message of 2000000 bytes is too big"}',
    ),
]


SPEC_GOLDENS: list[tuple[msgspec.Struct, bytes]] = [
    (
        JobSpec(
            name="wasm job",
            backend=WasmBackend(module=DIGEST, args=["--size", "10"], env={"RUST_LOG": "info"}),
        ),
        (
            b'{"name":"wasm job","backend":{"kind":"wasm","module":"sha256:abababababababababababab'
            b'abababababababababababababababababababab","args":["--size","10"],"env":{"RUST_LOG":"i'
            b'nfo"}},"selector":{}}'
        ),
    ),
    (
        JobSpec(
            name="nightly",
            backend=DockerBackend(image="alpine:3.20", command=["echo", "hi"], workdir="/tmp"),
            labels={"team": "ci"},
            selector=Selector(
                match_labels={"arch": "x86_64"},
                match_expressions=[
                    LabelExpression("lab.example/board", "In", ["rpi4", "rpi5"]),
                    LabelExpression("quarantined", "DoesNotExist"),
                ],
            ),
            resources={"gpu": 2},
            priority=10,
            timeout_s=600.0,
            parameters={"TOKEN": Parameter("t0k", secret=True)},
        ),
        (
            b'{"name":"nightly","backend":{"kind":"docker","image":"alpine:3.20","command":["echo",'
            b'"hi"],"workdir":"/tmp"},"labels":{"team":"ci"},"selector":{"match_labels":{"arch":"x8'
            b'6_64"},"match_expressions":[{"key":"lab.example/board","operator":"In","values":["rpi'
            b'4","rpi5"]},{"key":"quarantined","operator":"DoesNotExist"}]},"resources":{"gpu":2},"'
            b'priority":10,"timeout_s":600.0,"parameters":{"TOKEN":{"value":"t0k","secret":true}}}'
        ),
    ),
    (
        JobSpec(
            name="noop",
            backend=NoopBackend(delay_s=1.5, exit_code=3, output="hello\n"),
        ),
        (
            b'{"name":"noop","backend":{"kind":"noop","delay_s":1.5,"exit_code":3,"output":"hello\\'
            b'n"},"selector":{}}'
        ),
    ),
    (
        JobSpec(name="minimal", backend=NoopBackend()),
        b'{"name":"minimal","backend":{"kind":"noop"},"selector":{}}',
    ),
]


def _ids(goldens: list[tuple[msgspec.Struct, bytes]]) -> list[str]:
    seen: dict[str, int] = {}
    ids = []
    for struct, _ in goldens:
        name = type(struct).__name__
        seen[name] = seen.get(name, 0) + 1
        ids.append(f"{name}-{seen[name]}")
    return ids


def _members(union: object) -> set[type]:
    return set(typing.get_args(union))


def _tag(cls: type) -> str:
    return cls.__struct_config__.tag  # type: ignore[attr-defined]


# --- encoding is pinned ----------------------------------------------------------------


@pytest.mark.parametrize(("struct", "golden"), SUPERVISOR_GOLDENS, ids=_ids(SUPERVISOR_GOLDENS))
def test_supervisor_message_encodes_to_golden(struct: msgspec.Struct, golden: bytes) -> None:
    assert codec.encode(struct) == golden


@pytest.mark.parametrize(("struct", "golden"), SUPERVISOR_GOLDENS, ids=_ids(SUPERVISOR_GOLDENS))
def test_supervisor_golden_decodes_back(struct: msgspec.Struct, golden: bytes) -> None:
    decoded = codec.decode_from_supervisor(golden)
    assert type(decoded) is type(struct)
    assert decoded == struct
    # Text frames (str) decode the same as bytes.
    assert codec.decode_from_supervisor(golden.decode()) == struct


@pytest.mark.parametrize(("struct", "golden"), SWITCHBOARD_GOLDENS, ids=_ids(SWITCHBOARD_GOLDENS))
def test_switchboard_message_encodes_to_golden(struct: msgspec.Struct, golden: bytes) -> None:
    assert codec.encode(struct) == golden


@pytest.mark.parametrize(("struct", "golden"), SWITCHBOARD_GOLDENS, ids=_ids(SWITCHBOARD_GOLDENS))
def test_switchboard_golden_decodes_back(struct: msgspec.Struct, golden: bytes) -> None:
    decoded = codec.decode_from_switchboard(golden)
    assert type(decoded) is type(struct)
    assert decoded == struct
    assert codec.decode_from_switchboard(golden.decode()) == struct


@pytest.mark.parametrize(("struct", "golden"), SPEC_GOLDENS, ids=_ids(SPEC_GOLDENS))
def test_job_spec_encodes_to_golden(struct: msgspec.Struct, golden: bytes) -> None:
    assert codec.encode(struct) == golden
    assert codec.decode_job_spec(golden) == struct


def test_goldens_are_plain_json_objects_tagged_by_type() -> None:
    for struct, golden in SUPERVISOR_GOLDENS + SWITCHBOARD_GOLDENS:
        obj = json.loads(golden)
        assert isinstance(obj, dict)
        assert obj["type"] == _tag(type(struct))
        golden.decode("ascii")  # these goldens are pure ASCII: no raw bytes leak into JSON


def test_output_data_is_standard_padded_base64() -> None:
    for struct, golden in SUPERVISOR_GOLDENS:
        if isinstance(struct, Output):
            text = json.loads(golden)["data"]
            assert re.fullmatch(r"[A-Za-z0-9+/]*={0,2}", text)
            assert len(text) % 4 == 0
    one = Output(seq=1, job_id="j", attempt=1, stream="stdout", offset=0, data=b"\xfb\xff")
    assert json.loads(codec.encode(one))["data"] == "+/8="


# --- completeness: every type has a golden -----------------------------------------------


def test_every_supervisor_message_type_has_a_golden() -> None:
    covered = {type(struct) for struct, _ in SUPERVISOR_GOLDENS}
    missing = _members(FromSupervisor) - covered
    assert not missing, f"add goldens for {sorted(c.__name__ for c in missing)}"


def test_every_switchboard_message_type_has_a_golden() -> None:
    covered = {type(struct) for struct, _ in SWITCHBOARD_GOLDENS}
    missing = _members(FromSwitchboard) - covered
    assert not missing, f"add goldens for {sorted(c.__name__ for c in missing)}"


def test_every_backend_kind_has_a_spec_golden() -> None:
    covered = {type(struct.backend) for struct, _ in SPEC_GOLDENS if isinstance(struct, JobSpec)}
    missing = _members(BackendSpec) - covered
    assert not missing, f"add JobSpec goldens for {sorted(c.__name__ for c in missing)}"


def test_goldens_only_hold_union_members() -> None:
    # A golden for a type that left a union would pin a message nobody can decode.
    assert {type(s) for s, _ in SUPERVISOR_GOLDENS} <= _members(FromSupervisor)
    assert {type(s) for s, _ in SWITCHBOARD_GOLDENS} <= _members(FromSwitchboard)


def test_type_tags_are_unique_per_direction() -> None:
    for union in (FromSupervisor, FromSwitchboard):
        tags = [_tag(cls) for cls in _members(union)]
        assert len(tags) == len(set(tags))
        for cls in _members(union):
            assert cls.__struct_config__.tag_field == "type"


def test_the_type_tag_may_come_last() -> None:
    assert codec.decode_from_supervisor(b'{"at":2,"type":"heartbeat"}') == Heartbeat(at=2.0)


def test_unknown_fields_in_messages_are_ignored() -> None:
    # Minor versions add optional fields; an older peer must skip them.
    frame = (
        b'{"type":"state","seq":1,"job_id":"j","attempt":1,"phase":"running",'
        b'"new_field":{"nested":[1,2,{"x":null}]},"runs":[{"job_id":"a","attempt":1,'
        b'"phase":"running","extra":true}]}'
    )
    assert codec.decode_from_supervisor(frame) == JobStateChanged(
        seq=1, job_id="j", attempt=1, phase=Phase.RUNNING
    )
    hello = codec.decode_from_supervisor(
        b'{"type":"hello","supervisor_id":"h","name":"h","versions":["1.1"],"future":1,'
        b'"runs":[{"job_id":"a","attempt":1,"phase":"running","extra":true}]}'
    )
    assert isinstance(hello, Hello)
    assert hello.runs == [HeldRun("a", 1, Phase.RUNNING)]
    welcome = codec.decode_from_switchboard(
        b'{"type":"welcome","version":"1.0","session":1,"last_seq":0,"later":"x"}'
    )
    assert welcome == Welcome(version="1.0", session=1, last_seq=0)


def test_defaults_may_be_sent_explicitly() -> None:
    explicit = (
        b'{"type":"welcome","version":"1.0","session":7,"last_seq":41,'
        b'"heartbeat_interval_s":5.0,"heartbeat_timeout_s":20}'
    )
    assert codec.decode_from_switchboard(explicit) == Welcome(version="1.0", session=7, last_seq=41)
    with_nulls = (
        b'{"type":"state","seq":1,"job_id":"j","attempt":1,"phase":"running",'
        b'"stage":null,"message":null,"at":0}'
    )
    assert codec.decode_from_supervisor(with_nulls) == JobStateChanged(
        seq=1, job_id="j", attempt=1, phase=Phase.RUNNING
    )


# --- docs/protocol.md quotes the wire exactly -------------------------------------------

_DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
_BACKEND = msgspec.json.Decoder(BackendSpec)


def _doc_examples() -> list[str]:
    return re.findall(r"```json\n(.*?)\n```", _DOC.read_text(), flags=re.S)


def test_doc_examples_are_exact_encodings() -> None:
    examples = _doc_examples()
    assert len(examples) >= 20
    for text in examples:
        obj = json.loads(text)
        decoded: msgspec.Struct
        if "type" not in obj:
            decoded = _BACKEND.decode(text)
        elif obj["type"] in {_tag(c) for c in _members(FromSupervisor)}:
            decoded = codec.decode_from_supervisor(text)
        else:
            decoded = codec.decode_from_switchboard(text)
        assert codec.encode(decoded).decode() == text, text


def test_doc_quotes_every_message_type() -> None:
    text = _DOC.read_text()
    for cls in _members(FromSupervisor) | _members(FromSwitchboard):
        assert f'{{"type":"{_tag(cls)}"' in text, f"docs/protocol.md lacks an example of {cls}"
    for cls in _members(BackendSpec):
        assert f'{{"kind":"{_tag(cls)}"' in text
