"""The docker backend: runs each job in its own container on a Docker engine.

What a container gets (privileges, capabilities, network, limits, user, devices) is the
host's rules in docker_policy; this backend applies them when it admits a run and when it
creates the run's container.

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

Threads. The Docker SDK blocks, so every engine call runs in a worker thread
(docker_client): nothing blocks the event loop.

Modules. This one holds the backend: the container's lifecycle (create, start, stop,
remove, re-adopt). What a container may have and is created with (and its labels) is
docker_policy, the client and its threads are docker_client, images and artifact tarballs
are docker_images, reading output (attach stream, log replay) is docker_streams, and
turning an ending into an Outcome is docker_outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

import docker
import docker.errors

from protocol import codec, limits
from protocol.exceptions import FrameError, JobError, JobErrorKind
from protocol.limits import clip_message
from protocol.messages import RunRef, StartJob
from protocol.spec import DockerBackend as DockerSpec
from supervisor.artifacts import ArtifactSource
from supervisor.backends.base import Backend, Outcome, RunContext
from supervisor.backends.devices import Devices
from supervisor.backends.docker_client import EngineClient, explain
from supervisor.backends.docker_images import Image, ImageStore
from supervisor.backends.docker_outcome import Stopping, outcome, stopped_early
from supervisor.backends.docker_policy import (
    LABEL_DEVICES,
    LABEL_START,
    LABEL_SUPERVISOR,
    container_name,
    container_options,
    device_groups,
    docker_spec,
    labels_for,
    limits_for,
    pseudo_terminals,
    user_for,
)
from supervisor.backends.docker_streams import ContainerOutput, Ended, Pipe, socket_pipe
from supervisor.config import DeviceConfig, SupervisorConfig
from supervisor.inputs import IN_DIR
from supervisor.outputs import OUT_DIR

log = logging.getLogger(__name__)

#: After SIGKILL, how long to wait for the engine to report the container's end.
KILL_WAIT_S = 30.0

_MB = 1024 * 1024


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
        self._engine = EngineClient(docker_host, timeout_s=self.settings.engine_timeout_s)
        self._images = ImageStore(
            artifacts,
            work_dir / "docker-images" if work_dir is not None else None,
            max_unpacked_bytes=self.settings.max_image_unpacked_mb * _MB,
            engine=self._engine,
        )
        #: Runs found by recover(), waiting for resume(): run -> container id.
        self._recovered: dict[RunRef, str] = {}
        #: Runs inside run() or resume() now.
        self._active: set[RunRef] = set()
        self._pipes: set[Pipe] = set()
        self._output = ContainerOutput(self._engine.connected, self._pipes)
        self._closed = False

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
        await self._engine.client()
        await self._images.clear_incoming()

    def resource_counts(self) -> dict[str, int]:
        return self.devices.resource_counts()

    def admit(self, start: StartJob) -> None:
        """Refuse at once what this supervisor can never run or can't run now (raises
        JobError), and reserve the run's devices. Cheap and synchronous: meant for
        BackendSupervisor.start_job, before the run is held. run() uses the reservation."""
        spec = docker_spec(start)
        limits_for(spec, self.settings, self._engine.cpus)
        self.devices.allocate(
            _owner(RunRef(start.job_id, start.attempt)), start.resources, start.devices
        )

    async def run(self, ctx: RunContext) -> Outcome:
        if self._closed:
            raise RuntimeError("the docker backend is closed")
        spec = docker_spec(ctx.start)
        owner = _owner(ctx.run)
        cid: str | None = None
        self._active.add(ctx.run)
        try:
            limits_ = limits_for(spec, self.settings, self._engine.cpus)
            devices: list[DeviceConfig] = []
            if ctx.start.resources:
                devices = self.devices.allocate(owner, ctx.start.resources, ctx.start.devices)
                await ctx.stage("allocating", ", ".join(f"{d.name} ({d.path})" for d in devices))
            image = await ctx.unless_stopped(self._images.resolve(ctx, spec))
            if image is None:
                return stopped_early(ctx)
            user = user_for(spec, image, self.settings)
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
        api = await self._engine.client()
        found = await self._engine.call(
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
        api = await self._engine.client()
        try:
            info = await self._engine.call(api.inspect_container, cid)
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
            future = self._engine.in_stream_thread(self._output.replay, ctx, cid, pipes)
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
        await self._engine.close()

    async def _remove(self, cid: str) -> None:
        """Remove a container (and its anonymous volumes), killing it if it still runs."""
        try:
            api = await self._engine.client()
            await self._engine.call(api.remove_container, cid, v=True, force=True)
        except docker.errors.NotFound:
            pass
        except (docker.errors.DockerException, RuntimeError) as exc:  # RuntimeError: closed
            log.warning("could not remove container %s: %s", cid[:12], exc)

    # --- containers --------------------------------------------------------------------

    async def _create(
        self,
        ctx: RunContext,
        spec: DockerSpec,
        image: Image,
        user: str | None,
        devices: list[DeviceConfig],
        limits: dict[str, Any],
    ) -> str:
        api = await self._engine.client()
        gids = await self._engine.call(device_groups, devices) if devices else []
        ptys = await self._engine.call(pseudo_terminals, devices) if devices else {}
        inputs = ctx.work_dir / IN_DIR if ctx.start.inputs else None
        outputs = ctx.work_dir / OUT_DIR if ctx.start.collect else None
        options = container_options(
            spec, self.settings, ctx.env, devices, gids, limits, inputs, outputs, ptys
        )
        host_config = api.create_host_config(**options.host_config)
        labels = labels_for(self.supervisor_id, ctx.run, ctx.start, devices)
        name = container_name(self.supervisor_id, ctx.run)
        try:
            created = await self._engine.call(
                api.create_container,
                image.id,
                command=list(spec.command) or None,
                environment=options.env,
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
        api = await self._engine.client()
        sock = await self._engine.call(
            api.attach_socket, cid, params={"stdout": 1, "stderr": 1, "stream": 1, "logs": 0}
        )
        pipe = socket_pipe(sock)
        self._pipes.add(pipe)
        # The reader waits for `go`: "running" is reported before the first output.
        go = threading.Event()
        future = self._engine.in_stream_thread(self._output.copy_attached, ctx, cid, pipe, go)
        try:
            try:
                await self._engine.call(api.start, cid)
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
            api = await self._engine.client()
            state = (await self._engine.call(api.inspect_container, cid))["State"]
        return outcome(ctx, state, stopping, ended.notes, docker_spec(ctx.start).memory_mb)

    async def _stop(
        self, ctx: RunContext, cid: str, ended: asyncio.Future[Ended], stop_signal: str
    ) -> Stopping:
        """Ask the container to stop, wait the grace period, then kill it."""
        api = await self._engine.client()
        grace = ctx.grace_s
        if grace is None:  # no word from the StopJob: the spec's own grace
            grace = docker_spec(ctx.start).stop_grace_s
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
            await self._engine.call(api.kill, cid, signal=sig)
            return True
        except docker.errors.APIError as exc:
            if exc.status_code in (404, 409):  # gone, or not running any more
                return False
            raise

    # --- output (worker threads) -------------------------------------------------------


# --- helpers ---------------------------------------------------------------------------


def _owner(run: RunRef) -> str:
    return f"{run.job_id}#{run.attempt}"


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _report_running(ctx: RunContext) -> None:
    """Report "running", unless a stop came first (the run is "terminating" then, and
    "running" may not follow that)."""
    if not ctx.stop_requested.is_set():
        await ctx.running()
