"""A small REST client for the switchboard, used by the `switchboard job ...` commands."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx


class ClientError(Exception):
    """The switchboard said no (or couldn't be reached); the message says why."""


class ApiClient:
    def __init__(self, url: str | None = None, token: str | None = None) -> None:
        url = url or os.environ.get("SWITCHBOARD_URL", "http://127.0.0.1:8765")
        token = token or os.environ.get("SWITCHBOARD_TOKEN")
        if not token:
            raise ClientError("no token: pass --token or set SWITCHBOARD_TOKEN")
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(30.0, read=None),  # follows wait as long as jobs run
        )

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach the switchboard at {self.url}: {exc}") from None
        if response.status_code >= 400:
            try:
                body = response.json()
                text = f"{body.get('error')}: {body.get('message')}"
            except ValueError:
                text = response.text[:200]
            raise ClientError(f"{method} {path} failed with HTTP {response.status_code}: {text}")
        return response

    def submit(self, spec: bytes) -> str:
        headers = {"content-type": "application/json"}
        return self._call("POST", "/api/v1/jobs", content=spec, headers=headers).json()["id"]

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/api/v1/jobs/{job_id}/cancel").json()

    def output(self, job_id: str, stream: str) -> bytes:
        return self._call("GET", f"/api/v1/jobs/{job_id}/output", params={"stream": stream}).content

    def follow(self, job_id: str, stream: str, attempt: int) -> Iterator[bytes]:
        """A run's stream, its bytes as they are stored, until the run ends."""
        path = f"/api/v1/jobs/{job_id}/output/follow"
        params = {"stream": stream, "attempt": attempt}
        try:
            with self._http.stream("GET", path, params=params) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ClientError(f"following {stream} failed: HTTP {response.status_code}")
                yield from response.iter_bytes()
        except httpx.HTTPError as exc:
            raise ClientError(f"lost the switchboard while following {stream}: {exc}") from None
