"""Host identity over real processes and sockets: a registration token (a supervisor token
bound to no id) enrols new supervisor ids, each of which then connects only with the
credential it made and keeps; nothing else can claim an enrolled id until an admin
releases it."""

from __future__ import annotations

import asyncio
import stat
import sys
import time
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from protocol import codec
from protocol.exceptions import CloseCode
from protocol.messages import Hello
from protocol.tokens import new_token, token_sha256
from protocol.versions import supported_versions
from tests.faults import FaultyProxy
from tests.harness import (
    Switchboard,
    run_cli,
    scaled,
    start_supervisor,
    token_file_for,
    wait_connected,
    wait_for,
    wait_job,
    wait_running,
)
from tests.scrape import sample_value, scrape
from tests.supervisor_ws import closed_with, connect_ws

pytestmark = pytest.mark.process

ENROLLED = "switchboard_supervisor_enrolments_total"
REFUSED = "switchboard_supervisor_refusals_total"


def _credential_dir(work: Path, name: str) -> Path:
    return work / name / "credentials"


def _supervisor(switchboard: Switchboard, supervisor_id: str) -> dict:
    return switchboard.client().get(f"/api/v1/supervisors/{supervisor_id}").json()


def _bound_tokens(switchboard: Switchboard, supervisor_id: str) -> list[dict]:
    tokens = switchboard.client().get("/api/v1/tokens").json()
    return [t for t in tokens if t["supervisor_id"] == supervisor_id]


def _metric(switchboard: Switchboard, name: str, **labels: str) -> float:
    return sample_value(scrape(f"{switchboard.url}/metrics"), name, **labels)


async def _hello_as(switchboard: Switchboard, token: str, hello: Hello):
    """Connect with `token`, say `hello`; the close code, reason and every frame received."""
    async with connect_ws(switchboard, token) as ws:
        await ws.send(codec.encode(hello), text=True)
        return await asyncio.wait_for(closed_with(ws), scaled(10))


def _impostor_hello(supervisor_id: str, *, digest: bool) -> Hello:
    """What a stranger would say to be `supervisor_id`: holding no run (so the real host's
    runs would be ended as lost), offering a credential of its own if `digest`."""
    return Hello(
        supervisor_id=supervisor_id,
        name=supervisor_id,
        versions=supported_versions(),
        backends=["noop"],
        runs=[],
        credential_sha256=token_sha256(new_token()).hex() if digest else None,
    )


def _exits_refused(process, timeout: float = 30) -> str:
    """Wait for a supervisor process to give up; its log."""
    process.proc.wait(scaled(timeout))
    assert process.proc.returncode == 2, process.log()
    return process.log()


