"""The `supervisor` command: `run` connects to a switchboard, `run-local` runs one spec."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import socket
import ssl
import sys
import uuid
from pathlib import Path
from typing import Any

import msgspec
import uvloop

from common import logfmt
from common.secret_files import SecretFileError, read_secret_file
from connector import metrics as connector_metrics
from connector.credentials import HostCredentials, NoCredential
from connector.local import LocalConnector
from protocol import codec, limits
from protocol.messages import CollectLimits
from protocol.spec import BACKEND_KINDS, JobSpec
from supervisor import metrics
from supervisor.artifacts import (
    ArtifactSource,
    FileArtifactSource,
    HttpArtifactSource,
    switchboard_client,
)
from supervisor.backends.base import Backend
from supervisor.backends.devices import Devices, inventory
from supervisor.config import (
    ConfigError,
    InputSettings,
    LinkSettings,
    OutputSettings,
    SupervisorSettings,
    WasmSettings,
    default_of,
    load_config,
)
from supervisor.console import SPOOL_DIR, Consoles
from supervisor.inputs import InputCache
from supervisor.jobs import BackendSupervisor
from supervisor.outputs import DirectorySink, ListingSink, OutputSink, SwitchboardSink
from supervisor.power import PowerSwitches

log = logging.getLogger("supervisor")

#: Where, under the work dir, a supervisor keeps the credential it enrolled with.
CREDENTIALS_DIR = "credentials"


def make_backend(kind: str, artifacts: ArtifactSource, settings: SupervisorSettings) -> Backend:
    # Imported here, not above: not a cycle, but a host runs one backend and each pulls in
    # a heavy library (wasmtime, the Docker SDK) the others don't need.
    if kind == "wasm":
        from supervisor.backends.wasm import WasmBackend

        wasm = settings.wasm
        return WasmBackend(
            artifacts,
            cache_dir=wasm.cache_dir,
            cache_max_bytes=wasm.cache_max_mb * 1024 * 1024,
            memory_limit_mb=wasm.memory_limit_mb,
            scratch_limit_mb=wasm.scratch_mb,
        )
    if kind == "docker":
        from supervisor.backends.docker import DockerBackend

        return DockerBackend(
            artifacts,
            supervisor_id=settings.supervisor_id,
            docker_host=settings.docker_host,
            config=settings.config,
            work_dir=settings.work_dir,
        )
    if kind == "noop":
        from supervisor.backends.noop import NoopBackend

        return NoopBackend()
    raise SystemExit(f"supervisor: the {kind} backend is not available in this build")


def _labels(pairs: list[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"supervisor: --label wants KEY=VALUE, got {pair!r}")
        labels[key] = value
    return labels


def _http_base(ws_url: str) -> str:
    """The switchboard's HTTP base URL from its WebSocket URL."""
    scheme, sep, rest = ws_url.partition("://")
    host = rest.split("/", 1)[0]
    return {"ws": "http", "wss": "https"}.get(scheme, scheme) + sep + host


def _ws_url(value: str) -> str:
    """Accept ws://HOST:PORT (or the http:// / https:// the switchboard prints) and fill in
    the protocol path."""
    scheme, _, rest = value.partition("://")
    scheme = {"http": "ws", "https": "wss"}.get(scheme, scheme)
    return f"{scheme}://{rest}" if "/" in rest else f"{scheme}://{rest}/ws/supervisor"


def _switchboard_urls(given: list[str] | None) -> list[str]:
    """--switchboard URLs (or $SWITCHBOARD_WS_URL's, comma-separated), protocol path filled
    in, each once, in the order given."""
    if not given:
        given = [u for u in os.environ.get("SWITCHBOARD_WS_URL", "").split(",") if u.strip()]
    if not given:
        raise SystemExit("supervisor: give the switchboard's URL: --switchboard ws://HOST:PORT")
    urls = list(dict.fromkeys(_ws_url(u.strip()) for u in given))
    schemes = {u.partition("://")[0] for u in urls}
    if len(schemes) > 1:
        raise SystemExit(
            f"supervisor: the --switchboard URLs mix {' and '.join(sorted(schemes))}:"
            " replicas of one switchboard are all TLS or none"
        )
    return urls


