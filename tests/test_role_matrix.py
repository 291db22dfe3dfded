"""The role matrix, checked cell by cell against one real switchboard: every REST route in
the OpenAPI document × (no token, a wrong token, each role). The table below is the spec
(docs/auth.md shows the same table); the OpenAPI document must list exactly its routes, so a
new route can't slip in unguarded. Refused calls must also change nothing."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from protocol import codec, limits
from protocol.messages import DeviceInfo, Hello, Welcome
from protocol.versions import supported_versions
from switchboard.config import Settings
from tests.harness import Switchboard, scaled, wait_for

ADMIN, OPERATOR, SUBMITTER, VIEWER, SUPERVISOR = (
    "admin",
    "operator",
    "submitter",
    "viewer",
    "supervisor",
)
ROLES = (ADMIN, OPERATOR, SUBMITTER, VIEWER, SUPERVISOR)
NO_TOKEN, BOGUS_TOKEN = "no-token", "bogus-token"
CALLERS = (NO_TOKEN, BOGUS_TOKEN, *ROLES)

#: Routes anyone may call, token or not.
PUBLIC = "public"

#: (method, path template) → the roles allowed, or PUBLIC. Written out by hand on purpose:
#: it is the spec that switchboard/auth.py ROLE_PERMISSIONS and the route guards must meet.
#: A job route acts on a job another token (the admin's) submitted; OWN_JOB says who may
#: act on a job of its own.
EXPECTED: dict[tuple[str, str], frozenset[str] | str] = {
    ("GET", "/api/v1/health"): PUBLIC,
    ("GET", "/api/v1/ready"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    # jobs
    ("GET", "/api/v1/jobs"): frozenset({ADMIN, OPERATOR, SUBMITTER, VIEWER}),
    ("POST", "/api/v1/jobs"): frozenset({ADMIN, OPERATOR, SUBMITTER}),
    ("POST", "/api/v1/jobs/batch"): frozenset({ADMIN, OPERATOR, SUBMITTER}),
    ("GET", "/api/v1/jobs/ended"): frozenset({ADMIN, OPERATOR, SUBMITTER, VIEWER}),
    ("GET", "/api/v1/jobs/{job_id}"): frozenset({ADMIN, OPERATOR, SUBMITTER, VIEWER}),
    ("DELETE", "/api/v1/jobs/{job_id}"): frozenset({ADMIN, OPERATOR}),  # own: OWN_JOB
    ("GET", "/api/v1/jobs/{job_id}/runs"): frozenset({ADMIN, OPERATOR, SUBMITTER, VIEWER}),
    ("GET", "/api/v1/jobs/{job_id}/events"): frozenset({ADMIN, OPERATOR, SUBMITTER, VIEWER}),
    ("POST", "/api/v1/jobs/{job_id}/cancel"): frozenset({ADMIN, OPERATOR}),  # own: OWN_JOB
    ("GET", "/api/v1/jobs/{job_id}/output"): frozenset({ADMIN, OPERATOR, SUBMITTER, VIEWER}),
    ("GET", "/api/v1/jobs/{job_id}/output/follow"): frozenset({ADMIN, OPERATOR, SUBMITTER, VIEWER}),
    ("GET", "/api/v1/jobs/{job_id}/output/events"): frozenset({ADMIN, OPERATOR, SUBMITTER, VIEWER}),
    ("GET", "/api/v1/jobs/{job_id}/tests"): frozenset({ADMIN, OPERATOR, SUBMITTER, VIEWER}),
    ("GET", "/api/v1/jobs/{job_id}/files"): frozenset({ADMIN, OPERATOR, SUBMITTER, VIEWER}),
    ("GET", "/api/v1/jobs/{job_id}/files/{path}"): frozenset({ADMIN, OPERATOR, SUBMITTER, VIEWER}),
    ("GET", "/api/v1/me"): frozenset({ADMIN, OPERATOR, SUBMITTER, VIEWER}),
    ("GET", "/api/v1/overview"): frozenset({ADMIN, OPERATOR, SUBMITTER, VIEWER}),
    ("GET", "/api/v1/live"): frozenset({ADMIN, OPERATOR, SUBMITTER, VIEWER}),
    ("GET", "/api/v1/supervisors/{supervisor_id}/connections"): frozenset(
        {ADMIN, OPERATOR, SUBMITTER, VIEWER}
    ),
    # supervisors
    ("GET", "/api/v1/supervisors"): frozenset({ADMIN, OPERATOR, SUBMITTER, VIEWER}),
    ("GET", "/api/v1/supervisors/{supervisor_id}"): frozenset({ADMIN, OPERATOR, SUBMITTER, VIEWER}),
    ("POST", "/api/v1/supervisors/{supervisor_id}/drain"): frozenset({ADMIN, OPERATOR}),
    ("POST", "/api/v1/supervisors/{supervisor_id}/resume"): frozenset({ADMIN, OPERATOR}),
    ("PUT", "/api/v1/supervisors/{supervisor_id}/labels"): frozenset({ADMIN, OPERATOR}),
    ("POST", "/api/v1/supervisors/{supervisor_id}/token"): frozenset({ADMIN}),
    ("POST", "/api/v1/supervisors/{supervisor_id}/unenroll"): frozenset({ADMIN}),
    # devices (the hardware lab)
    ("GET", "/api/v1/devices"): frozenset({ADMIN, OPERATOR, SUBMITTER, VIEWER}),
    ("GET", "/api/v1/devices/{device_id}"): frozenset({ADMIN, OPERATOR, SUBMITTER, VIEWER}),
    ("PUT", "/api/v1/devices/{device_id}/health"): frozenset({ADMIN, OPERATOR}),
    # power: operators, and the holder of the lease the device belongs to (a submitter
    # holding none is refused: test_lab_power)
    ("POST", "/api/v1/devices/{device_id}/power"): frozenset({ADMIN, OPERATOR}),
    # job groups: whoever submits jobs submits a group
    ("POST", "/api/v1/groups"): frozenset({ADMIN, OPERATOR, SUBMITTER}),
    ("GET", "/api/v1/groups"): frozenset({ADMIN, OPERATOR, SUBMITTER, VIEWER}),
    ("GET", "/api/v1/groups/{group_id}"): frozenset({ADMIN, OPERATOR, SUBMITTER, VIEWER}),
    # reservations of devices: whoever submits jobs reserves; on a reservation another
    # token (the admin's) holds, only an operator acts (its holder may: test_lab_reservations)
    ("POST", "/api/v1/reservations"): frozenset({ADMIN, OPERATOR, SUBMITTER}),
    ("GET", "/api/v1/reservations"): frozenset({ADMIN, OPERATOR, SUBMITTER, VIEWER}),
    ("GET", "/api/v1/reservations/{reservation_id}"): frozenset(
        {ADMIN, OPERATOR, SUBMITTER, VIEWER}
    ),
    ("DELETE", "/api/v1/reservations/{reservation_id}"): frozenset({ADMIN, OPERATOR}),
    ("POST", "/api/v1/reservations/{reservation_id}/refresh"): frozenset({ADMIN, OPERATOR}),
    ("POST", "/api/v1/reservations/{reservation_id}/extend"): frozenset({ADMIN, OPERATOR}),
    # tokens
    ("GET", "/api/v1/tokens"): frozenset({ADMIN}),
    ("POST", "/api/v1/tokens"): frozenset({ADMIN}),
    ("DELETE", "/api/v1/tokens/{token_id}"): frozenset({ADMIN}),
    # dispatch
    ("GET", "/api/v1/dispatch"): frozenset({ADMIN, OPERATOR, SUBMITTER, VIEWER}),
    ("POST", "/api/v1/dispatch/pause"): frozenset({ADMIN, OPERATOR}),
    ("POST", "/api/v1/dispatch/resume"): frozenset({ADMIN, OPERATOR}),
    # artifacts
    ("POST", "/api/v1/artifacts"): frozenset({ADMIN, OPERATOR, SUBMITTER}),
    ("GET", "/api/v1/artifacts/{digest}"): frozenset({ADMIN, OPERATOR, SUBMITTER, SUPERVISOR}),
    # a submitter only those its token uploaded (each cell's was, by the submitter)
    ("DELETE", "/api/v1/artifacts/{digest}"): frozenset({ADMIN, OPERATOR, SUBMITTER}),
    # resumable uploads: whoever uploads artifacts, and hosts (their jobs' outputs)
    ("HEAD", "/api/v1/uploads/{digest}"): frozenset({ADMIN, OPERATOR, SUBMITTER, SUPERVISOR}),
    ("PUT", "/api/v1/uploads/{digest}"): frozenset({ADMIN, OPERATOR, SUBMITTER, SUPERVISOR}),
}

#: Routes that act on one job, and the roles that may call them on a job their own token
#: submitted (a viewer can't submit one).
OWN_JOB: dict[tuple[str, str], frozenset[str]] = {
    ("DELETE", "/api/v1/jobs/{job_id}"): frozenset({ADMIN, OPERATOR, SUBMITTER}),
    ("POST", "/api/v1/jobs/{job_id}/cancel"): frozenset({ADMIN, OPERATOR, SUBMITTER}),
}

#: Served by Litestar next to the document itself, so not listed in it; public too.
SCHEMA_ROUTES = ("/schema/openapi.json", "/schema/openapi.yaml", "/schema", "/schema/swagger")

#: The supervisor record the supervisor routes act on (registered by a real handshake).
SUPERVISOR_ID = "matrix-sup"
#: The one device SUPERVISOR_ID declares.
DEVICE_ID = "matrix-board"
#: The id the `supervisor` caller's token is bound to (another one: the cells that rotate
#: and unenroll SUPERVISOR_ID revoke its tokens).
CREDENTIAL_ID = "matrix-host"


#: Routes whose 200 answer never ends by design.
ENDLESS = {"/api/v1/live"}


@dataclass
class Call:
    """One cell's request, and how to tell that a refused one changed nothing."""

    path: str
    json: Any = None
    content: bytes | None = None
    params: dict[str, str] | None = None
    headers: dict[str, str] | None = None
    #: Read (with the admin token) before and after: an allowed call changes it, a refused
    #: one must not.
    state: Callable[[], object] | None = None
    #: Run after the cell whatever happened, so later cells find the switchboard as it was.
    cleanup: list[Callable[[], object]] = field(default_factory=list)


