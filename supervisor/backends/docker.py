"""The docker backend: runs each job in its own container on a Docker engine.

What a container gets (docs/docker.md says it for users). The spec's image, command, env (plus
the job's parameters, which win) and workdir; its user, else the config's `user`, else the
image's (with the config's `run_as_non_root`, one that is or may be root is refused). Never
privileged; every capability dropped, then those of the spec's `cap_add` that the supervisor
config allows added back (a spec asking for one it doesn't allow is refused);
no-new-privileges. Network `none` unless the spec asks for another one the config allows.
Memory (without swap), CPU and pid limits from the spec, else the config's defaults (which
exist unless the config turns them off: no container is unlimited by accident); a spec asking
for more than the config's maximum is refused. `read_only_rootfs` (the spec's, or the
config's for every container) makes the root filesystem read-only with a writable tmpfs of
`scratch_mb` at /scratch (TMPDIR points there). The devices the run was given (devices.py),
and nothing else of the host. Docker's init as PID 1 (config `init`), so signals reach the
program and zombies are reaped.

Images. `image` names an image the engine already has (the supervisor never pulls);
`image_artifact` names a `docker save` tarball uploaded to the switchboard. The tarball is
downloaded to the work dir, checked against its digest, unpacked (gzip, bzip2, xz) under the
config's `max_image_unpacked_mb`, streamed to the engine (never held in memory: see
image_tarball), loaded once and remembered by digest
(in memory and, with a `work_dir`, on disk, so restarts don't load it again). Before loading,
the tarball's own tags are stripped: an artifact can't replace an image the host has under
some name. Its images are tagged `switchboard-artifact:<digest hex>-<n>` instead, and the
spec's `image` picks one of the tarball's original tags.

Output. A container's stdout and stderr are read from the engine's attach stream, which is
opened before the container starts: no byte is missed, the bytes are exactly what the program
wrote (invalid UTF-8 included) and arrive as they are written, and a slow link to the
switchboard slows the program (the engine stops reading its pipes while the supervisor
doesn't read) instead of growing anything. The engine also keeps each container's output
with the `local` log driver, which stores bytes as they are (json-file would replace invalid
UTF-8): that copy is what a re-adopted run replays (below).

Endings. The exit status is Docker's (what `docker run` would exit with). The kernel's OOM
killer gives reason "oom". A stop (StopJob, run timeout, shutdown) sends the image's stop
signal (SIGTERM unless the image says otherwise), waits the grace period (`ctx.grace_s`,
0 for a run timeout), then SIGKILL; when a signal we sent ended the program, the outcome
names it. A container whose run has ended is removed: the output lives on the switchboard.

Restarts. Each container is labeled with this supervisor's id, its run, the devices it holds
and the StartJob it came from (`switchboard.start`, as JSON, without its secret parameters:
their only copy on the host is the container's environment). After a restart, recover()
lists this supervisor's containers and returns their StartJobs; resume() replays a running
container's output from the engine's log (from byte 0 of each stream: the switchboard keeps
only what it lacks), follows it until the container ends, then reports its real exit
status; a container that ended while the supervisor was away is reported the same way. A
container that was created but never started is started.

Threads. The Docker SDK blocks, so every engine call runs in a worker thread: short calls in
a small pool, and per running container one long-lived thread that copies its output and
then waits for its end. Nothing blocks the event loop.

Modules. This one holds the backend: the container's lifecycle (policy, create, start,
stop, remove, re-adopt). Images and artifact tarballs are docker_images, reading output
(attach stream, log replay) is docker_streams, and turning an ending into an Outcome is
docker_outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import docker.types
import msgspec

from protocol import codec, limits
from protocol.exceptions import FrameError, JobError, JobErrorKind
from protocol.limits import clip_message
from protocol.messages import RunRef, StartJob
from protocol.spec import DockerBackend as DockerSpec
from supervisor.artifacts import ArtifactSource
from supervisor.backends.base import Backend, Outcome, RunContext
from supervisor.backends.devices import Devices
from supervisor.backends.docker_images import Image, ImageStore, explain, normalize_arch
from supervisor.backends.docker_outcome import Stopping, outcome, stopped_early
from supervisor.backends.docker_streams import ContainerOutput, Ended, Pipe, socket_pipe
from supervisor.config import DeviceConfig, SupervisorConfig, is_non_root

log = logging.getLogger(__name__)

T = TypeVar("T")

LABEL_SUPERVISOR = "switchboard.supervisor"
LABEL_JOB = "switchboard.job"
LABEL_ATTEMPT = "switchboard.attempt"
LABEL_START = "switchboard.start"
LABEL_DEVICES = "switchboard.devices"
#: The writable tmpfs of containers with a read-only root filesystem.
SCRATCH = "/scratch"
#: After SIGKILL, how long to wait for the engine to report the container's end.
KILL_WAIT_S = 30.0
#: Short engine calls in flight at once.
CALL_THREADS = 32
#: Threads that follow one container each (created on demand).
STREAM_THREADS = 4096

_MB = 1024 * 1024
_NON_ROOT_ONLY = "this supervisor runs containers only as a numeric uid other than 0"


class DockerBackend(Backend):
    kind = "docker"

    def __init__(
        self,
        artifacts: ArtifactSource,
        *,
        supervisor_id: str,
        docker_host: str | None = None,
        config: SupervisorConfig | None = None,
        work_dir: Path | None = None,
        devices: Devices | None = None,
    ) -> None:
        if not limits.is_valid_id(supervisor_id):
            raise ValueError(f"supervisor id {supervisor_id!r} must match {limits.ID_PATTERN}")
        self.supervisor_id = supervisor_id
        self.docker_host = docker_host
        self.config = config or SupervisorConfig()
        self.settings = self.config.docker
        #: The host's devices and who holds them (its resource_counts() go in the Hello).
        self.devices = devices if devices is not None else Devices(self.config.devices)
        self._api: docker.APIClient | None = None
        self._connect_lock = asyncio.Lock()
        self._calls = ThreadPoolExecutor(CALL_THREADS, thread_name_prefix="docker")
        self._streams = ThreadPoolExecutor(STREAM_THREADS, thread_name_prefix="docker-stream")
        self._images = ImageStore(
            artifacts,
            work_dir / "docker-images" if work_dir is not None else None,
            max_unpacked_bytes=self.settings.max_image_unpacked_mb * _MB,
            client=self._client,
            call=self._call,
            engine=self._engine,
        )
        #: Runs found by recover(), waiting for resume(): run -> container id.
        self._recovered: dict[RunRef, str] = {}
        #: Runs inside run() or resume() now.
        self._active: set[RunRef] = set()
        self._pipes: set[Pipe] = set()
        self._output = ContainerOutput(self._engine, self._pipes)
        self._closed = False
        #: The engine's CPU count, once connected.
        self._engine_cpus: int | None = None

    @property
    def artifact_loads(self) -> int:
        """Images loaded from artifacts."""
        return self._images.artifact_loads

    @property
    def artifact_hits(self) -> int:
        """Runs that found their artifact already loaded."""
        return self._images.artifact_hits

    # --- Backend contract --------------------------------------------------------------

    async def prepare(self) -> None:
        """Connect to the engine (RuntimeError with the reason if it can't be reached)."""
        await self._client()
        await self._images.clear_incoming()

    def resource_counts(self) -> dict[str, int]:
        return self.devices.resource_counts()

    def admit(self, start: StartJob) -> None:
        """Refuse at once what this supervisor can never run or can't run now (raises
        JobError), and reserve the run's devices. Cheap and synchronous: meant for
        BackendSupervisor.start_job, before the run is held. run() uses the reservation."""
        spec = _docker_spec(start)
        self._limits(spec)
        self.devices.allocate(_owner(RunRef(start.job_id, start.attempt)), start.resources)

    async def run(self, ctx: RunContext) -> Outcome:
        if self._closed:
            raise RuntimeError("the docker backend is closed")
        spec = _docker_spec(ctx.start)
        owner = _owner(ctx.run)
        cid: str | None = None
        self._active.add(ctx.run)
        try:
            limits_ = self._limits(spec)
            devices: list[DeviceConfig] = []
            if ctx.start.resources:
                devices = self.devices.allocate(owner, ctx.start.resources)
                await ctx.stage("allocating", ", ".join(f"{d.name} ({d.path})" for d in devices))
            image = await ctx.unless_stopped(self._images.resolve(ctx, spec))
            if image is None:
                return stopped_early(ctx)
            user = self._user(spec, image)
            await ctx.stage("creating", image.description)
            cid = await self._create(ctx, spec, image, user, devices, limits_)
            if ctx.stop_flag.is_set():
                return stopped_early(ctx)
            await ctx.stage("starting")
            return await self._start_and_follow(ctx, cid, image.stop_signal)
        finally:
            # A cancelled run (this process is going away) leaves its container running and
            # its devices held: the next supervisor process re-adopts both.
            try:
                if not _cancelling():
                    if cid is not None:
                        await self._remove(cid)
                    self.devices.release(owner)
                elif cid is None:
                    self.devices.release(owner)
            finally:
                self._active.discard(ctx.run)

    async def recover(self) -> list[StartJob]:
        api = await self._client()
        found = await self._call(
            api.containers,
            all=True,
            filters={"label": f"{LABEL_SUPERVISOR}={self.supervisor_id}"},
        )
        starts: list[StartJob] = []
        for container in found:
            labels = container.get("Labels") or {}
            name = (container.get("Names") or [container["Id"][:12]])[0].lstrip("/")
            try:
                start = codec.decode_from_switchboard(labels.get(LABEL_START, "").encode())
            except FrameError as exc:
                log.error(
                    "container %s: unreadable %s label (%s); left alone", name, LABEL_START, exc
                )
                continue
            if not isinstance(start, StartJob) or start.backend.kind != self.kind:
                log.error(
                    "container %s: %s is not a docker StartJob; left alone", name, LABEL_START
                )
                continue
            ref = RunRef(start.job_id, start.attempt)
            if ref in self._active:
                continue  # this process runs it (recover() called twice)
            self._recovered[ref] = container["Id"]
            held = [n for n in labels.get(LABEL_DEVICES, "").split(",") if n]
            self.devices.reserve(_owner(ref), held)
            starts.append(start)
            log.info(
                "found container %s of run %s#%d (%s)",
                name,
                ref.job_id,
                ref.attempt,
                container.get("State") or container.get("Status"),
            )
        return starts

    async def resume(self, ctx: RunContext) -> Outcome:
        cid = self._recovered.pop(ctx.run, None)
        if cid is None:
            raise JobError(
                JobErrorKind.CANNOT_RESUME,
                f"no container of run {ctx.run.job_id}#{ctx.run.attempt} was found",
            )
        owner = _owner(ctx.run)
        api = await self._client()
        try:
            info = await self._call(api.inspect_container, cid)
        except docker.errors.NotFound:
            self.devices.release(owner)
            raise JobError(
                JobErrorKind.CANNOT_RESUME, f"container {cid[:12]} is gone (removed meanwhile)"
            ) from None
        stop_signal = (info.get("Config") or {}).get("StopSignal") or "SIGTERM"
        self._active.add(ctx.run)
        try:
            if info["State"].get("Status") == "created":
                # Created, never started (the supervisor went away in between): start it.
                return await self._start_and_follow(ctx, cid, stop_signal)
            await _report_running(ctx)
            pipes: list[Pipe] = []
            future = self._in_stream_thread(self._output.replay, ctx, cid, pipes)
            return await self._follow(ctx, cid, future, pipes, stop_signal)
        finally:
            try:
                if not _cancelling():
                    await self._remove(cid)
                    self.devices.release(owner)
            finally:
                self._active.discard(ctx.run)

    async def close(self) -> None:
        self._closed = True
        for pipe in list(self._pipes):
            pipe.abandon()
        self._calls.shutdown(wait=False, cancel_futures=True)
        self._streams.shutdown(wait=False, cancel_futures=True)
        if self._api is not None:
            api, self._api = self._api, None
            await asyncio.to_thread(api.close)

    # --- engine access -----------------------------------------------------------------

    async def _client(self) -> docker.APIClient:
        if self._api is None:
            async with self._connect_lock:
                if self._api is None:
                    self._api = await asyncio.to_thread(self._connect)
        return self._api

    def _connect(self) -> docker.APIClient:
        """A client for the engine (worker thread: it asks the engine for its API version)."""
        kwargs: dict[str, Any] = (
            {"base_url": self.docker_host}
            if self.docker_host is not None
            else docker.utils.kwargs_from_env()
        )
        try:
            api = docker.APIClient(
                version="auto",
                timeout=self.settings.engine_timeout_s,
                max_pool_size=512,
                **kwargs,
            )
            version = api.version()
            self._engine_cpus = api.info().get("NCPU") or None
        except docker.errors.DockerException as exc:
            where = self.docker_host or os.environ.get("DOCKER_HOST") or "the default socket"
            raise RuntimeError(f"the Docker engine at {where} is not reachable: {exc}") from None
        self._images.engine_arch = normalize_arch(version.get("Arch", ""))
        log.info(
            "Docker engine %s (API %s, %s) at %s",
            version.get("Version"),
            api.api_version,
            version.get("Arch"),
            api.base_url,
        )
        return api

    def _engine(self) -> docker.APIClient:
        """The connected client (worker threads: they start once it is connected)."""
        assert self._api is not None
        return self._api

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one blocking SDK call in the call pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._calls, functools.partial(fn, *args, **kwargs))

    def _in_stream_thread(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run `fn` (which blocks until a container ends) on a thread of its own."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._streams, functools.partial(fn, *args))

    async def _remove(self, cid: str) -> None:
        """Remove a container (and its anonymous volumes), killing it if it still runs."""
        try:
            api = await self._client()
            await self._call(api.remove_container, cid, v=True, force=True)
        except docker.errors.NotFound:
            pass
        except (docker.errors.DockerException, RuntimeError) as exc:  # RuntimeError: closed
            log.warning("could not remove container %s: %s", cid[:12], exc)

    # --- policy ------------------------------------------------------------------------

    def _limits(self, spec: DockerSpec) -> dict[str, Any]:
        """Host-config settings for `spec` under this host's rules; JobError if it asks for
        something the config doesn't allow."""
        s = self.settings
        refused: list[str] = []
        if spec.network != "none" and spec.network not in s.allowed_networks:
            refused.append(
                f"network {spec.network!r} (this supervisor allows: "
                f"{', '.join(sorted({'none', *s.allowed_networks}))})"
            )
        denied = [c for c in spec.cap_add if c not in s.allowed_capabilities]
        if denied:
            allowed = ", ".join(sorted(s.allowed_capabilities)) or "none"
            refused.append(f"capabilities {', '.join(denied)} (this supervisor grants: {allowed})")
        if spec.memory_mb is not None and s.max_memory_mb and spec.memory_mb > s.max_memory_mb:
            refused.append(f"{spec.memory_mb} MB of memory (at most {s.max_memory_mb} MB here)")
        if spec.cpus is not None and s.max_cpus and spec.cpus > s.max_cpus:
            refused.append(f"{spec.cpus:g} CPUs (at most {s.max_cpus:g} here)")
        if spec.pids_limit is not None and s.max_pids_limit and spec.pids_limit > s.max_pids_limit:
            refused.append(f"{spec.pids_limit} processes (at most {s.max_pids_limit} here)")
        if s.run_as_non_root and spec.user is not None and not is_non_root(spec.user):
            refused.append(f"user {spec.user!r} ({_NON_ROOT_ONLY})")
        if refused:
            raise JobError(
                JobErrorKind.IMAGE_NOT_COMPATIBLE, "the job asks for " + "; ".join(refused)
            )
        memory_mb = spec.memory_mb or s.default_memory_mb
        cpus = spec.cpus
        if cpus is None and s.default_cpus:
            # The engine refuses more CPUs than it has: a default must fit any host.
            cpus = min(s.default_cpus, self._engine_cpus or s.default_cpus)
        result: dict[str, Any] = {
            "network_mode": spec.network,
            "pids_limit": spec.pids_limit or s.default_pids_limit,
        }
        if memory_mb:
            # Swap limit = memory limit: the limit means memory, not memory plus swap.
            result["mem_limit"] = result["memswap_limit"] = memory_mb * _MB
        if cpus:
            result["nano_cpus"] = round(cpus * 1e9)
        return result

    def _user(self, spec: DockerSpec, image: Image) -> str | None:
        """Who the container runs as (None: the image's user); JobError if the config wants
        no root and that would be root, or can't be told from root."""
        user = spec.user or self.settings.user
        runs_as = user or image.user or "root"  # an image without USER runs as root
        if self.settings.run_as_non_root and not is_non_root(runs_as):
            whose = "user" if user else "the image's user"
            raise JobError(
                JobErrorKind.IMAGE_NOT_COMPATIBLE,
                f"{image.description} would run as {whose} {runs_as!r}: {_NON_ROOT_ONLY} "
                '(set `user`, e.g. "1000:1000")',
            )
        return user

    # --- containers --------------------------------------------------------------------

    async def _create(
        self,
        ctx: RunContext,
        spec: DockerSpec,
        image: Image,
        user: str | None,
        devices: list[DeviceConfig],
        limits_: dict[str, Any],
    ) -> str:
        api = await self._client()
        s = self.settings
        env = {**spec.env, **ctx.env}
        tmpfs = None
        read_only = spec.read_only_rootfs or s.read_only_rootfs
        if read_only:
            tmpfs = {SCRATCH: f"rw,exec,nosuid,nodev,mode=1777,size={s.scratch_mb}m"}
            env.setdefault("TMPDIR", SCRATCH)
        group_add: list[str] = []
        if devices:
            env.update(_device_env(devices))
            gids = await self._call(_device_groups, devices)
            group_add = [str(g) for g in gids if g != 0]
        log_max = max(1, s.log_max_mb)
        host_config = api.create_host_config(
            privileged=False,
            cap_drop=["ALL"],
            cap_add=list(spec.cap_add) or None,
            security_opt=["no-new-privileges"],
            read_only=read_only,
            tmpfs=tmpfs,
            devices=[f"{d.path}:{d.target}:{d.permissions}" for d in devices] or None,
            group_add=group_add or None,
            init=s.init,
            log_config=docker.types.LogConfig(
                type="local",
                config={"max-size": f"{log_max}m", "max-file": "2", "compress": "false"},
            ),
            **limits_,
        )
        labels = {
            LABEL_SUPERVISOR: self.supervisor_id,
            LABEL_JOB: ctx.run.job_id,
            LABEL_ATTEMPT: str(ctx.run.attempt),
            LABEL_START: codec.encode(_without_secrets(ctx.start)).decode(),
            LABEL_DEVICES: ",".join(d.name for d in devices),
        }
        name = _container_name(self.supervisor_id, ctx.run)
        try:
            created = await self._call(
                api.create_container,
                image.id,
                command=list(spec.command) or None,
                environment=env,
                working_dir=spec.workdir,
                user=user,
                labels=labels,
                host_config=host_config,
                name=name,
                use_config_proxy=False,
            )
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                raise JobError(
                    JobErrorKind.JOB_ALREADY_EXISTS,
                    f"the engine already has a container named {name}",
                ) from None
            if exc.status_code is not None and exc.status_code >= 500 and not exc.explanation:
                raise
            raise JobError(
                JobErrorKind.IMAGE_NOT_COMPATIBLE,
                clip_message(f"the engine refused the container: {explain(exc)}") or "",
            ) from None
        for warning in created.get("Warnings") or []:
            log.warning("run %s#%d: %s", ctx.run.job_id, ctx.run.attempt, warning)
        return str(created["Id"])

    async def _start_and_follow(self, ctx: RunContext, cid: str, stop_signal: str) -> Outcome:
        """Attach to the container, start it, copy its output until it ends."""
        api = await self._client()
        sock = await self._call(
            api.attach_socket, cid, params={"stdout": 1, "stderr": 1, "stream": 1, "logs": 0}
        )
        pipe = socket_pipe(sock)
        self._pipes.add(pipe)
        # The reader waits for `go`: "running" is reported before the first output.
        go = threading.Event()
        future = self._in_stream_thread(self._output.copy_attached, ctx, cid, pipe, go)
        try:
            try:
                await self._call(api.start, cid)
            except docker.errors.APIError as exc:
                pipe.abandon()
                self._pipes.discard(pipe)
                go.set()
                await future
                return Outcome(
                    exit_code=None,
                    reason="error",
                    message=clip_message(f"the container could not start: {explain(exc)}"),
                )
            await _report_running(ctx)
        except asyncio.CancelledError:
            pipe.abandon()  # this process is going away: the container carries on
            raise
        finally:
            go.set()
        return await self._follow(ctx, cid, future, [pipe], stop_signal)

    async def _follow(
        self,
        ctx: RunContext,
        cid: str,
        future: asyncio.Future[Ended],
        pipes: list[Pipe],
        stop_signal: str,
    ) -> Outcome:
        """Wait for the container's end (its output is being copied by `future`); stop it
        if the run must stop. Returns how it ended."""
        stop = asyncio.ensure_future(ctx.stop_requested.wait())
        stopping: Stopping | None = None
        try:
            either: set[asyncio.Future[Any]] = {future, stop}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not future.done():
                stopping = await self._stop(ctx, cid, future, stop_signal)
            ended = await future
        except asyncio.CancelledError:
            # The supervisor is going away: leave the container running (a restarted
            # supervisor re-adopts it), but stop reading it from this process.
            for pipe in pipes:
                pipe.abandon()
            raise
        finally:
            stop.cancel()
            for pipe in pipes:
                self._pipes.discard(pipe)
        state: dict[str, Any] = {"ExitCode": ended.exit_code}
        if ended.exit_code != 0 and stopping is None:  # OOM? Only the container's state says
            api = await self._client()
            state = (await self._call(api.inspect_container, cid))["State"]
        return outcome(ctx, state, stopping, ended.notes, _docker_spec(ctx.start).memory_mb)

    async def _stop(
        self, ctx: RunContext, cid: str, ended: asyncio.Future[Ended], stop_signal: str
    ) -> Stopping:
        """Ask the container to stop, wait the grace period, then kill it."""
        api = await self._client()
        grace = ctx.grace_s
        if grace is None:  # no word from the StopJob: the spec's own grace
            grace = _docker_spec(ctx.start).stop_grace_s
        stopping = Stopping(grace_s=grace)
        started = time.monotonic()
        if grace > 0:
            if await self._kill(api, cid, stop_signal):
                stopping.signals.append(stop_signal)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(ended), grace)
        if not ended.done():
            if await self._kill(api, cid, "SIGKILL"):
                stopping.signals.append("SIGKILL")
            try:
                await asyncio.wait_for(asyncio.shield(ended), KILL_WAIT_S)
            except TimeoutError:
                raise RuntimeError(
                    f"container {cid[:12]} did not end within {KILL_WAIT_S:.0f} s of SIGKILL"
                ) from None
        stopping.took_s = time.monotonic() - started
        return stopping

    async def _kill(self, api: docker.APIClient, cid: str, sig: str) -> bool:
        """Send a signal; False if the container had already ended."""
        try:
            await self._call(api.kill, cid, signal=sig)
            return True
        except docker.errors.APIError as exc:
            if exc.status_code in (404, 409):  # gone, or not running any more
                return False
            raise

    # --- output (worker threads) -------------------------------------------------------