def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    """A client context that verifies the switchboard's certificate and host name against
    `ca_file` (PEM), or against the system's CAs without one. Never unverified."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:  # a missing file, or one with no PEM certificate
        raise SystemExit(f"supervisor: cannot load --ca-file {ca_file}: {exc}") from None


def _configured_token(args: argparse.Namespace) -> str | None:
    """The token from --token-file, --token, $SUPERVISOR_TOKEN_FILE or $SUPERVISOR_TOKEN."""
    try:
        if args.token_file:
            return read_secret_file(args.token_file)
        if args.token:
            log.warning(
                "--token puts the token on the command line, where every user of this host"
                " can read it (ps): use --token-file or $SUPERVISOR_TOKEN"
            )
            return str(args.token)
        if os.environ.get("SUPERVISOR_TOKEN_FILE"):
            return read_secret_file(os.environ["SUPERVISOR_TOKEN_FILE"])
    except SecretFileError as exc:
        raise SystemExit(f"supervisor: {exc}") from None
    return os.environ.get("SUPERVISOR_TOKEN") or None


def _credentials(args: argparse.Namespace, settings: SupervisorSettings) -> HostCredentials:
    """The token to enrol with and the credential kept in WORK_DIR/credentials."""
    token = _configured_token(args)
    try:
        credentials = HostCredentials(
            settings.supervisor_id, token, settings.work_dir / CREDENTIALS_DIR
        )
        kept = credentials.kept()
    except NoCredential as exc:
        raise SystemExit(f"supervisor: {exc}") from None
    if token is None and kept is None:
        raise SystemExit(
            "supervisor: no token: give a supervisor token with --token-file FILE (mode 600),"
            " $SUPERVISOR_TOKEN_FILE or $SUPERVISOR_TOKEN"
        )
    return credentials


async def _run(settings: SupervisorSettings, credentials: HostCredentials) -> int:
    # Imported here, not above: not a cycle, but `websockets` takes a fifth of a second to
    # import, which every `run-local` would pay for nothing.
    from connector.websocket import ConnectorFatalError, WebSocketConnector

    link = settings.link
    assert link is not None, "supervisor run has a switchboard to reach"
    url = link.urls[0]
    tls: ssl.SSLContext | None = None
    artifacts_tls: ssl.SSLContext | None = None
    uploads_tls: ssl.SSLContext | None = None
    if url.startswith("wss://"):
        # One context each: httpx sets its own ALPN protocols on the context it is given.
        tls, artifacts_tls = _tls_context(link.ca_file), _tls_context(link.ca_file)
        uploads_tls = _tls_context(link.ca_file)
        log.info(
            "verifying the switchboard's certificate against %s",
            link.ca_file or "the system's CAs",
        )
    elif link.ca_file:
        log.warning("--ca-file %s is unused: %s is not TLS (wss://)", link.ca_file, url)
    if settings.metrics_port is not None:
        try:
            port = metrics.serve(
                settings.metrics_port, settings.metrics_host, also=[connector_metrics.REGISTRY]
            )
        except OSError as exc:
            where = f"{settings.metrics_host}:{settings.metrics_port}"
            raise SystemExit(f"supervisor: cannot serve metrics on {where}: {exc}") from None
        log.info("metrics on http://%s:%d/metrics", settings.metrics_host, port)

    def http_base() -> str:
        # The REST calls (artifacts, uploads) go to the replica connected to now.
        return _http_base(connector.url)

    artifacts = HttpArtifactSource(
        http_base if len(link.urls) > 1 else _http_base(url),
        lambda: credentials.current,
        verify_tls=artifacts_tls if artifacts_tls else True,
    )
    # Output files go up over HTTP with the same credential, never over the WebSocket:
    # no run's console output waits behind another's upload.
    uploads = SwitchboardSink(
        switchboard_client(
            http_base if len(link.urls) > 1 else _http_base(url),
            lambda: credentials.current,
            verify_tls=uploads_tls if uploads_tls else True,
        ),
        _http_base(url),
    )
    backend = make_backend(settings.backend, artifacts, settings)
    supervisor = BackendSupervisor(
        backend,
        max_jobs=settings.max_jobs,
        labels=settings.labels,
        # Its devices count as resources whatever the backend, as the protocol says.
        resources={
            **Devices(settings.config.devices).resource_counts(),
            **backend.resource_counts(),
        },
        devices=inventory(settings.config.devices),
        work_dir=settings.work_dir,
        outputs=uploads,
        outputs_limits=_output_limits(settings),
        power=PowerSwitches(settings.config.devices),
        consoles=Consoles(settings.config.devices, settings.work_dir / SPOOL_DIR),
        **_inputs(artifacts, settings),
    )
    connector = WebSocketConnector(
        supervisor,
        link.urls,
        credentials,
        supervisor_id=settings.supervisor_id,
        name=settings.name,
        max_backlog_bytes=link.max_backlog_mb * 1024 * 1024,
        ssl_context=tls,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, connector.stop)
    try:
        return await connector.run()
    except ConnectorFatalError as exc:
        print(f"supervisor: the switchboard refused this supervisor: {exc}", file=sys.stderr)
        return 2
    finally:
        await supervisor.shutdown(grace_s=10.0)
        await artifacts.close()
        await uploads.close()


async def _run_local(
    settings: SupervisorSettings, spec: JobSpec, artifacts: list[Path], outputs_dir: Path | None
) -> int:
    source = FileArtifactSource(artifacts)
    # No switchboard to upload to: kept files are copied to --outputs-dir, or only listed.
    sink: OutputSink = DirectorySink(outputs_dir) if outputs_dir else ListingSink()
    supervisor = BackendSupervisor(
        make_backend(spec.backend.kind, source, settings),
        work_dir=settings.work_dir,
        outputs=sink,
        outputs_limits=_output_limits(settings),
        **_inputs(source, settings),
    )
    return await LocalConnector(supervisor, spec).run()


def _inputs(artifacts: ArtifactSource, settings: SupervisorSettings) -> dict[str, Any]:
    """BackendSupervisor's arguments for runs' inputs."""
    mb = 1024 * 1024
    root = settings.work_dir / "input-cache"
    return {
        "inputs": InputCache(artifacts, root, settings.inputs.cache_max_mb * mb),
        "inputs_max_bytes": settings.inputs.max_mb * mb,
    }


def _output_limits(settings: SupervisorSettings) -> CollectLimits:
    """This supervisor's own caps on what a run keeps."""
    mb = 1024 * 1024
    own = settings.outputs
    return CollectLimits(
        max_files=own.max_files,
        max_file_bytes=own.max_file_mb * mb,
        max_total_bytes=own.max_total_mb * mb,
    )