def test_a_registration_token_cannot_take_over_an_enrolled_host(switchboard, work_dir):
    client = switchboard.client()
    host = start_supervisor(
        switchboard, work_dir, name="host-a", backend="noop", labels={"only": "host-a"}
    )
    try:
        wait_connected(client, "host-a")
        secret_job = {
            "name": "long",
            "backend": {"kind": "noop", "delay_s": 600},
            "selector": {"match_labels": {"only": "host-a"}},
            "parameters": {"API_KEY": {"value": "s3cret", "secret": True}},
        }
        long_job = client.post("/api/v1/jobs", json=secret_job).json()["id"]
        wait_running(client, long_job)
        session = _supervisor(switchboard, "host-a")["session"]
        enrolled = _bound_tokens(switchboard, "host-a")
        assert [t["revoked"] for t in enrolled] == [False]
        refused_before = {
            why: _metric(switchboard, REFUSED, reason=why)
            for why in ("enrolled", "no_credential_digest")
        }

        # The host's own registration token, and any other one: neither can be host-a.
        registration = (work_dir / "host-a.registration").read_text().strip()
        for token in (registration, switchboard.create_token("supervisor")):
            code, reason, frames = asyncio.run(
                _hello_as(switchboard, token, _impostor_hello("host-a", digest=True))
            )
            assert code == CloseCode.UNAUTHORIZED
            assert [f["type"] for f in frames] == ["protocol_error"]  # no welcome, no job
            said = frames[0]["reason"]
            assert "'host-a' is enrolled" in said
            assert "switchboard supervisor unenroll host-a" in said
            assert reason  # the close frame carries the (cut) reason too
            # An old-style hello (no credential digest) is refused as well, saying why.
            code, _, frames = asyncio.run(
                _hello_as(switchboard, token, _impostor_hello("host-a", digest=False))
            )
            assert code == CloseCode.UNAUTHORIZED
            assert "credential_sha256" in frames[0]["reason"]

        # The real host never noticed: same session, its run goes on, it takes new jobs.
        assert host.proc.poll() is None
        now = _supervisor(switchboard, "host-a")
        assert now["connected"] and now["session"] == session
        assert client.get(f"/api/v1/jobs/{long_job}").json()["phase"] == "running"
        quick = client.post(
            "/api/v1/jobs",
            json={
                "name": "quick",
                "backend": {"kind": "noop", "output": "mine\n"},
                "selector": {"match_labels": {"only": "host-a"}},
            },
        ).json()["id"]
        job = wait_job(client, quick)
        assert job["phase"] == "succeeded"
        assert job["runs"][-1]["supervisor_id"] == "host-a"
        assert _bound_tokens(switchboard, "host-a") == enrolled  # nothing was enrolled
        for why, before in refused_before.items():
            assert _metric(switchboard, REFUSED, reason=why) == before + 2
        log = switchboard.process.log_path.read_text()
        assert log.count("supervisor host-a refused") == 4
    finally:
        client.post(f"/api/v1/jobs/{long_job}/cancel")
        host.stop()


def test_a_fleet_enrols_with_one_registration_token(switchboard, work_dir, tmp_path):
    client = switchboard.client()
    made = client.post("/api/v1/tokens", json={"role": "supervisor", "name": "fleet"}).json()
    token_file = token_file_for(tmp_path / "fleet.token", made["token"])
    names = ["fleet-1", "fleet-2", "fleet-3"]
    enrolments = _metric(switchboard, ENROLLED)

    def start_all() -> list:
        return [
            start_supervisor(
                switchboard, work_dir, name=name, backend="noop", token_file=token_file
            )
            for name in names
        ]

    hosts = start_all()
    try:
        for name in names:
            wait_connected(client, name)
    finally:
        for host in hosts:
            host.stop()
    credentials = {}
    for name in names:
        directory = _credential_dir(work_dir, name)
        kept = directory / f"{name}.token"
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600
        assert not (directory / f"{name}.new").exists()
        credentials[name] = kept.read_text().strip()
        (token,) = _bound_tokens(switchboard, name)
        assert token["name"] == f"enrolled with fleet ({made['id']})"
        assert not token["revoked"]
    assert len(set(credentials.values())) == len(names)  # each host made its own
    assert made["token"] not in credentials.values()
    assert _metric(switchboard, ENROLLED) == enrolments + len(names)

    # Revoking the registration token leaves the credentials enrolled with it working.
    assert client.delete(f"/api/v1/tokens/{made['id']}").status_code == 204
    sessions = {name: _supervisor(switchboard, name)["session"] for name in names}
    hosts = start_all()
    try:
        for name in names:
            wait_for(
                lambda name=name: (
                    _supervisor(switchboard, name)["session"] > sessions[name]
                    and _supervisor(switchboard, name)["connected"]
                ),
                f"{name} to reconnect with its credential",
            )
            assert [t["revoked"] for t in _bound_tokens(switchboard, name)] == [False]
            assert (_credential_dir(work_dir, name) / f"{name}.token").read_text().strip() == (
                credentials[name]
            )
    finally:
        for host in hosts:
            host.stop()
    assert _metric(switchboard, ENROLLED) == enrolments + len(names)


