"""A run's output files end to end: a real switchboard process, real supervisor processes.
A WASI program compiled from C writes its JUnit report and a log to /out and fails; the
supervisor uploads both (each stored byte for byte) and not a file no rule names; a
connection cut mid-upload is resumed and the file stored once; a busybox container writes
/out (as a non-root user) with a JUnit report that is parsed, and a link to /etc/passwd
there is refused, never uploaded."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.docker_engine import BUSYBOX_IMAGE
from tests.faults import FaultyProxy
from tests.harness import (
    Switchboard,
    run_cli,
    start_supervisor,
    wait_connected,
    wait_for,
    wait_job,
    wait_running,
)
from tests.wasi import compile_c

pytestmark = pytest.mark.process

#: Writes /out/reports/junit.xml, /out/logs/a.log, /out/other.txt and, if argv[2] is
#: given, /out/big.bin of that many bytes; exits with argv[1].
WRITE_OUTPUTS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

static void put(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (!f) { perror(path); exit(99); }
    fputs(text, f);
    fclose(f);
}

int main(int argc, char **argv) {
    mkdir("/out/reports", 0755);
    mkdir("/out/logs", 0755);
    put("/out/reports/junit.xml", "<testsuite name=\"s\"><testcase name=\"t\"/></testsuite>\n");
    put("/out/logs/a.log", "something went wrong\n");
    put("/out/other.txt", "no rule names me\n");
    long big = argc > 2 ? atol(argv[2]) : 0;
    if (big > 0) {
        FILE *f = fopen("/out/big.bin", "w");
        for (long i = 0; i < big; i++) fputc((int)((i * 31 + 7) & 0xff), f);
        fclose(f);
    }
    return atoi(argv[1]);
}
"""

JUNIT = b'<testsuite name="s"><testcase name="t"/></testsuite>\n'
LOG = b"something went wrong\n"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def big(n: int) -> bytes:
    return bytes((i * 31 + 7) & 0xFF for i in range(n))


def stored(switchboard: Switchboard, data: bytes) -> bool:
    response = switchboard.client().get(f"/api/v1/artifacts/{digest(data)}")
    if response.status_code == 404:
        return False
    assert response.status_code == 200, response.text
    assert response.content == data
    return True


@pytest.fixture(scope="module")
def module(switchboard: Switchboard, tmp_path_factory) -> str:
    wasm = compile_c(WRITE_OUTPUTS, tmp_path_factory.mktemp("wasm"), "write_outputs").read_bytes()
    response = switchboard.client().post("/api/v1/artifacts", content=wasm)
    assert response.status_code == 201, response.text
    return str(response.json()["digest"])


