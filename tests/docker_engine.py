"""A private Docker engine for tests and benchmarks, with a busybox image made offline.

Each test session starts its own `dockerd` (own socket, data root and exec root under /tmp,
no bridge network, no iptables), so tests never touch a host's engine or its containers,
and stops it at the end. The image `sb-busybox:latest` is built from the host's static
busybox (no registry needed): a root filesystem holding bin/busybox, a symlink per applet,
/tmp, /etc/passwd and /etc/group, imported with `docker import`.

Needs root, `dockerd` and a static /bin/busybox: scripts/test.sh installs the Debian packages
docker.io and busybox-static. Without them the tests that use the engine FAIL (never skip):
a suite that silently skips its engine tests would pass on a broken CI machine.

Use in a test module::

    from tests.docker_engine import docker_engine_fixture  # noqa: F401  (registers it)

    def test_x(docker_engine): ...
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
import signal
import struct
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import pytest

BUSYBOX_IMAGE = "sb-busybox:latest"
BUSYBOX = Path("/bin/busybox")
SETUP_HINT = (
    "the Docker tests need root, dockerd and a static /bin/busybox; run scripts/test.sh "
    "(it installs docker.io and busybox-static, and the tests start their own engine)"
)
#: How long dockerd may take to answer after it was started.
START_TIMEOUT_S = 60.0

_PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
_GROUP = b"root:x:0:\nnogroup:x:65534:\n"


@dataclass
class Engine:
    """A running private dockerd."""

    host: str  # unix:///tmp/sbd-.../docker.sock
    root: Path
    exec_root: Path
    process: subprocess.Popen[bytes]
    api: docker.APIClient
    image: str = BUSYBOX_IMAGE

    def cli(self, *args: str) -> list[str]:
        """A `docker` command line for this engine."""
        return ["docker", "-H", self.host, *args]

    def log(self) -> str:
        path = self.root / "dockerd.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def missing() -> str | None:
    """What this machine lacks to run a private engine (None: nothing)."""
    if os.geteuid() != 0:
        return "not running as root (dockerd needs it)"
    if shutil.which("dockerd") is None:
        return "dockerd is not installed"
    if not BUSYBOX.is_file():
        return f"{BUSYBOX} is missing"
    if not _is_static(BUSYBOX):
        return f"{BUSYBOX} is dynamically linked (install busybox-static)"
    return None


def start_engine() -> Engine:
    """Start a private dockerd and import the busybox image. Raises RuntimeError."""
    problem = missing()
    if problem:
        raise RuntimeError(f"{problem}: {SETUP_HINT}")
    root = Path(tempfile.mkdtemp(prefix="sbd-", dir="/tmp"))
    # The exec root holds unix sockets, whose paths must stay short.
    exec_root = Path(tempfile.mkdtemp(prefix="sbx-", dir="/tmp"))
    sock = root / "docker.sock"
    host = f"unix://{sock}"
    namespace = f"sbtest{secrets.token_hex(4)}"
    log_file = open(root / "dockerd.log", "wb")
    process = subprocess.Popen(
        [
            "dockerd",
            "-H",
            host,
            "--data-root",
            str(root / "data"),
            "--exec-root",
            str(exec_root),
            "--pidfile",
            str(root / "docker.pid"),
            "--bridge=none",
            "--iptables=false",
            # Own containerd namespaces, in case dockerd finds a system containerd to share.
            "--containerd-namespace",
            namespace,
            "--containerd-plugins-namespace",
            f"{namespace}-plugins",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log_file.close()
    deadline = time.monotonic() + START_TIMEOUT_S
    api = None
    while api is None:
        if process.poll() is not None or time.monotonic() > deadline:
            text = (root / "dockerd.log").read_text(errors="replace")[-4000:]
            _stop(process)
            _cleanup(root, exec_root)
            raise RuntimeError(f"dockerd did not start ({SETUP_HINT}); its log:\n{text}")
        if sock.exists():
            with contextlib.suppress(docker.errors.DockerException):
                api = docker.APIClient(base_url=host, version="auto", timeout=60)
                api.ping()
        if api is None:
            time.sleep(0.05)
    engine = Engine(host=host, root=root, exec_root=exec_root, process=process, api=api)
    try:
        import_busybox(api)
    except BaseException:
        stop_engine(engine)
        raise
    return engine


def stop_engine(engine: Engine) -> None:
    """Stop the engine (it kills what still runs) and delete its files."""
    with contextlib.suppress(Exception):
        engine.api.close()
    _stop(engine.process)
    _cleanup(engine.root, engine.exec_root)


@contextlib.contextmanager
def private_engine() -> Iterator[Engine]:
    engine = start_engine()
    try:
        yield engine
    finally:
        stop_engine(engine)


def import_busybox(api: docker.APIClient, name: str = BUSYBOX_IMAGE) -> str:
    """Build the busybox root filesystem as a tarball in memory, `docker import` it as
    `name`; returns the image id."""
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], capture_output=True, check=True, text=True
    ).stdout.split()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for directory, mode in (("bin", 0o755), ("etc", 0o755), ("root", 0o700), ("tmp", 0o1777)):
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            info.mode = mode
            tar.addfile(info)
        tar.add(str(BUSYBOX), "bin/busybox")
        for path, body in (("etc/passwd", _PASSWD), ("etc/group", _GROUP)):
            info = tarfile.TarInfo(path)
            info.size = len(body)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(body))
        for applet in sorted(set(applets) - {"busybox"}):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            tar.addfile(info)
    repository, _, tag = name.partition(":")
    api.import_image_from_data(out.getvalue(), repository=repository, tag=tag or "latest")
    return api.inspect_image(name)["Id"]


def labeled_containers(api: docker.APIClient, label: str) -> list[dict]:
    """Every container (running or not) carrying `label` (a key, or key=value)."""
    return api.containers(all=True, filters={"label": label})


@pytest.fixture(scope="session", name="docker_engine")
def docker_engine_fixture() -> Iterator[Engine]:
    """The session's private engine. Fails (never skips) when the machine can't run one."""
    problem = missing()
    if problem:
        pytest.fail(f"{problem}: {SETUP_HINT}", pytrace=False)
    try:
        engine = start_engine()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield engine
    finally:
        stop_engine(engine)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _cleanup(*dirs: Path) -> None:
    # dockerd unmounts its overlays when it stops; lazily unmount anything left behind so
    # the deletion below can't reach into a mount.
    with contextlib.suppress(OSError):
        mounts = Path("/proc/self/mounts").read_text().splitlines()
        for line in reversed(mounts):
            point = line.split()[1].replace("\\040", " ")
            if any(point == str(d) or point.startswith(f"{d}/") for d in dirs):
                subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    for directory in dirs:
        shutil.rmtree(directory, ignore_errors=True)


def _is_static(path: Path) -> bool:
    """True if the ELF file at `path` has no program interpreter (is statically linked)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:  # a 64-bit ELF file, or not usable
                return False
            endian = "<" if head[5] == 1 else ">"
            phoff = struct.unpack_from(endian + "Q", head, 0x20)[0]
            phentsize, phnum = struct.unpack_from(endian + "HH", head, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    for i in range(phnum):
        (p_type,) = struct.unpack_from(endian + "I", table, i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True
