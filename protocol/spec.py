"""The job spec: what a user submits, and (its backend part) what a supervisor runs.

People type these, so every Struct forbids unknown fields: a typo is an error naming the
field, not a silently ignored setting. Constraints are declared with `Meta` so the same
limits show up in the OpenAPI schema and in the error a bad spec gets.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Annotated, ClassVar, Literal

import msgspec
from msgspec import Meta

from . import limits

Id = Annotated[str, Meta(pattern=limits.ID_PATTERN, max_length=limits.ID_MAX_LEN)]
Name = Annotated[str, Meta(min_length=1, max_length=limits.NAME_MAX_LEN)]
Digest = Annotated[str, Meta(pattern=limits.DIGEST_PATTERN)]
LabelKey = Annotated[str, Meta(pattern=limits.LABEL_KEY_PATTERN)]
LabelValue = Annotated[str, Meta(max_length=limits.LABEL_VALUE_MAX_LEN)]
Labels = Annotated[dict[LabelKey, LabelValue], Meta(max_length=limits.MAX_LABELS)]
EnvName = Annotated[str, Meta(min_length=1, max_length=256)]
EnvMap = Annotated[dict[EnvName, str], Meta(max_length=256)]
ArgList = Annotated[list[str], Meta(max_length=1024)]
#: The longest run or queue timeout a spec may give: a week.
MAX_TIMEOUT_S = 7 * 24 * 3600
Seconds = Annotated[float, Meta(gt=0, le=MAX_TIMEOUT_S)]
DelaySeconds = Annotated[float, Meta(ge=0, le=7 * 24 * 3600)]
ResourceCounts = Annotated[dict[Id, Annotated[int, Meta(ge=1, le=1024)]], Meta(max_length=64)]
#: Where an input goes under the job's input directory (limits.INPUT_PATH_PATTERN).
InputPath = Annotated[str, Meta(pattern=limits.INPUT_PATH_PATTERN)]
#: A file an earlier job kept, by its path relative to that job's output directory.
OutputPath = Annotated[str, Meta(pattern=limits.INPUT_PATH_PATTERN)]


#: Devices one job may ask for one by one (`devices`).
MAX_DEVICES_WANTED = 16


class _Spec(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Base of the hand-written spec Structs."""


class FromJob(_Spec):
    """An input that is an output file of an earlier job (the build -> test chain): the
    job waits until `from_job` has ended, then takes the file its last run kept at `path`
    (relative to that run's `/out`). The switchboard puts the file's digest in its place,
    so a supervisor only ever sees digests."""

    from_job: Id
    path: OutputPath


Inputs = Annotated[dict[InputPath, Digest | FromJob], Meta(max_length=limits.MAX_INPUTS)]


class WasmBackend(_Spec, tag="wasm", tag_field="kind"):
    """A WASI module, named by the digest of an uploaded artifact.

    The run's wall-clock limit is the job's `timeout_s`; `fuel` bounds the instructions it
    may execute and `memory_limit_mb` its linear memory. `stdin` (base64 in JSON) is what
    the guest reads from standard input.
    """

    kind: ClassVar[str] = "wasm"
    module: Digest
    args: ArgList = []
    env: EnvMap = {}
    stdin: Annotated[bytes, Meta(max_length=1024 * 1024)] = b""
    fuel: Annotated[int, Meta(ge=1, le=2**63 - 1)] | None = None
    memory_limit_mb: Annotated[int, Meta(ge=1, le=4096)] | None = None


class DockerBackend(_Spec, tag="docker", tag_field="kind"):
    """A container. The image is a reference the engine already has (`image`), or an image
    tarball uploaded as an artifact (`image_artifact`, loaded once per supervisor; `image`
    then picks one of its tags, else its first image is used).

    Containers never run privileged and start with every capability dropped; `cap_add`
    asks for some back, which the supervisor grants only from its own allowlist. The
    network is `none` unless the spec asks for more and the supervisor allows it.
    """

    kind: ClassVar[str] = "docker"
    image: Annotated[str, Meta(min_length=1, max_length=512)] | None = None
    image_artifact: Digest | None = None
    command: ArgList = []
    env: EnvMap = {}
    workdir: Annotated[str, Meta(max_length=1024)] | None = None
    user: Annotated[str, Meta(max_length=64)] | None = None
    memory_mb: Annotated[int, Meta(ge=4, le=1024 * 1024)] | None = None
    cpus: Annotated[float, Meta(gt=0, le=1024)] | None = None
    pids_limit: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    network: Literal["none", "bridge", "host"] = "none"
    read_only_rootfs: bool = False
    cap_add: Annotated[
        list[Annotated[str, Meta(pattern=r"^[A-Z_]{1,32}$")]], Meta(max_length=16)
    ] = []
    #: Seconds between SIGTERM and SIGKILL when the run is stopped (a StopJob may say more).
    stop_grace_s: Annotated[float, Meta(ge=0, le=3600)] = 10.0

    def __post_init__(self) -> None:
        if self.image is None and self.image_artifact is None:
            raise ValueError("name an `image` or an `image_artifact`")


