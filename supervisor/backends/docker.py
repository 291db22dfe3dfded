"""The docker backend: runs each job in its own container on a Docker engine.

What a container gets (docs/docker.md says it for users). The spec's image, command, env (plus
the job's parameters, which win), workdir and user. Never privileged; every capability
dropped, then those of the spec's `cap_add` that the supervisor config allows added back
(a spec asking for one it doesn't allow is refused); no-new-privileges. Network `none` unless
the spec asks for another one the config allows. Memory (without swap), CPU and pid limits
from the spec, else the config's defaults; a spec asking for more than the config's maximum
is refused. `read_only_rootfs` makes the root filesystem read-only with a writable tmpfs at
/scratch (TMPDIR points there). The devices the run was given (supervisor.devices), and
nothing else of the host. Docker's init as PID 1 (config `init`), so signals reach the program
and zombies are reaped.

Images. `image` names an image the engine already has (the supervisor never pulls);
`image_artifact` names a `docker save` tarball uploaded to the switchboard. The tarball is
fetched, checked against its digest, loaded into the engine once and remembered by digest
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
and the StartJob it came from (`switchboard.start`, as JSON). After a restart, recover()
lists this supervisor's containers and returns their StartJobs; resume() replays a running
container's output from the engine's log (from byte 0 of each stream: the switchboard keeps
only what it lacks), follows it until the container ends, then reports its real exit
status; a container that ended while the supervisor was away is reported the same way. A
container that was created but never started is started.

Threads. The Docker SDK blocks, so every engine call runs in a worker thread: short calls in
a small pool, and per running container one long-lived thread that copies its output and
then waits for its end. Nothing blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import signal
import socket
import struct
import tarfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import docker.types
import msgspec
import requests

from protocol import codec, limits
from protocol.exceptions import FrameError, JobError, JobErrorKind
from protocol.limits import clip_message
from protocol.messages import RunRef, StartJob, Stream
from protocol.spec import DockerBackend as DockerSpec
from supervisor.artifacts import ArtifactSource, verify
from supervisor.backends.base import Backend, Outcome, RunContext
from supervisor.config import DeviceConfig, SupervisorConfig
from supervisor.devices import Devices

log = logging.getLogger(__name__)

T = TypeVar("T")

LABEL_SUPERVISOR = "switchboard.supervisor"
LABEL_JOB = "switchboard.job"
LABEL_ATTEMPT = "switchboard.attempt"
LABEL_START = "switchboard.start"
LABEL_DEVICES = "switchboard.devices"
#: Repository under which images loaded from artifacts are tagged.
ARTIFACT_REPOSITORY = "switchboard-artifact"
#: The writable tmpfs of containers with a read-only root filesystem.
SCRATCH = "/scratch"
#: After SIGKILL, how long to wait for the engine to report the container's end.
KILL_WAIT_S = 30.0
#: Short engine calls in flight at once.
CALL_THREADS = 32
#: Threads that follow one container each (created on demand).
STREAM_THREADS = 4096
#: How much a stream reader asks the socket for at once.
READ_SIZE = 256 * 1024

_MB = 1024 * 1024
_FRAME_HEADER = struct.Struct(">BxxxL")
_FRAME_STREAMS: dict[int, Stream] = {1: "stdout", 2: "stderr"}


@dataclass(frozen=True)
class _Image:
    """An image ready to run: its engine id and the signal that asks it to stop."""

    id: str
    stop_signal: str
    description: str


class _Artifact(msgspec.Struct):
    """The images one artifact tarball holds once loaded: engine ids in tarball order, and
    the tarball's own tags (normalized) -> image id."""

    images: list[str]
    tags: dict[str, str] = {}


@dataclass
class _Ended:
    """What a container's reader thread saw: the exit status (None: it stopped reading
    before the end) and notes for the outcome's message."""

    exit_code: int | None
    notes: list[str] = field(default_factory=list)


@dataclass
class _Stopping:
    """What the supervisor did to end a container."""

    signals: list[str] = field(default_factory=list)
    grace_s: float = 0.0
    took_s: float = 0.0


class _Abandoned(Exception):
    """A reader's connection was cut on purpose: nobody wants the rest."""


