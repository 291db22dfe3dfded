"""Runs' console output in the SQLite store: chunks appended at their stream's offset,
and ranges read back. Every function takes the open connection and runs inside the
caller's transaction (the per-run cap is applied by EventBatch, sqlite_runs.py).
"""

from __future__ import annotations

import sqlite3

from protocol.limits import MAX_OUTPUT_CHUNK
from protocol.messages import Output, Stream
from switchboard.store import records

#: Ends a stream cut at the per-run output cap (the only bytes of a stream the program
#: did not write; OUTPUT_CUT_NOTE.format(cap=...)).
OUTPUT_CUT_NOTE = (
    "\n[switchboard: this run reached its output cap of {cap} bytes;"
    " the rest of this stream was dropped]\n"
)


def stored_length(conn: sqlite3.Connection, event: Output) -> int:
    """How many bytes the stream `event` continues has stored."""
    # Chunks are contiguous: the one with the highest offset ends the stream (an index
    # lookup, where max(offset + length) would scan every chunk).
    last = conn.execute(
        "SELECT offset + length(data) FROM output"
        " WHERE job_id = ? AND attempt = ? AND stream = ? ORDER BY offset DESC LIMIT 1",
        (event.job_id, event.attempt, event.stream),
    ).fetchone()
    return int(last[0]) if last else 0


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
    return records.output_range(rows, start, stop)
