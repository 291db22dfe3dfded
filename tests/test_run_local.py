"""`supervisor run-local`: one spec, no switchboard; output byte for byte on our stdout and
stderr, state changes on stderr, the job's exit code as the process's."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.harness import run_cli
from tests.wasi import compile_c

pytestmark = pytest.mark.process

PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    fwrite("out\xff\xfe\n", 1, 6, stdout);
    fputs("err line\n", stderr);
    return atoi(argv[1]);
}
"""


@pytest.mark.wasm
def test_runs_a_wasm_spec_and_exits_with_its_code(tmp_path):
    wasm = compile_c(PROGRAM, tmp_path, "local")
    digest = "sha256:" + hashlib.sha256(wasm.read_bytes()).hexdigest()
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps({"name": "local", "backend": {"kind": "wasm", "module": digest, "args": ["7"]}})
    )
    done = run_cli(
        "-m",
        "supervisor",
        "run-local",
        str(spec),
        "--artifact",
        str(wasm),
        "--work-dir",
        str(tmp_path / "work"),
        check=False,
    )
    assert done.returncode == 7, done.stderr
    assert done.stdout == b"out\xff\xfe\n"
    stderr = done.stderr.decode(errors="replace")
    assert "err line" in stderr
    for phase in ("[job] initializing", "[job] running", "[job] failed"):
        assert phase in stderr


def test_noop_spec_succeeds(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text('{"name": "n", "backend": {"kind": "noop", "output": "hi\\n"}}')
    done = run_cli("-m", "supervisor", "run-local", str(spec), check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"hi\n"
    assert "[job] succeeded" in done.stderr.decode()


def test_invalid_spec_names_the_field(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text('{"name": "n", "backend": {"kind": "noop", "delay_s": "soon"}}')
    done = run_cli("-m", "supervisor", "run-local", str(spec), check=False)
    assert done.returncode != 0
    assert "backend.delay_s" in done.stderr.decode()


def test_missing_artifact_is_refused(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps({"name": "n", "backend": {"kind": "wasm", "module": "sha256:" + "0" * 64}})
    )
    done = run_cli("-m", "supervisor", "run-local", str(spec), check=False, cwd=tmp_path)
    assert done.returncode == 125
    assert "image_not_found" in done.stderr.decode()
