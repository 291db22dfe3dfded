"""A run's output files at the switchboard, end to end: a real switchboard process and a
supervisor scripted over a real WebSocket, which uploads each file with its own credential
(PUT /api/v1/uploads/{digest}) and then names it in a `files` event before `exit`. The
REST list shows the files, a download is byte-exact and honours Range, a JUnit report among
them is parsed into the job's tests, a file listed under a digest never uploaded is
refused, a hostile report is refused with its reason while the API keeps answering, the
CLI downloads every file byte-exact, a kept file's artifact stays while its job exists,
and a job keeping files is never placed on a supervisor speaking 1.2."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import httpx
import pytest

from protocol import codec
from protocol.limits import EMPTY_DIGEST
from protocol.messages import (
    Ack,
    Event,
    Hello,
    JobExit,
    JobFiles,
    JobStateChanged,
    OutputFile,
    RefusedFile,
    StartJob,
    Welcome,
)
from protocol.state import Phase
from protocol.tokens import new_token, token_sha256
from protocol.versions import supported_versions
from tests.harness import Switchboard, _env, run_cli, wait_for, wait_job
from tests.hostile_xml import BILLION_LAUGHS
from tests.scrape import sample_value, scrape
from tests.supervisor_ws import connect_ws

pytestmark = pytest.mark.process

JUNIT = b"""<?xml version="1.0"?>
<testsuite name="unit">
  <testcase classname="a" name="passes" time="0.01"/>
  <testcase classname="a" name="fails" time="0.02">
    <failure message="boom">trace</failure>
  </testcase>
  <testcase classname="a" name="skipped"><skipped/></testcase>
</testsuite>
"""


SPEC = {
    "name": "outs",
    "backend": {"kind": "noop"},
    "outputs": {"paths": ["**/*.bin", "logs/*.log"]},
    "reports": {"junit": "reports/*.xml"},
}


@pytest.fixture(scope="module")
def switchboard(tmp_path_factory: pytest.TempPathFactory):
    """This module's switchboard, keeping at most 7 files a run (sent to supervisors)."""
    server = Switchboard(
        tmp_path_factory.mktemp("switchboard") / "data", extra_args=("--max-run-files", "7")
    )
    yield server
    server.stop()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class ScriptedSupervisor:
    """A 1.3 supervisor played by the test: it enrols a credential, takes StartJobs and
    reports runs that keep files."""

    def __init__(self, switchboard: Switchboard, supervisor_id: str, versions=None) -> None:
        self.switchboard = switchboard
        self.id = supervisor_id
        self.versions = versions or supported_versions()
        self.credential = new_token()
        self.seq = 0

    async def __aenter__(self) -> ScriptedSupervisor:
        registration = self.switchboard.create_token("supervisor")
        self._cm = connect_ws(self.switchboard, registration)
        self.ws = await self._cm.__aenter__()
        hello = Hello(
            supervisor_id=self.id,
            name=self.id,
            versions=self.versions,
            backends=["noop"],
            max_jobs=8,
            credential_sha256=token_sha256(self.credential).hex(),
        )
        await self.ws.send(codec.encode(hello), text=True)
        self.welcome = codec.decode_from_switchboard(await self.ws.recv(decode=False))
        assert isinstance(self.welcome, Welcome)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._cm.__aexit__(*exc)

    async def next_start(self, within: float = 10.0) -> StartJob:
        deadline = time.monotonic() + within
        while True:
            left = deadline - time.monotonic()
            message = codec.decode_from_switchboard(await asyncio.wait_for(self.ws.recv(), left))
            if isinstance(message, StartJob):
                return message

    async def upload(self, data: bytes) -> str:
        digest = digest_of(data)
        async with httpx.AsyncClient(
            base_url=self.switchboard.url,
            headers={"Authorization": f"Bearer {self.credential}"},
        ) as client:
            response = await client.put(
                f"/api/v1/uploads/{digest}",
                content=data,
                headers={"Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}"},
            )
            assert response.status_code in (200, 201), response.text
        return digest

    async def send(self, make) -> int:
        self.seq += 1
        event: Event = make(self.seq)
        await self.ws.send(codec.encode(event), text=True)
        return self.seq

    async def acked(self, seq: int, within: float = 10.0) -> Ack:
        deadline = time.monotonic() + within
        while True:
            left = deadline - time.monotonic()
            message = codec.decode_from_switchboard(await asyncio.wait_for(self.ws.recv(), left))
            if isinstance(message, Ack) and message.seq >= seq:
                return message

    async def run(
        self,
        start: StartJob,
        files: dict[str, bytes],
        *,
        never_uploaded: dict[str, bytes] | None = None,
        refused: list[RefusedFile] | None = None,
        refused_unlisted: int = 0,
    ) -> Ack:
        """Run `start`: running, upload `files`, list them (and `never_uploaded`, listed
        but not sent), exit 0, succeeded; the Ack covering it all."""
        key = {"job_id": start.job_id, "attempt": start.attempt}
        await self.send(lambda s: JobStateChanged(seq=s, phase=Phase.RUNNING, **key))
        listed = []
        for path, data in files.items():
            digest = await self.upload(data)
            listed.append(
                OutputFile(path=path, size=len(data), digest=digest, media_type=_media(path))
            )
        for path, data in (never_uploaded or {}).items():
            listed.append(OutputFile(path=path, size=len(data), digest=digest_of(data)))
        await self.send(
            lambda s: JobFiles(
                seq=s,
                files=listed,
                refused=refused or [],
                refused_unlisted=refused_unlisted,
                **key,
            )
        )
        await self.send(lambda s: JobExit(seq=s, exit_code=0, **key))
        last = await self.send(lambda s: JobStateChanged(seq=s, phase=Phase.SUCCEEDED, **key))
        return await self.acked(last)


