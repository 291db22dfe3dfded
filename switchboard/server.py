"""Running the switchboard: uvicorn on uvloop with the sans-I/O websockets implementation,
on a socket we bind ourselves so `--port 0` works and the real address can be printed."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import resource
import socket
import sqlite3
import ssl
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import IO

import uvicorn
import uvloop

from common import logfmt
from protocol.limits import MAX_FRAME_BYTES
from switchboard import datadir
from switchboard.app import create_app, goodbye_to_supervisors
from switchboard.config import Settings
from switchboard.datadir import DataDirError
from switchboard.http_limits import ConnectionTable, HttpLimits, LimitedHttpProtocol
from switchboard.sealing import Keyring
from switchboard.secret_keys import SecretKeyError, load_keyring
from switchboard.store.schema import SchemaMismatch
from switchboard.upgrading import prepare_to_serve
from switchboard.wsprotocol import AbortableWebSocketProtocol

log = logging.getLogger("switchboard")


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, which first ends the dashboards' endless event streams and answers
    the requests waiting for jobs when told to stop (it waits for open responses to finish
    before shutting the app down), and lets
    the supervisors hear why before it closes their connections (uvicorn would close them
    with 1012 and no word; the protocol says protocol_error 1013 with retry_after_s)."""

    def __init__(
        self,
        config: uvicorn.Config,
        on_exit: Callable[[], None],
        before_shutdown: Callable[[], Awaitable[None]],
    ) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self._before_shutdown = before_shutdown

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        asyncio.get_running_loop().call_soon_threadsafe(self._on_exit)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await self._before_shutdown()
        except Exception:  # the goodbyes are a courtesy: shutting down goes on regardless
            log.exception("saying goodbye to the supervisors failed")
        await super().shutdown(sockets)


async def serve(settings: Settings, keyring: Keyring) -> None:
    app = create_app(settings, keyring)
    limits = HttpLimits(
        max_header_bytes=settings.max_header_bytes,
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        max_connections=settings.max_connections,
    )
    config = uvicorn.Config(
        app,
        loop="none",  # we run uvicorn inside our own uvloop loop
        # httptools with the limits uvicorn lacks (header size, header and body timeouts,
        # a connection cap).
        http=functools.partial(LimitedHttpProtocol, table=ConnectionTable(limits)),
        timeout_keep_alive=settings.keep_alive_s,
        ws=AbortableWebSocketProtocol,  # uvicorn's websockets-sansio, which can abort
        ws_max_size=MAX_FRAME_BYTES,
        ws_ping_interval=None,  # liveness is the protocol's Heartbeat
        lifespan="on",
        log_level="warning",
        # No uvicorn handlers of its own: its records go to the root's (common.logfmt),
        # which makes what peers put in them safe.
        log_config=None,
        access_log=False,
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
        timeout_graceful_shutdown=10,
    )
    state = app.state.switchboard
    server = _Server(
        config,
        on_exit=state.close_streams,
        before_shutdown=functools.partial(goodbye_to_supervisors, state.hub),
    )
    sock = bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    scheme = "https" if settings.tls_cert else "http"
    shown = f"[{host}]" if ":" in host else host

    async def announce() -> None:
        while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for this
            await asyncio.sleep(0.01)
        # One line a launcher can wait for; the URLs a person needs.
        print(f"switchboard listening on {scheme}://{shown}:{port}", flush=True)
        print(f"  API:        {scheme}://{shown}:{port}/api/v1", flush=True)
        print(f"  OpenAPI:    {scheme}://{shown}:{port}/schema/openapi.json", flush=True)
        print(f"  supervisors connect to ws{scheme[4:]}://{shown}:{port}/ws/supervisor", flush=True)

    announcer = asyncio.create_task(announce())
    try:
        await server.serve(sockets=[sock])
    finally:
        announcer.cancel()


