"""Every message on the supervisor WebSocket, one tagged union per direction.

Each message is a JSON object whose `type` field names it. Supervisor -> switchboard
messages derive from :class:`SupervisorMessage`, switchboard -> supervisor ones from
:class:`SwitchboardMessage`; :class:`ProtocolErrorMessage` may travel either way.

Events (state transitions, errors, output, exit status) carry a `seq` that the supervisor
assigns, increasing by one per event across reconnects. The switchboard stores an event,
then acknowledges it cumulatively with :class:`Ack`. See docs/protocol.md.

New fields always get defaults, so an older peer can ignore them: within major version 1 a
receiver skips the fields it does not know, in every message and nested object. The job
spec Structs of :mod:`protocol.spec` forbid unknown fields (people type them, and a typo
must be an error), so a supervisor decodes `start_job` through lenient twins of them
(:data:`LenientFromSwitchboard`): a newer switchboard's added backend field does not
break an older supervisor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from . import limits
from .exceptions import JobErrorKind, ProblemCode
from .spec import (
    BackendSpec,
    CollectWhen,
    Digest,
    DockerBackend,
    Id,
    InputPath,
    JobSpec,
    Labels,
    NoopBackend,
    OutputGlob,
    Parameter,
    ParameterName,
    ResourceCounts,
    Seconds,
    WasmBackend,
)
from .state import Phase
from .versions import FILES_MINOR

INT64_MAX = 2**63 - 1
Int64 = Annotated[int, Meta(ge=-INT64_MAX - 1, le=INT64_MAX)]
Seq = Annotated[int, Meta(ge=0, le=INT64_MAX)]
#: An event's own number: the first event a supervisor ever numbers is 1.
EventSeq = Annotated[int, Meta(ge=1, le=INT64_MAX)]
Attempt = Annotated[int, Meta(ge=1, le=INT64_MAX)]
#: An output stream: `stdout`, `stderr`, `console` (backend messages) or (1.6)
#: `console:<device id>`, the serial console of a device granted to the run.
Stream = Annotated[str, Meta(pattern=limits.STREAM_PATTERN)]
Text = Annotated[str, Meta(max_length=limits.MESSAGE_MAX_LEN)]

#: The streams every run has (a run holding devices with consoles has one more each).
STREAMS: tuple[str, ...] = ("stdout", "stderr", "console")


class RunRef(msgspec.Struct, frozen=True):
    """Names one run: a job and its attempt number (1 for the first run)."""

    job_id: Id
    attempt: Attempt


class HeldRun(msgspec.Struct, frozen=True):
    """A run a supervisor holds now, with the last phase it reported for it."""

    job_id: Id
    attempt: Attempt
    phase: Phase


# --- supervisor -> switchboard ---------------------------------------------------------


class SupervisorMessage(msgspec.Struct, tag_field="type", omit_defaults=True):
    """Base of every message a supervisor sends."""


class DeviceInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    """(1.4) One device of the host, as its supervisor's config declares it: its id
    (unique in the lab), its class (what jobs ask for in `resources`), its labels, and
    whether it has a serial console and power commands."""

    id: Id
    class_: Id = msgspec.field(name="class")
    labels: Labels = {}
    console: bool = False
    power: bool = False


class Hello(SupervisorMessage, tag="hello"):
    """First message of every connection."""

    supervisor_id: Id
    name: Annotated[str, Meta(min_length=1, max_length=limits.NAME_MAX_LEN)]
    #: Protocol versions spoken, as "MAJOR.MINOR"; the switchboard picks one.
    versions: Annotated[list[str], Meta(min_length=1, max_length=16)]
    backends: Annotated[list[str], Meta(max_length=16)] = []
    labels: Labels = {}
    resources: ResourceCounts = {}
    max_jobs: Annotated[int, Meta(ge=1, le=100_000)] = 1
    runs: Annotated[list[HeldRun], Meta(max_length=100_000)] = []
    #: Highest seq this supervisor has assigned (0 if none, e.g. after a fresh start).
    last_seq: Seq = 0
    software: Annotated[str, Meta(max_length=128)] = ""
    #: (1.1) SHA-256, lowercase hex, of the credential this supervisor enrols with: read
    #: only when the connection's token is a registration token (docs/auth.md).
    credential_sha256: Annotated[str, Meta(pattern=limits.SHA256_HEX_PATTERN)] | None = None
    #: (1.4) The host's devices (its inventory): the switchboard keeps their health and
    #: grants them to runs by id (`start_job.devices`).
    devices: Annotated[list[DeviceInfo], Meta(max_length=limits.MAX_DEVICES)] = []


class Event(SupervisorMessage):
    """Base of the sequenced per-run events."""

    seq: EventSeq
    job_id: Id
    attempt: Attempt


class JobStateChanged(Event, tag="state"):
    """The run entered `phase`; `stage` refines `initializing` (e.g. "fetching", "starting")."""

    phase: Phase
    stage: Annotated[str, Meta(max_length=64)] | None = None
    message: Text | None = None
    #: Supervisor's clock, seconds since the Unix epoch.
    at: float = 0.0


class JobErrorReport(Event, tag="error"):
    """The supervisor refused or failed the run."""

    kind: JobErrorKind
    description: Text = ""


class Output(Event, tag="output"):
    """Bytes the run wrote to `stream`, starting at byte `offset` of that stream."""

    stream: Stream
    offset: Seq
    data: Annotated[bytes, Meta(max_length=limits.MAX_OUTPUT_CHUNK)]


#: Every word an `exit` may give as its `reason` (docs/protocol.md §5.1). The field is a
#: plain string on the wire, so a newer supervisor's word still decodes.
EXIT_REASONS = frozenset(
    {
        "exited",
        "signaled",
        "timeout",
        "canceled",
        "oom",
        "trap",
        "out_of_fuel",
        "memory_limit",
        "scratch_limit",
        "error",
    }
)


class JobExit(Event, tag="exit"):
    """How the program ended (the task outcome), sent before the terminal state; `reason`
    is one of EXIT_REASONS."""

    exit_code: Int64 | None = None
    signal: Int64 | None = None
    reason: Annotated[str, Meta(max_length=32)] = "exited"
    message: Text | None = None


class OutputFile(msgspec.Struct, frozen=True, omit_defaults=True):
    """(1.3) A kept output file, uploaded: its path relative to the output directory, its
    size in bytes, the digest it was uploaded under, and its media type."""

    path: Annotated[str, Meta(min_length=1, max_length=limits.OUTPUT_PATH_MAX_LEN)]
    size: Seq
    digest: Digest
    media_type: Annotated[str, Meta(max_length=128)] = "application/octet-stream"


class RefusedFile(msgspec.Struct, frozen=True):
    """(1.3) An output file that matched a collect rule and was not kept, and why."""

    path: Annotated[str, Meta(min_length=1, max_length=limits.OUTPUT_PATH_MAX_LEN)]
    reason: Text


class JobFiles(Event, tag="files"):
    """(1.3) The run's output files, each uploaded (and so stored) before it is listed
    here, and those refused; sent after the program ended and before `exit`, in one or
    more events of at most MAX_FILES_PER_EVENT entries each."""

    files: Annotated[list[OutputFile], Meta(max_length=limits.MAX_FILES_PER_EVENT)] = []
    refused: Annotated[list[RefusedFile], Meta(max_length=limits.MAX_FILES_PER_EVENT)] = []
    #: Refused files beyond those listed, counted only.
    refused_unlisted: Seq = 0


class StatusReply(SupervisorMessage, tag="status"):
    """Answer to a StatusRequest: the runs held now."""

    request_id: Seq
    runs: list[HeldRun] = []
    running: Seq = 0


#: What a device's power command does (docs/lab.md "Power").
PowerAction = Literal["on", "off", "cycle", "status"]
POWER_ACTIONS: tuple[PowerAction, ...] = ("on", "off", "cycle", "status")


class PowerResult(SupervisorMessage, tag="power_result"):
    """(1.5) Answer to a Power request: whether the command ran and exited 0, its exit
    status (None: it did not run, or was killed past its deadline), its output (stdout
    and stderr together, cut to POWER_OUTPUT_MAX_LEN) and, when not ok, why."""

    request_id: Seq
    ok: bool = False
    exit_code: Int64 | None = None
    output: Annotated[str, Meta(max_length=limits.POWER_OUTPUT_MAX_LEN)] = ""
    reason: Text = ""


class ConsoleData(SupervisorMessage, tag="console_data"):
    """(1.6) Bytes read from a device's serial console for an attached session: `offset`
    counts the bytes of that console read since the supervisor opened it, so a gap shows.
    Not an event (no `seq`, not resent): a session ends with its connection."""

    session: Seq
    offset: Seq
    data: Annotated[bytes, Meta(max_length=limits.MAX_CONSOLE_DATA)]


class ConsoleClosed(SupervisorMessage, tag="console_closed"):
    """(1.6) The supervisor ended an attached session (or refused to start it), and why:
    no such device or console here, the console can't be opened, the session fell behind."""

    session: Seq
    reason: Text = ""


