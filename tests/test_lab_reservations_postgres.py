"""Reservations end to end (tests/test_lab_reservations.py) on a switchboard serving
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
from tests.test_lab_reservations import *  # noqa: F403 - the tests, run here again
from tests.test_lab_reservations import LEASE_MAX_S, TTL_S

pytestmark = [pytest.mark.postgres, pytest.mark.process]


@pytest.fixture(scope="module")
def switchboard(
    tmp_path_factory: pytest.TempPathFactory, postgres: Cluster
) -> Iterator[Switchboard]:
    server = Switchboard(
        tmp_path_factory.mktemp("reservations") / "data",
        database=postgres.new_database("lab_reservations"),
        extra_args=(
            *("--reservation-ttl", str(TTL_S)),
            *("--lease-default", "30"),
            *("--lease-max", str(LEASE_MAX_S)),
        ),
    )
    yield server
    server.stop()
