"""A run's output files, supervisor side: the noop backend writes files into the run's
output directory, the supervisor keeps those its StartJob's `collect` rules name for how
the run ended, within its caps, and reports them in `files` events before `exit`. The
switchboard here is a scripted WebSocket server speaking the real protocol (so the order
of the events on the wire is what is checked); the files are kept by run-local's copying
sink, a real one (uploads to a real switchboard: test_outputs_supervisor_e2e)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

import httpx
import pytest
import websockets

from connector.websocket import WebSocketConnector
from protocol import codec, limits
from protocol.limits import EMPTY_DIGEST
from protocol.messages import (
    Ack,
    CollectLimits,
    CollectRule,
    Event,
    Hello,
    JobExit,
    JobFiles,
    JobStateChanged,
    OutputFile,
    RefusedFile,
    StartJob,
    StopJob,
    Welcome,
)
from protocol.spec import NoopBackend as NoopSpec
from protocol.state import Phase, is_terminal
from supervisor.backends.noop import NoopBackend
from supervisor.collect import Caps, Collected
from supervisor.jobs import BackendSupervisor
from supervisor.outputs import (
    DirectorySink,
    OutputSink,
    SwitchboardSink,
    caps_for,
    keep_outputs,
    make_out_dir,
    rules_for,
)

pytestmark = pytest.mark.unit

JUNIT = '<testsuite name="s"><testcase name="t"/></testsuite>\n'
LOG = "line one\nline two\n"


def sha(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


async def run_on_scripted_switchboard(
    start: StartJob, kept_dir: Path, work: Path, stop: bool = False, sink: OutputSink | None = None
) -> list[Event]:
    """Run `start` on a noop supervisor linked to a scripted switchboard (which stops the
    run once it runs, with `stop`); return the run's events in the order they came."""
    events: list[Event] = []
    done = asyncio.Event()

    async def switchboard(ws) -> None:
        hello = codec.decode_from_supervisor(await ws.recv(decode=False))
        assert isinstance(hello, Hello)
        await ws.send(codec.encode(Welcome(version="1.3", session=1, last_seq=0)), text=True)
        await ws.send(codec.encode(start), text=True)
        async for frame in ws:
            event = codec.decode_from_supervisor(frame)
            if isinstance(event, Event):
                events.append(event)
                await ws.send(codec.encode(Ack(seq=event.seq)), text=True)
                if stop and isinstance(event, JobStateChanged) and event.phase == Phase.RUNNING:
                    stop_job = StopJob(job_id=start.job_id, attempt=start.attempt, grace_s=1.0)
                    await ws.send(codec.encode(stop_job), text=True)
                if isinstance(event, JobStateChanged) and is_terminal(event.phase):
                    done.set()

    server = await websockets.serve(
        switchboard, "127.0.0.1", 0, subprotocols=[websockets.Subprotocol(limits.SUBPROTOCOL)]
    )
    port = server.sockets[0].getsockname()[1]
    sink = sink or DirectorySink(kept_dir)
    if isinstance(sink, StoppingSink):
        sink.stop = lambda: supervisor.stop_job(StopJob(job_id=start.job_id, attempt=1))
    supervisor = BackendSupervisor(NoopBackend(), work_dir=work, outputs=sink)
    connector = WebSocketConnector(
        supervisor, f"ws://127.0.0.1:{port}/ws/supervisor", "sbt_test", supervisor_id="outs"
    )
    running = asyncio.create_task(connector.run())
    try:
        await asyncio.wait_for(done.wait(), 20)
    finally:
        connector.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, 10)
        server.close()
    return events


def kinds(events: list[Event]) -> list[str]:
    return [e.phase.value if isinstance(e, JobStateChanged) else type(e).__name__ for e in events]


