"""The objects one switchboard process shares between its API, sessions and dispatcher."""

from __future__ import annotations

from dataclasses import dataclass

from switchboard.artifacts import ArtifactFiles
from switchboard.config import Settings
from switchboard.dispatcher import Dispatcher
from switchboard.sessions import Hub
from switchboard.store.base import Store


@dataclass
class AppState:
    settings: Settings
    store: Store
    hub: Hub
    dispatcher: Dispatcher
    artifacts: ArtifactFiles
