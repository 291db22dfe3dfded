"""What every switchboard scenario shares: the kit's scripted supervisors (one id each, enrolled
with the registration token, then connecting with the credential it made), their hellos and
sequence numbers, jobs submitted for them alone, and the rows a scenario records.

Each scripted supervisor advertises a label naming itself, and every job the kit submits
selects that label, so a busy switchboard gives the kit's jobs to no one else and the kit
gets no one else's jobs.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any

from conformance.report import Result
from conformance.sb_client import Received, Refused, SupervisorSocket, open_socket
from conformance.sb_rest import TERMINAL, SwitchboardApi
from protocol.messages import (
    HeldRun,
    Hello,
    JobExit,
    JobStateChanged,
    Output,
    ProtocolErrorMessage,
    StartJob,
    Stream,
    Welcome,
)
from protocol.state import Phase
from protocol.tokens import new_token, token_sha256
from protocol.versions import supported_versions

#: The label each scripted supervisor advertises (its own id) and its jobs select.
LABEL = "conformance-kit"


class Broken(Exception):
    """A step a scenario depends on did not happen; its remaining rows fail with this."""


@dataclass
class Rows:
    """The rows of one scenario: each named up front, so a scenario cut short still
    reports every row (as not checked)."""

    names: tuple[str, ...]
    results: dict[str, Result] = field(default_factory=dict)

    def check(self, name: str, passed: bool, detail: str) -> bool:
        assert name in self.names, name
        self.results[name] = Result(name, passed, detail)
        return passed

    def finish(self, why: str) -> list[Result]:
        """Every row, those not recorded failing with `why`."""
        return [self.results.get(n) or Result(n, False, f"not checked: {why}") for n in self.names]


@dataclass
class ScriptedSupervisor:
    """One supervisor id of the kit: its credential once enrolled, and its event numbers."""

    id: str
    credential: str | None = None
    last_seq: int = 0
    sessions: list[int] = field(default_factory=list)

    def seq(self) -> int:
        """The next event number (§6.1: one more than the last, across connections)."""
        self.last_seq += 1
        return self.last_seq

    def state(self, job_id: str, phase: Phase, **fields: Any) -> JobStateChanged:
        return JobStateChanged(seq=self.seq(), job_id=job_id, attempt=1, phase=phase, **fields)

    def output(self, job_id: str, offset: int, data: bytes, stream: Stream = "stdout") -> Output:
        return Output(
            seq=self.seq(), job_id=job_id, attempt=1, stream=stream, offset=offset, data=data
        )

    def exit(self, job_id: str, exit_code: int | None = 0, **fields: Any) -> JobExit:
        return JobExit(seq=self.seq(), job_id=job_id, attempt=1, exit_code=exit_code, **fields)


class Kit:
    """The switchboard under test, as the scenarios reach it."""

    def __init__(
        self,
        *,
        url: str,
        registration_token: str,
        api: SwitchboardApi,
        prefix: str,
        timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.url = url
        self.registration_token = registration_token
        self.api = api
        self.prefix = prefix
        self.timeout = timeout
        self.ssl_context = ssl_context
        self.jobs: list[str] = []
        self.sockets: list[SupervisorSocket] = []

    def supervisor(self, role: str) -> ScriptedSupervisor:
        return ScriptedSupervisor(f"{self.prefix}-{role}")

    async def open(self, token: str) -> SupervisorSocket:
        socket = await open_socket(
            self.url, token, ssl_context=self.ssl_context, open_timeout=self.timeout
        )
        self.sockets.append(socket)
        return socket

    def hello(self, sup: ScriptedSupervisor, **fields: Any) -> Hello:
        values: dict[str, Any] = {
            "supervisor_id": sup.id,
            "name": f"conformance kit ({sup.id})",
            "versions": supported_versions(),
            "backends": ["noop"],
            "labels": {LABEL: sup.id},
            "max_jobs": 4,
            "last_seq": sup.last_seq,
            "software": "switchboard-conformance",
        }
        values.update(fields)
        return Hello(**values)

    async def say_hello(
        self, sup: ScriptedSupervisor, hold_status: bool = False, **fields: Any
    ) -> tuple[SupervisorSocket, Received | None, str | None]:
        """Upgrade and send a hello (enrolling `sup` if it has no credential yet); the socket,
        the first thing the switchboard answered (None: nothing in time), and the credential
        offered for enrolment, if any. `hold_status`: keep status_request unanswered until
        the scenario releases them (SupervisorSocket.release_status)."""
        offered = None
        if sup.credential is None:
            offered = new_token()
            fields.setdefault("credential_sha256", token_sha256(offered).hex())
        socket = await self.open(sup.credential or self.registration_token)
        # Before anything is read: a status_request may come right after the welcome.
        socket.held = {(r.job_id, r.attempt): r for r in fields.get("runs", [])}
        socket.hold_status = hold_status
        await socket.send(self.hello(sup, **fields))
        await socket.expect(lambda m: True, self.timeout)
        first = socket.received[0] if socket.received else None
        return socket, first, offered

    async def connect(
        self,
        sup: ScriptedSupervisor,
        *,
        keep_alive: bool = True,
        hold_status: bool = False,
        **fields: Any,
    ) -> tuple[SupervisorSocket, Welcome]:
        """A connection that got its welcome; Broken if it got anything else."""
        try:
            socket, first, offered = await self.say_hello(sup, hold_status, **fields)
        except Refused as refused:
            raise Broken(f"the upgrade was refused: {refused}") from None
        welcome = first.message if first else None
        if not isinstance(welcome, Welcome):
            raise Broken(f"hello of {sup.id} answered with {describe(first)}")
        if offered is not None:
            if not welcome.enrolled:
                raise Broken(f"welcome of a new id ({sup.id}) did not say enrolled")
            sup.credential = offered
        sup.sessions.append(welcome.session)
        # §4 step 4 of the checklist: number on after the highest seq either side knows.
        sup.last_seq = max(sup.last_seq, welcome.last_seq)
        if keep_alive:
            socket.keep_alive(welcome.heartbeat_interval_s)
        return socket, welcome

    def spec(self, sup: ScriptedSupervisor, **backend: Any) -> dict[str, Any]:
        """A noop job only `sup` matches."""
        return {
            "name": f"conformance {sup.id}",
            "backend": {"kind": "noop", **backend},
            "selector": {"match_labels": {LABEL: sup.id}},
            "timeout_s": 600,
        }

    async def submit(self, sup: ScriptedSupervisor, **backend: Any) -> str:
        job_id = await self.api.submit(self.spec(sup, **backend))
        self.jobs.append(job_id)
        return job_id

    async def start_of(self, socket: SupervisorSocket, job_id: str) -> StartJob:
        """The start_job of the job's first run; Broken if none comes in time."""
        start: StartJob | None = await socket.expect(
            lambda m: isinstance(m, StartJob) and m.job_id == job_id, self.timeout
        )
        if start is None:
            raise Broken(f"no start_job for job {job_id} within {self.timeout:g} s")
        socket.held[(job_id, start.attempt)] = HeldRun(job_id, start.attempt, Phase.ASSIGNED)
        return start

    async def cleanup(self) -> None:
        """Close every socket and cancel the kit's jobs that have not ended."""
        for socket in self.sockets:
            await socket.close()
        for job_id in self.jobs:
            try:
                if (await self.api.job(job_id))["phase"] not in TERMINAL:
                    await self.api.cancel(job_id)
            except Exception:  # cleanup is best effort; the table is what matters
                pass


def describe(item: Received | None) -> str:
    """A received frame, short, for a row's detail."""
    if item is None:
        return "nothing"
    raw = item.raw if isinstance(item.raw, str) else item.raw.decode(errors="replace")
    return raw if len(raw) <= 200 else raw[:200] + "…"


async def goodbye(socket: SupervisorSocket, code: int, within: float) -> tuple[bool, str]:
    """Whether the switchboard sent a protocol_error with `code` and a reason, then closed
    with `code` (docs/protocol.md §10); what was seen."""
    await socket.wait_closed(within)
    errors = socket.of_type(ProtocolErrorMessage)
    error = errors[0] if errors else None
    seen = goodbye_seen(socket) + ("" if socket.closed else f" after {within:g} s")
    passed = (
        error is not None
        and error.code == code
        and bool(error.reason)
        and socket.close_code == code
    )
    return passed, seen


def goodbye_seen(socket: SupervisorSocket) -> str:
    """The protocol_error and close a connection got so far, for a row's detail."""
    errors = socket.of_type(ProtocolErrorMessage)
    said = (
        f"protocol_error {errors[0].code} {errors[0].reason!r}" if errors else "no protocol_error"
    )
    return said + (f", close {socket.close_code}" if socket.closed else ", still open")
