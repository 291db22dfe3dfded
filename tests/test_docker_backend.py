"""The docker backend on a real, private Docker engine (tests.docker_engine), driven through a
BackendSupervisor and a RecordingConnector: what a container gets, byte-exact output,
endings (exit code, OOM, timeout, stop with and without a grace), devices, images from
artifacts, refusals, and re-adoption after a supervisor restart."""

from __future__ import annotations

import asyncio
import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import stat
import tarfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import docker
import docker.errors
import pytest
import pytest_asyncio

from protocol.exceptions import JobError, JobErrorKind
from protocol.messages import (
    JobErrorReport,
    JobExit,
    JobStateChanged,
    Output,
    StartJob,
    StopJob,
)
from protocol.spec import DockerBackend as DockerSpec
from protocol.spec import Parameter
from supervisor import metrics
from supervisor.artifacts import ArtifactSource
from supervisor.artifacts import MemoryArtifactSource as MemoryArtifacts
from supervisor.backends.devices import Devices
from supervisor.backends.docker import DockerBackend
from supervisor.backends.docker_images import ARTIFACT_REPOSITORY
from supervisor.backends.docker_policy import LABEL_START, LABEL_SUPERVISOR, pseudo_terminals
from supervisor.backends.docker_streams import demux as _demux
from supervisor.config import (
    ConfigError,
    DeviceConfig,
    DockerConfig,
    SupervisorConfig,
    parse_config,
)
from supervisor.jobs import BackendSupervisor
from tests.docker_engine import (
    BUSYBOX_IMAGE,
    Engine,
    labeled_containers,
    write_image_with_zeros,
)
from tests.docker_engine import saved_image as save_image
from tests.recording import RecordingConnector
from tests.simboard import SimBoard

pytestmark = [pytest.mark.timeout(120)]

SUPERVISOR_ID = "sb-test"
#: Generous bounds for timings on a shared machine.
SLACK_S = 5.0


class Host:
    """One supervisor process, as far as a test can tell: a DockerBackend in a
    BackendSupervisor whose events a RecordingConnector keeps."""

    def __init__(self, backend: DockerBackend, work_dir: Path) -> None:
        self.backend = backend
        self.supervisor = BackendSupervisor(backend, max_jobs=8, work_dir=work_dir)
        self.events = RecordingConnector(self.supervisor)
        self.crashed = False

    async def start(self, job_id: str, spec: DockerSpec, **kwargs: object) -> None:
        await self.supervisor.start_job(StartJob(job_id=job_id, attempt=1, backend=spec, **kwargs))

    async def run(self, job_id: str, spec: DockerSpec, **kwargs: object) -> str:
        """Start a job and wait for its terminal phase."""
        await self.start(job_id, spec, **kwargs)
        return await self.events.wait_ended(job_id, limit_s=60)

    async def stop(self, job_id: str, grace_s: float) -> None:
        await self.supervisor.stop_job(StopJob(job_id=job_id, attempt=1, grace_s=grace_s))

    def exit(self, job_id: str) -> JobExit:
        exits = [e for e in self.events.events if isinstance(e, JobExit) and e.job_id == job_id]
        assert len(exits) == 1, exits
        return exits[0]

    def error(self, job_id: str) -> JobErrorReport | None:
        errors = [
            e for e in self.events.events if isinstance(e, JobErrorReport) and e.job_id == job_id
        ]
        return errors[0] if errors else None

    def stages(self, job_id: str) -> list[str | None]:
        return [
            e.stage
            for e in self.events.events
            if isinstance(e, JobStateChanged) and e.job_id == job_id and e.stage
        ]

    async def wait_output(self, job_id: str, needle: bytes, stream: str = "stdout") -> None:
        await self.events.wait_output(job_id, needle, stream)

    async def crash(self) -> None:
        """What a SIGKILL of the supervisor would leave: containers as they are, nothing
        stopped or removed; this process simply stops looking."""
        runs = list(self.supervisor._runs.values())
        for run in runs:
            assert run.task is not None
            run.task.cancel()
        await asyncio.gather(*(r.task for r in runs if r.task), return_exceptions=True)
        await self.backend.close()
        self.crashed = True

    async def shutdown(self) -> None:
        if not self.crashed:
            await self.supervisor.shutdown(grace_s=1.0)


MakeHost = Callable[..., Awaitable[Host]]


@pytest.fixture(scope="module", autouse=True)
def nothing_left_behind(docker_engine: Engine) -> Iterator[None]:
    """After the module, no container of any supervisor may remain on the engine."""
    yield
    left = labeled_containers(docker_engine.api, LABEL_SUPERVISOR)
    for container in left:
        docker_engine.api.remove_container(container["Id"], force=True)
    assert not left, [c["Names"] for c in left]


@pytest_asyncio.fixture
async def make_host(docker_engine: Engine, tmp_path: Path) -> AsyncIterator[MakeHost]:
    hosts: list[Host] = []

    async def make(
        *,
        supervisor_id: str = SUPERVISOR_ID,
        config: SupervisorConfig | None = None,
        artifacts: ArtifactSource | None = None,
        work_dir: Path | None = None,
    ) -> Host:
        backend = DockerBackend(
            artifacts or MemoryArtifacts(),
            supervisor_id=supervisor_id,
            docker_host=docker_engine.host,
            config=config,
            work_dir=work_dir or tmp_path / "backend",
        )
        host = Host(backend, tmp_path / f"supervisor-{len(hosts)}")
        hosts.append(host)
        await host.supervisor.recover()  # connects to the engine, re-adopts containers
        return host

    yield make
    for host in hosts:
        await host.shutdown()


