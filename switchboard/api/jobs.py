"""Jobs: submit, get, output, cancel."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Annotated, Literal

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.params import Parameter
from litestar.response import Stream

from protocol import codec
from protocol.messages import StopJob
from protocol.messages import Stream as OutputStream
from protocol.spec import DockerBackend, JobSpec, WasmBackend
from protocol.state import is_terminal
from switchboard.api.errors import ApiError, invalid_spec
from switchboard.api.security import require
from switchboard.auth import Permission
from switchboard.jobstate import redacted
from switchboard.models import JobView
from switchboard.state import AppState

#: A follower re-reads at least this often, even without news from this process.
FOLLOW_POLL_S = 1.0
#: A follower reads at most this much at a time (memory stays bounded for huge outputs).
FOLLOW_READ = 4 * 1024 * 1024


class JobCreated(msgspec.Struct):
    id: str


class CancelAccepted(msgspec.Struct):
    id: str
    phase: str


def _state(request: Request) -> AppState:
    return request.app.state.switchboard


async def _job_or_404(state: AppState, job_id: str) -> JobView:
    job = await state.store.get_job(job_id)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    return job


def _artifacts_named(spec: JobSpec) -> list[tuple[str, str]]:
    """(field, digest) of every artifact a spec refers to."""
    match spec.backend:
        case WasmBackend(module=module):
            return [("backend.module", module)]
        case DockerBackend(image_artifact=str(digest)):
            return [("backend.image_artifact", digest)]
    return []


async def _follow(
    state: AppState, job_id: str, stream: OutputStream, attempt: int | None, offset: int
) -> AsyncIterator[bytes]:
    store = state.store
    while attempt is None:  # the latest run, once there is one
        job = await store.get_job(job_id)
        if job is None or (not job.runs and is_terminal(job.phase)):
            return  # ended without a run: nothing will come
        if job.runs:
            attempt = job.runs[-1].attempt
        else:
            await state.hub.wait_stored(FOLLOW_POLL_S)
    while True:
        phase = await store.run_phase(job_id, attempt)
        if phase is None:
            return
        # Seen ended *before* reading: a run's output is stored before its end, so the
        # reads that follow get everything.
        ended = is_terminal(phase)
        data = await store.read_output(job_id, attempt, stream, offset, offset + FOLLOW_READ)
        if data:
            offset += len(data)
            yield data
        if len(data) == FOLLOW_READ:
            continue  # more is stored already: read on before waiting
        if ended:
            return
        await state.hub.wait_stored(FOLLOW_POLL_S)


class JobController(Controller):
    path = "/api/v1/jobs"
    tags = ["jobs"]  # noqa: RUF012 - Litestar reads it as a plain list

    @post("/", guards=require(Permission.SUBMIT), status_code=201)
    async def submit(self, request: Request, data: JobSpec) -> JobCreated:
        """Queue a job. Wasm modules must have been uploaded as artifacts first."""
        state = _state(request)
        # Litestar's own parse (which feeds `data` and the OpenAPI schema) is lenient
        # ("5" passes for 5.0); a spec is typed by people, so check it strictly too.
        try:
            data = codec.decode_job_spec(await request.body())
        except msgspec.ValidationError as exc:
            raise invalid_spec(exc) from None
        for field, digest in _artifacts_named(data):
            if not state.artifacts.exists(digest):
                raise ApiError(
                    400, "invalid_spec", f"{field}: artifact {digest} has not been uploaded", field
                )
        job_id = secrets.token_hex(8)
        await state.store.create_job(job_id, data)
        state.dispatcher.wake()
        return JobCreated(job_id)

    @get("/{job_id:str}", guards=require(Permission.VIEW))
    async def show(self, request: Request, job_id: str) -> JobView:
        """The job with all its runs; secret parameter values are replaced."""
        job = await _job_or_404(_state(request), job_id)
        return msgspec.structs.replace(job, spec=redacted(job.spec))

    @get(
        "/{job_id:str}/output",
        guards=require(Permission.VIEW),
        media_type="application/octet-stream",
    )
    async def output(
        self,
        request: Request,
        job_id: str,
        stream: Literal["stdout", "stderr", "console"] = "stdout",
        attempt: Annotated[int | None, Parameter(ge=1)] = None,
        start: Annotated[int, Parameter(ge=0)] = 0,
        end: Annotated[int | None, Parameter(ge=0)] = None,
    ) -> Response[bytes]:
        """Bytes [start, end) of a run's stream as stored so far (the latest run unless
        `attempt` is given), exactly as the program wrote them."""
        state = _state(request)
        job = await _job_or_404(state, job_id)
        if attempt is None:
            if not job.runs:
                return Response(b"", media_type="application/octet-stream")
            attempt = job.runs[-1].attempt
        elif all(r.attempt != attempt for r in job.runs):
            raise ApiError(404, "not_found", f"job {job_id!r} has no attempt {attempt}")
        data = await state.store.read_output(job_id, attempt, stream, start, end)
        return Response(data, media_type="application/octet-stream")

    @get(
        "/{job_id:str}/output/follow",
        guards=require(Permission.VIEW),
        media_type="application/octet-stream",
    )
    async def follow(
        self,
        request: Request,
        job_id: str,
        stream: Literal["stdout", "stderr", "console"] = "stdout",
        attempt: Annotated[int | None, Parameter(ge=1)] = None,
        start: Annotated[int, Parameter(ge=0)] = 0,
    ) -> Stream:
        """A run's stream from byte `start`, live: bytes are sent as they are stored, and
        the response ends once the run has ended and everything it wrote was sent. Without
        `attempt`, the latest run when the request arrives (waiting for one if the job is
        still queued)."""
        state = _state(request)
        await _job_or_404(state, job_id)
        return Stream(
            _follow(state, job_id, stream, attempt, start),
            media_type="application/octet-stream",
        )

    @post("/{job_id:str}/cancel", guards=require(Permission.CANCEL), status_code=202)
    async def cancel(self, request: Request, job_id: str) -> CancelAccepted:
        """Cancel: a queued job ends at once, a running one is stopped (idempotent)."""
        state = _state(request)
        result = await state.store.request_cancel(job_id)
        if result is None:
            raise ApiError(404, "not_found", f"no job {job_id!r}")
        if result.supervisor_id is not None and result.attempt is not None:
            stop = StopJob(job_id=job_id, attempt=result.attempt, reason="canceled")
            await state.hub.send_stop(result.supervisor_id, stop)
        return CancelAccepted(job_id, result.phase)
