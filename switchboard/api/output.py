"""A job's output: a byte range of a run's stream as stored, or the stream followed live."""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from typing import Annotated

import msgspec
from litestar import Controller, Request, Response, get
from litestar.params import Parameter
from litestar.response import ServerSentEvent, ServerSentEventMessage, Stream

from protocol.messages import INT64_MAX
from protocol.messages import Stream as OutputStream
from protocol.state import is_terminal
from switchboard.api.errors import ApiError, error_responses
from switchboard.api.jobs import job_or_404
from switchboard.api.security import require
from switchboard.auth import Permission
from switchboard.state import AppState, app_state

#: Query parameters of the output routes: which run (default: the latest), which byte.
Attempt = Annotated[int | None, Parameter(ge=1, le=INT64_MAX)]
Offset = Annotated[int, Parameter(ge=0, le=INT64_MAX)]

#: A follower re-reads at least this often, even without news from this process.
FOLLOW_POLL_S = 1.0
#: A follower reads at most this much at a time (memory stays bounded for huge outputs).
FOLLOW_READ = 4 * 1024 * 1024


async def _latest_attempt(state: AppState, job_id: str) -> int | None:
    """The job's latest run, waiting for its first if it is still queued; None if the job
    is gone or ended without a run."""
    while True:
        job = await state.store.get_job(job_id)
        if job is None or (not job.runs and is_terminal(job.phase)):
            return None
        if job.runs:
            return job.runs[-1].attempt
        await state.hub.wait_stored(FOLLOW_POLL_S)


async def _follow_run(
    state: AppState, job_id: str, attempt: int, stream: OutputStream, offset: int
) -> AsyncIterator[bytes]:
    """The run's stream from `offset`, live, until the run has ended and all is sent."""
    store = state.store
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


async def _follow(
    state: AppState, job_id: str, stream: OutputStream, attempt: int | None, offset: int
) -> AsyncIterator[bytes]:
    attempt = attempt or await _latest_attempt(state, job_id)
    if attempt is not None:
        async for data in _follow_run(state, job_id, attempt, stream, offset):
            yield data


class OutputChunk(msgspec.Struct):
    """One `output` event of the event stream: bytes [offset, offset + len) of the run's
    stream, base64-encoded (output is bytes, not necessarily text)."""

    attempt: int
    offset: int
    data: str


class OutputEnd(msgspec.Struct):
    """The `end` event: the run has ended and every byte of the stream was sent."""

    attempt: int
    phase: str


#: An output event's id: `attempt:offset`, ASCII digits (at most 19: an int64).
_EVENT_ID = re.compile(r"([0-9]{1,19}):([0-9]{1,19})", re.ASCII)


def _resume_point(last_event_id: str | None) -> tuple[int, int] | None:
    """(attempt, offset) from an EventSource's Last-Event-ID (`attempt:offset`); None
    without one. Anything else is a 400: only this API's own ids come back here, and a
    number the store can't hold must not reach it."""
    if not last_event_id:
        return None
    match = _EVENT_ID.fullmatch(last_event_id)
    if match:
        attempt, offset = int(match.group(1)), int(match.group(2))
        if 1 <= attempt <= INT64_MAX and offset <= INT64_MAX:
            return attempt, offset
    raise ApiError(
        400,
        "invalid_request",
        "Last-Event-ID: not an id this stream gave out (attempt:offset)",
        "Last-Event-ID",
    )


async def _follow_events(
    state: AppState, job_id: str, stream: OutputStream, attempt: int | None, offset: int
) -> AsyncIterator[ServerSentEventMessage]:
    attempt = attempt or await _latest_attempt(state, job_id)
    if attempt is None:
        return
    async for data in _follow_run(state, job_id, attempt, stream, offset):
        chunk = OutputChunk(attempt, offset, base64.b64encode(data).decode())
        offset += len(data)
        # The id is where a reconnecting EventSource resumes (sent back as Last-Event-ID).
        yield ServerSentEventMessage(
            data=msgspec.json.encode(chunk).decode(), event="output", id=f"{attempt}:{offset}"
        )
    phase = await state.store.run_phase(job_id, attempt)
    end = OutputEnd(attempt, str(phase))
    yield ServerSentEventMessage(data=msgspec.json.encode(end).decode(), event="end")


class OutputController(Controller):
    path = "/api/v1/jobs"
    tags = ["jobs"]  # noqa: RUF012 - Litestar reads it as a plain list

    @get(
        "/{job_id:str}/output",
        guards=require(Permission.VIEW),
        media_type="application/octet-stream",
        responses=error_responses(404),
    )
    async def output(
        self,
        request: Request,
        job_id: str,
        stream: OutputStream = "stdout",
        attempt: Attempt = None,
        start: Offset = 0,
        end: Offset | None = None,
    ) -> Response[bytes]:
        """Bytes [start, end) of a run's stream as stored so far (the latest run unless
        `attempt` is given), exactly as the program wrote them."""
        state = app_state(request)
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
        responses=error_responses(404),
    )
    async def follow(
        self,
        request: Request,
        job_id: str,
        stream: OutputStream = "stdout",
        attempt: Attempt = None,
        start: Offset = 0,
    ) -> Stream:
        """A run's stream from byte `start`, live: bytes are sent as they are stored, and
        the response ends once the run has ended and everything it wrote was sent. Without
        `attempt`, the latest run when the request arrives (waiting for one if the job is
        still queued)."""
        state = app_state(request)
        await job_or_404(state, job_id)
        return Stream(
            _follow(state, job_id, stream, attempt, start),
            media_type="application/octet-stream",
        )

    @get(
        "/{job_id:str}/output/events",
        guards=require(Permission.VIEW),
        media_type="text/event-stream",
        responses=error_responses(404),
    )
    async def follow_events(
        self,
        request: Request,
        job_id: str,
        stream: OutputStream = "stdout",
        attempt: Attempt = None,
        start: Offset = 0,
    ) -> ServerSentEvent:
        """The same as `follow`, as server-sent events for browsers: `output` events
        (OutputChunk, base64 bytes with their offset) and a final `end` event (OutputEnd).
        Each output event's id is `attempt:offset`, so an EventSource that reconnects
        resumes where it stopped (Last-Event-ID wins over `attempt` and `start`)."""
        resume = _resume_point(request.headers.get("last-event-id"))
        state = app_state(request)
        await job_or_404(state, job_id)
        if resume is not None:
            attempt, start = resume
        return ServerSentEvent(_follow_events(state, job_id, stream, attempt, start))
