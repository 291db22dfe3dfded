"""A test bed: a real `switchboard serve` process (tests.harness), a simulated fleet in
another process, and a cheap REST client in this one."""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.e2e import Api
from bench.fleet import FleetProcess
from bench.procs import raise_fd_limit
from tests.harness import Switchboard

#: The noop job every throughput and latency run submits: runs nothing, exits 0.
NOOP = {"name": "noop", "backend": {"kind": "noop"}}


@dataclass
class Bed:
    switchboard: Switchboard
    fleet: FleetProcess
    api: Api
    supervisor_token: str

    @property
    def pid(self) -> int:
        return self.switchboard.process.proc.pid

    @property
    def ws_url(self) -> str:
        return f"{self.switchboard.ws_url}/ws/supervisor"

    def connect(self, count: int, max_jobs: int = 1, prefix: str = "fleet") -> float:
        """Connect `count` more simulated supervisors; wait until the switchboard lists
        them all as connected. Returns the seconds that took."""
        started = time.monotonic()
        done = self.fleet.call(
            "connect",
            url=self.ws_url,
            token=self.supervisor_token,
            count=count,
            prefix=prefix,
            max_jobs=max_jobs,
        )
        deadline = time.monotonic() + 120
        while True:
            listed = self.api.call("GET", "/api/v1/supervisors")
            if sum(1 for s in listed if s["connected"]) >= done["connected"]:
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise TimeoutError(f"{done['connected']} connected, switchboard lists fewer")
            time.sleep(0.05)

    def wait_word(self, kind: str, job_id: str, timeout_s: float) -> None:
        """Until the fleet reports (kind, job_id) on its event channel (after "watch")."""
        deadline = time.monotonic() + timeout_s
        while self.fleet.next_event(max(0.0, deadline - time.monotonic())) != (kind, job_id):
            pass


@contextlib.contextmanager
def testbed(extra_args: tuple[str, ...] = ()) -> Iterator[Bed]:
    """A switchboard (fresh data dir) and an empty fleet process; the switchboard's log
    tail goes to stderr if something fails."""
    raise_fd_limit()  # inherited by the switchboard process
    # The output benchmark writes hundreds of MB per run: measured whole, not cut at the
    # per-run cap.
    extra_args = ("--max-run-output", "0", *extra_args)
    with tempfile.TemporaryDirectory(prefix="sb-bench-") as tmp:
        switchboard = Switchboard(Path(tmp) / "data", extra_args=extra_args)
        try:
            fleet = FleetProcess()
            try:
                token = switchboard.create_token("supervisor")
                api = Api(switchboard.port, switchboard.admin_token)
                yield Bed(switchboard, fleet, api, token)
            finally:
                fleet.close()
        except Exception:
            # Connections come and go by the thousand: show only what went wrong.
            lines = [ln for ln in switchboard.process.log().splitlines() if " INFO " not in ln]
            print("switchboard log (tail, no INFO):", *lines[-40:], sep="\n", file=sys.stderr)
            raise
        finally:
            switchboard.stop()
