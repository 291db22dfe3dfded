"""End to end: a switchboard process, a Wasm supervisor process and a REST client run WASI
programs compiled from C at test time; output comes back byte-identical."""

from __future__ import annotations

import hashlib

import pytest

from tests.harness import Switchboard, start_supervisor, wait_connected, wait_job
from tests.wasi import STEADY_WRITER, compile_c

pytestmark = pytest.mark.wasm

#: Writes two distinct byte patterns, including bytes that are not valid UTF-8, to stdout
#: and stderr (sizes from argv), then exits with argv[3].
STREAMS = r"""
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    long out_n = atol(argv[1]), err_n = atol(argv[2]);
    static unsigned char buf[65536];
    for (long done = 0; done < out_n;) {
        long n = out_n - done < (long)sizeof buf ? out_n - done : (long)sizeof buf;
        for (long i = 0; i < n; i++) buf[i] = (unsigned char)((done + i) * 7 + 0x80);
        fwrite(buf, 1, n, stdout);
        done += n;
    }
    fflush(stdout);
    for (long i = 0; i < err_n; i++) fputc((int)(0xff - i % 64), stderr);
    fflush(stderr);
    return atoi(argv[3]);
}
"""


def expected(n: int, pattern) -> bytes:
    return bytes(pattern(i) & 0xFF for i in range(n))


def out_pattern(i: int) -> int:
    return i * 7 + 0x80


def err_pattern(i: int) -> int:
    return 0xFF - i % 64


@pytest.fixture(scope="module")
def module_digest(switchboard: Switchboard, tmp_path_factory) -> str:
    wasm = compile_c(STREAMS, tmp_path_factory.mktemp("wasm"), "streams").read_bytes()
    response = switchboard.client().post("/api/v1/artifacts", content=wasm)
    assert response.status_code == 201, response.text
    digest = response.json()["digest"]
    assert digest == "sha256:" + hashlib.sha256(wasm).hexdigest()
    return digest


@pytest.fixture(scope="module")
def wasm_supervisor(switchboard: Switchboard, work_dir):
    process = start_supervisor(switchboard, work_dir, name="wasm-1", backend="wasm")
    wait_connected(switchboard.client(), "wasm-1")
    yield process
    process.stop()


def run_job(switchboard: Switchboard, digest: str, *args: str) -> dict:
    client = switchboard.client()
    spec = {"name": "streams", "backend": {"kind": "wasm", "module": digest, "args": list(args)}}
    response = client.post("/api/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    return wait_job(client, response.json()["id"], timeout=120)


def output(switchboard: Switchboard, job_id: str, stream: str) -> bytes:
    response = switchboard.client().get(f"/api/v1/jobs/{job_id}/output", params={"stream": stream})
    assert response.status_code == 200
    return response.content


def test_small_output_exit_zero_and_phases_in_order(switchboard, wasm_supervisor, module_digest):
    job = run_job(switchboard, module_digest, "300", "100", "0")
    assert job["phase"] == "succeeded" and job["exit_code"] == 0
    assert output(switchboard, job["id"], "stdout") == expected(300, out_pattern)
    assert output(switchboard, job["id"], "stderr") == expected(100, err_pattern)
    phases = [p["phase"] for p in job["runs"][0]["phases"]]
    assert phases[0] == "assigned" and phases[-2:] == ["running", "succeeded"]
    assert set(phases[1:-2]) == {"initializing"}
    stages = [p["stage"] for p in job["runs"][0]["phases"] if p["phase"] == "initializing"]
    assert "fetching" in stages or "cached" in stages


def test_nonzero_exit_code_is_reported(switchboard, wasm_supervisor, module_digest):
    job = run_job(switchboard, module_digest, "10", "10", "7")
    assert job["phase"] == "failed" and job["exit_code"] == 7
    assert job["runs"][0]["exit_code"] == 7
    assert output(switchboard, job["id"], "stdout") == expected(10, out_pattern)


def test_six_megabytes_come_back_byte_identical(switchboard, wasm_supervisor, module_digest):
    size = 6 * 1024 * 1024 + 12345
    job = run_job(switchboard, module_digest, str(size), "5000", "0")
    assert job["phase"] == "succeeded"
    stdout = output(switchboard, job["id"], "stdout")
    assert len(stdout) == size
    assert hashlib.sha256(stdout).digest() == hashlib.sha256(expected(size, out_pattern)).digest()
    assert output(switchboard, job["id"], "stderr") == expected(5000, err_pattern)
    # Followed after the fact, it comes in bounded reads (4 MiB) and still whole.
    followed = switchboard.client().get(f"/api/v1/jobs/{job['id']}/output/follow").content
    assert followed == stdout
    # Byte ranges of the stored stream.
    part = (
        switchboard.client()
        .get(f"/api/v1/jobs/{job['id']}/output", params={"start": 1000, "end": 1010})
        .content
    )
    assert part == expected(size, out_pattern)[1000:1010]


def test_a_module_that_is_not_wasm_rejects_the_job(switchboard, wasm_supervisor):
    client = switchboard.client()
    digest = client.post("/api/v1/artifacts", content=b"not a wasm module").json()["digest"]
    response = client.post(
        "/api/v1/jobs", json={"name": "garbage", "backend": {"kind": "wasm", "module": digest}}
    )
    job = wait_job(client, response.json()["id"])
    assert job["phase"] == "rejected"
    assert job["runs"][0]["error_kind"] == "image_invalid"


def test_scratch_quota_flag(switchboard, work_dir, tmp_path):
    """`supervisor run --wasm-scratch-mb 4`: a job writing 8 MiB to /scratch fails with
    `scratch_limit`, one writing 2 MiB succeeds."""
    client = switchboard.client()
    wasm = compile_c(STEADY_WRITER, tmp_path, "steady_writer").read_bytes()
    digest = client.post("/api/v1/artifacts", content=wasm).json()["digest"]
    process = start_supervisor(
        switchboard,
        work_dir,
        name="wasm-quota",
        labels={"scratch": "4mb"},
        extra_args=("--wasm-scratch-mb", "4"),
    )
    try:
        wait_connected(client, "wasm-quota")
        jobs = {}
        for blocks in (128, 32):  # 64 KiB each
            spec = {
                "name": f"write-{blocks}",
                "backend": {"kind": "wasm", "module": digest, "args": [str(blocks), "0"]},
                "selector": {"match_labels": {"scratch": "4mb"}},
            }
            response = client.post("/api/v1/jobs", json=spec)
            jobs[blocks] = wait_job(client, response.json()["id"])
    finally:
        process.stop()
    [over] = jobs[128]["runs"]
    assert (jobs[128]["phase"], over["reason"]) == ("failed", "scratch_limit"), jobs[128]
    assert "more than the 4 MB" in over["message"]
    assert jobs[32]["phase"] == "succeeded"
