"""The quota of a Wasm guest's /scratch: how much disk it holds, measured from the guest's
own thread.

Why measuring, not a file system of fixed size per run: that needs root and `mount`
(a loop device or a tmpfs), which a supervisor on a plain machine doesn't have; and why
not RLIMIT_FSIZE: it is per process, and guests are threads of the supervisor. WASI
preview 1 writes go straight from Wasmtime to the host file, so they can't be intercepted
from Python either. So the wasm backend calls `ScratchQuota.check()` from the guest's
epoch callback (every tick while the guest runs wasm) and kills the guest once its
/scratch holds more than the quota. Walking /scratch costs time per file, so walks are
spaced by their cost; but the file system's use is one cheap system call, and a guest
can't pass its quota without the file system growing by what it had left, so that growth
triggers a walk at once. The guest can overshoot by what it writes in a tick (10 ms) plus
one write call (at most its linear memory); docs/wasm.md says so.

What counts: the blocks every file and directory under /scratch takes on disk, at least
BLOCK each (so a million empty files count too), a file with several links once, and the
files the guest deleted but still holds open (their space is only freed when they are
closed). Those are found through /proc/self/fd, which lists every file the supervisor has
open: too many to look through at every tick, so that happens when the file system under
/scratch has grown by DELETED_SCAN_GROWTH since the last look, and at least every
DELETED_SCAN_S.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

#: The least any file or directory counts for (a file system block).
BLOCK = 4096
#: Walks take at most 1/SPACING of a guest's time: the next one waits SPACING x the last
#: one's duration (unless the file system grows by what the guest had left of its quota).
SPACING = 4
#: File system growth that always triggers a walk, however little the guest had left.
GROWTH_MIN = 1024 * 1024
#: The supervisor's open files are looked through for deleted ones when the file system
#: has grown by this much since the last look, and at least this often.
DELETED_SCAN_GROWTH = 8 * 1024 * 1024
DELETED_SCAN_S = 1.0


class ScratchQuota:
    """The quota of one guest's scratch directory."""

    def __init__(self, root: Path, limit_bytes: int, *, min_interval_s: float) -> None:
        self.root = root
        self.limit = limit_bytes
        self._prefix = str(root.resolve()) + os.sep
        self._device = os.stat(root).st_dev
        self._min_interval = min_interval_s
        self._next = 0.0
        self._fs_used = 0  # the file system's use at the last walk
        #: What the last walk found (bytes).
        self.used = 0

    def check(self) -> bool:
        """Walk /scratch if that is due (cheap otherwise); True if it holds more than the
        quota. For the guest's own thread."""
        now = time.monotonic()
        fs_used = _fs_used(self.root)
        if now < self._next and fs_used - self._fs_used < max(self.limit - self.used, GROWTH_MIN):
            return False
        return self.check_now(now, fs_used)

    def check_now(self, now: float | None = None, fs_used: int | None = None) -> bool:
        """Walk /scratch now; True if it holds more than the quota."""
        started = time.monotonic() if now is None else now
        self._fs_used = _fs_used(self.root) if fs_used is None else fs_used
        deleted = _DELETED.under(self._prefix, self._device, self._fs_used)
        self.used = _tree_usage(self.root, self.limit) + deleted
        took = time.monotonic() - started
        self._next = started + max(self._min_interval, SPACING * took)
        if self.used <= self.limit:
            return False
        # The walk stopped at the quota: once, to say how far past it the guest got, all.
        self.used = _tree_usage(self.root, None) + deleted
        return True


def _tree_usage(root: Path, limit: int | None) -> int:
    """Bytes the files and directories under `root` take (at least BLOCK each), counted
    until past `limit` if there is one (so a walk costs at most limit / BLOCK entries).
    Never follows a symbolic link; entries vanishing meanwhile are skipped."""
    total = 0
    linked: set[tuple[int, int]] = set()
    directories = [str(root)]
    while directories:
        try:
            entries = os.scandir(directories.pop())
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    if (st.st_dev, st.st_ino) in linked:
                        continue
                    linked.add((st.st_dev, st.st_ino))
                total += max(st.st_blocks * 512, BLOCK)
                if limit is not None and total > limit:
                    return total
                if stat.S_ISDIR(st.st_mode):
                    directories.append(entry.path)
    return total


def _fs_used(path: Path) -> int:
    """Bytes in use on the file system holding `path` (one cheap system call)."""
    fs = os.statvfs(path)
    return (fs.f_blocks - fs.f_bfree) * fs.f_frsize


class _DeletedFiles:
    """Deleted files this process still holds open, by the path they had: a snapshot of
    /proc/self/fd, shared by all guests (it looks at every open file of the supervisor)
    and taken again by whichever guest asks once it is stale."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._taken = float("-inf")
        #: File system (device) -> bytes in use on it when the snapshot was taken.
        self._fs_used: dict[int, int] = {}
        self._files: list[tuple[str, int]] = []

    def under(self, prefix: str, device: int, fs_used: int) -> int:
        """Bytes the deleted, still open files whose path started with `prefix` take;
        `fs_used` is the use of their file system (`device`) now."""
        stale = (
            time.monotonic() - self._taken >= DELETED_SCAN_S
            or abs(fs_used - self._fs_used.get(device, -DELETED_SCAN_GROWTH)) >= DELETED_SCAN_GROWTH
        )
        if stale and self._lock.acquire(False):  # another guest taking it: use the last one
            try:
                self._files = _open_deleted_files()
                self._taken = time.monotonic()
                self._fs_used[device] = fs_used
            finally:
                self._lock.release()
        return sum(size for path, size in self._files if path.startswith(prefix))


def _open_deleted_files() -> list[tuple[str, int]]:
    found: dict[tuple[int, int], tuple[str, int]] = {}
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:  # no /proc: not Linux
        return []
    for fd in fds:
        link = f"/proc/self/fd/{fd}"
        try:
            target = os.readlink(link)
            if not target.endswith(" (deleted)"):
                continue
            st = os.stat(link)  # the open file itself
        except OSError:
            continue  # closed meanwhile
        if stat.S_ISREG(st.st_mode):
            size = max(st.st_blocks * 512, BLOCK)
            found[(st.st_dev, st.st_ino)] = (target.removesuffix(" (deleted)"), size)
    return list(found.values())


_DELETED = _DeletedFiles()