@dataclass
class World:
    """The running switchboard, a client per caller, and the records the cells point at."""

    switchboard: Switchboard
    clients: dict[str, httpx.Client]
    ended_job: str
    digest: str

    @property
    def admin(self) -> httpx.Client:
        return self.clients[ADMIN]

    def submit(self, tag: str, by: str = ADMIN) -> str:
        response = self.clients[by].post("/api/v1/jobs", json=_spec(tag))
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def ended(self, tag: str, by: str = ADMIN) -> str:
        job_id = self.submit(tag, by)
        assert self.admin.post(f"/api/v1/jobs/{job_id}/cancel").json()["phase"] == "canceled"
        return job_id

    def tagged_jobs(self, tag: str) -> list[str]:
        page = self.admin.get("/api/v1/jobs", params={"label": f"matrix={tag}"}).json()
        return [job["id"] for job in page["items"]]

    def supervisor(self) -> dict[str, Any]:
        return self.admin.get(f"/api/v1/supervisors/{SUPERVISOR_ID}").json()

    def tokens(self) -> list[dict[str, Any]]:
        return self.admin.get("/api/v1/tokens").json()

    def reservations(self, tag: str) -> list[str]:
        """The open reservations a cell tagged `tag` made."""
        return [
            r["id"]
            for r in self.admin.get("/api/v1/reservations").json()
            if tag in str(r["selector"])
        ]

    def release(self, reservation_id: str) -> None:
        self.admin.delete(f"/api/v1/reservations/{reservation_id}")

    def paused(self) -> bool:
        return self.admin.get("/api/v1/dispatch").json()["paused"]

    def call(self, method: str, template: str, tag: str) -> Call:
        """The request for (method, template): ids of records made for this cell when the
        call would destroy something, else of the shared ones."""
        job = template.replace("{job_id}", self.ended_job)
        sup = template.replace("{supervisor_id}", SUPERVISOR_ID)
        match method, template:
            case "POST", "/api/v1/jobs":
                return Call(template, json=_spec(tag), state=lambda: self.tagged_jobs(tag))
            case "POST", "/api/v1/jobs/batch":
                return Call(template, json=[_spec(tag)], state=lambda: self.tagged_jobs(tag))
            case "DELETE", "/api/v1/jobs/{job_id}":
                admins = self.ended(tag)
                return Call(
                    template.replace("{job_id}", admins),
                    state=lambda: self.admin.get(f"/api/v1/jobs/{admins}").status_code,
                )
            case "POST", "/api/v1/jobs/{job_id}/cancel":
                admins = self.submit(tag)
                return Call(
                    template.replace("{job_id}", admins),
                    state=lambda: self.admin.get(f"/api/v1/jobs/{admins}").json()["phase"],
                )
            case "GET", "/api/v1/jobs":
                return Call(template, params={"limit": "1"})
            case "GET", "/api/v1/jobs/ended":
                return Call(template, params={"ids": self.ended_job})
            case "POST", "/api/v1/groups":
                return Call(template, json=_group(tag), state=lambda: self.tagged_jobs(tag))
            case "GET", "/api/v1/groups":
                return Call(template, params={"limit": "1"})
            case "GET", "/api/v1/groups/{group_id}":
                made = self.admin.post("/api/v1/groups", json=_group(tag))
                assert made.status_code == 201, made.text
                return Call(template.replace("{group_id}", made.json()["id"]))
            case "POST", "/api/v1/supervisors/{supervisor_id}/drain":
                return Call(
                    sup,
                    state=lambda: self.supervisor()["drained"],
                    cleanup=[
                        lambda: self.admin.post(f"/api/v1/supervisors/{SUPERVISOR_ID}/resume")
                    ],
                )
            case "POST", "/api/v1/supervisors/{supervisor_id}/resume":
                # Drained first, so that a refused resume has something to leave alone.
                self.admin.post(f"/api/v1/supervisors/{SUPERVISOR_ID}/drain")
                return Call(
                    sup,
                    state=lambda: self.supervisor()["drained"],
                    cleanup=[
                        lambda: self.admin.post(f"/api/v1/supervisors/{SUPERVISOR_ID}/resume")
                    ],
                )
            case "PUT", "/api/v1/supervisors/{supervisor_id}/labels":
                return Call(
                    sup,
                    json={"labels": {"matrix": tag}},
                    state=lambda: self.supervisor()["operator_labels"],
                )
            case "POST", "/api/v1/supervisors/{supervisor_id}/token":
                # Only tokens bound to the record are replaced; the callers' are not bound.
                return Call(
                    sup,
                    state=lambda: [
                        (t["id"], t["revoked"])
                        for t in self.tokens()
                        if t["supervisor_id"] == SUPERVISOR_ID
                    ],
                )
            case "POST", "/api/v1/supervisors/{supervisor_id}/unenroll":
                # A credential of the record's, so that an allowed unenroll has one to revoke.
                self.admin.post(
                    "/api/v1/tokens", json={"role": SUPERVISOR, "supervisor_id": SUPERVISOR_ID}
                )
                return Call(
                    sup,
                    state=lambda: [
                        (t["id"], t["revoked"])
                        for t in self.tokens()
                        if t["supervisor_id"] == SUPERVISOR_ID
                    ],
                )
            case "PUT", "/api/v1/devices/{device_id}/health":
                # A health not set before (each cell its own reason), put back after.
                path = template.replace("{device_id}", DEVICE_ID)
                return Call(
                    path,
                    json={"health": "maintenance", "reason": f"matrix {tag}"},
                    state=lambda: self.admin.get(f"/api/v1/devices/{DEVICE_ID}").json()["health"],
                    cleanup=[
                        lambda: self.admin.put(
                            path, json={"health": "unknown", "reason": "matrix: back"}
                        )
                    ],
                )
            case "GET", "/api/v1/devices/{device_id}":
                return Call(template.replace("{device_id}", DEVICE_ID))
            case "POST", "/api/v1/devices/{device_id}/power":
                # It declares no power commands: an allowed call is answered 409 (and kept
                # in the device's history), a refused one changes nothing.
                return Call(
                    template.replace("{device_id}", DEVICE_ID),
                    json={"action": "status"},
                    state=lambda: len(
                        self.admin.get(f"/api/v1/devices/{DEVICE_ID}").json()["power_history"]
                    ),
                )
            case "POST", "/api/v1/reservations":
                return Call(
                    template,
                    json=_reservation(tag),
                    state=lambda: self.reservations(tag),
                    cleanup=[lambda: [self.release(r) for r in self.reservations(tag)]],
                )
            case "GET", "/api/v1/reservations":
                return Call(template)
            case _ if template.startswith("/api/v1/reservations/{reservation_id}"):
                made = self.admin.post("/api/v1/reservations", json=_reservation(tag))
                assert made.status_code == 201, made.text
                reservation = made.json()["id"]
                path = f"/api/v1/reservations/{reservation}"
                # Held before the call: the sweep granting it meanwhile would look like a
                # change the call made (the matrix's cells hold the board one at a time).
                wait_for(
                    lambda: self.admin.get(path).json()["state"] == "held",
                    f"reservation {reservation} granted",
                )
                return Call(
                    template.replace("{reservation_id}", reservation),
                    json={"by_s": 60} if template.endswith("/extend") else None,
                    state=None
                    if method == "GET"
                    else lambda: {
                        k: v
                        for k, v in self.admin.get(path).json().items()
                        if k in ("state", "refreshed_at", "duration_s", "expires_at")
                    },
                    cleanup=[lambda: self.release(reservation)],
                )
            case "POST", "/api/v1/tokens":
                return Call(
                    template,
                    json={"role": VIEWER, "name": tag},
                    state=lambda: [t["id"] for t in self.tokens() if t["name"] == tag],
                )
            case "DELETE", "/api/v1/tokens/{token_id}":
                made = self.admin.post("/api/v1/tokens", json={"role": VIEWER, "name": tag})
                token_id = made.json()["id"]
                return Call(
                    template.replace("{token_id}", token_id),
                    state=lambda: [t["revoked"] for t in self.tokens() if t["id"] == token_id],
                )
            case "POST", "/api/v1/dispatch/pause":
                return Call(
                    template,
                    state=self.paused,
                    cleanup=[lambda: self.admin.post("/api/v1/dispatch/resume")],
                )
            case "POST", "/api/v1/dispatch/resume":
                self.admin.post("/api/v1/dispatch/pause")
                return Call(
                    template,
                    state=self.paused,
                    cleanup=[lambda: self.admin.post("/api/v1/dispatch/resume")],
                )
            case "POST", "/api/v1/artifacts":
                content = f"matrix artifact {tag}".encode()
                digest = "sha256:" + hashlib.sha256(content).hexdigest()
                return Call(
                    template,
                    content=content,
                    state=lambda: self.admin.get(f"/api/v1/artifacts/{digest}").status_code,
                )
            case "GET", "/api/v1/artifacts/{digest}":
                return Call(template.replace("{digest}", self.digest))
            case "HEAD", "/api/v1/uploads/{digest}":
                return Call(template.replace("{digest}", self.digest))
            case "PUT", "/api/v1/uploads/{digest}":
                # The whole upload in one piece: an allowed one stores the artifact.
                content = f"matrix upload {tag}".encode()
                digest = "sha256:" + hashlib.sha256(content).hexdigest()
                return Call(
                    template.replace("{digest}", digest),
                    content=content,
                    headers={"Content-Range": f"bytes 0-{len(content) - 1}/{len(content)}"},
                    state=lambda: self.admin.get(f"/api/v1/artifacts/{digest}").status_code,
                )
            case "DELETE", "/api/v1/artifacts/{digest}":
                made = self.clients[SUBMITTER].post(
                    "/api/v1/artifacts", content=f"matrix doomed {tag}".encode()
                )
                digest = made.json()["digest"]
                return Call(
                    template.replace("{digest}", digest),
                    state=lambda: self.admin.get(f"/api/v1/artifacts/{digest}").status_code,
                )
        # Everything else only reads: the shared ended job (so a follow ends at once) and
        # the shared supervisor record.
        return Call(sup if "{supervisor_id}" in template else job)


