"""The demo: a switchboard on SQLite, one Wasm supervisor, and a sample WASI job whose
state changes and output are printed as they happen. Uses only the public CLIs and REST
API, the way a lab would.

    python scripts/demo.py [--once] [--port 8765] [--data-dir demo-data]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import wasmtime

REPO = Path(__file__).resolve().parent.parent
TERMINAL = {"succeeded", "failed", "timed_out", "canceled", "lost", "exhausted", "rejected"}


def spawn(args: list[str], log: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], stderr=open(log, "wb"), cwd=REPO, **kwargs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="exit after the job ends")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--data-dir", default=str(REPO / "demo-data"))
    args = parser.parse_args()

    data = Path(args.data_dir).resolve()
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    children: list[subprocess.Popen] = []

    def cli(*argv: str) -> str:
        done = subprocess.run([sys.executable, *argv], capture_output=True, check=True, cwd=REPO)
        return done.stdout.decode().strip()

    def private(path: Path, text: str) -> Path:
        """`text` in a file only its owner may read (tokens never go on a command line)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(text + "\n")
        return path

    try:
        server = spawn(
            [
                "-m",
                "switchboard",
                "serve",
                "--port",
                str(args.port),
                "--data-dir",
                str(data / "switchboard"),
            ],
            data / "switchboard.log",
            stdout=subprocess.PIPE,
        )
        children.append(server)
        assert server.stdout is not None
        banner = server.stdout.readline().decode()
        if "listening on" not in banner:
            print((data / "switchboard.log").read_text(), file=sys.stderr)
            raise SystemExit("demo: the switchboard did not start (see above)")
        url = banner.split("listening on ", 1)[1].strip()
        port = url.rsplit(":", 1)[1]
        print(f"switchboard  {url}  (data: {data / 'switchboard'})")

        admin = cli(
            "-m",
            "switchboard",
            "token",
            "create",
            "--role",
            "admin",
            "--data-dir",
            str(data / "switchboard"),
        )
        # A registration token: the supervisor enrols with it, then keeps a credential of
        # its own in its work dir (docs/auth.md).
        registration = cli(
            "-m",
            "switchboard",
            "token",
            "create",
            "--role",
            "supervisor",
            "--name",
            "demo-fleet",
            "--data-dir",
            str(data / "switchboard"),
        )
        admin_file = private(data / "admin.token", admin)
        header_file = private(data / "admin.header", f"Authorization: Bearer {admin}")
        registration_file = private(data / "registration.token", registration)
        children.append(
            spawn(
                [
                    "-m",
                    "supervisor",
                    "run",
                    "--switchboard",
                    f"ws://127.0.0.1:{port}",
                    "--token-file",
                    str(registration_file),
                    "--name",
                    "demo-host",
                    "--backend",
                    "wasm",
                    "--work-dir",
                    str(data / "supervisor"),
                ],
                data / "supervisor.log",
            )
        )
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"})
        deadline = time.monotonic() + 30
        while not any(s["connected"] for s in api.get("/api/v1/supervisors").json()):
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: no supervisor connected; see {data / 'supervisor.log'}")
            time.sleep(0.05)
        print("supervisor   demo-host connected (backend: wasm)")

        module = bytes(wasmtime.wat2wasm((REPO / "examples" / "hello.wat").read_text()))
        digest = api.post("/api/v1/artifacts", content=module).json()["digest"]
        print(f"artifact     examples/hello.wat -> {digest}")
        spec = {"name": "hello", "backend": {"kind": "wasm", "module": digest}, "timeout_s": 60}
        job_id = api.post("/api/v1/jobs", json=spec).json()["id"]
        print(f"job          {job_id} submitted\n")

        job = follow(api, job_id)
        print(f"\njob {job_id} ended {job['phase']} with exit code {job['exit_code']}\n")
        print(f"API          {url}/api/v1   (admin token in {admin_file})")
        print(f"  this job   curl -H @{header_file} {url}/api/v1/jobs/{job_id}")
        print(
            f"  CLI        SWITCHBOARD_URL={url} SWITCHBOARD_TOKEN_FILE={admin_file}"
            f" .venv/bin/switchboard job show {job_id}"
        )
        print(f"OpenAPI      {url}/schema/openapi.json")
        print(f"Dashboard    {url}/#/jobs/{job_id}   (log in with the token in {admin_file})")
        if args.once:
            return job["exit_code"] if job["phase"] == "succeeded" else 1
        print("\nThe switchboard and supervisor keep running; Ctrl-C stops them.")
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    finally:
        for child in reversed(children):
            child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()


def follow(api: httpx.Client, job_id: str) -> dict:
    """Print phase changes and new output until the job ends."""
    seen_phases = 0
    offsets = {"stdout": 0, "stderr": 0}
    while True:
        job = api.get(f"/api/v1/jobs/{job_id}").json()
        phases = [p for run in job["runs"] for p in run["phases"]]
        for p in phases[seen_phases:]:
            stage = f" ({p['stage']})" if p.get("stage") else ""
            print(f"  [{p['phase']}{stage}]", flush=True)
        seen_phases = len(phases)
        for stream, out in (("stdout", sys.stdout), ("stderr", sys.stderr)):
            data = api.get(
                f"/api/v1/jobs/{job_id}/output", params={"stream": stream, "start": offsets[stream]}
            ).content
            if data:
                offsets[stream] += len(data)
                out.buffer.write(data)
                out.flush()
        if job["phase"] in TERMINAL:
            return job
        time.sleep(0.05)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
