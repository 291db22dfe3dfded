"""The build -> test chain end to end, from the CLI: a real switchboard process, a real
supervisor, WASI programs compiled from C. The build job writes a firmware image to
/out; the test job, submitted with `--input fw.bin=BUILD:build/fw.bin` before the build
has even been placed, waits (saying why), then reads the image from /in, writes a JUnit
report and fails one case; `submit --follow --download` ends with the test summary, the
job's exit code and the files. A chain naming a file the build never kept is rejected
with the reason; one naming an ended job's missing file is refused at submission."""

from __future__ import annotations

import json

import pytest

from tests.harness import Switchboard, run_cli, start_supervisor, wait_connected, wait_job
from tests.wasi import compile_c

pytestmark = [pytest.mark.process, pytest.mark.wasm]

#: `build`: writes /out/build/fw.bin. `test`: reads /in/fw.bin and reports two cases in
#: /out/reports/junit.xml (the image is there and right; a check that fails), exits 1.
BUILD_AND_TEST = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char IMAGE[] = "FIRMWARE v1.2 built by the chain\n";

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "build") == 0) {
        mkdir("/out/build", 0755);
        FILE *f = fopen("/out/build/fw.bin", "w");
        if (!f) { perror("fw.bin"); return 99; }
        fputs(IMAGE, f);
        fclose(f);
        printf("built %zu bytes\n", strlen(IMAGE));
        return 0;
    }
    char got[256] = {0};
    FILE *in = fopen("/in/fw.bin", "r");
    size_t n = in ? fread(got, 1, sizeof got - 1, in) : 0;
    if (in) fclose(in);
    int same = n == strlen(IMAGE) && memcmp(got, IMAGE, n) == 0;
    printf("flashing %zu bytes: %s", n, got);
    mkdir("/out/reports", 0755);
    FILE *r = fopen("/out/reports/junit.xml", "w");
    if (!r) { perror("junit.xml"); return 99; }
    fprintf(r, "<testsuite name=\"board\" tests=\"2\">\n");
    if (same) fprintf(r, "<testcase classname=\"flash\" name=\"image_matches\"/>\n");
    else fprintf(r, "<testcase classname=\"flash\" name=\"image_matches\">"
                    "<failure message=\"image differs\"/></testcase>\n");
    fprintf(r, "<testcase classname=\"boot\" name=\"banner\">"
               "<failure message=\"no banner within 5 s\">timeout</failure></testcase>\n");
    fprintf(r, "</testsuite>\n");
    fclose(r);
    return 1;
}
"""


@pytest.fixture(scope="module")
def module(switchboard: Switchboard, tmp_path_factory) -> str:
    wasm = compile_c(BUILD_AND_TEST, tmp_path_factory.mktemp("wasm"), "chain").read_bytes()
    response = switchboard.client().post("/api/v1/artifacts", content=wasm)
    assert response.status_code == 201, response.text
    return str(response.json()["digest"])


def test_build_then_test_from_the_cli(switchboard, work_dir, module, tmp_path):
    client = switchboard.client()
    connection = ("--url", switchboard.url, "--token", switchboard.admin_token)

    def cli(*args: str, check: bool = True):
        return run_cli("-m", "switchboard", "job", *args, *connection, check=check)

    build_spec = tmp_path / "build.json"
    build_spec.write_text(
        json.dumps(
            {
                "name": "build",
                "backend": {"kind": "wasm", "module": module, "args": ["build"]},
                "outputs": {"paths": ["build/*.bin"], "when": "on_success"},
            }
        )
    )
    test_spec = tmp_path / "test.json"
    test_spec.write_text(
        json.dumps(
            {
                "name": "test-on-board",
                "backend": {"kind": "wasm", "module": module, "args": ["test"]},
                "reports": {"junit": "reports/*.xml"},
            }
        )
    )
    # No supervisor yet: the build waits in the queue, and so do its chains.
    build = cli("submit", str(build_spec)).stdout.decode().strip()
    wrong = cli("submit", str(test_spec), "--input", f"fw.bin={build}:build/zephyr.bin")
    wrong_id = wrong.stdout.decode().strip()
    waiting = client.get(f"/api/v1/jobs/{wrong_id}").json()
    assert waiting["phase"] == "queued", waiting
    assert f"waiting for job {build} to end" in waiting["unschedulable"], waiting

    sup = start_supervisor(switchboard, work_dir, name="chain-wasm", backend="wasm")
    try:
        wait_connected(client, "chain-wasm")
        downloads = tmp_path / "downloads"
        tested = cli(
            "submit",
            str(test_spec),
            "--input",
            f"fw.bin={build}:build/fw.bin",
            "--follow",
            "--download",
            str(downloads),
            check=False,
        )
        err = tested.stderr.decode()
        assert tested.returncode == 1, (err, sup.log())
        assert "flashing 33 bytes: FIRMWARE v1.2 built by the chain" in tested.stdout.decode()
        assert "tests: 2 (1 passed, 1 failed, 0 errors, 0 skipped)" in err, err
        assert (downloads / "reports" / "junit.xml").read_bytes().startswith(b"<testsuite")

        assert wait_job(client, build)["phase"] == "succeeded"
        test_id = err.split("job ", 1)[1].split()[0]
        job = client.get(f"/api/v1/jobs/{test_id}").json()
        assert job["spec"]["inputs"]["fw.bin"].startswith("sha256:"), job
        assert job["tests"]["failed"] == 1 and job["tests"]["passed"] == 1, job
        failed = client.get(f"/api/v1/jobs/{test_id}/tests", params={"result": "failed"}).json()
        assert [(c["name"], c["message"]) for c in failed["items"]] == [
            ("banner", "no banner within 5 s\n\ntimeout")
        ], failed
        events = client.get(f"/api/v1/jobs/{test_id}/events").json()
        resolved = [e for e in events if e["kind"] == "inputs_resolved"]
        assert resolved and f"job {build} 'build/fw.bin'" in resolved[0]["message"], events

        # The chain naming a file the build never kept can never run: rejected, saying so.
        rejected = wait_job(client, wrong_id)
        assert rejected["phase"] == "rejected", rejected
        assert "without keeping a file 'build/zephyr.bin'" in rejected["reason"], rejected
        # The same, submitted now that the build has ended: refused outright.
        refused = cli(
            "submit", str(test_spec), "--input", f"fw.bin={build}:build/zephyr.bin", check=False
        )
        assert refused.returncode != 0
        assert "build/zephyr.bin" in refused.stderr.decode(), refused.stderr
        unknown = client.post(
            "/api/v1/jobs",
            json={
                "name": "x",
                "backend": {"kind": "noop"},
                "inputs": {"a": {"from_job": "no-such-job", "path": "a"}},
            },
        )
        assert unknown.status_code == 400, unknown.text
        assert unknown.json()["field"] == "inputs['a']", unknown.text
        assert "job no-such-job does not exist" in unknown.json()["message"]
    finally:
        sup.stop()