@pytest_asyncio.fixture
async def host(make_host: MakeHost) -> Host:
    return await make_host()


def sh(script: str, **kwargs: object) -> DockerSpec:
    return DockerSpec(image=BUSYBOX_IMAGE, command=["sh", "-c", script], **kwargs)


def files_holding(root: Path, needle: bytes) -> list[Path]:
    """The files under `root` whose bytes contain `needle`."""
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def containers_of(engine: Engine, job_id: str) -> list[dict]:
    return labeled_containers(engine.api, f"switchboard.job={job_id}")


def inspect_job(engine: Engine, job_id: str) -> tuple[dict, dict]:
    """HostConfig and Config of the job's (only) container, as `docker inspect` shows them."""
    [container] = containers_of(engine, job_id)
    info = engine.api.inspect_container(container["Id"])
    return info["HostConfig"], info["Config"]


# --- what a program sees, how it ends -----------------------------------------------------


async def test_exit_code_and_separate_streams(host: Host, docker_engine: Engine) -> None:
    phase = await host.run("exit5", sh("echo to-stdout; echo to-stderr >&2; exit 5"))
    assert phase == "failed"
    assert host.events.output("exit5", "stdout") == b"to-stdout\n"
    assert host.events.output("exit5", "stderr") == b"to-stderr\n"
    ended = host.exit("exit5")
    assert (ended.exit_code, ended.signal, ended.reason) == (5, None, "exited")
    assert host.stages("exit5") == ["accepted", "fetching", "creating", "starting"]
    assert host.events.phases("exit5")[-2:] == ["running", "failed"]
    mine = [e for e in host.events.events if e.job_id == "exit5"]
    running = next(i for i, e in enumerate(mine) if getattr(e, "phase", None) == "running")
    assert all(i > running for i, e in enumerate(mine) if isinstance(e, Output))
    assert containers_of(docker_engine, "exit5") == []  # removed once it ended

    assert await host.run("exit0", sh("true")) == "succeeded"
    assert host.exit("exit0").exit_code == 0


async def test_a_container_that_cannot_start_fails(host: Host) -> None:
    assert await host.run("nouser", sh("true", user="no-such-user")) == "failed"
    ended = host.exit("nouser")
    assert (ended.exit_code, ended.reason) == (None, "error")
    assert "could not start" in (ended.message or "") and "no-such-user" in (ended.message or "")
    assert await host.run("nocmd", DockerSpec(image=BUSYBOX_IMAGE, command=["/no/such"])) == (
        "failed"
    )
    assert host.exit("nocmd").exit_code == 127


async def test_what_a_container_gets(make_host: MakeHost, docker_engine: Engine) -> None:
    config = SupervisorConfig(docker=DockerConfig(allowed_capabilities=["NET_RAW"]))
    host = await make_host(config=config)
    spec = sh(
        'id -u; pwd; echo "$FROM_SPEC $FROM_PARAM"; grep CapBnd /proc/self/status; '
        "ls /sys/class/net; touch /rootfs-file 2>/dev/null || echo read-only; "
        "touch /scratch/x && echo scratch-ok; echo $TMPDIR; echo ready; sleep 60",
        env={"FROM_SPEC": "spec", "FROM_PARAM": "overridden"},
        workdir="/tmp",
        user="65534",
        memory_mb=64,
        cpus=0.5,
        pids_limit=100,
        cap_add=["NET_RAW"],
        read_only_rootfs=True,
    )
    await host.start(
        "sandbox", spec, parameters={"FROM_PARAM": Parameter(value="param", secret=True)}
    )
    await host.wait_output("sandbox", b"ready\n")
    [container] = containers_of(docker_engine, "sandbox")
    info = docker_engine.api.inspect_container(container["Id"])
    hc = info["HostConfig"]
    assert hc["Privileged"] is False
    assert hc["CapDrop"] == ["ALL"] and hc["CapAdd"] == ["NET_RAW"]
    assert hc["SecurityOpt"] == ["no-new-privileges"]
    assert hc["NetworkMode"] == "none"
    assert hc["Memory"] == hc["MemorySwap"] == 64 * 1024 * 1024
    assert hc["NanoCpus"] == 500_000_000 and hc["PidsLimit"] == 100
    assert hc["ReadonlyRootfs"] is True and "/scratch" in hc["Tmpfs"]
    assert hc["LogConfig"]["Type"] == "local"
    labels = info["Config"]["Labels"]
    assert labels[LABEL_SUPERVISOR] == SUPERVISOR_ID
    assert labels["switchboard.job"] == "sandbox" and labels["switchboard.attempt"] == "1"
    assert '"job_id":"sandbox"' in labels[LABEL_START]
    await host.stop("sandbox", grace_s=5)
    assert await host.events.wait_ended("sandbox") == "canceled"
    assert host.events.output("sandbox") == (
        b"65534\n/tmp\nspec param\nCapBnd:\t0000000000002000\nlo\nread-only\nscratch-ok\n"
        b"/scratch\nready\n"
    )


