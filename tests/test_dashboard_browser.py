"""The operator dashboard in a real browser: headless Chromium driven by Playwright, against
a real switchboard process and real noop supervisors.

Screenshots (overview and job page, at 1280 px and at 375 px) go to $TEST_ARTIFACTS
(default: test-artifacts/ in the checkout).
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from protocol.spec import JobSpec, NoopBackend
from tests.big_store import big_switchboard as seeded
from tests.harness import (
    REPO,
    Process,
    Switchboard,
    scaled,
    start_supervisor,
    wait_connected,
    wait_for,
    wait_job,
    wait_running,
)

pytestmark = pytest.mark.browser

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright

    MISSING = ""
except ImportError as exc:
    # The tests fail without it (never skip): a machine without a browser must not pass
    # by testing nothing. scripts/test.sh installs it.
    MISSING = f"playwright is not installed ({exc}): pip install -e '.[test]'"

CHROMIUM = Path(os.environ.get("SWITCHBOARD_TEST_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", str(REPO / "test-artifacts")))
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 375, "height": 800}
#: Playwright counts in milliseconds.
MS = 1000


def ms(seconds: float) -> float:
    return scaled(seconds) * MS


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if MISSING:
        pytest.fail(MISSING)
    if not CHROMIUM.exists():
        pytest.fail(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        # The system's Chromium: never a downloaded one.
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox"]
        )
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def supervisor(switchboard: Switchboard, work_dir: Path) -> Iterator[Process]:
    process = start_supervisor(
        switchboard, work_dir, name="noop-1", backend="noop", max_jobs=4, labels={"zone": "a"}
    )
    wait_connected(switchboard.client(), "noop-1")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def tokens(switchboard: Switchboard) -> dict[str, str]:
    return {role: switchboard.create_token(role) for role in ("operator", "viewer", "supervisor")}


class Dashboard:
    """One browser tab on the dashboard, recording what would show in its console."""

    def __init__(self, browser: Browser, server: Switchboard, viewport: dict) -> None:
        self.context = browser.new_context(viewport=viewport)
        self.page: Page = self.context.new_page()
        self.page.set_default_timeout(ms(10))
        self.problems: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.goto(server.url + "/")

    def _console(self, message) -> None:
        # A refused token is an HTTP error the browser logs by itself; that is expected.
        if message.type == "error" and "Failed to load resource" not in message.text:
            self.problems.append(message.text)

    def sign_in(self, token: str) -> None:
        self.page.fill("#token", token)
        self.page.click("#login-form button[type=submit]")
        expect(self.page.locator("#topbar")).to_be_visible()
        expect(self.page.locator("#live-status")).to_have_text("live")

    def go(self, route: str) -> None:
        self.page.evaluate("route => { location.hash = route; }", route)

    def api_requests(self, path: str) -> list[str]:
        return [url for url in self.requests if f"/api/v1/{path}" in url]

    def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / name), full_page=True)

    def overflows(self) -> bool:
        """Wider than the viewport (sideways scrolling on a phone)?"""
        return self.page.evaluate(
            "document.documentElement.scrollWidth > document.documentElement.clientWidth"
        )

    def close(self) -> None:
        self.context.close()
        # CSP refusals and script errors land here: the page must have none.
        assert self.problems == []


@pytest.fixture
def open_dashboard(browser: Browser, switchboard: Switchboard):
    tabs: list[Dashboard] = []

    def open_tab(viewport: dict = DESKTOP, server: Switchboard | None = None) -> Dashboard:
        tab = Dashboard(browser, server or switchboard, viewport)
        tabs.append(tab)
        return tab

    yield open_tab
    for tab in tabs:
        tab.close()


def submit(client: httpx.Client, name: str, **spec) -> str:
    response = client.post("/api/v1/jobs", json={"name": name, **spec})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def test_the_page_is_served_with_a_strict_content_security_policy(switchboard):
    with httpx.Client(base_url=switchboard.url) as anonymous:
        page = anonymous.get("/")
        script = anonymous.get("/dashboard/js/main.js")
        assert anonymous.get("/dashboard/js/nothing.js").status_code == 404
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert '<script type="module" src="dashboard/js/main.js">' in page.text
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    # Nothing in the page's own files builds markup from strings.
    static = REPO / "switchboard" / "dashboard" / "static"
    for source in static.rglob("*.js"):
        text = source.read_text()
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text, source


def test_sign_in_with_a_token_and_clear_messages_for_wrong_ones(open_dashboard, tokens):
    tab = open_dashboard()
    page = tab.page
    page.fill("#token", "sbt_" + "x" * 43)
    page.click("#login-form button[type=submit]")
    expect(page.locator("#login-error")).to_have_text("this token is not valid")

    page.fill("#token", tokens["supervisor"])
    page.click("#login-form button[type=submit]")
    expect(page.locator("#login-error")).to_have_text("this token's role cannot view the dashboard")
    expect(page.locator("#topbar")).to_be_hidden()

    tab.sign_in(tokens["viewer"])
    expect(page.locator("#whoami")).to_contain_text("viewer")
    expect(page.locator("#overview-stats [data-stat=online]")).to_be_visible()
    # The token lives in this tab's session storage: a reload stays signed in.
    assert page.evaluate("sessionStorage.getItem('switchboard.token')") == tokens["viewer"]
    page.reload()
    expect(page.locator("#live-status")).to_have_text("live")

    page.click("#logout")
    expect(page.locator("#login-form")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('switchboard.token')") is None


def test_a_revoked_token_returns_to_the_sign_in_page(open_dashboard, switchboard):
    client = switchboard.client()
    created = client.post("/api/v1/tokens", json={"role": "viewer", "name": "soon revoked"})
    tab = open_dashboard()
    tab.sign_in(created.json()["token"])
    assert client.delete(f"/api/v1/tokens/{created.json()['id']}").status_code == 204
    tab.go("#/jobs")  # its next request is refused
    expect(tab.page.locator("#login-error")).to_have_text("this token is not valid")
    assert tab.page.evaluate("sessionStorage.getItem('switchboard.token')") is None


ANSI_CASES = """async () => {
  const { AnsiParser } = await import("./dashboard/js/ansi.js");
  const run = (...chunks) => {
    const parser = new AnsiParser();
    return chunks.flatMap((chunk) => parser.feed(chunk));
  };
  return {
    colours: run("\\x1b[31mred\\x1b[0m \\x1b[92mbright\\x1b[39m \\x1b[44;1mbg\\x1b[m."),
    split: run("a\\x1b", "[3", "3mb\\x1b[0", "m c"),
    skipped: run("\\x1b[38;5;196mx\\x1b[2Ky\\x1b[1;38;2;1;2;3mz\\x1b[22mw\\x1bQ"),
  };
}"""


def test_the_ansi_parser_keeps_sgr_colours_and_drops_other_sequences(open_dashboard):
    page = open_dashboard().page  # the sign-in page is enough: the module is static
    result = page.evaluate(ANSI_CASES)
    assert result["colours"] == [
        ["ansi-fg-1", "red"],
        ["", " "],
        ["ansi-fg-b2", "bright"],
        ["", " "],
        ["ansi-bg-4 ansi-bold", "bg"],
        ["", "."],
    ]
    # An escape sequence cut between two chunks is completed by the next one.
    assert result["split"] == [["", "a"], ["ansi-fg-3", "b"], ["", " c"]]
    # 256/true-colour arguments are not read as colours; other sequences vanish.
    assert result["skipped"] == [["", "x"], ["", "y"], ["ansi-bold", "z"], ["", "w"], ["", "Q"]]


def test_a_supervisor_that_connects_appears_within_two_seconds(
    open_dashboard, switchboard, work_dir, supervisor
):
    tab = open_dashboard()
    tab.sign_in(switchboard.admin_token)
    page = tab.page
    expect(page.locator('[data-supervisor="noop-1"]')).to_be_visible()
    late = start_supervisor(switchboard, work_dir, name="late-1", backend="noop")
    try:
        wait_connected(switchboard.client(), "late-1")
        # Measured from the moment the switchboard accepted the connection.
        card = page.locator('#overview-supervisors [data-supervisor="late-1"]')
        expect(card).to_be_visible(timeout=ms(2))
        expect(card).to_have_attribute("data-state", "online")
    finally:
        late.stop()
    # Gone: it moves to the offline supervisors, and the counts follow.
    wait_for(
        lambda: not switchboard.client().get("/api/v1/supervisors/late-1").json()["connected"],
        "late-1 to disconnect",
    )
    expect(page.locator("#overview-supervisors [data-supervisor=late-1]")).to_be_hidden()
    page.click('[role=tab][data-group="offline"]')
    expect(page.locator('[data-supervisor="late-1"]')).to_have_attribute("data-state", "offline")
    expect(page.locator("[data-stat=offline] .stat-value")).to_have_text("1")
    assert len(tab.api_requests("live")) == 1


def test_a_submitted_job_appears_and_moves_through_its_phases_live(
    open_dashboard, switchboard, supervisor
):
    tab = open_dashboard()
    tab.sign_in(switchboard.admin_token)
    page = tab.page
    tab.go("#/jobs")
    expect(page.locator("#jobs-page")).to_have_text("page 1")
    page.evaluate("window.notReloaded = true")
    lists_before = len(tab.api_requests("jobs?"))

    client = switchboard.client()
    name = unique("phases")
    job_id = submit(
        client, name, labels={"suite": "dashboard"}, backend={"kind": "noop", "delay_s": 2.0}
    )
    row = page.locator(f'tr[data-job-id="{job_id}"]')
    expect(row).to_be_visible(timeout=ms(3))
    expect(row).to_have_attribute("data-phase", "running", timeout=ms(5))
    expect(row).to_have_attribute("data-phase", "succeeded", timeout=ms(10))
    expect(row.locator(".col-supervisor")).to_have_text("noop-1")
    expect(row.locator(".col-labels")).to_have_text("suite=dashboard")
    # All of that came over the one event stream: no reload, no polling of the list.
    assert page.evaluate("window.notReloaded") is True
    assert len(tab.api_requests("jobs?")) == lists_before
    assert len(tab.api_requests("live")) == 1

    row.locator("a.job-link").click()
    expect(page.locator(".job-title")).to_have_text(name)
    run = page.locator('#job-runs [data-attempt="1"]')
    expect(run.locator("a")).to_have_text("noop-1")
    phases = run.locator(".timeline li")
    expect(phases).to_have_count(4)
    assert [phases.nth(i).get_attribute("data-phase") for i in range(4)] == [
        "assigned",
        "initializing",
        "running",
        "succeeded",
    ]
    for i in range(4):  # each phase with its time (clock time, to the millisecond)
        expect(phases.nth(i).locator("time")).to_have_text(re.compile(r"^\d\d:\d\d:\d\d\.\d{3}$"))


def test_job_page_shows_output_live_renders_colours_safely_and_cancels(
    open_dashboard, switchboard, supervisor, tokens
):
    client = switchboard.client()
    output = "\x1b[1;31mred alert\x1b[0m plain <img src=x onerror=alert(1)>\n\x1b[32mgreen\x1b[0m\n"
    job_id = submit(
        client,
        unique("console"),
        parameters={"API_KEY": {"value": "hunter2-secret", "secret": True}},
        backend={"kind": "noop", "delay_s": 60, "output": output},
    )
    tab = open_dashboard()
    tab.sign_in(tokens["operator"])
    page = tab.page
    tab.go(f"#/jobs/{job_id}")
    console = page.locator('pre.console[data-stream="stdout"]')
    expect(console).to_contain_text("red alert")
    # Shown while the job still runs: live, not after the end.
    assert client.get(f"/api/v1/jobs/{job_id}").json()["phase"] == "running"
    expect(page.locator("#output-status")).to_have_text("live")
    expect(console.locator("span.ansi-fg-1.ansi-bold")).to_have_text("red alert")
    expect(console.locator("span.ansi-fg-2")).to_have_text("green")
    # Markup in the output is text, never elements.
    expect(console).to_contain_text("<img src=x onerror=alert(1)>")
    expect(console.locator("img")).to_have_count(0)
    # The secret parameter comes redacted from the API and stays so.
    expect(page.locator("#job-spec")).to_contain_text("********")
    expect(page.locator("#job-spec")).not_to_contain_text("hunter2")
    page.click('[role=tab][data-stream="stderr"]')
    expect(page.locator('pre.console[data-stream="stderr"]')).to_have_text("")
    page.click('[role=tab][data-stream="stdout"]')
    expect(console).to_contain_text("green")

    with page.expect_download() as download:
        page.click("#output-download")
    saved = Path(download.value.path()).read_bytes()
    assert saved == output.encode()
    assert download.value.suggested_filename.endswith(f"{job_id}-run1.stdout.log")

    tab.screenshot("job-1280.png")
    page.set_viewport_size(PHONE)
    expect(page.locator("#cancel-job")).to_be_visible()
    assert not tab.overflows()
    tab.screenshot("job-375.png")
    page.set_viewport_size(DESKTOP)

    page.click("#cancel-job")
    page.click("#cancel-confirm")
    job = wait_job(client, job_id, timeout=20)
    assert job["phase"] == "canceled"
    events = client.get(f"/api/v1/jobs/{job_id}/events").json()
    assert any(e["kind"] == "cancel_requested" and "operator" in (e["actor"] or "") for e in events)
    expect(page.locator('[data-fact="phase"] .badge')).to_have_text("canceled")
    expect(page.locator("#cancel-job")).to_have_count(0)
    expect(page.locator('#job-runs .timeline li[data-phase="canceled"]')).to_have_count(1)
    expect(page.locator("#output-status")).to_have_text("complete")


def test_a_viewer_gets_no_cancel_or_drain_buttons(open_dashboard, switchboard, supervisor, tokens):
    client = switchboard.client()
    job_id = submit(client, unique("watched"), backend={"kind": "noop", "delay_s": 30})
    wait_running(client, job_id)
    tab = open_dashboard()
    tab.sign_in(tokens["viewer"])
    page = tab.page
    tab.go(f"#/jobs/{job_id}")
    expect(page.locator('[data-fact="phase"] .badge')).to_have_text("running")
    expect(page.locator("#cancel-job")).to_have_count(0)
    tab.go("#/supervisors/noop-1")
    expect(page.locator("#supervisor-state")).to_have_text("online")
    expect(page.locator("#supervisor-current")).to_contain_text("watched")
    expect(page.locator("#drain-supervisor")).to_have_count(0)
    client.post(f"/api/v1/jobs/{job_id}/cancel")


def test_a_submitter_may_cancel_only_its_own_jobs(open_dashboard, switchboard, supervisor):
    made = switchboard.client().post(
        "/api/v1/tokens", json={"role": "submitter", "name": "ci-pipeline"}
    )
    token = made.json()["token"]
    own = submit(switchboard.client(token), unique("own"), backend={"kind": "noop", "delay_s": 30})
    others = submit(switchboard.client(), unique("others"), backend={"kind": "noop", "delay_s": 30})
    tab = open_dashboard()
    tab.sign_in(token)
    page = tab.page
    tab.go(f"#/jobs/{others}")
    expect(page.locator('[data-fact="submitted by"]')).to_have_text("admin")
    expect(page.locator('[data-fact="phase"] .badge')).not_to_have_text("")
    expect(page.locator("#cancel-job")).to_have_count(0)
    tab.go(f"#/jobs/{own}")
    expect(page.locator('[data-fact="submitted by"]')).to_have_text("ci-pipeline")
    expect(page.locator("#cancel-job")).to_be_visible()
    for job_id in (own, others):
        switchboard.client().post(f"/api/v1/jobs/{job_id}/cancel")


def test_drain_and_resume_from_the_supervisor_page(open_dashboard, switchboard, supervisor, tokens):
    client = switchboard.client()
    tab = open_dashboard()
    tab.sign_in(tokens["operator"])
    page = tab.page
    tab.go("#/supervisors/noop-1")
    expect(page.locator("#supervisor-connections tr[data-session]")).not_to_have_count(0)
    expect(page.locator('[data-fact="backends"]')).to_have_text("noop")
    expect(page.locator("#supervisor-labels")).to_contain_text("zone=a")
    page.set_viewport_size(PHONE)
    expect(page.locator("#drain-supervisor")).to_be_visible()
    assert not tab.overflows()
    page.set_viewport_size(DESKTOP)

    page.click("#drain-supervisor")
    wait_for(lambda: client.get("/api/v1/supervisors/noop-1").json()["drained"], "drain")
    expect(page.locator("#supervisor-state")).to_have_text("draining")
    expect(page.locator("#resume-supervisor")).to_be_visible()
    # Drained: a new job waits in the queue.
    job_id = submit(client, unique("after-drain"), backend={"kind": "noop"})
    time.sleep(scaled(0.5))
    assert client.get(f"/api/v1/jobs/{job_id}").json()["phase"] == "queued"

    page.click("#resume-supervisor")
    wait_for(lambda: not client.get("/api/v1/supervisors/noop-1").json()["drained"], "resume")
    expect(page.locator("#supervisor-state")).to_have_text("online")
    assert wait_job(client, job_id, timeout=20)["phase"] == "succeeded"
    expect(page.locator(f'#supervisor-recent tr[data-job-id="{job_id}"]')).to_have_attribute(
        "data-phase", "succeeded"
    )


def test_overview_at_desktop_and_phone_width(open_dashboard, switchboard, supervisor):
    client = switchboard.client()
    submit(client, unique("fails"), backend={"kind": "noop", "exit_code": 3})
    tab = open_dashboard()
    tab.sign_in(switchboard.admin_token)
    page = tab.page
    wait_for(lambda: client.get("/api/v1/overview").json()["recent_failures"], "a failure")
    expected = client.get("/api/v1/overview").json()
    expect(page.locator("[data-stat=online] .stat-value")).to_have_text(
        str(expected["supervisors"]["online"])
    )
    expect(page.locator("#finished-chart svg rect.bar-ok")).to_have_count(len(expected["finished"]))
    expect(page.locator("#overview-supervisors [data-supervisor=noop-1]")).to_be_visible()
    expect(
        page.locator("section", has_text="Recent failures").locator("tr[data-job-id]")
    ).not_to_have_count(0)
    tab.screenshot("overview-1280.png")
    page.set_viewport_size(PHONE)
    expect(page.locator("[data-stat=online]")).to_be_visible()
    assert not tab.overflows()
    tab.screenshot("overview-375.png")


def test_multibyte_output_shows_and_downloads_exactly(open_dashboard, switchboard, supervisor):
    client = switchboard.client()
    text = "caf\u00e9 \u2603 " * 2000 + "\n"
    job_id = submit(client, unique("bytes"), backend={"kind": "noop", "output": text})
    wait_job(client, job_id)
    tab = open_dashboard()
    tab.sign_in(switchboard.admin_token)
    page = tab.page
    tab.go(f"#/jobs/{job_id}")
    expect(page.locator("#output-status")).to_have_text("complete")
    expect(page.locator('pre.console[data-stream="stdout"]')).to_contain_text("caf\u00e9 \u2603")
    with page.expect_download() as download:
        page.click("#output-download")
    assert Path(download.value.path()).read_bytes() == text.encode()
    shown = page.locator('pre.console[data-stream="stdout"]').inner_text()
    assert shown.rstrip("\n") == text.rstrip("\n")


JUNIT = """<?xml version="1.0" encoding="UTF-8"?>
<testsuites>
  <testsuite name="unit">
    <testcase classname="tests.test_math" name="test_adds" time="0.01"/>
    <testcase classname="tests.test_math" name="test_divides" time="0.25">
      <failure message="&lt;script&gt;alert(1)&lt;/script&gt; expected 2">assert 1 == 2</failure>
    </testcase>
  </testsuite>
