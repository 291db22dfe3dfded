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
import gzip
import hashlib
import io
import json
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


def saved_image(api: docker.APIClient, tag: str, source: str = BUSYBOX_IMAGE) -> bytes:
    """`docker save` of `source` under a tag that only the tarball keeps."""
    repository, _, version = tag.partition(":")
    api.tag(source, repository, version or "latest")
    try:
        return b"".join(api.get_image(tag))
    finally:
        api.remove_image(tag)


class _ZeroReader:
    """`head` bytes, then zeros up to `size` bytes in all: a file object for tarfile."""

    def __init__(self, head: bytes, size: int) -> None:
        self._head = head
        self._left = size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        head, self._head = self._head[:n], self._head[n:]
        self._left -= n
        return head + bytes(n - len(head))


def write_image_with_zeros(saved: bytes, zeros: int, out: Path, tag: str) -> None:
    """Write to `out`, gzipped, the `docker save` tarball `saved` with one more layer: a
    file `/zeros` of `zeros` zero bytes. A valid image whose tarball is a few hundred KB
    compressed and `zeros` bytes bigger unpacked (a decompression bomb), built without
    ever holding the zeros in memory."""
    src = tarfile.open(fileobj=io.BytesIO(saved))
    manifest = json.loads(src.extractfile("manifest.json").read())  # type: ignore[union-attr]
    [item] = manifest
    config = json.loads(src.extractfile(item["Config"]).read())  # type: ignore[union-attr]
    file_info = tarfile.TarInfo("zeros")
    file_info.size = zeros
    file_info.mode = 0o644
    layer_head = file_info.tobuf(tarfile.GNU_FORMAT)
    # The layer is a tar too: its header, the zeros, padding and the end blocks (all zeros).
    layer_size = len(layer_head) + zeros + (-zeros % 512) + 1024
    diff_id = hashlib.sha256(layer_head)
    reader = _ZeroReader(b"", layer_size - len(layer_head))
    while chunk := reader.read(1 << 20):
        diff_id.update(chunk)
    config["rootfs"]["diff_ids"].append("sha256:" + diff_id.hexdigest())
    config.setdefault("history", []).append({"created_by": "zeros"})
    config_bytes = json.dumps(config).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    skipped = {"manifest.json", "repositories", item["Config"]}
    item.update(Config=config_name, Layers=[*item["Layers"], "zeros/layer.tar"], RepoTags=[tag])
    with gzip.open(out, "wb", compresslevel=6) as gz, tarfile.open(fileobj=gz, mode="w|") as tar:
        for member in src.getmembers():
            if member.name not in skipped:
                tar.addfile(member, src.extractfile(member) if member.isfile() else None)
        for name, body in ((config_name, config_bytes), ("manifest.json", json.dumps(manifest))):
            data = body if isinstance(body, bytes) else body.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        layer = tarfile.TarInfo("zeros/layer.tar")
        layer.size = layer_size
        tar.addfile(layer, _ZeroReader(layer_head, layer_size))  # type: ignore[arg-type]


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
