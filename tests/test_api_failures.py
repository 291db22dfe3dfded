"""When the store fails under a running switchboard: readiness says 503, liveness stays up,
and every other route answers 500 `internal` without a word of the failure's internals
(those go to the log). The store's reads are made to fail from inside the process (the
one stand-in in this file): nothing outside can make a live SQLite database fail on
demand, as root, without also stopping the server."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest
from litestar.testing import TestClient

from switchboard.app import create_app
from switchboard.auth import Role, create_token
from switchboard.config import Settings
from switchboard.store.sqlite import SQLiteStore
from tests.harness import scaled

pytestmark = pytest.mark.unit


async def _admin_token(settings: Settings) -> str:
    store = SQLiteStore(settings.database_path)
    await store.open()
    try:
        return (await create_token(store, Role.ADMIN, "t")).token
    finally:
        await store.close()


def test_a_failing_store_gives_503_ready_and_500_elsewhere(tmp_path, caplog, monkeypatch):
    settings = Settings(data_dir=tmp_path)
    token = asyncio.run(_admin_token(settings))
    app = create_app(settings)
    state = app.state.switchboard
    with TestClient(app) as client:
        headers = {"Authorization": f"Bearer {token}"}
        # Ready once the dispatcher task has started.
        deadline = time.monotonic() + scaled(10)
        while client.get("/api/v1/ready").status_code != 200:
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.02)
        assert client.get("/api/v1/jobs", headers=headers).status_code == 200

        # From now on every read of the store fails as a dying disk makes it fail.
        async def failing_read(fn):
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(state.store, "_read", failing_read)

        ready = client.get("/api/v1/ready")
        listed = client.get("/api/v1/jobs", headers=headers)
        assert ready.status_code == 503
        assert ready.json()["store"] is False
        assert client.get("/api/v1/health").status_code == 200
        assert listed.status_code == 500
        body = listed.json()
        assert body["error"] == "internal"
        text = listed.text.lower()
        for leak in ("sqlite", "disk", "traceback", "operationalerror", str(tmp_path).lower()):
            assert leak not in text, leak
        # The operator still learns what failed: the log has it.
        logged = "\n".join(
            record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
            for record in caplog.records
        )
        assert "disk I/O error" in logged, logged
