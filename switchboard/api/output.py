"""A job's output: a byte range of a run's stream as stored, or the stream followed live."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Literal

from litestar import Controller, Request, Response, get
from litestar.params import Parameter
from litestar.response import Stream

from protocol.messages import Stream as OutputStream
from protocol.state import is_terminal
from switchboard.api.errors import ApiError
from switchboard.api.jobs import job_or_404
from switchboard.api.security import require
from switchboard.auth import Permission
from switchboard.state import AppState

#: A follower re-reads at least this often, even without news from this process.
FOLLOW_POLL_S = 1.0
#: A follower reads at most this much at a time (memory stays bounded for huge outputs).
FOLLOW_READ = 4 * 1024 * 1024


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


class OutputController(Controller):
    path = "/api/v1/jobs"
    tags = ["jobs"]  # noqa: RUF012 - Litestar reads it as a plain list

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
        state = request.app.state.switchboard
        job = await job_or_404(state, job_id)
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
        state = request.app.state.switchboard
        await job_or_404(state, job_id)
        return Stream(
            _follow(state, job_id, stream, attempt, start),
            media_type="application/octet-stream",
        )