def _reservation(tag: str) -> dict[str, Any]:
    """A reservation of the matrix's device, told apart by its selector."""
    expression = {"key": "matrix", "operator": "NotIn", "values": [tag]}
    return {"class": "simboard", "selector": {"match_expressions": [expression]}, "for_s": 60}


def _spec(tag: str) -> dict[str, Any]:
    return {"name": f"matrix-{tag}", "labels": {"matrix": tag}, "backend": {"kind": "noop"}}


def _group(tag: str) -> dict[str, Any]:
    """A job group of two roles, its jobs tagged as a single job's are."""
    return {"name": f"matrix-{tag}", "roles": [{"role": r, "spec": _spec(tag)} for r in "ab"]}


def _register_supervisor(switchboard: Switchboard, token: str) -> None:
    """Make the switchboard know SUPERVISOR_ID: connect, say hello, go away."""

    async def handshake() -> None:
        async with websockets.connect(
            f"{switchboard.ws_url}/ws/supervisor",
            additional_headers={"Authorization": f"Bearer {token}"},
            subprotocols=[websockets.Subprotocol(limits.SUBPROTOCOL)],
        ) as ws:
            hello = Hello(
                supervisor_id=SUPERVISOR_ID,
                name=SUPERVISOR_ID,
                versions=supported_versions(),
                devices=[DeviceInfo(id=DEVICE_ID, class_="simboard")],
            )
            await ws.send(codec.encode(hello), text=True)
            reply = codec.decode_from_switchboard(await ws.recv(decode=False))
            assert isinstance(reply, Welcome)

    asyncio.run(handshake())


