"""A job's output files on the command line: listed, and downloaded into a directory with
their paths kept, never outside it, each checked against its digest."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from protocol.globs import is_relative_path
from switchboard.cli_output import table
from switchboard.client import Client, ClientError


def files_table(listing: dict[str, Any]) -> str:
    """The run's kept files, then those refused and why."""
    if listing["attempt"] is None:
        return "no output files"
    lines = [f"run {listing['attempt']}:"]
    rows = [(f["path"], f["size"], f["media_type"], _report(f)) for f in listing["files"]]
    if rows:
        lines.append(table(rows, ("PATH", "BYTES", "TYPE", "REPORT")))
    for refused in listing["refused"]:
        lines.append(f"  not kept: {refused['path']}: {refused['reason']}")
    if listing["refused_unlisted"]:
        lines.append(f"  not kept: {listing['refused_unlisted']} more, not listed")
    return "\n".join(lines)


def _report(file: dict[str, Any]) -> str:
    if file["report"] is None:
        return ""
    return f"refused: {file['report_error']}" if file["report"] == "refused" else file["report"]


def tests_line(tests: dict[str, Any] | None) -> str | None:
    """The test summary of a job (its `tests`), for people; None: no reports."""
    if not tests:
        return None
    return (
        f"tests: {tests['total']} ({tests['passed']} passed, {tests['failed']} failed,"
        f" {tests['error']} errors, {tests['skipped']} skipped)"
    )


#: How long an ended job's reports may take to parse before its summary is shown anyway.
REPORTS_WAIT_S = 60.0


def reports_parsed(api: Client, job_id: str) -> dict[str, Any]:
    """The files of an ended job's latest run, once none of its reports is still waiting
    to be parsed (they are parsed after the run's files are stored), or after
    REPORTS_WAIT_S."""
    deadline = time.monotonic() + REPORTS_WAIT_S
    while True:
        listing = api.get(f"/api/v1/jobs/{job_id}/files")
        pending = any(f["report"] == "pending" for f in listing["files"])
        if not pending or time.monotonic() > deadline:
            return listing
        time.sleep(0.2)


def target(into: Path, path: str) -> Path:
    """Where file `path` (as the switchboard names it) goes under `into`; ClientError for a
    path that would land outside it (absolute, `..`, or through a link in `into`)."""
    if not is_relative_path(path):
        raise ClientError(f"refusing to write output file {path!r}: not a relative path")
    where = into.joinpath(*path.split("/"))
    where.parent.mkdir(parents=True, exist_ok=True)
    if not where.parent.resolve().is_relative_to(into.resolve()):
        raise ClientError(f"refusing to write output file {path!r}: it leads out of {into}")
    return where


def download(api: Client, job_id: str, listing: dict[str, Any], into: Path) -> int:
    """Download every kept file of the run in `listing` under `into`; the number written.
    Each is written to a temporary file, checked against its digest, then renamed."""
    into.mkdir(parents=True, exist_ok=True)
    attempt = listing["attempt"]
    for file in listing["files"] if attempt is not None else []:
        where = target(into, file["path"])
        url = f"/api/v1/jobs/{job_id}/files/{quote(file['path'])}?attempt={attempt}"
        fd, temp = tempfile.mkstemp(dir=where.parent, prefix=".download-")
        try:
            with os.fdopen(fd, "wb") as out:
                api.download(url, out)
            digest = "sha256:" + _sha256(Path(temp))
            if digest != file["digest"]:
                raise ClientError(f"{file['path']}: downloaded {digest}, expected {file['digest']}")
            os.replace(temp, where)  # replaces a link there, never follows it
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
    return len(listing["files"]) if attempt is not None else 0


def _sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        while piece := f.read(1024 * 1024):
            hasher.update(piece)
    return hasher.hexdigest()