class _Pipe:
    """A blocking connection a worker thread reads (an attach socket or a logs response),
    which another thread may cut (the run is abandoned, or the backend closes)."""

    def __init__(self, read: Callable[[int], bytes], close: Callable[[], None]) -> None:
        self._read = read
        self._close = close
        self.abandoned = False

    def read(self, size: int) -> bytes:
        """Up to `size` bytes, b"" at the end; raises _Abandoned once abandoned."""
        try:
            data = self._read(size)
        except Exception:
            if self.abandoned:
                raise _Abandoned from None
            raise
        if self.abandoned:
            raise _Abandoned
        return data

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._close()

    def abandon(self) -> None:
        self.abandoned = True
        self.close()


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
        self._artifacts = artifacts
        self._image_dir = work_dir / "docker-images" if work_dir is not None else None
        self._api: docker.APIClient | None = None
        self._engine_arch: str | None = None
        self._connect_lock = asyncio.Lock()
        self._calls = ThreadPoolExecutor(CALL_THREADS, thread_name_prefix="docker")
        self._streams = ThreadPoolExecutor(STREAM_THREADS, thread_name_prefix="docker-stream")
        self._loaded: dict[str, _Artifact] = {}
        self._loading: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        #: Runs found by recover(), waiting for resume(): run -> container id.
        self._recovered: dict[RunRef, str] = {}
        #: Runs inside run() or resume() now.
        self._active: set[RunRef] = set()
        self._pipes: set[_Pipe] = set()
        self._closed = False
        #: Images loaded from artifacts, and runs that found their artifact already loaded.
        self.artifact_loads = 0
        self.artifact_hits = 0

    # --- Backend contract --------------------------------------------------------------

    async def prepare(self) -> None:
        """Connect to the engine (RuntimeError with the reason if it can't be reached)."""
        await self._client()

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
            image = await _unless_stopped(ctx, self._image(ctx, spec))
            if image is None:
                return _stopped_early(ctx)
            await ctx.stage("creating", image.description)
            cid = await self._create(ctx, spec, image, devices, limits_)
            if ctx.stop_flag.is_set():
                return _stopped_early(ctx)
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
            pipes: list[_Pipe] = []
            future = self._in_stream_thread(self._replay, ctx, cid, pipes)
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
        except docker.errors.DockerException as exc:
            where = self.docker_host or os.environ.get("DOCKER_HOST") or "the default socket"
            raise RuntimeError(f"the Docker engine at {where} is not reachable: {exc}") from None
        self._engine_arch = _normalize_arch(version.get("Arch", ""))
        log.info(
            "Docker engine %s (API %s, %s) at %s",
            version.get("Version"),
            api.api_version,
            version.get("Arch"),
            api.base_url,
        )
        return api

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
        if refused:
            raise JobError(
                JobErrorKind.IMAGE_NOT_COMPATIBLE, "the job asks for " + "; ".join(refused)
            )
        memory_mb = spec.memory_mb or s.default_memory_mb
        cpus = spec.cpus or s.default_cpus
        result: dict[str, Any] = {
            "network_mode": spec.network,
            "pids_limit": spec.pids_limit or s.default_pids_limit,
        }
        if memory_mb is not None:
            # Swap limit = memory limit: the limit means memory, not memory plus swap.
            result["mem_limit"] = result["memswap_limit"] = memory_mb * _MB
        if cpus is not None:
            result["nano_cpus"] = round(cpus * 1e9)
        return result

    # --- images ------------------------------------------------------------------------

    async def _image(self, ctx: RunContext, spec: DockerSpec) -> _Image:
        api = await self._client()
        if spec.image_artifact is not None:
            artifact = await self._artifact(ctx, spec.image_artifact)
            if spec.image is not None:
                image_id = artifact.tags.get(_normalize_ref(spec.image))
                if image_id is None:
                    has = ", ".join(sorted(artifact.tags)) or "no tags"
                    raise JobError(
                        JobErrorKind.IMAGE_NOT_FOUND,
                        f"artifact {spec.image_artifact} has no image {spec.image!r} (it has: "
                        f"{has})",
                    )
            else:
                image_id = artifact.images[0]
            described = f"image {image_id[:19]} from artifact {spec.image_artifact[:19]}"
        else:
            assert spec.image is not None
            await ctx.stage("fetching", f"image {spec.image}")
            image_id = spec.image
            described = f"image {spec.image!r}"
        try:
            info = await self._call(api.inspect_image, image_id)
        except docker.errors.ImageNotFound:
            raise JobError(
                JobErrorKind.IMAGE_NOT_FOUND,
                f"{described} is not on this host's Docker engine (supervisors don't pull: "
                "load it on the host, or submit it as an image artifact)",
            ) from None
        except docker.errors.APIError as exc:
            raise JobError(
                JobErrorKind.IMAGE_NOT_FOUND,
                clip_message(f"image {image_id!r}: {_explain(exc)}") or "",
            ) from None
        self._check_platform(info.get("Os"), info.get("Architecture"), described)
        stop_signal = (info.get("Config") or {}).get("StopSignal") or "SIGTERM"
        return _Image(info["Id"], stop_signal, described)

    def _check_platform(self, os_name: str | None, arch: str | None, what: str) -> None:
        if os_name and os_name != "linux":
            raise JobError(JobErrorKind.IMAGE_NOT_COMPATIBLE, f"{what} is for {os_name}, not linux")
        if arch and self._engine_arch and _normalize_arch(arch) != self._engine_arch:
            raise JobError(
                JobErrorKind.IMAGE_NOT_COMPATIBLE,
                f"{what} is built for {arch}; this host is {self._engine_arch}",
            )

    async def _artifact(self, ctx: RunContext, digest: str) -> _Artifact:
        """The images of an artifact tarball, loaded into the engine (once per digest:
        concurrent runs wait for one load)."""
        api = await self._client()
        async with self._exclusive(digest):
            known = self._loaded.get(digest)
            if known is None and self._image_dir is not None:
                known = await self._call(self._read_index, digest)
            if known is not None and await self._all_present(known):
                self._loaded[digest] = known
                self.artifact_hits += 1
                await ctx.stage("fetching", f"image artifact {digest[:19]}: loaded earlier")
                return known
            await ctx.stage("fetching", f"image artifact {digest}")
            data = verify(digest, await self._artifacts.fetch(digest))
            tarball, entries = await self._call(_untagged, data)
            del data
            for _, config in entries:
                self._check_platform(
                    config.get("os"), config.get("architecture"), f"artifact {digest[:19]}"
                )
            await ctx.stage("loading", f"{len(tarball)} bytes into the engine")
            await self._call(self._load, tarball)
            del tarball
            hex_ = digest.removeprefix("sha256:")
            artifact = _Artifact(images=[image_id for image_id, _ in entries])
            for n, (image_id, config) in enumerate(entries):
                try:
                    await self._call(api.tag, image_id, ARTIFACT_REPOSITORY, f"{hex_}-{n}")
                except docker.errors.NotFound:
                    raise JobError(
                        JobErrorKind.IMAGE_INVALID,
                        f"the engine did not keep image {image_id[:19]} of the tarball",
                    ) from None
                for tag in config.get("_repo_tags", []):
                    artifact.tags.setdefault(_normalize_ref(tag), image_id)
            self._loaded[digest] = artifact
            self.artifact_loads += 1
            if self._image_dir is not None:
                await self._call(self._write_index, digest, artifact)
            return artifact

    @contextlib.asynccontextmanager
    async def _exclusive(self, key: str) -> AsyncIterator[None]:
        lock, users = self._loading.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._loading[key]

    async def _all_present(self, artifact: _Artifact) -> bool:
        api = await self._client()
        for image_id in artifact.images:
            try:
                await self._call(api.inspect_image, image_id)
            except docker.errors.ImageNotFound:
                return False
        return True

    def _load(self, tarball: bytes) -> None:
        """`docker load` (worker thread); JobError(image_invalid) if the engine refuses."""
        assert self._api is not None
        try:
            for item in self._api.load_image(tarball):
                if isinstance(item, dict) and item.get("error"):
                    raise JobError(
                        JobErrorKind.IMAGE_INVALID,
                        clip_message(f"the engine could not load the image: {item['error']}") or "",
                    )
        except docker.errors.APIError as exc:
            raise JobError(
                JobErrorKind.IMAGE_INVALID,
                clip_message(f"the engine could not load the image: {_explain(exc)}") or "",
            ) from None

    def _index_path(self, digest: str) -> Path:
        assert self._image_dir is not None
        return self._image_dir / (digest.removeprefix("sha256:") + ".json")

    def _read_index(self, digest: str) -> _Artifact | None:
        try:
            return msgspec.json.decode(self._index_path(digest).read_bytes(), type=_Artifact)
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("image index of %s unreadable (%s); loading again", digest, exc)
            return None

    def _write_index(self, digest: str, artifact: _Artifact) -> None:
        path = self._index_path(digest)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(msgspec.json.encode(artifact))
            tmp.replace(path)
        except OSError as exc:
            log.warning("could not store the image index of %s: %s", digest, exc)

    # --- containers --------------------------------------------------------------------

    async def _create(
        self,
        ctx: RunContext,
        spec: DockerSpec,
        image: _Image,
        devices: list[DeviceConfig],
        limits_: dict[str, Any],
    ) -> str:
        api = await self._client()
        s = self.settings
        env = {**spec.env, **ctx.env}
        tmpfs = None
        if spec.read_only_rootfs:
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
            read_only=spec.read_only_rootfs,
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
            LABEL_START: codec.encode(ctx.start).decode(),
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
                user=spec.user,
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
                clip_message(f"the engine refused the container: {_explain(exc)}") or "",
            ) from None
        for warning in created.get("Warnings") or []:
            log.warning("run %s#%d: %s", ctx.run.job_id, ctx.run.attempt, warning)
        return created["Id"]

    async def _start_and_follow(self, ctx: RunContext, cid: str, stop_signal: str) -> Outcome:
        """Attach to the container, start it, copy its output until it ends."""
        api = await self._client()
        sock = await self._call(
            api.attach_socket, cid, params={"stdout": 1, "stderr": 1, "stream": 1, "logs": 0}
        )
        pipe = _socket_pipe(sock)
        self._pipes.add(pipe)
        # The reader waits for `go`: "running" is reported before the first output.
        go = threading.Event()
        future = self._in_stream_thread(self._copy_attached, ctx, cid, pipe, go)
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
                    message=clip_message(f"the container could not start: {_explain(exc)}"),
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
        future: asyncio.Future[_Ended],
        pipes: list[_Pipe],
        stop_signal: str,
    ) -> Outcome:
        """Wait for the container's end (its output is being copied by `future`); stop it
        if the run must stop. Returns how it ended."""
        stop = asyncio.ensure_future(ctx.stop_requested.wait())
        stopping: _Stopping | None = None
        try:
            await asyncio.wait({future, stop}, return_when=asyncio.FIRST_COMPLETED)
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
        return _outcome(ctx, state, stopping, ended.notes)

    async def _stop(
        self, ctx: RunContext, cid: str, ended: asyncio.Future[_Ended], stop_signal: str
    ) -> _Stopping:
        """Ask the container to stop, wait the grace period, then kill it."""
        api = await self._client()
        grace = ctx.grace_s
        if grace is None:  # no word from the StopJob: the spec's own grace
            grace = _docker_spec(ctx.start).stop_grace_s
        stopping = _Stopping(grace_s=grace)
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

    def _copy_attached(self, ctx: RunContext, cid: str, pipe: _Pipe, go: threading.Event) -> _Ended:
        """Once `go` is set, copy the attach stream to the run's output until the program's
        stdout and stderr close, then wait for the container to end (worker thread)."""
        go.wait()
        try:
            _demux(pipe.read, ctx.write)
        except (_Abandoned, RuntimeError, OSError):
            if pipe.abandoned:
                return _Ended(None)  # nobody waits for this run here (or it never started)
            raise
        finally:
            pipe.close()
        assert self._api is not None
        return _Ended(self._api.wait(cid, timeout=None)["StatusCode"])

    def _replay(self, ctx: RunContext, cid: str, pipes: list[_Pipe]) -> _Ended:
        """Send a re-adopted container's output from the engine's log, from the first byte:
        follow it while the container runs, then read what the follow missed (worker
        thread). Returns notes for the outcome's message (the log disagreed)."""
        try:
            return self._replay_log(ctx, cid, pipes)
        except (_Abandoned, RuntimeError):
            if any(p.abandoned for p in pipes):
                return _Ended(None)
            raise

    def _replay_log(self, ctx: RunContext, cid: str, pipes: list[_Pipe]) -> _Ended:
        assert self._api is not None
        api = self._api
        sent: dict[Stream, int] = {"stdout": 0, "stderr": 0}
        digests = {stream: hashlib.sha256() for stream in sent}

        def emit(stream: Stream, data: bytes) -> None:
            ctx.write(stream, data)
            digests[stream].update(data)
            sent[stream] += len(data)

        while True:
            running = api.inspect_container(cid)["State"].get("Running", False)
            self._read_log(cid, follow=running, skip=dict(sent), emit=emit, pipes=pipes)
            if not running or not api.inspect_container(cid)["State"].get("Running", False):
                break
            time.sleep(0.1)  # the follow ended early while the container runs: again
        exit_code = api.wait(cid, timeout=None)["StatusCode"]
        # The engine's follow can end a little before the end of the log: read it whole
        # once more, check it starts with what was sent, and send the rest.
        before = dict(sent)
        sent_digests = {stream: digests[stream].digest() for stream in sent}
        check = {stream: hashlib.sha256() for stream in sent}
        seen: dict[Stream, int] = {"stdout": 0, "stderr": 0}

        def finish(stream: Stream, data: bytes) -> None:
            old = min(len(data), max(0, before[stream] - seen[stream]))  # already sent
            check[stream].update(data[:old])
            seen[stream] += len(data)
            if old < len(data):
                emit(stream, data[old:])

        self._read_log(cid, follow=False, skip={}, emit=finish, pipes=pipes)
        notes = []
        for stream in before:
            if seen[stream] < before[stream] or check[stream].digest() != sent_digests[stream]:
                log.error(
                    "run %s#%d: the engine's log of %s no longer matches what was sent "
                    "(rotated?); the replayed output may be wrong",
                    ctx.run.job_id,
                    ctx.run.attempt,
                    stream,
                )
                notes.append(f"the engine's log of {stream} changed while it was replayed")
        return _Ended(exit_code, notes)

    def _read_log(
        self,
        cid: str,
        *,
        follow: bool,
        skip: dict[Stream, int],
        emit: Callable[[Stream, bytes], None],
        pipes: list[_Pipe],
    ) -> None:
        """Read a container's log (both streams) from the start, dropping the first
        `skip[stream]` bytes of each (worker thread)."""
        assert self._api is not None
        api = self._api
        url = f"{api.base_url}/v{api.api_version}/containers/{cid}/logs"
        response = api.get(
            url,
            params={"stdout": 1, "stderr": 1, "follow": int(follow)},
            stream=True,
            timeout=None,
        )
        try:
            response.raise_for_status()
        except requests.HTTPError as exc:
            raise docker.errors.create_api_error_from_http_exception(exc) from None
        chunks = response.iter_content(READ_SIZE)
        pipe = _Pipe(lambda _n: next(chunks, b""), response.close)
        pipes.append(pipe)
        self._pipes.add(pipe)
        todo = dict(skip)

        def write(stream: Stream, data: bytes) -> None:
            drop = min(todo.get(stream, 0), len(data))
            if drop:
                todo[stream] -= drop
                data = data[drop:]
            if data:
                emit(stream, data)

        try:
            _demux(pipe.read, write)
        except (OSError, requests.RequestException):
            if pipe.abandoned:
                raise _Abandoned from None
            raise
        finally:
            self._pipes.discard(pipe)
            response.close()