class NoopBackend(_Spec, tag="noop", tag_field="kind"):
    """Runs nothing: ends after `delay_s` with `exit_code`, optionally printing `output`
    and writing `files` (relative path -> text) into its output directory (`/out`), so
    that collecting outputs can be exercised without a real program."""

    kind: ClassVar[str] = "noop"
    delay_s: DelaySeconds = 0.0
    exit_code: Annotated[int, Meta(ge=0, le=255)] = 0
    output: Annotated[str, Meta(max_length=65536)] = ""
    files: Annotated[
        dict[
            InputPath,
            Annotated[str, Meta(max_length=65536)],
        ],
        Meta(max_length=64),
    ] = {}


BackendSpec = WasmBackend | DockerBackend | NoopBackend

#: The backend kinds a supervisor can advertise.
BACKEND_KINDS: tuple[str, ...] = ("wasm", "docker", "noop")


class LabelExpression(_Spec):
    """One selector term: `key` `operator` `values`."""

    key: LabelKey
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: Annotated[list[LabelValue], Meta(max_length=64)] = []

    def __post_init__(self) -> None:
        needs_values = self.operator in ("In", "NotIn")
        if needs_values and not self.values:
            raise ValueError(f"operator {self.operator} needs at least one value")
        if not needs_values and self.values:
            raise ValueError(f"operator {self.operator} takes no values")


class Selector(_Spec):
    """Which supervisors may run a job: all of `match_labels` and every expression must hold."""

    match_labels: Labels = {}
    match_expressions: Annotated[list[LabelExpression], Meta(max_length=32)] = []


RoleName = Annotated[str, Meta(pattern=limits.LABEL_KEY_PATTERN, max_length=63)]


class DeviceWanted(_Spec):
    """One device a job asks for by name (the hardware lab, docs/lab.md): of `class`
    and/or whose labels satisfy `selector`; `role` says what it is to the job (`dut`,
    `meter`...). Every device of a job's `devices` is granted on one host, all or none,
    each a different device."""

    class_: Id | None = msgspec.field(default=None, name="class")
    selector: Selector = msgspec.field(default_factory=Selector)
    role: RoleName | None = None

    def __post_init__(self) -> None:
        if self.class_ is None and not (
            self.selector.match_labels or self.selector.match_expressions
        ):
            raise ValueError("a device asked for needs a `class`, a `selector`, or both")


class Parameter(_Spec):
    """A named value handed to the job (as an environment variable). Secret ones are never
    returned by the API, logged or shown."""

    value: Annotated[str, Meta(max_length=65536)]
    secret: bool = False


class Backoff(_Spec):
    """Delay before restart n (n = 1, 2, ...): ceiling = min(max_s, first_s * factor**(n-1)),
    then jitter: none = ceiling; full = uniform(0, ceiling); equal = ceiling/2 +
    uniform(0, ceiling/2); decorrelated = min(max_s, uniform(first_s, 3 * previous delay))."""

    first_s: Annotated[float, Meta(ge=0, le=86400)] = 1.0
    max_s: Annotated[float, Meta(ge=0, le=86400)] = 300.0
    factor: Annotated[float, Meta(ge=1, le=100)] = 2.0
    jitter: Literal["none", "full", "equal", "decorrelated"] = "full"


class RestartPolicy(_Spec):
    """When a job gets another run: never; on_failure (failed, timed_out, lost); always
    (any ending but a cancel or a refusal). At most `max_restarts` times; a job that would
    restart once more ends `exhausted`."""

    policy: Literal["never", "on_failure", "always"] = "never"
    max_restarts: Annotated[int, Meta(ge=0, le=1000)] = 3
    backoff: Backoff = msgspec.field(default_factory=Backoff)


class Concurrency(_Spec):
    """At most one job per `key` runs at a time. `policy` says what a new job does when
    another job with its key is queued or running: `queue` waits its turn; `drop_if_running`
    is not run (it ends `rejected` at once, its record kept); `replace` cancels the others
    and runs once they have stopped."""

    key: Annotated[str, Meta(pattern=limits.LABEL_KEY_PATTERN)]
    policy: Literal["queue", "drop_if_running", "replace"] = "queue"


