"""The docker backend's way to the engine: one client, and the threads its calls run on.

Why a module of its own: the Docker SDK blocks, so every engine call runs in a worker
thread, and the backend's parts (container lifecycle, images, output) share one client and
one set of threads: short calls in a small pool, and per followed container one long-lived
thread that copies its output and then waits for its end. Nothing blocks the event loop.
The client connects on first use, and learns the engine's CPU count and architecture then.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import docker
import docker.errors

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Short engine calls in flight at once.
CALL_THREADS = 32
#: Threads that follow one container each (created on demand).
STREAM_THREADS = 4096


class EngineClient:
    def __init__(self, docker_host: str | None, *, timeout_s: float) -> None:
        #: The engine's address (None: DOCKER_HOST, else the default socket).
        self.docker_host = docker_host
        self._timeout_s = timeout_s
        self._api: docker.APIClient | None = None
        self._connect_lock = asyncio.Lock()
        self._calls = ThreadPoolExecutor(CALL_THREADS, thread_name_prefix="docker")
        self._streams = ThreadPoolExecutor(STREAM_THREADS, thread_name_prefix="docker-stream")
        #: The engine's CPU count, once connected.
        self.cpus: int | None = None
        #: The engine's architecture (normalized), once connected.
        self.arch: str | None = None

    async def client(self) -> docker.APIClient:
        """The client, connected on first use (RuntimeError if the engine is unreachable)."""
        if self._api is None:
            async with self._connect_lock:
                if self._api is None:
                    self._api = await asyncio.to_thread(self._connect)
        return self._api

    def _connect(self) -> docker.APIClient:
        """A client for the engine (worker thread: it asks the engine for its API version)."""
        kwargs: dict[str, Any] = (
            {"base_url": self.docker_host}
            if self.docker_host is not None
            else docker.utils.kwargs_from_env()
        )
        try:
            api = docker.APIClient(
                version="auto",
                timeout=self._timeout_s,
                max_pool_size=512,
                **kwargs,
            )
            version = api.version()
            self.cpus = api.info().get("NCPU") or None
        except docker.errors.DockerException as exc:
            where = self.docker_host or os.environ.get("DOCKER_HOST") or "the default socket"
            raise RuntimeError(f"the Docker engine at {where} is not reachable: {exc}") from None
        self.arch = normalize_arch(version.get("Arch", ""))
        log.info(
            "Docker engine %s (API %s, %s) at %s",
            version.get("Version"),
            api.api_version,
            version.get("Arch"),
            api.base_url,
        )
        return api

    def connected(self) -> docker.APIClient:
        """The connected client (worker threads: they start once it is connected)."""
        assert self._api is not None
        return self._api

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one blocking SDK call in the call pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._calls, functools.partial(fn, *args, **kwargs))

    def in_stream_thread(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run `fn` (which blocks until a container ends) on a thread of its own."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._streams, functools.partial(fn, *args))

    async def close(self) -> None:
        """Drop queued calls and close the client (threads still following a container end
        once their connection is cut)."""
        self._calls.shutdown(wait=False, cancel_futures=True)
        self._streams.shutdown(wait=False, cancel_futures=True)
        if self._api is not None:
            api, self._api = self._api, None
            await asyncio.to_thread(api.close)


def explain(exc: docker.errors.APIError) -> str:
    explanation = exc.explanation
    if isinstance(explanation, bytes):
        explanation = explanation.decode(errors="replace")
    return str(explanation or exc)


def normalize_arch(arch: str) -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(arch, arch)
