"""A run's inputs: the artifacts its StartJob names, placed read-only in its input
directory (`<run work dir>/in`, which the backends show the program as `/in`) before the
program starts.

Each artifact is fetched once per host into a cache (`<work dir>/input-cache`, bounded by
`cache_max_bytes`, least recently used first out), checked against its digest when it is
downloaded and again when a run takes it from the cache, then linked (or copied, across
file systems) into the run's directory. An input with `unpack` is a tar archive (plain, or
compressed with gzip, bzip2 or xz) unpacked into the directory it names, through tarfile's
`data` filter: a member that would land outside that directory (an absolute name, `..`, a
link pointing out) or that is a device or a pipe fails the run, and so does an archive with
more than MAX_MEMBERS members. All inputs of a run together, files and unpacked bytes, may
take at most `max_bytes`. Once placed, files are read-only (0444, or 0555 if the archive
made them executable) and directories 0555.

Every failure is a JobError `input_invalid` naming the input and what was wrong with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
import threading
from pathlib import Path

from protocol.exceptions import JobError, JobErrorKind
from protocol.limits import clip_message
from protocol.messages import InputFile
from protocol.spec import input_overlap
from supervisor import metrics
from supervisor.artifacts import CHUNK, ArtifactSource

#: The run's input directory, under its work dir; the program sees it as GUEST_PATH.
IN_DIR = "in"
GUEST_PATH = "/in"
#: Most members one tar input may have (each costs a file and its metadata).
MAX_MEMBERS = 100_000

_MB = 1024 * 1024


class InputCache:
    """Input artifacts on this host, by digest: fetched from `source` once, kept under
    `root` up to `max_bytes` (least recently used go first)."""

    def __init__(self, source: ArtifactSource, root: Path, max_bytes: int) -> None:
        self.source = source
        self.root = root
        self.max_bytes = max_bytes
        #: digest -> set when the fetch under way ends, so that runs needing the same
        #: artifact at the same time fetch it once.
        self._fetching: dict[str, asyncio.Event] = {}
        #: Artifacts downloaded, and runs that found theirs in the cache.
        self.downloads = 0
        self.hits = 0

    async def get(self, digest: str, max_bytes: int) -> Path:
        """The cached file of `digest`, fetched if missing (at most `max_bytes`), checked
        against the digest. Raises JobError like ArtifactSource.download."""
        while (busy := self._fetching.get(digest)) is not None:
            await busy.wait()  # then find it cached (or fetch it, if that one failed)
        done = self._fetching[digest] = asyncio.Event()
        try:
            return await self._get(digest, max_bytes)
        finally:
            del self._fetching[digest]
            done.set()

    async def _get(self, digest: str, max_bytes: int) -> Path:
        path = self.root / digest.replace(":", "-")
        if await asyncio.to_thread(_intact, path, digest):
            self.hits += 1
            metrics.cache_lookup("input", hit=True)
            return path
        metrics.cache_lookup("input", hit=False)
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".download-")
        os.close(fd)
        try:
            await self.source.download(digest, Path(tmp), max_bytes)
            os.chmod(tmp, 0o444)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self.downloads += 1
        await asyncio.to_thread(self._evict, path)
        return path

    def _evict(self, keep: Path) -> None:
        """Remove the least recently used files until the cache fits its bound."""
        entries = []
        for entry in os.scandir(self.root):
            if entry.is_file() and not entry.name.startswith("."):
                info = entry.stat()
                entries.append((info.st_mtime, info.st_size, Path(entry.path)))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path != keep:
                path.unlink(missing_ok=True)
                total -= size


def _intact(path: Path, digest: str) -> bool:
    """True if `path` holds the artifact `digest` (a damaged copy is removed); marks it
    used."""
    sha = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                sha.update(chunk)
    except FileNotFoundError:
        return False
    if "sha256:" + sha.hexdigest() != digest:
        path.unlink(missing_ok=True)
        return False
    os.utime(path)
    return True


async def place_inputs(
    inputs: list[InputFile],
    work_dir: Path,
    cache: InputCache,
    max_bytes: int,
    stop: threading.Event | None = None,
) -> Path:
    """Fetch every input and place it under `work_dir/in`; return that directory. Raises
    JobError(input_invalid) naming the input that could not be placed. Setting `stop`
    (the run is being stopped) ends an unpacking thread at its next member."""
    if (overlap := input_overlap(i.path for i in inputs)) is not None:
        raise JobError(JobErrorKind.INPUT_INVALID, overlap)
    root = work_dir / IN_DIR
    await asyncio.to_thread(_fresh_dir, root)
    budget = _Budget(max_bytes)
    for item in inputs:
        where = item.path.rstrip("/")
        try:
            cached = await cache.get(item.digest, budget.max_bytes)
            if item.unpack:
                await asyncio.to_thread(_unpack, cached, root / where, budget, stop)
            else:
                await asyncio.to_thread(_link, cached, root / where, budget)
        except JobError as exc:
            if isinstance(exc, _TooMuch):
                metrics.limit_exceeded("inputs")
            raise _input_error(item, exc.description) from None
        except (OSError, tarfile.TarError, EOFError) as exc:  # EOFError: a cut-off archive
            raise _input_error(item, f"{type(exc).__name__}: {exc}") from None
    await asyncio.to_thread(_seal, root)
    return root


def _input_error(item: InputFile, why: str) -> JobError:
    what = f"input {item.path + '/' if item.unpack else item.path!r} ({item.digest})"
    return JobError(JobErrorKind.INPUT_INVALID, clip_message(f"{what}: {why}") or "")


class _TooMuch(JobError):
    """A run's inputs are over its budget."""