def input_overlap(paths: Iterable[str]) -> str | None:
    """Why inputs at these paths can't all be placed (one inside another, or two at the
    same place: `a` and `a/b`, `t/` and `t/x`, `a` and `a/`), or None if they can. A trailing
    `/` (a directory to unpack into) is ignored."""
    names = sorted(p.rstrip("/") for p in paths)
    for before, after in itertools.pairwise(names):
        if after == before or after.startswith(before + "/"):
            return f"inputs {before!r} and {after!r} overlap: one would be placed inside the other"
    return None


ParameterName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$(?!\n)")]

OutputGlob = Annotated[str, Meta(pattern=limits.OUTPUT_GLOB_PATTERN, max_length=256)]
#: When a run's output files are kept: whatever its ending, or only if it succeeded, or
#: only if it did not.
CollectWhen = Literal["always", "on_success", "on_failure"]


class Outputs(_Spec):
    """The files of the output directory (`/out`) to keep once the program has ended:
    globs relative to it (`*`, `?`, `[...]`, and `**` for any number of directories)."""

    paths: Annotated[list[OutputGlob], Meta(min_length=1, max_length=32)]
    when: CollectWhen = "always"


class Reports(_Spec):
    """Test reports among the output files, parsed by the switchboard: `junit` globs
    (relative to `/out`), kept whatever the run's ending."""

    junit: Annotated[list[OutputGlob], Meta(max_length=16)] | OutputGlob = []

    @property
    def junit_globs(self) -> list[str]:
        return [self.junit] if isinstance(self.junit, str) else list(self.junit)


class JobSpec(_Spec):
    """What a user submits (REST body, spec file for `supervisor run-local`)."""

    name: Name
    backend: BackendSpec
    labels: Labels = {}
    selector: Selector = msgspec.field(default_factory=Selector)
    resources: ResourceCounts = {}
    priority: Annotated[int, Meta(ge=-1000, le=1000)] = 0
    #: Wall-clock limit of each run, from the moment it starts running.
    timeout_s: Seconds | None = None
    #: How long the job may wait in the queue for its first run before it ends `timed_out`.
    queue_timeout_s: Seconds | None = None
    concurrency: Concurrency | None = None
    #: None: never restarted.
    restart: RestartPolicy | None = None
    parameters: Annotated[dict[ParameterName, Parameter], Meta(max_length=128)] = {}
    #: Files placed read-only under the job's input directory (`/in`) before it starts:
    #: path -> digest of an uploaded artifact, or an earlier job's output file (FromJob).
    #: A path ending in `/` names a directory the file (a tar archive) is unpacked into.
    inputs: Inputs = {}
    #: Files of the output directory (`/out`) kept after the program ends.
    outputs: Outputs | None = None
    #: Test reports among the output files.
    reports: Reports | None = None
    #: The held reservation whose devices the job runs on (docs/lab.md): only jobs naming
    #: it are given them. The switchboard's alone: no StartJob carries it.
    reservation: Id | None = None
    #: Devices asked for one by one, each by class and/or a label selector, all granted
    #: on one host (docs/lab.md, "Several boards in one job"); with `resources`' device
    #: classes besides.
    devices: Annotated[list[DeviceWanted], Meta(max_length=MAX_DEVICES_WANTED)] = []

    def __post_init__(self) -> None:
        if (overlap := input_overlap(self.inputs)) is not None:
            raise ValueError(overlap)
        roles = [d.role for d in self.devices if d.role is not None]
        if len(set(roles)) != len(roles):
            raise ValueError("devices: two devices have the same role")

    def classes_wanted(self) -> dict[str, int]:
        """{class: count} of everything the job asks for by class: its `resources` and
        its `devices` that name a class (a device asked for by selector alone is not
        counted here: only the grant looks at labels)."""
        if not self.devices:
            return self.resources
        counts = dict(self.resources)
        for wanted in self.devices:
            if wanted.class_ is not None:
                counts[wanted.class_] = counts.get(wanted.class_, 0) + 1
        return counts

    def input_digests(self) -> dict[str, str]:
        """The inputs named by digest (path -> digest); a chained input is one once the
        switchboard has resolved it."""
        return {path: value for path, value in self.inputs.items() if isinstance(value, str)}

    def chained_inputs(self) -> dict[str, FromJob]:
        """The inputs still naming an earlier job's output file (path -> reference)."""
        return {p: value for p, value in self.inputs.items() if isinstance(value, FromJob)}