# --- helpers ---------------------------------------------------------------------------


def _docker_spec(start: StartJob) -> DockerSpec:
    spec = start.backend
    if not isinstance(spec, DockerSpec):
        raise JobError(
            JobErrorKind.IMAGE_NOT_COMPATIBLE, f"the docker backend got a {spec.kind} job"
        )
    return spec


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


def _explain(exc: docker.errors.APIError) -> str:
    explanation = exc.explanation
    if isinstance(explanation, bytes):
        explanation = explanation.decode(errors="replace")
    return str(explanation or exc)


def _normalize_ref(ref: str) -> str:
    """`busybox` -> `busybox:latest`; `docker.io/library/x:1` -> `x:1`."""
    ref = ref.removeprefix("docker.io/").removeprefix("library/")
    last = ref.rpartition("/")[2]
    if "@" not in last and ":" not in last:
        ref += ":latest"
    return ref


def _normalize_arch(arch: str) -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(arch, arch)


def _untagged(data: bytes) -> tuple[bytes, list[tuple[str, dict[str, Any]]]]:
    """A `docker save` tarball without its tags (worker thread), and per image its engine id
    and config (with the removed tags under `_repo_tags`). JobError(image_invalid) if it
    isn't one."""
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
        members = archive.getmembers()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise JobError(JobErrorKind.IMAGE_INVALID, f"not an image tarball: {exc}") from None
    by_name = {_member_name(m.name): m for m in members}

    def read(name: str) -> bytes:
        member = by_name.get(_member_name(name))
        extracted = archive.extractfile(member) if member is not None else None
        if extracted is None:
            raise JobError(JobErrorKind.IMAGE_INVALID, f"the image tarball lacks {name}")
        return extracted.read()

    try:
        manifest = json.loads(read("manifest.json"))
        if not isinstance(manifest, list) or not manifest:
            raise ValueError("manifest.json lists no images")
        entries: list[tuple[str, dict[str, Any]]] = []
        for item in manifest:
            config_bytes = read(item["Config"])
            config = json.loads(config_bytes)
            if not isinstance(config, dict):
                raise ValueError(f"{item['Config']} is not an image config")
            config["_repo_tags"] = [str(t) for t in item.get("RepoTags") or []]
            item["RepoTags"] = None
            entries.append(("sha256:" + hashlib.sha256(config_bytes).hexdigest(), config))
        index = json.loads(read("index.json")) if "index.json" in by_name else None
    except JobError:
        raise
    except (ValueError, KeyError, TypeError, tarfile.TarError, OSError) as exc:
        raise JobError(
            JobErrorKind.IMAGE_INVALID, clip_message(f"not a usable image tarball: {exc}") or ""
        ) from None
    if isinstance(index, dict):  # OCI layout: names live in annotations
        for descriptor in index.get("manifests") or []:
            annotations = descriptor.get("annotations") if isinstance(descriptor, dict) else None
            if isinstance(annotations, dict):
                annotations.pop("io.containerd.image.name", None)
                annotations.pop("org.opencontainers.image.ref.name", None)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as rewritten:
        for member in members:
            name = _member_name(member.name)
            if name == "repositories":
                continue
            if name in ("manifest.json", "index.json") and member.isfile():
                body = json.dumps(manifest if name == "manifest.json" else index).encode()
                replaced = tarfile.TarInfo(member.name)
                replaced.size = len(body)
                replaced.mode = member.mode
                replaced.mtime = member.mtime
                rewritten.addfile(replaced, io.BytesIO(body))
                continue
            rewritten.addfile(member, archive.extractfile(member) if member.isfile() else None)
    return out.getvalue(), entries


