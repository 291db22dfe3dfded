"""Output throughput: one job whose (simulated) supervisor writes stdout as fast as the
protocol allows, and a live follower on GET /api/v1/jobs/{id}/output/follow.

The run is held after `running` until the follower's response has begun, then streams
its bytes in MAX_OUTPUT_CHUNK events (bench.fleet), with at most `backlog` bytes
unacknowledged (the supervisor's --max-backlog-mb). Measured:
- stored MB/s: bytes / (first chunk sent -> the Ack covering the last chunk arrived);
- follower MB/s: bytes / (first chunk sent -> the follower has every byte);
- lag per chunk: the follower has the chunk's last byte - the chunk was sent.
MB = 10^6 bytes.
"""

from __future__ import annotations

import bisect
import http.client
import threading
import time

from bench.bed import Bed
from bench.fleet import BACKLOG_BYTES, CHUNK, PARAM_BACKLOG, PARAM_HOLD, PARAM_OUTPUT_BYTES
from bench.stats import Summary, percentile


class Follower(threading.Thread):
    """Reads a job's followed output; notes (monotonic time, bytes so far) per read."""

    def __init__(self, port: int, token: str, job_id: str) -> None:
        super().__init__(name="output-follower", daemon=True)
        self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self._path = f"/api/v1/jobs/{job_id}/output/follow"
        self._token = token
        self.ready = threading.Event()
        self.reads: list[tuple[float, int]] = []
        self.head = b""
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._conn.request(
                "GET", self._path, headers={"Authorization": f"Bearer {self._token}"}
            )
            response = self._conn.getresponse()
            if response.status != 200:
                raise RuntimeError(f"follow: HTTP {response.status} {response.read()[:200]!r}")
            self.ready.set()
            total = 0
            while data := response.read1(1 << 20):
                total += len(data)
                self.reads.append((time.monotonic(), total))
                if len(self.head) < len(CHUNK):
                    self.head += data[: len(CHUNK) - len(self.head)]
        except BaseException as exc:
            self.error = exc
        finally:
            self.ready.set()
            self._conn.close()


def _output_once(bed: Bed, size: int, backlog: int) -> dict[str, float]:
    parameters = {
        PARAM_OUTPUT_BYTES: {"value": str(size)},
        PARAM_HOLD: {"value": "1"},
        PARAM_BACKLOG: {"value": str(backlog)},
    }
    spec = {"name": "output", "backend": {"kind": "noop"}, "parameters": parameters}
    fleet = bed.fleet
    fleet.call("watch", on=True)
    try:
        job_id = bed.api.call("POST", "/api/v1/jobs", spec)["id"]
        bed.wait_word("held", job_id, 30)
        follower = Follower(bed.switchboard.port, bed.switchboard.admin_token, job_id)
        follower.start()
        follower.ready.wait(30)
        time.sleep(0.05)  # the follower's request reaches its wait for news
        fleet.call("release", job_id=job_id)
        bed.wait_word("done", job_id, 60 + size / 1e6)
    finally:
        fleet.call("watch", on=False)
    follower.join(60 + size / 1e6)
    if follower.error is not None:
        raise RuntimeError(f"follower failed: {follower.error!r}")
    marks = fleet.call("marks", job_ids=[job_id])[job_id]
    bed.api.call("DELETE", f"/api/v1/jobs/{job_id}")  # keeps the database small
    if marks["phase"] != "succeeded":
        raise RuntimeError(f"output job ended {marks['phase']}")
    if not follower.reads or follower.reads[-1][1] != size:
        got = follower.reads[-1][1] if follower.reads else 0
        raise RuntimeError(f"the follower got {got} of {size} bytes")
    if follower.head != CHUNK[: len(follower.head)]:
        raise RuntimeError("the follower got other bytes than were written")

    chunks = marks["chunks"]  # (sent at, offset after, seq)
    first_sent = chunks[0][0]
    last_seq = chunks[-1][2]
    stored_at = next(t for t, seq in marks["acks"] if seq >= last_seq)
    read_times = [t for t, _ in follower.reads]
    read_totals = [n for _, n in follower.reads]
    lags = []
    for sent, end, _ in chunks:
        arrived = read_times[bisect.bisect_left(read_totals, end)]
        lags.append((arrived - sent) * 1000)
    lags.sort()
    return {
        "output_stored_mb_s": size / (stored_at - first_sent) / 1e6,
        "output_follower_mb_s": size / (read_times[-1] - first_sent) / 1e6,
        "output_lag_p50_ms": percentile(lags, 0.5),
        "output_lag_p99_ms": percentile(lags, 0.99),
        "output_lag_max_ms": lags[-1],
    }


def measure_output(
    bed: Bed, size: int, reps: int, backlog: int = BACKLOG_BYTES
) -> dict[str, Summary]:
    """`backlog`: unacknowledged bytes the writing supervisor allows itself."""
    _output_once(bed, min(size, 4 * len(CHUNK)), backlog)  # warm-up
    values: dict[str, list[float]] = {}
    for _ in range(reps):
        for key, value in _output_once(bed, size, backlog).items():
            values.setdefault(key, []).append(value)
    return {k: Summary.of(v, "MB/s" if k.endswith("mb_s") else "ms") for k, v in values.items()}