def build_settings(args: argparse.Namespace) -> SupervisorSettings:
    """The process's settings from its parsed flags (their defaults read the environment)
    and the config file they name. Exits with a message on a bad value."""
    try:
        config = load_config(Path(args.config) if args.config else None)
    except ConfigError as exc:
        raise SystemExit(f"supervisor: {exc}") from None
    work_dir = Path(args.work_dir)
    wasm = WasmSettings(
        cache_dir=Path(args.wasm_cache_dir) if args.wasm_cache_dir else work_dir / "wasm-cache",
        cache_max_mb=args.wasm_cache_max_mb,
        memory_limit_mb=args.wasm_memory_limit_mb,
        scratch_mb=args.wasm_scratch_mb,
    )
    common = {
        "work_dir": work_dir,
        "wasm": wasm,
        "inputs": InputSettings(max_mb=args.inputs_max_mb, cache_max_mb=args.input_cache_max_mb),
        "outputs": _output_settings(args),
        "config": config,
        "docker_host": args.docker_host,
        "log_format": args.log_format,
    }
    if args.command == "run-local":
        # Unique per process: a crashed run-local's leftovers must never be taken for ours.
        return SupervisorSettings(supervisor_id=f"local-{uuid.uuid4().hex[:12]}", **common)
    name = args.name or socket.gethostname()
    supervisor_id = args.id or name
    if not limits.is_valid_id(supervisor_id):
        raise SystemExit(f"supervisor: id {supervisor_id!r} must match {limits.ID_PATTERN}")
    return SupervisorSettings(
        supervisor_id=supervisor_id,
        name=name,
        backend=args.backend,
        labels=_labels(args.label),
        max_jobs=args.max_jobs,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        link=LinkSettings(
            urls=_switchboard_urls(args.switchboard),
            ca_file=args.ca_file,
            max_backlog_mb=args.max_backlog_mb,
        ),
        **common,
    )


