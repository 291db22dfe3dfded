"""The REST API against its own OpenAPI document, fuzzed by schemathesis: every operation
gets generated requests, valid and invalid, and every answer must be no 5xx and have a
status, content type and body that the document declares for that operation.

The server is a real `switchboard serve` process. Before fuzzing it gets a supervisor, a
few jobs, an artifact and a spare token, and their ids are mixed into the generated ones,
so the "found" answers (a full JobView, runs, output bytes, a SupervisorView, a 409) are
checked too, not only 404s.

schemathesis drives generation through its public Python API (`as_strategy` under
Hypothesis' `given`) rather than its pytest plugin: the plugin's lazy loader, needed when
the schema comes from a fixture's server, does not work with pytest 9.2.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import Switchboard, scaled, start_supervisor, wait_connected, wait_job

pytestmark = pytest.mark.process

try:
    import hypothesis
    import hypothesis.errors
    import schemathesis
    from hypothesis import strategies as st
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    MISSING = ""
except ImportError as exc:
    # The test fails without it (never skips): a machine without schemathesis must not
    # pass by fuzzing nothing. scripts/test.sh installs it.
    MISSING = f"schemathesis is not installed ({exc}): pip install -e '.[test]'"

#: Generated requests per operation and generation mode (valid, invalid).
MAX_EXAMPLES = 30  # the operations grew to 60: the suite stays near 15 minutes on 2 cores
SUPERVISOR = "fuzz-sup"
#: Valid bodies tried first besides the generated ones (which the API mostly refuses: the
#: document can't say everything a spec must satisfy), so the 201 answers are checked too.
_SPEC = {
    "name": "fuzz",
    "backend": {"kind": "noop", "output": "out"},
    "labels": {"team": "fuzz"},
    "parameters": {"TOKEN": {"value": "s3cret", "secret": True}},
}
VALID_BODIES = {
    "POST /api/v1/jobs": _SPEC,
    "POST /api/v1/jobs/batch": [
        _SPEC,
        {"name": "img", "backend": {"kind": "docker", "image": "a"}},
    ],
}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A switchboard that has seen a supervisor (stopped again) and has ended jobs, and an
    admin token of its own for the fuzzer."""
    work = tmp_path_factory.mktemp("fuzz")
    # A short --max-wait: a generated `?wait=` on a job that never ends answers soon.
    server = Switchboard(work / "data", extra_args=("--max-wait", "0.5"))
    supervisor = start_supervisor(server, work, name=SUPERVISOR, backend="noop")
    try:
        with server.client() as client:
            wait_connected(client, SUPERVISOR)
            jobs = []
            for exit_code, output in ((0, "hello\n"), (3, "bye\n")):
                backend = {"kind": "noop", "exit_code": exit_code, "output": output}
                made = client.post("/api/v1/jobs", json={"name": "seed", "backend": backend})
                assert made.status_code == 201, made.text
                jobs.append(made.json()["id"])
            for job_id in jobs:
                wait_job(client, job_id)
            # Canceled while queued: ended without any run.
            client.post("/api/v1/dispatch/pause").raise_for_status()
            made = client.post("/api/v1/jobs", json={"name": "seed", "backend": {"kind": "noop"}})
            jobs.append(made.json()["id"])
            client.post(f"/api/v1/jobs/{jobs[-1]}/cancel").raise_for_status()
            client.post("/api/v1/dispatch/resume").raise_for_status()
            # Queued for good: no supervisor has the label it selects.
            never = {"match_labels": {"fuzz": "never"}}
            made = client.post(
                "/api/v1/jobs",
                json={"name": "seed", "backend": {"kind": "noop"}, "selector": never},
            )
            queued = made.json()["id"]
            stored = client.post("/api/v1/artifacts", content=b"\0asm")
            assert stored.status_code == 201, stored.text
            digests = [stored.json()["digest"], "sha256:" + "0" * 64]  # stored, and unknown
            fuzz = client.post("/api/v1/tokens", json={"role": "admin", "name": "fuzz"})
            assert fuzz.status_code == 201, fuzz.text
            tokens = [token["id"] for token in client.get("/api/v1/tokens").json()]
            spare = client.post("/api/v1/tokens", json={"role": "viewer", "name": "spare"})
            assert spare.status_code == 201, spare.text
        # With the supervisor gone, nothing the fuzzer submits runs: the queued job stays
        # queued (a DELETE of it is a 409), and every other job a request can name has ended.
        supervisor.stop()
        yield {
            "server": server,
            "token": fuzz.json()["token"],
            "tokens": tokens,
            "spare_token": spare.json()["id"],
            "ended": jobs,
            "queued": queued,
            "digests": digests,
        }
    finally:
        supervisor.kill()
        server.stop()


