"""HTTP limits of a real switchboard process, over real sockets: huge and slow request
heads, stalled bodies, idle keep-alive connections and a flood of connections are each
answered and closed, memory stays flat, and supervisors keep connecting and running jobs
through all of it."""

from __future__ import annotations

import logging
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from switchboard.lograte import RateLimitedLog
from tests.harness import (
    Process,
    Switchboard,
    scaled,
    start_supervisor,
    wait_connected,
    wait_for,
    wait_job,
)
from tests.scrape import sample_value

pytestmark = pytest.mark.process

HEADER_TIMEOUT = scaled(1.0)
BODY_TIMEOUT = scaled(1.0)
KEEP_ALIVE = scaled(1.0)
#: The most a close may come after its deadline (a loaded machine, our polling).
LATE = scaled(3.0)
TWENTY_MB = 20 * 1024 * 1024


def _open(server: Switchboard) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=scaled(10))
    return sock


def _until_closed(sock: socket.socket, timeout: float = 30.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], 0.05)
        if not ready:
            continue
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"the server did not close the connection; got {received[:200]!r}")


def _one_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length, read whole; the connection stays open."""
    sock.settimeout(scaled(10))
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _status(response: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", response)
    assert match, response[:200]
    return int(match.group(1))


def _error(response: bytes) -> dict:
    import json

    head, _, body = response.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower(), head
    return json.loads(body)


def _rss_mb(process: Process) -> float:
    status = Path(f"/proc/{process.proc.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024


def _refusals(client: httpx.Client, reason: str) -> float:
    return sample_value(
        client.get("/metrics").text, "switchboard_http_refusals_total", reason=reason
    )


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send what the server takes until it closes (it may refuse long before the end)."""
    try:
        sock.sendall(data)
    except OSError:
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Switchboard]:
    server = Switchboard(
        tmp_path_factory.mktemp("http-limits") / "data",
        extra_args=(
            "--header-timeout",
            str(HEADER_TIMEOUT),
            "--body-timeout",
            str(BODY_TIMEOUT),
            "--keep-alive",
            str(KEEP_ALIVE),
        ),
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def supervisor(server: Switchboard, work_dir: Path) -> Iterator[Process]:
    """Connected before the tests start: its WebSocket must outlive every HTTP limit."""
    process = start_supervisor(server, work_dir, name="limits-noop", backend="noop")
    wait_connected(server.client(), "limits-noop")
    yield process
    process.stop()


def test_a_20_mb_header_gets_431_and_the_connection_closed(server, supervisor):
    client = server.client()
    before = _refusals(client, "header_too_large")
    sock = _open(server)
    head = b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Big: "
    sender = threading.Thread(
        target=_send_quietly, args=(sock, head + b"a" * TWENTY_MB + b"\r\n\r\n")
    )
    sender.start()
    response = _until_closed(sock)
    sender.join()
    sock.close()
    assert _status(response) == 431
    assert _error(response) == {
        "error": "too_large",
        "message": "the request head exceeds 65536 bytes",
        "field": None,
    }
    assert _refusals(client, "header_too_large") == before + 1
    assert "refused 127.0.0.1:" in server.process.log()
    # A head just under the limit is served.
    big = {"X-Big": "a" * (60 * 1024)}
    assert httpx.get(f"{server.url}/api/v1/health", headers=big).status_code == 200


def test_unfinished_huge_headers_keep_memory_flat(server, supervisor):
    """The issue's case: 10 connections each sending 20 MB of one header that never ends
    grew the server by 229 MB. Now each is cut at the limit."""
    before = _rss_mb(server.process)
    socks = [_open(server) for _ in range(10)]
    head = b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * TWENTY_MB
    senders = [threading.Thread(target=_send_quietly, args=(s, head)) for s in socks]
    for sender in senders:
        sender.start()
    peak = before
    while any(sender.is_alive() for sender in senders):
        peak = max(peak, _rss_mb(server.process))
        time.sleep(0.01)
    responses = [_until_closed(s) for s in socks]
    for sock in socks:
        sock.close()
    print(f"server RSS: {before:.1f} MB before, {peak:.1f} MB at most while 200 MB arrived")
    assert all(_status(r) == 431 for r in responses)
    # Eleven refusals so far, logged once: a flood writes a line, not a line each.
    assert _refusals(server.client(), "header_too_large") == 11
    assert server.process.log().count("(header_too_large)") <= 2
    # 200 MB were sent; what stays is at most a read buffer per connection.
    assert peak - before < 20, (before, peak)


class _SlowLoris:
    """A connection sending a request head one byte at a time, never finishing it."""

    def __init__(self, server: Switchboard) -> None:
        self.sock = _open(server)
        self.sock.setblocking(False)
        self.sock.send(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")
        self.received = b""
        self.closed_at: float | None = None

    def step(self) -> None:
        """Send one more byte; note what the server said and whether it closed."""
        if self.closed_at is not None:
            return
        try:
            self.sock.send(b"X")
        except OSError:
            pass
        try:
            while chunk := self.sock.recv(65536):
                self.received += chunk
            self.closed_at = time.monotonic()
        except BlockingIOError:
            pass
        except OSError:
            self.closed_at = time.monotonic()


def test_slow_loris_heads_are_closed_after_the_header_timeout(server, supervisor):
    client = server.client()
    before = _refusals(client, "header_timeout")
    start = time.monotonic()
    lorises = [_SlowLoris(server) for _ in range(20)]
    silent = [_open(server) for _ in range(5)]  # connected, never a byte
    while any(loris.closed_at is None for loris in lorises):
        assert time.monotonic() - start < HEADER_TIMEOUT + LATE, "slow heads still open"
        for loris in lorises:
            loris.step()
        time.sleep(0.1)
    for loris in lorises:
        # Not before the limit (their bytes kept coming), not long after it.
        assert loris.closed_at - start >= HEADER_TIMEOUT * 0.9
        assert _status(loris.received) == 408
        assert "request head took more than" in _error(loris.received)["message"]
        loris.sock.close()
    for sock in silent:
        assert _status(_until_closed(sock, timeout=HEADER_TIMEOUT + LATE)) == 408
        sock.close()
    assert _refusals(client, "header_timeout") == before + 25
    assert server.process.log().count("(header_timeout)") <= 2


def _post_head(server: Switchboard, length: int) -> bytes:
    return (
        f"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.admin_token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def test_a_stalled_body_is_closed_after_the_body_timeout(server, supervisor):
    client = server.client()
    before = _refusals(client, "body_timeout")
    sock = _open(server)
    start = time.monotonic()
    sock.sendall(_post_head(server, 1000) + b'{"name": "stalled"')
    response = _until_closed(sock, timeout=BODY_TIMEOUT + LATE)
    elapsed = time.monotonic() - start
    sock.close()
    assert _status(response) == 408
    assert "no byte of the request body" in _error(response)["message"]
    assert elapsed >= BODY_TIMEOUT * 0.9
    assert _refusals(client, "body_timeout") == before + 1


def test_a_slow_body_that_keeps_coming_is_served(server, supervisor):
    """The body timeout is a gap, not a total: bytes every half timeout, for twice the
    timeout, make a job."""
    body = b'{"name": "slow", "backend": {"kind": "noop"}}'
    pieces = [body[i : i + 12] for i in range(0, len(body), 12)]
    sock = _open(server)
    sock.sendall(_post_head(server, len(body)))
    start = time.monotonic()
    for piece in pieces:
        time.sleep(BODY_TIMEOUT / 2)
        sock.sendall(piece)
    assert time.monotonic() - start >= BODY_TIMEOUT * 1.5
    response = _one_response(sock)
    sock.close()
    assert _status(response) == 201, response


def test_an_idle_keep_alive_connection_is_closed(server, supervisor):
    sock = _open(server)
    sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _status(_one_response(sock)) == 200
    served = time.monotonic()
    # Closed without a word (an idle keep-alive close is ordinary HTTP), after the idle time.
    assert _until_closed(sock, timeout=KEEP_ALIVE + LATE) == b""
    assert time.monotonic() - served >= KEEP_ALIVE * 0.9
    sock.close()


def test_garbage_is_a_400_in_the_error_shape(server, supervisor):
    client = server.client()
    before = _refusals(client, "bad_request")
    sock = _open(server)
    sock.sendall(b"NOT HTTP AT ALL\x1b[2J\r\n\r\n")
    response = _until_closed(sock)
    sock.close()
    assert _status(response) == 400
    assert _error(response)["error"] == "invalid_request"
    assert _refusals(client, "bad_request") == before + 1


def test_the_supervisor_connected_all_along_and_still_runs_jobs(server, supervisor):
    """Every limit above fired while this supervisor's WebSocket was open: it is still
    its first session, and it runs a job."""
    client = server.client()
    metrics = client.get("/metrics").text
    # The limits did fire (this test means nothing run on its own: it runs after them).
    for reason in ("header_too_large", "header_timeout", "body_timeout", "bad_request"):
        assert sample_value(metrics, "switchboard_http_refusals_total", reason=reason) > 0, reason
    assert sample_value(metrics, "switchboard_supervisor_reconnects_total") == 0
    assert sample_value(metrics, "switchboard_supervisor_connections_total") == 1
    job_id = client.post("/api/v1/jobs", json={"name": "after", "backend": {"kind": "noop"}})
    assert wait_job(client, job_id.json()["id"])["phase"] == "succeeded"


# --- the connection cap ----------------------------------------------------------------

CAP = 8


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[Switchboard]:
    long = str(scaled(60))
    server = Switchboard(
        tmp_path / "data",
        extra_args=(
            "--max-connections",
            str(CAP),
            "--header-timeout",
            long,
            "--body-timeout",
            long,
            "--keep-alive",
            long,
        ),
    )
    yield server
    server.stop()


def test_connections_past_the_cap_are_refused_and_supervisors_still_get_in(capped, work_dir):
    # One API client on one keep-alive connection, and a supervisor, before the flood.
    client = capped.client()
    first = start_supervisor(capped, work_dir, name="cap-noop-1", backend="noop")
    stalled: list[socket.socket] = []
    lorises: list[_SlowLoris] = []
    idle: list[socket.socket] = []
    second: Process | None = None
    third: Process | None = None
    try:
        wait_connected(client, "cap-noop-1")

        # Fill every other slot with requests in flight: bodies that never come.
        for _ in range(CAP - 1):
            sock = _open(capped)
            sock.sendall(_post_head(capped, 1000))
            stalled.append(sock)
        wait_for(
            lambda: "switchboard_http_connections 8.0" in client.get("/metrics").text,
            "the cap to fill",
        )
        # A new connection is refused, with the error shape and a reason...
        refused = _open(capped)
        response = _until_closed(refused)
        refused.close()
        assert _status(response) == 503
        assert _error(response)["error"] == "unavailable"
        assert b"retry-after: 1" in response.lower()
        assert _refusals(client, "connection_cap") >= 1
        # ...while the API client's connection works, and so does the supervisor that
        # connected before (WebSockets are not counted).
        job = client.post("/api/v1/jobs", json={"name": "full", "backend": {"kind": "noop"}})
        assert wait_job(client, job.json()["id"])["phase"] == "succeeded"

        # Now a slow-loris flood holds the slots instead: a new supervisor still gets in,
        # taking the place of the slowest head.
        for sock in stalled:
            sock.close()
        wait_for(
            lambda: "switchboard_http_connections 1.0" in client.get("/metrics").text,
            "the stalled connections to close",
        )
        lorises = [_SlowLoris(capped) for _ in range(CAP - 1)]
        wait_for(
            lambda: "switchboard_http_connections 8.0" in client.get("/metrics").text,
            "the slow heads to fill the cap",
        )
        time.sleep(1.5)  # older than EVICT_AFTER_S: the first to go when room is needed
        second = start_supervisor(capped, work_dir, name="cap-noop-2", backend="noop")
        wait_connected(client, "cap-noop-2")
        assert _refusals(client, "slow_head_evicted") >= 1
        spec = {"name": "flood", "backend": {"kind": "noop"}, "selector": {}}
        jobs = [client.post("/api/v1/jobs", json=spec).json()["id"] for _ in range(4)]
        ran_on = {wait_job(client, j)["runs"][0]["supervisor_id"] for j in jobs}
        assert ran_on <= {"cap-noop-1", "cap-noop-2"}
        # The slow heads that were not needed are still waiting (not cut for nothing).
        for loris in lorises:
            loris.step()
        assert sum(loris.closed_at is None for loris in lorises) >= CAP - 3

        # Idle keep-alive connections, each kept by a cheap request now and then, hold
        # the slots: a new supervisor takes the place of the one idle the longest.
        for loris in lorises:
            loris.sock.close()
        wait_for(
            lambda: "switchboard_http_connections 1.0" in client.get("/metrics").text,
            "the slow heads to close",
        )
        for _ in range(CAP - 1):
            sock = _open(capped)
            sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _status(_one_response(sock)) == 200
            idle.append(sock)
        time.sleep(1.5)
        third = start_supervisor(capped, work_dir, name="cap-noop-3", backend="noop")
        wait_connected(client, "cap-noop-3")
        assert _refusals(client, "idle_evicted") >= 1
        job = client.post("/api/v1/jobs", json=spec).json()["id"]
        assert wait_job(client, job)["phase"] == "succeeded"
    finally:
        for sock in stalled + idle:
            sock.close()
        for loris in lorises:
            loris.sock.close()
        for process in (first, second, third):
            if process is not None:
                process.stop()


def test_a_body_answered_before_it_is_read_is_not_read(capped):
    """A refusal of the API (here 401) ends the connection at once: the switchboard does
    not read, to throw away, the rest of a body it will never use."""
    sock = _open(capped)
    start = time.monotonic()
    sock.sendall(
        b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000000\r\n\r\n" + b"x" * 1024
    )
    response = _until_closed(sock, timeout=10)
    sock.close()
    assert _status(response) == 401
    # It says so: a client that was not told would send its next request on it.
    assert b"connection: close" in response.split(b"\r\n\r\n", 1)[0].lower()
    assert time.monotonic() - start < scaled(10)  # the timeouts here are a minute


def test_a_refusal_before_a_small_body_came_says_the_connection_closes(capped):
    """The head alone, then (as httpx writes them) the body a moment later: a 403 sent
    between the two says `connection: close`, and the connection does close, after the
    answer was read (never a reset, never a next request answered on it)."""
    viewer = capped.create_token("viewer")
    sock = _open(capped)
    sock.sendall(
        b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {viewer}\r\n".encode()
        + b"Content-Length: 2\r\n\r\n"
    )
    time.sleep(0.3)  # answered meanwhile
    sock.sendall(b"{}")
    response = _until_closed(sock, timeout=10)
    sock.close()
    assert _status(response) == 403, response
    assert b"connection: close" in response.split(b"\r\n\r\n", 1)[0].lower()


def test_rate_limited_log_says_how_many_lines_it_left_out(caplog):
    now = [100.0]
    log = RateLimitedLog(logging.getLogger("test.lograte"), interval_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.lograte"):
        for _ in range(5):
            log.warning("flood", "refused %s", "a")
        log.warning("other", "refused %s", "b")  # another kind has its own interval
        now[0] += 10
        log.warning("flood", "refused %s", "c")
    assert [r.getMessage() for r in caplog.records] == [
        "refused a",
        "refused b",
        "refused c (and 4 more like it since the last such line)",
    ]


def test_a_streamed_response_head_is_not_held_for_its_body(server):
    """A stream whose first piece is a while coming still gets its head at once (the
    head is held for the body only within the loop's turn; see test_http_head_with_body)."""
    with _open(server) as sock:
        request = (
            "GET /api/v1/live HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {server.admin_token}\r\n\r\n"
        )
        sock.sendall(request.encode())
        sock.settimeout(scaled(5))
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        assert _status(received) == 200, received[:200]
