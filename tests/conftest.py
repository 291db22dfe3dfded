"""Shared fixtures: real server and supervisor processes on loopback, an SQLite store on
disk, WASI programs compiled from C. And the kinds of test: every test has one or more
(registered in pyproject.toml), so each kind can be run apart with `pytest -m KIND`."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from switchboard.store.sqlite import SQLiteStore
from tests import wasi
from tests.docker_engine import docker_engine_fixture  # noqa: F401 - one engine per session
from tests.harness import Switchboard


@pytest.fixture(scope="module")
def switchboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Switchboard]:
    """A switchboard process on a fresh data dir, shared by one test module."""
    server = Switchboard(tmp_path_factory.mktemp("switchboard") / "data")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("work")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    """An SQLite store on disk, open."""
    s = SQLiteStore(tmp_path / "db.sqlite3")
    await s.open()
    yield s
    await s.close()


@pytest.fixture(scope="session")
def program(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., bytes]:
    """Compiled module bytes for a tests.wasi source constant name (cached across runs
    in .pytest_cache when the cache plugin is on)."""
    cache = getattr(request.config, "cache", None)
    out_dir = Path(cache.mkdir("wasi")) if cache else tmp_path_factory.mktemp("wasi")

    def build(name: str, source: str | None = None) -> bytes:
        source = getattr(wasi, name) if source is None else source
        return wasi.compile_c(source, out_dir, name.lower()).read_bytes()

    return build


#: The kinds of test, as marks: a test has at least one.
KINDS = ("unit", "slow", "process", "docker", "wasm", "browser", "postgres", "bench")
#: Kinds that start nothing, so go with no other kind.
IN_PROCESS = ("unit", "slow")
#: Fixtures whose use says a test's kind (a module marks what its fixtures don't tell).
KIND_OF_FIXTURE = {
    "switchboard": "process",
    "docker_engine": "docker",
    "program": "wasm",
    "postgres": "postgres",
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects: an unmarked test is never missed
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    wrong = []
    for item in items:
        for fixture, kind in KIND_OF_FIXTURE.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(kind)
        kinds = {mark.name for mark in item.iter_markers() if mark.name in KINDS}
        if not kinds:
            wrong.append(f"{item.nodeid}: no kind; mark it with one of {', '.join(KINDS)}")
        elif len(kinds) > 1 and (alone := kinds.intersection(IN_PROCESS)):
            wrong.append(f"{item.nodeid}: {' and '.join(sorted(kinds))}: {min(alone)} goes alone")
    if wrong:
        raise pytest.UsageError("tests without a proper kind:\n" + "\n".join(wrong))


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """`-m unit` (or slow) skips importing the modules that mark no such test: importing all
    of them (Docker, Playwright, schemathesis...) costs as much as running the unit tests.
    Only for those kinds: a unit or slow test is always marked in its module's text."""
    wanted = set(re.findall(r"\w+", config.option.markexpr or "")) - {"or"}
    if not wanted or not wanted <= set(IN_PROCESS) or not collection_path.name.startswith("test_"):
        return None
    text = collection_path.read_text() if collection_path.suffix == ".py" else ""
    return None if any(re.search(rf"\bmark\.{kind}\b", text) for kind in wanted) else True


#: What starts a process; a unit or slow test calling any of them fails.
_SPAWNERS = [
    (subprocess.Popen, "_execute_child"),  # subprocess.run, asyncio's subprocesses too
    *((os, name) for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system")),
]


@contextlib.contextmanager
def _no_process(item: pytest.Item) -> Iterator[None]:
    """While it lasts, a unit or slow test that starts a process fails."""
    if not any(item.get_closest_marker(kind) for kind in IN_PROCESS):
        yield
        return
    saved = [(owner, name, getattr(owner, name)) for owner, name in _SPAWNERS]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{item.nodeid} may not start a process: mark it process")

    for owner, name, _ in saved:
        setattr(owner, name, refuse)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


# A unit or slow test (its fixtures included) starts no process: one that does is marked
# with the wrong kind.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    with _no_process(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    with _no_process(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    if nextitem is None:
        # The session's last test also ends the session's fixtures (a private Docker
        # engine, a PostgreSQL cluster), which stop processes of their own: not its doing.
        yield
        return
    with _no_process(item):
        yield
