"""Runs' console output in the SQLite store: chunks appended at their stream's offset,
and ranges read back. Every function takes the open connection and runs inside the
caller's transaction (the per-run cap is applied by EventBatch, sqlite_runs.py).
"""

from __future__ import annotations

import logging
import sqlite3

from protocol.limits import MAX_OUTPUT_CHUNK
from protocol.messages import Output, Stream

log = logging.getLogger("switchboard.store")


#: Ends a stream cut at the per-run output cap (the only bytes of a stream the program
#: did not write; OUTPUT_CUT_NOTE.format(cap=...)).
OUTPUT_CUT_NOTE = (
    "\n[switchboard: this run reached its output cap of {cap} bytes;"
    " the rest of this stream was dropped]\n"
)


def new_output(conn: sqlite3.Connection, event: Output) -> tuple[int, bytes] | None:
    """What of an output chunk is new: (the stream's stored length, the bytes past it);
    None if nothing is, or if the chunk would leave a gap."""
    # Chunks are contiguous: the one with the highest offset ends the stream (an index
    # lookup, where max(offset + length) would scan every chunk).
    last = conn.execute(
        "SELECT offset + length(data) FROM output"
        " WHERE job_id = ? AND attempt = ? AND stream = ? ORDER BY offset DESC LIMIT 1",
        (event.job_id, event.attempt, event.stream),
    ).fetchone()
    length = last[0] if last else 0
    if event.offset > length:
        log.error(
            "output gap on %s#%d %s: have %d bytes, got offset %d",
            event.job_id,
            event.attempt,
            event.stream,
            length,
            event.offset,
        )
        return None
    if event.offset + len(event.data) <= length:
        return None
    # Only what is new: a chunk sent again (a recovered run replays its output from the
    # start) may overlap what is stored.
    return length, event.data[length - event.offset :]


def read_output(
    conn: sqlite3.Connection, job_id: str, attempt: int, stream: Stream, start: int, end: int | None
) -> bytes:
    """Bytes [start, end) of a run's stream (as much as is stored)."""
    stop = end if end is not None else 1 << 62
    rows = conn.execute(
        "SELECT offset, data FROM output WHERE job_id = ? AND attempt = ? AND stream = ?"
        " AND offset < ? AND offset > ? AND offset + length(data) > ? ORDER BY offset",
        # No stored chunk is longer than MAX_OUTPUT_CHUNK: a lower bound for the index.
        (job_id, attempt, stream, stop, start - MAX_OUTPUT_CHUNK - 1, start),
    ).fetchall()
    parts = []
    for offset, data in rows:
        lo = max(start - offset, 0)
        hi = min(stop - offset, len(data))
        parts.append(data[lo:hi])
    return b"".join(parts)
