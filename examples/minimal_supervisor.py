"""A minimal supervisor, written from docs/protocol.md alone (plain `json` and
`websockets`, nothing of this project's packages): what a third party needs to write to
run jobs for a switchboard. It runs the `noop` backend only and keeps nothing on disk.

    python examples/minimal_supervisor.py --url ws://HOST:PORT/ws/supervisor \\
        --token-file FILE [--id ID]

It passes the conformance kit (docs/conformance.md):

    switchboard-conformance supervisor --command \\
        "python examples/minimal_supervisor.py --url {url} --token-file {token_file}"

`--no-resend` breaks it on purpose, for the kit's own test: on a reconnect it drops the
events the switchboard has not acknowledged instead of sending them again (§6.1).
"""

import argparse
import asyncio
import base64
import json
import random
import sys
import time

import websockets

VERSIONS = ["1.2", "1.1", "1.0"]
MAX_JOBS = 4
CHUNK = 256 * 1024  # §3: output.data at most 256 KiB
#: §5.2: the fields each message must have, and their JSON types.
REQUIRED = {
    "welcome": {"version": str, "session": int, "last_seq": int},
    "start_job": {"job_id": str, "attempt": int, "backend": dict},
    "stop_job": {"job_id": str, "attempt": int},
    "ack": {"seq": int},
    "status_request": {"request_id": int},
    "heartbeat": {},
    "protocol_error": {"code": int, "reason": str},
}


class BadMessage(Exception):
    def __init__(self, code, reason):
        super().__init__(reason)
        self.code, self.reason = code, reason


class Fatal(Exception):
    """Reconnecting won't help (§10: 4001, 4401; §1: HTTP 400, 401)."""


def parse(raw):
    if isinstance(raw, bytes):
        raise BadMessage(1003, "binary message")
    try:
        msg = json.loads(raw)
    except ValueError as exc:
        raise BadMessage(1007, f"malformed JSON: {exc}") from None
    if not isinstance(msg, dict) or msg.get("type") not in REQUIRED:
        kind = msg.get("type") if isinstance(msg, dict) else None
        raise BadMessage(1007, f"unknown message type {kind!r}")
    for name, kind in REQUIRED[msg["type"]].items():
        value = msg.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BadMessage(1007, f"invalid message: `{name}` must be {kind.__name__}")
    return msg


def log(text):
    print(f"minimal-supervisor: {text}", file=sys.stderr, flush=True)


