"""The jobs REST API end to end: batches, listing and paging, deletion, the audit trail,
concurrency admission, queue timeouts, unschedulable jobs and secret parameters, against a
real switchboard process and a noop supervisor."""

from __future__ import annotations

import json
import uuid
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
    wait_running,
)

SUPERVISOR = "api-noop"
#: A selector no supervisor of this module satisfies: such jobs stay queued.
NOWHERE = {"match_labels": {"placement": "nowhere"}}


@pytest.fixture(scope="module")
def supervisor(switchboard: Switchboard, work_dir: Path) -> Iterator[Process]:
    process = start_supervisor(
        switchboard, work_dir, name=SUPERVISOR, backend="noop", max_jobs=4, labels={"pool": "api"}
    )
    wait_connected(switchboard.client(), SUPERVISOR)
    yield process
    process.stop()


@pytest.fixture
def client(switchboard: Switchboard, supervisor: Process) -> Iterator[httpx.Client]:
    with switchboard.client() as api:
        yield api


def tag() -> str:
    """A label value unique to one test, so listings see only that test's jobs."""
    return uuid.uuid4().hex[:12]


def spec(name: str = "api", **fields: Any) -> dict[str, Any]:
    backend = {"kind": "noop", **fields.pop("backend", {})}
    return {"name": name, "backend": backend, **fields}


def submit(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/api/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def listed(client: httpx.Client, **params: Any) -> list[str]:
    response = client.get("/api/v1/jobs", params=params)
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


def cancel_all(client: httpx.Client, job_ids: list[str]) -> None:
    for job_id in job_ids:
        client.post(f"/api/v1/jobs/{job_id}/cancel")


# --- batches ---------------------------------------------------------------------------


def test_batch_creates_every_job_in_order(client):
    batch = tag()
    specs = [spec(f"batch-{i}", labels={"batch": batch}, priority=i) for i in range(5)]
    response = client.post("/api/v1/jobs/batch", json=specs)
    assert response.status_code == 201, response.text
    created = response.json()["jobs"]
    assert [c["phase"] for c in created] == ["queued"] * 5
    ids = [c["id"] for c in created]
    assert len(set(ids)) == 5
    # Each id is the job of the spec at the same position.
    for i, job_id in enumerate(ids):
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        assert (job["name"], job["priority"]) == (f"batch-{i}", i)
    # Newest first: the batch's order, reversed.
    assert listed(client, label=f"batch={batch}") == ids[::-1]
    for job_id in ids:
        assert wait_job(client, job_id)["phase"] == "succeeded"


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (spec("bad", backend={"delay_s": -1}), "[1].backend.delay_s"),
        (
            {"name": "bad", "backend": {"kind": "wasm", "module": "sha256:" + "ab" * 32}},
            "[1].backend.module",
        ),
    ],
    ids=["invalid-spec", "missing-artifact"],
)
def test_batch_with_one_bad_spec_creates_nothing(client, bad, field):
    batch = tag()
    specs = [spec("ok", labels={"batch": batch}), bad, spec("ok", labels={"batch": batch})]
    specs[1]["labels"] = {"batch": batch}
    response = client.post("/api/v1/jobs/batch", json=specs)
    assert response.status_code == 400, response.text
    body = response.json()
    # Which spec of the batch is wrong, and where.
    assert body["error"] in ("invalid_spec", "invalid_request")
    assert body["field"] == field
    assert body["message"].startswith(f"{field}: ")
    assert listed(client, label=f"batch={batch}") == []


def test_batch_limits(client):
    from switchboard.api.jobs import MAX_BATCH

    batch = tag()
    specs = [spec("many", labels={"batch": batch})] * (MAX_BATCH + 1)
    response = client.post("/api/v1/jobs/batch", json=specs)
    assert response.status_code == 413, response.text
    assert response.json()["error"] == "too_large"
    assert str(MAX_BATCH) in response.json()["message"]
    assert listed(client, label=f"batch={batch}") == []
    empty = client.post("/api/v1/jobs/batch", json=[])
    assert empty.status_code == 400
    assert empty.json()["error"] == "invalid_request"


