"""A run's outputs: the writable directory its program gets (`<run work dir>/out`, which the
backends show as `/out`), and, once the program has ended, keeping the files its StartJob's
`collect` rules name (docs/protocol.md §5.1 `files`, docs/jobs.md "Outputs").

Keeping goes: the rules whose `when` fits how the program ended; supervisor.collect walks
the directory (never following a link) within the run's caps (its `collect_limits`, or the
defaults, each held to this supervisor's own cap if lower); each file found is handed to a
sink, which keeps exactly the size collect() took of it (an upload to the switchboard, or a
copy to a local directory for `run-local`); the result is what the `files` event(s) say.
A file its sink could not keep is listed as refused, with the reason. Nothing here blocks
the event loop: the walk, hashing and copying run in worker threads, uploads are HTTP
requests on the loop.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import BinaryIO, NamedTuple

import httpx

from protocol.limits import EMPTY_DIGEST
from protocol.messages import CollectLimits, CollectRule, OutputFile, RefusedFile
from supervisor import metrics
from supervisor.collect import Caps, Collected, Collection, collect, open_collected
from supervisor.uploads import UploadError, upload_file

log = logging.getLogger("supervisor.outputs")

#: The run's output directory, under its work dir; the program sees it as GUEST_PATH.
OUT_DIR = "out"
GUEST_PATH = "/out"


def make_out_dir(work_dir: Path) -> Path:
    """A fresh, empty output directory for the run (blocking: call it from a thread).
    Mode 0777: a container may run as any user (a name the host can't resolve, too), and
    must be able to write there; nothing but the run's own directory leads to it."""
    out = work_dir / OUT_DIR
    if out.is_symlink() or not out.is_dir():
        out.unlink(missing_ok=True)
    else:  # left by a crashed earlier try of the run
        shutil.rmtree(out)
    out.mkdir(parents=True)
    os.chmod(out, 0o777)
    return out


def rules_for(rules: list[CollectRule], exit_reason: str, exit_code: int | None) -> list[str]:
    """The patterns whose `when` fits the program's ending: on_success for `exited` with
    code 0, on_failure for anything else, always for both."""
    succeeded = exit_reason == "exited" and exit_code == 0
    wanted = {"always", "on_success" if succeeded else "on_failure"}
    return [rule.pattern for rule in rules if rule.when in wanted]


def caps_for(limits: CollectLimits | None, own: CollectLimits | None = None) -> Caps:
    """The caps of one run: its StartJob's limits (else the defaults), each held to this
    supervisor's own limit if it has one."""
    given = limits or CollectLimits()
    mine = own or given
    return Caps(
        max_files=min(given.max_files, mine.max_files),
        max_file_bytes=min(given.max_file_bytes, mine.max_file_bytes),
        max_total_bytes=min(given.max_total_bytes, mine.max_total_bytes),
    )


class OutputSink(abc.ABC):
    """Where kept files go."""

    @abc.abstractmethod
    async def keep(self, file: BinaryIO, found: Collected) -> str:
        """Keep the first `found.size` bytes of `file` (opened by open_collected); return
        their digest. Raises UploadError or OSError with a reason for people."""

    async def close(self) -> None:
        """Release connections."""


class SwitchboardSink(OutputSink):
    """Uploads each file to the switchboard (`PUT /api/v1/uploads/{digest}`, resumable)
    with the supervisor's own credential and TLS settings: `client` is one made by
    supervisor.artifacts.switchboard_client."""

    def __init__(self, client: httpx.AsyncClient, base_url: str) -> None:
        self.client = client
        self.base_url = base_url

    async def keep(self, file: BinaryIO, found: Collected) -> str:
        if found.size == 0:
            return EMPTY_DIGEST  # always stored: nothing to send
        return await upload_file(self.client, self.base_url, None, file, size=found.size)

    async def close(self) -> None:
        await self.client.aclose()


class DirectorySink(OutputSink):
    """Copies each file to `root/<its path>` (`supervisor run-local --outputs-dir`)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    async def keep(self, file: BinaryIO, found: Collected) -> str:
        return await asyncio.to_thread(_copy, file, found.size, self.root / found.path)


class ListingSink(OutputSink):
    """Keeps nothing, only says what the file is (`run-local` without --outputs-dir)."""

    async def keep(self, file: BinaryIO, found: Collected) -> str:
        return await asyncio.to_thread(_copy, file, found.size, None)


def _copy(file: BinaryIO, size: int, dest: Path | None) -> str:
    """The digest of the first `size` bytes of `file`, written to `dest` if given."""
    sha = hashlib.sha256()
    out = None
    if dest is not None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        out = open(dest, "wb")  # closed below
    try:
        offset = 0
        while offset < size:
            piece = os.pread(file.fileno(), min(1024 * 1024, size - offset), offset)
            if not piece:
                raise OSError(f"it shrank to {offset} bytes while being read")
            sha.update(piece)
            if out is not None:
                out.write(piece)
            offset += len(piece)
    finally:
        if out is not None:
            out.close()
    return "sha256:" + sha.hexdigest()


class Kept(NamedTuple):
    """What became of a run's output files: the `files` event's three fields."""

    files: list[OutputFile]
    refused: list[RefusedFile]
    refused_unlisted: int


async def keep_outputs(
    root: Path,
    patterns: list[str],
    caps: Caps,
    sink: OutputSink,
    run: str = "",
) -> Kept:
    """Collect the files under `root` matching `patterns` within `caps` and keep each
    through `sink`. Never raises for a file: one that can't be kept is refused, with the
    reason."""
    collection: Collection
    try:
        collection = await asyncio.to_thread(collect, root, patterns, caps)
    except (OSError, ValueError) as exc:  # the directory itself is gone or a link
        log.warning("run %s: output directory not searched: %s", run, exc)
        collection = Collection()
        collection.refuse(".", f"the output directory could not be searched: {exc}")
    kept: list[OutputFile] = []
    for found in collection.files:
        try:
            file = await asyncio.to_thread(open_collected, root, found.path)
            try:
                digest = await sink.keep(file, found)
            finally:
                file.close()
        except (UploadError, OSError) as exc:
            log.warning("run %s: output %s not kept: %s", run, found.path, exc)
            collection.refuse(found.path, f"not kept: {exc}")
            continue
        kept.append(OutputFile(found.path, found.size, digest, found.media_type))
    refused = [RefusedFile(r.path, r.reason) for r in collection.refused]
    refused.sort(key=lambda r: r.path)
    unlisted = collection.refused_unlisted
    metrics.output_files(kept=len(kept), refused=len(refused) + unlisted)
    if refused:
        log.info(
            "run %s: %d output file(s) kept, %d refused (first: %s: %s)",
            run,
            len(kept),
            len(refused) + unlisted,
            refused[0].path,
            refused[0].reason,
        )
    return Kept(kept, refused, unlisted)
