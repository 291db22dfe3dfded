"""The blocking client: `Client(url, token)`, and `Job`, a handle on one submitted job.
(`switchboard.client.aio` is the same for asyncio.) docs/client.md shows it in use."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import msgspec

from switchboard.client import batching, core
from switchboard.client.batching import ALONE, Call
from switchboard.client.core import Deadline, Params, Retry, SpecLike
from switchboard.client.errors import (
    BadRequest,
    ClientError,
    ConnectionFailed,
    WaitTimeout,
)
from switchboard.client.settings import settings
from switchboard.models import (
    ArtifactStored,
    BatchCreated,
    CancelAccepted,
    JobCreated,
    JobSummary,
    JobView,
)


class Client:
    """A switchboard's REST API, over one connection pool (kept alive between requests).

    `url`, `token` and `ca_file` (or `token_file`) default to the environment
    (SWITCHBOARD_URL, SWITCHBOARD_TOKEN / SWITCHBOARD_TOKEN_FILE, SWITCHBOARD_CA_FILE), else
    the config file, as the CLI's. A request refused with 429 or 503, or that could not
    connect, is asked again as `retry` says; a wait asks again until its timeout.

    One client may be shared by many threads (it is the fast way: `run()` calls made at
    once share requests, see `run`); `max_connections` bounds its requests at once."""

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
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {found.token}"},
            timeout=timeout_s,
            verify=found.ca_file or True,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )
        # run()'s natural batching (switchboard.client.batching), under one lock.
        self._lock = threading.Lock()
        self._runs = 0
        self._submissions = batching.Submissions()
        self._waits = batching.Waits()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- requests ----------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Any = None,
        content: bytes | Callable[[], Iterator[bytes]] | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
        deadline: Deadline | None = None,
    ) -> httpx.Response:
        """One request, asked again after a 429 or 503, or a failed connect (any broken
        connection, for a GET); until `deadline` if given, else `retry.attempts` times.
        A refusal raises its ApiError. `content` may be a function making the body's
        pieces (each try gets them anew)."""
        attempt = 0
        timeout = httpx.USE_CLIENT_DEFAULT if timeout_s is None else timeout_s
        while True:
            try:
                body = content() if callable(content) else content
                response = self._http.request(
                    method, path, params=params, content=body, headers=headers, timeout=timeout
                )
            except httpx.TransportError as exc:
                # A POST may have been acted on once sent: ask again only if never sent.
                sent = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
                if (sent and method != "GET") or not self._pause(attempt, None, deadline):
                    raise ConnectionFailed(
                        f"cannot reach the switchboard at {self.url}: {exc}"
                    ) from None
                attempt += 1
                continue
            if response.status_code in core.RETRY_STATUSES and self._pause(
                attempt, response.headers.get("retry-after"), deadline
            ):
                attempt += 1
                continue
            if response.status_code >= 400:
                raise core.refusal(method, path, response.status_code, response.content)
            return response

    def _pause(self, attempt: int, retry_after: str | None, deadline: Deadline | None) -> bool:
        """Sleep before trying again, if another try is allowed."""
        if deadline is None and attempt + 1 >= self.retry.attempts:
            return False
        delay = self.retry.delay(attempt, retry_after)
        if deadline is not None:
            if deadline.over():
                return False
            delay = min(delay, deadline.left())
        time.sleep(delay)
        return True

    def get(self, path: str, **params: Any) -> Any:
        """GET `path` (params left out when None or empty); its JSON."""
        clean = {k: v for k, v in params.items() if v not in (None, [], "")}
        return self.request("GET", path, params=clean).json()

    def post(self, path: str, body: Any = None) -> Any:
        response = self.request("POST", path, content=_json(body), headers=core.JSON_BODY)
        return response.json() if response.content else None

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, content=_json(body), headers=core.JSON_BODY).json()

    def delete(self, path: str) -> None:
        self.request("DELETE", path)

    def download(self, path: str, into: BinaryIO) -> None:
        """Write the body of GET `path` into the open file, as it arrives."""
        try:
            with self._http.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                    raise core.refusal("GET", path, response.status_code, response.content)
                for chunk in response.iter_bytes():
                    into.write(chunk)
        except httpx.HTTPError as exc:
            raise ConnectionFailed(
                f"lost the switchboard while downloading {path}: {exc}"
            ) from None

    # --- jobs --------------------------------------------------------------------------

    def submit(self, spec: SpecLike, params: Params | None = None) -> Job:
        """Queue a job: `spec` is a JobSpec, the dict of one or its JSON; `params` adds
        parameters (a value, or a protocol.spec.Parameter for a secret one)."""
        body = core.spec_body(spec, params)
        response = self.request("POST", "/api/v1/jobs", content=body, headers=core.JSON_BODY)
        created = core.decode(JobCreated, response.content)
        return Job(self, created.id, created)

    def run(
        self,
        spec: SpecLike,
        params: Params | None = None,
        timeout: float | None = None,
        *,
        check: bool = True,
    ) -> JobView:
        """Submit and wait: the ended job. Raises JobFailed if it did not succeed (unless
        `check` is false), WaitTimeout if it had not ended after `timeout` seconds (None:
        no limit). Alone, one request submits and waits (then more, if it runs longer);
        calls made while others are in flight (from other threads) share requests: their
        submissions go as one batch, their waits as one request for many jobs."""
        deadline = Deadline(timeout)
        body = core.spec_body(spec, params)
        with self._lock:
            alone = self._runs == 0
            self._runs += 1
        try:
            if alone:
                return core.checked(self._run_alone(body, deadline), check)
            call = Call(body, deadline, wake=threading.Condition(self._lock))
            return core.checked(self._run_joined(call), check)
        finally:
            with self._lock:
                self._runs -= 1

    def _run_alone(self, body: bytes, deadline: Deadline) -> JobView:
        while True:
            wait = deadline.slice(self._slice.s)
            try:
                response = self.request(
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
            job = self._wait(created.id, deadline, job)
        return job

    def _run_joined(self, call: Call) -> JobView:
        submitted = self._submit_joined(call)
        if isinstance(submitted, ClientError):
            raise submitted
        if submitted is ALONE:
            return self._run_alone(call.body, call.deadline)
        waited = self._wait_joined(call)
        if isinstance(waited, ClientError):
            raise waited
        if waited is ALONE:
            return self._wait(call.job_id, call.deadline, None)
        assert isinstance(waited, JobView)
        return waited

    def _submit_joined(self, call: Call) -> batching.Result:
        """The call's job id once a batch holding it was sent (by whichever call found
        none in flight: maybe this one), or what befell the batch."""
        with self._lock:
            self._submissions.add(call)
        while True:
            with self._lock:
                while (result := call.settled()) is None:
                    if batch := self._submissions.take():
                        break
                    call.wake.wait()
                else:
                    return result
            outcome: list[str] | ClientError | batching.Alone = ConnectionFailed(
                "the batch holding this job was not sent"
            )
            try:
                content = b"[" + b",".join(c.body for c in batch) + b"]"
                response = self.request(
                    "POST", "/api/v1/jobs/batch", content=content, headers=core.JSON_BODY
                )
                outcome = [made.id for made in core.decode(BatchCreated, response.content).jobs]
            except ClientError as exc:
                outcome = batching.batch_failed(exc)
            finally:
                with self._lock:
                    for woken in self._submissions.sent(batch, outcome):
                        woken.wake.notify()

    def _wait_joined(self, call: Call) -> batching.Result:
        """The call's job once it ended, asked for with other calls' jobs; or an error,
        or ALONE (wait alone). WaitTimeout after its own deadline."""
        with self._lock:
            self._waits.add(call)
        try:
            while True:
                with self._lock:
                    while (result := call.settled()) is None and not call.deadline.over():
                        if ids := self._waits.take(call, time.monotonic()):
                            break
                        call.wake.wait(self._waits.pause_s(call.deadline, time.monotonic()))
                    else:
                        if result is not None:
                            return result
                        ids = []
                if not ids:
                    raise self._timed_out(call)
                self._ask_ended(call, ids)
        finally:
            with self._lock:
                self._waits.leave(call)

    def _ask_ended(self, call: Call, ids: list[str]) -> None:
        """One request for the jobs `ids` names, as long as `call`'s deadline allows:
        what it answers settles their calls."""
        outcome: list[JobView] | ClientError | batching.Alone | None = None
        wait = call.deadline.slice(self._slice.s)
        try:
            response = self.request(
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
            with self._lock:
                for woken in self._waits.answered(ids, outcome):
                    woken.wake.notify()

    def _timed_out(self, call: Call) -> WaitTimeout:
        """WaitTimeout, with the job as it is now if a quick look finds it."""
        try:
            response = self._http.get(f"/api/v1/jobs/{call.job_id}", timeout=core.LOOK_S)
            last = core.decode(JobView, response.content) if response.is_success else None
        except (httpx.HTTPError, msgspec.DecodeError):
            last = None
        return WaitTimeout(call.job_id, last, call.deadline.timeout_s or 0.0)

    def submit_many(self, specs: Iterable[SpecLike], params: Params | None = None) -> list[Job]:
        """Queue several jobs, in batches of 1000 (each batch all or none), in order."""
        bodies = [core.spec_body(spec, params) for spec in specs]
        jobs = []
        for chunk in core.chunks(bodies, core.MAX_BATCH):
            content = b"[" + b",".join(chunk) + b"]"
            response = self.request(
                "POST", "/api/v1/jobs/batch", content=content, headers=core.JSON_BODY
            )
            for created in core.decode(BatchCreated, response.content).jobs:
                jobs.append(Job(self, created.id, created))
        return jobs

    def job(self, job_id: str) -> Job:
        """A handle on a job known by its id (no request yet)."""
        return Job(self, job_id)

    def get_job(self, job_id: str) -> JobView:
        return core.decode(JobView, self.request("GET", f"/api/v1/jobs/{job_id}").content)

    def wait(self, job_id: str, timeout: float | None = None, *, check: bool = True) -> JobView:
        """The job once it ended (see Job.wait)."""
        return core.checked(self._wait(job_id, Deadline(timeout), None), check)

    def _wait(self, job_id: str, deadline: Deadline, last: JobView | None) -> JobView:
        waiting = core.JobWaiting(job_id, deadline, last)
        while True:
            params, timeout_s = waiting.next_request(self._slice.s)
            try:
                response = self.request(
                    "GET", waiting.path, params=params, timeout_s=timeout_s, deadline=deadline
                )
            except ConnectionFailed:
                raise waiting.timed_out() from None
            except BadRequest as exc:
                self._slice.shorten(exc, params["wait"])
                continue
            if (job := waiting.answered(response.content)) is not None:
                return job

    def as_completed(self, jobs: Iterable[Job], timeout: float | None = None) -> Iterator[Job]:
        """Each job as it ends (its `summary` set: phase, exit code), in the order they end:
        one request waits for up to 500 of them (more: each 500 in turn, a second each).
        WaitTimeout if some had not ended after `timeout` seconds."""
        completion = core.Completion(jobs, Deadline(timeout))
        while completion.pending:
            params, timeout_s = completion.next_request(self._slice.s)
            try:
                response = self.request(
                    "GET",
                    "/api/v1/jobs",
                    params=params,
                    timeout_s=timeout_s,
                    deadline=completion.deadline,
                )
            except BadRequest as exc:
                self._slice.shorten(exc, params["wait"])
                continue
            yield from completion.ended(response.content)

    def cancel(self, job_id: str) -> CancelAccepted:
        response = self.request("POST", f"/api/v1/jobs/{job_id}/cancel")
        return core.decode(CancelAccepted, response.content)

    def output(self, job_id: str, stream: str = "stdout", attempt: int | None = None) -> bytes:
        """A run's stream as stored so far (the latest run unless `attempt`)."""
        params = {"stream": stream, **({"attempt": attempt} if attempt else {})}
        return self.request("GET", f"/api/v1/jobs/{job_id}/output", params=params).content

    def follow(
        self, job_id: str, stream: str = "stdout", attempt: int | None = None
    ) -> Iterator[bytes]:
        """A run's stream (the latest run unless `attempt`, waiting for one if the job is
        queued), its bytes as they are stored, until the run ends. A broken connection is
        resumed where it stopped."""
        path = f"/api/v1/jobs/{job_id}/output/follow"
        offset = 0
        failures = 0
        while True:
            if attempt is None and offset:
                attempt = self.get_job(job_id).runs[-1].attempt  # resume the run it was
            params: dict[str, Any] = {"stream": stream, "start": offset}
            if attempt is not None:
                params["attempt"] = attempt
            try:
                with self._http.stream(
                    "GET", path, params=params, timeout=core.FOLLOW_TIMEOUT
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise core.refusal("GET", path, response.status_code, response.content)
                    for chunk in response.iter_bytes():
                        offset += len(chunk)
                        failures = 0
                        yield chunk
                return
            except httpx.TransportError as exc:
                if not self._pause(failures, None, None):
                    raise ConnectionFailed(
                        f"lost the switchboard while following {stream}: {exc}"
                    ) from None
                failures += 1

    # --- artifacts ---------------------------------------------------------------------

    def upload(self, data: bytes | Path) -> ArtifactStored:
        """Store an artifact (a Wasm module, an image tarball, an input): its digest, to
        name in a spec. A file is sent as it is read, never held whole."""
        content = data if isinstance(data, bytes) else functools.partial(_read, data)
        headers = {"content-type": "application/octet-stream"}
        response = self.request("POST", "/api/v1/artifacts", content=content, headers=headers)
        return core.decode(ArtifactStored, response.content)


class Job:
    """One submitted job: `created` is what the submission answered (None for a job known
    by id); `summary` is set by as_completed."""

    def __init__(self, client: Client, job_id: str, created: JobCreated | None = None) -> None:
        self.client = client
        self.id = job_id
        self.created = created
        self.summary: JobSummary | None = None

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def refresh(self) -> JobView:
        """The job now: phase, exit code, runs."""
        return self.client.get_job(self.id)

    def wait(self, timeout: float | None = None, *, check: bool = True) -> JobView:
        """The job once it ended: its phase, exit code and runs. Without polling: each
        request waits at the switchboard until the job ends (up to a minute, then another),
        and one the switchboard drops (a restart) is asked again, up to `timeout` seconds
        (None: no limit), after which WaitTimeout. A job that did not succeed raises
        JobFailed (with its exit code) unless `check` is false."""
        return self.client.wait(self.id, timeout, check=check)

    def cancel(self) -> CancelAccepted:
        return self.client.cancel(self.id)

    def output(self, stream: str = "stdout", attempt: int | None = None) -> bytes:
        return self.client.output(self.id, stream, attempt)

    def follow(self, stream: str = "stdout", attempt: int | None = None) -> Iterator[bytes]:
        return self.client.follow(self.id, stream, attempt)


def _json(body: Any) -> bytes | None:
    return None if body is None else core.encode(body)


def _read(path: Path) -> Iterator[bytes]:
    with path.open("rb") as file:
        while chunk := file.read(core.FILE_CHUNK):
            yield chunk