def test_revoking_a_registration_token_leaves_its_enrolments_working(
    switchboard, work_dir, tmp_path
):
    """Its sessions are closed (as for any revoked token); the hosts enrolled with it come
    back with their own credentials, and nothing new can enrol with it."""
    client = switchboard.client()
    made = client.post("/api/v1/tokens", json={"role": "supervisor", "name": "short"}).json()
    registration = made["token"]
    token_file = token_file_for(tmp_path / "short.token", registration)
    host = start_supervisor(
        switchboard, work_dir, name="outlives", backend="noop", token_file=token_file
    )
    try:
        wait_connected(client, "outlives")
        session = _supervisor(switchboard, "outlives")["session"]
        assert session == 1  # the enrolment's own session, standing on the registration token
        assert client.delete(f"/api/v1/tokens/{made['id']}").status_code == 204
        wait_for(
            lambda: (
                _supervisor(switchboard, "outlives")["session"] > session
                and _supervisor(switchboard, "outlives")["connected"]
            ),
            "the host to come back with its credential",
        )
        assert [t["revoked"] for t in _bound_tokens(switchboard, "outlives")] == [False]
        with pytest.raises(InvalidStatus) as refused:
            asyncio.run(
                _hello_as(switchboard, registration, _impostor_hello("newcomer", digest=True))
            )
        assert refused.value.response.status_code == 401
    finally:
        host.stop()


def test_hosts_racing_to_enrol_one_id_cannot_both_win(switchboard):
    """Enrolment is decided in the transaction that accepts the connection."""
    token = switchboard.create_token("supervisor")

    async def enrol() -> str:
        async with connect_ws(switchboard, token) as ws:
            await ws.send(codec.encode(_impostor_hello("contested", digest=True)), text=True)
            first = codec.decode_from_switchboard(await ws.recv(decode=False))
            return type(first).__name__

    async def race() -> list[str]:
        return await asyncio.gather(*(enrol() for _ in range(8)))

    outcomes = asyncio.run(race())
    assert sorted(outcomes) == ["ProtocolErrorMessage"] * 7 + ["Welcome"]
    assert [t["revoked"] for t in _bound_tokens(switchboard, "contested")] == [False]


def test_a_welcome_lost_right_after_enrolment_costs_nothing(switchboard, work_dir):
    proxy = FaultyProxy(switchboard.port)
    proxy.cut_next_reply()
    refusals = _metric(switchboard, REFUSED, reason="enrolled")
    enrolments = _metric(switchboard, ENROLLED)
    host = start_supervisor(
        switchboard,
        work_dir,
        name="cut-early",
        backend="noop",
        url=f"ws://127.0.0.1:{proxy.port}",
    )
    try:
        # The first session is seen connected until the cut is noticed: wait for the
        # second one, through the proxy's second connection.
        wait_for(
            lambda: (
                (sup := _supervisor(switchboard, "cut-early")).get("session") == 2
                and sup.get("connected")
            ),
            "the supervisor's second session",
        )
        assert proxy.cuts == 1 and proxy.accepted == 2  # the enrolment, then one more
        (credential,) = _bound_tokens(switchboard, "cut-early")
        assert not credential["revoked"]
        kept = _credential_dir(work_dir, "cut-early") / "cut-early.token"
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600
        # The retry presented the credential itself: no refused enrolment on the way.
        assert _metric(switchboard, REFUSED, reason="enrolled") == refusals
        assert _metric(switchboard, ENROLLED) == enrolments + 1
        assert _supervisor(switchboard, "cut-early")["session"] == 2
    finally:
        host.stop()
        proxy.close()