def _media(path: str) -> str:
    return {"xml": "application/xml", "log": "text/plain"}.get(
        path.rpartition(".")[2], "application/octet-stream"
    )


def submit(switchboard: Switchboard, spec: dict) -> str:
    response = switchboard.client().post("/api/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def refused_metric(switchboard: Switchboard, outcome: str) -> float:
    text = scrape(f"{switchboard.url}/metrics")
    return sample_value(text, "switchboard_output_files_total", outcome=outcome)


def test_a_runs_files_are_listed_downloaded_and_reported(switchboard, tmp_path):
    asyncio.run(_files_end_to_end(switchboard, tmp_path))


async def _files_end_to_end(switchboard: Switchboard, tmp_path: Path) -> None:
    client = switchboard.client()
    big = os.urandom(700_000)  # several download pieces
    files = {
        "data/deep/big.bin": big,
        "logs/run.log": b"line one\nline two\n",
        "reports/junit.xml": JUNIT,
    }
    not_uploaded_before = refused_metric(switchboard, "not_uploaded")
    async with ScriptedSupervisor(switchboard, "files-1") as sup:
        job_id = submit(switchboard, SPEC)
        start = await sup.next_start()
        assert start.job_id == job_id
        assert [(r.pattern, r.when) for r in start.collect] == [
            ("**/*.bin", "always"),
            ("logs/*.log", "always"),
            ("reports/*.xml", "always"),
        ]
        assert start.collect_limits is not None and start.collect_limits.max_files == 7
        ack = await sup.run(
            start,
            files,
            never_uploaded={"ghost.bin": b"never sent"},
            refused=[RefusedFile(path="core.bin", reason="larger than the limit")],
            refused_unlisted=3,
        )
        assert ack.problems == [], ack  # a file never uploaded is not a wire problem

    job = await asyncio.to_thread(wait_job, client, job_id, 20)
    assert job["phase"] == "succeeded", job
    listing = client.get(f"/api/v1/jobs/{job_id}/files").json()
    assert listing["attempt"] == 1
    assert [(f["path"], f["size"], f["digest"]) for f in listing["files"]] == sorted(
        (path, len(data), digest_of(data)) for path, data in files.items()
    )
    by_path = {f["path"]: f for f in listing["files"]}
    assert by_path["logs/run.log"]["media_type"] == "text/plain"
    assert by_path["data/deep/big.bin"]["report"] is None
    refused = {r["path"]: r["reason"] for r in listing["refused"]}
    assert refused["core.bin"] == "larger than the limit"
    assert "never uploaded" in refused["ghost.bin"], refused
    assert listing["refused_unlisted"] == 3
    assert refused_metric(switchboard, "not_uploaded") == not_uploaded_before + 1
    # An explicit attempt gives the same; an unknown job or run is a 404.
    again = client.get(f"/api/v1/jobs/{job_id}/files", params={"attempt": 1}).json()
    assert {**again, "files": None} == {**listing, "files": None}  # a report may parse meanwhile
    assert [f["path"] for f in again["files"]] == [f["path"] for f in listing["files"]]
    assert client.get(f"/api/v1/jobs/{job_id}/files", params={"attempt": 2}).status_code == 404
    assert client.get("/api/v1/jobs/nope/files").status_code == 404

    # Downloads: byte-exact, with their media type; Range gives the slice, or 416.
    url = f"/api/v1/jobs/{job_id}/files/data/deep/big.bin"
    whole = client.get(url)
    assert whole.status_code == 200 and whole.content == big
    assert whole.headers["accept-ranges"] == "bytes"
    part = client.get(url, headers={"Range": "bytes=1000-1999"})
    assert part.status_code == 206 and part.content == big[1000:2000]
    assert part.headers["content-range"] == f"bytes 1000-1999/{len(big)}"
    tail = client.get(url, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == big[-10:]
    beyond = client.get(url, headers={"Range": f"bytes={len(big)}-"})
    assert beyond.status_code == 416, beyond.text
    assert beyond.headers["content-range"] == f"bytes */{len(big)}"
    log = client.get(f"/api/v1/jobs/{job_id}/files/logs/run.log")
    assert log.content == files["logs/run.log"]
    assert log.headers["content-type"].startswith("text/plain")
    assert client.get(f"/api/v1/jobs/{job_id}/files/ghost.bin").status_code == 404
    assert client.get(f"/api/v1/jobs/{job_id}/files/nothing/here").status_code == 404

    # The report among them: parsed in the background, into the job's tests.
    def reported() -> dict | None:
        shown = client.get(f"/api/v1/jobs/{job_id}").json()
        return shown if shown["tests"] else None

    shown = await asyncio.to_thread(wait_for, reported, "the report's test cases")
    assert shown["tests"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1, "total": 3}
    assert shown["files"] == {
        "attempt": 1,
        "count": 3,
        "bytes": sum(map(len, files.values())),
        "refused": 5,
    }
    cases = client.get(f"/api/v1/jobs/{job_id}/tests").json()["items"]
    assert {c["name"]: c["result"] for c in cases} == {
        "passes": "passed",
        "fails": "failed",
        "skipped": "skipped",
    }
    listing = client.get(f"/api/v1/jobs/{job_id}/files").json()
    report = next(f for f in listing["files"] if f["path"] == "reports/junit.xml")
    assert report["report"] == "stored" and report["report_error"] is None

    # The CLI downloads every file, byte-exact, paths kept.
    out = tmp_path / "got"
    done = run_cli(
        *("-m", "switchboard", "job", "files", job_id, "--download", str(out)),
        *("--url", switchboard.url, "--token", switchboard.admin_token),
    )
    for path, data in files.items():
        assert (out / path).read_bytes() == data, path
    assert "ghost.bin" in done.stdout.decode()
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(files)

    # A kept file's artifact stays while its job exists; the job deleted, it may go.
    digest = digest_of(files["logs/run.log"])
    held = client.delete(f"/api/v1/artifacts/{digest}")
    assert held.status_code == 409 and job_id in held.text, held.text
    assert client.delete(f"/api/v1/jobs/{job_id}").status_code == 204
    assert client.delete(f"/api/v1/artifacts/{digest}").status_code == 204
    assert client.get(f"/api/v1/artifacts/{digest}").status_code == 404


def test_a_hostile_report_is_refused_with_its_reason_and_the_api_answers(switchboard):
    asyncio.run(_hostile_report(switchboard))


async def _hostile_report(switchboard: Switchboard) -> None:
    client = switchboard.client()
    async with ScriptedSupervisor(switchboard, "files-2") as sup:
        job_id = submit(switchboard, SPEC)
        start = await sup.next_start()
        await sup.run(start, {"reports/lol.xml": BILLION_LAUGHS})
    began = time.monotonic()
    assert client.get("/api/v1/jobs").status_code == 200
    assert time.monotonic() - began < 2.0

    def refused() -> dict | None:
        files = client.get(f"/api/v1/jobs/{job_id}/files").json()["files"]
        return files[0] if files and files[0]["report"] == "refused" else None

    report = await asyncio.to_thread(wait_for, refused, "the report to be refused")
    assert "DTD" in report["report_error"], report
    assert client.get(f"/api/v1/jobs/{job_id}").json()["tests"] is None
    # The file itself is kept: its bytes are still there to look at.
    got = client.get(f"/api/v1/jobs/{job_id}/files/reports/lol.xml")
    assert got.content == BILLION_LAUGHS


def test_a_job_keeping_files_is_not_placed_on_a_1_2_supervisor(tmp_path):
    switchboard = Switchboard(tmp_path / "data")
    try:
        asyncio.run(_old_supervisor(switchboard))
    finally:
        switchboard.stop()


async def _old_supervisor(switchboard: Switchboard) -> None:
    client = switchboard.client()
    async with ScriptedSupervisor(switchboard, "old-1", versions=["1.2"]) as sup:
        assert sup.welcome.version == "1.2"
        with_outputs = submit(switchboard, SPEC)
        with_reports = submit(
            switchboard,
            {"name": "r", "backend": {"kind": "noop"}, "reports": {"junit": "*.xml"}},
        )
        plain = submit(switchboard, {"name": "plain", "backend": {"kind": "noop"}})
        start = await sup.next_start()
        assert start.job_id == plain and start.collect == [], start
        for job_id in (with_outputs, with_reports):
            job = await asyncio.to_thread(
                wait_for,
                lambda job_id=job_id: (
                    (j := client.get(f"/api/v1/jobs/{job_id}").json())["unschedulable"] and j
                ),
                "the job to say why it waits",
            )
            assert job["phase"] == "queued", job
            assert "outputs and reports need protocol 1.3" in job["unschedulable"], job


def test_submit_follow_ends_with_the_tests_and_downloads_the_files(switchboard, tmp_path):
    asyncio.run(_follow_and_download(switchboard, tmp_path))


async def _follow_and_download(switchboard: Switchboard, tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    out = tmp_path / "files"
    # An empty file is listed under the digest of no bytes, never uploaded.
    files = {"reports/junit.xml": JUNIT, "out.bin": os.urandom(1000), "empty.log": b""}
    connection = ("--url", switchboard.url, "--token", switchboard.admin_token)
    async with ScriptedSupervisor(switchboard, "files-3") as sup:
        cli = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "switchboard", "job", "submit", str(spec), "--follow"),
            *("--download", str(out), *connection),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_env(),
        )
        start = await sup.next_start()
        # The report parses in the background, maybe after the job ended: the CLI waits.
        key = {"job_id": start.job_id, "attempt": start.attempt}
        await sup.send(lambda s: JobStateChanged(seq=s, phase=Phase.RUNNING, **key))
        listed = [
            OutputFile(path=p, size=len(d), digest=await sup.upload(d) if d else EMPTY_DIGEST)
            for p, d in files.items()
        ]
        await sup.send(lambda s: JobFiles(seq=s, files=listed, **key))
        await sup.send(lambda s: JobExit(seq=s, exit_code=0, **key))
        await sup.acked(
            await sup.send(lambda s: JobStateChanged(seq=s, phase=Phase.SUCCEEDED, **key))
        )
        _, stderr = await asyncio.wait_for(cli.communicate(), 30)
    assert cli.returncode == 0, stderr.decode()
    said = stderr.decode()
    assert "tests: 3 (1 passed, 1 failed, 0 errors, 1 skipped)" in said, said
    for path, data in files.items():
        assert (out / path).read_bytes() == data
    shown = run_cli(*("-m", "switchboard", "job", "show", start.job_id, *connection))
    text = shown.stdout.decode()
    assert "files of run 1: 3 kept" in text and "tests: 3" in text, text


def test_retention_keeps_a_kept_file_until_its_job_goes(tmp_path):
    switchboard = Switchboard(
        tmp_path / "data",
        extra_args=(
            *("--retain-artifacts", "1s", "--retain-jobs", "5s"),
            *("--retention-interval", "0.2"),
        ),
    )
    try:
        asyncio.run(_retention(switchboard))
    finally:
        switchboard.stop()


async def _retention(switchboard: Switchboard) -> None:
    client = switchboard.client()
    data = os.urandom(5000)
    async with ScriptedSupervisor(switchboard, "files-4") as sup:
        job_id = submit(switchboard, SPEC)
        await sup.run(await sup.next_start(), {"kept.bin": data})
    ended = time.monotonic()
    digest = digest_of(data)
    # Past --retain-artifacts, held by the job's run all the same.
    await asyncio.sleep(3.0)
    assert client.get(f"/api/v1/jobs/{job_id}").status_code == 200
    assert client.get(f"/api/v1/artifacts/{digest}").content == data
    # Retention deletes the job (--retain-jobs), then the artifact nothing holds any more.
    await asyncio.to_thread(
        wait_for,
        lambda: client.get(f"/api/v1/artifacts/{digest}").status_code == 404,
        "the artifact to go with its job",
    )
    assert client.get(f"/api/v1/jobs/{job_id}").status_code == 404
    assert time.monotonic() - ended >= 5.0