async def test_host_defaults_apply_when_the_spec_says_nothing(
    make_host: MakeHost, docker_engine: Engine
) -> None:
    """Without a word from the spec or the config a container still gets memory, CPU and
    pid limits; the config can lower them, make every container read-only (with a sized
    /scratch tmpfs) and run it as a non-root user; the spec's own values still win."""
    engine_cpus = docker_engine.api.info()["NCPU"]
    host = await make_host()
    assert await host.run("plain", sh("true")) == "succeeded"  # defaults the engine accepts
    await host.start("defaults", sh("echo ready; sleep 60"))
    await host.wait_output("defaults", b"ready\n")
    hc, config = inspect_job(docker_engine, "defaults")
    assert hc["Memory"] == hc["MemorySwap"] == 2048 * 1024 * 1024
    assert hc["NanoCpus"] == min(2, engine_cpus) * 10**9 and hc["PidsLimit"] == 4096
    assert hc["ReadonlyRootfs"] is False and config["User"] == ""
    await host.stop("defaults", grace_s=0)

    hardened = DockerConfig(
        default_memory_mb=64,
        default_cpus=0.5,
        default_pids_limit=50,
        user="65534:65534",
        read_only_rootfs=True,
        scratch_mb=8,
    )
    host = await make_host(config=SupervisorConfig(docker=hardened))
    script = (
        "id -u; id -g; touch /etc/x 2>/dev/null || echo rootfs-read-only; "
        "dd if=/dev/zero of=/scratch/fill bs=1M count=16 2>/dev/null || echo scratch-full; "
        "echo ready; sleep 60"
    )
    await host.start("hardened", sh(script))
    await host.wait_output("hardened", b"ready\n")
    hc, config = inspect_job(docker_engine, "hardened")
    assert hc["Memory"] == hc["MemorySwap"] == 64 * 1024 * 1024
    assert hc["NanoCpus"] == 500_000_000 and hc["PidsLimit"] == 50
    assert config["User"] == "65534:65534" and hc["ReadonlyRootfs"] is True
    assert "size=8m" in hc["Tmpfs"]["/scratch"]
    await host.stop("hardened", grace_s=0)
    assert await host.events.wait_ended("hardened") == "canceled"
    assert (
        host.events.output("hardened") == b"65534\n65534\nrootfs-read-only\nscratch-full\nready\n"
    )

    spec = sh("echo ready; sleep 60", memory_mb=32, cpus=0.25, pids_limit=20, user="1000")
    await host.start("own", spec)
    await host.wait_output("own", b"ready\n")
    hc, config = inspect_job(docker_engine, "own")
    assert (hc["Memory"], hc["NanoCpus"], hc["PidsLimit"]) == (32 * 1024 * 1024, 250_000_000, 20)
    assert config["User"] == "1000" and hc["ReadonlyRootfs"] is True
    await host.stop("own", grace_s=0)


async def test_run_as_non_root(make_host: MakeHost, docker_engine: Engine) -> None:
    host = await make_host(config=SupervisorConfig(docker=DockerConfig(run_as_non_root=True)))
    # The image has no USER: it would run as root.
    assert await host.run("image-root", sh("id -u")) == "rejected"
    error = host.error("image-root")
    assert error is not None and error.kind == JobErrorKind.IMAGE_NOT_COMPATIBLE
    assert (
        "the image's user 'root'" in error.description and "uid other than 0" in error.description
    )
    assert containers_of(docker_engine, "image-root") == []
    for user in ("0", "root", "0:1000", "nobody"):  # a name could be uid 0 in the image
        with pytest.raises(JobError) as refused:  # at once, before the run is held
            await host.start(f"user-{user.replace(':', '-')}", sh("id -u", user=user))
        assert refused.value.kind == JobErrorKind.IMAGE_NOT_COMPATIBLE
        assert f"user {user!r}" in refused.value.description
    assert await host.run("uid-1000", sh("id -u", user="1000:1000")) == "succeeded"
    assert host.events.output("uid-1000") == b"1000\n"

    config = DockerConfig(run_as_non_root=True, user="65534")
    host = await make_host(config=SupervisorConfig(docker=config))
    assert await host.run("default-user", sh("id -u")) == "succeeded"
    assert host.events.output("default-user") == b"65534\n"


async def test_every_byte_value_both_streams(host: Host) -> None:
    octal = "".join(f"\\{b:03o}" for b in range(256))
    script = f"printf '{octal}'; printf '{octal}\\377 no newline' >&2"
    assert await host.run("bytes", sh(script)) == "succeeded"
    assert host.events.output("bytes", "stdout") == bytes(range(256))
    assert host.events.output("bytes", "stderr") == bytes(range(256)) + b"\xff no newline"


