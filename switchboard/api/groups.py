"""Job groups (docs/lab.md, "Job groups"): submit one, list them, show one.

A group's roles are jobs (each with its own spec and devices, possibly on different
hosts) placed all or none by the dispatcher (switchboard.gangs); each job links to its
group (`group`), and the group's state is derived from its roles'.
"""

from __future__ import annotations

import logging
from typing import Annotated

import msgspec
from litestar import Controller, Request, get, post
from litestar.params import FromPath, JSONBody, QueryParameter

from switchboard import gangs, metrics
from switchboard.api.errors import ApiError, error_responses, invalid_spec
from switchboard.api.jobs import check_devices, check_size, with_run_timeout
from switchboard.api.security import actor, require
from switchboard.auth import Permission
from switchboard.ids import new_job_id
from switchboard.models import GroupSpec, GroupView
from switchboard.state import AppState, app_state
from switchboard.store.errors import ArtifactMissing, QueueFull, QueueQuotaFull

log = logging.getLogger("switchboard.api.groups")

#: Groups a listing shows unless `limit` says otherwise, and the most it may show.
DEFAULT_LIST = 50
MAX_LIST = 500


def new_group_id() -> str:
    """A group's id: `g-` and a job id (time-ordered, unique)."""
    return "g-" + new_job_id()


def _refuse(message: str, field: str, kind: str = "invalid_spec") -> ApiError:
    log.info("refused a job group: %s", message)
    return ApiError(400, kind, message, field)


def _check_roles(group: GroupSpec) -> None:
    """What a role's job can't have: it is placed with the group, once, so no restart
    policy (a second run would be placed alone), no concurrency key, no reservation, and
    no input from another job's output (it would wait apart from the group)."""
    for index, role in enumerate(group.roles):
        spec, at = role.spec, f"roles[{index}].spec."
        check_size(spec, at)
        for name, present in (
            ("restart", spec.restart is not None),
            ("concurrency", spec.concurrency is not None),
            ("reservation", spec.reservation is not None),
            ("inputs", bool(spec.chained_inputs())),
        ):
            if present:
                what = "an earlier job's output" if name == "inputs" else f"a {name}"
                raise _refuse(
                    f"{at}{name}: a role of a group can't have {what} (it is placed once,"
                    " with the whole group)",
                    at + name,
                )


async def _check_satisfiable(state: AppState, group: GroupSpec) -> None:
    """Each role must be one the lab could ever serve (as a job is), and the roles must
    fit the lab all at once (with nothing running and every device not retired free):
    else the group is refused now, with the reason."""
    specs = [role.spec for role in group.roles]
    await check_devices(state, specs, lambda index: f"roles[{index}].spec.")
    if not any(spec.resources or spec.devices for spec in specs):
        return
    devices = await state.store.lab_devices()
    if not devices:
        return
    lab = gangs.whole_lab(await state.store.list_supervisors(), devices)
    needs = [gangs.RoleNeed(r.role, str(i), r.spec, r.essential) for i, r in enumerate(group.roles)]
    reason = gangs.refusal(needs, lab)
    if reason is not None:
        metrics.SUBMISSIONS_REFUSED.labels("no_device").inc()
        raise _refuse(f"roles: {reason}", "roles", "unsatisfiable")


class GroupController(Controller):
    path = "/api/v1/groups"
    tags = ["jobs"]  # noqa: RUF012 - Litestar reads it as a plain list

    @post(
        "/",
        guards=require(Permission.SUBMIT),
        status_code=201,
        responses=error_responses(413, 429),
    )
    async def submit(self, request: Request, data: JSONBody[GroupSpec]) -> GroupView:
        """Queue a job group: a job per role, placed all at once when every role fits
        (each on its own host if need be), never some of them. A role marked essential
        (the default) that ends without succeeding stops the others."""
        state = app_state(request)
        try:
            group = msgspec.json.decode(await request.body(), type=GroupSpec, strict=True)
        except msgspec.ValidationError as exc:
            raise invalid_spec(exc) from None
        default_s = state.settings.default_run_timeout_s
        group = msgspec.structs.replace(
            group,
            roles=[
                msgspec.structs.replace(r, spec=with_run_timeout(r.spec, default_s))
                for r in group.roles
            ],
        )
        _check_roles(group)
        await _check_satisfiable(state, group)
        token = request.state.token
        try:
            made = await state.store.create_group(
                new_group_id(),
                group,
                [new_job_id() for _ in group.roles],
                actor(request),
                state.settings.max_queued_jobs,
                owner=token.id,
                max_queued_per_owner=state.settings.max_queued_per_token,
            )
        except QueueFull as exc:
            quota = isinstance(exc, QueueQuotaFull)
            metrics.SUBMISSIONS_REFUSED.labels("token_quota" if quota else "queue_full").inc()
            log.warning("job group of token %s refused: %s", token.id, exc)
            raise ApiError(429, "queue_quota" if quota else "queue_full", str(exc)) from None
        except ArtifactMissing as exc:
            field = f"roles[{exc.index}].spec.{exc.field}"
            message = f"{field}: artifact {exc.digest} has not been uploaded"
            raise ApiError(400, "invalid_spec", message, field) from None
        log.info("job group %s (%s) queued by %s", made.id, made.name, actor(request))
        state.dispatcher.groups_submitted()
        return made

    @get("/", guards=require(Permission.VIEW), responses=error_responses())
    async def list_groups(
        self,
        request: Request,
        limit: Annotated[int, QueryParameter(ge=1, le=MAX_LIST)] = DEFAULT_LIST,
    ) -> list[GroupView]:
        """The newest groups first, each with its roles and state."""
        return await app_state(request).store.list_groups(limit)

    @get("/{group_id:str}", guards=require(Permission.VIEW), responses=error_responses(404))
    async def show(self, request: Request, group_id: FromPath[str]) -> GroupView:
        """A group: its state (derived from its roles'), and each role's job as it is."""
        found = await app_state(request).store.get_group(group_id)
        if found is None:
            raise ApiError(404, "not_found", f"no job group {group_id!r}")
        return found
