"""The objects one switchboard process shares between its API, sessions and dispatcher."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar.connection import ASGIConnection

from switchboard.artifact_blobs import ArtifactBlobs
from switchboard.changes import Changes
from switchboard.config import Settings
from switchboard.dispatcher import Dispatcher
from switchboard.hub import Hub
from switchboard.live import LiveFeed
from switchboard.store.base import Store
from switchboard.waiters import JobWaiters


@dataclass
class AppState:
    settings: Settings
    store: Store
    hub: Hub
    dispatcher: Dispatcher
    artifacts: ArtifactBlobs
    live: LiveFeed
    changes: Changes
    waiters: JobWaiters

    def close_streams(self) -> None:
        """The server is stopping: end the dashboards' event streams, answer the waiters."""
        self.live.close()
        self.waiters.close()


def app_state(connection: ASGIConnection[Any, Any, Any, Any]) -> AppState:
    """The switchboard's shared objects, from a request or a WebSocket."""
    return connection.app.state.switchboard
