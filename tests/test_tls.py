"""TLS end to end: a switchboard serving https and wss with a certificate from a private CA
(made here with the openssl command), supervisors that verify it or fail loudly, and REST
clients that trust the CA, trust the wrong one, or speak plain http to the TLS port."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import wasmtime

from protocol.exceptions import JobError, JobErrorKind
from supervisor.artifacts import HttpArtifactSource
from supervisor.cli import _tls_context, _ws_url
from tests.harness import (
    Process,
    Switchboard,
    run_cli,
    scaled,
    start_supervisor,
    wait_connected,
    wait_job,
)

pytestmark = pytest.mark.process

OPENSSL = shutil.which("openssl")
#: The supervisor's log line when it cannot verify the switchboard's certificate.
CANNOT_VERIFY = "TLS certificate could not be verified"

#: A WASI command that writes one line: a job whose module the supervisor must fetch.
HELLO_WAT = """
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello over tls\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 15))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""


def openssl(cwd: Path, *args: str) -> None:
    if OPENSSL is None:
        pytest.fail("the openssl command is needed to make test certificates")
    done = subprocess.run(
        [OPENSSL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"openssl {' '.join(args)}:\n{done.stderr}"


EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA certificate and its key (the commands docs/tls.md shows)."""
    directory.mkdir()
    openssl(
        directory,
        *("req", "-x509", "-new", *EC_KEY, "-days", "30"),
        *("-keyout", "ca.key", "-out", "ca.pem", "-subj", f"/CN={name}"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )
    return directory / "ca.pem", directory / "ca.key"


def make_server_cert(directory: Path, ca_cert: Path, ca_key: Path) -> tuple[Path, Path]:
    """A server certificate for IP 127.0.0.1, signed by the CA."""
    (directory / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    openssl(
        directory,
        *("req", "-new", *EC_KEY, "-keyout", "server.key", "-out", "server.csr"),
        *("-subj", "/CN=127.0.0.1"),
    )
    openssl(
        directory,
        *("x509", "-req", "-in", "server.csr", "-CA", str(ca_cert), "-CAkey", str(ca_key)),
        *("-CAcreateserial", "-days", "30", "-extfile", "server.ext", "-out", "server.pem"),
    )
    return directory / "server.pem", directory / "server.key"


@dataclass(frozen=True)
class Pki:
    ca: Path
    wrong_ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca, ca_key = make_ca(root / "ca", "Switchboard test CA")
    wrong_ca, _ = make_ca(root / "wrong-ca", "Some other CA")
    cert, key = make_server_cert(root, ca, ca_key)
    return Pki(ca, wrong_ca, cert, key)


@pytest.fixture(scope="module")
def tls_switchboard(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Switchboard]:
    server = Switchboard(
        tmp_path_factory.mktemp("tls-switchboard") / "data",
        extra_args=("--tls-cert", str(pki.cert), "--tls-key", str(pki.key)),
    )
    yield server
    server.stop()


def trusting(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


@pytest.fixture
def client(tls_switchboard: Switchboard, pki: Pki) -> Iterator[httpx.Client]:
    with tls_switchboard.client(verify=trusting(pki.ca)) as client:
        yield client


@pytest.fixture
def no_ambient_trust(monkeypatch: pytest.MonkeyPatch) -> None:
    """Child processes get no CA from the environment: only what a test passes."""
    for name in ("SUPERVISOR_CA_FILE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)


def submit_noop(client: httpx.Client, output: str) -> str:
    response = client.post(
        "/api/v1/jobs", json={"name": "tls", "backend": {"kind": "noop", "output": output}}
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def wait_for_log(process: Process, text: str, timeout: float = 20.0) -> str:
    """The first line of the process's log containing `text`."""
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        for line in process.log().splitlines():
            if text in line:
                return line
        assert process.proc.poll() is None, f"exited early; log:\n{process.log()}"
        time.sleep(0.1)
    raise AssertionError(f"no log line with {text!r}; log:\n{process.log()}")


def assert_never_connects(client: httpx.Client, process: Process, name: str) -> str:
    """The supervisor logs the certificate problem, keeps retrying (it stays up), and the
    switchboard never sees it connected. Returns the log line."""
    started = time.monotonic()
    line = wait_for_log(process, CANNOT_VERIFY)
    time.sleep(max(0.0, started + scaled(3.0) - time.monotonic()))
    connected = [s["id"] for s in client.get("/api/v1/supervisors").json() if s["connected"]]
    assert name not in connected
    assert process.proc.poll() is None, "the supervisor should keep retrying, not exit"
    assert "reconnecting in" in wait_for_log(process, CANNOT_VERIFY)
    return line


def test_rest_over_https_verifies_with_the_ca(
    tls_switchboard: Switchboard, client: httpx.Client, pki: Pki
):
    assert tls_switchboard.url.startswith("https://127.0.0.1:")
    assert tls_switchboard.ws_url.startswith("wss://127.0.0.1:")
    health = client.get("/api/v1/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    supervisors = client.get("/api/v1/supervisors")  # authenticated
    assert supervisors.status_code == 200 and isinstance(supervisors.json(), list)
    anonymous = httpx.get(
        f"{tls_switchboard.url}/api/v1/supervisors", verify=trusting(pki.ca), timeout=10
    )
    assert anonymous.status_code == 401


def test_plain_http_to_the_tls_port_fails(tls_switchboard: Switchboard):
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{tls_switchboard.port}/api/v1/health", timeout=10)


def test_a_huge_header_over_tls_gets_431(tls_switchboard: Switchboard, pki: Pki):
    """The HTTP limits hold on TLS too (where a refused connection can't be half-closed)."""
    import socket
    import threading

    raw = socket.create_connection(("127.0.0.1", tls_switchboard.port), timeout=scaled(10))
    sock = trusting(pki.ca).wrap_socket(raw, server_hostname="127.0.0.1")
    # Past the 64 KiB limit, but small enough that the client has sent it all well within
    # the 2 s the server keeps reading after refusing: over TLS it can't half-close, and
    # closing on unread input would reset the connection before the answer is read.
    head = b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (96 * 1024)

    def send() -> None:
        try:
            sock.sendall(head)
        except OSError:
            pass  # the server closed: it took all it needed

    sender = threading.Thread(target=send)
    sender.start()
    response = b""
    try:
        while chunk := sock.recv(65536):
            response += chunk
    except (OSError, ssl.SSLError):
        pass
    sender.join()
    sock.close()
    assert response.startswith(b"HTTP/1.1 431 "), response[:200]


def test_clients_with_the_wrong_ca_are_refused(tls_switchboard: Switchboard, pki: Pki):
    for verify in (trusting(pki.wrong_ca), True):  # another CA; the system's CAs
        with tls_switchboard.client(verify=verify) as wrong:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                wrong.get("/api/v1/health")


def test_supervisor_with_the_ca_runs_a_job_over_wss(
    tls_switchboard: Switchboard, client: httpx.Client, pki: Pki, work_dir: Path, no_ambient_trust
):
    process = start_supervisor(
        tls_switchboard,
        work_dir,
        name="tls-noop",
        backend="noop",
        extra_args=("--ca-file", str(pki.ca)),
    )
    try:
        wait_connected(client, "tls-noop")
        job = wait_job(client, submit_noop(client, "over wss\n"))
        assert job["phase"] == "succeeded", job
        assert job["runs"][0]["supervisor_id"] == "tls-noop"
        assert client.get(f"/api/v1/jobs/{job['id']}/output").content == b"over wss\n"
        assert f"against {pki.ca}" in process.log()
    finally:
        process.stop()


def test_supervisor_fetches_artifacts_over_https_with_the_ca(
    tls_switchboard: Switchboard, client: httpx.Client, pki: Pki, work_dir: Path, no_ambient_trust
):
    """A Wasm job: the supervisor fetches the module over https, verified with --ca-file,
    here given as https:// (the URL the switchboard prints) rather than wss://."""
    response = client.post("/api/v1/artifacts", content=bytes(wasmtime.wat2wasm(HELLO_WAT)))
    assert response.status_code == 201, response.text
    digest = response.json()["digest"]
    process = start_supervisor(
        tls_switchboard,
        work_dir,
        name="tls-wasm",
        backend="wasm",
        url=tls_switchboard.url,
        extra_args=("--ca-file", str(pki.ca)),
    )
    try:
        wait_connected(client, "tls-wasm")
        spec = {"name": "tls-wasm", "backend": {"kind": "wasm", "module": digest}}
        response = client.post("/api/v1/jobs", json=spec)
        assert response.status_code == 201, response.text
        job = wait_job(client, response.json()["id"], timeout=60)
        assert job["phase"] == "succeeded", job
        output = client.get(f"/api/v1/jobs/{job['id']}/output")
        assert output.content == b"hello over tls\n"
    finally:
        process.stop()


@pytest.fixture
def artifact(client: httpx.Client) -> str:
    response = client.post("/api/v1/artifacts", content=b"some bytes")
    assert response.status_code == 201, response.text
    return response.json()["digest"]


async def test_artifact_fetch_verifies_with_the_ca_file(
    tls_switchboard: Switchboard, pki: Pki, artifact: str
):
    digest = artifact
    token = tls_switchboard.create_token("supervisor", supervisor_id="tls-fetcher")
    for ca, works in ((pki.ca, True), (pki.wrong_ca, False)):
        source = HttpArtifactSource(tls_switchboard.url, token, verify_tls=_tls_context(str(ca)))
        try:
            if works:
                assert await source.fetch(digest) == b"some bytes"
            else:
                with pytest.raises(JobError, match="CERTIFICATE_VERIFY_FAILED") as caught:
                    await source.fetch(digest)
                assert caught.value.kind is JobErrorKind.IMAGE_NOT_FOUND
        finally:
            await source.close()


def test_supervisor_without_the_ca_never_connects(
    tls_switchboard: Switchboard, client: httpx.Client, work_dir: Path, no_ambient_trust
):
    process = start_supervisor(tls_switchboard, work_dir, name="tls-no-ca", backend="noop")
    try:
        line = assert_never_connects(client, process, "tls-no-ca")
        assert "--ca-file" in line, line
        assert "the system's CAs" in process.log()
    finally:
        process.stop()


def test_supervisor_with_the_wrong_ca_from_the_environment_never_connects(
    tls_switchboard: Switchboard,
    client: httpx.Client,
    pki: Pki,
    work_dir: Path,
    no_ambient_trust,
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setenv("SUPERVISOR_CA_FILE", str(pki.wrong_ca))
    process = start_supervisor(tls_switchboard, work_dir, name="tls-wrong-ca", backend="noop")
    try:
        assert_never_connects(client, process, "tls-wrong-ca")
        assert f"against {pki.wrong_ca}" in process.log()
    finally:
        process.stop()


def test_an_unreadable_ca_file_stops_the_supervisor_at_once(
    tls_switchboard: Switchboard, tmp_path: Path
):
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    for ca_file in (tmp_path / "missing.pem", not_pem):
        done = run_cli(
            *("-m", "supervisor", "run", "--switchboard", tls_switchboard.ws_url),
            *("--token", "unused", "--backend", "noop", "--work-dir", str(tmp_path / "w")),
            *("--ca-file", str(ca_file)),
            check=False,
            timeout=60,
        )
        assert done.returncode != 0
        assert f"cannot load --ca-file {ca_file}" in done.stderr.decode(), done.stderr


def test_a_certificate_the_switchboard_cannot_use_stops_it_at_once(pki: Pki, tmp_path: Path):
    wrong_key = pki.wrong_ca.with_name("ca.key")  # not the certificate's key
    for tls_args, expected in (
        (("--tls-cert", str(pki.cert), "--tls-key", str(wrong_key)), f"with key {wrong_key}"),
        (("--tls-cert", str(tmp_path / "missing.pem")), "missing.pem"),
        (("--tls-key", str(pki.key)), "--tls-key needs --tls-cert"),
    ):
        done = run_cli(
            *("-m", "switchboard", "serve", "--port", "0", "--data-dir", str(tmp_path / "d")),
            *tls_args,
            check=False,
            timeout=60,
        )
        assert done.returncode != 0
        assert expected in done.stderr.decode(), done.stderr
        assert b"Traceback" not in done.stderr


def test_urls_map_to_the_websocket_endpoint():
    assert _ws_url("wss://example.org:8443") == "wss://example.org:8443/ws/supervisor"
    assert _ws_url("https://example.org:8443") == "wss://example.org:8443/ws/supervisor"
    assert _ws_url("http://127.0.0.1:8765") == "ws://127.0.0.1:8765/ws/supervisor"
    assert _ws_url("https://h:1/ws/supervisor") == "wss://h:1/ws/supervisor"
    assert _ws_url("ws://h:1/custom") == "ws://h:1/custom"
