"""The supervisor's own configuration file (TOML): what this host offers and allows.

A lab admin writes it once per host; `supervisor run --config FILE` reads it. Every table
forbids unknown keys, so a typo is an error that names the key, not a silently ignored
setting. Example (docs/docker.md explains every key)::

    [docker]
    allowed_networks = ["none", "bridge"]
    allowed_capabilities = ["NET_RAW"]
    default_memory_mb = 2048
    max_memory_mb = 8192

    [[devices]]
    name = "nrf52840dk-0"
    path = "/dev/ttyACM0"
    resource = "nrf52840dk"
    labels = { serial = "000683012345" }

Nothing here does I/O except :func:`load_config`; checks that need the host (does the device
node exist?) happen when a device is allocated, because boards get unplugged.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import msgspec
from msgspec import Meta

from protocol.spec import Id, Labels

#: Linux capabilities a job may ask for, if the host allows them (Docker's names, no CAP_).
CAPABILITIES = frozenset(
    """AUDIT_CONTROL AUDIT_READ AUDIT_WRITE BLOCK_SUSPEND BPF CHECKPOINT_RESTORE CHOWN
    DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID IPC_LOCK IPC_OWNER KILL LEASE
    LINUX_IMMUTABLE MAC_ADMIN MAC_OVERRIDE MKNOD NET_ADMIN NET_BIND_SERVICE NET_BROADCAST
    NET_RAW PERFMON SETFCAP SETGID SETPCAP SETUID SYSLOG SYS_ADMIN SYS_BOOT SYS_CHROOT
    SYS_MODULE SYS_NICE SYS_PACCT SYS_PTRACE SYS_RAWIO SYS_RESOURCE SYS_TIME
    SYS_TTY_CONFIG WAKE_ALARM""".split()
)

#: How many resource classes a Hello may advertise (protocol.spec.ResourceCounts).
MAX_RESOURCE_CLASSES = 64

T = TypeVar("T", int, float)

Network = Literal["none", "bridge", "host"]
AbsPath = Annotated[str, Meta(pattern=r"^/", max_length=4096)]


class ConfigError(ValueError):
    """The configuration file is unreadable or wrong; the message names the file and key."""


class _Table(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Base of the config tables."""


class ConsoleConfig(_Table, frozen=True):  # type: ignore[misc]  # msgspec allows this
    """A device's serial console."""

    #: The tty on the host, e.g. /dev/serial/by-id/usb-SEGGER_J-Link_000683012345-if00.
    path: AbsPath
    baud: Annotated[int, Meta(ge=50, le=16_000_000)] = 115200


#: A command line, one argument per item (no shell), with the device's fields substituted.
CommandLine = Annotated[
    list[Annotated[str, Meta(max_length=4096)]], Meta(min_length=1, max_length=256)
]


class PowerConfig(_Table, frozen=True):  # type: ignore[misc]  # msgspec allows this
    """Command lines run on the host to switch a device's power (docs/lab.md): each item
    may name the device's fields, `{id}`, `{class}`, `{path}`, `{console}` and
    `{labels[KEY]}`. Exit status 0 is success; `status` prints `on` or `off`."""

    on: CommandLine | None = None
    off: CommandLine | None = None
    cycle: CommandLine | None = None
    status: CommandLine | None = None


class DeviceConfig(_Table, frozen=True):  # type: ignore[misc]  # msgspec allows this
    """One host device that jobs can be given, exclusively, as a unit of `resource`."""

    #: Unique name (shown to jobs and in logs), e.g. "nrf52840dk-0"; the device's id in
    #: the switchboard's inventory, unique in the lab.
    name: Id
    #: The device node (or directory of nodes, e.g. /dev/bus/usb/001) on the host. A udev
    #: symlink such as /dev/serial/by-id/... is fine: the engine resolves it.
    path: AbsPath
    #: Its class: the resource it counts towards (what jobs ask for in `resources`).
    resource: Id
    #: Where the job sees it; default: the same path as on the host.
    container_path: AbsPath | None = None
    #: cgroup permissions inside the container: r(ead), w(rite), m(knod).
    permissions: Annotated[str, Meta(pattern=r"^(?=.)r?w?m?$")] = "rwm"
    #: Free-form facts about the device (serial number, probe id...), passed to the job.
    labels: Labels = {}
    #: Its serial console, if it has one.
    console: ConsoleConfig | None = None
    #: How to switch its power, if the host can.
    power: PowerConfig | None = None

    def __post_init__(self) -> None:
        if self.power is not None:
            for action in POWER_ACTIONS:
                argv = getattr(self.power, action)
                if argv is not None:
                    try:
                        self.command(argv)
                    except (KeyError, IndexError, ValueError) as exc:
                        raise ValueError(
                            f"power.{action} of {self.name!r} names an unknown field {exc}"
                            " (fields: {id}, {class}, {path}, {console}, {labels[KEY]})"
                        ) from None

    @property
    def target(self) -> str:
        return self.container_path or self.path

    def command(self, argv: list[str]) -> list[str]:
        """A power command line with this device's fields substituted."""
        fields = {
            "id": self.name,
            "class": self.resource,
            "path": self.path,
            "console": self.console.path if self.console is not None else "",
            "labels": self.labels,
        }
        return [arg.format_map(fields) for arg in argv]


