"""Several boards in one job, and job groups, end to end: a real switchboard and two real
supervisors (the noop backend) whose configs describe simulated boards (tests/simboard.py).

host-1: nrf-1 (probe a), nrf-2 (probe b), ppk-1.   host-2: nrf-3 (probe a), ppk-2.

A job asking for two boards gets both or waits holding nothing; a group across both hosts
is placed all or none; two groups wanting the same boards in opposite orders, one board
bad, never deadlock (neither holds part of what it needs, other jobs flow meanwhile, and
both run in turn once the board is good); an essential role's failure stops its group;
what the lab could never serve is refused at submit with the reason."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import (
    Process,
    Switchboard,
    run_cli,
    start_supervisor,
    wait_connected,
    wait_for,
    wait_job,
)
from tests.scrape import sample_value
from tests.simboard import SimBoard

pytestmark = pytest.mark.process

#: host -> its boards: (name, class, labels).
HOSTS = {
    "host-1": [
        ("nrf-1", "nrf", {"probe": "a"}),
        ("nrf-2", "nrf", {"probe": "b"}),
        ("ppk-1", "ppk2", {}),
    ],
    "host-2": [("nrf-3", "nrf", {"probe": "a"}), ("ppk-2", "ppk2", {})],
}


def _config(boards: dict[str, SimBoard], host: str) -> str:
    tables = []
    for name, cls, labels in HOSTS[host]:
        shown = ", ".join(f'{k} = "{v}"' for k, v in {**labels, "slot": name}.items())
        tables.append(
            f"""[[devices]]
name = "{name}"
path = "{boards[name].tty}"
resource = "{cls}"
labels = {{ {shown} }}
console = {{ path = "{boards[name].tty}", baud = 115200 }}
"""
        )
    return "\n".join(tables)


@pytest.fixture(scope="module")
def lab(
    switchboard: Switchboard, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    root = tmp_path_factory.mktemp("gangs")
    boards = {name: SimBoard(root / name) for devices in HOSTS.values() for name, _, _ in devices}
    sups: list[Process] = []
    client = switchboard.client()
    try:
        for host in HOSTS:
            config = root / f"{host}.toml"
            config.write_text(_config(boards, host))
            sups.append(
                start_supervisor(
                    switchboard,
                    root,
                    name=host,
                    backend="noop",
                    max_jobs=4,
                    labels={"host": host},
                    extra_args=("--config", str(config)),
                )
            )
        for host in HOSTS:
            wait_connected(client, host)
        wait_for(lambda: len(client.get("/api/v1/devices").json()) == 5, "5 devices declared")
        for board in boards:
            _health(client, board, "good")
        yield client
    finally:
        for sup in sups:
            sup.stop()
        client.close()
        for board in boards.values():
            board.stop()


def _health(client: httpx.Client, device: str, health: str) -> None:
    done = client.put(f"/api/v1/devices/{device}/health", json={"health": health, "reason": "t"})
    assert done.status_code == 200, done.text


def _board(slot: str, role: str | None = None) -> dict[str, Any]:
    wanted: dict[str, Any] = {"selector": {"match_labels": {"slot": slot}}}
    if role:
        wanted["role"] = role
    return wanted


def _spec(name: str, *devices: dict[str, Any], delay: float = 0.3, **extra: Any) -> dict[str, Any]:
    backend = {"kind": "noop", "delay_s": delay, **extra.pop("backend", {})}
    return {"name": name, "backend": backend, "devices": list(devices), **extra}


def _group(name: str, **roles: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "roles": [{"role": role, **body} for role, body in roles.items()]}


def _submit_group(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    made = client.post("/api/v1/groups", json=body)
    assert made.status_code == 201, made.text
    return made.json()


def _group_view(client: httpx.Client, group_id: str) -> dict[str, Any]:
    return client.get(f"/api/v1/groups/{group_id}").json()


def _wait_group(client: httpx.Client, group_id: str, timeout: float = 30) -> dict[str, Any]:
    wait_for(
        lambda: _group_view(client, group_id)["state"] in ("succeeded", "failed", "canceled"),
        f"group {group_id} ended",
        timeout=timeout,
    )
    return _group_view(client, group_id)


def _holders(client: httpx.Client) -> dict[str, str | None]:
    return {d["id"]: d["holder"] for d in client.get("/api/v1/devices").json()}


def _stays(check: Any, seconds: float = 1.5) -> None:
    """`check()` holds now and still after `seconds` (several dispatch passes)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert check()
        time.sleep(0.1)