def _bogus_token() -> str:
    # Well formed, so it gets as far as the lookup.
    return "sbt_" + secrets.token_urlsafe(32)


@pytest.fixture(scope="module")
def world(switchboard: Switchboard) -> Iterator[World]:
    timeout = scaled(30)
    admin = switchboard.client(switchboard.admin_token)
    tokens: dict[str, str | None] = {
        NO_TOKEN: None,
        BOGUS_TOKEN: _bogus_token(),
        ADMIN: switchboard.admin_token,
    }
    for role in ROLES[1:]:
        body = {"role": role, "name": f"matrix {role}"}
        if role == SUPERVISOR:
            # A host's credential (a registration token enrols only:
            # test_a_registration_token_fetches_no_artifact).
            body["supervisor_id"] = CREDENTIAL_ID
        made = admin.post("/api/v1/tokens", json=body)
        assert made.status_code == 201, made.text
        tokens[role] = made.json()["token"]
    clients = {
        caller: httpx.Client(
            base_url=switchboard.url,
            headers={"Authorization": f"Bearer {token}"} if token else {},
            timeout=timeout,
        )
        for caller, token in tokens.items()
    }
    admin.close()
    registrar = clients[ADMIN].post(
        "/api/v1/tokens", json={"role": SUPERVISOR, "supervisor_id": SUPERVISOR_ID}
    )
    _register_supervisor(switchboard, registrar.json()["token"])
    stored = clients[ADMIN].post("/api/v1/artifacts", content=b"matrix shared artifact")
    assert stored.status_code == 201, stored.text
    world = World(switchboard, clients, ended_job="", digest=stored.json()["digest"])
    world.ended_job = world.ended("shared")
    yield world
    for client in clients.values():
        client.close()


