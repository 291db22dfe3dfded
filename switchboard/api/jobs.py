"""Jobs: submit (one or a batch), list, show, runs, events, test cases, cancel, delete."""

from __future__ import annotations

import base64
import binascii
import logging
import re
import time
from collections.abc import Callable
from typing import Annotated

import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from protocol import codec, limits
from protocol.exceptions import MessageTooBig
from protocol.messages import INT64_MAX, StopJob, StopReason
from protocol.spec import JobSpec
from protocol.state import TERMINAL, Phase
from switchboard import metrics
from switchboard.api.errors import ApiError, error_responses, invalid_spec
from switchboard.api.reservations import refuse as refuse_reservation
from switchboard.api.security import actor, require
from switchboard.auth import Permission, allows
from switchboard.ids import new_job_id
from switchboard.models import (
    BatchCreated,
    CancelAccepted,
    JobCreated,
    JobEvent,
    JobFilter,
    JobPage,
    JobView,
    LabelTerm,
    RunOnSupervisor,
    RunView,
    Submitted,
    TestCasePage,
    TestResult,
)
from switchboard.scheduler import FleetMember, device_refusal
from switchboard.sealing import redacted
from switchboard.state import AppState, app_state
from switchboard.store.errors import (
    ArtifactMissing,
    InputUnavailable,
    QueueFull,
    QueueQuotaFull,
)
from switchboard.waiters import MAX_WAIT_IDS, Ended

log = logging.getLogger("switchboard.api")

#: Jobs per list page unless `limit` says otherwise, and the most one page may hold.
DEFAULT_PAGE = 50
MAX_PAGE = 500
#: Test cases per page unless `limit` says otherwise, and the most one page may hold.
DEFAULT_TEST_PAGE = 100
MAX_TEST_PAGE = 1000
#: Jobs one batch may hold.
MAX_BATCH = 1000
#: `label` filters one listing may combine (each is a term of the store's query, and a
#: database bounds how big a query may grow).
MAX_LABEL_FILTERS = 32

_LABEL_TERM = re.compile(r"^(!?)([^=!]+)(?:(!?=)(.*))?$", re.DOTALL)
_LABEL_KEY = re.compile(limits.LABEL_KEY_PATTERN)


#: `wait`: seconds a request may wait for jobs to end (at most --max-wait, default 60).
WaitSeconds = Annotated[
    float | None,
    QueryParameter(
        ge=0,
        description="Seconds to wait for the job(s) to end before answering (at most the"
        " switchboard's --max-wait, default 60; longer is a 400)",
    ),
]
_TERMINAL = sorted(p.value for p in TERMINAL)


def _wait_s(state: AppState, wait: float | None) -> float:
    """The wait asked for, checked against the switchboard's maximum (refused past it)."""
    if wait is None:
        return 0.0
    most = state.settings.max_wait_s
    if wait > most:
        metrics.WAIT_REFUSALS.labels("wait_too_long").inc()
        log.info("refused a wait of %gs (the most is %gs)", wait, most)
        raise ApiError(
            400, "invalid_request", f"wait: at most {most:g} seconds, not {wait:g}", "wait"
        )
    return wait


def _wait_ids(raw: list[str] | None, required: bool) -> list[str]:
    """`ids`, repeated or comma-separated, each once; at most MAX_WAIT_IDS, and given if
    `required` (a wait)."""
    ids = list(dict.fromkeys(i for text in raw or [] for i in text.split(",") if i))
    reason = None
    if len(ids) > MAX_WAIT_IDS:
        reason, message = "too_many_ids", f"ids: at most {MAX_WAIT_IDS}, not {len(ids)}"
    elif required and not ids:
        reason, message = "no_ids", "ids: a wait is only for the jobs `ids` names"
    if reason is not None:
        metrics.WAIT_REFUSALS.labels(reason).inc()
        log.info("refused a wait for jobs: %s", message)
        raise ApiError(400, "invalid_request", message, "ids")
    return ids