async def test_ten_megabytes_byte_exact(host: Host) -> None:
    """10 MB of random bytes on stdout and 1 MB on stderr (invalid UTF-8, long runs without
    newline, NULs); the container reports the sha256 of what it wrote first."""
    script = (
        "head -c 10485760 /dev/urandom > /scratch/out; head -c 1048576 /dev/urandom > "
        "/scratch/err; sha256sum /scratch/out /scratch/err >&2; cat /scratch/out; "
        "cat /scratch/err >&2"
    )
    lags: list[float] = []

    async def tick() -> None:  # the event loop must keep breathing meanwhile
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - before - 0.01)

    ticker = asyncio.create_task(tick())
    started = time.monotonic()
    try:
        assert await host.run("big", sh(script, read_only_rootfs=True)) == "succeeded"
    finally:
        ticker.cancel()
    took = time.monotonic() - started
    assert max(lags) < 0.25, max(lags)
    stdout = host.events.output("big", "stdout")
    stderr = host.events.output("big", "stderr")
    line1, line2, err_data = stderr.split(b"\n", 2)
    assert len(stdout) == 10 * 1024 * 1024 and len(err_data) == 1024 * 1024
    assert hashlib.sha256(stdout).hexdigest() == line1.split()[0].decode()
    assert hashlib.sha256(err_data).hexdigest() == line2.split()[0].decode()
    with pytest.raises(UnicodeDecodeError):
        stdout.decode()
    assert took < 30, took


async def test_out_of_memory(host: Host) -> None:
    phase = await host.run("oom", sh("tail /dev/zero", memory_mb=16))
    assert phase == "failed"
    ended = host.exit("oom")
    assert ended.reason == "oom"
    assert "out of memory" in (ended.message or "") and "16 MB" in (ended.message or "")
    assert ended.exit_code == 137 and ended.signal == 9


async def test_run_timeout(host: Host) -> None:
    started = time.monotonic()
    phase = await host.run("slow", sh("sleep 100"), timeout_s=1.0)
    assert phase == "timed_out"
    assert 1.0 <= time.monotonic() - started < 1.0 + SLACK_S
    ended = host.exit("slow")
    assert (ended.reason, ended.signal) == ("timeout", 9)
    assert "SIGKILL" in (ended.message or "")


async def test_stop_kills_a_program_that_ignores_sigterm(host: Host) -> None:
    await host.start("stubborn", sh("trap '' TERM; echo ready; sleep 100 & wait"))
    await host.wait_output("stubborn", b"ready")
    started = time.monotonic()
    await host.stop("stubborn", grace_s=1.0)
    assert await host.events.wait_ended("stubborn") == "canceled"
    took = time.monotonic() - started
    assert 1.0 <= took < 1.0 + SLACK_S, took
    ended = host.exit("stubborn")
    assert (ended.reason, ended.signal, ended.exit_code) == ("canceled", 9, 137)
    assert "still running 1 s after SIGTERM; killed with SIGKILL" in (ended.message or "")
    assert host.events.phases("stubborn")[-2:] == ["terminating", "canceled"]


async def test_stop_lets_a_program_that_handles_sigterm_exit(host: Host) -> None:
    await host.start("polite", sh("trap 'echo bye; exit 0' TERM; echo ready; sleep 100 & wait"))
    await host.wait_output("polite", b"ready")
    started = time.monotonic()
    await host.stop("polite", grace_s=30.0)
    assert await host.events.wait_ended("polite") == "canceled"
    assert time.monotonic() - started < SLACK_S
    ended = host.exit("polite")
    assert (ended.reason, ended.signal, ended.exit_code) == ("canceled", None, 0)
    assert "after SIGTERM" in (ended.message or "")
    assert host.events.output("polite") == b"ready\nbye\n"


# --- devices ------------------------------------------------------------------------------