def _cells() -> Iterator[Any]:
    for method, template in EXPECTED:
        for caller in CALLERS:
            yield pytest.param(method, template, caller, id=f"{method} {template} [{caller}]")


def test_the_table_lists_exactly_the_routes_of_the_openapi_document(switchboard: Switchboard):
    response = httpx.get(f"{switchboard.url}/schema/openapi.json", timeout=scaled(30))
    assert response.status_code == 200
    documented = {
        (method.upper(), path)
        for path, operations in response.json()["paths"].items()
        for method in operations
        if method in {"get", "put", "post", "delete", "patch", "head", "options"}
    }
    assert documented - EXPECTED.keys() == set(), "routes missing from the role table"
    assert EXPECTED.keys() - documented == set(), "routes in the role table that don't exist"


@pytest.mark.parametrize(("method", "template", "caller"), list(_cells()))
def test_cell(world: World, method: str, template: str, caller: str):
    allowed = EXPECTED[method, template]
    tag = secrets.token_hex(4)
    call = world.call(method, template, tag)
    try:
        before = call.state() if call.state else None
        request = world.clients[caller].build_request(
            method,
            call.path,
            json=call.json,
            content=call.content,
            params=call.params,
            headers=call.headers,
        )
        # An endless stream (the live events) is judged by its head; others are read whole.
        response = world.clients[caller].send(request, stream=True)
        try:
            if response.status_code != 200 or template not in ENDLESS:
                response.read()
        finally:
            response.close()
        status = response.status_code
        body = response.text[:300] if response.is_stream_consumed else "(stream)"
        where = f"{method} {call.path} as {caller}: {status} {body}"
        assert status < 500, where
        if allowed == PUBLIC:
            assert status not in (401, 403), where
            return

        # A HEAD answer has no body: its status alone says it.
        def error() -> str | None:
            return response.json()["error"] if method != "HEAD" else None

        if caller in (NO_TOKEN, BOGUS_TOKEN):
            assert status == 401, where
            assert error() in ("unauthorized", None), where
        elif caller not in allowed:
            assert status == 403, where
            assert error() in ("forbidden", None), where
        else:
            assert status not in (401, 403), where
            # Proves the probe sees the effect, so that its silence on refusals means something.
            if call.state:
                assert call.state() != before, f"an allowed call changed nothing: {where}"
            return
        if call.state:
            assert call.state() == before, f"a refused call changed something: {where}"
    finally:
        for undo in call.cleanup:
            undo()


