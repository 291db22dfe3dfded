"""Jobs belong to the token that submitted them: a submitter cancels and deletes only its
own (everyone may read any), and one token can't fill the queue for everyone (a queue
quota per token). Real switchboard process, no supervisor, so submitted jobs stay queued."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.harness import REPO, Switchboard
from tests.scrape import sample_value, scrape

pytestmark = pytest.mark.process

PER_TOKEN, GLOBAL = 3, 5
REFUSED = "switchboard_submissions_refused_total"


@pytest.fixture(scope="module")
def switchboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Switchboard]:
    server = Switchboard(
        tmp_path_factory.mktemp("tenancy") / "data",
        extra_args=("--max-queued-per-token", str(PER_TOKEN), "--max-queued", str(GLOBAL)),
    )
    yield server
    server.stop()


def _submitter(switchboard: Switchboard, name: str) -> tuple[httpx.Client, str]:
    made = switchboard.client().post("/api/v1/tokens", json={"role": "submitter", "name": name})
    assert made.status_code == 201, made.text
    return switchboard.client(made.json()["token"]), made.json()["id"]


def _submit(client: httpx.Client, name: str = "t") -> httpx.Response:
    return client.post("/api/v1/jobs", json={"name": name, "backend": {"kind": "noop"}})


def _refusals(switchboard: Switchboard, reason: str) -> float:
    return sample_value(scrape(f"{switchboard.url}/metrics"), REFUSED, reason=reason)


def _clear_queue(switchboard: Switchboard) -> None:
    admin = switchboard.client()
    for job in admin.get("/api/v1/jobs", params={"phase": "queued", "limit": 500}).json()["items"]:
        admin.post(f"/api/v1/jobs/{job['id']}/cancel")


def test_a_job_names_its_owner_and_the_list_filters_by_it(switchboard):
    _clear_queue(switchboard)
    alice, alice_id = _submitter(switchboard, "ci-alice")
    bob, bob_id = _submitter(switchboard, "ci-bob")
    mine = _submit(alice, "alice-job").json()["id"]
    theirs = _submit(bob, "bob-job").json()["id"]

    shown = bob.get(f"/api/v1/jobs/{mine}").json()  # anyone may read any job
    assert (shown["owner"], shown["owner_name"]) == (alice_id, "ci-alice")
    listed = alice.get("/api/v1/jobs", params={"owner": alice_id}).json()["items"]
    assert [(j["id"], j["owner"]) for j in listed] == [(mine, alice_id)]
    by_me = bob.get("/api/v1/jobs", params={"owner": "me"}).json()["items"]
    assert [(j["id"], j["owner"]) for j in by_me] == [(theirs, bob_id)]
    viewer = switchboard.client(switchboard.create_token("viewer"))
    both = viewer.get("/api/v1/jobs", params={"limit": 2}).json()["items"]
    assert {j["id"] for j in both} == {mine, theirs}
    for job in (mine, theirs):
        switchboard.client().post(f"/api/v1/jobs/{job}/cancel")


def test_a_submitter_cancels_and_deletes_only_its_own_jobs(switchboard):
    _clear_queue(switchboard)
    alice, _ = _submitter(switchboard, "ci-alice-2")
    bob, bob_id = _submitter(switchboard, "ci-bob-2")
    job = _submit(alice).json()["id"]

    refused = bob.post(f"/api/v1/jobs/{job}/cancel")
    assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
    assert "submitted by token 'ci-alice-2'" in refused.json()["message"]
    assert "may cancel only the jobs its own token submitted" in refused.json()["message"]
    assert alice.get(f"/api/v1/jobs/{job}").json()["phase"] == "queued"  # untouched
    assert alice.post(f"/api/v1/jobs/{job}/cancel").status_code == 202

    refused = bob.delete(f"/api/v1/jobs/{job}")
    assert refused.status_code == 403 and "may delete only" in refused.json()["message"]
    assert alice.get(f"/api/v1/jobs/{job}").status_code == 200
    assert alice.delete(f"/api/v1/jobs/{job}").status_code == 204
    assert bob.delete(f"/api/v1/jobs/{job}").status_code == 204  # gone: nothing to refuse
    assert bob.post(f"/api/v1/jobs/{job}/cancel").status_code == 404

    # An operator may cancel anyone's job; the audit trail says who.
    other = _submit(bob).json()["id"]
    operator = switchboard.client(switchboard.create_token("operator"))
    assert operator.post(f"/api/v1/jobs/{other}/cancel").status_code == 202
    events = operator.get(f"/api/v1/jobs/{other}/events").json()
    assert any(e["kind"] == "cancel_requested" and "operator" in e["actor"] for e in events)
    assert operator.get(f"/api/v1/jobs/{other}").json()["owner"] == bob_id


def test_one_token_cannot_fill_the_queue(switchboard):
    _clear_queue(switchboard)
    greedy, greedy_id = _submitter(switchboard, "greedy")
    modest, _ = _submitter(switchboard, "modest")
    quota_before = _refusals(switchboard, "token_quota")
    full_before = _refusals(switchboard, "queue_full")

    assert [_submit(greedy).status_code for _ in range(PER_TOKEN)] == [201] * PER_TOKEN
    over = _submit(greedy)
    assert over.status_code == 429 and over.json()["error"] == "queue_quota"
    assert f"at most {PER_TOKEN}" in over.json()["message"]
    assert "--max-queued-per-token" in over.json()["message"]
    batch = greedy.post("/api/v1/jobs/batch", json=[{"name": "b", "backend": {"kind": "noop"}}])
    assert batch.status_code == 429  # all or none
    queued = {"owner": greedy_id, "phase": "queued"}
    assert len(greedy.get("/api/v1/jobs", params=queued).json()["items"]) == PER_TOKEN

    # Another token still gets in, up to the switchboard's own limit.
    assert [_submit(modest).status_code for _ in range(GLOBAL - PER_TOKEN)] == [201, 201]
    full = _submit(modest)
    assert full.status_code == 429 and full.json()["error"] == "queue_full"

    assert _refusals(switchboard, "token_quota") == quota_before + 2
    assert _refusals(switchboard, "queue_full") == full_before + 1
    log = switchboard.process.log_path.read_text()
    assert f"by token {greedy_id} refused" in log

    # An ended job frees its place in the quota.
    first = greedy.get("/api/v1/jobs", params=queued).json()["items"][-1]["id"]
    assert greedy.post(f"/api/v1/jobs/{first}/cancel").status_code == 202
    assert _submit(greedy).status_code == 201


def test_the_cli_lists_my_jobs(switchboard, tmp_path):
    _clear_queue(switchboard)
    made = switchboard.client().post("/api/v1/tokens", json={"role": "submitter", "name": "cli"})
    token_file = tmp_path / "cli.token"
    token_file.write_text(made.json()["token"])
    token_file.chmod(0o600)
    mine = _submit(switchboard.client(made.json()["token"]), "cli-mine").json()["id"]
    _submit(switchboard.client(), "someone-elses")
    env = dict(os.environ, PYTHONPATH=str(REPO), SWITCHBOARD_URL=switchboard.url)
    env.pop("SWITCHBOARD_TOKEN", None)
    listed = subprocess.run(
        [sys.executable, "-m", "switchboard", "job", "list", "--owner", "me", "--json"],
        capture_output=True,
        env=dict(env, SWITCHBOARD_TOKEN_FILE=str(token_file)),
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert [j["id"] for j in json.loads(listed.stdout)] == [mine]


@pytest.mark.parametrize("value", ["0", "-5"])
def test_a_quota_that_would_refuse_every_submission_is_refused_at_start(value: str):
    from switchboard.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-queued-per-token", value])