#: What a device's power commands may do.
POWER_ACTIONS = ("on", "off", "cycle", "status")


#: Limits of containers whose spec sets none, unless the config says otherwise (or has a
#: lower maximum, which then is the default).
DEFAULT_MEMORY_MB = 2048
DEFAULT_CPUS = 2.0

#: A container user: "uid", "uid:gid" or names the image knows.
User = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?$", max_length=64)]


class DockerConfig(_Table):
    """What the Docker backend allows and what it uses when a spec says nothing."""

    #: Networks a spec may ask for; "none" is always allowed (and is the default).
    allowed_networks: list[Network] = msgspec.field(default_factory=lambda: ["none"])
    #: Capabilities a spec may add back with `cap_add` (containers start with none).
    allowed_capabilities: list[str] = []
    #: Limits for specs that set none; 0 means no limit (memory, CPUs). A CPU default above
    #: the engine's CPU count is lowered to it.
    default_memory_mb: Annotated[int, Meta(ge=0)] = DEFAULT_MEMORY_MB
    default_cpus: Annotated[float, Meta(ge=0)] = DEFAULT_CPUS
    default_pids_limit: Annotated[int, Meta(ge=1)] = 4096
    #: The most a spec may ask for; a spec asking for more is refused (None: no maximum).
    max_memory_mb: Annotated[int, Meta(ge=4)] | None = None
    max_cpus: Annotated[float, Meta(gt=0)] | None = None
    max_pids_limit: Annotated[int, Meta(ge=1)] | None = None
    #: The user of containers whose spec names none (None: the image's).
    user: User | None = None
    #: Refuse to run a container as root: its user (the spec's, else `user`, else the
    #: image's) must be a numeric uid other than 0 (a name can't be checked before it runs).
    run_as_non_root: bool = False
    #: Give every container a read-only root filesystem and the /scratch tmpfs, whatever
    #: its spec says (a spec can always ask for them with `read_only_rootfs`).
    read_only_rootfs: bool = False
    #: Size of the /scratch tmpfs of containers with a read-only root filesystem.
    scratch_mb: Annotated[int, Meta(ge=1, le=1024 * 1024)] = 1024
    #: Run Docker's init (tini) as PID 1: it forwards signals and reaps zombies.
    init: bool = True
    #: Most console output the engine keeps per container (per stream), for replaying a
    #: run's output after a supervisor restart. Beyond it the oldest output is dropped.
    log_max_mb: Annotated[int, Meta(ge=1, le=1024 * 1024)] = 1024
    #: Largest image artifact, unpacked (a compressed tarball is refused as soon as it
    #: unpacks to more): bounds the disk a load uses under the work dir.
    max_image_unpacked_mb: Annotated[int, Meta(ge=1, le=1024 * 1024)] = 8192
    #: Seconds an engine request may take (waiting for a container's end has no limit).
    engine_timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 120.0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.allowed_capabilities) - CAPABILITIES)
        if unknown:
            raise ValueError(f"unknown capabilities {unknown} (use Docker's names, no CAP_)")
        if 0 < self.default_memory_mb < 4:
            raise ValueError("default_memory_mb must be 0 (no limit) or at least 4")
        self.default_memory_mb = _default_under(
            "memory_mb", self.default_memory_mb, DEFAULT_MEMORY_MB, self.max_memory_mb
        )
        self.default_cpus = _default_under("cpus", self.default_cpus, DEFAULT_CPUS, self.max_cpus)
        if self.max_pids_limit is not None and self.default_pids_limit > self.max_pids_limit:
            raise ValueError("default_pids_limit is larger than max_pids_limit")
        if self.run_as_non_root and self.user is not None and not is_non_root(self.user):
            raise ValueError(
                f"user {self.user!r} is not a numeric uid other than 0, which run_as_non_root "
                "requires"
            )


def _default_under(name: str, default: T, built_in: T, maximum: T | None) -> T:
    """The default limit `name` under the maximum: the built-in default gives way to a
    lower maximum; a default set in the file (or "no limit") above it is an error."""
    if maximum is None or (default and default <= maximum):
        return default
    if default == built_in:
        return maximum
    what = f"{default:g}" if default else "0 (no limit)"
    raise ValueError(f"default_{name} = {what} is above max_{name} = {maximum:g}")


