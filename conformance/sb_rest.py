"""The switchboard's REST API as the kit uses it: submit a job, cancel it, read it back.

Only the few routes of docs/jobs.md the scenarios need; what the switchboard answers is
returned as plain JSON (or bytes, for output), for the scenarios to judge.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import Any

import httpx

#: Phases after which a job does not change (docs/protocol.md §7.1).
TERMINAL = frozenset(
    {"succeeded", "failed", "timed_out", "canceled", "lost", "exhausted", "rejected"}
)


class RestError(Exception):
    """The API answered something the kit did not ask for (an error status)."""


class SwitchboardApi:
    """A token's view of one switchboard's jobs."""

    def __init__(self, base_url: str, token: str, verify: ssl.SSLContext | bool = True) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=30.0,
            verify=verify,
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = await self._client.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise RestError(f"{method} {path}: HTTP {response.status_code} {response.text[:300]}")
        return response

    async def submit(self, spec: dict[str, Any]) -> str:
        """Submit a job; its id."""
        created = (await self._call("POST", "/api/v1/jobs", json=spec)).json()
        job_id: str = created["id"]
        return job_id

    async def cancel(self, job_id: str) -> None:
        await self._call("POST", f"/api/v1/jobs/{job_id}/cancel")

    async def job(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = (await self._call("GET", f"/api/v1/jobs/{job_id}")).json()
        return job

    async def output(self, job_id: str, stream: str = "stdout") -> bytes:
        """What is stored of the latest run's `stream`."""
        path = f"/api/v1/jobs/{job_id}/output"
        return (await self._call("GET", path, params={"stream": stream})).content

    async def wait_job(
        self, job_id: str, done: set[str] | frozenset[str], within: float
    ) -> dict[str, Any]:
        """Poll until the job's phase is one of `done` (or time is up); the job last read."""
        deadline = time.monotonic() + within
        while True:
            job = await self.job(job_id)
            if job["phase"] in done or time.monotonic() >= deadline:
                return job
            await asyncio.sleep(0.1)

    async def wait_run(
        self, job_id: str, attempt: int, phases: set[str], within: float
    ) -> dict[str, Any] | None:
        """Poll until run `attempt` of the job is in one of `phases`; that run, or the run
        (or None) last read when time is up."""
        deadline = time.monotonic() + within
        while True:
            runs = (await self.job(job_id)).get("runs") or []
            run = next((r for r in runs if r.get("attempt") == attempt), None)
            if (run is not None and run.get("phase") in phases) or time.monotonic() >= deadline:
                return run
            await asyncio.sleep(0.1)
