"""`switchboard job ...`: submit, show, logs, cancel. For CI: `job submit spec.json --follow`
streams the job's output and exits with its exit code, so a pipeline step is one line."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from switchboard.client import ApiClient, ClientError

TERMINAL = {"succeeded", "failed", "timed_out", "canceled", "lost", "exhausted", "rejected"}


def exit_status(job: dict[str, Any]) -> int:
    """The process exit status for a finished job: its exit code when it has one, 0 only
    for success, and 1 for any other ending without one."""
    if job["phase"] == "succeeded":
        return 0
    code = job.get("exit_code")
    return code if isinstance(code, int) and code > 0 else 1


def _parameters(pairs: list[str]) -> dict[str, dict[str, Any]]:
    parameters = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise ClientError(f"--param wants NAME=VALUE, got {pair!r}")
        parameters[name] = {"value": value}
    return parameters


def _follow(api: ApiClient, job_id: str) -> dict[str, Any]:
    """Copy each run's stdout and stderr live to ours until the job ends (a job restarted by
    its policy has several runs); return the final job."""
    followed = 0
    while True:
        job = api.job(job_id)
        latest = job["runs"][-1]["attempt"] if job["runs"] else 0
        if latest > followed:
            if followed:
                print(f"--- run {latest} ---", file=sys.stderr, flush=True)
            _copy_run(api, job_id, latest)
            followed = latest
            continue
        if job["phase"] in TERMINAL:
            return job
        time.sleep(0.2)  # queued (or waiting out a restart backoff)


def _copy_run(api: ApiClient, job_id: str, attempt: int) -> None:
    errors: list[Exception] = []

    def copy(stream: str, out: Any) -> None:
        try:
            for chunk in api.follow(job_id, stream, attempt):
                out.write(chunk)
                out.flush()
        except ClientError as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=copy, args=("stdout", sys.stdout.buffer), daemon=True),
        threading.Thread(target=copy, args=("stderr", sys.stderr.buffer), daemon=True),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _submit(args: argparse.Namespace) -> int:
    api = ApiClient(args.url, args.token)
    spec = json.loads(Path(args.spec).read_bytes())
    if args.param:
        spec.setdefault("parameters", {}).update(_parameters(args.param))
    job_id = api.submit(json.dumps(spec).encode())
    print(
        job_id if args.quiet or not args.follow else f"job {job_id} submitted",
        file=sys.stdout if not args.follow else sys.stderr,
        flush=True,
    )
    if not args.follow:
        return 0
    job = _follow(api, job_id)
    print(f"job {job_id} ended {job['phase']} (exit code {job['exit_code']})", file=sys.stderr)
    return exit_status(job)


def _show(args: argparse.Namespace) -> int:
    job = ApiClient(args.url, args.token).job(args.job_id)
    if args.json:
        print(json.dumps(job, indent=2))
        return 0
    print(f"{job['id']}  {job['name']}  {job['phase']}  exit code {job['exit_code']}")
    for run in job["runs"]:
        phases = " -> ".join(p["phase"] for p in run["phases"])
        print(f"  run {run['attempt']} on {run['supervisor_id']}: {phases}")
    return 0


def _logs(args: argparse.Namespace) -> int:
    api = ApiClient(args.url, args.token)
    if args.follow:
        return exit_status(_follow(api, args.job_id))
    sys.stdout.buffer.write(api.output(args.job_id, "stdout"))
    sys.stderr.buffer.write(api.output(args.job_id, "stderr"))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    result = ApiClient(args.url, args.token).cancel(args.job_id)
    print(f"job {result['id']}: {result['phase']}")
    return 0


def add_job_commands(commands: argparse._SubParsersAction) -> None:
    job = commands.add_parser("job", help="submit and follow jobs (REST client)")
    job_commands = job.add_subparsers(dest="job_command", required=True)

    def common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--url", help="switchboard URL (default $SWITCHBOARD_URL)")
        parser.add_argument("--token", help="API token (default $SWITCHBOARD_TOKEN)")
        return parser

    submit = common(job_commands.add_parser("submit", help="submit a job spec (JSON file)"))
    submit.add_argument("spec")
    submit.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    submit.add_argument(
        "--follow",
        action="store_true",
        help="stream the output live and exit with the job's exit code",
    )
    submit.add_argument("--quiet", action="store_true", help="print only the job id")
    submit.set_defaults(func=_submit)

    show = common(job_commands.add_parser("show", help="a job's phase and runs"))
    show.add_argument("job_id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_show)

    logs = common(job_commands.add_parser("logs", help="a job's output"))
    logs.add_argument("job_id")
    logs.add_argument("--follow", action="store_true")
    logs.set_defaults(func=_logs)

    cancel = common(job_commands.add_parser("cancel", help="cancel a job"))
    cancel.add_argument("job_id")
    cancel.set_defaults(func=_cancel)


def run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except ClientError as exc:
        print(f"switchboard: {exc}", file=sys.stderr)
        return 2
    except (OSError, json.JSONDecodeError) as exc:
        print(f"switchboard: {exc}", file=sys.stderr)
        return 2
