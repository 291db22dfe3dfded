"""Job inputs end to end: a real switchboard, real supervisors. A WASI program compiled
from C reads its inputs (a file, a member of an unpacked archive) from /in and cannot write
there; a job naming an input that was never uploaded is refused at submission; a hostile
archive fails its run; a supervisor that speaks only protocol 1.2 is never sent a job with
inputs (it would ignore them), the job says why it waits, and its input can't be deleted
meanwhile; a run placed on a 1.3 supervisor that comes back speaking 1.2 is not sent again
but ends rejected, saying why."""

from __future__ import annotations

import asyncio
import io
import tarfile
import time

import pytest

from protocol import codec
from protocol.messages import Hello, StartJob, Welcome
from protocol.tokens import new_token, token_sha256
from tests.harness import Switchboard, start_supervisor, wait_connected, wait_for, wait_job
from tests.supervisor_ws import connect_ws
from tests.wasi import compile_c

pytestmark = pytest.mark.process

#: Prints its inputs, then tries to change /in and says how that went.
READ_INPUTS = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void cat(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) { printf("cannot open %s: %s\n", path, strerror(errno)); return; }
    char buf[256];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) fwrite(buf, 1, n, stdout);
    fclose(f);
}

int main(void) {
    cat("/in/data.txt");
    cat("/in/suite/cases/one.txt");
    FILE *w = fopen("/in/data.txt", "w");
    if (w) { printf("WROTE data.txt\n"); fclose(w); }
    else printf("write data.txt: %s\n", strerror(errno));
    int fd = open("/in/new.txt", O_WRONLY | O_CREAT, 0644);
    if (fd >= 0) { printf("CREATED new.txt\n"); close(fd); }
    else printf("create new.txt: %s\n", strerror(errno));
    return 0;
}
"""


def tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def upload(switchboard: Switchboard, data: bytes) -> str:
    response = switchboard.client().post("/api/v1/artifacts", content=data)
    assert response.status_code == 201, response.text
    return response.json()["digest"]


def submit(switchboard: Switchboard, spec: dict) -> str:
    response = switchboard.client().post("/api/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def stdout_of(switchboard: Switchboard, job_id: str) -> str:
    response = switchboard.client().get(
        f"/api/v1/jobs/{job_id}/output", params={"stream": "stdout"}
    )
    return response.content.decode()


@pytest.mark.wasm
def test_a_wasm_guest_reads_its_inputs_and_cannot_change_them(switchboard, work_dir, tmp_path):
    client = switchboard.client()
    module = upload(switchboard, compile_c(READ_INPUTS, tmp_path, "read_inputs").read_bytes())
    data = upload(switchboard, b"hello from an input\n")
    suite = upload(switchboard, tar_of({"cases/one.txt": b"case one, unpacked\n"}))
    sup = start_supervisor(switchboard, work_dir, name="wasm-in", backend="wasm")
    try:
        wait_connected(client, "wasm-in")
        spec = {
            "name": "reads-inputs",
            "backend": {"kind": "wasm", "module": module},
            "inputs": {"data.txt": data, "suite/": suite},
        }
        job = wait_job(client, submit(switchboard, spec), timeout=120)
        out = stdout_of(switchboard, job["id"])
        assert job["phase"] == "succeeded", (job, out)
        assert "hello from an input\n" in out and "case one, unpacked\n" in out, out
        assert "WROTE" not in out and "CREATED" not in out, out
        assert "write data.txt: Operation not permitted" in out, out
        assert "create new.txt: Operation not permitted" in out, out
        stages = [(p["stage"], p["message"]) for p in job["runs"][0]["phases"]]
        assert ("fetching", "2 input(s)") in stages, stages
        # The run's directory, inputs and all, is gone once it ended.
        assert not list((work_dir / "runs").glob(f"{job['id']}.*"))
    finally:
        sup.stop()


def test_an_input_that_was_never_uploaded_is_refused_at_submission(switchboard):
    missing = "sha256:" + "e" * 64
    spec = {"name": "x", "backend": {"kind": "noop"}, "inputs": {"fw.bin": missing}}
    response = switchboard.client().post("/api/v1/jobs", json=spec)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["field"] == "inputs['fw.bin']", body
    assert missing in body["message"] and "not been uploaded" in body["message"]


def test_a_bad_input_path_is_refused_naming_the_field(switchboard):
    digest = upload(switchboard, b"x")
    spec = {"name": "x", "backend": {"kind": "noop"}, "inputs": {"../escape": digest}}
    response = switchboard.client().post("/api/v1/jobs", json=spec)
    assert response.status_code == 400, response.text
    assert "inputs" in response.text


def test_a_hostile_archive_fails_the_run_with_a_clear_error(switchboard, work_dir):
    client = switchboard.client()
    hostile = upload(switchboard, tar_of({"ok.txt": b"fine", "../escape": b"gotcha"}))
    good = upload(switchboard, tar_of({"ok.txt": b"fine"}))
    sup = start_supervisor(switchboard, work_dir, name="noop-in", backend="noop")
    try:
        wait_connected(client, "noop-in")
        bad_job = wait_job(
            client,
            submit(
                switchboard,
                {"name": "bad", "backend": {"kind": "noop"}, "inputs": {"t/": hostile}},
            ),
        )
        assert bad_job["phase"] == "rejected", bad_job
        run = bad_job["runs"][0]
        assert run["error_kind"] == "input_invalid", run
        assert run["error"].startswith(f"input 't/' ({hostile}): refused: '../escape'"), run
        assert "outside the destination" in run["error"], run
        assert not (work_dir / "escape").exists() and not (work_dir / "runs" / "escape").exists()
        # The same job with a sound archive runs.
        good_job = wait_job(
            client,
            submit(
                switchboard, {"name": "ok", "backend": {"kind": "noop"}, "inputs": {"t/": good}}
            ),
        )
        assert good_job["phase"] == "succeeded", good_job
    finally:
        sup.stop()


def test_a_1_2_supervisor_is_never_sent_a_job_with_inputs(tmp_path):
    # A switchboard of its own: no supervisor speaking 1.3 may be registered there.
    switchboard = Switchboard(tmp_path / "data")
    try:
        asyncio.run(_old_supervisor(switchboard))
    finally:
        switchboard.stop()


async def _old_supervisor(switchboard: Switchboard) -> None:
    client = switchboard.client()
    digest = upload(switchboard, b"firmware")
    token = switchboard.create_token("supervisor")
    async with connect_ws(switchboard, token) as ws:
        hello = Hello(
            supervisor_id="old-1",
            name="old-1",
            versions=["1.2", "1.1", "1.0"],
            backends=["noop"],
            max_jobs=4,
            credential_sha256=token_sha256(new_token()).hex(),
        )
        await ws.send(codec.encode(hello), text=True)
        welcome = codec.decode_from_switchboard(await ws.recv(decode=False))
        assert isinstance(welcome, Welcome) and welcome.version == "1.2"
        sups = client.get("/api/v1/supervisors").json()
        assert [s["protocol"] for s in sups if s["id"] == "old-1"] == ["1.2"]

        with_inputs = submit(
            switchboard, {"name": "in", "backend": {"kind": "noop"}, "inputs": {"fw": digest}}
        )
        plain = submit(switchboard, {"name": "plain", "backend": {"kind": "noop"}})
        # The plain job is sent to it (so it does get jobs); the other never is.
        started: list[str] = []
        deadline = time.monotonic() + 10
        while plain not in started and time.monotonic() < deadline:
            try:
                frame = await asyncio.wait_for(ws.recv(decode=False), 1.0)
            except TimeoutError:
                continue
            message = codec.decode_from_switchboard(frame)
            if isinstance(message, StartJob):
                started.append(message.job_id)
        assert plain in started and with_inputs not in started, started
        job = wait_for(
            lambda: (j := client.get(f"/api/v1/jobs/{with_inputs}").json())["unschedulable"] and j,
            "the job to say why it waits",
        )
        assert job["phase"] == "queued", job
        assert "1.3" in job["unschedulable"] and "1.2" in job["unschedulable"], job
        # The switchboard keeps the input while the queued job names it.
        deleted = client.delete(f"/api/v1/artifacts/{digest}")
        assert deleted.status_code == 409, deleted.text
        assert with_inputs in deleted.text, deleted.text


def test_a_run_is_not_resent_to_its_supervisor_come_back_speaking_1_2(tmp_path):
    switchboard = Switchboard(tmp_path / "data")
    try:
        asyncio.run(_downgraded_supervisor(switchboard))
    finally:
        switchboard.stop()


async def _downgraded_supervisor(switchboard: Switchboard) -> None:
    """A 1.3 supervisor is sent a run with inputs and goes away before it reports anything;
    it comes back offering only 1.2. The run is not sent again (the supervisor would run it
    without its inputs): it ends rejected, saying why."""
    client = switchboard.client()
    digest = upload(switchboard, b"firmware")
    registration = switchboard.create_token("supervisor")
    credential = new_token()

    def hello(versions: list[str], enrol: bool) -> bytes:
        return codec.encode(
            Hello(
                supervisor_id="flip-1",
                name="flip-1",
                versions=versions,
                backends=["noop"],
                credential_sha256=token_sha256(credential).hex() if enrol else None,
            )
        )

    async with connect_ws(switchboard, registration) as ws:
        await ws.send(hello(["1.3", "1.2"], enrol=True), text=True)
        welcome = codec.decode_from_switchboard(await ws.recv(decode=False))
        assert isinstance(welcome, Welcome) and welcome.version == "1.3"
        job_id = submit(
            switchboard, {"name": "in", "backend": {"kind": "noop"}, "inputs": {"fw": digest}}
        )
        while True:
            message = codec.decode_from_switchboard(await asyncio.wait_for(ws.recv(), 10))
            if isinstance(message, StartJob):
                assert message.job_id == job_id and message.inputs[0].digest == digest
                break
    async with connect_ws(switchboard, credential) as ws:
        await ws.send(hello(["1.2"], enrol=False), text=True)
        welcome = codec.decode_from_switchboard(await ws.recv(decode=False))
        assert isinstance(welcome, Welcome) and welcome.version == "1.2"
        # Reconciling finds it assigned and not held: resend it, which is refused.
        job = await asyncio.to_thread(wait_job, client, job_id, 20)
        assert job["phase"] == "rejected", job
        assert job["reason"] == (
            "not sent: its supervisor now speaks protocol 1.2; the job's inputs need 1.3"
        ), job
        while True:  # nothing but heartbeats and status requests came meanwhile
            try:
                message = codec.decode_from_switchboard(await asyncio.wait_for(ws.recv(), 0.5))
            except TimeoutError:
                break
            assert not isinstance(message, StartJob), message
