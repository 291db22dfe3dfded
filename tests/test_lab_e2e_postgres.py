"""The hardware lab end to end (tests/test_lab_e2e.py) on a switchboard serving
PostgreSQL: the same tests, imported, with the module's switchboard on a database of the
private cluster (tests/postgres.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import Switchboard
from tests.postgres import (
    Cluster,
    postgres_fixture,  # noqa: F401 - one cluster per session
)
from tests.test_lab_e2e import *  # noqa: F403 - the lab's tests, run here again

pytestmark = [pytest.mark.postgres, pytest.mark.process]


@pytest.fixture(scope="module")
def switchboard(
    tmp_path_factory: pytest.TempPathFactory, postgres: Cluster
) -> Iterator[Switchboard]:
    dsn = postgres.new_database("lab_e2e")
    server = Switchboard(tmp_path_factory.mktemp("switchboard") / "data", database=dsn)
    yield server
    server.stop()
