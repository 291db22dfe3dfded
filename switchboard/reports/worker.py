"""JUnit parsing in a child process, so that a report near the size cap (seconds of CPU)
never slows the event loop that serves everyone.

A worker thread is not enough: the parser is Python code holding the GIL, and requests
answered meanwhile took 30 times their usual time. One child process parses, one report at
a time (the pool's single worker: reports queue rather than take every core); its answer
comes back msgpack-encoded. A child that dies mid-parse (killed, out of memory) refuses
that report (`crashed`) and the next report gets a fresh child.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import msgspec

from switchboard.reports.junit import (
    MAX_MESSAGE_CHARS,
    MAX_REPORT_BYTES,
    MAX_TEST_CASES,
    Report,
    ReportRefused,
    parse_junit,
)

_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()
_decoder = msgspec.msgpack.Decoder(Report)


def _executor() -> ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            # forkserver: the child starts from a clean interpreter, not a copy of the
            # switchboard's memory (its store, sockets and threads).
            context = multiprocessing.get_context("forkserver")
            _pool = ProcessPoolExecutor(max_workers=1, mp_context=context)
        return _pool


def _discard(broken: ProcessPoolExecutor) -> None:
    global _pool
    with _pool_lock:
        if _pool is broken:
            _pool = None
    broken.shutdown(wait=False, cancel_futures=True)


def _parse_in_child(
    data: bytes, max_bytes: int, max_cases: int, max_message: int
) -> bytes | tuple[str, str]:
    """In the child: the encoded Report, or a refusal as (kind, reason)."""
    try:
        report = parse_junit(
            data, max_bytes=max_bytes, max_cases=max_cases, max_message=max_message
        )
    except ReportRefused as exc:
        return exc.kind, exc.reason
    return msgspec.msgpack.encode(report)


async def parse_report(
    data: bytes,
    *,
    max_bytes: int = MAX_REPORT_BYTES,
    max_cases: int = MAX_TEST_CASES,
    max_message: int = MAX_MESSAGE_CHARS,
) -> Report:
    """parse_junit in the parser process; raises ReportRefused like it."""
    if len(data) > max_bytes:  # refused at once: nothing to send to the child
        return parse_junit(data, max_bytes=max_bytes)
    executor = _executor()
    loop = asyncio.get_running_loop()
    try:
        answer = await loop.run_in_executor(
            executor, _parse_in_child, data, max_bytes, max_cases, max_message
        )
    except BrokenProcessPool:
        _discard(executor)
        raise ReportRefused("crashed", "the report parser process died while reading it") from None
    if isinstance(answer, tuple):
        raise ReportRefused(*answer)
    return _decoder.decode(answer)


def shutdown() -> None:
    """Stop the parser process (the next parse starts another)."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)
