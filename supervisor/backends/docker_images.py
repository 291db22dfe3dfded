"""Docker images for the docker backend: which image a spec names, and artifact tarballs.

Why a module of its own: loading an artifact is a small pipeline (download to disk and
verify, unpack under a size cap, strip the tarball's tags, stream it to `docker load`, tag
as `switchboard-artifact:<digest hex>-<n>`, remember the digest) with its own state (what
is loaded, who is loading it, the on-disk index that lets a restarted supervisor skip the
load), none of which the container lifecycle needs to see. Stripping the tags is what keeps
an artifact from replacing an image the host has under some name; the size cap and the
streaming (image_tarball) are what keep an artifact from filling the supervisor's memory.
docker.py's docstring says what users get.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import msgspec

from protocol.exceptions import JobError, JobErrorKind
from protocol.limits import clip_message
from protocol.spec import DockerBackend as DockerSpec
from supervisor import metrics
from supervisor.artifacts import ArtifactSource, ArtifactTooBig
from supervisor.backends.base import RunContext
from supervisor.backends.docker_client import EngineClient, explain, normalize_arch
from supervisor.backends.image_tarball import Tarball, UnpackedTooBig, unpack
from supervisor.backends.keylocks import KeyLocks

log = logging.getLogger(__name__)

#: Repository under which images loaded from artifacts are tagged.
ARTIFACT_REPOSITORY = "switchboard-artifact"
#: Under the image dir: one directory per artifact being loaded.
_INCOMING = "incoming"


@dataclass(frozen=True)
class Image:
    """An image ready to run: its engine id, the signal that asks it to stop, and the user
    it runs as ("" for root)."""

    id: str
    stop_signal: str
    description: str
    user: str = ""


class Artifact(msgspec.Struct):
    """The images one artifact tarball holds once loaded: engine ids in tarball order, and
    the tarball's own tags (normalized) -> image id."""

    images: list[str]
    tags: dict[str, str] = {}