def test_a_job_asking_for_two_boards_gets_both_or_waits(lab: httpx.Client) -> None:
    client = lab
    body = _spec(
        "dut-and-meter",
        {"class": "nrf", "selector": {"match_labels": {"probe": "b"}}, "role": "dut"},
        {"class": "ppk2", "role": "meter"},
    )
    made = client.post("/api/v1/jobs", json=body)
    assert made.status_code == 201, made.text
    job = wait_job(client, made.json()["id"])
    assert job["phase"] == "succeeded", job
    run = job["runs"][-1]
    assert run["supervisor_id"] == "host-1"
    assert run["devices"] == ["nrf-2", "ppk-1"]
    assert run["device_roles"] == {"dut": "nrf-2", "meter": "ppk-1"}
    # Its meter bad: the job waits, holding nothing (not even the free nrf-2)...
    _health(client, "ppk-1", "bad")
    try:
        waiting = client.post("/api/v1/jobs", json=body).json()["id"]
        _stays(
            lambda: (
                client.get(f"/api/v1/jobs/{waiting}").json()["phase"] == "queued"
                and _holders(client)["nrf-2"] is None
            )
        )
    finally:
        _health(client, "ppk-1", "good")
    # ...and runs with both once the meter is good again.
    job = wait_job(client, waiting)
    assert job["phase"] == "succeeded" and job["runs"][-1]["devices"] == ["nrf-2", "ppk-1"]


def test_a_group_across_two_hosts_is_placed_all_or_none(lab: httpx.Client) -> None:
    client = lab
    _health(client, "nrf-2", "maintenance")
    try:
        group = _submit_group(
            client,
            _group(
                "across",
                flasher={"spec": _spec("flasher", _board("nrf-2"))},
                meter={"spec": _spec("meter", _board("nrf-3"), {"class": "ppk2"})},
            ),
        )
        assert group["state"] == "waiting" and [r["role"] for r in group["roles"]] == [
            "flasher",
            "meter",
        ]
        # Role meter's boards are free, but its group can't be placed whole: nothing runs.
        _stays(
            lambda: (
                _group_view(client, group["id"])["state"] == "waiting"
                and _holders(client)["nrf-3"] is None
                and _holders(client)["ppk-2"] is None
            )
        )
    finally:
        _health(client, "nrf-2", "good")
    ended = _wait_group(client, group["id"])
    assert ended["state"] == "succeeded", ended
    assert ended["placed_at"] is not None and ended["ended_at"] is not None
    hosts = {r["role"]: (r["supervisor_id"], r["devices"]) for r in ended["roles"]}
    assert hosts == {"flasher": ("host-1", ["nrf-2"]), "meter": ("host-2", ["nrf-3", "ppk-2"])}
    for role in ended["roles"]:
        job = client.get(f"/api/v1/jobs/{role['job_id']}").json()
        assert job["group"] == group["id"] and job["phase"] == "succeeded"
    # Both started in the same placement.
    starts = [
        client.get(f"/api/v1/jobs/{r['job_id']}").json()["runs"][0]["created_at"]
        for r in ended["roles"]
    ]
    assert abs(starts[0] - starts[1]) < 0.5
    assert group["id"] in [g["id"] for g in client.get("/api/v1/groups").json()]


def test_two_groups_wanting_the_same_boards_never_deadlock(lab: httpx.Client) -> None:
    """The classic deadlock: X wants nrf-1 then ppk-2, Y wants ppk-2 then nrf-1. With
    nrf-1 bad, a scheduler holding partial sets would let one take ppk-2 and wait for
    nrf-1 for ever while the other waits for ppk-2."""
    client = lab
    _health(client, "nrf-1", "bad")
    metrics_before = sample_value(
        httpx.get(f"{client.base_url}/metrics").text,
        "switchboard_runs_placed_total",
        via="group",
    )
    x = _submit_group(
        client,
        _group(
            "x",
            first={"spec": _spec("x-nrf", _board("nrf-1"), delay=0.6)},
            second={"spec": _spec("x-ppk", _board("ppk-2"), delay=0.6)},
        ),
    )
    y = _submit_group(
        client,
        _group(
            "y",
            first={"spec": _spec("y-ppk", _board("ppk-2"), delay=0.6)},
            second={"spec": _spec("y-nrf", _board("nrf-1"), delay=0.6)},
        ),
    )
    try:
        # Neither holds any part of what it needs...
        _stays(
            lambda: (
                _group_view(client, x["id"])["state"] == "waiting"
                and _group_view(client, y["id"])["state"] == "waiting"
                and _holders(client)["ppk-2"] is None
            )
        )
        # ...and other jobs keep flowing, on those very boards' hosts and on ppk-2 itself.
        others = [
            client.post("/api/v1/jobs", json=_spec(f"other-{i}", _board("ppk-2"), delay=0.05))
            for i in range(3)
        ] + [
            client.post("/api/v1/jobs", json={"name": f"plain-{i}", "backend": {"kind": "noop"}})
            for i in range(3)
        ]
        for made in others:
            assert made.status_code == 201, made.text
            assert wait_job(client, made.json()["id"])["phase"] == "succeeded"
        assert _group_view(client, x["id"])["state"] == "waiting"
    finally:
        _health(client, "nrf-1", "good")
    # The board good again: both groups run, in turn (they want the same boards).
    done_x, done_y = _wait_group(client, x["id"]), _wait_group(client, y["id"])
    assert (done_x["state"], done_y["state"]) == ("succeeded", "succeeded")

    def span(group: dict[str, Any]) -> tuple[float, float]:
        runs = [
            client.get(f"/api/v1/jobs/{r['job_id']}").json()["runs"][-1] for r in group["roles"]
        ]
        return min(r["created_at"] for r in runs), max(r["ended_at"] for r in runs)

    (x0, x1), (y0, y1) = span(done_x), span(done_y)
    assert x1 <= y0 or y1 <= x0, "the two groups held the same boards at once"
    assert x0 < y0  # the older group first
    metrics_after = sample_value(
        httpx.get(f"{client.base_url}/metrics").text,
        "switchboard_runs_placed_total",
        via="group",
    )
    assert metrics_after - metrics_before == 4


