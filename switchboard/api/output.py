"""A job's output: a byte range of a run's stream as stored, or the stream followed live."""

from __future__ import annotations

import base64
import contextlib
import re
from collections.abc import AsyncGenerator
from typing import Annotated, NamedTuple

import msgspec
from litestar import Controller, Request, get
from litestar.params import FromPath, FromQuery, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage, Stream

from protocol.limits import is_valid_stream
from protocol.messages import INT64_MAX
from protocol.state import Phase, is_terminal
from switchboard.api.errors import ApiError, error_responses
from switchboard.api.jobs import job_or_404
from switchboard.api.security import require
from switchboard.api.streams import TICK_S, revoked_event, until_revoked
from switchboard.auth import Permission
from switchboard.state import AppState, app_state

#: Which stream: `stdout`, `stderr`, `console`, or `console:<device>` (a device's serial
#: console, when the run held the device).
OutputStream = str

#: Query parameters of the output routes: which run (default: the latest), which byte.
Attempt = Annotated[int | None, QueryParameter(ge=1, le=INT64_MAX)]
Offset = Annotated[int, QueryParameter(ge=0, le=INT64_MAX)]

#: Output is read from the store and sent at most this much at a time, so a reader of a
#: huge output costs the switchboard a few of these, not the output's size.
READ_BYTES = 256 * 1024


async def _stored(
    state: AppState, job_id: str, attempt: int, stream: OutputStream, start: int, end: int | None
) -> AsyncGenerator[bytes, None]:
    """Bytes [start, end) of a run's stream as stored, in pieces of at most READ_BYTES."""
    while end is None or start < end:
        stop = start + READ_BYTES if end is None else min(end, start + READ_BYTES)
        data = await state.store.read_output(job_id, attempt, stream, start, stop)
        if data:
            yield data
        if len(data) < stop - start:
            return  # the end of what is stored
        start = stop


def _check_stream(stream: str) -> None:
    if not is_valid_stream(stream):
        raise ApiError(
            400,
            "invalid_request",
            "stream: stdout, stderr, console or console:<device id>",
            "stream",
        )


class _Piece(NamedTuple):
    """Bytes [offset, offset + len(data)) of a run's stream."""

    attempt: int
    offset: int
    data: bytes


class _End(NamedTuple):
    """The run has ended and every byte of the stream was sent."""

    attempt: int
    phase: Phase


async def _pieces(
    state: AppState, job_id: str, stream: OutputStream, attempt: int | None, offset: int
) -> AsyncGenerator[_Piece | _End | None, None]:
    """A run's stream from `offset`, live, then its end; None (a tick, see
    switchboard.api.streams) after each wait with nothing new. Without `attempt`, the job's
    latest run, waiting for its first if it is still queued; nothing if the job is gone or
    ended without a run."""
    store = state.store
    changes = state.changes
    while attempt is None:
        seen = changes.count
        job = await store.get_job(job_id)
        if job is None or (not job.runs and is_terminal(job.phase)):
            return
        if job.runs:
            attempt = job.runs[-1].attempt
        else:
            await changes.wait(seen, TICK_S)
            yield None
    while True:
        seen = changes.count
        phase = await store.run_phase(job_id, attempt)
        if phase is None:
            return
        # Seen ended *before* reading: a run's output is stored before its end, so the
        # reads that follow get everything.
        ended = is_terminal(phase)
        data = await store.read_output(job_id, attempt, stream, offset, offset + READ_BYTES)
        if data:
            yield _Piece(attempt, offset, data)
            offset += len(data)
        if len(data) == READ_BYTES:
            continue  # more is stored already: read on before waiting
        if ended:
            yield _End(attempt, phase)
            return
        await changes.wait(seen, TICK_S)
        yield None