def submit(switchboard: Switchboard, spec: dict) -> str:
    response = switchboard.client().post("/api/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


@pytest.mark.wasm
def test_a_failed_wasm_runs_report_and_log_are_uploaded(switchboard, work_dir, module):
    client = switchboard.client()
    assert not stored(switchboard, JUNIT) and not stored(switchboard, LOG)
    sup = start_supervisor(switchboard, work_dir, name="wasm-out", backend="wasm")
    try:
        wait_connected(client, "wasm-out")
        spec = {
            "name": "writes-outputs",
            "backend": {"kind": "wasm", "module": module, "args": ["1"]},
            "outputs": {"paths": ["logs/*.log"], "when": "on_failure"},
            "reports": {"junit": "reports/*.xml"},
        }
        job = wait_job(client, submit(switchboard, spec), timeout=120)
        assert job["phase"] == "failed", job
        assert job["runs"][0]["exit_code"] == 1, job
        assert stored(switchboard, JUNIT) and stored(switchboard, LOG)
        assert not stored(switchboard, b"no rule names me\n")
        assert not list((work_dir / "wasm-out" / "runs").glob(f"{job['id']}.*"))
        # The switchboard links them to the run and parses the report (in the background).
        files_url = f"/api/v1/jobs/{job['id']}/files"
        listed = wait_for(
            lambda: (
                (got := client.get(files_url).json())["files"]
                and all(f["report"] != "pending" for f in got["files"])
                and got
            ),
            "the run's files listed and its report parsed",
        )
        by_path = {f["path"]: f for f in listed["files"]}
        assert set(by_path) == {"logs/a.log", "reports/junit.xml"}, listed
        assert by_path["reports/junit.xml"]["report"] == "stored", listed
        assert by_path["logs/a.log"]["digest"] == digest(LOG)
        assert client.get(f"{files_url}/logs/a.log").content == LOG
        cases = client.get(f"/api/v1/jobs/{job['id']}/tests").json()
        assert [(c["name"], c["result"]) for c in cases["items"]] == [("t", "passed")], cases
        assert client.get(f"/api/v1/jobs/{job['id']}").json()["tests"]["passed"] == 1
        connection = ("--url", switchboard.url, "--token", switchboard.admin_token)
        shown = run_cli("-m", "switchboard", "job", "show", job["id"], *connection)
        text = shown.stdout.decode()
        assert "tests: 1 (1 passed, 0 failed, 0 errors, 0 skipped)" in text, text
        assert "files of run 1: 2 kept" in text, text
    finally:
        sup.stop()


@pytest.mark.wasm
def test_an_upload_cut_midway_resumes_and_stores_the_file_once(switchboard, work_dir, module):
    size = 3 * 1024 * 1024
    data = big(size)
    proxy = FaultyProxy(switchboard.port)
    client = switchboard.client()
    sup = start_supervisor(
        switchboard, work_dir, name="wasm-cut", backend="wasm", url=f"ws://127.0.0.1:{proxy.port}"
    )
    try:
        wait_connected(client, "wasm-cut")
        # The upload is by far the most the supervisor sends: its middle is cut.
        proxy.cut_after_sent(size // 2)
        spec = {
            "name": "big-output",
            "backend": {"kind": "wasm", "module": module, "args": ["0", str(size)]},
            "outputs": {"paths": ["big.bin"]},
        }
        job = wait_job(client, submit(switchboard, spec), timeout=120)
        assert job["phase"] == "succeeded", (job, sup.log())
        assert proxy.cuts >= 1
        assert stored(switchboard, data)
        hexdigest = digest(data).removeprefix("sha256:")
        copies = [p for p in switchboard.data_dir.rglob(f"*{hexdigest}*") if p.is_file()]
        assert len(copies) == 1, copies
        assert "output big.bin not kept" not in sup.log()
    finally:
        sup.stop()
        proxy.close()


SCRIPT = (
    "mkdir -p /out/logs /out/reports && echo hello > /out/logs/a.log"
    ' && printf \'<testsuite name="c"><testcase name="in_a_container"/>'
    '<testcase name="broken"><error message="oops"/></testcase></testsuite>\''
    " > /out/reports/junit.xml"
    " && ln -s /etc/passwd /out/logs/passwd.log"
    " && id -u > /out/logs/uid.log && exit 3"
)


def test_a_container_writes_out_and_a_link_there_is_refused(switchboard, work_dir, docker_engine):
    client = switchboard.client()
    sup = start_supervisor(
        switchboard,
        work_dir,
        name="dock-out",
        backend="docker",
        extra_args=("--docker-host", docker_engine.host),
    )
    try:
        wait_connected(client, "dock-out")
        spec = {
            "name": "container-outputs",
            "backend": {
                "kind": "docker",
                "image": BUSYBOX_IMAGE,
                "user": "1000:1000",
                "command": ["sh", "-c", SCRIPT],
            },
            "outputs": {"paths": ["logs/*.log"], "when": "on_failure"},
            "reports": {"junit": "reports/*.xml"},
        }
        job = wait_job(client, submit(switchboard, spec), timeout=120)
        assert job["phase"] == "failed" and job["runs"][0]["exit_code"] == 3, (job, sup.log())
        # Its JUnit report, written in the container, is parsed like any other.
        tests = wait_for(
            lambda: client.get(f"/api/v1/jobs/{job['id']}").json().get("tests"),
            "the container's report parsed",
        )
        assert (tests["passed"], tests["error"]) == (1, 1), tests
        assert stored(switchboard, b"hello\n")
        assert stored(switchboard, b"1000\n")  # written as the container's non-root user
        passwd = open("/etc/passwd", "rb").read()
        assert not stored(switchboard, passwd)
        wait_for(
            lambda: "1 refused (first: logs/passwd.log: a symbolic link" in sup.log(),
            "the refusal logged",
        )
    finally:
        sup.stop()


def test_run_local_lists_the_kept_files_or_copies_them(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "name": "local-outputs",
                "backend": {
                    "kind": "noop",
                    "exit_code": 2,
                    "files": {"reports/junit.xml": JUNIT.decode(), "logs/a.log": LOG.decode()},
                },
                "outputs": {"paths": ["logs/*.log"], "when": "on_success"},
                "reports": {"junit": ["reports/*.xml"]},
            }
        )
    )
    listed = run_cli("-m", "supervisor", "run-local", str(spec), check=False, cwd=tmp_path)
    status = listed.stderr.decode()
    assert listed.returncode == 2, status
    line = f"[job] output reports/junit.xml: {len(JUNIT)} bytes, {digest(JUNIT)}"
    assert line in status, status
    assert "logs/a.log" not in status  # on_success only, and the run failed
    kept = tmp_path / "kept"
    copied = run_cli(
        "-m", "supervisor", "run-local", str(spec), "--outputs-dir", str(kept), check=False
    )
    assert copied.returncode == 2, copied.stderr.decode()
    assert (kept / "reports" / "junit.xml").read_bytes() == JUNIT
    assert sorted(p.name for p in kept.rglob("*")) == ["junit.xml", "reports"]