</testsuites>
"""


def test_job_page_shows_the_test_report_and_the_files_with_downloads(
    open_dashboard, switchboard, supervisor
):
    client = switchboard.client()
    log = "line one \u2603\n" * 300
    job_id = submit(
        client,
        unique("results"),
        backend={
            "kind": "noop",
            "delay_s": scaled(3),
            "exit_code": 1,
            "files": {"reports/junit.xml": JUNIT, "logs/run.log": log},
        },
        outputs={"paths": ["logs/*.log"]},
        reports={"junit": "reports/*.xml"},
    )
    tab = open_dashboard()
    dialogs: list[str] = []
    tab.page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    tab.sign_in(switchboard.admin_token)
    page = tab.page
    tab.go(f"#/jobs/{job_id}")
    expect(page.locator('[data-fact="phase"] .badge')).to_have_text("running")
    # Nothing to show while it runs: the sections come with the results.
    expect(page.locator("#job-tests")).to_be_hidden()
    expect(page.locator("#job-files")).to_be_hidden()

    # The end comes over the live feed; the report is parsed after that (the page asks again).
    counts = page.locator("#tests-counts")
    expect(counts.locator('[data-result="total"]')).to_have_text("2 tests", timeout=ms(20))
    expect(counts.locator('[data-result="passed"]')).to_have_text("1 passed")
    expect(counts.locator('[data-result="failed"]')).to_have_text("1 failed")
    expect(counts.locator('[data-result="error"]')).to_have_text("0 error")
    cases = page.locator("#tests-failed li.test-case")
    expect(cases).to_have_count(1)
    expect(cases.first).to_have_attribute("data-result", "failed")
    expect(cases.first).to_contain_text("unit")
    expect(cases.first.locator(".case-name")).to_have_text("tests.test_math › test_divides")
    # The job's message is text: shown as written, never run or turned into elements.
    message = cases.first.locator("pre.case-message")
    expect(message).to_contain_text("<script>alert(1)</script> expected 2")
    expect(page.locator("#job-tests script")).to_have_count(0)
    expect(page.locator("#tests-more")).to_be_hidden()
    assert dialogs == []

    rows = page.locator("#job-files tbody tr")
    expect(rows).to_have_count(2)
    report = page.locator('#job-files tr[data-path="reports/junit.xml"]')
    logfile = page.locator('#job-files tr[data-path="logs/run.log"]')
    expect(report.locator(".file-size")).to_have_attribute("title", f"{len(JUNIT.encode())} bytes")
    expect(report.locator(".file-report")).to_have_text("stored")
    expect(logfile.locator(".file-size")).to_have_text("3.8 KiB")
    expect(logfile).to_contain_text("text/plain")
    expect(page.locator("#files-summary")).to_contain_text("Run 1: 2 files")

    for row, content, name in ((logfile, log, "run.log"), (report, JUNIT, "junit.xml")):
        with page.expect_download() as download:
            row.locator("button.file-download").click()
        assert Path(download.value.path()).read_bytes() == content.encode()
        assert download.value.suggested_filename == name
    tab.screenshot("job-results-1280.png")
    page.set_viewport_size(PHONE)
    assert not tab.overflows()
    page.set_viewport_size(DESKTOP)


def test_a_chained_job_links_the_job_it_waits_for_then_shows_its_tests(
    open_dashboard, switchboard, supervisor
):
    client = switchboard.client()
    build = submit(
        client,
        unique("build"),
        backend={"kind": "noop", "delay_s": scaled(3), "files": {"build/fw.bin": "image"}},
        outputs={"paths": ["build/*.bin"], "when": "on_success"},
    )
    chained = submit(
        client,
        unique("test-on-board"),
        backend={"kind": "noop", "exit_code": 1, "files": {"reports/junit.xml": JUNIT}},
        inputs={"fw.bin": {"from_job": build, "path": "build/fw.bin"}},
        reports={"junit": "reports/*.xml"},
    )
    tab = open_dashboard()
    tab.sign_in(switchboard.admin_token)
    page = tab.page
    tab.go(f"#/jobs/{chained}")
    waiting = page.locator('[data-fact="waiting for"]')
    expect(waiting).to_contain_text("its output files are this job's inputs")
    expect(waiting.locator("a")).to_have_attribute("href", f"#/jobs/{build}")
    # Once the build has ended, the chain runs; its report shows like any other's.
    counts = page.locator("#tests-counts")
    expect(counts.locator('[data-result="failed"]')).to_have_text("1 failed", timeout=ms(30))
    expect(waiting).to_have_count(0)
    expect(page.locator("#job-history")).to_contain_text("inputs_resolved")
    expect(page.locator("#job-history")).to_contain_text(f"job {build} 'build/fw.bin'")
    tab.screenshot("job-chained-1280.png")


def test_more_failed_cases_than_a_page_come_on_demand(open_dashboard, switchboard, supervisor):
    failures = "".join(
        f'<testcase name="case_{n:03}"><failure message="broke {n}"/></testcase>' for n in range(60)
    )
    junit = (
        f'<testsuite name="many">{failures}'
        '<testcase name="crashed"><error message="boom"/></testcase></testsuite>'
    )
    client = switchboard.client()
    job_id = submit(
        client,
        unique("many-failures"),
        backend={"kind": "noop", "exit_code": 1, "files": {"junit.xml": junit}},
        reports={"junit": "*.xml"},
    )
    wait_job(client, job_id)
    tab = open_dashboard()
    tab.sign_in(switchboard.admin_token)
    page = tab.page
    tab.go(f"#/jobs/{job_id}")
    expect(page.locator('#tests-counts [data-result="failed"]')).to_have_text(
        "60 failed", timeout=ms(20)
    )
    cases = page.locator("#tests-failed li.test-case")
    # A page of failed cases (50), then the erred one; the rest on demand, in report order.
    expect(cases).to_have_count(51)
    page.click("#tests-more")
    expect(cases).to_have_count(61)
    expect(page.locator("#tests-more")).to_be_hidden()
    names = cases.locator(".case-name").all_inner_texts()
    assert names == [f"case_{n:03}" for n in range(60)] + ["crashed"]
    expect(cases.last).to_have_attribute("data-result", "error")
    expect(cases.last.locator("pre.case-message")).to_have_text("boom")


def test_the_dashboard_reconnects_and_catches_up_after_a_server_restart(
    open_dashboard, switchboard, supervisor
):
    tab = open_dashboard()
    tab.sign_in(switchboard.admin_token)
    page = tab.page
    tab.go("#/jobs")
    expect(page.locator("#jobs-page")).to_have_text("page 1")
    switchboard.kill_and_restart()
    client = switchboard.client()
    wait_connected(client, "noop-1")
    expect(page.locator("#live-status")).to_have_text("live", timeout=ms(20))
    job_id = submit(client, unique("after-restart"), backend={"kind": "noop"})
    row = page.locator(f'tr[data-job-id="{job_id}"]')
    expect(row).to_have_attribute("data-phase", "succeeded", timeout=ms(10))
    assert len(tab.api_requests("live")) >= 2


JOBS = 10_000
SUPERVISORS = 500
NEEDLE = "0ddba11c0ffee000"


@pytest.fixture(scope="module")
def big_switchboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Switchboard]:
    jobs = [
        (
            secrets.token_hex(8),
            JobSpec(
                name=f"bulk-{i // 1000}-{i % 1000}",
                labels={"batch": str(i // 1000)},
                backend=NoopBackend(),
            ),
        )
        for i in range(JOBS)
    ]
    jobs.append((NEEDLE, JobSpec(name="needle-in-the-haystack", backend=NoopBackend())))
    server = seeded(tmp_path_factory.mktemp("big") / "data", SUPERVISORS, jobs)
    yield server
    server.stop()


def test_ten_thousand_jobs_and_500_supervisors_are_paged_and_searched_on_the_server(
    open_dashboard, big_switchboard
):
    tab = open_dashboard(server=big_switchboard)
    tab.sign_in(big_switchboard.admin_token)
    page = tab.page
    expect(page.locator("[data-stat=queued] .stat-value")).to_have_text(str(JOBS + 1))
    expect(page.locator("[data-stat=offline] .stat-value")).to_have_text(str(SUPERVISORS))
    page.click('[role=tab][data-group="offline"]')
    expect(page.locator("#overview-supervisors [data-supervisor]")).to_have_count(60)
    page.click(f"text=All {SUPERVISORS} offline supervisors")
    supervisors = page.locator("#supervisors-table tbody tr")
    expect(supervisors).to_have_count(200)  # rendered a slice at a time
    page.fill("#supervisors-q", "host-123")
    expect(supervisors).to_have_count(1)

    tab.go("#/jobs")
    rows = page.locator("#main tbody tr[data-job-id]")
    expect(rows).to_have_count(50)  # one page, not everything
    first_page = rows.first.get_attribute("data-job-id")
    page.click("#jobs-older")
    expect(page.locator("#jobs-page")).to_have_text("page 2")
    expect(rows).to_have_count(50)
    assert rows.first.get_attribute("data-job-id") != first_page
    page.click("#jobs-newer")
    expect(rows.first).to_have_attribute("data-job-id", first_page)

    page.fill("#jobs-q", "needle")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-job-id", NEEDLE)
    assert "q=needle" in page.evaluate("location.hash")
    page.fill("#jobs-q", NEEDLE[:8])  # an id prefix finds it too
    expect(rows).to_have_count(1)
    page.fill("#jobs-q", "bulk-7-99")
    page.fill("#jobs-label", "batch=7")
    page.select_option("#jobs-phase", "queued")
    expect(rows).to_have_count(11)  # bulk-7-99 and bulk-7-990 ... bulk-7-999
    for name in rows.locator("a.job-link").all_inner_texts():
        assert name.startswith("bulk-7-99")
    sent = [url for url in tab.api_requests("jobs?") if "label=batch%3D7" in url]
    assert sent and "phase=queued" in sent[-1] and "q=bulk-7-99" in sent[-1]
    # Never everything: every list request asked for one page.
    for url in tab.api_requests("jobs?"):
        assert re.search(r"limit=(\d+)", url) and int(re.search(r"limit=(\d+)", url)[1]) <= 500
