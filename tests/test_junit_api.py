"""Test cases over REST: GET /api/v1/jobs/{id}/tests (paged, filtered by result) and the
`tests` counts in a job's JSON, served by the real app in this process.

Nothing uploads a report yet (a job's output files come with a later change), so the
cases are stored directly through the store, as the code that parses a run's reports
will store them. The last test checks that the API keeps answering while a report near
the size cap is parsed (parse_report runs the parse in a child process)."""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import pytest
import uvicorn
from litestar.testing import AsyncTestClient

from protocol.state import Phase
from switchboard.app import create_app
from switchboard.auth import Role, create_token
from switchboard.config import Settings
from switchboard.models import TestCase
from switchboard.reports.junit import MAX_REPORT_BYTES
from switchboard.reports.worker import parse_report
from switchboard.store.sqlite import SQLiteStore
from tests.harness import free_port
from tests.store_setup import assigned_job, state

pytestmark = pytest.mark.process  # reports parse in a child process


def _case(name: str, result: str = "passed", message: str | None = None) -> TestCase:
    return TestCase(suite="fw", classname="flash", name=name, result=result, message=message)


async def _prepare(settings: Settings) -> str:
    """j1 ran and has a report of five cases; j2 ran and has none. An admin token."""
    store = SQLiteStore(settings.database_path)
    await store.open()
    try:
        await assigned_job(store, "j1")
        await assigned_job(store, "j2")
        await store.apply_events(
            "s1", [state(1, Phase.SUCCEEDED, "j1"), state(2, Phase.SUCCEEDED, "j2")]
        )
        cases = [
            _case("erase"),
            _case("write", "failed", "wrote 0x00, read 0xff"),
            _case("verify", "skipped", "no board"),
            _case("read", "failed", "timeout"),
            _case("boot", "error", "no device"),
        ]
        assert await store.add_test_cases("j1", 1, "out/flash.xml", cases)
        return (await create_token(store, Role.ADMIN, "t")).token
    finally:
        await store.close()


@pytest.fixture
async def client(tmp_path):
    settings = Settings(data_dir=tmp_path)
    token = await _prepare(settings)
    async with AsyncTestClient(create_app(settings)) as made:
        made.headers["Authorization"] = f"Bearer {token}"
        yield made


async def test_a_jobs_json_counts_its_test_cases(client):
    job = (await client.get("/api/v1/jobs/j1")).json()
    assert job["tests"] == {"passed": 1, "failed": 2, "error": 1, "skipped": 1, "total": 5}
    assert (await client.get("/api/v1/jobs/j2")).json()["tests"] is None


async def test_test_cases_are_listed_in_pages_and_filtered(client):
    first = await client.get("/api/v1/jobs/j1/tests", params={"limit": 2})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["attempt"] == 1
    assert [c["name"] for c in body["items"]] == ["erase", "write"]
    assert body["items"][1] == {
        "id": body["items"][1]["id"],
        "attempt": 1,
        "report": "out/flash.xml",
        "suite": "fw",
        "classname": "flash",
        "name": "write",
        "result": "failed",
        "duration_s": None,
        "message": "wrote 0x00, read 0xff",
    }
    rest = await client.get(
        "/api/v1/jobs/j1/tests", params={"limit": 10, "after": body["next_after"]}
    )
    assert [c["name"] for c in rest.json()["items"]] == ["verify", "read", "boot"]
    assert rest.json()["next_after"] is None
    failed = (await client.get("/api/v1/jobs/j1/tests", params={"result": "failed"})).json()
    assert [(c["name"], c["message"]) for c in failed["items"]] == [
        ("write", "wrote 0x00, read 0xff"),
        ("read", "timeout"),
    ]
    none = (await client.get("/api/v1/jobs/j2/tests")).json()
    assert none == {"attempt": None, "items": [], "next_after": None}


@pytest.mark.parametrize(
    ("params", "field"),
    [({"result": "broken"}, "result"), ({"limit": 0}, "limit"), ({"after": -1}, "after")],
)
async def test_bad_parameters_are_a_400_naming_them(client, params, field):
    response = await client.get("/api/v1/jobs/j1/tests", params=params)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_request"
    assert field in response.json()["message"]


async def test_an_unknown_job_is_a_404(client):
    response = await client.get("/api/v1/jobs/nope/tests")
    assert response.status_code == 404
    assert response.json() == {"error": "not_found", "message": "no job 'nope'", "field": None}


async def test_the_openapi_schema_shows_the_records(client):
    schema = (await client.get("/schema/openapi.json")).json()
    components = schema["components"]["schemas"]
    page = next(v for k, v in components.items() if k.endswith("TestCasePage"))
    assert {"attempt", "items", "next_after"} <= set(page["properties"])
    case = next(v for k, v in components.items() if k.endswith("StoredTestCase"))
    assert set(case["properties"]) >= {"suite", "classname", "name", "result", "message"}
    job = next(v for k, v in components.items() if k.endswith("JobView"))
    assert "tests" in job["properties"]
    route = schema["paths"]["/api/v1/jobs/{job_id}/tests"]["get"]
    result = next(p for p in route["parameters"] if p["name"] == "result")
    assert "failed" in str(result["schema"])


def _near_cap_report() -> bytes:
    case = b'<testcase classname="pkg.mod" name="test_n" time="0.001"><failure message="m">'
    case += b"x" * 200 + b"</failure><system-out>" + b"o" * 200 + b"</system-out></testcase>"
    count = (MAX_REPORT_BYTES - 4096) // len(case)
    return b"".join(
        [b"<testsuites><testsuite name='s'>", case * count, b"</testsuite></testsuites>"]
    )


async def _timed_get(client: httpx.AsyncClient, url: str) -> float:
    start = time.perf_counter()
    response = await client.get(url)
    assert response.status_code == 200
    return time.perf_counter() - start


async def test_the_api_answers_while_a_near_cap_report_parses(tmp_path):
    """The app served by uvicorn on this test's event loop, where the parse is awaited."""
    settings = Settings(data_dir=tmp_path)
    token = await _prepare(settings)
    port = free_port()
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    data = _near_cap_report()
    try:
        while not server.started:
            assert not serving.done()
            await asyncio.sleep(0.01)
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers=headers
        ) as client:
            url = "/api/v1/jobs/j1"
            # The floor: the same request with nothing else to do.
            floor = statistics.median([await _timed_get(client, url) for _ in range(20)])
            start = time.perf_counter()
            parsing = asyncio.create_task(parse_report(data))
            during = []
            while not parsing.done():
                during.append(await _timed_get(client, url))
            parse_s = time.perf_counter() - start
            report = await parsing
    finally:
        server.should_exit = True
        await serving
    assert report.counts.failed == report.counts.total > 50_000
    # Parsed on the event loop, the first request would wait out the whole parse (a second
    # or more); in a worker thread, each request waited on the GIL (median 30 times the
    # floor); in the parser process, requests keep being answered throughout it.
    assert parse_s > 0.5, parse_s
    assert len(during) >= 5, (floor, during, parse_s)
    # (Measured: a 5 ms floor, 18 ms typical and 114 ms at most during a 3.3 s parse.)
    assert max(during) < max(0.25 * parse_s, 10 * floor), (floor, during, parse_s)
    assert statistics.median(during) < 0.05 * parse_s, (floor, during, parse_s)