def _output_settings(args: argparse.Namespace) -> OutputSettings:
    for name in ("outputs_max_files", "outputs_max_file_mb", "outputs_max_total_mb"):
        if not 1 <= getattr(args, name) <= 100_000_000:
            flag = "--" + name.replace("_", "-")
            raise SystemExit(f"supervisor: {flag} must be between 1 and 100000000")
    return OutputSettings(
        max_files=args.outputs_max_files,
        max_file_mb=args.outputs_max_file_mb,
        max_total_mb=args.outputs_max_total_mb,
    )


def _backend_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="supervisor config (TOML): devices, Docker policy; see docs/docker.md",
    )
    docker = parser.add_argument_group("docker backend")
    docker.add_argument(
        "--docker-host", metavar="URL", help="the engine (default: $DOCKER_HOST, else local)"
    )
    parser.add_argument(
        "--work-dir",
        default="supervisor-work",
        help="per-run scratch space and caches (default ./supervisor-work)",
    )
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument(
        "--inputs-max-mb",
        type=int,
        default=default_of(InputSettings, "max_mb"),
        metavar="MB",
        help="most all inputs of one run may take, files and unpacked archives together",
    )
    inputs.add_argument(
        "--input-cache-max-mb",
        type=int,
        default=default_of(InputSettings, "cache_max_mb"),
        metavar="MB",
        help="size bound of the input cache (WORK_DIR/input-cache); least recently used go first",
    )
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument(
        "--outputs-max-files",
        type=int,
        default=default_of(OutputSettings, "max_files"),
        metavar="N",
        help="most output files one run keeps (the switchboard's limit applies too)",
    )
    outputs.add_argument(
        "--outputs-max-file-mb",
        type=int,
        default=default_of(OutputSettings, "max_file_mb"),
        metavar="MB",
        help="most bytes of one kept output file",
    )
    outputs.add_argument(
        "--outputs-max-total-mb",
        type=int,
        default=default_of(OutputSettings, "max_total_mb"),
        metavar="MB",
        help="most bytes of all a run's kept output files (also a Wasm guest's /out quota)",
    )
    wasm = parser.add_argument_group("wasm backend")
    wasm.add_argument(
        "--wasm-cache-dir",
        metavar="DIR",
        help="compiled-module cache (default WORK_DIR/wasm-cache)",
    )
    wasm.add_argument(
        "--wasm-cache-max-mb",
        type=int,
        default=default_of(WasmSettings, "cache_max_mb"),
        metavar="MB",
        help="size bound of that cache; least recently used entries go first",
    )
    wasm.add_argument(
        "--wasm-memory-limit-mb",
        type=int,
        default=default_of(WasmSettings, "memory_limit_mb"),
        metavar="MB",
        help="most linear memory a guest may have (a job may ask for less)",
    )
    wasm.add_argument(
        "--wasm-scratch-mb",
        type=int,
        default=default_of(WasmSettings, "scratch_mb"),
        metavar="MB",
        help="most a run may write to its /scratch; past it the run fails (scratch_limit)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="supervisor", description="Run jobs on this host.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="connect to a switchboard and run its jobs")
    run.add_argument(
        "--switchboard",
        action="append",
        metavar="URL",
        help="ws://HOST:PORT, or wss://HOST:PORT for TLS (http:// and https:// work too);"
        " repeat it for replicas of one switchboard: one is used at a time, the next when"
        " it fails (or $SWITCHBOARD_WS_URL, several separated by commas)",
    )
    run.add_argument(
        "--ca-file",
        default=os.environ.get("SUPERVISOR_CA_FILE") or None,
        metavar="PEM",
        help="CA certificate(s) to verify a wss:// switchboard with, e.g. a private CA "
        "(or $SUPERVISOR_CA_FILE; default: the system's CAs). Verification is always on",
    )
    given = run.add_mutually_exclusive_group()
    given.add_argument(
        "--token-file",
        metavar="FILE",
        help="file holding a token of role supervisor, readable by its owner only (mode"
        " 600): a registration token, with which this host enrols and then keeps its own"
        " credential in WORK_DIR/credentials, or this host's own token. Else"
        " $SUPERVISOR_TOKEN_FILE or $SUPERVISOR_TOKEN; none is needed once enrolled",
    )
    given.add_argument(
        "--token",
        help="the token itself; avoid: every user of the host can read a command line",
    )
    run.add_argument("--name", help="display name (default: the host name)")
    run.add_argument("--id", help="stable identity (default: the name)")
    run.add_argument(
        "--backend", choices=BACKEND_KINDS, default=default_of(SupervisorSettings, "backend")
    )
    run.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--max-jobs", type=int, default=default_of(SupervisorSettings, "max_jobs"))
    run.add_argument(
        "--max-backlog-mb",
        type=int,
        default=default_of(LinkSettings, "max_backlog_mb"),
        metavar="MB",
        help="unacknowledged events kept at most; past that, jobs' output waits (backpressure)",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on this port (default: not served)",
    )
    run.add_argument(
        "--metrics-host",
        default=default_of(SupervisorSettings, "metrics_host"),
        metavar="ADDR",
        help="address for --metrics-port (default 127.0.0.1)",
    )
    logfmt.add_argument(run, "SUPERVISOR_LOG_FORMAT")
    _backend_options(run)

    local = commands.add_parser("run-local", help="run one job spec here, no switchboard")
    local.add_argument("spec", help="job spec JSON file")
    local.add_argument(
        "--artifact",
        action="append",
        default=[],
        metavar="FILE",
        help="a file the spec names by digest (a .wasm module, an image tarball, an input)",
    )
    local.add_argument(
        "--outputs-dir",
        metavar="DIR",
        help="copy the files the spec's outputs and reports keep here, under their paths"
        " in /out (default: only list them, with their sizes and digests)",
    )
    logfmt.add_argument(local, "SUPERVISOR_LOG_FORMAT")
    _backend_options(local)
    return parser


def _load_spec(path: str) -> JobSpec:
    try:
        spec = codec.decode_job_spec(Path(path).read_bytes())
    except OSError as exc:
        raise SystemExit(f"supervisor: cannot read {path}: {exc}") from None
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:  # names the bad field
        raise SystemExit(f"supervisor: invalid spec {path}: {exc}") from None
    if chained := spec.chained_inputs():
        raise SystemExit(
            f"supervisor: {path}: inputs[{next(iter(chained))!r}] names an earlier job's"
            " output, which only a switchboard can resolve: give the file's digest instead"
        )
    return spec


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spec = _load_spec(args.spec) if args.command == "run-local" else None
    settings = build_settings(args)
    logfmt.configure(settings.log_format)
    if spec is None:
        work = _run(settings, _credentials(args, settings))
    else:
        outputs_dir = Path(args.outputs_dir) if args.outputs_dir else None
        work = _run_local(settings, spec, [Path(p) for p in args.artifact], outputs_dir)
    # Everything imported so far lives as long as the process: keep the collector from
    # walking it again and again (full collections were the worst start latencies).
    gc.freeze()
    return uvloop.run(work)


if __name__ == "__main__":
    sys.exit(main())
