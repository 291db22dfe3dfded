"""The scenario about files (protocol 1.3, docs/conformance.md): a run's inputs fetched
from the kit and checked by digest, and a run's output files judged against its
`collect_limits`, listed in a `files` event before its `exit`. Each fills in its rows;
KitFailure when it cannot go on.

Uploads are plain HTTP (`PUT /api/v1/uploads/{digest}`), outside the WebSocket protocol:
the kit only looks at files a supervisor must refuse without uploading them.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence

from protocol.messages import (
    CollectLimits,
    CollectRule,
    InputFile,
    JobErrorReport,
    JobExit,
    JobFiles,
    StartJob,
)
from protocol.spec import NoopBackend

from . import sup_rules as rules
from .sup_kit import Checks, Kit
from .sup_link import Link

#: Longest a short run with files may take from start_job to its terminal state.
RUN_TIMEOUT_S = 10.0
ROWS = ("files.inputs", "files.input_invalid", "files.refused")


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def files(kit: Kit, checks: Checks) -> None:
    link = await kit.connected()
    if link.minor < 3:
        for row in ROWS:
            checks.add(row, True, f"n/a: {link.welcome.version} has no files")
        return
    await _inputs(kit, link, checks)
    await _refused(link, checks)


async def _inputs(kit: Kit, link: Link, checks: Checks) -> None:
    # New bytes each time: a cache the supervisor kept from an earlier kit run can't hold them.
    data = b"an input the kit serves, " + secrets.token_hex(8).encode() + b"\n"
    good = _digest(data)
    kit.server.artifacts[good] = data
    await link.peer.send(_noop("cf-input", inputs=[InputFile(path="data.txt", digest=good)]))
    events = await link.until_end("cf-input", RUN_TIMEOUT_S)
    problems = rules.phase_problems(events) + rules.order_problems(events)
    if rules.terminal(events) != "succeeded":
        problems.append(f"ended {rules.terminal(events)}, not succeeded")
    fetched = [auth for digest, auth in kit.server.fetches if digest == good]
    if not fetched:
        problems.append(f"never asked for GET /api/v1/artifacts/{good}")
    elif any(auth is None or not auth.startswith("Bearer ") for auth in fetched):
        problems.append("asked for the artifact without its bearer token")
    checks.require(
        "files.inputs", problems, f"fetched {len(fetched)} time(s); {rules.describe(events)}"
    )

    wrong = _digest(b"what the digest names")
    kit.server.artifacts[wrong] = b"other bytes under that name"
    await link.peer.send(_noop("cf-input-bad", inputs=[InputFile(path="x.bin", digest=wrong)]))
    events = await link.until_end("cf-input-bad", RUN_TIMEOUT_S)
    story = rules.describe(events)
    errors = [e.kind.value for e in events if isinstance(e, JobErrorReport)]
    problems = rules.phase_problems(events) + rules.order_problems(events)
    if rules.terminal(events) != "rejected" or errors != ["input_invalid"]:
        problems.append(f"got {story}, expected error(input_invalid) then rejected")
    if "running" in rules.phases(events):
        problems.append("ran the program with an input of the wrong content")
    checks.require("files.input_invalid", problems, f"bytes of another digest: {story}")


async def _refused(link: Link, checks: Checks) -> None:
    start = _noop(
        "cf-files",
        files={"big.bin": "x" * 64, "huge.bin": "y" * 128, "skip.txt": "not matched"},
        collect=[CollectRule(pattern="*.bin")],
        collect_limits=CollectLimits(max_files=10, max_file_bytes=32, max_total_bytes=1024),
    )
    await link.peer.send(start)
    events = await link.until_end("cf-files", RUN_TIMEOUT_S)
    listed = [e for e in events if isinstance(e, JobFiles)]
    problems = rules.phase_problems(events) + rules.order_problems(events)
    problems += _files_problems(events, listed)
    refused = sorted(r.path for event in listed for r in event.refused)
    checks.require(
        "files.refused",
        problems,
        f"refused {refused} (over max_file_bytes 32), before exit; {rules.describe(events)}",
    )


def _files_problems(events: Sequence[object], listed: list[JobFiles]) -> list[str]:
    """§5.1: every matching file over a limit is named as refused, with the limit, none
    kept, nothing the rules don't match listed; the `files` events come before `exit`."""
    problems = []
    kept = [f.path for event in listed for f in event.files]
    refused = {r.path: r.reason for event in listed for r in event.refused}
    if not listed:
        return ["no files event"]
    if kept:
        problems.append(f"kept {kept}, which are over max_file_bytes")
    if sorted(refused) != ["big.bin", "huge.bin"]:
        problems.append(f"refused {sorted(refused)}, expected big.bin and huge.bin")
    if any(not reason for reason in refused.values()):
        problems.append("a refusal without its reason")
    exits = [i for i, e in enumerate(events) if isinstance(e, JobExit)]
    last_files = max(i for i, e in enumerate(events) if isinstance(e, JobFiles))
    if not exits or last_files > exits[0]:
        problems.append("files event after exit (or no exit)")
    return problems


def _noop(job_id: str, *, files: dict[str, str] | None = None, **fields: object) -> StartJob:
    return StartJob(
        job_id=job_id,
        attempt=1,
        backend=NoopBackend(files=files or {}),
        name=f"conformance {job_id}",
        **fields,  # type: ignore[arg-type]
    )