# --- listing ---------------------------------------------------------------------------


@pytest.fixture
def mixed_jobs(client: httpx.Client) -> Iterator[dict[str, Any]]:
    """Two batches: `red` succeeds, `blue` fails, `plain` (no color) stays queued; then a
    later batch with one job, `late`."""
    suite = tag()
    first = client.post(
        "/api/v1/jobs/batch",
        json=[
            spec("red", labels={"suite": suite, "color": "red"}),
            spec("blue", labels={"suite": suite, "color": "blue"}, backend={"exit_code": 3}),
            spec("plain", labels={"suite": suite}, selector=NOWHERE),
        ],
    ).json()["jobs"]
    red, blue, plain = (j["id"] for j in first)
    assert wait_job(client, red)["phase"] == "succeeded"
    assert wait_job(client, blue)["phase"] == "failed"
    late = submit(client, spec("late", labels={"suite": suite}, selector=NOWHERE))["id"]
    jobs = {"suite": suite, "red": red, "blue": blue, "plain": plain, "late": late}
    yield jobs
    cancel_all(client, [plain, late])


def test_list_filters_by_phase(client, mixed_jobs):
    j = mixed_jobs
    suite = f"suite={j['suite']}"
    assert listed(client, label=suite, phase="succeeded") == [j["red"]]
    assert listed(client, label=suite, phase=["succeeded", "failed"]) == [j["blue"], j["red"]]
    assert listed(client, label=suite, phase="queued") == [j["late"], j["plain"]]
    assert listed(client, label=suite, phase="canceled") == []
    bad = client.get("/api/v1/jobs", params={"phase": "sleeping"})
    assert bad.status_code == 400


def test_list_filters_by_label(client, mixed_jobs):
    j = mixed_jobs
    suite = f"suite={j['suite']}"
    assert listed(client, label=[suite, "color=red"]) == [j["red"]]
    # `!=` also holds for jobs without the label at all.
    assert listed(client, label=[suite, "color!=red"]) == [j["late"], j["plain"], j["blue"]]
    assert listed(client, label=[suite, "color"]) == [j["blue"], j["red"]]
    assert listed(client, label=[suite, "!color"]) == [j["late"], j["plain"]]
    assert listed(client, label=[suite, "color=green"]) == []
    for bad in ("!color=red", "=red", "bad key"):
        response = client.get("/api/v1/jobs", params={"label": bad})
        assert response.status_code == 400, bad
        assert response.json()["field"] == "label"


def test_list_filters_by_supervisor_and_creation_time(client, mixed_jobs):
    j = mixed_jobs
    suite = f"suite={j['suite']}"
    assert listed(client, label=suite, supervisor=SUPERVISOR) == [j["blue"], j["red"]]
    assert listed(client, label=suite, supervisor="no-such-supervisor") == []
    late_at = client.get(f"/api/v1/jobs/{j['late']}").json()["created_at"]
    # created_after is inclusive, created_before exclusive: the two split the jobs.
    assert listed(client, label=suite, created_after=late_at) == [j["late"]]
    assert listed(client, label=suite, created_before=late_at) == [j["plain"], j["blue"], j["red"]]
    red_at = client.get(f"/api/v1/jobs/{j['red']}").json()["created_at"]
    window = listed(client, label=suite, created_after=red_at, created_before=late_at)
    assert window == [j["plain"], j["blue"], j["red"]]