class _Budget:
    """What a run's inputs may still take, in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.left = max_bytes

    def take(self, size: int) -> None:
        self.left -= size
        if self.left < 0:
            raise _TooMuch(
                JobErrorKind.INPUT_INVALID,
                f"the run's inputs take more than {self.max_bytes // _MB} MB, this"
                " supervisor's limit",
            )


def _link(cached: Path, dest: Path, budget: _Budget) -> None:
    """Place a cached file at `dest` (a hard link, or a copy across file systems)."""
    budget.take(cached.stat().st_size)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(cached, dest)
    except OSError:
        shutil.copyfile(cached, dest)
        os.chmod(dest, 0o444)


def _unpack(archive: Path, dest: Path, budget: _Budget, stop: threading.Event | None) -> None:
    """Unpack a tar archive into the new directory `dest`, member by member through the
    `data` filter, counting unpacked bytes against the budget before each is written."""
    if not hasattr(tarfile, "data_filter"):
        # Python before 3.11.4 has no extraction filter: refuse rather than unpack unsafely.
        raise JobError(
            JobErrorKind.INPUT_INVALID,
            "this supervisor's Python has no safe tar extraction (tarfile.data_filter, 3.11.4"
            " and later): archive inputs are refused here",
        )
    dest.mkdir(parents=True)
    with tarfile.open(archive, "r:*") as tar:
        for count, member in enumerate(tar, start=1):
            if stop is not None and stop.is_set():
                raise JobError(JobErrorKind.INPUT_INVALID, "stopped while unpacking")
            if count > MAX_MEMBERS:
                raise JobError(
                    JobErrorKind.INPUT_INVALID, f"the archive has more than {MAX_MEMBERS} members"
                )
            if member.name.startswith("/"):
                raise JobError(
                    JobErrorKind.INPUT_INVALID,
                    f"member {member.name!r} has an absolute path",
                )
            try:
                safe = tarfile.data_filter(member, str(dest))
            except tarfile.FilterError as exc:
                raise JobError(JobErrorKind.INPUT_INVALID, f"refused: {exc}") from None
            if safe.isfile():
                budget.take(safe.size)
            tar.extract(safe, dest, set_attrs=True, filter="fully_trusted")


def _seal(root: Path) -> None:
    """Make everything under `root` read-only: files 0444 (0555 if executable), dirs 0555
    (deepest first, so each is still writable while its entries change)."""
    for parent, dirs, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(parent, name)
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode):
                os.chmod(path, 0o555 if info.st_mode & stat.S_IXUSR else 0o444)
        for name in dirs:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                os.chmod(path, 0o555)
    os.chmod(root, 0o555)


def _fresh_dir(root: Path) -> None:
    """An empty `root` (a crashed earlier try of the run may have left one behind)."""
    if root.exists():
        _writable(root)
        shutil.rmtree(root)
    root.mkdir(parents=True)


def _writable(root: Path) -> None:
    """Make the directories under `root` writable again, so their entries can go."""
    if not root.is_dir() or root.is_symlink():
        return
    os.chmod(root, 0o755)
    for parent, dirs, _ in os.walk(root):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(parent, d))]
        for name in dirs:
            os.chmod(os.path.join(parent, name), 0o755)


def remove_run_dir(work_dir: Path) -> None:
    """Remove a run's work dir, its read-only input directory included (blocking: call it
    from a worker thread)."""
    with contextlib.suppress(OSError):
        _writable(work_dir / IN_DIR)
    shutil.rmtree(work_dir, ignore_errors=True)
