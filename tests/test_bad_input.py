"""Bad input over real sockets: each gets a clear error, and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
import secrets

import pytest
from websockets.exceptions import InvalidStatus

from protocol import codec, limits
from protocol.exceptions import CloseCode
from protocol.messages import Hello
from tests.harness import Switchboard
from tests.supervisor_ws import closed_with, connect_ws, handshake


def _unique(prefix: str) -> str:
    """A supervisor id no test has used (a registration token enrols an id only once)."""
    return f"{prefix}-{secrets.token_hex(3)}"


# --- REST ------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "Bearer sbt_wrong", "Basic abc", "Bearer"])
def test_rest_refuses_missing_or_wrong_token(switchboard: Switchboard, header: str | None):
    import httpx

    headers = {"Authorization": header} if header is not None else {}
    response = httpx.post(f"{switchboard.url}/api/v1/jobs", headers=headers, json={})
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"


def test_rest_refuses_a_role_without_the_permission(switchboard: Switchboard):
    viewer = switchboard.client(switchboard.create_token("viewer"))
    response = viewer.post("/api/v1/jobs", json={"name": "x", "backend": {"kind": "noop"}})
    assert response.status_code == 403
    assert response.json()["error"] == "forbidden"
    # ...but may read.
    assert viewer.get("/api/v1/supervisors").status_code == 200


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"name": "x", "backend": {"kind": "wasm", "module": "sha256:nothex"}}, "backend.module"),
        ({"name": "x", "backend": {"kind": "noop"}, "timeout_s": "5"}, "timeout_s"),
        ({"name": "x", "backend": {"kind": "noop"}, "timeout_s": -1}, "timeout_s"),
        ({"name": "", "backend": {"kind": "noop"}}, "name"),
        ({"name": "x", "backend": {"kind": "teleport"}}, "backend"),
        ({"name": "x", "backend": {"kind": "noop"}, "labels": {"bad key!": "v"}}, "labels"),
        (
            {
                "name": "x",
                "backend": {"kind": "noop"},
                "selector": {
                    "match_expressions": [{"key": "a", "operator": "Exists", "values": ["v"]}]
                },
            },
            "selector.match_expressions[0]",
        ),
    ],
)
def test_invalid_spec_is_400_naming_the_field(switchboard: Switchboard, spec: dict, field: str):
    response = switchboard.client().post("/api/v1/jobs", json=spec)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] in ("invalid_spec", "invalid_request")
    assert field in body["message"]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"name": "x", "backend": {"kind": "noop"}, "tmeout_s": 5}, "tmeout_s"),
        # A supervisor skips unknown backend fields on the wire (docs/protocol.md §2); the
        # API, where people type them, does not.
        ({"name": "x", "backend": {"kind": "noop", "dealy_s": 1}}, "dealy_s"),
        (
            {
                "name": "x",
                "backend": {"kind": "noop"},
                "parameters": {"A": {"value": "v", "secrt": 1}},
            },
            "secrt",
        ),
    ],
)
def test_unknown_field_in_spec_is_named(switchboard: Switchboard, spec: dict, field: str):
    for path, body in (("/api/v1/jobs", spec), ("/api/v1/jobs/batch", [spec])):
        response = switchboard.client().post(path, json=body)
        assert response.status_code == 400, response.text
        assert field in response.json()["message"]


def test_malformed_json_body_is_400(switchboard: Switchboard):
    response = switchboard.client().post(
        "/api/v1/jobs",
        content=b'{"name": "x", "backend": {',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400


@pytest.mark.parametrize(
    ("backend", "field"),
    [
        ({"kind": "wasm", "module": "sha256:" + "0" * 64}, "backend.module"),
        ({"kind": "docker", "image_artifact": "sha256:" + "0" * 64}, "backend.image_artifact"),
    ],
)
def test_job_naming_a_missing_artifact_is_400(switchboard: Switchboard, backend, field):
    response = switchboard.client().post("/api/v1/jobs", json={"name": "x", "backend": backend})
    assert response.status_code == 400
    assert response.json()["field"] == field


def test_docker_job_needs_an_image(switchboard: Switchboard):
    spec = {"name": "x", "backend": {"kind": "docker", "command": ["true"]}}
    response = switchboard.client().post("/api/v1/jobs", json=spec)
    assert response.status_code == 400
    assert "image" in response.json()["message"]


@pytest.mark.parametrize(
    "path",
    ["/api/v1/jobs/nope", "/api/v1/jobs/nope/output", "/api/v1/artifacts/sha256:" + "1" * 64],
)
def test_unknown_ids_are_404(switchboard: Switchboard, path: str):
    response = switchboard.client().get(path)
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


def test_cancel_of_unknown_job_is_404(switchboard: Switchboard):
    assert switchboard.client().post("/api/v1/jobs/nope/cancel").status_code == 404


def test_health_needs_no_token(switchboard: Switchboard):
    import httpx

    response = httpx.get(f"{switchboard.url}/api/v1/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_openapi_describes_the_api(switchboard: Switchboard):
    import httpx

    schema = httpx.get(f"{switchboard.url}/schema/openapi.json").json()
    assert "/api/v1/jobs" in schema["paths"]
    assert "JobSpec" in json.dumps(schema["components"])


# --- input that once reached a 500 -----------------------------------------------------

#: What an unhandled error leaves in the server's log.
_FAILURE_MARKS = ("unhandled error", "Traceback", "RecursionError", "OverflowError")


def _no_failure_logged(switchboard: Switchboard) -> None:
    log = switchboard.process.log()
    assert not [mark for mark in _FAILURE_MARKS if mark in log], log


#: 500,000 levels of JSON arrays: msgspec's untyped decode recursed once per level.
DEEP_JSON = b"[" * 500_000 + b"]" * 500_000


@pytest.mark.parametrize("path", ["/api/v1/jobs", "/api/v1/jobs/batch", "/api/v1/tokens"])
def test_deeply_nested_json_body_is_400(switchboard: Switchboard, path: str):
    response = switchboard.client().post(
        path, content=DEEP_JSON, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert response.json() == {
        "error": "invalid_request",
        "message": "the JSON body is nested too deeply",
        "field": None,
    }
    _no_failure_logged(switchboard)


@pytest.mark.parametrize("query", ["start=-1", "end=-1", "attempt=0", "end=x"])
def test_an_output_range_out_of_bounds_is_400(switchboard: Switchboard, query: str):
    client = switchboard.client()
    job_id = client.post("/api/v1/jobs", json={"name": "out", "backend": {"kind": "noop"}}).json()[
        "id"
    ]
    response = client.get(f"/api/v1/jobs/{job_id}/output?{query}")
    assert response.status_code == 400, (query, response.status_code, response.text)
    assert query.split("=")[0] in response.text


def test_too_many_label_filters_is_400(switchboard: Switchboard):
    client = switchboard.client()
    # 1,100 terms made a query SQLite refuses ("expression tree is too large").
    many = [("label", f"k{i}=v") for i in range(1100)]
    response = client.get("/api/v1/jobs", params=many)
    assert response.status_code == 400, response.text
    assert response.json()["field"] == "label"
    assert "at most 32 label filters" in response.json()["message"]
    # The documented maximum works, and a term repeated counts once.
    assert client.get("/api/v1/jobs", params=many[:32]).status_code == 200
    assert client.get("/api/v1/jobs", params=[("label", "k=v")] * 100).status_code == 200
    assert client.get("/api/v1/jobs", params=[("phase", "queued")] * 5000).status_code == 200
    _no_failure_logged(switchboard)


@pytest.mark.parametrize(
    "last_event_id",
    [
        "1:99999999999999999999999",  # an offset past int64 reached the store
        "99999999999999999999999:1",
        "1:9223372036854775808",
        "0:5",
        "1:²",  # str.isdigit() says yes, int() says no
        "1:-5",
        "one:two",
        "1:5:7",
    ],
)
def test_bad_last_event_id_is_400(switchboard: Switchboard, last_event_id: str):
    client = switchboard.client()
    job = client.post("/api/v1/jobs", json={"name": "sse", "backend": {"kind": "noop"}})
    response = client.get(
        f"/api/v1/jobs/{job.json()['id']}/output/events",
        headers={"Last-Event-ID": last_event_id.encode()},
    )
    assert response.status_code == 400, response.text
    assert response.json()["field"] == "Last-Event-ID"
    assert "attempt:offset" in response.json()["message"]
    _no_failure_logged(switchboard)


# --- WebSocket -------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "sbt_wrong"])
async def test_websocket_upgrade_refused_without_valid_token(switchboard: Switchboard, token):
    with pytest.raises(InvalidStatus) as refused:
        async with connect_ws(switchboard, token):
            pass
    assert refused.value.response.status_code == 401
    assert b"token" in refused.value.response.body


async def test_websocket_upgrade_refused_for_api_token(switchboard: Switchboard):
    with pytest.raises(InvalidStatus) as refused:
        async with connect_ws(switchboard, switchboard.admin_token):
            pass
    assert refused.value.response.status_code == 401


async def test_websocket_upgrade_refused_without_subprotocol(switchboard: Switchboard):
    token = switchboard.create_token("supervisor")
    with pytest.raises(InvalidStatus) as refused:
        async with connect_ws(switchboard, token, subprotocols=("chat",)):
            pass
    assert refused.value.response.status_code == 400


async def test_first_message_must_be_hello(switchboard: Switchboard):
    token = switchboard.create_token("supervisor")
    async with connect_ws(switchboard, token) as ws:
        await ws.send(b'{"type":"heartbeat"}', text=True)
        code, reason, frames = await closed_with(ws)
    assert code == CloseCode.HANDSHAKE_FAILED
    assert "hello" in reason
    assert frames and frames[-1]["type"] == "protocol_error"


async def test_hello_with_unknown_version_is_refused(switchboard: Switchboard):
    token = switchboard.create_token("supervisor")
    async with connect_ws(switchboard, token) as ws:
        hello = Hello(supervisor_id="future", name="future", versions=["7.0"])
        await ws.send(codec.encode(hello), text=True)
        code, reason, _ = await closed_with(ws)
    assert code == CloseCode.UNSUPPORTED_VERSION
    assert "version" in reason


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (b"{not json", "malformed JSON"),
        (b'{"type":"output","seq":"one"}', "$.seq"),
        (b'{"type":"launch_missiles"}', "type"),
        (b"\xff\xfe", ""),
    ],
)
async def test_malformed_frame_closes_only_that_connection(
    switchboard: Switchboard, frame: bytes, expected: str
):
    token = switchboard.create_token("supervisor")
    async with connect_ws(switchboard, token) as healthy, connect_ws(switchboard, token) as bad:
        await handshake(healthy, _unique("healthy-peer"))
        await handshake(bad, _unique("bad-peer"))
        await bad.send(frame, text=True)  # (a binary frame is refused as such: test_bad_frames)
        code, reason, frames = await closed_with(bad)
        assert code == CloseCode.INVALID_PAYLOAD
        assert expected in reason
        assert frames[-1]["type"] == "protocol_error"
        # The other connection is untouched, and the server takes new ones.
        await healthy.ping()
        async with connect_ws(switchboard, token) as fresh:
            await handshake(fresh, _unique("fresh-peer"))


async def test_oversized_frame_closes_only_that_connection(switchboard: Switchboard):
    token = switchboard.create_token("supervisor")
    async with connect_ws(switchboard, token) as healthy, connect_ws(switchboard, token) as bad:
        await handshake(healthy, "healthy-2")
        await handshake(bad, "big-peer")
        await bad.send(b"x" * (limits.MAX_FRAME_BYTES + 1))
        code, _, _ = await asyncio.wait_for(closed_with(bad), 10)
        assert code == CloseCode.MESSAGE_TOO_BIG
        await healthy.ping()
    assert switchboard.client().get("/api/v1/health").status_code == 200