async def _follow(
    pieces: AsyncGenerator[_Piece | _End | None, None],
) -> AsyncGenerator[bytes | None, None]:
    async with contextlib.aclosing(pieces):
        async for piece in pieces:
            if piece is None:
                yield None
            elif isinstance(piece, _Piece):
                yield piece.data


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
    pieces: AsyncGenerator[_Piece | _End | None, None],
) -> AsyncGenerator[ServerSentEventMessage | None, None]:
    async with contextlib.aclosing(pieces):
        async for piece in pieces:
            if isinstance(piece, _Piece):
                chunk = OutputChunk(
                    piece.attempt, piece.offset, base64.b64encode(piece.data).decode()
                )
                # The id is where a reconnecting EventSource resumes (sent back as
                # Last-Event-ID).
                yield ServerSentEventMessage(
                    data=msgspec.json.encode(chunk).decode(),
                    event="output",
                    id=f"{piece.attempt}:{piece.offset + len(piece.data)}",
                )
            elif isinstance(piece, _End):
                end = OutputEnd(piece.attempt, piece.phase.value)
                yield ServerSentEventMessage(data=msgspec.json.encode(end).decode(), event="end")
            else:
                yield None


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
        job_id: FromPath[str],
        stream: FromQuery[OutputStream] = "stdout",
        attempt: Attempt = None,
        start: Offset = 0,
        end: Annotated[int | None, QueryParameter(ge=0, le=INT64_MAX)] = None,
    ) -> Stream:
        """Bytes [start, end) of a run's stream as stored so far (the latest run unless
        `attempt` is given), exactly as the program wrote them. Sent as they are read, a
        piece at a time: any size costs the switchboard the same memory."""
        _check_stream(stream)
        state = app_state(request)
        job = await job_or_404(state, job_id)
        if attempt is None:
            if not job.runs:
                return Stream(iter(()), media_type="application/octet-stream")
            attempt = job.runs[-1].attempt
        elif all(r.attempt != attempt for r in job.runs):
            raise ApiError(404, "not_found", f"job {job_id!r} has no attempt {attempt}")
        return Stream(
            _stored(state, job_id, attempt, stream, start, end),
            media_type="application/octet-stream",
        )

    @get(
        "/{job_id:str}/output/follow",
        guards=require(Permission.VIEW),
        media_type="application/octet-stream",
        responses=error_responses(404),
    )
    async def follow(
        self,
        request: Request,
        job_id: FromPath[str],
        stream: FromQuery[OutputStream] = "stdout",
        attempt: Attempt = None,
        start: Offset = 0,
    ) -> Stream:
        """A run's stream from byte `start`, live: bytes are sent as they are stored, and
        the response ends once the run has ended and everything it wrote was sent. Without
        `attempt`, the latest run when the request arrives (waiting for one if the job is
        still queued). It also ends, within seconds, if its token is revoked: a follower
        that wants to know how the run ended asks for the job (and then gets its 401)."""
        _check_stream(stream)
        state = app_state(request)
        await job_or_404(state, job_id)
        pieces = _pieces(state, job_id, stream, attempt, start)
        return Stream(
            until_revoked(request, _follow(pieces), "follow"),
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
        job_id: FromPath[str],
        stream: FromQuery[OutputStream] = "stdout",
        attempt: Attempt = None,
        start: Offset = 0,
    ) -> ServerSentEvent:
        """The same as `follow`, as server-sent events for browsers: `output` events
        (OutputChunk, base64 bytes with their offset) and a final `end` event (OutputEnd),
        or a `revoked` event (the API's error body) if the token is revoked meanwhile.
        Each output event's id is `attempt:offset`, so an EventSource that reconnects
        resumes where it stopped (Last-Event-ID wins over `attempt` and `start`)."""
        _check_stream(stream)
        resume = _resume_point(request.headers.get("last-event-id"))
        state = app_state(request)
        await job_or_404(state, job_id)
        if resume is not None:
            attempt, start = resume
        pieces = _pieces(state, job_id, stream, attempt, start)
        return ServerSentEvent(
            until_revoked(request, _follow_events(pieces), "events", revoked_event)
        )
