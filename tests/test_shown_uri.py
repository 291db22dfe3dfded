"""A PostgreSQL URI as messages and logs show it (switchboard/store/uri.py): never its
password, whether in its user part or a parameter; the rest as given."""

from __future__ import annotations

import pytest

from switchboard.pg_backup import _split_password
from switchboard.store.uri import shown_uri

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("postgresql://sb@db.lab:5432/sb", "postgresql://sb@db.lab:5432/sb"),
        ("postgresql://sb:s3cret@db.lab/sb", "postgresql://sb:***@db.lab/sb"),
        ("postgres://sb:p%40ss@db.lab/sb?sslmode=require", "postgres://sb:***@db.lab/sb?sslmode=require"),
        ("postgresql://db.lab/sb?user=sb&password=x&sslmode=verify-full",
         "postgresql://db.lab/sb?user=sb&password=***&sslmode=verify-full"),
        ("postgresql:///sb", "postgresql:///sb"),
    ],
)  # fmt: skip
def test_the_password_is_never_shown(uri, shown):
    assert shown_uri(uri) == shown


def test_pg_dump_gets_the_password_apart_from_the_uri():
    assert _split_password("postgresql://sb:p%40ss@db.lab/sb?sslmode=require") == (
        "postgresql://sb@db.lab/sb?sslmode=require",
        "p%40ss",
    )
    assert _split_password("postgresql://db.lab/sb?password=x&user=sb") == (
        "postgresql://db.lab/sb?user=sb",
        "x",
    )
    assert _split_password("postgresql://sb@db.lab/sb") == ("postgresql://sb@db.lab/sb", None)
