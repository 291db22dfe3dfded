"""Output collection (supervisor.collect) against directories a hostile job could leave:
globs, caps, symlinks out of the directory, FIFOs, sockets, files growing meanwhile."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor import collect as collect_module
from supervisor.collect import Caps, Collected, Refused, collect, open_collected

pytestmark = pytest.mark.unit

ROOMY = Caps(max_files=100, max_file_bytes=1 << 20, max_total_bytes=1 << 24)


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _paths(found: list[Collected]) -> list[str]:
    return [f.path for f in found]


def test_globs_match_within_a_component_and_across_directories(tmp_path: Path):
    root = _tree(
        tmp_path,
        {
            "out/a.xml": b"<a/>",
            "out/x/y/b.xml": b"<b/>",
            "out/x/c.log": b"c",
            "out/.hidden.xml": b"<h/>",
            "out/run1.txt": b"1",
            "out/run22.txt": b"22",
            "out/d.bin": b"\0",
            "elsewhere/e.xml": b"<e/>",
        },
    )
    found = collect(root, ["out/**/*.xml", "out/run?.txt", "out/[cd].*"], ROOMY)
    assert found.refused == []
    assert found.files == [
        Collected("out/.hidden.xml", 4, "application/xml"),
        Collected("out/a.xml", 4, "application/xml"),
        Collected("out/d.bin", 1, "application/octet-stream"),
        Collected("out/run1.txt", 1, "text/plain"),
        Collected("out/x/y/b.xml", 4, "application/xml"),
    ]
    assert _paths(collect(root, ["**/*.log"], ROOMY).files) == ["out/x/c.log"]
    assert _paths(collect(root, ["out/*"], ROOMY).files) == [
        "out/.hidden.xml",
        "out/a.xml",
        "out/d.bin",
        "out/run1.txt",
        "out/run22.txt",
    ]
    assert collect(root, ["nothing/**"], ROOMY).files == []


@pytest.mark.parametrize(
    "rule", ["", "/etc/passwd", "../x", "out/../../etc", "out//a", "./a", "a\\b"]
)
def test_a_rule_that_could_leave_the_directory_is_refused(tmp_path: Path, rule: str):
    with pytest.raises(ValueError, match=r"relative path|component"):
        collect(tmp_path, [rule], ROOMY)


def test_symlinks_are_reported_never_followed(tmp_path: Path):
    root = _tree(tmp_path / "out", {"real.txt": b"ok"})
    (root / "passwd.txt").symlink_to("/etc/passwd")
    (root / "etc").symlink_to("/etc")
    (root / "inside.txt").symlink_to(root / "real.txt")
    found = collect(root, ["**/*"], ROOMY)
    assert _paths(found.files) == ["real.txt"]
    assert found.refused == [
        Refused("etc", "a symbolic link: never followed"),
        Refused("inside.txt", "a symbolic link: never followed"),
        Refused("passwd.txt", "a symbolic link: never followed"),
    ]
    # A rule naming a path through the link: the link is what is refused.
    through = collect(root, ["etc/passwd"], ROOMY)
    assert (through.files, through.refused) == (
        [],
        [Refused("etc", "a symbolic link: never followed")],
    )
    # The directory itself may not be a link either.
    (tmp_path / "link").symlink_to(root)
    with pytest.raises(OSError):
        collect(tmp_path / "link", ["*"], ROOMY)


def test_a_fifo_and_a_socket_are_refused_without_blocking(tmp_path: Path):
    root = _tree(tmp_path, {"ok.log": b"fine"})
    os.mkfifo(root / "pipe.log")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(root / "sock.log"))
    found: list[object] = []
    # Opening the FIFO for reading would wait for a writer forever: run it aside.
    worker = threading.Thread(target=lambda: found.append(collect(root, ["*.log"], ROOMY)))
    worker.start()
    worker.join(10)
    server.close()
    assert not worker.is_alive(), "collect blocked on the FIFO"
    [result] = found
    assert isinstance(result, collect_module.Collection)
    assert _paths(result.files) == ["ok.log"]
    assert result.refused == [
        Refused("pipe.log", "not a regular file (a FIFO)"),
        Refused("sock.log", "not a regular file (a socket)"),
    ]


def test_caps_refuse_in_path_order_with_the_reason(tmp_path: Path):
    root = _tree(
        tmp_path,
        {
            "a.bin": b"a" * 40,
            "b.bin": b"b" * 200,
            "c.bin": b"c" * 50,
            "d.bin": b"d" * 5,
            "e.bin": b"e" * 1,
            "f.bin": b"f" * 1,
        },
    )
    found = collect(root, ["*.bin"], Caps(max_files=3, max_file_bytes=100, max_total_bytes=60))
    assert found.files == [
        Collected("a.bin", 40, "application/octet-stream"),
        Collected("d.bin", 5, "application/octet-stream"),
        Collected("e.bin", 1, "application/octet-stream"),
    ]
    assert found.refused == [
        Refused("b.bin", "200 bytes, over the cap of 100 a file"),
        Refused("c.bin", "50 bytes would take the total over the cap of 60"),
        Refused("f.bin", "over the cap of 3 files"),
    ]


def test_refusals_past_the_listed_many_are_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(collect_module, "MAX_REFUSED_LISTED", 3)
    root = _tree(tmp_path, {f"{n}.log": b"x" for n in range(5)})
    found = collect(root, ["*.log"], Caps(max_files=0, max_file_bytes=10, max_total_bytes=10))
    assert (len(found.refused), found.refused_unlisted) == (3, 2)


def test_a_growing_file_keeps_the_size_it_had(tmp_path: Path):
    first = b"first part\n" * 100
    root = _tree(tmp_path, {"out/grow.log": first})
    [found] = collect(root, ["out/*.log"], ROOMY).files
    with (root / "out/grow.log").open("ab") as more:
        more.write(b"written after collection\n" * 100)
    with open_collected(root, found.path) as file:
        sent = file.read(found.size)
    assert found.size == len(first)
    assert hashlib.sha256(sent).digest() == hashlib.sha256(first).digest()


def test_opening_a_collected_file_never_follows_a_link_put_in_its_way(tmp_path: Path):
    root = _tree(tmp_path / "out", {"d/report.xml": b"<r/>"})
    [found] = collect(root, ["d/*.xml"], ROOMY).files
    (root / "d/report.xml").unlink()
    (root / "d").rmdir()
    elsewhere = _tree(tmp_path / "elsewhere", {"report.xml": b"secret"})
    (root / "d").symlink_to(elsewhere)
    with pytest.raises(OSError):
        open_collected(root, found.path)
    (root / "d").unlink()
    (root / "d").mkdir()
    (root / "d/report.xml").symlink_to("/etc/passwd")
    with pytest.raises(OSError):
        open_collected(root, found.path)
    with pytest.raises(ValueError):
        open_collected(root, "../elsewhere/report.xml")


def test_directories_deeper_than_the_limit_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(collect_module, "MAX_DEPTH", 3)
    root = _tree(tmp_path, {"a/b/ok.txt": b"ok", "a/b/c/d/deep.txt": b"deep"})
    found = collect(root, ["**/*.txt"], ROOMY)
    assert _paths(found.files) == ["a/b/ok.txt"]
    assert found.refused == [Refused("a/b/c", "a directory deeper than 3 levels: not searched")]


def test_an_unreadable_file_is_refused():
    root = Path(tempfile.mkdtemp(prefix="collect-"))  # not under pytest's 0700 dirs
    try:
        root.chmod(0o755)
        _tree(root, {"locked.log": b"x", "open.log": b"y"})
        (root / "open.log").chmod(0o644)
        (root / "locked.log").chmod(0)
        with _unprivileged():
            found = collect(root, ["*.log"], ROOMY)
    finally:
        shutil.rmtree(root)
    assert _paths(found.files) == ["open.log"]
    assert found.refused == [Refused("locked.log", "unreadable: Permission denied")]


@contextlib.contextmanager
def _unprivileged() -> Iterator[None]:
    """Root reads any file: as root, act as nobody for a moment (the real uid stays root,
    so the effective one comes back)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