class Heartbeat(SupervisorMessage, tag="heartbeat"):
    """Sent every `heartbeat_interval_s` (from the Welcome) by both sides."""

    at: float = 0.0


# --- switchboard -> supervisor ---------------------------------------------------------


class SwitchboardMessage(msgspec.Struct, tag_field="type", omit_defaults=True):
    """Base of every message the switchboard sends."""


class Welcome(SwitchboardMessage, tag="welcome"):
    """Answer to Hello: the connection is established."""

    version: str
    #: Session generation: higher than that of any earlier connection of this supervisor.
    session: Attempt
    #: Highest event seq from this supervisor that the switchboard has stored.
    last_seq: Seq
    heartbeat_interval_s: Annotated[float, Meta(gt=0)] = 5.0
    heartbeat_timeout_s: Annotated[float, Meta(gt=0)] = 20.0
    #: (1.1) The Hello's credential was stored as this supervisor's own: present it alone
    #: from now on.
    enrolled: bool = False


class InputFile(msgspec.Struct, frozen=True, omit_defaults=True):
    """(1.3) An artifact to place read-only in the run's input directory before the
    program starts: at `path` (relative to that directory), or, with `unpack`, a tar
    archive unpacked into the directory `path`."""

    path: InputPath
    digest: Digest
    unpack: bool = False