def test_a_readopted_containers_outputs_are_kept_when_it_ends(switchboard, work_dir, docker_engine):
    """The supervisor is killed while the container runs; restarted, it re-adopts the run,
    and once the container ends the files it wrote before and after are uploaded."""
    client = switchboard.client()

    def supervisor():
        return start_supervisor(
            switchboard,
            work_dir,
            name="dock-readopt",
            backend="docker",
            extra_args=("--docker-host", docker_engine.host),
        )

    sup = supervisor()
    try:
        wait_connected(client, "dock-readopt")
        script = (
            "echo before > /out/before.log; echo started;"
            " sleep 3; echo after-restart > /out/after.log"
        )
        spec = {
            "name": "readopted",
            "backend": {"kind": "docker", "image": BUSYBOX_IMAGE, "command": ["sh", "-c", script]},
            "outputs": {"paths": ["*.log"]},
        }
        job_id = submit(switchboard, spec)
        wait_running(client, job_id)
        sup.kill()
        sup = supervisor()
        job = wait_job(client, job_id, timeout=60)
        assert job["phase"] == "succeeded", (job, sup.log())
        assert stored(switchboard, b"before\n") and stored(switchboard, b"after-restart\n")
        assert not list((work_dir / "dock-readopt" / "runs").glob(f"{job_id}.*"))
    finally:
        sup.stop()


def test_the_supervisors_own_cap_holds_runs_to_less(tmp_path):
    spec = tmp_path / "spec.json"
    files = {"a.log": "a\n", "b.log": "b\n"}
    spec.write_text(
        json.dumps(
            {
                "name": "capped",
                "backend": {"kind": "noop", "files": files},
                "outputs": {"paths": ["*.log"]},
            }
        )
    )
    done = run_cli(
        "-m", "supervisor", "run-local", str(spec), "--outputs-max-files", "1", check=False
    )
    status = done.stderr.decode()
    assert done.returncode == 0, status
    assert "[job] output a.log: 2 bytes" in status, status
    assert "[job] output b.log not kept: over the cap of 1 files" in status, status