def _load_schema(seeded: dict[str, Any]) -> Any:
    server: Switchboard = seeded["server"]
    auth = {"Authorization": f"Bearer {seeded['token']}"}
    config = schemathesis.Config.from_dict(
        {"headers": auth, "base-url": server.url, "request-timeout": scaled(20)}
    )
    schema = schemathesis.openapi.from_url(
        f"{server.url}/schema/openapi.json", config=config, headers=auth, timeout=30
    )
    ended, queued = seeded["ended"], seeded["queued"]
    known = {
        "job_id": [*ended, queued],
        "supervisor_id": [SUPERVISOR],
        "digest": seeded["digests"],
        "token_id": [seeded["spare_token"]],  # the only token the fuzzer may revoke
    }
    # Following a queued job's output waits for its run: it would hang, so the follow
    # routes only get ended jobs (whose output they send at once, then end). A cancel
    # would end the queued job.
    only_ended = {
        "GET /api/v1/jobs/{job_id}/output/follow",
        "GET /api/v1/jobs/{job_id}/output/events",
        "POST /api/v1/jobs/{job_id}/cancel",
    }
    protected = set(seeded["tokens"])

    @schema.hook
    def before_generate_path_parameters(ctx: Any, strategy: Any) -> Any:
        # Besides generated ids (all unknown), ids of things that exist.
        for name, ids in known.items():
            if f"{{{name}}}" in ctx.operation.path:
                if ctx.operation.label in only_ended:
                    ids = ended
                # The route's other path parameters (a file's path) stay generated.
                known_id = st.tuples(strategy, st.sampled_from(ids)).map(
                    lambda pair, name=name: {**pair[0], name: pair[1]}
                )
                return st.one_of(strategy, known_id)
        return strategy

    @schema.hook
    def filter_path_parameters(ctx: Any, path_parameters: dict[str, Any]) -> bool:
        # Generated ids never match a real (random hex) token id; all the same, never
        # revoke the token the fuzzer runs with, nor the ones made while seeding.
        return (path_parameters or {}).get("token_id") not in protected

    return schema


#: Streams that never end by design (the dashboard's live events): a fuzzer waiting for
#: their end would wait forever. tests/test_live_api.py checks their answers instead.
ENDLESS = {"GET /api/v1/live"}


def _fuzz(operation: Any, mode: Any, statuses: Counter[tuple[str, str, int]]) -> str | None:
    """Fuzz one operation in one generation mode; the failure report, if any."""
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]

    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,  # the same requests on every run
        database=None,
        deadline=None,  # a real server on a busy machine: speed is not what is tested
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],  # no shrinking
        suppress_health_check=list(hypothesis.HealthCheck),
        print_blob=False,
    )
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        try:
            response = case.call()
        except Exception as exc:  # e.g. the connection dropped mid-response
            raise AssertionError(f"{exc}\nReproduce with:\n    {case.as_curl_command()}") from exc
        statuses[(operation.label, mode.value, response.status_code)] += 1
        case.validate_response(response, checks=checks)

    body = VALID_BODIES.get(operation.label)
    if body is not None and mode is schemathesis.GenerationMode.POSITIVE:
        headers = {"Authorization": operation.schema.config.headers["Authorization"]}
        run = hypothesis.example(
            case=operation.Case(body=body, media_type="application/json", headers=headers)
        )(run)
    try:
        run()
    except hypothesis.errors.Unsatisfiable as exc:
        if mode is schemathesis.GenerationMode.NEGATIVE:
            return None  # nothing about the request can be invalid (no body, only str ids)
        return f"{operation.label} ({mode.value}):\n{exc}"
    # A FailureGroup (checks) is a BaseExceptionGroup; anything else is a request that failed.
    except (Exception, BaseExceptionGroup) as exc:
        return f"{operation.label} ({mode.value}):\n{exc}"
    return None


def test_every_operation_conforms_to_the_openapi_document(request: pytest.FixtureRequest) -> None:
    if MISSING:
        pytest.fail(MISSING)
    seeded: dict[str, Any] = request.getfixturevalue("seeded")
    schema = _load_schema(seeded)
    # Deletions last, so the seeded jobs are there for the other operations.
    operations = sorted(
        (
            operation
            for operation in (result.ok() for result in schema.get_all_operations())
            if operation.label not in ENDLESS
        ),
        key=lambda operation: operation.method.upper() == "DELETE",
    )
    statuses: Counter[tuple[str, str, int]] = Counter()
    failures = []
    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            if failure := _fuzz(operation, mode, statuses):
                failures.append(failure)
    # Errors the answers can't show: a stream cut short, a 500 logged.
    log = seeded["server"].process.log_path.read_text(errors="replace")
    for sign in ("Exception in ASGI application", "unhandled error on"):
        if sign in log:
            failures.append(f"the server logged {sign!r}:\n{log[log.index(sign) :][:3000]}")
    print(f"\n{len(operations)} operations, {sum(statuses.values())} requests")
    for (label, mode, status), count in sorted(statuses.items()):
        print(f"  {label} ({mode}): {status} x{count}")
    assert not failures, "\n\n".join(failures)

    # The run counts only if it reached every operation served, with a token that still
    # works, and the seeded ids were found.
    server: Switchboard = seeded["server"]
    with server.client(seeded["token"]) as client:
        served = client.get("/schema/openapi.json").json()["paths"]
        assert client.get("/api/v1/tokens").status_code == 200
    declared = {f"{method.upper()} {path}" for path, ops in served.items() for method in ops}
    declared -= ENDLESS
    assert {operation.label for operation in operations} == declared
    assert {label for label, _, _ in statuses} == declared
    found = [
        ("GET /api/v1/jobs/{job_id}", 200),
        ("GET /api/v1/jobs/{job_id}/output/follow", 200),
        ("GET /api/v1/jobs/{job_id}/output/events", 200),
        ("GET /api/v1/supervisors/{supervisor_id}", 200),
        ("GET /api/v1/artifacts/{digest}", 200),
        ("DELETE /api/v1/jobs/{job_id}", 409),
        ("DELETE /api/v1/tokens/{token_id}", 204),
        ("POST /api/v1/jobs", 201),
    ]
    for label, status in found:
        assert statuses[(label, "positive", status)] > 0, (label, status)