class CollectRule(msgspec.Struct, frozen=True, omit_defaults=True):
    """(1.3) Output files to keep once the program has ended: those matching `pattern`
    (relative to the run's output directory), if the run ended as `when` says."""

    pattern: OutputGlob
    when: CollectWhen = "always"


class CollectLimits(msgspec.Struct, frozen=True, omit_defaults=True):
    """(1.3) The most a run may keep: files, bytes of one file, bytes of all. A file past
    a limit is not uploaded; the `files` event names it as refused, with the limit."""

    max_files: Annotated[int, Meta(ge=1, le=100_000)] = 1000
    max_file_bytes: Annotated[int, Meta(ge=1, le=INT64_MAX)] = 1024**3
    max_total_bytes: Annotated[int, Meta(ge=1, le=INT64_MAX)] = 4 * 1024**3


class StartJob(SwitchboardMessage, tag="start_job"):
    """Start one run. Repeating it for a run the supervisor holds is harmless."""

    job_id: Id
    attempt: Attempt
    backend: BackendSpec
    name: Annotated[str, Meta(max_length=limits.NAME_MAX_LEN)] = ""
    parameters: dict[ParameterName, Parameter] = {}
    resources: ResourceCounts = {}
    #: Run timeout in seconds from the moment the run starts; None = no limit.
    timeout_s: Seconds | None = None
    #: (1.3) Files to place in the run's input directory before the program starts.
    inputs: Annotated[list[InputFile], Meta(max_length=limits.MAX_INPUTS)] = []
    #: (1.3) Output files to keep once the program has ended (none: nothing is collected).
    collect: Annotated[list[CollectRule], Meta(max_length=limits.MAX_OUTPUT_GLOBS)] = []
    #: (1.3) The most the run may keep; absent: CollectLimits' defaults.
    collect_limits: CollectLimits | None = None
    #: (1.4) The devices granted to the run, by id (of the classes in `resources`): the
    #: supervisor gives it exactly these. Empty: it picks free ones itself.
    devices: Annotated[list[Id], Meta(max_length=limits.MAX_DEVICES)] = []