async def test_files_come_after_the_program_and_before_exit(tmp_path):
    start = StartJob(
        job_id="j1",
        attempt=1,
        backend=NoopSpec(
            exit_code=1,
            files={"reports/junit.xml": JUNIT, "logs/a.log": LOG, "other.txt": "not kept"},
        ),
        collect=[
            CollectRule("reports/*.xml"),
            CollectRule("logs/*.log", "on_failure"),
            CollectRule("*.txt", "on_success"),
        ],
    )
    events = await run_on_scripted_switchboard(start, tmp_path / "kept", tmp_path / "work")
    assert kinds(events)[-3:] == ["JobFiles", "JobExit", "failed"], kinds(events)
    assert "running" in kinds(events)[: kinds(events).index("JobFiles")]
    files = events[-3]
    assert isinstance(files, JobFiles)
    assert files.files == [
        OutputFile("logs/a.log", len(LOG), sha(LOG), "text/plain"),
        OutputFile("reports/junit.xml", len(JUNIT), sha(JUNIT), "application/xml"),
    ]
    assert files.refused == [] and files.refused_unlisted == 0
    assert (tmp_path / "kept" / "reports/junit.xml").read_text() == JUNIT
    assert not (tmp_path / "kept" / "other.txt").exists()  # its rule was on_success
    exit_event = events[-2]
    assert isinstance(exit_event, JobExit) and exit_event.exit_code == 1
    # The run's directory, output directory and all, is gone once it ended.
    assert not list((tmp_path / "work" / "runs").iterdir())


async def test_a_file_over_the_cap_is_refused_the_others_kept(tmp_path):
    start = StartJob(
        job_id="j2",
        attempt=1,
        backend=NoopSpec(files={"big.log": "x" * 2000, "small.log": "y" * 10, "empty.log": ""}),
        collect=[CollectRule("*.log", "on_success")],
        collect_limits=CollectLimits(max_file_bytes=1000),
    )
    events = await run_on_scripted_switchboard(start, tmp_path / "kept", tmp_path / "work")
    assert kinds(events)[-3:] == ["JobFiles", "JobExit", "succeeded"], kinds(events)
    files = events[-3]
    assert isinstance(files, JobFiles)
    assert [f.path for f in files.files] == ["empty.log", "small.log"]
    assert files.refused == [RefusedFile("big.log", "2000 bytes, over the cap of 1000 a file")]


async def test_a_run_keeping_nothing_sends_no_files_event(tmp_path):
    start = StartJob(job_id="j3", attempt=1, backend=NoopSpec(files={"a.log": "a"}))
    events = await run_on_scripted_switchboard(start, tmp_path / "kept", tmp_path / "work")
    assert "JobFiles" not in kinds(events)
    assert kinds(events)[-2:] == ["JobExit", "succeeded"]


async def test_nothing_matched_is_one_empty_files_event(tmp_path):
    start = StartJob(
        job_id="j4",
        attempt=1,
        backend=NoopSpec(exit_code=0, files={"a.log": "a"}),
        collect=[CollectRule("*.log", "on_failure")],
    )
    events = await run_on_scripted_switchboard(start, tmp_path / "kept", tmp_path / "work")
    assert kinds(events)[-3:] == ["JobFiles", "JobExit", "succeeded"]
    files = events[-3]
    assert isinstance(files, JobFiles) and files.files == [] and files.refused == []


async def test_a_stop_before_the_program_ran_keeps_nothing(tmp_path):
    # Canceled while fetching its (never served) inputs: the program never ran, so there
    # is nothing to collect and no `files` event.
    from protocol.messages import InputFile

    start = StartJob(
        job_id="j5",
        attempt=1,
        backend=NoopSpec(),
        inputs=[InputFile("x", "sha256:" + "ab" * 32)],
        collect=[CollectRule("*")],
    )
    events = await run_on_scripted_switchboard(start, tmp_path / "kept", tmp_path / "work")
    assert "JobFiles" not in kinds(events)
    assert kinds(events)[-1] == Phase.REJECTED.value