def check_tls(settings: Settings) -> None:
    """Fail at once, naming the files, if --tls-cert/--tls-key can't be served (uvicorn
    would fail later, with a traceback that names neither)."""
    if settings.tls_key and not settings.tls_cert:
        raise SystemExit("switchboard: --tls-key needs --tls-cert")
    if settings.tls_cert is None:
        return
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:  # missing, unreadable, not PEM, key mismatch
        key = f" with key {settings.tls_key}" if settings.tls_key else ""
        raise SystemExit(
            f"switchboard: cannot use TLS certificate {settings.tls_cert}{key}: {exc}"
        ) from None


def prepare_storage(settings: Settings) -> Keyring:
    """Make the data dir private and load the key for secrets, or stop with one line
    saying what is wrong."""
    try:
        datadir.prepare(settings.data_dir)
        return load_keyring(settings)
    except (DataDirError, SecretKeyError) as exc:
        raise SystemExit(f"switchboard: {exc}") from None


def hold_database(settings: Settings, keyring: Keyring) -> IO[bytes]:
    """Hold the data dir and check (or, with --upgrade, upgrade) its database before
    serving, or stop with one line saying what is wrong."""
    try:
        return prepare_to_serve(settings, keyring)
    except (DataDirError, SchemaMismatch, sqlite3.Error) as exc:
        raise SystemExit(f"switchboard: {exc}") from None


def check_database(settings: Settings) -> None:
    """With --database: reach the PostgreSQL database and create or check its schema
    (with --upgrade, upgrade it: store/postgres_migrations.py) before serving, or stop
    with one line saying what is wrong."""
    if settings.database is None:
        return
    import asyncpg

    from switchboard.store.postgres_engine import POOLER_HINT, reach

    try:
        asyncio.run(
            reach(
                settings.database,
                upgrade=settings.upgrade_schema,
                pooled=settings.database_pooler,
            )
        )
        if settings.replica_id is not None:
            check_replica_id(
                settings.database,
                settings.replica_id,
                settings.leader_lease_s,
                pooled=settings.database_pooler,
            )
    except (
        OSError,
        ValueError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        SchemaMismatch,
    ) as exc:
        hint = ""
        if "unsupported startup parameter" in str(exc) and not settings.database_pooler:
            hint = f" ({POOLER_HINT})"
        raise SystemExit(f"switchboard: --database: {exc}{hint}") from None


def check_replica_id(dsn: str, replica_id: str, alive_s: float, *, pooled: bool = False) -> None:
    """Refuse to serve as a replica id another running switchboard renews: two processes
    under one id would both hold its lease and its connections."""
    from switchboard.store.postgres_engine import connect
    from switchboard.store.postgres_replicas import last_seen_ago

    async def ask() -> float | None:
        conn = await connect(dsn, pooled=pooled)
        try:
            async with conn.transaction():  # one server session, behind a pooler too
                return await last_seen_ago(conn, replica_id)
        finally:
            await conn.close()

    ago = asyncio.run(ask())
    if ago is not None and ago <= alive_s:
        raise SystemExit(
            f"switchboard: replica id {replica_id!r} is in use: a switchboard serving the"
            f" database under it was alive {ago:.1f} s ago; give each replica its own"
            f" --replica-id (one that died is free {alive_s:g} s after it was last seen)"
        )


def allow_open_files(settings: Settings) -> None:
    """Raise the soft limit on open files to the hard one: --max-connections (and every
    supervisor's WebSocket) needs a descriptor each, and the default soft limit is often
    1024. Say so if even the hard limit leaves too few."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft != resource.RLIM_INFINITY and soft < settings.max_connections + 256:
        log.warning(
            "only %d open files are allowed (ulimit -n): fewer connections than"
            " --max-connections %d can be served",
            soft,
            settings.max_connections,
        )


def run(settings: Settings) -> None:
    check_tls(settings)
    logfmt.configure(settings.log_format)
    keyring = prepare_storage(settings)
    with hold_database(settings, keyring):  # held while serving
        check_database(settings)
        allow_open_files(settings)
        gc.freeze()  # the imported code lives as long as the process; don't rescan it
        uvloop.run(serve(settings, keyring))
