"""What a docker run's container may have, and what it is created with.

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
the run's inputs as a read-only bind mount at /in (supervisor.inputs placed them), for a
run that keeps files its output directory as a writable bind mount at /out
(supervisor.outputs made it, mode 0777 for whatever user the container runs as), and
nothing else of the host. Docker's init as PID 1 (config `init`), so signals reach the
program and zombies are reaped.

Why a module of its own: these are the host's rules for a container, pure functions of the
spec, the config and the image (refusals are JobErrors), with no engine call; the backend
(docker.py) applies them when it admits a run and creates its container. The labels are
here too: they are written at creation, and recovery reads them back.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker.types
import msgspec

from protocol import codec
from protocol.exceptions import JobError, JobErrorKind
from protocol.messages import RunRef, StartJob
from protocol.spec import DockerBackend as DockerSpec
from supervisor.backends.docker_images import Image
from supervisor.config import DeviceConfig, DockerConfig, is_non_root

LABEL_SUPERVISOR = "switchboard.supervisor"
LABEL_JOB = "switchboard.job"
LABEL_ATTEMPT = "switchboard.attempt"
LABEL_START = "switchboard.start"
LABEL_DEVICES = "switchboard.devices"
#: The writable tmpfs of containers with a read-only root filesystem.
SCRATCH = "/scratch"
#: Where a run's inputs appear in its container (a read-only bind mount).
INPUTS = "/in"
#: Where a run's output directory appears in its container (a writable bind mount, mode
#: 0777 on the host so that any container user may write there).
OUTPUTS = "/out"

_MB = 1024 * 1024
_NON_ROOT_ONLY = "this supervisor runs containers only as a numeric uid other than 0"


def docker_spec(start: StartJob) -> DockerSpec:
    spec = start.backend
    if not isinstance(spec, DockerSpec):
        raise JobError(
            JobErrorKind.IMAGE_NOT_COMPATIBLE, f"the docker backend got a {spec.kind} job"
        )
    return spec


def limits_for(spec: DockerSpec, s: DockerConfig, engine_cpus: int | None) -> dict[str, Any]:
    """Host-config settings for `spec` under this host's rules (`engine_cpus`: the engine's
    CPU count, if known); JobError if it asks for something the config doesn't allow."""
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
        raise JobError(JobErrorKind.IMAGE_NOT_COMPATIBLE, "the job asks for " + "; ".join(refused))
    memory_mb = spec.memory_mb or s.default_memory_mb
    cpus = spec.cpus
    if cpus is None and s.default_cpus:
        # The engine refuses more CPUs than it has: a default must fit any host.
        cpus = min(s.default_cpus, engine_cpus or s.default_cpus)
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


def user_for(spec: DockerSpec, image: Image, s: DockerConfig) -> str | None:
    """Who the container runs as (None: the image's user); JobError if the config wants
    no root and that would be root, or can't be told from root."""
    user = spec.user or s.user
    runs_as = user or image.user or "root"  # an image without USER runs as root
    if s.run_as_non_root and not is_non_root(runs_as):
        whose = "user" if user else "the image's user"
        raise JobError(
            JobErrorKind.IMAGE_NOT_COMPATIBLE,
            f"{image.description} would run as {whose} {runs_as!r}: {_NON_ROOT_ONLY} "
            '(set `user`, e.g. "1000:1000")',
        )
    return user


@dataclass(frozen=True)
class ContainerOptions:
    """What create_container is given besides the image, command, user and labels."""

    env: dict[str, str]
    #: Keyword arguments of the SDK's create_host_config.
    host_config: dict[str, Any]


def container_options(
    spec: DockerSpec,
    s: DockerConfig,
    job_env: dict[str, str],
    devices: list[DeviceConfig],
    device_gids: list[int],
    limits: dict[str, Any],
    inputs: Path | None = None,
    outputs: Path | None = None,
    ptys: Mapping[str, str] | None = None,
) -> ContainerOptions:
    """The container's environment and host config: `job_env` is the job's parameters,
    `device_gids` the groups owning the `devices` (device_groups), `limits` limits_for's,
    `inputs` the run's input directory on the host (bind-mounted read-only at INPUTS),
    `outputs` its output directory (bind-mounted writable at OUTPUTS), `ptys` the devices
    that are pseudo-terminals, by name, with their resolved paths (pseudo_terminals): those
    are bind-mounted rather than created in the container (a pty opens only through the
    devpts it lives in)."""
    ptys = ptys or {}
    env = {**spec.env, **job_env}
    tmpfs = None
    read_only = spec.read_only_rootfs or s.read_only_rootfs
    if read_only:
        tmpfs = {SCRATCH: f"rw,exec,nosuid,nodev,mode=1777,size={s.scratch_mb}m"}
        env.setdefault("TMPDIR", SCRATCH)
    group_add: list[str] = []
    pty_mounts = [(ptys[d.name], d.target) for d in devices if d.name in ptys]
    if devices:
        env.update(device_env(devices))
        group_add = [str(g) for g in device_gids if g != 0]
    log_max = max(1, s.log_max_mb)
    host_config: dict[str, Any] = dict(
        privileged=False,
        cap_drop=["ALL"],
        cap_add=list(spec.cap_add) or None,
        security_opt=["no-new-privileges"],
        read_only=read_only,
        tmpfs=tmpfs,
        devices=[f"{d.path}:{d.target}:{d.permissions}" for d in devices if d.name not in ptys]
        or None,
        group_add=group_add or None,
        mounts=_mounts(inputs, outputs, pty_mounts),
        init=s.init,
        log_config=docker.types.LogConfig(
            type="local",
            config={"max-size": f"{log_max}m", "max-file": "2", "compress": "false"},
        ),
        **limits,
    )
    return ContainerOptions(env=env, host_config=host_config)