async def test_a_symlink_out_of_the_directory_is_refused_never_copied(tmp_path):
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "a.log").write_text(LOG)
    os.symlink("/etc/passwd", out / "logs" / "passwd.log")
    os.symlink("/etc", out / "etc")
    kept = await keep_outputs(
        out,
        ["logs/*.log", "etc/passwd"],
        Caps(max_files=10, max_file_bytes=1 << 20, max_total_bytes=1 << 20),
        DirectorySink(tmp_path / "kept"),
    )
    assert [f.path for f in kept.files] == ["logs/a.log"]
    assert kept.refused == [
        RefusedFile("etc", "a symbolic link: never followed"),
        RefusedFile("logs/passwd.log", "a symbolic link: never followed"),
    ]
    assert sorted(p.name for p in (tmp_path / "kept").rglob("*")) == ["a.log", "logs"]


async def test_a_canceled_run_keeps_its_on_failure_files_while_terminating(tmp_path):
    start = StartJob(
        job_id="j6",
        attempt=1,
        backend=NoopSpec(delay_s=30, files={"logs/a.log": LOG, "ok.txt": "fine"}),
        collect=[CollectRule("logs/*.log", "on_failure"), CollectRule("ok.txt", "on_success")],
    )
    events = await run_on_scripted_switchboard(
        start, tmp_path / "kept", tmp_path / "work", stop=True
    )
    assert kinds(events)[-5:] == ["running", "terminating", "JobFiles", "JobExit", "canceled"]
    files = events[-3]
    assert isinstance(files, JobFiles)
    assert [f.path for f in files.files] == ["logs/a.log"]


class StoppingSink(DirectorySink):
    """Copies like run-local, but has the run stopped while it keeps the first file."""

    stop: Callable[[], Awaitable[None]]

    async def keep(self, file: BinaryIO, found: Collected) -> str:
        await self.stop()
        return await super().keep(file, found)


async def test_a_stop_after_the_program_ended_changes_nothing(tmp_path):
    start = StartJob(
        job_id="j7", attempt=1, backend=NoopSpec(files={"a.log": "a"}), collect=[CollectRule("*")]
    )
    sink = StoppingSink(tmp_path / "kept")
    events = await run_on_scripted_switchboard(
        start, tmp_path / "kept", tmp_path / "work", sink=sink
    )
    assert kinds(events)[-3:] == ["JobFiles", "JobExit", "succeeded"], kinds(events)
    assert "terminating" not in kinds(events)


def test_when_decides_by_the_ending():
    rules = [CollectRule("a"), CollectRule("s", "on_success"), CollectRule("f", "on_failure")]
    assert rules_for(rules, "exited", 0) == ["a", "s"]
    assert rules_for(rules, "exited", 3) == ["a", "f"]
    assert rules_for(rules, "timeout", None) == ["a", "f"]
    assert rules_for(rules, "canceled", None) == ["a", "f"]


async def test_a_file_whose_upload_is_refused_is_listed_with_the_reason(tmp_path):
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"error":"forbidden","message":"the token may not upload"}'
        writer.write(
            b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.log").write_text(LOG)
    (out / "empty.log").write_text("")
    sink = SwitchboardSink(httpx.AsyncClient(), f"http://127.0.0.1:{port}")
    try:
        kept = await keep_outputs(out, ["*.log"], caps_for(None), sink)
    finally:
        await sink.close()
        server.close()
    # The empty file needs no upload: it is kept under the digest of no bytes.
    assert [(f.path, f.size, f.digest) for f in kept.files] == [("empty.log", 0, EMPTY_DIGEST)]
    assert [r.path for r in kept.refused] == ["a.log"]
    assert "refused (403)" in kept.refused[0].reason, kept.refused


def test_the_output_directory_starts_empty_and_writable_for_anyone(tmp_path):
    stale = tmp_path / "run" / "out"
    (stale / "deep").mkdir(parents=True)
    (stale / "deep" / "old.log").write_text("from a crashed try")
    out = make_out_dir(tmp_path / "run")
    assert out == stale and list(out.iterdir()) == []
    assert out.stat().st_mode & 0o777 == 0o777
    out.rmdir()
    os.symlink("/etc", out)  # never followed, never emptied
    assert make_out_dir(tmp_path / "run") == out and not out.is_symlink()
    assert Path("/etc/passwd").exists()