def test_unenroll_releases_the_id_for_a_new_enrolment(switchboard, work_dir, tmp_path):
    client = switchboard.client()
    original = start_supervisor(switchboard, work_dir, name="reimaged", backend="noop")
    wait_connected(client, "reimaged")
    original.stop()
    (old_credential,) = _bound_tokens(switchboard, "reimaged")

    # The host comes back re-imaged: no credential in its (new) work dir.
    fresh_work = tmp_path / "after-reimage"
    refused = start_supervisor(switchboard, fresh_work, name="reimaged", backend="noop")
    log = _exits_refused(refused)
    assert "'reimaged' is enrolled" in log and "unenroll reimaged" in log

    admin = token_file_for(tmp_path / "admin.token", switchboard.admin_token)
    released = run_cli(
        *("-m", "switchboard", "supervisor", "unenroll", "reimaged"),
        *("--url", switchboard.url, "--token-file", str(admin)),
    )
    assert b"released" in released.stdout and old_credential["id"].encode() in released.stdout

    again = start_supervisor(switchboard, fresh_work, name="reimaged", backend="noop")
    try:
        wait_connected(client, "reimaged")
        tokens = {t["id"]: t["revoked"] for t in _bound_tokens(switchboard, "reimaged")}
        assert tokens.pop(old_credential["id"]) is True
        assert list(tokens.values()) == [False]  # the new credential
        # The old host's credential is dead, and the id is taken again: it gives up.
        stale = start_supervisor(switchboard, work_dir, name="reimaged", backend="noop")
        log = _exits_refused(stale)
        assert "'reimaged' is enrolled" in log
        assert _supervisor(switchboard, "reimaged")["connected"]
    finally:
        again.stop()


def test_unenroll_of_a_connected_host_makes_it_enrol_again(switchboard, work_dir):
    client = switchboard.client()
    host = start_supervisor(switchboard, work_dir, name="released", backend="noop")
    try:
        wait_connected(client, "released")
        (first,) = _bound_tokens(switchboard, "released")
        session = _supervisor(switchboard, "released")["session"]
        answer = client.post("/api/v1/supervisors/released/unenroll")
        assert answer.status_code == 200
        assert answer.json() == {"supervisor_id": "released", "revoked": [first["id"]]}
        # Its session is closed (4401); it still holds its registration token: it enrols
        # again with a new credential of its own.
        wait_for(
            lambda: (
                _supervisor(switchboard, "released")["session"] > session
                and _supervisor(switchboard, "released")["connected"]
            ),
            "the released host to enrol again",
        )
        tokens = _bound_tokens(switchboard, "released")
        assert (tokens[0]["id"], tokens[0]["revoked"]) == (first["id"], True)
        assert [t["revoked"] for t in tokens[1:]] == [False]
        assert client.post("/api/v1/supervisors/nobody-at-all/unenroll").status_code == 404
    finally:
        host.stop()


def test_rotate_token_locks_out_all_but_the_new_token(switchboard, work_dir, tmp_path):
    client = switchboard.client()
    host = start_supervisor(switchboard, work_dir, name="rotated", backend="noop")
    wait_connected(client, "rotated")
    rotated = client.post("/api/v1/supervisors/rotated/token").json()
    # Its enrolled credential is revoked: it can't enrol again (the id has the new token).
    log = _exits_refused(host)
    assert "'rotated' is enrolled" in log
    registration = (work_dir / "rotated.registration").read_text().strip()
    code, _, frames = asyncio.run(
        _hello_as(switchboard, registration, _impostor_hello("rotated", digest=True))
    )
    assert code == CloseCode.UNAUTHORIZED and "is enrolled" in frames[0]["reason"]
    # Given the rotated token, the host connects with it (and nothing else is enrolled).
    token_file = token_file_for(tmp_path / "rotated.token", rotated["token"])
    host = start_supervisor(
        switchboard, work_dir, name="rotated", backend="noop", token_file=token_file
    )
    try:
        wait_connected(client, "rotated")
        tokens = _bound_tokens(switchboard, "rotated")
        assert [t["id"] for t in tokens if not t["revoked"]] == [rotated["id"]]
        directory = _credential_dir(work_dir, "rotated")
        assert sorted(p.name for p in directory.iterdir()) == []
    finally:
        host.stop()