def _own_cells() -> Iterator[Any]:
    for (method, template), allowed in OWN_JOB.items():
        for role in sorted(allowed):
            yield pytest.param(method, template, role, id=f"{method} {template} [own {role}]")


@pytest.mark.parametrize(("method", "template", "role"), list(_own_cells()))
def test_own_job_cell(world: World, method: str, template: str, role: str):
    """A job its own token submitted: a submitter may cancel and delete it, like an
    operator (the refusals for another's job are the cells above)."""
    tag = secrets.token_hex(4)
    if method == "DELETE":
        job_id = world.ended(tag, by=role)
        response = world.clients[role].delete(template.replace("{job_id}", job_id))
        assert response.status_code == 204, response.text
        assert world.admin.get(f"/api/v1/jobs/{job_id}").status_code == 404
    else:
        job_id = world.submit(tag, by=role)
        response = world.clients[role].post(template.replace("{job_id}", job_id))
        assert response.status_code == 202, response.text
        assert world.admin.get(f"/api/v1/jobs/{job_id}").json()["phase"] == "canceled"


def test_another_tokens_job_is_refused_with_a_reason(world: World):
    job_id = world.submit(secrets.token_hex(4))
    refused = world.clients[SUBMITTER].post(f"/api/v1/jobs/{job_id}/cancel")
    assert refused.status_code == 403
    body = refused.json()
    assert body["error"] == "forbidden"
    assert "was submitted by token 'admin'" in body["message"]
    assert "may cancel only the jobs its own token submitted" in body["message"]
    # Reading it stays allowed to every viewer.
    for caller in (SUBMITTER, VIEWER):
        assert world.clients[caller].get(f"/api/v1/jobs/{job_id}").status_code == 200
    world.admin.post(f"/api/v1/jobs/{job_id}/cancel")