def _mounts(
    inputs: Path | None, outputs: Path | None, ptys: list[tuple[str, str]]
) -> list[docker.types.Mount] | None:
    """The run's input directory, read-only at INPUTS, its output directory, writable at
    OUTPUTS (the engine wants absolute paths), and its pseudo-terminals, each (host path,
    container path)."""
    mounts = [docker.types.Mount(target, source, type="bind") for source, target in ptys]
    if inputs is not None:
        mounts.append(
            docker.types.Mount(INPUTS, str(inputs.resolve()), type="bind", read_only=True)
        )
    if outputs is not None:
        mounts.append(
            docker.types.Mount(OUTPUTS, str(outputs.resolve()), type="bind", read_only=False)
        )
    return mounts or None


def labels_for(
    supervisor_id: str, run: RunRef, start: StartJob, devices: list[DeviceConfig]
) -> dict[str, str]:
    """The labels a container carries: what recovery needs to re-adopt it after a restart."""
    return {
        LABEL_SUPERVISOR: supervisor_id,
        LABEL_JOB: run.job_id,
        LABEL_ATTEMPT: str(run.attempt),
        LABEL_START: codec.encode(_without_secrets(start)).decode(),
        LABEL_DEVICES: ",".join(d.name for d in devices),
    }


def _without_secrets(start: StartJob) -> StartJob:
    """The StartJob as a label may hold it: anyone who may use the engine reads labels, and
    a re-adopted container already has its environment, so secret parameters are left out."""
    kept = {name: p for name, p in start.parameters.items() if not p.secret}
    return msgspec.structs.replace(start, parameters=kept)


def container_name(supervisor_id: str, run: RunRef) -> str:
    """`sb-<supervisor>-<job>.<attempt>-<hash>`: readable, and unique although ids may
    contain the separators (the labels, not the name, are what the backend relies on)."""
    key = f"{supervisor_id}\0{run.job_id}\0{run.attempt}".encode()
    return f"sb-{supervisor_id}-{run.job_id}.{run.attempt}-{hashlib.sha256(key).hexdigest()[:8]}"


def device_env(devices: list[DeviceConfig]) -> dict[str, str]:
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


#: The character-device majors of pseudo-terminal slaves (Linux: UNIX98_PTY_SLAVE_MAJOR and
#: the seven after it).
PTY_SLAVE_MAJORS = range(136, 144)


def pseudo_terminals(devices: Iterable[DeviceConfig]) -> dict[str, str]:
    """The devices whose node is a pseudo-terminal slave (a serial line bridged from the
    network by socat or ser2net, a simulated board), by name, with the path their symlinks
    lead to. The engine makes a device node in the container for the others; a pty opened
    through such a node fails (EIO: the kernel finds a pty through the devpts instance its
    node is in), so these are bind-mounted instead; Docker's default device rules let a
    container use ptys. Blocks on os.stat: call it from a worker thread."""
    found: dict[str, str] = {}
    for device in devices:
        real = os.path.realpath(device.path)
        try:
            st = os.stat(real)
        except OSError:
            continue  # the engine will say what's wrong
        if stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) in PTY_SLAVE_MAJORS:
            found[device.name] = real
    return found


def device_groups(devices: Iterable[DeviceConfig]) -> list[int]:
    """Groups owning the device nodes, so a job running as a non-root user can use them
    (blocks on os.stat: call it from a worker thread)."""
    gids: list[int] = []
    for device in devices:
        try:
            gid = os.stat(device.path).st_gid
        except OSError:
            continue  # the engine will say what's wrong
        if gid not in gids:
            gids.append(gid)
    return gids