async def _ended_or_404(state: AppState, job_ids: list[str]) -> list[JobView]:
    """Those of the jobs that ended, each as GET /api/v1/jobs/{id} shows it (one read of
    the store); 404 naming the ids of jobs that do not exist (or were deleted)."""
    ended, missing = await state.store.ended_job_details(job_ids)
    if missing:
        metrics.WAIT_REFUSALS.labels("unknown_ids").inc()
        named = ", ".join(repr(job_id) for job_id in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        log.info("refused a wait for jobs: no job %s%s", named, more)
        raise ApiError(404, "not_found", f"ids: no job {named}{more}", "ids")
    return [_shown(job) for job in ended]


async def _until_ended(state: AppState, job_id: str, wait_s: float) -> JobView:
    """The job as GET /api/v1/jobs/{id} shows it (`_shown_or_404`) once it is in a terminal
    phase, or as it is after `wait_s` (or at once when the switchboard is stopping). 404
    if there is no such job (or it is deleted)."""
    if wait_s <= 0:
        return await _shown_or_404(state, job_id)
    deadline = time.monotonic() + wait_s
    with state.waiters.registered([job_id]) as woken:
        job = await _shown_or_404(state, job_id)
        if job.phase in TERMINAL:
            return job
        ended = await state.waiters.wait(woken, deadline - time.monotonic())
    if job_id in ended:  # read by the wake, with the change that ended it
        return _shown(ended[job_id])
    return await _shown_or_404(state, job_id)


async def _shown_or_404(state: AppState, job_id: str) -> JobView:
    """The job as GET /api/v1/jobs/{id} shows it: secrets replaced, tests and files
    counted (one read of the store)."""
    job = await state.store.get_job_detail(job_id)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    return _shown(job)


def _shown(job: JobView) -> JobView:
    """The job as the API shows it: secret parameter values replaced."""
    return msgspec.structs.replace(job, spec=redacted(job.spec))


async def job_or_404(state: AppState, job_id: str) -> JobView:
    job = await state.store.get_job(job_id)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    return job


def with_run_timeout(spec: JobSpec, default_s: float | None) -> JobSpec:
    """The spec, with the switchboard's default run timeout if it names none (written into
    the stored spec: the job shows the limit it runs under, and every run gets it)."""
    if spec.timeout_s is not None or default_s is None:
        return spec
    return msgspec.structs.replace(spec, timeout_s=default_s)


def check_size(spec: JobSpec, where: str = "") -> None:
    """A spec whose StartJob would be over the frame limit could never be sent to a
    supervisor: refuse it now, naming the limit."""
    try:
        codec.check_start_job_fits(spec)
    except MessageTooBig as exc:
        metrics.SPECS_TOO_LARGE.inc()
        log.info("refused a job spec: %s", exc)
        message = (
            f"{where}{exc}: make its parameters, env, args, command or stdin smaller "
            "(large inputs belong in an artifact)"
        )
        raise ApiError(400, "invalid_spec", message, where.rstrip(".") or None) from None


async def check_devices(
    state: AppState, specs: list[JobSpec], prefix: Callable[[int], str]
) -> None:
    """A job that no device of the lab could ever serve is refused now, with the reason,
    rather than queued for ever (scheduler.device_refusal); `prefix(index)` begins the
    field a refusal names (`[2].` in a batch)."""
    if not any(spec.resources or spec.devices for spec in specs):
        return
    devices = await state.store.lab_devices()
    if not devices:
        return
    fleet = [
        FleetMember(s.id, s.backends, s.labels, s.resources, s.max_jobs)
        for s in await state.store.list_supervisors()
    ]
    for index, spec in enumerate(specs):
        reason = device_refusal(spec, devices, fleet)
        if reason is not None:
            field = prefix(index) + ("devices" if spec.devices else "resources")
            metrics.SUBMISSIONS_REFUSED.labels("no_device").inc()
            log.info("refused a job: %s: %s", field, reason)
            raise ApiError(400, "unsatisfiable", f"{field}: {reason}", field)


async def _check_reservations(
    state: AppState, specs: list[JobSpec], request: Request, batch: bool
) -> None:
    """A job naming a reservation must name one not ended, that the submitting token
    holds (or the token is an operator's): only its holder's jobs run on its devices."""
    token = request.state.token
    for index, spec in enumerate(specs):
        if spec.reservation is None:
            continue
        field = f"[{index}].reservation" if batch else "reservation"
        found = await state.store.get_reservation(spec.reservation)
        if found is None or found.state not in ("waiting", "held"):
            why = "is unknown" if found is None else f"has {found.state}"
            raise refuse_reservation(400, f"{field}: reservation {spec.reservation} {why}", field)
        if found.owner != token.id and not allows(token.role, Permission.OPERATE):
            raise refuse_reservation(
                403, f"{field}: reservation {spec.reservation} is held by {found.actor}", field
            )


async def _queue(
    state: AppState,
    specs: list[JobSpec],
    request: Request,
    *,
    batch: bool = False,
    ids: list[str] | None = None,
) -> list[Submitted]:
    """Store the jobs (all or none) through the dispatcher, owned by the request's token,
    under `ids` (new ones unless given); stop the runs they replace. A `batch`'s errors
    name the spec by its index."""
    default_s = state.settings.default_run_timeout_s
    ids = ids or [new_job_id() for _ in specs]
    jobs = [
        (job_id, with_run_timeout(spec, default_s)) for job_id, spec in zip(ids, specs, strict=True)
    ]
    for index, (_, spec) in enumerate(jobs):
        check_size(spec, f"[{index}]." if batch else "")
    await check_devices(
        state, [spec for _, spec in jobs], lambda index: f"[{index}]." if batch else ""
    )
    await _check_reservations(state, [spec for _, spec in jobs], request, batch)
    token = request.state.token
    try:
        made = await state.dispatcher.submit(
            jobs,
            actor(request),
            state.settings.max_queued_jobs,
            owner=token.id,
            max_queued_per_owner=state.settings.max_queued_per_token,
        )
    except QueueFull as exc:
        quota = isinstance(exc, QueueQuotaFull)
        metrics.SUBMISSIONS_REFUSED.labels("token_quota" if quota else "queue_full").inc()
        log.warning("submission of %d job(s) by token %s refused: %s", len(jobs), token.id, exc)
        raise ApiError(429, "queue_quota" if quota else "queue_full", str(exc)) from None
    except ArtifactMissing as exc:
        field = f"[{exc.index}].{exc.field}" if batch else exc.field
        message = f"{field}: artifact {exc.digest} has not been uploaded"
        raise ApiError(400, "invalid_spec", message, field) from None
    except InputUnavailable as exc:  # a chained input that can never come
        field = exc.problem.partition(":")[0]
        prefix = f"[{exc.index}]." if batch else ""
        raise ApiError(400, "invalid_spec", prefix + exc.problem, prefix + field) from None
    # The jobs these replace end canceled, and their runs' stops say so.
    await _stop_runs(state, [stop for m in made for stop in m.stops], "canceled")
    return made


async def _check_owner(request: Request, job_id: str, what: str) -> None:
    """403 unless the request's token may `what` the job: its own, or any with cancel_any.
    A job that doesn't exist is left to the route (cancel: 404; delete: done already)."""
    token = request.state.token
    if allows(token.role, Permission.CANCEL_ANY):
        return
    job = await app_state(request).store.get_job(job_id)
    if job is not None and job.owner != token.id:
        by = f"token {job.owner_name!r} ({job.owner})" if job.owner else "no known token"
        raise ApiError(
            403,
            "forbidden",
            f"job {job_id!r} was submitted by {by}: role {token.role!r} may {what} only the"
            " jobs its own token submitted",
        )


async def _stop_runs(state: AppState, runs: list[RunOnSupervisor], reason: StopReason) -> None:
    for run in runs:
        stop = StopJob(job_id=run.job_id, attempt=run.attempt, reason=reason)
        state.hub.send_stop(run.supervisor_id, stop)


def _label_terms(raw: list[str]) -> list[LabelTerm]:
    """`key=value`, `key!=value`, `key` (has the label) or `!key` (has not); a term given
    twice counts once."""
    raw = list(dict.fromkeys(raw))
    if len(raw) > MAX_LABEL_FILTERS:
        raise ApiError(
            400,
            "invalid_request",
            f"label: at most {MAX_LABEL_FILTERS} label filters, not {len(raw)}",
            "label",
        )
    terms = []
    for text in raw:
        match = _LABEL_TERM.match(text)
        key = match.group(2) if match else ""
        if match is None or not _LABEL_KEY.match(key) or (match.group(1) and match.group(3)):
            raise ApiError(
                400,
                "invalid_request",
                f"label: {text!r} is not key=value, key!=value, key or !key",
                "label",
            )
        if match.group(3):
            terms.append(LabelTerm(key, match.group(3), match.group(4)))
        else:
            terms.append(LabelTerm(key, "!exists" if match.group(1) else "exists"))
    return terms


def _cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def _seq_of(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, _, seq = text.partition(":")
        # Bounded: SQLite can't compare with a larger int (it would be a 500).
        if kind == "seq" and seq.isdigit() and int(seq) <= INT64_MAX:
            return int(seq)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise ApiError(400, "invalid_request", "cursor: not a cursor this API gave out", "cursor")


class JobController(Controller):
    path = "/api/v1/jobs"
    tags = ["jobs"]  # noqa: RUF012 - Litestar reads it as a plain list

    @post(
        "/",
        guards=require(Permission.SUBMIT),
        status_code=201,
        responses=error_responses(413, 429),
    )
    async def submit(
        self, request: Request, data: JSONBody[JobSpec], wait: WaitSeconds = None
    ) -> JobCreated:
        """Queue a job. Artifacts it names (Wasm modules, image tarballs) must have been
        uploaded first. A job whose concurrency policy is `drop_if_running` and whose key
        is taken is recorded as `rejected` (still 201: the record exists).
        With `wait` (seconds, at most --max-wait, default 60), answer once the job ended
        or the wait is over, with the job itself in `job`."""
        state = app_state(request)
        wait_s = _wait_s(state, wait)
        # Litestar's own parse (which feeds `data` and the OpenAPI schema) is lenient
        # ("5" passes for 5.0); a spec is typed by people, so check it strictly too.
        try:
            data = codec.decode_job_spec(await request.body())
        except msgspec.ValidationError as exc:
            raise invalid_spec(exc) from None
        if wait is None:
            (made,) = await _queue(state, [data], request)
            return JobCreated(made.id, made.phase, made.reason)
        # Waiting for a job from before it exists: any ending it has is one the waiters
        # see (so the job need not be read before the wait, as a GET's must).
        job_id = new_job_id()
        deadline = time.monotonic() + wait_s
        ended: Ended = {}
        with state.waiters.registered([job_id]) as woken:
            (made,) = await _queue(state, [data], request, ids=[job_id])
            if made.phase not in _TERMINAL:
                ended = await state.waiters.wait(woken, deadline - time.monotonic())
        if job_id in ended:  # read by the wake, with the change that ended it
            return JobCreated(made.id, made.phase, made.reason, _shown(ended[job_id]))
        try:
            job: JobView | None = await _shown_or_404(state, made.id)
        except ApiError:  # deleted while it was waited for (it had ended): no job to show
            job = None
        return JobCreated(made.id, made.phase, made.reason, job)

    @post(
        "/batch",
        guards=require(Permission.SUBMIT),
        status_code=201,
        responses=error_responses(413, 429),
    )
    async def submit_batch(self, request: Request, data: JSONBody[list[JobSpec]]) -> BatchCreated:
        """Queue several jobs at once, all or none, in the given order (at most 1000)."""
        state = app_state(request)
        try:
            specs = msgspec.json.decode(await request.body(), type=list[JobSpec], strict=True)
        except msgspec.ValidationError as exc:
            raise invalid_spec(exc) from None
        if not specs:
            raise ApiError(400, "invalid_request", "the batch is empty")
        if len(specs) > MAX_BATCH:
            raise ApiError(
                413, "too_large", f"a batch holds at most {MAX_BATCH} jobs, not {len(specs)}"
            )
        made = await _queue(state, specs, request, batch=True)
        return BatchCreated([JobCreated(m.id, m.phase, m.reason) for m in made])

    @get("/", guards=require(Permission.VIEW), responses=error_responses())
    async def list_jobs(
        self,
        request: Request,
        phase: FromQuery[list[Phase] | None] = None,
        label: FromQuery[list[str] | None] = None,
        supervisor: Annotated[str | None, QueryParameter(max_length=limits.ID_MAX_LEN)] = None,
        created_after: FromQuery[float | None] = None,
        created_before: FromQuery[float | None] = None,
        q: Annotated[
            str | None, QueryParameter(min_length=1, max_length=limits.NAME_MAX_LEN)
        ] = None,
        owner: Annotated[str | None, QueryParameter(min_length=1, max_length=64)] = None,
        cursor: Annotated[str | None, QueryParameter(max_length=64)] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
        ids: Annotated[
            list[str] | None,
            QueryParameter(
                description="Only these jobs (comma-separated or repeated, at most 500)"
            ),
        ] = None,
        wait: WaitSeconds = None,
    ) -> JobPage:
        """Jobs, newest first. Filters combine (all must hold): `phase` (repeatable: any
        of them), `label` (repeatable, at most 32: `key=value`, `key!=value`, `key`, `!key`),
        `supervisor` (had a run there), `created_after`/`created_before` (epoch seconds),
        `q` (the name contains it, ignoring case, or the id starts with it), `owner` (the
        id of the token that submitted it, or `me`: the calling token).
        A full page carries `next_cursor`; pass it as `cursor` for the next page.
        `ids` (repeatable or comma-separated, at most 500): only these jobs, all on one
        page. With `wait` (seconds, at most --max-wait) and `ids`: only those of them that
        ended, answered as soon as one has, or when the wait is over (maybe none)."""
        state = app_state(request)
        wait_s = _wait_s(state, wait)
        job_ids = _wait_ids(ids, wait is not None)
        phases = {p.value for p in phase or []}
        if wait is not None:
            phases = phases & set(_TERMINAL) if phases else set(_TERMINAL)
            if not phases:  # only phases that never end: nothing to wait for
                return JobPage([])
        if job_ids:
            limit = max(limit, len(job_ids))
        where = JobFilter(
            phases=sorted(phases),
            labels=_label_terms(label or []),
            supervisor_id=supervisor,
            created_after=created_after,
            created_before=created_before,
            before_seq=_seq_of(cursor) if cursor else None,
            text=q,
            owner=request.state.token.id if owner == "me" else owner,
            ids=job_ids,
            limit=limit,
        )
        rows = await state.store.list_jobs(where)
        deadline = time.monotonic() + wait_s
        while not rows and time.monotonic() < deadline and not state.waiters.closed:
            # (A wake for a job deleted meanwhile finds nothing: wait on for the others.)
            with state.waiters.registered(job_ids) as woken:
                rows = await state.store.list_jobs(where)
                if not rows:
                    await state.waiters.wait(woken, deadline - time.monotonic())
                    rows = await state.store.list_jobs(where)
        next_cursor = _cursor(rows[-1][0]) if len(rows) == limit and not job_ids else None
        return JobPage([summary for _, summary in rows], next_cursor)

    @get("/ended", guards=require(Permission.VIEW), responses=error_responses(404))
    async def ended(
        self,
        request: Request,
        ids: Annotated[
            list[str] | None,
            QueryParameter(description="The jobs (comma-separated or repeated, at most 500)"),
        ] = None,
        wait: WaitSeconds = None,
    ) -> list[JobView]:
        """Those of the jobs `ids` names that ended, each in full as GET
        /api/v1/jobs/{id} shows it, in no set order. With `wait` (seconds, at most
        --max-wait): answered as soon as one has ended, or when the wait is over (maybe
        none). 404 if one of them does not exist (or was deleted), naming it."""
        state = app_state(request)
        wait_s = _wait_s(state, wait)
        job_ids = _wait_ids(ids, True)
        if wait_s <= 0:
            return await _ended_or_404(state, job_ids)
        deadline = time.monotonic() + wait_s
        while True:  # register, then read: an ending after the read wakes the wait
            with state.waiters.registered(job_ids) as woken:
                ended = await _ended_or_404(state, job_ids)
                if ended or time.monotonic() >= deadline or state.waiters.closed:
                    return ended
                found = await state.waiters.wait(woken, deadline - time.monotonic())
            # Those the wake read ended (with the change that ended them); else read again.
            if ended := [_shown(found[i]) for i in dict.fromkeys(job_ids) if i in found]:
                return ended

    @get("/{job_id:str}", guards=require(Permission.VIEW), responses=error_responses(404))
    async def show(
        self, request: Request, job_id: FromPath[str], wait: WaitSeconds = None
    ) -> JobView:
        """The job with all its runs; secret parameter values are replaced. With `wait`
        (seconds, at most --max-wait, default 60): answer as soon as the job is in a
        terminal phase, or when the wait is over, with the job as it is then."""
        state = app_state(request)
        return await _until_ended(state, job_id, _wait_s(state, wait))

    @get("/{job_id:str}/runs", guards=require(Permission.VIEW), responses=error_responses(404))
    async def runs(self, request: Request, job_id: FromPath[str]) -> list[RunView]:
        """Every run (attempt) of the job, oldest first, each with its timing, supervisor,
        outcome and phase history."""
        return (await job_or_404(app_state(request), job_id)).runs

    @get("/{job_id:str}/tests", guards=require(Permission.VIEW), responses=error_responses(404))
    async def tests(
        self,
        request: Request,
        job_id: FromPath[str],
        result: FromQuery[TestResult | None] = None,
        attempt: Annotated[int | None, QueryParameter(ge=1, le=INT64_MAX)] = None,
        after: Annotated[int | None, QueryParameter(ge=0, le=INT64_MAX)] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=MAX_TEST_PAGE)] = DEFAULT_TEST_PAGE,
    ) -> TestCasePage:
        """The test cases of one run's JUnit reports, in report order: the job's latest
        run that has a report, or run `attempt`; only those whose `result` is given
        (passed, failed, error, skipped). A full page carries `next_after`: pass it as
        `after` for the next one. `attempt` is null when no run has a report."""
        page = await app_state(request).store.test_cases(
            job_id, result=result, attempt=attempt, limit=limit, after=after
        )
        if page is None:
            raise ApiError(404, "not_found", f"no job {job_id!r}")
        return page

    @get("/{job_id:str}/events", guards=require(Permission.VIEW), responses=error_responses(404))
    async def events(self, request: Request, job_id: FromPath[str]) -> list[JobEvent]:
        """The job's audit trail: submission, cancel requests (and by whom), restarts,
        timeouts, and every phase change of every run, in time order."""
        events = await app_state(request).store.job_events(job_id)
        if events is None:
            raise ApiError(404, "not_found", f"no job {job_id!r}")
        return events

    @post(
        "/{job_id:str}/cancel",
        guards=require(Permission.CANCEL),
        status_code=202,
        responses=error_responses(404),
    )
    async def cancel(self, request: Request, job_id: FromPath[str]) -> CancelAccepted:
        """Cancel: a queued job ends at once, a running one is stopped (idempotent). A
        submitter may cancel only the jobs its own token submitted (else 403)."""
        await _check_owner(request, job_id, "cancel")
        state = app_state(request)
        result = await state.store.request_cancel(job_id, actor(request))
        if result is None:
            raise ApiError(404, "not_found", f"no job {job_id!r}")
        if result.supervisor_id is not None and result.attempt is not None:
            run = RunOnSupervisor(job_id, result.attempt, result.supervisor_id)
            await _stop_runs(state, [run], "canceled")
        return CancelAccepted(job_id, result.phase)

    @delete(
        "/{job_id:str}",
        guards=require(Permission.CANCEL),
        status_code=204,
        responses=error_responses(409),
    )
    async def remove(self, request: Request, job_id: FromPath[str]) -> None:
        """Delete an ended job with its runs, output and events. Deleting a job that is
        already gone succeeds too; a job still queued or running is a 409 (cancel first).
        A submitter may delete only the jobs its own token submitted (else 403)."""
        await _check_owner(request, job_id, "delete")
        outcome = await app_state(request).store.delete_job(job_id)
        if outcome == "active":
            raise ApiError(409, "job_active", f"job {job_id!r} has not ended: cancel it first")
