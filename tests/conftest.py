"""Shared fixtures: real server and supervisor processes on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

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