def test_cursor_pagination_walks_every_job_once_newest_first(client):
    page_tag = tag()
    total = 120
    created = client.post(
        "/api/v1/jobs/batch",
        json=[spec(f"page-{i}", labels={"page": page_tag}, selector=NOWHERE) for i in range(total)],
    ).json()["jobs"]
    ids = [c["id"] for c in created]
    try:
        first = client.get("/api/v1/jobs", params={"label": f"page={page_tag}"}).json()
        assert len(first["items"]) == 50  # the default page
        assert first["next_cursor"]

        def walk(limit: int) -> tuple[list[str], list[int]]:
            seen: list[str] = []
            sizes: list[int] = []
            cursor = None
            while True:
                params: dict[str, Any] = {"label": f"page={page_tag}", "limit": limit}
                if cursor:
                    params["cursor"] = cursor
                page = client.get("/api/v1/jobs", params=params).json()
                sizes.append(len(page["items"]))
                seen += [item["id"] for item in page["items"]]
                cursor = page["next_cursor"]
                if cursor is None:
                    return seen, sizes
                assert len(sizes) < total, "pagination does not end"

        for limit, expected_sizes in ((50, [50, 50, 20]), (40, [40, 40, 40, 0]), (500, [120])):
            seen, sizes = walk(limit)
            assert seen == ids[::-1], f"limit {limit}"
            assert sizes == expected_sizes, f"limit {limit}"
    finally:
        cancel_all(client, ids)


def test_list_limits_and_bad_cursor(client):
    for limit in (0, 501):
        response = client.get("/api/v1/jobs", params={"limit": limit})
        assert response.status_code == 400, limit
        assert response.json()["error"] == "invalid_request"
    assert client.get("/api/v1/jobs", params={"limit": 500}).status_code == 200
    bad = client.get("/api/v1/jobs", params={"cursor": "not-a-cursor"})
    assert bad.status_code == 400
    assert bad.json()["field"] == "cursor"


# --- deletion --------------------------------------------------------------------------


def test_delete_an_ended_job(client):
    job_id = submit(client, spec("doomed", backend={"output": "bye\n"}))["id"]
    assert wait_job(client, job_id)["phase"] == "succeeded"
    assert client.delete(f"/api/v1/jobs/{job_id}").status_code == 204
    for path in ("", "/runs", "/events"):
        response = client.get(f"/api/v1/jobs/{job_id}{path}")
        assert response.status_code == 404, path
        assert response.json()["error"] == "not_found"
    assert job_id not in listed(client, limit=500)
    # Idempotent: deleting what is gone succeeds too.
    assert client.delete(f"/api/v1/jobs/{job_id}").status_code == 204


def test_delete_refuses_active_jobs(client, switchboard):
    running = submit(client, spec("busy", backend={"delay_s": 60}))["id"]
    queued = submit(client, spec("waiting", selector=NOWHERE))["id"]
    try:
        wait_running(client, running)
        for job_id in (running, queued):
            response = client.delete(f"/api/v1/jobs/{job_id}")
            assert response.status_code == 409, response.text
            assert response.json()["error"] == "job_active"
            assert client.get(f"/api/v1/jobs/{job_id}").status_code == 200
        # Deleting needs the operate permission, which a submitter lacks.
        with switchboard.client(switchboard.create_token("submitter")) as submitter:
            assert submitter.delete(f"/api/v1/jobs/{queued}").status_code == 403
    finally:
        cancel_all(client, [running, queued])
    assert wait_job(client, running)["phase"] == "canceled"
    assert client.delete(f"/api/v1/jobs/{running}").status_code == 204
    assert client.delete(f"/api/v1/jobs/{queued}").status_code == 204


# --- runs and the audit trail ----------------------------------------------------------