def test_an_essential_roles_failure_stops_its_group(
    lab: httpx.Client, switchboard: Switchboard, tmp_path: Path
) -> None:
    client = lab
    body = _group(
        "fails",
        dut={"spec": _spec("dut", _board("nrf-3"), delay=0.3, backend={"exit_code": 3})},
        meter={"spec": _spec("meter", _board("ppk-2"), delay=60)},
        logger={"spec": _spec("logger", delay=60), "essential": False},
    )
    path = tmp_path / "group.json"
    path.write_text(json.dumps(body))
    # Through the CLI, as a person would.
    done = run_cli(
        *("-m", "switchboard", "group", "submit", str(path), "--json"),
        *("--url", switchboard.url, "--token", switchboard.admin_token),
    )
    group_id = json.loads(done.stdout)["id"]
    ended = _wait_group(client, group_id)
    assert ended["state"] == "failed", ended
    assert ended["reason"] == f"essential role 'dut' of group {group_id} ended failed"
    phases = {r["role"]: (r["phase"], r["reason"]) for r in ended["roles"]}
    assert phases["dut"][0] == "failed"
    for role in ("meter", "logger"):
        phase, reason = phases[role]
        assert phase == "canceled" and "essential role 'dut'" in reason, ended
    assert _holders(client)["ppk-2"] is None
    shown = run_cli(
        *("-m", "switchboard", "group", "show", group_id),
        *("--url", switchboard.url, "--token", switchboard.admin_token),
    ).stdout.decode()
    assert "failed" in shown and "dut" in shown and "essential role 'dut'" in shown
    metrics = httpx.get(f"{client.base_url}/metrics").text
    assert sample_value(metrics, "switchboard_groups_stopped_total") >= 1
    # A role that is not essential may fail alone: the group succeeds.
    calm = _submit_group(
        client,
        _group(
            "calm",
            main={"spec": _spec("main", delay=0.5)},
            probe={"spec": _spec("probe", delay=0, backend={"exit_code": 1}), "essential": False},
        ),
    )
    assert _wait_group(client, calm["id"])["state"] == "succeeded"


def test_what_the_lab_could_never_serve_is_refused_at_submit(lab: httpx.Client) -> None:
    client = lab

    def refused_count() -> float:
        text = httpx.get(f"{client.base_url}/metrics").text
        return sample_value(text, "switchboard_submissions_refused_total", reason="no_device")

    before = refused_count()
    probe_a = {"class": "nrf", "selector": {"match_labels": {"probe": "a"}}}
    twice = client.post("/api/v1/jobs", json=_spec("two-a", probe_a, probe_a))
    assert twice.status_code == 400, twice.text
    body = twice.json()
    assert (body["error"], body["field"]) == ("unsatisfiable", "devices")
    assert "no supervisor has devices that are not retired" in body["message"]
    assert "nrf (probe=a)" in body["message"]
    unknown = client.post("/api/v1/jobs", json=_spec("stm", {"class": "stm32"}))
    assert unknown.status_code == 400
    assert "no device of class 'stm32' is in the lab" in unknown.json()["message"]
    # A group whose roles each fit, but never all at once: nrf-2 is the only probe-b board.
    probe_b = {"spec": _spec("b", {"selector": {"match_labels": {"probe": "b"}}})}
    greedy = client.post("/api/v1/groups", json=_group("greedy", one=probe_b, two=probe_b))
    assert greedy.status_code == 400, greedy.text
    assert greedy.json()["error"] == "unsatisfiable" and greedy.json()["field"] == "roles"
    assert "can't all be placed at once" in greedy.json()["message"]
    stm = client.post(
        "/api/v1/groups", json=_group("stm", x={"spec": _spec("x", {"class": "stm32"})})
    )
    assert stm.status_code == 400 and stm.json()["field"] == "roles[0].spec.devices"
    # A role with a restart policy: refused (it is placed once, with its group).
    again = client.post(
        "/api/v1/groups",
        json=_group("again", r={"spec": {**_spec("r"), "restart": {"policy": "always"}}}),
    )
    assert again.status_code == 400 and again.json()["field"] == "roles[0].spec.restart"
    # Retired boards never serve again.
    _health(client, "nrf-2", "retired")
    try:
        late = client.post("/api/v1/jobs", json=_spec("late", probe_b["spec"]["devices"][0]))
        assert late.status_code == 400
    finally:
        _health(client, "nrf-2", "good")
    assert refused_count() - before == 5
    assert client.get("/api/v1/groups").json()[0]["name"] not in ("greedy", "stm", "again")
