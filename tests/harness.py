"""Real processes for end-to-end tests: a switchboard server and supervisors, each started
as its own Python process on loopback, plus an HTTP client holding a token."""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from common.secret_files import write_secret_file
from protocol.state import TERMINAL

REPO = Path(__file__).resolve().parent.parent
#: Multiplies every wait in the tests (set SWITCHBOARD_TEST_TIME_SCALE on slow machines).
TIME_SCALE = float(os.environ.get("SWITCHBOARD_TEST_TIME_SCALE", "1"))


def scaled(seconds: float) -> float:
    return seconds * TIME_SCALE


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(*args: str, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run(  # type: ignore[call-overload]
        [sys.executable, *args], capture_output=True, env=_env(), check=check, **kwargs
    )


class Process:
    """A child process whose combined output is kept in a log file."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=_env(),
        )

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """Read stdout until a line matches `pattern` (stdout is copied to the log)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + scaled(timeout)
        regex = re.compile(pattern)
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        buffer = b""
        while time.monotonic() < deadline:
            if not sel.select(timeout=0.1):
                if self.proc.poll() is not None:
                    break
                continue
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                break
            self._log.write(chunk)
            buffer += chunk
            for line in buffer.decode(errors="replace").splitlines():
                if match := regex.search(line):
                    return match
        raise AssertionError(f"no line matching {pattern!r}; log:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(scaled(timeout))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class Switchboard:
    """A switchboard server process with its own data dir, and tokens for it. With
    `database` (a PostgreSQL URI) it keeps its records there (`serve --database`)."""

    def __init__(
        self,
        data_dir: Path,
        port: int = 0,
        extra_args: tuple[str, ...] = (),
        *,
        database: str | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.database = database
        self.extra_args = extra_args
        self.starts = 0
        self.port = port
        self._start()
        self.admin_token = self._create_token_offline("admin")

    def _start(self) -> None:
        self.starts += 1
        self.process = Process(
            [
                "-m",
                "switchboard",
                "serve",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
                *self._store_args(),
                *self.extra_args,
            ],
            self.data_dir.parent / f"{self.data_dir.name}.{self.starts}.log",
        )
        match = self.process.wait_for_line(r"listening on (https?://[\d.]+:(\d+))", timeout=30)
        self.url = match.group(1)
        self.port = int(match.group(2))
        ws_scheme = "wss" if self.url.startswith("https:") else "ws"
        self.ws_url = f"{ws_scheme}://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start it again after `stop`, on the same port and data dir."""
        self._start()

    def kill_and_restart(self) -> None:
        """SIGKILL the server, then start it again on the same port and data dir."""
        self.process.kill()
        self._start()

    def restart(self, extra_args: tuple[str, ...] | None = None) -> None:
        """Stop the server (SIGTERM), then start it again on the same port and data dir,
        with other flags if `extra_args` is given."""
        self.process.stop()
        if extra_args is not None:
            self.extra_args = extra_args
        self._start()

    def create_token(self, role: str, supervisor_id: str | None = None) -> str:
        """A new token; `supervisor_id` binds a supervisor token to that id (a host
        credential; unbound, a supervisor token is a registration token). Asked of the
        running server over REST (a process of the CLI costs half a second of CPU, and the
        suite makes hundreds), else written into its store by the CLI."""
        if self.process.proc.poll() is None and self.url.startswith("http:"):
            body = {"role": role, "supervisor_id": supervisor_id}
            with self.client() as client:
                made = client.post("/api/v1/tokens", json=body)
            made.raise_for_status()
            return made.json()["token"]
        return self._create_token_offline(role, supervisor_id)

    def _create_token_offline(self, role: str, supervisor_id: str | None = None) -> str:
        """A new token written into the store by `switchboard token create` (the first
        admin token has no other way in)."""
        bound = ("--supervisor", supervisor_id) if supervisor_id else ()
        done = run_cli(
            *("-m", "switchboard", "token", "create", "--role", role),
            *self._store_args() if self.database else ("--data-dir", str(self.data_dir)),
            *bound,
        )
        return done.stdout.decode().strip()

    def _store_args(self) -> tuple[str, ...]:
        return ("--database", self.database) if self.database else ()

    def client(
        self, token: str | None = None, *, verify: ssl.SSLContext | bool = True
    ) -> httpx.Client:
        """`verify`: httpx's, e.g. an SSLContext trusting the CA of a TLS switchboard."""
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token or self.admin_token}"},
            timeout=30.0,
            verify=verify,
        )

    def stop(self) -> None:
        self.process.stop()


def start_supervisor(
    switchboard: Switchboard,
    work: Path,
    *,
    name: str,
    backend: str = "wasm",
    max_jobs: int = 4,
    labels: dict[str, str] | None = None,
    url: str | None = None,
    urls: tuple[str, ...] = (),
    extra_args: tuple[str, ...] = (),
    token_file: Path | None = None,
) -> Process:
    """Start a supervisor process; `url` overrides the switchboard's (e.g. a proxy's), and
    `urls` gives several in its place (`--switchboard` each: replicas, in this order).
    Without `token_file` it gets a new registration token (in a file), so it enrols as
    `name` on its first start and connects with the credential it keeps in its work dir
    from then on."""
    if token_file is None:
        registration = switchboard.create_token("supervisor")
        token_file = token_file_for(work / f"{name}.registration", registration)
    addresses = urls or (url or switchboard.ws_url,)
    args = [
        "-m",
        "supervisor",
        "run",
        *(arg for address in addresses for arg in ("--switchboard", address)),
        "--token-file",
        str(token_file),
        "--name",
        name,
        "--backend",
        backend,
        "--max-jobs",
        str(max_jobs),
        "--work-dir",
        str(work / name),
    ]
    for key, value in (labels or {}).items():
        args += ["--label", f"{key}={value}"]
    return Process([*args, *extra_args], work / f"{name}.log")


def token_file_for(path: Path, token: str) -> Path:
    """`token` in a file only its owner may read, as `--token-file` wants it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_secret_file(path, token)
    return path


def wait_for(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Poll `check` until it returns something truthy; return that."""
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_connected(client: httpx.Client, supervisor_id: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        for sup in client.get("/api/v1/supervisors").json():
            if sup["id"] == supervisor_id and sup["connected"]:
                return
        time.sleep(0.05)
    raise AssertionError(f"supervisor {supervisor_id} did not connect")


def wait_running(client: httpx.Client, job_id: str, timeout: float = 30.0) -> None:
    """Poll until the job's phase is `running`."""
    deadline = time.monotonic() + scaled(timeout)
    while client.get(f"/api/v1/jobs/{job_id}").json()["phase"] != "running":
        assert time.monotonic() < deadline, f"job {job_id} did not start"
        time.sleep(0.05)


def wait_job(client: httpx.Client, job_id: str, timeout: float = 60.0) -> dict:
    """Poll until the job is in a terminal phase; return it."""
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["phase"] in TERMINAL:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def free_port() -> int:
    """A loopback port that was free a moment ago (for a process told to listen on it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