def test_runs_and_events_tell_the_story_with_actors(client, switchboard):
    made = client.post("/api/v1/tokens", json={"role": "operator", "name": "alice"}).json()
    with switchboard.client(made["token"]) as alice:
        job_id = submit(client, spec("story", backend={"delay_s": 60}))["id"]
        wait_running(client, job_id)
        assert alice.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 202
    job = wait_job(client, job_id)
    assert job["phase"] == "canceled" and job["cancel_requested"]

    runs = client.get(f"/api/v1/jobs/{job_id}/runs").json()
    assert len(runs) == 1
    [run] = runs
    assert run["attempt"] == 1 and run["supervisor_id"] == SUPERVISOR
    assert run["phase"] == "canceled"
    phases = [p["phase"] for p in run["phases"]]
    assert phases[0] == "assigned" and "running" in phases and phases[-1] == "canceled"
    assert run["started_at"] is not None and run["ended_at"] >= run["started_at"]

    events = client.get(f"/api/v1/jobs/{job_id}/events").json()
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "submitted"
    assert events[0]["actor"].startswith("admin (")
    [cancel] = [e for e in events if e["kind"] == "cancel_requested"]
    assert cancel["actor"] == f"alice ({made['id']})"
    messages = [e["message"] for e in events if e["kind"] == "run_phase"]
    assert messages[0] == "run 1: assigned"
    assert "run 1: running" in messages
    assert messages[-1].startswith("run 1: canceled")
    # In time order, and the cancel comes after the run started.
    stamps = [e["at"] for e in events]
    assert stamps == sorted(stamps)
    running_at = next(i for i, e in enumerate(events) if e["message"] == "run 1: running")
    assert kinds.index("cancel_requested") > running_at


# --- concurrency admission -------------------------------------------------------------


def keyed(name: str, key: str, policy: str, **fields: Any) -> dict[str, Any]:
    return spec(name, concurrency={"key": key, "policy": policy}, **fields)


def test_queue_policy_waits_for_the_key(client):
    key = f"k-{tag()}"
    first = submit(client, keyed("first", key, "queue", backend={"delay_s": 3}))["id"]
    second = submit(client, keyed("second", key, "queue"))
    assert second["phase"] == "queued"
    wait_running(client, first)
    # The supervisor has free slots: only the key keeps the second job waiting.
    assert client.get(f"/api/v1/jobs/{second['id']}").json()["phase"] == "queued"
    done_first = wait_job(client, first)
    done_second = wait_job(client, second["id"])
    assert done_first["phase"] == done_second["phase"] == "succeeded"
    assert done_second["runs"][0]["started_at"] >= done_first["runs"][0]["ended_at"]


def test_drop_if_running_rejects_while_the_key_is_held(client, switchboard, tmp_path):
    key = f"k-{tag()}"
    holder = submit(client, keyed("holder", key, "queue", backend={"delay_s": 60}))["id"]
    try:
        wait_running(client, holder)
        dropped = submit(client, keyed("dropped", key, "drop_if_running"))
        assert dropped["phase"] == "rejected"
        assert key in dropped["reason"] and holder in dropped["reason"]
        job = client.get(f"/api/v1/jobs/{dropped['id']}").json()
        assert job["phase"] == "rejected" and job["runs"] == []
        kinds = [e["kind"] for e in client.get(f"/api/v1/jobs/{dropped['id']}/events").json()]
        assert kinds == ["submitted", "dropped"]
        # The CLI says so and exits unsuccessfully.
        path = tmp_path / "dropped.json"
        path.write_text(json.dumps(keyed("cli", key, "drop_if_running")))
        done = run_cli(
            "-m",
            "switchboard",
            "job",
            "submit",
            str(path),
            "--url",
            switchboard.url,
            "--token",
            switchboard.admin_token,
            check=False,
        )
        assert done.returncode == 1, done.stderr
        assert b"rejected" in done.stderr
        # The holder was not disturbed.
        assert client.get(f"/api/v1/jobs/{holder}").json()["phase"] == "running"
    finally:
        cancel_all(client, [holder])
    assert wait_job(client, holder)["phase"] == "canceled"
    # Once the key is free, drop_if_running runs like any job.
    free = submit(client, keyed("free", key, "drop_if_running"))
    assert free["phase"] == "queued"
    assert wait_job(client, free["id"])["phase"] == "succeeded"


