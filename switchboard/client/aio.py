"""The asyncio client: `AsyncClient(url, token)` and `AsyncJob`, the same methods as the
blocking `Client` and `Job` (switchboard.client.sync), awaited. Thousands of jobs may be
waited for at once: `as_completed` waits for up to 500 of them in one request."""

# ruff: noqa: ASYNC109 - a `timeout` here is a wait's budget across requests and retries
# (as the blocking client's), ending in WaitTimeout with the job as last seen.

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import msgspec

from switchboard.client import batching, core
from switchboard.client.batching import ALONE, Call
from switchboard.client.core import Deadline, Params, Retry, SpecLike
from switchboard.client.errors import BadRequest, ClientError, ConnectionFailed, WaitTimeout
from switchboard.client.settings import settings
from switchboard.models import (
    ArtifactStored,
    BatchCreated,
    CancelAccepted,
    JobCreated,
    JobSummary,
    JobView,
)


class AsyncClient:
    """A switchboard's REST API for asyncio, over one connection pool; settings, retries
    and errors as `Client`'s. `run()` calls made at once (asyncio.gather, many tasks)
    share requests, as `Client.run`'s from many threads."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        ca_file: str | None = None,
        token_file: str | None = None,
        timeout_s: float = 30.0,
        retry: Retry | None = None,
        max_connections: int = 100,
    ) -> None:
        found = settings(url, token, ca_file, token_file)
        self.url = found.url
        self.retry = retry or Retry()
        self._slice = core.WaitSlice()
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {found.token}"},
            timeout=timeout_s,
            verify=found.ca_file or True,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )
        # run()'s natural batching (switchboard.client.batching).
        self._runs = 0
        self._submissions = batching.Submissions()
        self._waits = batching.Waits()

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Any = None,
        content: bytes | Callable[[], AsyncIterator[bytes]] | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
        deadline: Deadline | None = None,
    ) -> httpx.Response:
        """One request, retried as `Client.request` says."""
        attempt = 0
        timeout = httpx.USE_CLIENT_DEFAULT if timeout_s is None else timeout_s
        while True:
            try:
                body = content() if callable(content) else content
                response = await self._http.request(
                    method, path, params=params, content=body, headers=headers, timeout=timeout
                )
            except httpx.TransportError as exc:
                sent = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
                if (sent and method != "GET") or not await self._pause(attempt, None, deadline):
                    raise ConnectionFailed(
                        f"cannot reach the switchboard at {self.url}: {exc}"
                    ) from None
                attempt += 1
                continue
            if response.status_code in core.RETRY_STATUSES and await self._pause(
                attempt, response.headers.get("retry-after"), deadline
            ):
                attempt += 1
                continue
            if response.status_code >= 400:
                raise core.refusal(method, path, response.status_code, response.content)
            return response

    async def _pause(
        self, attempt: int, retry_after: str | None, deadline: Deadline | None
    ) -> bool:
        if deadline is None and attempt + 1 >= self.retry.attempts:
            return False
        delay = self.retry.delay(attempt, retry_after)
        if deadline is not None:
            if deadline.over():
                return False
            delay = min(delay, deadline.left())
        await asyncio.sleep(delay)
        return True

    # --- jobs --------------------------------------------------------------------------

    async def submit(self, spec: SpecLike, params: Params | None = None) -> AsyncJob:
        body = core.spec_body(spec, params)
        response = await self.request("POST", "/api/v1/jobs", content=body, headers=core.JSON_BODY)
        created = core.decode(JobCreated, response.content)
        return AsyncJob(self, created.id, created)

    async def run(
        self,
        spec: SpecLike,
        params: Params | None = None,
        timeout: float | None = None,
        *,
        check: bool = True,
    ) -> JobView:
        """Submit and wait: the ended job (see Client.run). Alone, in one request; calls
        made while others are in flight share requests."""
        deadline = Deadline(timeout)
        body = core.spec_body(spec, params)
        alone = self._runs == 0
        self._runs += 1
        try:
            if alone:
                return core.checked(await self._run_alone(body, deadline), check)
            call = Call(body, deadline, wake=asyncio.Event())
            return core.checked(await self._run_joined(call), check)
        finally:
            self._runs -= 1

    async def _run_alone(self, body: bytes, deadline: Deadline) -> JobView:
        while True:
            wait = deadline.slice(self._slice.s)
            try:
                response = await self.request(
                    "POST",
                    "/api/v1/jobs",
                    params={"wait": wait},
                    content=body,
                    headers=core.JSON_BODY,
                    timeout_s=wait + core.WAIT_MARGIN_S,
                )
                break
            except BadRequest as exc:  # (a refused wait stores no job)
                self._slice.shorten(exc, wait)
        created = core.decode(JobCreated, response.content)
        job = created.job
        if job is None or not core.ended(job):
            job = await self._wait(created.id, deadline, job)
        return job

    async def _run_joined(self, call: Call) -> JobView:
        submitted = await self._submit_joined(call)
        if isinstance(submitted, ClientError):
            raise submitted
        if submitted is ALONE:
            return await self._run_alone(call.body, call.deadline)
        waited = await self._wait_joined(call)
        if isinstance(waited, ClientError):
            raise waited
        if waited is ALONE:
            return await self._wait(call.job_id, call.deadline, None)
        assert isinstance(waited, JobView)
        return waited

    async def _submit_joined(self, call: Call) -> batching.Result:
        """As Client._submit_joined: the call's job id once a batch holding it was sent."""
        self._submissions.add(call)
        while True:
            while (result := call.settled()) is None:
                if batch := self._submissions.take():
                    break
                await _woken(call.wake, None)
            else:
                return result
            outcome: list[str] | ClientError | batching.Alone = ConnectionFailed(
                "the batch holding this job was not sent"
            )
            try:
                content = b"[" + b",".join(c.body for c in batch) + b"]"
                response = await self.request(
                    "POST", "/api/v1/jobs/batch", content=content, headers=core.JSON_BODY
                )
                outcome = [made.id for made in core.decode(BatchCreated, response.content).jobs]
            except ClientError as exc:
                outcome = batching.batch_failed(exc)
            finally:
                for woken in self._submissions.sent(batch, outcome):
                    woken.wake.set()

    async def _wait_joined(self, call: Call) -> batching.Result:
        """As Client._wait_joined: the call's job once it ended, asked for with others'."""
        self._waits.add(call)
        try:
            while True:
                while (result := call.settled()) is None and not call.deadline.over():
                    if ids := self._waits.take(call, time.monotonic()):
                        break
                    await _woken(call.wake, self._waits.pause_s(call.deadline, time.monotonic()))
                else:
                    if result is not None:
                        return result
                    ids = []
                if not ids:
                    raise await self._timed_out(call)
                await self._ask_ended(call, ids)
        finally:
            self._waits.leave(call)

    async def _ask_ended(self, call: Call, ids: list[str]) -> None:
        """As Client._ask_ended: one request for the jobs `ids` names."""
        outcome: list[JobView] | ClientError | batching.Alone | None = None
        wait = call.deadline.slice(self._slice.s)
        try:
            response = await self.request(
                "GET",
                "/api/v1/jobs/ended",
                params={"ids": ",".join(ids), "wait": wait},
                timeout_s=wait + core.WAIT_MARGIN_S,
                deadline=call.deadline,
            )
            outcome = core.decode(list[JobView], response.content)
        except ConnectionFailed:
            pass  # (asked again until the deadline: each call's own deadline now)
        except BadRequest as exc:
            if exc.field != "wait":
                outcome = exc
            else:
                self._slice.shorten(exc, wait)
        except ClientError as exc:
            outcome = batching.wait_failed(exc)
        finally:
            for woken in self._waits.answered(ids, outcome):
                woken.wake.set()

    async def _timed_out(self, call: Call) -> WaitTimeout:
        """WaitTimeout, with the job as it is now if a quick look finds it."""
        try:
            response = await self._http.get(f"/api/v1/jobs/{call.job_id}", timeout=core.LOOK_S)
            last = core.decode(JobView, response.content) if response.is_success else None
        except (httpx.HTTPError, msgspec.DecodeError):
            last = None
        return WaitTimeout(call.job_id, last, call.deadline.timeout_s or 0.0)

    async def submit_many(
        self, specs: Iterable[SpecLike], params: Params | None = None
    ) -> list[AsyncJob]:
        bodies = [core.spec_body(spec, params) for spec in specs]
        jobs = []
        for chunk in core.chunks(bodies, core.MAX_BATCH):
            content = b"[" + b",".join(chunk) + b"]"
            response = await self.request(
                "POST", "/api/v1/jobs/batch", content=content, headers=core.JSON_BODY
            )
            for created in core.decode(BatchCreated, response.content).jobs:
                jobs.append(AsyncJob(self, created.id, created))
        return jobs

    def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, job_id)

    async def get_job(self, job_id: str) -> JobView:
        response = await self.request("GET", f"/api/v1/jobs/{job_id}")
        return core.decode(JobView, response.content)

    async def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        *,
        check: bool = True,
    ) -> JobView:
        return core.checked(await self._wait(job_id, Deadline(timeout), None), check)

    async def _wait(self, job_id: str, deadline: Deadline, last: JobView | None) -> JobView:
        waiting = core.JobWaiting(job_id, deadline, last)
        while True:
            params, timeout_s = waiting.next_request(self._slice.s)
            try:
                response = await self.request(
                    "GET", waiting.path, params=params, timeout_s=timeout_s, deadline=deadline
                )
            except ConnectionFailed:
                raise waiting.timed_out() from None
            except BadRequest as exc:
                self._slice.shorten(exc, params["wait"])
                continue
            if (job := waiting.answered(response.content)) is not None:
                return job

    async def as_completed(
        self, jobs: Iterable[AsyncJob], timeout: float | None = None
    ) -> AsyncIterator[AsyncJob]:
        """Each job as it ends (`summary` set), as `Client.as_completed`."""
        completion = core.Completion(jobs, Deadline(timeout))
        while completion.pending:
            params, timeout_s = completion.next_request(self._slice.s)
            try:
                response = await self.request(
                    "GET",
                    "/api/v1/jobs",
                    params=params,
                    timeout_s=timeout_s,
                    deadline=completion.deadline,
                )
            except BadRequest as exc:
                self._slice.shorten(exc, params["wait"])
                continue
            for job in completion.ended(response.content):
                yield job

    async def cancel(self, job_id: str) -> CancelAccepted:
        response = await self.request("POST", f"/api/v1/jobs/{job_id}/cancel")
        return core.decode(CancelAccepted, response.content)

    async def output(
        self, job_id: str, stream: str = "stdout", attempt: int | None = None
    ) -> bytes:
        params = {"stream": stream, **({"attempt": attempt} if attempt else {})}
        response = await self.request("GET", f"/api/v1/jobs/{job_id}/output", params=params)
        return response.content

    async def follow(
        self, job_id: str, stream: str = "stdout", attempt: int | None = None
    ) -> AsyncIterator[bytes]:
        """A run's stream, live, resumed where it stopped if the connection breaks."""
        path = f"/api/v1/jobs/{job_id}/output/follow"
        offset = 0
        failures = 0
        while True:
            if attempt is None and offset:
                attempt = (await self.get_job(job_id)).runs[-1].attempt
            params: dict[str, Any] = {"stream": stream, "start": offset}
            if attempt is not None:
                params["attempt"] = attempt
            try:
                async with self._http.stream(
                    "GET", path, params=params, timeout=core.FOLLOW_TIMEOUT
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise core.refusal("GET", path, response.status_code, response.content)
                    async for chunk in response.aiter_bytes():
                        offset += len(chunk)
                        failures = 0
                        yield chunk
                return
            except httpx.TransportError as exc:
                if not await self._pause(failures, None, None):
                    raise ConnectionFailed(
                        f"lost the switchboard while following {stream}: {exc}"
                    ) from None
                failures += 1

    async def upload(self, data: bytes | Path) -> ArtifactStored:
        content = data if isinstance(data, bytes) else functools.partial(_read, data)
        headers = {"content-type": "application/octet-stream"}
        response = await self.request("POST", "/api/v1/artifacts", content=content, headers=headers)
        return core.decode(ArtifactStored, response.content)


class AsyncJob:
    """One submitted job, for asyncio (see switchboard.client.sync.Job)."""

    def __init__(self, client: AsyncClient, job_id: str, created: JobCreated | None = None) -> None:
        self.client = client
        self.id = job_id
        self.created = created
        self.summary: JobSummary | None = None

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r})"

    async def refresh(self) -> JobView:
        return await self.client.get_job(self.id)

    async def wait(self, timeout: float | None = None, *, check: bool = True) -> JobView:
        return await self.client.wait(self.id, timeout, check=check)

    async def cancel(self) -> CancelAccepted:
        return await self.client.cancel(self.id)

    async def output(self, stream: str = "stdout", attempt: int | None = None) -> bytes:
        return await self.client.output(self.id, stream, attempt)

    def follow(self, stream: str = "stdout", attempt: int | None = None) -> AsyncIterator[bytes]:
        return self.client.follow(self.id, stream, attempt)


async def _woken(event: asyncio.Event, timeout_s: float | None) -> None:
    """Until `event` is set (then cleared for the next time), or `timeout_s` passed. No
    await comes between a call's look and this: a set made meanwhile is not missed."""
    try:
        await asyncio.wait_for(event.wait(), timeout_s)
    except TimeoutError:
        pass
    event.clear()


async def _read(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as file:
        while chunk := await asyncio.to_thread(file.read, core.FILE_CHUNK):
            yield chunk