class Supervisor:
    def __init__(self, args, token):
        self.args, self.token = args, token
        self.seq = 0  # the last seq numbered (§6.1)
        self.backlog = []  # events not yet acknowledged, oldest first
        self.runs = {}  # (job_id, attempt) -> {"phase", "stop": Event, "reason"}
        self.ended = {}  # the last 10 000 runs that ended here (ordered): repeats are refused
        self.outbox = None  # the connection's queue of messages to send, when connected
        self.retry_after = 0.0
        self.welcomed = False

    def send(self, msg):
        if self.outbox is not None:
            self.outbox.put_nowait(msg)

    def event(self, type_, key, **fields):
        self.seq += 1
        msg = {"type": type_, "seq": self.seq, "job_id": key[0], "attempt": key[1], **fields}
        if type_ == "state" and key in self.runs:
            self.runs[key]["phase"] = fields["phase"]
        self.backlog.append(msg)
        self.send(msg)

    def refuse_run(self, key, kind, why):
        self.event("error", key, kind=kind, description=why)
        self.event("state", key, phase="rejected", message=f"{kind}: {why}", at=time.time())

    def start_job(self, msg):  # §6.4, in this order
        key = (msg["job_id"], msg["attempt"])
        if key in self.runs:
            return
        if key in self.ended:
            return self.refuse_run(key, "job_already_exists", "this run already ran here")
        if any(job == key[0] for job, _ in self.runs):
            return self.refuse_run(key, "already_running", "another attempt is held")
        if msg["backend"].get("kind") != "noop":
            return self.refuse_run(key, "image_not_compatible", "this supervisor runs noop")
        if len(self.runs) >= MAX_JOBS:
            return self.refuse_run(key, "max_concurrent_jobs", f"{MAX_JOBS} runs held")
        self.runs[key] = {"phase": "assigned", "stop": asyncio.Event(), "reason": None}
        job = self.run_noop(key, msg["backend"], msg.get("timeout_s"))
        self.runs[key]["task"] = asyncio.ensure_future(job)

    def stop_job(self, msg):
        run = self.runs.get((msg["job_id"], msg["attempt"]))
        if run is not None and run["reason"] is None:
            run["reason"] = msg.get("reason", "canceled")
            run["stop"].set()

    async def run_noop(self, key, spec, timeout_s):
        run = self.runs[key]
        self.event("state", key, phase="initializing", stage="accepted", at=time.time())
        self.event("state", key, phase="running", at=time.time())
        data = spec.get("output", "").encode()
        for offset in range(0, len(data), CHUNK):
            chunk = base64.b64encode(data[offset : offset + CHUNK]).decode()
            self.event("output", key, stream="stdout", offset=offset, data=chunk)
        delay = spec.get("delay_s", 0.0)
        limit = delay if timeout_s is None else min(delay, timeout_s)
        try:
            await asyncio.wait_for(run["stop"].wait(), limit)
        except TimeoutError:
            if limit < delay:  # the run's timeout came first (§6.4)
                run["reason"] = "timeout"
        if run["reason"] is None:
            code = spec.get("exit_code", 0)
            self.event("exit", key, exit_code=code)
            phase = "succeeded" if code == 0 else "failed"
        else:
            self.event("state", key, phase="terminating", at=time.time())
            timed_out = run["reason"] == "timeout"
            self.event("exit", key, reason="timeout" if timed_out else "canceled")
            phase = "timed_out" if timed_out else "canceled"
        self.event("state", key, phase=phase, at=time.time())
        del self.runs[key]  # listed in status until its end is numbered (§5.2)
        self.ended[key] = None
        if len(self.ended) > 10_000:
            del self.ended[next(iter(self.ended))]

    def hello(self):
        runs = [{"job_id": j, "attempt": a, "phase": r["phase"]} for (j, a), r in self.runs.items()]
        return {"type": "hello", "supervisor_id": self.args.id, "name": self.args.id,
                "versions": VERSIONS, "backends": ["noop"], "max_jobs": MAX_JOBS,
                "runs": runs, "last_seq": self.seq, "software": "minimal/0.1"}  # fmt: skip

    async def refuse(self, ws, code, reason):  # §10: protocol_error, then close
        log(f"closing {code}: {reason}")
        await ws.send(json.dumps({"type": "protocol_error", "code": code, "reason": reason}))
        await ws.close(code, reason.encode()[:123].decode(errors="ignore"))

    async def session(self, ws):
        heard, tasks = [time.monotonic()], []
        try:
            await ws.send(json.dumps(self.hello()))
            welcome = parse(await asyncio.wait_for(ws.recv(), 10))
            if welcome["type"] == "protocol_error":
                return self.closing(welcome)
            if welcome["type"] != "welcome":
                return await self.refuse(ws, 4000, "expected welcome")
            self.welcomed = True
            self.backlog = [e for e in self.backlog if e["seq"] > welcome["last_seq"]]
            if self.args.no_resend:
                self.backlog = []  # deliberately broken: the unacknowledged events are lost
            self.seq = max(self.seq, welcome["last_seq"])
            self.outbox = asyncio.Queue()
            for msg in self.backlog:  # resent in order, as they were (§6.1)
                self.send(msg)
            tasks = [asyncio.ensure_future(self.writer(ws)), asyncio.ensure_future(
                self.heartbeats(ws, welcome, heard))]  # fmt: skip
            async for raw in ws:
                heard[0] = time.monotonic()
                msg = parse(raw)
                kind = msg["type"]
                if kind == "welcome":
                    return await self.refuse(ws, 4002, "second welcome")
                if kind == "ack":
                    self.backlog = [e for e in self.backlog if e["seq"] > msg["seq"]]
                    for problem in msg.get("problems", []):
                        log(f"switchboard: event {problem.get('seq')}: {problem.get('code')}")
                elif kind == "start_job":
                    self.start_job(msg)
                elif kind == "stop_job":
                    self.stop_job(msg)
                elif kind == "status_request":
                    runs = self.hello()["runs"]
                    self.send({"type": "status", "request_id": msg["request_id"],
                               "runs": runs, "running": len(runs)})  # fmt: skip
                elif kind == "protocol_error":
                    return self.closing(msg)
        except BadMessage as exc:
            await self.refuse(ws, exc.code, exc.reason)
        finally:
            self.outbox = None
            for task in tasks:
                task.cancel()

    def closing(self, msg):
        log(f"switchboard closes: {msg['code']} {msg['reason']}")
        self.retry_after = msg.get("retry_after_s") or 0.0
        if msg["code"] in (4001, 4401):
            raise Fatal(msg["reason"])

    async def writer(self, ws):
        outbox = self.outbox
        try:
            while True:
                await ws.send(json.dumps(await outbox.get()))
        except websockets.ConnectionClosed:
            pass  # the reader sees the end too

    async def heartbeats(self, ws, welcome, heard):
        interval = welcome.get("heartbeat_interval_s", 5.0)
        timeout = welcome.get("heartbeat_timeout_s", 20.0)
        while True:
            await asyncio.sleep(interval)
            if time.monotonic() - heard[0] > timeout:
                return await ws.close(4004, "no heartbeat from the switchboard")
            self.send({"type": "heartbeat", "at": time.time()})

    async def run(self):
        ceiling = 0.5  # full-jitter backoff, 0.5 s doubling to 30 s (§1)
        while True:
            self.welcomed = False
            try:
                async with websockets.connect(
                    self.args.url,
                    additional_headers={"Authorization": f"Bearer {self.token}"},
                    subprotocols=["switchboard.v1"],
                    max_size=1024 * 1024,
                    compression=None,
                    ping_interval=None,
                ) as ws:
                    await self.session(ws)
            except websockets.InvalidStatus as exc:
                if exc.response.status_code in (400, 401, 403, 404, 426):
                    raise Fatal(str(exc)) from None
                log(f"refused: {exc}")
            except (OSError, TimeoutError, websockets.WebSocketException, BadMessage) as exc:
                log(f"connection failed: {exc!r}")
            if self.welcomed:  # the link worked until it broke: start the backoff over
                ceiling = 0.5
            delay = max(random.uniform(0, ceiling), self.retry_after)
            self.retry_after, ceiling = 0.0, min(30.0, ceiling * 2)
            log(f"reconnecting in {delay:.2f} s")
            await asyncio.sleep(delay)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="ws://HOST:PORT/ws/supervisor")
    parser.add_argument("--token-file", required=True, help="file holding the token")
    parser.add_argument("--id", default="minimal", help="supervisor id (default minimal)")
    parser.add_argument("--no-resend", action="store_true", help="broken on purpose (tests)")
    args = parser.parse_args()
    with open(args.token_file) as file:
        token = file.read().strip()
    try:
        asyncio.run(Supervisor(args, token).run())
    except Fatal as exc:
        log(f"giving up: {exc}")
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