def _member_name(name: str) -> str:
    return name.removeprefix("./").rstrip("/")


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


def _socket_pipe(sock: Any) -> _Pipe:
    """A _Pipe over an attach socket (a SocketIO, or a socket), blocking reads."""
    raw = getattr(sock, "_sock", sock)
    with contextlib.suppress(AttributeError, OSError):
        raw.settimeout(None)  # the client's request timeout must not end a quiet program
    read = sock.read if hasattr(sock, "read") else raw.recv

    def close() -> None:
        with contextlib.suppress(OSError):
            raw.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()

    return _Pipe(read, close)


def _demux(read: Callable[[int], bytes], write: Callable[[Stream, bytes], None]) -> None:
    """Split Docker's multiplexed stream (8-byte header: stream, 0, 0, 0, big-endian length)
    into stdout and stderr writes until EOF. Payloads are passed on as they arrive, not a
    frame at a time; consecutive bytes of one stream in one read are written together."""
    header = bytearray()
    stream: Stream | None = None
    left = 0  # payload bytes of the current frame still to come
    while True:
        data = read(READ_SIZE)
        if not data:
            return
        view = memoryview(data)
        pos = 0
        pending: dict[Stream, list[bytes]] = {}
        while pos < len(view):
            if left == 0:
                need = _FRAME_HEADER.size - len(header)
                header += view[pos : pos + need]
                pos += min(need, len(view) - pos)
                if len(header) < _FRAME_HEADER.size:
                    break
                kind, left = _FRAME_HEADER.unpack(header)
                header.clear()
                stream = _FRAME_STREAMS.get(kind)
                continue
            take = min(left, len(view) - pos)
            if stream is not None:
                pending.setdefault(stream, []).append(view[pos : pos + take].tobytes())
            pos += take
            left -= take
        for out, parts in pending.items():
            write(out, b"".join(parts))