def test_replace_cancels_the_holder_and_runs(client):
    key = f"k-{tag()}"
    old = submit(client, keyed("old", key, "queue", backend={"delay_s": 60}))["id"]
    wait_running(client, old)
    new = submit(client, keyed("new", key, "replace"))
    assert new["phase"] == "queued"
    done_old = wait_job(client, old)
    done_new = wait_job(client, new["id"])
    assert done_old["phase"] == "canceled"
    assert done_new["phase"] == "succeeded"
    assert done_new["runs"][0]["started_at"] >= done_old["runs"][0]["ended_at"]
    old_events = client.get(f"/api/v1/jobs/{old}/events").json()
    [cancel] = [e for e in old_events if e["kind"] == "cancel_requested"]
    assert cancel["message"] == f"replaced by job {new['id']}"
    new_events = client.get(f"/api/v1/jobs/{new['id']}/events").json()
    assert any(e["kind"] == "replaced" and old in e["message"] for e in new_events)


# --- queue timeout and unschedulable jobs ----------------------------------------------


def test_queue_timeout_ends_a_job_nobody_takes(client):
    job_id = submit(client, spec("stuck", selector=NOWHERE, queue_timeout_s=1))["id"]
    job = wait_job(client, job_id, timeout=15)
    assert job["phase"] == "timed_out"
    assert job["runs"] == []
    assert "queue timeout" in job["reason"]
    events = client.get(f"/api/v1/jobs/{job_id}/events").json()
    assert [e["kind"] for e in events] == ["submitted", "queue_timeout"]
    # A job placed in time is not touched by its queue timeout.
    placed = submit(client, spec("prompt", queue_timeout_s=1, backend={"delay_s": 2}))["id"]
    assert wait_job(client, placed)["phase"] == "succeeded"


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"selector": NOWHERE}, "no supervisor running backend 'noop' matches the selector"),
        ({"resources": {"gpu": 1}}, "no supervisor matching the selector has resources gpu=1"),
        (
            {"backend": {"kind": "docker", "image": "alpine"}},
            "no registered supervisor runs backend 'docker'",
        ),
    ],
    ids=["selector", "resources", "backend"],
)
def test_unschedulable_job_says_why_and_blocks_nothing(client, extra, reason):
    body = {"name": "never", "backend": {"kind": "noop"}, **extra}
    never = submit(client, body)["id"]
    try:

        def noted() -> dict[str, Any] | None:
            job = client.get(f"/api/v1/jobs/{never}").json()
            return job if job["unschedulable"] else None

        job = wait_for(noted, "the unschedulable note")
        assert job["unschedulable"].startswith(reason)
        assert job["phase"] == "queued"
        [summary] = [
            s
            for s in client.get("/api/v1/jobs", params={"phase": "queued"}).json()["items"]
            if s["id"] == never
        ]
        assert summary["unschedulable"] == job["unschedulable"]
        # A job submitted behind it runs.
        behind = submit(client, spec("behind"))["id"]
        assert wait_job(client, behind)["phase"] == "succeeded"
        assert client.get(f"/api/v1/jobs/{never}").json()["phase"] == "queued"
    finally:
        cancel_all(client, [never])


# --- secrets ---------------------------------------------------------------------------


def test_secret_parameters_are_never_shown(client, switchboard):
    secret = f"hunter2-{tag()}"
    body = spec(
        "secretive",
        parameters={"API_KEY": {"value": secret, "secret": True}, "MODE": {"value": "fast"}},
        labels={"secret-test": "yes"},
    )
    single = client.post("/api/v1/jobs", json=body)
    batch = client.post("/api/v1/jobs/batch", json=[body])
    job_ids = [single.json()["id"], batch.json()["jobs"][0]["id"]]
    for job_id in job_ids:
        assert wait_job(client, job_id)["phase"] == "succeeded"
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        parameters = job["spec"]["parameters"]
        assert parameters["API_KEY"] == {"value": "********", "secret": True}
        assert parameters["MODE"] == {"value": "fast"}
    texts = [single.text, batch.text]
    for job_id in job_ids:
        for path in ("", "/runs", "/events"):
            texts.append(client.get(f"/api/v1/jobs/{job_id}{path}").text)
    texts.append(client.get("/api/v1/jobs", params={"label": "secret-test=yes"}).text)
    texts.append(switchboard.process.log_path.read_text(errors="replace"))
    for text in texts:
        assert secret not in text
