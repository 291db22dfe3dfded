"""A job's output files: the list of a run's kept and refused files, and each file's bytes
(with Range), read from the artifact store it was uploaded to."""

from __future__ import annotations

from litestar import Controller, Request, get
from litestar.params import FromPath
from litestar.response import Stream

from switchboard.api.artifacts import download
from switchboard.api.errors import ApiError, error_responses
from switchboard.api.output import Attempt
from switchboard.api.security import require
from switchboard.auth import Permission
from switchboard.models import RunFiles
from switchboard.state import app_state


class FilesController(Controller):
    path = "/api/v1/jobs"
    tags = ["jobs"]  # noqa: RUF012 - Litestar reads it as a plain list

    @get("/{job_id:str}/files", guards=require(Permission.VIEW), responses=error_responses(404))
    async def files(
        self, request: Request, job_id: FromPath[str], attempt: Attempt = None
    ) -> RunFiles:
        """The output files of one run: the job's latest run that has any, or run
        `attempt`. Each kept file has its path, size, digest and media type, and for a
        JUnit report named by the spec what became of it (`report`: pending, stored,
        refused, with `report_error`); `refused` lists the files not kept and why,
        `refused_unlisted` counts those the supervisor did not list. `attempt` is null
        when no run has files."""
        files = await app_state(request).store.run_files(job_id, attempt)
        if files is None:
            what = f"job {job_id!r}" if attempt is None else f"run {job_id}#{attempt}"
            raise ApiError(404, "not_found", f"no {what}")
        return files

    @get(
        "/{job_id:str}/files/{path:path}",
        guards=require(Permission.VIEW),
        # No route media type: it would override each file's own.
        responses=error_responses(404, 416),
    )
    async def file(
        self, request: Request, job_id: FromPath[str], path: FromPath[str], attempt: Attempt = None
    ) -> Stream:
        """One output file's bytes (of the latest run that has files, or run `attempt`),
        with its media type; a `Range: bytes=START-END` asks for a part (206), one
        starting past the end gets 416."""
        state = app_state(request)
        path = path.lstrip("/")
        found = await state.store.run_file(job_id, path, attempt)
        if found is None:
            raise ApiError(404, "not_found", f"job {job_id!r} has no output file {path!r}")
        _, file = found
        opened = await state.artifacts.open(file.digest)
        if opened is None:  # the index and the files disagree (a crash, a hand): say so
            raise ApiError(404, "not_found", f"output file {path!r} is no longer stored")
        return download(
            opened, request.headers.get("range"), file.media_type, path.rpartition("/")[2]
        )