def collect_rules(spec: JobSpec) -> list[CollectRule]:
    """What of a run's output directory to keep: the spec's outputs when its `when` says,
    and its test reports always (a failed run's report is the one most wanted)."""
    rules = []
    if spec.outputs is not None:
        rules += [CollectRule(pattern, spec.outputs.when) for pattern in spec.outputs.paths]
    if spec.reports is not None:
        rules += [CollectRule(pattern) for pattern in spec.reports.junit_globs]
    return rules


def start_job(
    job_id: str,
    attempt: int,
    spec: JobSpec,
    collect_limits: CollectLimits | None = None,
    devices: Sequence[str] = (),
) -> StartJob:
    """The StartJob of run (`job_id`, `attempt`) of a job with this spec: what of the spec
    a supervisor needs, with the switchboard's `collect_limits` for a run that keeps
    files and the `devices` granted to it. (The one place a spec becomes a StartJob:
    `minor_needed` says which supervisors may be sent it.)"""
    if chained := spec.chained_inputs():
        path = next(iter(chained))
        raise ValueError(
            f"inputs[{path!r}] names job {chained[path].from_job!r}'s output:"
            " only a switchboard resolves that, once the job has ended"
        )
    collect = collect_rules(spec)
    return StartJob(
        job_id=job_id,
        attempt=attempt,
        backend=spec.backend,
        name=spec.name,
        parameters=spec.parameters,
        resources=spec.resources,
        timeout_s=spec.timeout_s,
        inputs=[
            InputFile(path=path.rstrip("/"), digest=digest, unpack=path.endswith("/"))
            for path, digest in spec.input_digests().items()
        ],
        collect=collect,
        collect_limits=collect_limits if collect else None,
        devices=list(devices),
    )


def minor_needed(spec: JobSpec) -> int:
    """The lowest protocol minor a supervisor must speak to run this spec as written: an
    older one would ignore the fields it does not know and run something else."""
    keeps_files = spec.outputs is not None or spec.reports is not None
    return FILES_MINOR if spec.inputs or keeps_files else 0


#: Why a run is stopped (a supervisor refuses any other word as an invalid message).
StopReason = Literal["canceled", "timeout", "unwanted", "shutdown"]


class StopJob(SwitchboardMessage, tag="stop_job"):
    """Stop one run: ask politely, wait `grace_s`, then force. Repeating it is harmless."""

    job_id: Id
    attempt: Attempt
    reason: StopReason = "canceled"
    #: Seconds between the polite stop and the forced one; absent: the job spec's own
    #: stop grace (Docker's `stop_grace_s`), or the backend's default.
    grace_s: Annotated[float, Meta(ge=0, le=3600)] | None = None


class EventProblem(msgspec.Struct, frozen=True, omit_defaults=True):
    """(1.2) Something wrong with one acknowledged event: what the switchboard did with it
    (`code`, see ProblemCode) and why, for people (`reason`)."""

    seq: EventSeq
    code: ProblemCode
    reason: Annotated[str, Meta(max_length=limits.MESSAGE_MAX_LEN)] = ""