def _outcome(
    ctx: RunContext, state: dict[str, Any], stopping: _Stopping | None, notes: list[str]
) -> Outcome:
    """How a container ended, from its state and what the supervisor did to it."""
    code = state.get("ExitCode")
    spec = _docker_spec(ctx.start)
    if stopping is not None:
        reason = "timeout" if ctx.stop_reason == "timeout" else "canceled"
        why = "run timeout" if reason == "timeout" else f"stopped ({ctx.stop_reason})"
        sig = None
        for name in reversed(stopping.signals):
            number = _signal_number(name)
            if number is not None and code == 128 + number:
                sig = number
                break
        if not stopping.signals:
            text = f"{why}: the program had already ended (exit code {code})"
        elif stopping.signals[-1] == "SIGKILL" and len(stopping.signals) > 1:
            text = (
                f"{why}: still running {stopping.grace_s:g} s after {stopping.signals[0]}; "
                "killed with SIGKILL"
            )
        elif stopping.signals[-1] == "SIGKILL":
            text = f"{why}: killed with SIGKILL"
        else:
            text = (
                f"{why}: the program ended {stopping.took_s:.2f} s after "
                f"{stopping.signals[-1]} (exit code {code})"
            )
        return Outcome(exit_code=code, signal=sig, reason=reason, message=_with(text, notes))
    if state.get("OOMKilled") and code != 0:
        limit = f" of {spec.memory_mb} MB" if spec.memory_mb else ""
        return Outcome(
            exit_code=code,
            signal=int(signal.SIGKILL) if code == 128 + signal.SIGKILL else None,
            reason="oom",
            message=_with(
                f"out of memory: the kernel killed the program at the memory limit{limit}",
                notes,
            ),
        )
    return Outcome(exit_code=code, message=_with(None, notes))


