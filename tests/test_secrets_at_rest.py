"""Secrets at rest, against real switchboard processes and their files on disk: secret
parameter values never reach the SQLite file, its WAL or its shared memory in clear; they
reach the program (a real WASI program prints them hex-encoded), every restart of it, and
a StartJob sent again to a reconnecting supervisor; they are gone from the store once the
job has ended; a switchboard started with the wrong key rejects such jobs with a clear
reason and sends nothing; the data dir is private (0700, files 0600), and an older data
dir is tightened and its clear-text secrets moved out."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import sqlite3
import stat
from pathlib import Path

import httpx
import msgspec
import pytest
import websockets

from protocol import codec, limits
from protocol.messages import Hello, RunRef, ServerHeartbeat, StartJob, Welcome
from protocol.spec import Concurrency, JobSpec, NoopBackend, Parameter
from protocol.versions import supported_versions
from switchboard.config import Settings
from switchboard.sealing import Keyring, SecretsUnreadable
from switchboard.secret_keys import SecretKeyError, parse_keys
from switchboard.store.schema import SchemaMismatch
from switchboard.store.sqlite import SQLiteStore
from tests.harness import (
    Switchboard,
    run_cli,
    scaled,
    start_supervisor,
    wait_connected,
    wait_for,
    wait_job,
)
from tests.scrape import sample_value, scrape
from tests.wasi import compile_c

pytestmark = [pytest.mark.process, pytest.mark.wasm]

#: Prints the API_KEY variable hex-encoded (so the output, which the store keeps, never
#: holds the value itself), sleeps argv[1] seconds, and fails (exit 1).
PRINT_KEY_HEX = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    const char *key = getenv("API_KEY");
    if (key == NULL) {
        printf("API_KEY unset\n");
        return 2;
    }
    printf("API_KEY hex=");
    for (const unsigned char *p = (const unsigned char *)key; *p; p++) printf("%02x", *p);
    printf("\n");
    fflush(stdout);
    sleep(atoi(argv[1]));
    return 1;
}
"""


def _secret() -> str:
    # Letters outside [0-9a-f]: the value can't appear inside a hex dump by chance.
    return f"hunter2-{secrets.token_hex(8)}-secret"


def _key_line() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def _write_key(path: Path, text: str) -> None:
    """A key file as the switchboard accepts one: private to its owner."""
    path.write_text(text)
    path.chmod(0o600)


def _holding(switchboard: Switchboard, needle: str) -> list[str]:
    """Every file of the data dir (the database, its WAL and shared memory included) and
    the server's logs that hold `needle`."""
    paths = [p for p in switchboard.data_dir.rglob("*") if p.is_file()]
    paths += switchboard.data_dir.parent.glob(f"{switchboard.data_dir.name}.*.log")
    return [str(p) for p in paths if needle.encode() in p.read_bytes()]


def _sealed_rows(switchboard: Switchboard, job_id: str) -> int:
    path = Settings(data_dir=switchboard.data_dir).database_path
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        (count,) = conn.execute(
            "SELECT count(*) FROM job_secrets WHERE job_id = ?", (job_id,)
        ).fetchone()
        return count
    finally:
        conn.close()


def _output(client: httpx.Client, job_id: str, attempt: int) -> str:
    response = client.get(
        f"/api/v1/jobs/{job_id}/output", params={"stream": "stdout", "attempt": attempt}
    )
    if response.status_code == 404:  # no such attempt yet
        return ""
    assert response.status_code == 200, response.text
    return response.text