@pytest.mark.parametrize("path", SCHEMA_ROUTES)
@pytest.mark.parametrize("caller", [NO_TOKEN, BOGUS_TOKEN])
def test_the_api_description_needs_no_token(world: World, path: str, caller: str):
    response = world.clients[caller].get(path)
    assert response.status_code == 200, f"{path} as {caller}: {response.status_code}"


@pytest.mark.parametrize("caller", CALLERS)
async def test_only_supervisor_tokens_open_the_supervisor_socket(world: World, caller: str):
    """The WebSocket is not in the OpenAPI document; its rule is CONNECT, the supervisor
    role's alone. Any other token, like none, is refused at the upgrade with a 401."""
    token = world.clients[caller].headers.get("authorization")
    connect = websockets.connect(
        f"{world.switchboard.ws_url}/ws/supervisor",
        additional_headers={"Authorization": token} if token else {},
        subprotocols=[websockets.Subprotocol(limits.SUBPROTOCOL)],
        open_timeout=scaled(10),
    )
    if caller == SUPERVISOR:
        async with connect as ws:  # accepted; leaving before hello registers nothing
            assert ws.subprotocol == limits.SUBPROTOCOL
        return
    with pytest.raises(InvalidStatus) as refused:
        async with connect:
            pass
    assert refused.value.response.status_code == 401


@pytest.mark.parametrize("caller", CALLERS)
async def test_a_devices_console_is_for_operators_and_its_lease_holder(world: World, caller: str):
    """The console WebSocket (not in the OpenAPI document either): operators and admins
    get past the guard (to 409: the matrix's device declares no console), a submitter
    holding no lease on it, a viewer and a supervisor get 403, no token or a wrong one
    401. The lease holder's own cell is test_lab_console_e2e's."""
    token = world.clients[caller].headers.get("authorization")
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(
            f"{world.switchboard.ws_url}/api/v1/devices/{DEVICE_ID}/console",
            additional_headers={"Authorization": token} if token else {},
            open_timeout=scaled(10),
        ):
            pass
    expected = {ADMIN: 409, OPERATOR: 409, NO_TOKEN: 401, BOGUS_TOKEN: 401}.get(caller, 403)
    assert refused.value.response.status_code == expected, refused.value.response.body