# --- helpers ---------------------------------------------------------------------------


def _docker_spec(start: StartJob) -> DockerSpec:
    spec = start.backend
    if not isinstance(spec, DockerSpec):
        raise JobError(
            JobErrorKind.IMAGE_NOT_COMPATIBLE, f"the docker backend got a {spec.kind} job"
        )
    return spec


def _without_secrets(start: StartJob) -> StartJob:
    """The StartJob as a label may hold it: anyone who may use the engine reads labels, and
    a re-adopted container already has its environment, so secret parameters are left out."""
    kept = {name: p for name, p in start.parameters.items() if not p.secret}
    return msgspec.structs.replace(start, parameters=kept)


def _owner(run: RunRef) -> str:
    return f"{run.job_id}#{run.attempt}"


def _container_name(supervisor_id: str, run: RunRef) -> str:
    """`sb-<supervisor>-<job>.<attempt>-<hash>`: readable, and unique although ids may
    contain the separators (the labels, not the name, are what the backend relies on)."""
    key = f"{supervisor_id}\0{run.job_id}\0{run.attempt}".encode()
    return f"sb-{supervisor_id}-{run.job_id}.{run.attempt}-{hashlib.sha256(key).hexdigest()[:8]}"


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _device_env(devices: list[DeviceConfig]) -> dict[str, str]:
    """What a job learns about the devices it was given."""
    env = {"SWITCHBOARD_DEVICES": " ".join(d.target for d in devices)}
    by_class: dict[str, list[str]] = {}
    for d in devices:
        by_class.setdefault(d.resource, []).append(d.target)
    for resource, paths in by_class.items():
        key = "".join(c if c.isalnum() else "_" for c in resource.upper())
        env[f"SWITCHBOARD_DEVICE_{key}"] = " ".join(paths)
    env["SWITCHBOARD_DEVICES_JSON"] = json.dumps(
        [
            {"name": d.name, "resource": d.resource, "path": d.target, "labels": d.labels}
            for d in devices
        ],
        separators=(",", ":"),
    )
    return env


def _device_groups(devices: Iterable[DeviceConfig]) -> list[int]:
    """Groups owning the device nodes, so a job running as a non-root user can use them."""
    gids: list[int] = []
    for device in devices:
        try:
            gid = os.stat(device.path).st_gid
        except OSError:
            continue  # the engine will say what's wrong
        if gid not in gids:
            gids.append(gid)
    return gids


async def _report_running(ctx: RunContext) -> None:
    """Report "running", unless a stop came first (the run is "terminating" then, and
    "running" may not follow that)."""
    if not ctx.stop_requested.is_set():
        await ctx.running()