def _submit(client: httpx.Client, spec: dict) -> str:
    response = client.post("/api/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def key_hex_module(switchboard: Switchboard, tmp_path_factory) -> str:
    wasm = compile_c(PRINT_KEY_HEX, tmp_path_factory.mktemp("wasm"), "print_key_hex")
    response = switchboard.client().post("/api/v1/artifacts", content=wasm.read_bytes())
    assert response.status_code == 201, response.text
    return response.json()["digest"]


def test_a_secret_is_sealed_on_disk_reaches_every_run_and_is_dropped_at_the_end(
    switchboard: Switchboard, key_hex_module: str, work_dir: Path
):
    client = switchboard.client()
    secret = _secret()
    job_id = _submit(
        client,
        {
            "name": "sealed",
            "backend": {"kind": "wasm", "module": key_hex_module, "args": [str(int(scaled(4)))]},
            "restart": {
                "policy": "on_failure",
                "max_restarts": 1,
                "backoff": {"first_s": 0.1, "jitter": "none"},
            },
            "parameters": {
                "API_KEY": {"value": secret, "secret": True},
                "MODE": {"value": "fast"},
            },
        },
    )
    # Queued, no supervisor yet: stored sealed.
    assert _holding(switchboard, secret) == []
    assert _sealed_rows(switchboard, job_id) == 1
    shown = f"API_KEY hex={secret.encode().hex()}"

    supervisor = start_supervisor(switchboard, work_dir, name="wasm-secrets", backend="wasm")
    try:
        wait_for(lambda: shown in _output(client, job_id, 1), "the first run's output", 60)
        # During the run: still sealed, and kept (a restart needs it).
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        assert job["phase"] == "running", job
        assert _holding(switchboard, secret) == []
        assert _sealed_rows(switchboard, job_id) == 1
        job = wait_job(client, job_id, timeout=120)
    finally:
        supervisor.stop()

    assert job["phase"] == "exhausted", job
    assert [run["attempt"] for run in job["runs"]] == [1, 2]
    for attempt in (1, 2):  # the restart got the value too
        assert shown in _output(client, job_id, attempt)
    assert job["spec"]["parameters"]["API_KEY"] == {"value": "********", "secret": True}
    assert job["spec"]["parameters"]["MODE"] == {"value": "fast"}
    # Ended: the sealed values are dropped, and the value is nowhere on disk or in the log.
    assert _sealed_rows(switchboard, job_id) == 0
    assert _holding(switchboard, secret) == []


def test_the_data_dir_is_private_and_the_key_lies_beside_it(
    switchboard: Switchboard, key_hex_module: str
):
    data_dir = switchboard.data_dir
    database = Settings(data_dir=data_dir).database_path
    for suffix in ("", "-wal", "-shm"):  # all three exist while the server runs
        path = database.with_name(database.name + suffix)
        assert _mode(path) == 0o600, path
    assert (data_dir / "artifacts" / "sha256" / key_hex_module.split(":")[1]).is_file()
    for root, _, files in os.walk(data_dir):
        assert _mode(Path(root)) == 0o700, root
        for name in files:
            assert _mode(Path(root) / name) == 0o600, Path(root) / name
    key_file = data_dir.parent / f"{data_dir.name}.key"
    assert _mode(key_file) == 0o600
    parse_keys(key_file.read_text(), str(key_file))  # one valid key
    assert f"made a new secret key in {key_file}" in switchboard.process.log()


def test_a_loose_data_dir_is_tightened_at_start(tmp_path: Path):
    server = Switchboard(tmp_path / "data")
    try:
        client = server.client()
        assert client.post("/api/v1/artifacts", content=b"\0asm\1\0\0\0").status_code == 201
        server.process.stop()
        loosened = 0
        for root, _, files in os.walk(server.data_dir):
            os.chmod(root, 0o755)
            for name in files:
                os.chmod(Path(root) / name, 0o644)
                loosened += 1
        assert loosened >= 2  # the database and the artifact at least
        server.restart()
        for root, _, files in os.walk(server.data_dir):
            assert _mode(Path(root)) == 0o700, root
            for name in files:
                assert _mode(Path(root) / name) == 0o600, Path(root) / name
        assert "entries tightened to 0700/0600" in server.process.log()
    finally:
        server.stop()


def test_the_token_bootstrap_makes_a_private_data_dir(tmp_path: Path):
    data_dir = tmp_path / "fresh"
    run_cli("-m", "switchboard", "token", "create", "--role", "admin", "--data-dir", str(data_dir))
    assert _mode(data_dir) == 0o700
    assert _mode(Settings(data_dir=data_dir).database_path) == 0o600


def test_a_job_sealed_with_another_key_is_rejected_when_placed(tmp_path: Path):
    first, second = tmp_path / "first.key", tmp_path / "second.key"
    _write_key(first, _key_line() + "\n")
    _write_key(second, _key_line() + "\n")
    server = Switchboard(tmp_path / "data", extra_args=("--secret-key-file", str(first)))
    supervisor = None
    try:
        client = server.client()
        secret = _secret()
        spec = {
            "name": "sealed-elsewhere",
            "backend": {"kind": "noop"},
            "parameters": {"API_KEY": {"value": secret, "secret": True}},
        }
        job_id = _submit(client, spec)  # no supervisor: it waits, sealed with the first key
        assert not (tmp_path / "data.key").exists()  # the key given is the key used
        server.restart(("--secret-key-file", str(second)))
        log = server.process.log()
        assert "1 jobs hold secret values sealed with a key this switchboard does not have" in log
        before = scrape(f"{server.url}/metrics")

        supervisor = start_supervisor(server, tmp_path, name="noop-1", backend="noop")
        job = wait_job(client, job_id)
        assert job["phase"] == "rejected", job
        assert job["runs"] == []  # nothing was sent
        assert job["reason"].startswith("not started: its secret values were sealed with key")
        assert "does not have" in job["reason"]
        events = client.get(f"/api/v1/jobs/{job_id}/events").json()
        assert "secrets_unreadable" in [e["kind"] for e in events]
        after = scrape(f"{server.url}/metrics")
        name = "switchboard_secrets_unreadable_total"
        assert (
            sample_value(after, name, via="placement") - sample_value(before, name, via="placement")
            == 1
        )
        assert server.process.log().count(f"job {job_id} rejected") == 1

        # A job submitted under the key in use runs.
        fresh = _submit(client, {**spec, "name": "sealed-here"})
        assert wait_job(client, fresh)["phase"] == "succeeded"
        assert _holding(server, secret) == []
    finally:
        if supervisor is not None:
            supervisor.stop()
        server.stop()


class _ScriptedSupervisor:
    """A supervisor that speaks the protocol itself: it takes StartJobs and reports
    nothing, so its runs stay `assigned` and are sent again when it reconnects."""

    def __init__(self, server: Switchboard, token: str) -> None:
        self.server = server
        self.token = token

    async def connect_and_collect(self, wait_s: float) -> list[StartJob]:
        """Connect, and collect StartJobs until `wait_s` has passed since the last one."""
        starts: list[StartJob] = []
        async with websockets.connect(
            f"{self.server.ws_url}/ws/supervisor",
            additional_headers={"Authorization": f"Bearer {self.token}"},
            subprotocols=[websockets.Subprotocol(limits.SUBPROTOCOL)],
        ) as ws:
            hello = Hello(
                supervisor_id="scripted",
                name="scripted",
                versions=supported_versions(),
                backends=["noop"],
            )
            await ws.send(codec.encode(hello), text=True)
            welcome = codec.decode_from_switchboard(await ws.recv(decode=False))
            assert isinstance(welcome, Welcome)
            with contextlib.suppress(TimeoutError):
                while True:
                    message = codec.decode_from_switchboard(
                        await asyncio.wait_for(ws.recv(), wait_s)
                    )
                    if isinstance(message, StartJob):
                        starts.append(message)
                    else:
                        assert isinstance(message, ServerHeartbeat), message
        return starts


def test_a_start_sent_again_after_a_restart_carries_the_secret_through_a_key_rotation(
    tmp_path: Path,
):
    key_file = tmp_path / "secret.key"
    old, new, wrong = _key_line(), _key_line(), _key_line()
    _write_key(key_file, old + "\n")
    server = Switchboard(tmp_path / "data", extra_args=("--secret-key-file", str(key_file)))
    try:
        client = server.client()
        scripted = _ScriptedSupervisor(
            server, server.create_token("supervisor", supervisor_id="scripted")
        )
        secret = _secret()
        job_id = None

        def starts(wait_s: float = 2.0) -> list[StartJob]:
            return asyncio.run(scripted.connect_and_collect(scaled(wait_s)))

        async def submit_while_connected() -> list[StartJob]:
            collecting = asyncio.create_task(scripted.connect_and_collect(scaled(3)))
            await asyncio.to_thread(wait_connected, client, "scripted")
            nonlocal job_id
            job_id = await asyncio.to_thread(
                _submit,
                client,
                {
                    "name": "rotated",
                    "backend": {"kind": "noop"},
                    "parameters": {"API_KEY": {"value": secret, "secret": True}},
                },
            )
            return await collecting

        def assert_started_with_secret(got: list[StartJob]) -> None:
            assert [(s.job_id, s.attempt) for s in got] == [(job_id, 1)]
            assert got[0].parameters["API_KEY"] == Parameter(value=secret, secret=True)

        assert_started_with_secret(asyncio.run(submit_while_connected()))
        assert client.get(f"/api/v1/jobs/{job_id}").json()["phase"] == "assigned"

        # Rotation: the new key first, the old one after it. The stored values are
        # sealed again with the new key at start, and the StartJob sent again has them.
        _write_key(key_file, f"{new}\n{old}\n")
        server.restart()
        assert "sealed the secret values of 1 jobs again with the current key" in (
            server.process.log()
        )
        assert_started_with_secret(starts())
        # The old key retired: nothing needs it any more.
        _write_key(key_file, new + "\n")
        server.restart()
        assert_started_with_secret(starts())
        assert _holding(server, secret) == []

        # The wrong key: nothing is sent, the run is rejected with the reason.
        _write_key(key_file, wrong + "\n")
        server.restart()
        before = scrape(f"{server.url}/metrics")
        assert starts() == []
        job = wait_job(client, job_id)
        assert job["phase"] == "rejected", job
        assert job["runs"][0]["phase"] == "rejected"
        assert "not started: its secret values were sealed with key" in job["reason"]
        after = scrape(f"{server.url}/metrics")
        name = "switchboard_secrets_unreadable_total"
        assert (
            sample_value(after, name, via="reconcile") - sample_value(before, name, via="reconcile")
            == 1
        )
        assert _sealed_rows(server, job_id) == 0
    finally:
        server.stop()


def test_the_key_can_come_from_the_environment_and_bad_keys_stop_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    data_dir = tmp_path / "data"
    serve = ("-m", "switchboard", "serve", "--port", "0", "--data-dir", str(data_dir))
    bad = tmp_path / "bad.key"
    # A key cut short by one character: the message names where it is, and shows none of it.
    almost = "Zq9Z" + _key_line()[4:-1]
    _write_key(bad, f"# keys\n{_key_line()}\n{almost}\n")
    done = run_cli(*serve, "--secret-key-file", str(bad), check=False, timeout=60)
    assert done.returncode != 0
    assert f"switchboard: {bad}: key 2 (line 3) is not a key" in done.stderr.decode()
    assert "Zq9Z" not in done.stderr.decode()

    # A key file other users may read is refused, as token files are.
    loose = tmp_path / "loose.key"
    loose.write_text(_key_line() + "\n")
    loose.chmod(0o644)
    done = run_cli(*serve, "--secret-key-file", str(loose), check=False, timeout=60)
    assert done.returncode != 0
    assert f"may be read or changed by other users (mode 0644): chmod 600 {loose}" in (
        done.stderr.decode()
    )

    monkeypatch.setenv("SWITCHBOARD_SECRET_KEY", _key_line())
    done = run_cli(*serve, "--secret-key-file", str(bad), check=False, timeout=60)
    assert done.returncode != 0
    assert "give SWITCHBOARD_SECRET_KEY or --secret-key-file, not both" in done.stderr.decode()

    server = Switchboard(data_dir)  # the key from the environment alone
    try:
        assert not (tmp_path / "data.key").exists()
        assert "sealed with the key in SWITCHBOARD_SECRET_KEY" in server.process.log()
    finally:
        server.stop()


# --- the store, on its own file ----------------------------------------------------------

SPEC = JobSpec(
    name="legacy",
    backend=NoopBackend(),
    parameters={"API_KEY": Parameter("s3cret-legacy-value", secret=True), "MODE": Parameter("x")},
)


def _make_version_3(path: Path, queued: str, ended: str) -> None:
    """Turn a database into one as version 3 left it: secret values in the specs."""
    conn = sqlite3.connect(path)
    plain = msgspec.json.encode(SPEC)
    assert b"s3cret-legacy-value" in plain
    conn.execute("UPDATE jobs SET spec = ? WHERE id IN (?, ?)", (plain, queued, ended))
    conn.executescript(
        "DROP TRIGGER job_secrets_dropped_at_end; DROP TRIGGER job_secrets_dropped_with_job;"
        " DROP TABLE job_secrets; PRAGMA user_version = 3;"
    )
    conn.commit()
    conn.close()


async def test_a_version_3_database_has_its_secrets_sealed_at_upgrade(tmp_path: Path):
    path = tmp_path / "data" / "switchboard.sqlite3"
    store = SQLiteStore(path)
    await store.open()
    await store.create_job("queued", SPEC)
    await store.create_job("ended", SPEC)
    await store.request_cancel("ended")
    await store.close()
    _make_version_3(path, "queued", "ended")

    # No key: the queued job's value can't be sealed.
    with pytest.raises(SchemaMismatch, match="upgrade it with `switchboard db upgrade`"):
        await SQLiteStore(path, upgrade=True).open()

    keyring = Keyring.ephemeral()
    upgraded = SQLiteStore(path, keyring=keyring, upgrade=True)
    await upgraded.open()
    try:
        copies = [name for name in os.listdir(path.parent) if name.endswith(".bak")]
        assert copies  # made before each try: the database as it was, the value in clear
        for name in os.listdir(path.parent):
            held = b"s3cret-legacy-value" in (path.parent / name).read_bytes()
            assert held == (name in copies), name
        for job_id in ("queued", "ended"):
            stored = (await upgraded.get_job(job_id)).spec.parameters
            assert stored["API_KEY"] == Parameter("********", secret=True)
            assert stored["MODE"] == Parameter("x")
        (assigned,) = await upgraded.assign([("queued", "host-1")])
        assert assigned.spec.parameters["API_KEY"] == Parameter("s3cret-legacy-value", True)
    finally:
        await upgraded.close()


def _sealed_ids(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {row[0] for row in conn.execute("SELECT job_id FROM job_secrets")}
    finally:
        conn.close()


async def test_the_store_keeps_sealed_values_only_while_a_job_may_still_run(tmp_path: Path):
    path = tmp_path / "data" / "switchboard.sqlite3"
    store = SQLiteStore(path, keyring=Keyring.ephemeral())
    await store.open()
    try:
        keyed = msgspec.structs.replace(SPEC, concurrency=Concurrency(key="rack", policy="queue"))
        dropped = msgspec.structs.replace(
            SPEC, concurrency=Concurrency(key="rack", policy="drop_if_running")
        )
        await store.create_job("holder", keyed)
        await store.create_job("canceled", SPEC)
        await store.create_job("plain", msgspec.structs.replace(SPEC, parameters={}))
        assert (await store.create_job("dropped", dropped)).phase == "rejected"
        assert _sealed_ids(path) == {"holder", "canceled"}  # a job dropped at once needs none
        await store.request_cancel("canceled")
        assert _sealed_ids(path) == {"holder"}
        (run,) = await store.assign([("holder", "host-1")])
        assert run.spec.parameters["API_KEY"].value == "s3cret-legacy-value"
        assert _sealed_ids(path) == {"holder"}  # its run may need a StartJob again
        await store.end_run(RunRef("holder", 1), "succeeded", "done")
        assert _sealed_ids(path) == set()
    finally:
        await store.close()


# --- sealing ------------------------------------------------------------------------------


def test_a_sealed_blob_opens_only_for_its_job_and_with_a_key_of_the_ring():
    old, new = Keyring.ephemeral(), Keyring.ephemeral()
    blob = old.seal("job-1", {"API_KEY": "a-value-to-hide"})
    assert b"a-value-to-hide" not in blob
    with pytest.raises(SecretsUnreadable, match="damaged"):
        old.unseal("job-2", blob)  # copied onto another job
    with pytest.raises(SecretsUnreadable, match="damaged"):
        old.unseal("job-1", blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(SecretsUnreadable, match="does not have"):
        new.unseal("job-1", blob)
    old_key = _key_line()
    rotated = Keyring(parse_keys(f"{_key_line()}\n{old_key}  # retired\n", "keys"))
    sealed_before = Keyring(parse_keys(old_key, "keys")).seal("job-1", {"API_KEY": "v"})
    assert rotated.unseal("job-1", sealed_before) == {"API_KEY": "v"}
    with pytest.raises(SecretKeyError, match="holds no key"):
        parse_keys("# nothing\n", "empty.key")
