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

import msgspec

from protocol.state import TERMINAL
from switchboard.cli_output import add_connection_flags, client, show, table, when
from switchboard.cli_output import run as run_client
from switchboard.client import Client, ClientError, WaitTimeout
from switchboard.job_files import download, files_table, reports_parsed, tests_line


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


def _inputs(pairs: list[str]) -> dict[str, Any]:
    """`--input PATH=JOB:FILE` (the file job JOB kept at FILE, relative to its /out: a
    chain) or `--input PATH=sha256:...` (an uploaded artifact)."""
    inputs: dict[str, Any] = {}
    for pair in pairs:
        path, sep, value = pair.partition("=")
        source, colon, file = value.partition(":")
        if not sep or not colon or not path or not file:
            raise ClientError(f"--input wants PATH=JOB:FILE or PATH=sha256:DIGEST, got {pair!r}")
        inputs[path] = value if source == "sha256" else {"from_job": source, "path": file}
    return inputs


def _exit_code(code: int | None) -> str:
    return f"exit code {code}" if code is not None else "no exit code"


#: `job wait`'s exit status when the job had not ended within --timeout (2 is a refusal).
EXIT_WAIT_TIMEOUT = 3

#: While a followed job waits in the queue, say so this often (seconds).
PROGRESS_EVERY_S = 10.0


def _follow(api: Client, job_id: str, stream: str | None = None) -> dict[str, Any]:
    """Copy each run's stdout and stderr live to ours until the job ends (a job restarted by
    its policy has several runs); return the final job. While it waits for a run, say so on
    stderr now and then, and at once if no supervisor could ever take it."""
    followed = 0
    waiting_since = time.monotonic()
    told = ("", 0.0)
    while True:
        job = api.get(f"/api/v1/jobs/{job_id}")
        latest = job["runs"][-1]["attempt"] if job["runs"] else 0
        if latest > followed:
            if followed:
                print(f"--- run {latest} ---", file=sys.stderr, flush=True)
            _copy_run(api, job_id, latest, stream)
            followed = latest
            waiting_since = time.monotonic()
            continue
        if job["phase"] in TERMINAL:
            return job
        # queued (or waiting out a restart backoff)
        status = job.get("unschedulable") or job.get("reason") or ""
        waited = time.monotonic() - waiting_since
        if status != told[0] or waited - told[1] >= PROGRESS_EVERY_S:
            note = f": {status}" if status else ""
            print(f"job {job_id} {job['phase']} for {waited:.0f}s{note}", file=sys.stderr)
            told = (status, waited)
        time.sleep(0.2)