class ImageStore:
    """Finds the image a spec names on the engine, loading image artifacts once per digest.

    Engine access is the backend's EngineClient, shared with the container lifecycle.
    """

    def __init__(
        self,
        artifacts: ArtifactSource,
        image_dir: Path | None,
        *,
        max_unpacked_bytes: int,
        engine: EngineClient,
    ) -> None:
        self._artifacts = artifacts
        self._image_dir = image_dir
        self._max_unpacked = max_unpacked_bytes
        self._engine = engine
        self._loaded: dict[str, Artifact] = {}
        self._loading = KeyLocks()  # one compile/load per key at a time
        #: Images loaded from artifacts, and runs that found their artifact already loaded.
        self.artifact_loads = 0
        self.artifact_hits = 0

    async def resolve(self, ctx: RunContext, spec: DockerSpec) -> Image:
        api = await self._engine.client()
        if spec.image_artifact is not None:
            artifact = await self._artifact(ctx, spec.image_artifact)
            if spec.image is not None:
                image_id = artifact.tags.get(normalize_ref(spec.image))
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
            info = await self._engine.call(api.inspect_image, image_id)
        except docker.errors.ImageNotFound:
            raise JobError(
                JobErrorKind.IMAGE_NOT_FOUND,
                f"{described} is not on this host's Docker engine (supervisors don't pull: "
                "load it on the host, or submit it as an image artifact)",
            ) from None
        except docker.errors.APIError as exc:
            raise JobError(
                JobErrorKind.IMAGE_NOT_FOUND,
                clip_message(f"image {image_id!r}: {explain(exc)}") or "",
            ) from None
        self._check_platform(info.get("Os"), info.get("Architecture"), described)
        config = info.get("Config") or {}
        stop_signal = config.get("StopSignal") or "SIGTERM"
        return Image(info["Id"], stop_signal, described, config.get("User") or "")

    def _check_platform(self, os_name: str | None, arch: str | None, what: str) -> None:
        if os_name and os_name != "linux":
            raise JobError(JobErrorKind.IMAGE_NOT_COMPATIBLE, f"{what} is for {os_name}, not linux")
        engine_arch = self._engine.arch
        if arch and engine_arch and normalize_arch(arch) != engine_arch:
            raise JobError(
                JobErrorKind.IMAGE_NOT_COMPATIBLE,
                f"{what} is built for {arch}; this host is {engine_arch}",
            )

    async def _artifact(self, ctx: RunContext, digest: str) -> Artifact:
        """The images of an artifact tarball, loaded into the engine (once per digest:
        concurrent runs wait for one load)."""
        api = await self._engine.client()
        async with self._loading.hold(digest):
            known = self._loaded.get(digest)
            if known is None and self._image_dir is not None:
                known = await self._engine.call(self._read_index, digest)
            if known is not None and await self._all_present(known):
                self._loaded[digest] = known
                self.artifact_hits += 1
                metrics.cache_lookup("docker_image", hit=True)
                await ctx.stage("fetching", f"image artifact {digest[:19]}: loaded earlier")
                return known
            metrics.cache_lookup("docker_image", hit=False)
            async with self._incoming() as incoming:
                await ctx.stage("fetching", f"image artifact {digest}")
                try:
                    await self._artifacts.download(
                        digest, incoming / "artifact", self._max_unpacked
                    )
                    tarball = await self._engine.call(self._open, incoming)
                except (ArtifactTooBig, UnpackedTooBig) as exc:
                    metrics.limit_exceeded("image_unpacked")
                    log.warning("run %s#%d: %s", ctx.run.job_id, ctx.run.attempt, exc)
                    raise
                entries = tarball.images
                for _, config in entries:
                    self._check_platform(
                        config.get("os"), config.get("architecture"), f"artifact {digest[:19]}"
                    )
                size = await self._engine.call(lambda: tarball.path.stat().st_size)
                await ctx.stage("loading", f"{size} bytes into the engine")
                await self._engine.call(self._load, tarball)
            hex_ = digest.removeprefix("sha256:")
            artifact = Artifact(images=[image_id for image_id, _ in entries])
            for n, (image_id, config) in enumerate(entries):
                try:
                    await self._engine.call(api.tag, image_id, ARTIFACT_REPOSITORY, f"{hex_}-{n}")
                except docker.errors.NotFound:
                    raise JobError(
                        JobErrorKind.IMAGE_INVALID,
                        f"the engine did not keep image {image_id[:19]} of the tarball",
                    ) from None
                for tag in config.get("_repo_tags", []):
                    artifact.tags.setdefault(normalize_ref(tag), image_id)
            self._loaded[digest] = artifact
            self.artifact_loads += 1
            if self._image_dir is not None:
                await self._engine.call(self._write_index, digest, artifact)
            return artifact

    async def _all_present(self, artifact: Artifact) -> bool:
        api = await self._engine.client()
        for image_id in artifact.images:
            try:
                await self._engine.call(api.inspect_image, image_id)
            except docker.errors.ImageNotFound:
                return False
        return True

    def _open(self, incoming: Path) -> Tarball:
        """The downloaded artifact, unpacked under the cap and indexed (worker thread)."""
        path = unpack(incoming / "artifact", incoming / "unpacked.tar", self._max_unpacked)
        return Tarball(path)

    @contextlib.asynccontextmanager
    async def _incoming(self) -> AsyncIterator[Path]:
        """A directory of its own for one artifact's files while it is loaded, removed
        afterwards: under the work dir (`incoming/<pid>-<random>`), else the system's."""
        if self._image_dir is None:
            directory = Path(await self._engine.call(tempfile.mkdtemp, prefix="sb-image-"))
        else:
            name = f"{os.getpid()}-{secrets.token_hex(8)}"
            directory = self._image_dir / _INCOMING / name
            await self._engine.call(directory.mkdir, parents=True)
        try:
            yield directory
        finally:
            await self._engine.call(shutil.rmtree, directory, True)

    async def clear_incoming(self) -> None:
        """Remove what processes that died mid-load left (another process sharing the
        work dir may be loading now: its files stay)."""
        if self._image_dir is not None:
            await self._engine.call(_remove_orphans, self._image_dir / _INCOMING)

    def _load(self, tarball: Tarball) -> None:
        """`docker load` (worker thread), streaming the tarball without its tags;
        JobError(image_invalid) if the engine refuses."""
        try:
            for item in self._engine.connected().load_image(tarball.stream()):
                if isinstance(item, dict) and item.get("error"):
                    raise JobError(
                        JobErrorKind.IMAGE_INVALID,
                        clip_message(f"the engine could not load the image: {item['error']}") or "",
                    )
        except docker.errors.APIError as exc:
            raise JobError(
                JobErrorKind.IMAGE_INVALID,
                clip_message(f"the engine could not load the image: {explain(exc)}") or "",
            ) from None

    def _index_path(self, digest: str) -> Path:
        assert self._image_dir is not None
        return self._image_dir / (digest.removeprefix("sha256:") + ".json")

    def _read_index(self, digest: str) -> Artifact | None:
        try:
            return msgspec.json.decode(self._index_path(digest).read_bytes(), type=Artifact)
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("image index of %s unreadable (%s); loading again", digest, exc)
            return None

    def _write_index(self, digest: str, artifact: Artifact) -> None:
        path = self._index_path(digest)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(msgspec.json.encode(artifact))
            tmp.replace(path)
        except OSError as exc:
            log.warning("could not store the image index of %s: %s", digest, exc)


def _remove_orphans(incoming: Path) -> None:
    try:
        entries = list(incoming.iterdir())
    except OSError:
        return
    for entry in entries:
        pid = entry.name.partition("-")[0]
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def normalize_ref(ref: str) -> str:
    """`busybox` -> `busybox:latest`; `docker.io/library/x:1` -> `x:1`."""
    ref = ref.removeprefix("docker.io/").removeprefix("library/")
    last = ref.rpartition("/")[2]
    if "@" not in last and ":" not in last:
        ref += ":latest"
    return ref