def stand_in_device(path: Path) -> Path:
    """A character device node like /dev/null, standing in for a board's serial port."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return path


async def test_device_passthrough_is_exclusive(
    make_host: MakeHost, docker_engine: Engine, tmp_path: Path
) -> None:
    node = stand_in_device(tmp_path / "dev" / "ttyFAKE0")
    config = parse_config(
        f"""
        [[devices]]
        name = "nrf52840dk-0"
        path = "{node}"
        resource = "nrf52840dk"
        container_path = "/dev/ttyACM0"
        labels = {{ serial = "000683012345" }}
        """
    )
    host = await make_host(config=config)
    assert host.backend.devices.resource_counts() == {"nrf52840dk": 1}
    board = {"nrf52840dk": 1}
    await host.start(
        "flash-1",
        sh(
            'ls /dev/ttyACM0 && echo data > /dev/ttyACM0 && echo "$SWITCHBOARD_DEVICES"; '
            'echo "$SWITCHBOARD_DEVICE_NRF52840DK"; echo "$SWITCHBOARD_DEVICES_JSON"; '
            "echo ready; sleep 100 & wait"
        ),
        resources=board,
    )
    await host.wait_output("flash-1", b"ready")
    assert host.backend.devices.holder("nrf52840dk-0") == "flash-1#1"
    [container] = containers_of(docker_engine, "flash-1")
    devices = docker_engine.api.inspect_container(container["Id"])["HostConfig"]["Devices"]
    assert devices == [
        {"PathOnHost": str(node), "PathInContainer": "/dev/ttyACM0", "CgroupPermissions": "rwm"}
    ]

    # The only board is taken: a second job wanting it is refused, and gets no container.
    second = StartJob(job_id="flash-2", attempt=1, backend=sh("echo never"), resources=board)
    with pytest.raises(JobError) as refused:
        host.backend.admit(second)  # what BackendSupervisor.start_job may ask first
    assert refused.value.kind == JobErrorKind.MAX_CONCURRENT_JOBS
    with pytest.raises(JobError) as refused:  # refused before it is held
        await host.start("flash-2", sh("echo never"), resources=board)
    assert refused.value.kind == JobErrorKind.MAX_CONCURRENT_JOBS
    assert containers_of(docker_engine, "flash-2") == []
    assert host.backend.devices.holder("nrf52840dk-0") == "flash-1#1"

    # A class this host doesn't have can never run here.
    with pytest.raises(JobError) as refused:
        await host.start("jlink", sh("true"), resources={"jlink": 1})
    assert refused.value.kind == JobErrorKind.IMAGE_NOT_COMPATIBLE

    await host.stop("flash-1", grace_s=5)
    assert await host.events.wait_ended("flash-1") == "canceled"
    assert host.events.output("flash-1") == (
        b"/dev/ttyACM0\n/dev/ttyACM0\n/dev/ttyACM0\n"
        b'[{"name":"nrf52840dk-0","resource":"nrf52840dk","path":"/dev/ttyACM0",'
        b'"labels":{"serial":"000683012345"}}]\nready\n'
    )
    assert host.backend.devices.holder("nrf52840dk-0") is None
    # Free again: the next job gets it.
    assert await host.run("flash-3", sh("test -c /dev/ttyACM0"), resources=board) == "succeeded"
    assert host.backend.devices.holder("nrf52840dk-0") is None


async def test_a_run_gets_the_device_it_was_granted(
    make_host: MakeHost, docker_engine: Engine, tmp_path: Path
) -> None:
    """A switchboard that keeps the lab's inventory names the device (start_job.devices):
    the container gets that one, not the first free one; one that is unplugged is refused
    as busy, with no container."""
    nodes = [stand_in_device(tmp_path / "dev" / f"ttyFAKE{i}") for i in range(2)]
    config = parse_config(
        "\n".join(
            f'[[devices]]\nname = "board-{i}"\npath = "{node}"\nresource = "simboard"\n'
            for i, node in enumerate(nodes)
        )
    )
    host = await make_host(config=config)
    board = {"simboard": 1}
    script = sh('echo "$SWITCHBOARD_DEVICES_JSON"')
    assert await host.run("granted", script, resources=board, devices=["board-1"]) == "succeeded"
    granted = json.loads(host.events.output("granted"))
    assert [(d["name"], d["path"]) for d in granted] == [("board-1", str(nodes[1]))]
    nodes[0].unlink()  # board-0 unplugged
    with pytest.raises(JobError) as refused:
        await host.start("unplugged", sh("true"), resources=board, devices=["board-0"])
    assert refused.value.kind == JobErrorKind.MAX_CONCURRENT_JOBS
    assert "device 'board-0' granted: not present on the host" in refused.value.description
    assert containers_of(docker_engine, "unplugged") == []


async def test_a_pseudo_terminal_device_is_bind_mounted_and_answers(
    make_host: MakeHost, docker_engine: Engine, tmp_path: Path
) -> None:
    """A device whose node is a pty (a simulated board's console; a serial line bridged by
    socat) cannot be opened through a node the engine makes in the container (the kernel
    finds a pty through its own devpts: EIO): it is bind-mounted, and the job talks to the
    board through it."""
    with SimBoard(tmp_path / "board") as board:
        board.power("on")
        config = parse_config(
            f'[[devices]]\nname = "sim-0"\npath = "{board.tty}"\nresource = "simboard"\n'
            'container_path = "/dev/ttyACM0"\n'
        )
        host = await make_host(config=config)
        script = sh(
            'exec 3<>"$SWITCHBOARD_DEVICE_SIMBOARD"; printf "ping\\r" >&3; '
            'while read -t 5 -r line <&3; do case "$line" in *pong*) echo pong; exit 0;; '
            "esac; done; exit 1"
        )
        assert await host.run("ping", script, resources={"simboard": 1}) == "succeeded"
        assert host.events.output("ping") == b"pong\n"
        assert pseudo_terminals(config.devices) == {"sim-0": board.pts}


def test_device_allocation_rules(tmp_path: Path) -> None:
    plugged = {"a0", "a1", "b0"}
    devices = Devices(
        [
            DeviceConfig(name="a0", path="/dev/a0", resource="a"),
            DeviceConfig(name="a1", path="/dev/a1", resource="a"),
            DeviceConfig(name="b0", path="/dev/b0", resource="b"),
            DeviceConfig(name="b1", path="/dev/b1", resource="b"),  # unplugged
        ],
        present=lambda d: d.name in plugged,
    )
    assert devices.resource_counts() == {"a": 2, "b": 2}
    got = devices.allocate("run-1", {"a": 1, "b": 1})
    assert [d.name for d in got] == ["a0", "b0"]
    assert devices.allocate("run-1", {"a": 1, "b": 1}) == got  # idempotent
    with pytest.raises(JobError) as busy:
        devices.allocate("run-2", {"a": 1, "b": 1})  # b1 is unplugged: all or nothing
    assert busy.value.kind == JobErrorKind.MAX_CONCURRENT_JOBS
    assert "not present" in busy.value.description
    assert devices.holder("a1") is None
    with pytest.raises(JobError) as never:
        devices.allocate("run-2", {"a": 3})
    assert never.value.kind == JobErrorKind.IMAGE_NOT_COMPATIBLE
    devices.release("run-1")
    assert devices.allocate("run-2", {"a": 2}) == [
        DeviceConfig(name="a0", path="/dev/a0", resource="a"),
        DeviceConfig(name="a1", path="/dev/a1", resource="a"),
    ]
    assert [d.name for d in devices.reserve("run-3", ["a0", "b0", "gone"])] == ["b0"]


def test_config_file() -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "docker.md").read_text()
    example = docs.split("```toml\n", 1)[1].split("```", 1)[0]
    config = parse_config(example, "docs/docker.md")  # the documented example is valid
    assert config.docker.allowed_networks == ["none", "bridge"]
    assert Devices(config.devices).resource_counts() == {"nrf52840dk": 2}
    assert parse_config("").docker.allowed_networks == ["none"]
    defaults = parse_config("").docker
    assert (defaults.default_memory_mb, defaults.default_cpus) == (2048, 2.0)
    assert (defaults.user, defaults.run_as_non_root, defaults.read_only_rootfs) == (
        None,
        False,
        False,
    )
    lower_max = parse_config("[docker]\nmax_memory_mb = 1024\nmax_cpus = 1").docker
    assert (lower_max.default_memory_mb, lower_max.default_cpus) == (1024, 1.0)
    unlimited = parse_config("[docker]\ndefault_memory_mb = 0\ndefault_cpus = 0").docker
    assert (unlimited.default_memory_mb, unlimited.default_cpus) == (0, 0)
    for text, words in [
        ("[docker]\nallowed_capabilites = []", "unknown field `allowed_capabilites`"),
        ('[docker]\nallowed_capabilities = ["CAP_SYS_ADMIN"]', "unknown capabilities"),
        ('[docker]\nallowed_networks = ["macvlan"]', "$.docker.allowed_networks[0]"),
        ('[[devices]]\nname = "a"\npath = "dev/x"\nresource = "r"', "$.devices[0].path"),
        (
            '[[devices]]\nname = "a"\npath = "/dev/x"\nresource = "r"\n'
            '[[devices]]\nname = "a"\npath = "/dev/y"\nresource = "r"',
            "two devices are named 'a'",
        ),
        ("[docker\n", "not valid TOML"),
        ("[docker]\ndefault_memory_mb = 4096\nmax_memory_mb = 1024", "above max_memory_mb"),
        ("[docker]\ndefault_cpus = 0\nmax_cpus = 4", "default_cpus = 0 (no limit) is above"),
        ('[docker]\nrun_as_non_root = true\nuser = "root"', "numeric uid other than 0"),
        ('[docker]\nuser = "a b"', "$.docker.user"),
    ]:
        with pytest.raises(ConfigError) as bad:
            parse_config(text, "host.toml")
        assert str(bad.value).startswith("host.toml: ") and words in str(bad.value), bad.value


# --- images ---------------------------------------------------------------------------------


def saved_image(engine: Engine, tag: str) -> bytes:
    """`docker save` of the busybox image under a tag that only the tarball keeps."""
    return save_image(engine.api, tag)


async def test_image_from_an_artifact(
    make_host: MakeHost, docker_engine: Engine, tmp_path: Path
) -> None:
    artifacts = MemoryArtifacts()
    digest = artifacts.add(saved_image(docker_engine, "sb-from-artifact:v1"))
    host = await make_host(artifacts=artifacts, work_dir=tmp_path / "images")
    spec = DockerSpec(image_artifact=digest, image="sb-from-artifact:v1", command=["echo", "hi"])
    assert await host.run("art-1", spec) == "succeeded"
    assert host.events.output("art-1") == b"hi\n"
    assert host.stages("art-1") == [
        "accepted", "fetching", "loading", "creating", "starting"
    ]  # fmt: skip
    # Loaded under its digest, not under the tarball's own tag (which could shadow an image
    # the host has).
    hex_ = digest.removeprefix("sha256:")
    assert docker_engine.api.inspect_image(f"{ARTIFACT_REPOSITORY}:{hex_}-0")
    with pytest.raises(docker.errors.ImageNotFound):
        docker_engine.api.inspect_image("sb-from-artifact:v1")

    # Loaded once: the next run (first image of the tarball, no `image`) doesn't fetch.
    spec = DockerSpec(image_artifact=digest, command=["echo", "again"])
    assert await host.run("art-2", spec) == "succeeded"
    assert artifacts.fetches == 1 and host.backend.artifact_hits == 1
    # ... nor does a restarted supervisor: the digest -> image index is kept on disk.
    again = await make_host(artifacts=artifacts, work_dir=tmp_path / "images")
    assert await again.run("art-3", spec) == "succeeded"
    assert artifacts.fetches == 1 and again.backend.artifact_hits == 1

    missing_tag = DockerSpec(image_artifact=digest, image="other:v1", command=["true"])
    assert await host.run("art-4", missing_tag) == "rejected"
    error = host.error("art-4")
    assert error is not None and error.kind == JobErrorKind.IMAGE_NOT_FOUND
    assert "sb-from-artifact:v1" in error.description


@pytest.mark.parametrize(
    "compress", [gzip.compress, bz2.compress, lzma.compress], ids=["gzip", "bzip2", "xz"]
)
async def test_compressed_image_artifact(
    make_host: MakeHost, docker_engine: Engine, compress: Callable[[bytes], bytes]
) -> None:
    artifacts = MemoryArtifacts()
    digest = artifacts.add(compress(saved_image(docker_engine, "sb-compressed:v1")))
    host = await make_host(artifacts=artifacts)
    spec = DockerSpec(image_artifact=digest, image="sb-compressed:v1", command=["echo", "hi"])
    assert await host.run("compressed", spec) == "succeeded"
    assert host.events.output("compressed") == b"hi\n"
    docker_engine.api.remove_image(f"{ARTIFACT_REPOSITORY}:{digest.removeprefix('sha256:')}-0")


async def test_image_bomb_is_refused(
    make_host: MakeHost, docker_engine: Engine, tmp_path: Path
) -> None:
    """A gzipped image tarball of a few hundred KB that unpacks past the cap is refused,
    counted, and leaves no file behind; its loading never held it in memory (the e2e test
    measures that)."""
    bomb = tmp_path / "bomb.tar.gz"
    saved = saved_image(docker_engine, "sb-bomb:v1")
    await asyncio.to_thread(write_image_with_zeros, saved, 64 * 1024 * 1024, bomb, "sb-bomb:v1")
    artifacts = MemoryArtifacts()
    digest = artifacts.add(bomb.read_bytes())
    assert len(artifacts.blobs[digest]) < 2 * 1024 * 1024  # busybox, and the zeros
    work_dir = tmp_path / "images"
    config = SupervisorConfig(docker=DockerConfig(max_image_unpacked_mb=16))
    host = await make_host(artifacts=artifacts, config=config, work_dir=work_dir)
    exceeded = metrics.LIMITS_EXCEEDED.labels("image_unpacked")
    before = exceeded._value.get()
    assert await host.run("bomb", DockerSpec(image_artifact=digest)) == "rejected"
    error = host.error("bomb")
    assert error is not None and error.kind == JobErrorKind.IMAGE_INVALID
    assert "unpacks to more than 16 MB" in error.description, error
    assert exceeded._value.get() == before + 1
    assert list((work_dir / "docker-images" / "incoming").iterdir()) == []
    with pytest.raises(docker.errors.ImageNotFound):
        docker_engine.api.inspect_image("sb-bomb:v1")

    # Under a cap it fits, the same image loads and runs.
    config = SupervisorConfig(docker=DockerConfig(max_image_unpacked_mb=128))
    host = await make_host(artifacts=artifacts, config=config, work_dir=tmp_path / "roomy")
    fits = DockerSpec(image_artifact=digest, command=["wc", "-c", "/zeros"])
    assert await host.run("fits", fits) == "succeeded"
    assert host.events.output("fits") == b"67108864 /zeros\n"
    docker_engine.api.remove_image(f"{ARTIFACT_REPOSITORY}:{digest.removeprefix('sha256:')}-0")


async def test_files_of_a_load_cut_short_are_removed_at_start(
    make_host: MakeHost, tmp_path: Path
) -> None:
    incoming = tmp_path / "images" / "docker-images" / "incoming"
    dead = incoming / "999999999-0123456789abcdef"  # above any pid_max: never a process
    loading = incoming / f"{os.getpid()}-0123456789abcdef"  # a live process, loading now
    for directory in (dead, loading):
        directory.mkdir(parents=True)
        (directory / "artifact").write_bytes(b"half an image")
    await make_host(work_dir=tmp_path / "images")
    assert not dead.exists()
    assert (loading / "artifact").read_bytes() == b"half an image"


def tar_of(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return out.getvalue()


@pytest.mark.parametrize(
    "tarball",
    [
        b"this is not a tarball",
        tar_of({"hello.txt": b"no manifest here"}),
        tar_of({"manifest.json": b'[{"Config": "c.json", "Layers": ["l.tar"]}]', "c.json": b"{}"}),
    ],
    ids=["garbage", "no-manifest", "missing-layer"],
)
async def test_broken_tarball_is_image_invalid(make_host: MakeHost, tarball: bytes) -> None:
    artifacts = MemoryArtifacts()
    host = await make_host(artifacts=artifacts)
    spec = DockerSpec(image_artifact=artifacts.add(tarball), command=["true"])
    assert await host.run("broken", spec) == "rejected"
    error = host.error("broken")
    assert error is not None and error.kind == JobErrorKind.IMAGE_INVALID, error


async def test_missing_image_is_image_not_found(host: Host) -> None:
    assert await host.run("nope", DockerSpec(image="sb-no-such-image:1")) == "rejected"
    error = host.error("nope")
    assert error is not None and error.kind == JobErrorKind.IMAGE_NOT_FOUND
    assert "sb-no-such-image:1" in error.description


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (sh("true", network="bridge"), "network 'bridge'"),
        (sh("true", cap_add=["SYS_ADMIN"]), "capabilities SYS_ADMIN"),
        (sh("true", memory_mb=4096), "4096 MB"),
    ],
    ids=["network", "capability", "memory"],
)
async def test_what_the_config_does_not_allow_is_refused(
    make_host: MakeHost, docker_engine: Engine, spec: DockerSpec, words: str
) -> None:
    host = await make_host(config=SupervisorConfig(docker=DockerConfig(max_memory_mb=1024)))
    with pytest.raises(JobError) as refused:  # at once, before the run is held
        await host.start("greedy", spec)
    assert refused.value.kind == JobErrorKind.IMAGE_NOT_COMPATIBLE
    assert words in refused.value.description
    assert containers_of(docker_engine, "greedy") == []


# --- restarts -------------------------------------------------------------------------------


async def test_a_running_container_is_readopted(make_host: MakeHost, docker_engine: Engine) -> None:
    script = (
        "i=0; while [ $i -lt 30 ]; do echo line $i; echo err $i >&2; i=$((i+1)); sleep 0.05; "
        "done; printf '\\377end'; exit 3"
    )
    first = await make_host(supervisor_id="sb-restart")
    await first.start("long", sh(script))
    await first.wait_output("long", b"line 3\n")
    await first.crash()
    assert [c["State"] for c in containers_of(docker_engine, "long")] == ["running"]

    second = await make_host(supervisor_id="sb-restart")
    assert [(r.job_id, r.phase.value) for r in second.supervisor.held_runs()] == [
        ("long", "running")
    ]
    assert await second.events.wait_ended("long") == "failed"
    expected = b"".join(b"line %d\n" % i for i in range(30)) + b"\xffend"
    assert second.events.output("long") == expected  # again from byte 0, then live
    assert second.events.output("long", "stderr") == b"".join(b"err %d\n" % i for i in range(30))
    assert second.exit("long").exit_code == 3
    assert second.exit("long").message is None  # the engine's log matched what was sent
    assert containers_of(docker_engine, "long") == []


async def test_a_container_that_ended_while_down_is_reported(
    make_host: MakeHost, docker_engine: Engine
) -> None:
    first = await make_host(supervisor_id="sb-restart")
    await first.start("quick", sh("echo started; sleep 0.5; echo finished >&2; exit 7"))
    await first.wait_output("quick", b"started\n")
    await first.crash()
    for _ in range(600):
        if [c["State"] for c in containers_of(docker_engine, "quick")] == ["exited"]:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the container did not end")

    second = await make_host(supervisor_id="sb-restart")
    assert await second.events.wait_ended("quick") == "failed"
    assert second.events.output("quick") == b"started\n"
    assert second.events.output("quick", "stderr") == b"finished\n"
    assert second.exit("quick").exit_code == 7
    assert containers_of(docker_engine, "quick") == []


async def test_secret_parameters_are_only_in_the_environment(
    make_host: MakeHost, docker_engine: Engine, tmp_path: Path
) -> None:
    """`docker inspect` shows a secret parameter in Config.Env and nowhere else (labels
    included), the supervisor writes it to no file, and a restarted supervisor still
    re-adopts the container, whose program still has it."""
    secret = "s3cret-" + os.urandom(8).hex()
    params = {
        "TOKEN": Parameter(value=secret, secret=True),
        "PLAIN": Parameter(value="not-secret"),
    }
    script = 'echo ready; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo "$TOKEN $PLAIN"'
    first = await make_host(supervisor_id="sb-secret")
    await first.start("secret", sh(script), parameters=params)
    await first.wait_output("secret", b"ready\n")
    [container] = containers_of(docker_engine, "secret")
    info = docker_engine.api.inspect_container(container["Id"])
    assert f"TOKEN={secret}" in info["Config"]["Env"]
    assert "PLAIN=not-secret" in info["Config"]["Env"]
    assert '"PLAIN"' in info["Config"]["Labels"][LABEL_START]  # what recovery needs is kept
    info["Config"]["Env"] = []
    assert secret not in json.dumps(info)
    assert files_holding(tmp_path, secret.encode()) == []

    await first.crash()
    second = await make_host(supervisor_id="sb-secret")
    assert [r.job_id for r in second.supervisor.held_runs()] == ["secret"]
    go = docker_engine.api.exec_create(container["Id"], ["touch", "/tmp/go"])
    docker_engine.api.exec_start(go["Id"])
    assert await second.events.wait_ended("secret") == "succeeded"
    assert second.events.output("secret") == f"ready\n{secret} not-secret\n".encode()


async def test_other_supervisors_containers_are_left_alone(
    make_host: MakeHost, docker_engine: Engine
) -> None:
    first = await make_host(supervisor_id="sb-other")
    await first.start("theirs", sh("echo ready; sleep 100 & wait"))
    await first.wait_output("theirs", b"ready")
    mine = await make_host(supervisor_id="sb-mine")
    assert mine.supervisor.held_runs() == []
    assert len(containers_of(docker_engine, "theirs")) == 1
    await first.stop("theirs", grace_s=0)
    assert await first.events.wait_ended("theirs") == "canceled"


# --- the stream format ----------------------------------------------------------------------


def test_demux_splits_frames_across_reads() -> None:
    frames = b"".join(
        bytes([kind, 0, 0, 0]) + len(body).to_bytes(4, "big") + body
        for kind, body in [(1, b"out-1"), (2, b"\xff\xfe"), (1, b""), (1, b"out-2" * 1000)]
    )
    for size in (1, 3, 8, 9, 4096):
        pieces = [frames[i : i + size] for i in range(0, len(frames), size)]
        got: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        _demux(lambda _n, it=iter(pieces): next(it, b""), lambda s, d, got=got: got[s].extend(d))
        assert got == {"stdout": b"out-1" + b"out-2" * 1000, "stderr": b"\xff\xfe"}