def _with(text: str | None, notes: list[str]) -> str | None:
    if not notes:
        return text
    return clip_message("; ".join([t for t in (text, *notes) if t]))


def _signal_number(name: str) -> int | None:
    """SIGTERM, TERM or 15 -> 15."""
    if name.isdigit():
        return int(name)
    try:
        return int(signal.Signals[name if name.startswith("SIG") else f"SIG{name}"])
    except KeyError:
        return None


async def _report_running(ctx: RunContext) -> None:
    """Report "running", unless a stop came first (the run is "terminating" then, and
    "running" may not follow that)."""
    if not ctx.stop_requested.is_set():
        await ctx.running()


def _stopped_early(ctx: RunContext) -> Outcome:
    reason = "timeout" if ctx.stop_reason == "timeout" else "canceled"
    return Outcome(
        exit_code=None, reason=reason, message=f"stopped ({ctx.stop_reason}) before it started"
    )


async def _unless_stopped(ctx: RunContext, coro: Coroutine[Any, Any, T]) -> T | None:
    """Await `coro` unless a stop comes first (then cancel it and return None)."""
    task = asyncio.ensure_future(coro)
    stop = asyncio.ensure_future(ctx.stop_requested.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not task.done():
            task.cancel()  # a load in a worker thread finishes anyway (and is remembered)
    return task.result() if task.done() else None