def _copy_run(api: Client, job_id: str, attempt: int, stream: str | None = None) -> None:
    """Copy a run's stdout and stderr to ours, or only `stream` (to our stdout)."""
    errors: list[Exception] = []

    def copy(stream: str, out: Any) -> None:
        try:
            for chunk in api.follow(job_id, stream, attempt):
                out.write(chunk)
                out.flush()
        except ClientError as exc:
            errors.append(exc)

    pairs = [("stdout", sys.stdout.buffer), ("stderr", sys.stderr.buffer)]
    if stream is not None:
        pairs = [(stream, sys.stdout.buffer)]
    threads = [threading.Thread(target=copy, args=pair, daemon=True) for pair in pairs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _submit(args: argparse.Namespace) -> int:
    api = client(args)
    spec = json.loads(Path(args.spec).read_bytes())
    if (args.param or args.input) and not isinstance(spec, dict):
        raise ClientError(f"{args.spec}: a job spec is a JSON object")
    if args.param:
        spec.setdefault("parameters", {}).update(_parameters(args.param))
    if args.input:
        spec.setdefault("inputs", {}).update(_inputs(args.input))
    submitted = api.submit(json.dumps(spec).encode())
    created = msgspec.to_builtins(submitted.created)
    job_id = submitted.id
    if args.json and not args.follow:
        print(json.dumps(created, indent=2))
    elif not args.follow:
        print(job_id)
    else:
        print(f"job {job_id} submitted", file=sys.stderr, flush=True)
    if created["phase"] == "rejected":
        print(f"job {job_id} rejected: {created.get('reason')}", file=sys.stderr)
        return 1
    if not args.follow:
        return 0
    job = _follow(api, job_id)
    code = job["exit_code"]
    ended = _exit_code(code)
    print(f"job {job_id} ended {job['phase']} ({ended})", file=sys.stderr)
    listing = reports_parsed(api, job_id)
    job = api.get(f"/api/v1/jobs/{job_id}")  # its tests, once its reports are parsed
    summary = tests_line(job.get("tests"))
    if summary is not None:
        print(summary, file=sys.stderr)
    if args.download is not None:
        count = download(api, job_id, listing, Path(args.download))
        print(f"{count} output file(s) written under {args.download}", file=sys.stderr)
    return exit_status(job)


def _list(args: argparse.Namespace) -> int:
    api = client(args)
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = api.get(
            "/api/v1/jobs",
            phase=args.phase,
            label=args.label,
            supervisor=args.supervisor,
            owner=args.owner,
            limit=min(args.limit - len(items), 500),
            cursor=cursor,
        )
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None or len(items) >= args.limit:
            break
    show(
        args,
        items,
        lambda jobs: table(
            [
                (
                    j["id"],
                    j["name"],
                    j["phase"],
                    j["priority"],
                    j["attempts"],
                    j["supervisor_id"],
                    j["exit_code"],
                    when(j["created_at"]),
                )
                for j in jobs
            ],
            ("ID", "NAME", "PHASE", "PRIO", "RUNS", "SUPERVISOR", "EXIT", "CREATED"),
        ),
    )
    return 0


def _show(args: argparse.Namespace) -> int:
    def human(job: dict[str, Any]) -> str:
        lines = [f"{job['id']}  {job['name']}  {job['phase']}  {_exit_code(job['exit_code'])}"]
        if job.get("owner"):
            lines.append(f"  submitted by token {job.get('owner_name')} ({job['owner']})")
        for note in (job.get("unschedulable"), job.get("reason")):
            if note:
                lines.append(f"  {note}")
        for run in job["runs"]:
            phases = " -> ".join(p["phase"] for p in run["phases"])
            lines.append(f"  run {run['attempt']} on {run['supervisor_id']}: {phases}")
        files = job.get("files")
        if files:
            lines.append(
                f"  files of run {files['attempt']}: {files['count']} kept,"
                f" {files['bytes']} bytes, {files['refused']} not kept"
            )
        summary = tests_line(job.get("tests"))
        if summary is not None:
            lines.append(f"  {summary}")
        return "\n".join(lines)

    show(args, client(args).get(f"/api/v1/jobs/{args.job_id}"), human)
    return 0


def _events(args: argparse.Namespace) -> int:
    events = client(args).get(f"/api/v1/jobs/{args.job_id}/events")
    show(
        args,
        events,
        lambda evs: table(
            [(when(e["at"]), e["kind"], e["actor"], e["message"]) for e in evs],
            ("AT", "KIND", "BY", "WHAT"),
        ),
    )
    return 0


def _logs(args: argparse.Namespace) -> int:
    api = client(args)
    if args.follow:
        return exit_status(_follow(api, args.job_id, args.stream))
    if args.stream is not None:
        sys.stdout.buffer.write(api.output(args.job_id, args.stream))
        return 0
    sys.stdout.buffer.write(api.output(args.job_id, "stdout"))
    sys.stderr.buffer.write(api.output(args.job_id, "stderr"))
    return 0


def _wait(args: argparse.Namespace) -> int:
    """Wait for the job to end without polling (the switchboard answers when it does), then
    exit with its exit code as `submit --follow` does; 3 if it had not ended in time."""
    try:
        job = client(args).wait(args.job_id, args.timeout, check=False)
    except WaitTimeout as exc:
        print(f"switchboard: {exc}", file=sys.stderr)
        return EXIT_WAIT_TIMEOUT
    shown = msgspec.to_builtins(job)
    if args.json:
        print(json.dumps(shown, indent=2))
    print(f"job {job.id} ended {job.phase.value} ({_exit_code(job.exit_code)})", file=sys.stderr)
    return exit_status(shown)


def _cancel(args: argparse.Namespace) -> int:
    result = msgspec.to_builtins(client(args).cancel(args.job_id))
    show(args, result, lambda r: f"job {r['id']}: {r['phase']}")
    return 0


def _files(args: argparse.Namespace) -> int:
    api = client(args)
    listing = api.get(f"/api/v1/jobs/{args.job_id}/files", attempt=args.attempt)
    show(args, listing, files_table)
    if args.download is not None:
        count = download(api, args.job_id, listing, Path(args.download))
        print(f"{count} file(s) written under {args.download}", file=sys.stderr)
    return 0


def _delete(args: argparse.Namespace) -> int:
    client(args).delete(f"/api/v1/jobs/{args.job_id}")
    print(f"job {args.job_id} deleted")
    return 0


def add_job_commands(commands: argparse._SubParsersAction) -> None:
    job = commands.add_parser("job", help="submit, follow and manage jobs")
    job_commands = job.add_subparsers(dest="job_command", required=True)

    def command(name: str, help: str, func: Any) -> argparse.ArgumentParser:
        parser = job_commands.add_parser(name, help=help)
        add_connection_flags(parser)
        parser.set_defaults(func=func, run=run_client)
        return parser

    submit = command("submit", "submit a job spec (JSON file)", _submit)
    submit.add_argument("spec")
    submit.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    submit.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="PATH=JOB:FILE",
        help="place at /in/PATH the file job JOB kept at FILE (the job waits for JOB to end),"
        " or PATH=sha256:DIGEST, an uploaded artifact; repeatable",
    )
    submit.add_argument(
        "--follow",
        action="store_true",
        help="stream the output live and exit with the job's exit code",
    )
    submit.add_argument(
        "--download",
        metavar="DIR",
        help="with --follow: once the job ends, write its output files under DIR",
    )

    listing = command("list", "list jobs, newest first", _list)
    listing.add_argument("--phase", action="append", default=[], help="repeatable")
    listing.add_argument(
        "--label", action="append", default=[], help="key=value, key!=value, key, !key"
    )
    listing.add_argument("--supervisor", help="jobs that had a run on this supervisor")
    listing.add_argument(
        "--owner", help="jobs submitted by this token (its id), or `me`: by the one used here"
    )
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")

    show_parser = command("show", "a job's phase and runs", _show)
    show_parser.add_argument("job_id")

    events = command("events", "a job's audit trail", _events)
    events.add_argument("job_id")

    logs = command("logs", "a job's output", _logs)
    logs.add_argument("job_id")
    logs.add_argument("--follow", action="store_true")
    logs.add_argument(
        "--stream",
        metavar="NAME",
        help="only this stream, to stdout: stdout, stderr, console, or console:DEVICE (the"
        " serial console of a device the run held); default: stdout and stderr",
    )

    files = command("files", "a job's output files (its latest run's), and download them", _files)
    files.add_argument("job_id")
    files.add_argument("--attempt", type=int, help="this run's files, not the latest's")
    files.add_argument(
        "--download",
        metavar="DIR",
        help="write every kept file under DIR, byte-exact, paths kept (never outside DIR)",
    )

    wait = command("wait", "wait for a job to end; exit with its exit code", _wait)
    wait.add_argument("job_id")
    wait.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="give up after this long (exit 3); default: wait as long as it takes",
    )

    cancel = command("cancel", "cancel a job", _cancel)
    cancel.add_argument("job_id")

    remove = command("delete", "delete an ended job and its output", _delete)
    remove.add_argument("job_id")