def test_a_registration_token_fetches_no_artifact(world: World):
    """A registration token may be shared by a whole fleet: it enrols, and nothing else. The
    artifacts a host fetches take its own credential (the `supervisor` column above)."""
    made = world.admin.post("/api/v1/tokens", json={"role": SUPERVISOR, "name": "fleet"})
    assert made.status_code == 201 and made.json()["supervisor_id"] is None
    path = f"/api/v1/artifacts/{world.digest}"
    refused = httpx.get(
        world.switchboard.url + path,
        headers={"Authorization": f"Bearer {made.json()['token']}"},
        timeout=scaled(30),
    )
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"] == "forbidden"
    assert "a registration token only enrols supervisors" in refused.json()["message"]
    assert world.clients[SUPERVISOR].get(path).content == b"matrix shared artifact"


def test_a_revoked_token_is_refused_at_once(world: World):
    made = world.admin.post("/api/v1/tokens", json={"role": OPERATOR, "name": "short-lived"})
    assert made.status_code == 201
    token, token_id = made.json()["token"], made.json()["id"]
    with httpx.Client(
        base_url=world.switchboard.url,
        headers={"Authorization": f"Bearer {token}"},
        timeout=scaled(30),
    ) as holder:
        assert holder.get("/api/v1/dispatch").status_code == 200
        assert world.admin.delete(f"/api/v1/tokens/{token_id}").status_code == 204
        refused = holder.get("/api/v1/dispatch")
        assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
        assert holder.post("/api/v1/dispatch/pause").status_code == 401
    listed = {t["id"]: t for t in world.tokens()}
    assert listed[token_id]["revoked"] is True
    # Revoking again is fine; an unknown id is a 404.
    assert world.admin.delete(f"/api/v1/tokens/{token_id}").status_code == 204
    assert world.admin.delete("/api/v1/tokens/no-such-token").status_code == 404


def _stored_values(database: Path) -> Iterator[tuple[str, str, Any]]:
    """(table, column, value) of every cell of the database, read-only."""
    conn = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            cursor = conn.execute(f'SELECT * FROM "{table}"')  # names come from sqlite_master
            columns = [d[0] for d in cursor.description]
            for row in cursor:
                yield from ((table, col, value) for col, value in zip(columns, row, strict=True))
    finally:
        conn.close()


def test_secrets_are_shown_once_and_stored_only_as_hashes(world: World):
    made = world.admin.post("/api/v1/tokens", json={"role": VIEWER, "name": "shown-once"})
    assert made.status_code == 201
    created = made.json()
    secret = created["token"]
    assert secret.startswith("sbt_") and len(secret) == 4 + 43  # 32 random bytes, base64url
    digest = hashlib.sha256(secret.encode()).digest()

    listing = world.admin.get("/api/v1/tokens")
    assert listing.status_code == 200
    mine = [t for t in listing.json() if t["id"] == created["id"]]
    assert len(mine) == 1 and "token" not in mine[0]
    for shown in (secret, world.switchboard.admin_token, digest.hex()):
        assert shown not in listing.text

    # Every secret handed out so far: the bootstrap admin token (written by the CLI
    # straight into the database), REST-made ones, and this one.
    secrets_made = [secret, world.switchboard.admin_token]
    secrets_made += [
        c.headers["authorization"].removeprefix("Bearer ")
        for caller, c in world.clients.items()
        if caller in ROLES
    ]
    database = Settings(data_dir=world.switchboard.data_dir).database_path
    assert database.exists()
    values = list(_stored_values(database))
    hashes = [v for table, col, v in values if table == "tokens" and col == "hash"]
    for plain in secrets_made:
        assert hashlib.sha256(plain.encode()).digest() in hashes
        for table, column, value in values:
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            assert plain not in text, f"plaintext token in {table}.{column}"
    # Nor anywhere on disk (the WAL included), nor in the server's log.
    files = [p for p in world.switchboard.data_dir.rglob("*") if p.is_file()]
    files.append(world.switchboard.process.log_path)
    for path in files:
        raw = path.read_bytes()
        for plain in secrets_made:
            assert plain.encode() not in raw, f"plaintext token in {path}"