def is_non_root(user: str) -> bool:
    """True if `user` ("uid" or "uid:gid") names a numeric uid other than 0."""
    uid = user.partition(":")[0]
    return uid.isdigit() and int(uid) != 0


class SupervisorConfig(_Table):
    """The whole file."""

    docker: DockerConfig = msgspec.field(default_factory=DockerConfig)
    devices: Annotated[list[DeviceConfig], Meta(max_length=4096)] = []

    def __post_init__(self) -> None:
        names: set[str] = set()
        paths: set[str] = set()
        for device in self.devices:
            if device.name in names:
                raise ValueError(f"two devices are named {device.name!r}")
            if device.path in paths:
                raise ValueError(f"two devices use the path {device.path!r}")
            names.add(device.name)
            paths.add(device.path)
        if len({d.resource for d in self.devices}) > MAX_RESOURCE_CLASSES:
            raise ValueError(f"at most {MAX_RESOURCE_CLASSES} resource classes")


def parse_config(text: str, source: str = "<config>") -> SupervisorConfig:
    """Parse TOML text. Raises ConfigError naming `source` and the bad key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        return msgspec.convert(raw, SupervisorConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: Path | str | None) -> SupervisorConfig:
    """The configuration in `path`, or the defaults when `path` is None."""
    if path is None:
        return SupervisorConfig()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return parse_config(text, str(path))


# --- the settings of one supervisor process --------------------------------------------


class WasmSettings(msgspec.Struct, frozen=True):
    """What the Wasm backend is given (`--wasm-*`)."""

    #: Compiled-module cache (the command's default: WORK_DIR/wasm-cache).
    cache_dir: Path
    #: Size bound of that cache; least recently used entries go first.
    cache_max_mb: int = 512
    #: Most linear memory a guest may have (a job may ask for less).
    memory_limit_mb: int = 1024
    #: Most a run may write to its /scratch; past it the run fails (scratch_limit).
    scratch_mb: int = 1024


class InputSettings(msgspec.Struct, frozen=True):
    """What runs' inputs may take (`--inputs-*`; supervisor.inputs)."""

    #: Most all inputs of one run may take together, files and unpacked archives.
    max_mb: int = 4096
    #: Size bound of the input cache (WORK_DIR/input-cache); least recently used go first.
    cache_max_mb: int = 4096


class OutputSettings(msgspec.Struct, frozen=True):
    """This supervisor's own caps on what one run keeps of its output files (`--outputs-*`;
    supervisor.outputs): each holds the switchboard's `collect_limits` to at most this."""

    max_files: int = 1000
    max_file_mb: int = 1024
    #: Also the quota of a Wasm guest's /out.
    max_total_mb: int = 4096


class LinkSettings(msgspec.Struct, frozen=True):
    """How `supervisor run` reaches its switchboard (run-local has none). The token is not
    here: it is read once into the connector's credentials, so that no repr or log of the
    settings can show it."""

    #: ws:// or wss:// URLs of the supervisor endpoint: one switchboard, or several
    #: replicas serving one lab (tried in turn when the one in use fails).
    urls: list[str]
    #: CA certificate(s) (PEM) to verify a wss:// switchboard with (None: the system's).
    ca_file: str | None = None
    #: Unacknowledged events kept at most; past that, jobs' output waits (backpressure).
    max_backlog_mb: int = 64


class SupervisorSettings(msgspec.Struct, frozen=True):
    """Everything one `supervisor` process runs with, built once at start from its flags,
    the environment and the config file; backends and the connector get the parts they
    need from it."""

    #: Stable identity towards the switchboard (and the owner label of its containers).
    supervisor_id: str
    #: Per-run scratch space and caches.
    work_dir: Path
    wasm: WasmSettings
    inputs: InputSettings = msgspec.field(default_factory=InputSettings)
    outputs: OutputSettings = msgspec.field(default_factory=OutputSettings)
    #: The config file (--config): Docker policy and devices.
    config: SupervisorConfig = msgspec.field(default_factory=SupervisorConfig)
    #: Display name (`supervisor run`; default the host name).
    name: str = ""
    #: The backend kind jobs run on (run-local: the spec's).
    backend: str = "wasm"
    labels: dict[str, str] = {}
    max_jobs: int = 4
    #: The Docker engine (None: $DOCKER_HOST, else local).
    docker_host: str | None = None
    #: Serve Prometheus metrics on this port (None: not served), on `metrics_host`.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    #: "text" or "json" (common.logfmt).
    log_format: str = "text"
    link: LinkSettings | None = None


def default_of(struct: type[msgspec.Struct], name: str) -> object:
    """The default of field `name` of `struct`, so the command's flags share it."""
    for field in msgspec.structs.fields(struct):
        if field.name == name:
            return field.default
    raise KeyError(name)