class Ack(SwitchboardMessage, tag="ack"):
    """Every event with seq <= `seq` is stored, or settled for good (`problems` names the
    ones that were not applied as sent); the supervisor may forget them."""

    seq: Seq
    #: (1.2) The events of this batch the switchboard refused or stored only in part.
    problems: Annotated[list[EventProblem], Meta(max_length=100_000)] = []


class StatusRequest(SwitchboardMessage, tag="status_request"):
    request_id: Seq


class Power(SwitchboardMessage, tag="power"):
    """(1.5) Run one of a device's power commands; the supervisor answers with a
    PowerResult of the same `request_id`."""

    request_id: Seq
    device_id: Id
    action: PowerAction


class ConsoleAttach(SwitchboardMessage, tag="console_attach"):
    """(1.6) Start sending what a device's serial console prints, as `console_data` of
    this `session` (numbered by the switchboard, per connection), until `console_detach`
    or the connection ends."""

    session: Seq
    device_id: Id


class ConsoleInput(SwitchboardMessage, tag="console_input"):
    """(1.6) Bytes to write to the serial console of an attached session's device (best
    effort: what can't be written at once is dropped)."""

    session: Seq
    data: Annotated[bytes, Meta(max_length=limits.MAX_CONSOLE_INPUT)]


class ConsoleDetach(SwitchboardMessage, tag="console_detach"):
    """(1.6) End an attached session (a repeat, or an unknown session, is harmless)."""

    session: Seq


class ServerHeartbeat(SwitchboardMessage, tag="heartbeat"):
    """The switchboard's heartbeat (same shape as the supervisor's)."""

    at: float = 0.0


# --- either direction ------------------------------------------------------------------


class ProtocolErrorMessage(
    msgspec.Struct, tag="protocol_error", tag_field="type", omit_defaults=True
):
    """Sent just before closing a connection: why, and (from the switchboard, e.g. while
    it shuts down) how long to wait at least before reconnecting."""

    code: Int64
    reason: str
    retry_after_s: Annotated[float, Meta(ge=0, le=3600)] | None = None


FromSupervisor = (
    Hello
    | JobStateChanged
    | JobErrorReport
    | Output
    | JobExit
    | JobFiles
    | StatusReply
    | PowerResult
    | ConsoleData
    | ConsoleClosed
    | Heartbeat
    | ProtocolErrorMessage
)
FromSwitchboard = (
    Welcome
    | StartJob
    | StopJob
    | Ack
    | StatusRequest
    | Power
    | ConsoleAttach
    | ConsoleInput
    | ConsoleDetach
    | ServerHeartbeat
    | ProtocolErrorMessage
)
SupervisorEvent = JobStateChanged | JobErrorReport | Output | JobExit | JobFiles


# --- what a supervisor decodes: lenient twins of the spec Structs -----------------------
# Same fields, tags and checks (they are subclasses); only unknown fields are skipped. A
# decoded _LenientStartJob is turned into a plain StartJob at once (codec), so no twin
# travels further than the decoder.


class _LenientWasmBackend(WasmBackend, forbid_unknown_fields=False):
    pass


class _LenientDockerBackend(DockerBackend, forbid_unknown_fields=False):
    pass


class _LenientNoopBackend(NoopBackend, forbid_unknown_fields=False):
    pass


class _LenientParameter(Parameter, forbid_unknown_fields=False):
    pass


class _LenientStartJob(StartJob):
    backend: _LenientWasmBackend | _LenientDockerBackend | _LenientNoopBackend
    parameters: dict[ParameterName, _LenientParameter] = {}  # type: ignore[assignment]


#: The messages a supervisor decodes: FromSwitchboard, with unknown fields skipped in the
#: job spec parts of `start_job` too.
LenientFromSwitchboard = (
    Welcome
    | _LenientStartJob
    | StopJob
    | Ack
    | StatusRequest
    | Power
    | ConsoleAttach
    | ConsoleInput
    | ConsoleDetach
    | ServerHeartbeat
    | ProtocolErrorMessage
)