def test_a_registration_token_without_a_credential_digest_enrols_nothing(switchboard):
    token = switchboard.create_token("supervisor")
    before = _metric(switchboard, REFUSED, reason="no_credential_digest")
    code, _, frames = asyncio.run(
        _hello_as(switchboard, token, _impostor_hello("old-style", digest=False))
    )
    assert code == CloseCode.UNAUTHORIZED
    assert [f["type"] for f in frames] == ["protocol_error"]
    assert "registration token" in frames[0]["reason"]
    assert "credential_sha256" in frames[0]["reason"]
    assert _metric(switchboard, REFUSED, reason="no_credential_digest") == before + 1
    assert switchboard.client().get("/api/v1/supervisors/old-style").status_code == 404
    assert _bound_tokens(switchboard, "old-style") == []


def test_a_kept_credential_others_may_read_is_refused(switchboard, work_dir):
    host = start_supervisor(switchboard, work_dir, name="careless", backend="noop")
    wait_connected(switchboard.client(), "careless")
    host.stop()
    kept = _credential_dir(work_dir, "careless") / "careless.token"
    kept.chmod(0o644)
    again = start_supervisor(switchboard, work_dir, name="careless", backend="noop")
    again.proc.wait(scaled(30))
    assert again.proc.returncode != 0
    assert "chmod 600" in again.log() and str(kept) in again.log()


@pytest.mark.parametrize("mode", [0o640, 0o604])
def test_a_token_file_others_may_read_is_refused(switchboard, tmp_path, mode):
    token_file = token_file_for(tmp_path / "loose.token", switchboard.create_token("supervisor"))
    token_file.chmod(mode)
    started = time.monotonic()
    done = run_cli(
        *("-m", "supervisor", "run", "--switchboard", switchboard.ws_url, "--name", "loose"),
        *("--token-file", str(token_file), "--backend", "noop"),
        *("--work-dir", str(tmp_path / "w")),
        check=False,
        timeout=scaled(30),
    )
    assert done.returncode != 0
    assert f"{token_file} may be read or changed by others" in done.stderr.decode()
    assert "chmod 600" in done.stderr.decode()
    assert time.monotonic() - started < scaled(30)
    assert switchboard.client().get("/api/v1/supervisors/loose").status_code == 404


def test_the_token_is_not_on_the_command_line(switchboard, work_dir):
    """`ps` shows every process's command line to every user: with --token-file, the
    token is not in it."""
    host = start_supervisor(switchboard, work_dir, name="quiet", backend="noop")
    try:
        wait_connected(switchboard.client(), "quiet")
        if not sys.platform.startswith("linux"):
            raise AssertionError("this test reads /proc")
        cmdline = Path(f"/proc/{host.proc.pid}/cmdline").read_bytes()
        assert b"--token-file" in cmdline
        assert b"sbt_" not in cmdline
    finally:
        host.stop()


def test_a_flood_of_bad_supervisor_tokens_is_logged_once(tmp_path):
    # Anyone who reaches the port can try tokens: each refusal is counted, but the log
    # says it once per interval, not once per attempt.
    server = Switchboard(tmp_path / "data")
    attempts = 20

    async def knock() -> None:
        for _ in range(attempts):
            with pytest.raises(InvalidStatus) as refused:
                async with connect_ws(server, new_token()):
                    pass
            assert refused.value.response.status_code == 401

    try:
        before = _metric(server, REFUSED, reason="unauthorized")
        asyncio.run(knock())
        assert _metric(server, REFUSED, reason="unauthorized") == before + attempts
        log = server.process.log_path.read_text()
        assert log.count("supervisor connection refused: no valid supervisor token") == 1
    finally:
        server.stop()
