"""The SQLite engine under the store: connections, pragmas, the one writer thread and the
read pool. It knows nothing of jobs; the store hands it functions of a connection.

One writer thread owns the only write connection. Write requests queue up while a
transaction runs and the next transaction takes all of them at once (group commit); each
request's future resolves only after COMMIT, so whatever a caller acknowledges on the
strength of it is durable. In a group, each request runs inside a SAVEPOINT, so one
failing request doesn't undo the others.

Reads run in a small pool of threads, each with its own read-only connection (WAL lets
them read while the writer writes).

`synchronous=NORMAL` in WAL mode survives the process being killed at any moment (the WAL
is in the OS's hands once written); only a power cut can take the last transactions.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from switchboard import datadir, metrics

T = TypeVar("T")


#: Prepared statements each connection keeps (the module's default is 128): the reads of
#: many jobs at once name them by as many variables, one statement text per count, and
#: preparing a statement again costs more than running it.
CACHED_STATEMENTS = 1024


def connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path,
        isolation_level=None,
        check_same_thread=False,
        timeout=30.0,
        cached_statements=CACHED_STATEMENTS,
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    if readonly:
        conn.execute("PRAGMA query_only=ON")
    else:
        # What is deleted (dropped sealed secrets among it) is overwritten with zeros where
        # that costs no extra write.
        conn.execute("PRAGMA secure_delete=FAST")
    return conn


class _Writer(threading.Thread):
    """The one thread that writes; commits whatever requests have gathered as one group."""

    MAX_GROUP = 512

    def __init__(self, path: Path) -> None:
        super().__init__(name="sqlite-writer", daemon=True)
        self.conn = connect(path, readonly=False)
        self.requests: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def run(self) -> None:
        while True:
            first = self.requests.get()
            if first is None:
                break
            group = [first]
            while len(group) < self.MAX_GROUP:
                try:
                    item = self.requests.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self.requests.put(None)  # finish this group, then stop
                    break
                group.append(item)
            self._commit_group(group)
        self.conn.close()

    def _commit_group(self, group: list[Any]) -> None:
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        started = time.perf_counter()
        # A request alone needs no savepoint: undoing the transaction undoes just it.
        alone = len(group) == 1
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            for fn, future in group:
                if not alone:
                    self.conn.execute("SAVEPOINT request")
                mark = metrics.staged_mark()
                try:
                    value = fn(self.conn)
                except BaseException as refused:
                    if alone:
                        raise
                    metrics.staged_drop(mark)
                    self.conn.execute("ROLLBACK TO request")
                    self.conn.execute("RELEASE request")
                    results.append((future, None, refused))
                else:
                    if not alone:
                        self.conn.execute("RELEASE request")
                    results.append((future, value, None))
            self.conn.execute("COMMIT")
            metrics.STORE_COMMIT_SECONDS.observe(time.perf_counter() - started)
            metrics.staged_commit()
        except BaseException as failure:
            metrics.staged_drop()
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            results = [(future, None, failure) for _, future in group]
        for future, value, error in results:
            future.get_loop().call_soon_threadsafe(_resolve, future, value, error)


def _resolve(future: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)


class SQLiteEngine:
    """One database file: `write` runs a function on the writer's connection inside the
    next group's transaction, `read` on a reader thread's read-only connection."""

    def __init__(self, path: Path, readers: int = 4) -> None:
        self.path = path
        self._readers = readers
        self._writer: _Writer | None = None
        self._read_pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._read_conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        #: Called after each write request has finished (the live feed wakes on them).
        self._write_listeners: list[Callable[[], None]] = []

    def open(self, setup: Callable[[sqlite3.Connection], None]) -> None:
        """Make the file private, run `setup` (schema, upgrades) on a connection of its
        own, then start the writer and the readers."""
        # Private from the start: SQLite makes the -wal and -shm files with the database
        # file's mode, so it is created 0600 before SQLite opens it.
        datadir.private_dir(self.path.parent)
        datadir.private_file(self.path)
        for suffix in ("-wal", "-shm", "-journal"):
            datadir.tighten_if_present(self.path.with_name(self.path.name + suffix))
        conn = connect(self.path, readonly=False)
        try:
            setup(conn)
        finally:
            conn.close()
        self._writer = _Writer(self.path)
        self._writer.start()
        self._read_pool = ThreadPoolExecutor(self._readers, thread_name_prefix="sqlite-read")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.requests.put(None)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        if self._read_pool is not None:
            self._read_pool.shutdown(wait=True)
            self._read_pool = None
        with self._conns_lock:
            for conn in self._read_conns:
                conn.close()
            self._read_conns.clear()

    def write(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue a write request now (requests are applied in the order handed over); the
        future resolves once it is committed."""
        assert self._writer is not None, "store is not open"
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._writer.requests.put((fn, future))
        future.add_done_callback(self._tell_listeners)
        return future

    def _tell_listeners(self, _: asyncio.Future[Any]) -> None:
        for listener in self._write_listeners:
            listener()

    def on_write(self, listener: Callable[[], None]) -> None:
        self._write_listeners.append(listener)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        assert self._read_pool is not None, "store is not open"
        return await asyncio.get_running_loop().run_in_executor(
            self._read_pool, self._with_read_conn, fn
        )

    def _with_read_conn(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, readonly=True)
            self._local.conn = conn
            with self._conns_lock:
                self._read_conns.append(conn)
        return fn(conn)
