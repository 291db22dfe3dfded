"""The dashboard's device pages in a real browser (headless Chromium, Playwright) against a
real switchboard and two real supervisors whose config files declare simulated boards
(tests/simboard.py): the list with its counts and the API's filters, a device's page with
its history and the operators' health control, following changes live without a reload,
and the devices on the supervisor and job pages (a granted board's serial console is a
stream tab of the job's output), and the reservations: who holds what until when, on the
list and on a device's page.

Screenshots (list and device page at 1280 px and 375 px, a supervisor's and a job's page
with their devices, the reservations waiting and held) go to $TEST_ARTIFACTS."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import expect

from tests import test_dashboard_browser as dashboard
from tests.harness import (
    Process,
    Switchboard,
    start_supervisor,
    wait_connected,
    wait_for,
    wait_job,
    wait_running,
)
from tests.simboard import SimBoard
from tests.test_lab_e2e import _config

pytestmark = pytest.mark.browser

# The browser and a tab that records console errors: the fixtures of the rest of the
# dashboard's browser tests, found here by their names.
browser = dashboard.browser
open_dashboard = dashboard.open_dashboard
PHONE = dashboard.PHONE
#: What a change may take to show live (the feed looks at devices at most once a second).
LIVE_MS = dashboard.ms(10)

HOSTS = {"lab-host": ("simboard", ("board-a", "board-b")), "nrf-host": ("nrf52840dk", ("nrf-1",))}


@pytest.fixture(scope="module")
def lab(
    switchboard: Switchboard, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    root = tmp_path_factory.mktemp("lab")
    boards: list[SimBoard] = []
    supervisors: list[Process] = []
    client = switchboard.client()
    try:
        for host, (resource, names) in HOSTS.items():
            mine = {name: SimBoard(root / name) for name in names}
            boards.extend(mine.values())
            config = root / f"{host}.toml"
            config.write_text(_config(mine, resource, node_apart=True))
            supervisors.append(
                start_supervisor(
                    switchboard,
                    root,
                    name=host,
                    backend="noop",
                    extra_args=("--config", str(config)),
                )
            )
            wait_connected(client, host)
        yield client
    finally:
        for process in supervisors:
            process.stop()
        client.close()
        for board in boards:
            board.stop()


@pytest.fixture(scope="module")
def tokens(switchboard: Switchboard) -> dict[str, str]:
    return {role: switchboard.create_token(role) for role in ("operator", "viewer")}


def _rows(page) -> list[str]:
    return page.locator("#devices-table tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.device)"
    )


def test_the_list_shows_every_device_with_counts_and_filters_on_the_server(
    open_dashboard, lab, tokens
) -> None:
    tab = open_dashboard()
    page = tab.page
    tab.sign_in(tokens["viewer"])
    page.click("nav a[data-nav=devices]")
    expect(page.locator("nav a[data-nav=devices]")).to_have_class(re.compile("active"))
    expect(page.locator("#devices-table tbody tr")).to_have_count(3)
    assert _rows(page) == ["board-a", "board-b", "nrf-1"]
    row = page.locator("#devices-table tr[data-device=nrf-1]")
    expect(row.locator(".col-class")).to_have_text("nrf52840dk")
    expect(row.locator(".col-host a")).to_have_attribute("href", "#/supervisors/nrf-host")
    expect(row.locator(".col-health [data-health]")).to_have_text("unknown")
    expect(row.locator(".col-check")).to_have_text("never checked")
    expect(row.locator(".col-holder")).to_have_text("—")
    expect(row.locator(".col-labels")).to_have_text("slot=1")
    expect(page.locator("#devices-counts [data-count=all] .count")).to_have_text("3")
    expect(page.locator("#devices-counts [data-count=unknown] .count")).to_have_text("3")

    # Each filter is the API's: the request says it, and the address keeps it.
    page.fill("#devices-class", "nrf52840dk")
    expect(page.locator("#devices-table tbody tr")).to_have_count(1)
    assert _rows(page) == ["nrf-1"]
    assert tab.api_requests("devices?class=nrf52840dk")
    assert "class=nrf52840dk" in page.evaluate("location.hash")
    page.click("#devices-filters button")  # clear
    page.fill("#devices-host", "lab-host")
    expect(page.locator("#devices-table tbody tr")).to_have_count(2)
    assert tab.api_requests("devices?host=lab-host")
    page.select_option("#devices-health", "bad")
    expect(page.locator("#devices-table table")).to_be_hidden()
    expect(page.get_by_text("No devices match.")).to_be_visible()
    assert tab.api_requests("devices?host=lab-host&health=bad")
    # The counts count the host's devices whatever their health; one picks a health.
    expect(page.locator("#devices-counts [data-count=all] .count")).to_have_text("2")
    page.click("#devices-counts [data-count=unknown]")
    expect(page.locator("#devices-table tbody tr")).to_have_count(2)
    expect(page.locator("#devices-health")).to_have_value("unknown")
    # A link with filters opens filtered.
    tab.go("#/devices?class=simboard&health=unknown")
    expect(page.locator("#devices-table tbody tr")).to_have_count(2)
    expect(page.locator("#devices-class")).to_have_value("simboard")


def test_an_operator_sets_maintenance_and_every_page_follows_live(
    open_dashboard, lab, switchboard, tokens
) -> None:
    lister = open_dashboard()
    lister.sign_in(tokens["viewer"])
    lister.go("#/devices")
    expect(lister.page.locator("#devices-table tbody tr")).to_have_count(3)
    tab = open_dashboard()
    page = tab.page
    tab.sign_in(tokens["operator"])
    tab.go("#/devices/board-a")
    expect(page.locator("#device-health [data-health]")).to_have_text("unknown")
    expect(page.locator("#device-facts [data-fact=host] a")).to_have_text("lab-host")
    expect(page.locator("#device-facts [data-fact=console]")).to_have_text("yes")
    expect(page.locator("#device-history tbody tr")).to_have_count(1)
    expect(page.locator("#device-history tbody tr").first).to_contain_text("declared")
    # Neither tab is reloaded from here on: a mark on each window must survive.
    for page_ in (page, lister.page):
        page_.evaluate("window.notReloaded = true")

    # A reason is required: without one nothing is sent.
    page.select_option("#set-health", "maintenance")
    page.click("#set-health-apply")
    expect(page.locator("#set-health-error")).to_contain_text("Say why")
    assert not [url for url in tab.requests if url.endswith("/health")]
    page.fill("#set-health-reason", "replacing the USB cable")
    page.click("#set-health-apply")
    expect(page.locator("#device-health [data-health]")).to_have_text("maintenance")
    newest = page.locator("#device-history tbody tr").first
    expect(newest).to_have_attribute("data-to", "maintenance")
    expect(newest.locator(".col-reason")).to_have_text("replacing the USB cable")
    expect(newest.locator(".col-actor")).to_contain_text("operator")
    expect(page.locator("#set-health-error")).to_be_hidden()
    # The other tab's list follows: the badge and the counts.
    row = lister.page.locator("#devices-table tr[data-device=board-a]")
    expect(row.locator("[data-health]")).to_have_text("maintenance", timeout=LIVE_MS)
    counts = lister.page.locator("#devices-counts")
    expect(counts.locator("[data-count=maintenance] .count")).to_have_text("1", timeout=LIVE_MS)
    expect(counts.locator("[data-count=unknown] .count")).to_have_text("2")

    # A change made elsewhere (the API, another operator) reaches the open device page.
    changed = lab.put(
        "/api/v1/devices/board-a/health", json={"health": "good", "reason": "reflashed"}
    )
    assert changed.status_code == 200, changed.text
    expect(page.locator("#device-health [data-health]")).to_have_text("good", timeout=LIVE_MS)
    expect(page.locator("#device-history tbody tr")).to_have_count(3)
    expect(page.locator("#device-history tbody tr").first.locator(".col-reason")).to_have_text(
        "reflashed"
    )
    expect(row.locator("[data-health]")).to_have_text("good", timeout=LIVE_MS)
    for page_ in (page, lister.page):
        assert page_.evaluate("window.notReloaded") is True


def test_a_viewer_sees_the_history_but_no_health_control(open_dashboard, lab, tokens) -> None:
    tab = open_dashboard()
    page = tab.page
    tab.sign_in(tokens["viewer"])
    tab.go("#/devices/board-b")
    expect(page.locator("#device-health [data-health]")).to_be_visible()
    expect(page.locator("#device-history tbody tr").first).to_be_visible()
    expect(page.locator("#set-health-form")).to_have_count(0)
    expect(page.locator("#device-control")).to_be_empty()


def test_supervisor_and_job_pages_show_their_devices(open_dashboard, lab, tokens) -> None:
    tab = open_dashboard()
    page = tab.page
    tab.sign_in(tokens["viewer"])
    tab.go("#/supervisors/nrf-host")
    card = page.locator("#supervisor-devices")
    expect(card.locator("tr[data-device=nrf-1] [data-health]")).to_have_text("unknown")
    expect(card.locator("tr[data-device]")).to_have_count(1)
    tab.screenshot("supervisor-devices.png")
    tab.go("#/devices")
    holder = page.locator("#devices-table tr[data-device=nrf-1] .col-holder")
    expect(holder).to_have_text("—")

    spec = {
        "name": "flash",
        "backend": {"kind": "noop", "delay_s": 5},
        "resources": {"nrf52840dk": 1},
    }
    submitted = lab.post("/api/v1/jobs", json=spec)
    assert submitted.status_code == 201, submitted.text
    job_id = submitted.json()["id"]
    # While it runs the list names its run as the holder, then frees the board.
    expect(holder.locator("a")).to_have_attribute("href", f"#/jobs/{job_id}", timeout=LIVE_MS)
    expect(holder).to_contain_text("run 1")
    # Switched on while the run holds it, the board's boot log is the run's console.
    wait_running(lab, job_id)
    assert lab.post("/api/v1/devices/nrf-1/power", json={"action": "on"}).json()["ok"]
    assert wait_job(lab, job_id)["phase"] == "succeeded"
    expect(holder).to_have_text("—", timeout=LIVE_MS)

    tab.go(f"#/jobs/{job_id}")
    expect(page.locator("#job-facts [data-fact=devices] a")).to_have_text("nrf-1")
    expect(page.locator("#job-runs .run-devices a")).to_have_attribute("href", "#/devices/nrf-1")
    # The board's serial console is one more output stream of the run, in its own tab.
    page.click('.output .tab[data-stream="console:nrf-1"]')
    console = page.locator('pre.console[data-stream="console:nrf-1"]')
    expect(console).to_contain_text("simboard ready")
    expect(console).to_contain_text("SimBoard bootloader v1.2")
    tab.screenshot("job-devices.png")
    page.click("#job-facts [data-fact=devices] a")
    expect(page.locator("#device-facts [data-fact=host]")).to_have_text("nrf-host")


def test_the_device_pages_fit_a_phone(open_dashboard, lab, tokens) -> None:
    tab = open_dashboard(PHONE)
    page = tab.page
    tab.sign_in(tokens["operator"])
    tab.go("#/devices")
    expect(page.locator("#devices-table tbody tr")).to_have_count(3)
    assert not tab.overflows()
    tab.screenshot("devices-phone.png")
    tab.go("#/devices/board-a")
    expect(page.locator("#set-health-form")).to_be_visible()
    expect(page.locator("#device-history tbody tr").first).to_be_visible()
    assert not tab.overflows()
    tab.screenshot("device-phone.png")
    page.set_viewport_size({"width": 1280, "height": 900})
    tab.screenshot("device-desktop.png")
    tab.go("#/devices")
    expect(page.locator("#devices-table tbody tr")).to_have_count(3)
    tab.screenshot("devices-desktop.png")


def test_an_operator_switches_power_and_sees_the_answer_and_the_history(
    open_dashboard, lab, tokens
) -> None:
    tab = open_dashboard()
    page = tab.page
    tab.sign_in(tokens["operator"])
    tab.go("#/devices/board-b")
    expect(page.locator("#device-power-history")).to_contain_text("No power calls yet.")
    buttons = page.locator("#device-power [data-power]")
    expect(buttons).to_have_count(4)
    page.click("#device-power [data-power=cycle]")
    result = page.locator("#power-result")
    expect(result).to_have_attribute("data-result", "ok", timeout=dashboard.ms(30))
    expect(result).to_contain_text("power cycle of board-b: ok (exit status 0)")
    page.click("#device-power [data-power=status]")
    expect(result).to_contain_text("power status of board-b: ok", timeout=dashboard.ms(30))
    expect(result.locator(".power-output")).to_have_text("on\n")
    # Both calls are in its power history, newest first, with who made them.
    rows = page.locator("#device-power-history tbody tr")
    expect(rows).to_have_count(2, timeout=LIVE_MS)
    expect(rows.first).to_have_attribute("data-action", "status")
    expect(rows.nth(1)).to_have_attribute("data-action", "cycle")
    expect(rows.nth(1).locator(".col-result")).to_have_text("ok, exit status 0")
    expect(rows.first.locator(".col-actor")).to_contain_text("operator")
    tab.screenshot("device-power.png")

    # Off, and the board says so.
    page.click("#device-power [data-power=off]")
    expect(result).to_contain_text("power off of board-b: ok", timeout=dashboard.ms(30))
    page.click("#device-power [data-power=status]")
    expect(result.locator(".power-output")).to_have_text("off\n", timeout=dashboard.ms(30))
    expect(rows).to_have_count(4, timeout=LIVE_MS)
    assert len(tab.api_requests("devices/board-b/power")) == 4


def test_only_operators_and_the_lease_holder_get_power_buttons(
    open_dashboard, lab, switchboard, tokens
) -> None:
    viewer = open_dashboard()
    viewer.sign_in(tokens["viewer"])
    viewer.go("#/devices/board-b")
    # The history is anyone's to read; the buttons are not.
    expect(viewer.page.locator("#device-power-history tbody tr").first).to_be_visible()
    expect(viewer.page.locator("#device-power")).to_be_empty()

    submitter = switchboard.create_token("submitter")
    client = switchboard.client(submitter)
    try:
        asked = client.post(
            "/api/v1/reservations", json={"class": "nrf52840dk", "count": 1, "for_s": 600}
        )
        assert asked.status_code == 201, asked.text
        lease = asked.json()["id"]
        wait_for(
            lambda: client.get(f"/api/v1/reservations/{lease}").json()["state"] == "held",
            "the lease held",
        )
        tab = open_dashboard()
        page = tab.page
        tab.sign_in(submitter)
        tab.go("#/devices/nrf-1")
        expect(page.locator("#device-power [data-power]")).to_have_count(4)
        page.click("#device-power [data-power=on]")
        expect(page.locator("#power-result")).to_contain_text(
            "power on of nrf-1: ok", timeout=dashboard.ms(30)
        )
        # A board that is not its lease's: no buttons (and the API says 403).
        tab.go("#/devices/board-a")
        expect(page.locator("#device-history tbody tr").first).to_be_visible()
        expect(page.locator("#device-power")).to_be_empty()
        refused = client.post("/api/v1/devices/board-a/power", json={"action": "status"})
        assert refused.status_code == 403
        # Once the lease is released, its holder loses the buttons too.
        assert client.delete(f"/api/v1/reservations/{lease}").status_code in (200, 204)
        tab.go("#/devices/nrf-1")
        expect(page.locator("#device-power-history tbody tr").first).to_be_visible()
        expect(page.locator("#device-power")).to_be_empty()
    finally:
        client.close()


def _local(ts: float) -> str:
    """A time as the dashboard writes it (the browser runs in this machine's time zone)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _held(client: httpx.Client, lease_id: str) -> dict:
    def state() -> dict | None:
        found = client.get(f"/api/v1/reservations/{lease_id}").json()
        return found if found["state"] == "held" else None

    return wait_for(state, f"{lease_id} held")


def test_reservations_show_who_holds_what_until_when_and_go_when_released(
    open_dashboard, lab, switchboard, tokens
) -> None:
    lister = open_dashboard()
    page = lister.page
    lister.sign_in(tokens["viewer"])
    lister.go("#/devices")
    card = page.locator("#reservations")
    expect(card).to_contain_text("No device is reserved or waited for.")
    viewer = open_dashboard()
    viewer.sign_in(tokens["viewer"])
    viewer.go("#/devices/board-a")
    expect(viewer.page.locator("#device-facts [data-fact=class]")).to_have_text("simboard")
    line = viewer.page.locator("#device-reserved")
    expect(line).to_be_hidden()
    for page_ in (page, viewer.page):
        page_.evaluate("window.notReloaded = true")

    me = switchboard.client(switchboard.create_token("submitter"))
    try:
        who = me.get("/api/v1/me").json()
        holder = f"{who['name']} ({who['id']})"
        # One holds board-b, so one for both boards waits, holding nothing.
        first = me.post(
            "/api/v1/reservations",
            json={"selector": {"match_labels": {"slot": "b"}}, "count": 1, "for_s": 600},
        ).json()
        first_held = _held(me, first["id"])
        both = {
            "class": "simboard",
            "count": 2,
            "for_s": 900,
            "selector": {
                "match_expressions": [{"key": "slot", "operator": "In", "values": ["a", "b"]}]
            },
        }
        asked = me.post("/api/v1/reservations", json=both)
        assert asked.status_code == 201, asked.text
        second = asked.json()
        assert second["actor"] == holder

        rows = card.locator("tr[data-reservation]")
        expect(rows).to_have_count(2, timeout=LIVE_MS)
        # Oldest first, as the API lists them.
        assert rows.evaluate_all("rows => rows.map(r => r.dataset.reservation)") == [
            first["id"],
            second["id"],
        ]
        row1 = card.locator(f"tr[data-reservation='{first['id']}']")
        expect(row1).to_have_attribute("data-state", "held")
        expect(row1.locator(".col-holder")).to_have_text(holder)
        expect(row1.locator(".col-wants")).to_contain_text("1 × any device")
        expect(row1.locator(".col-wants .chip")).to_have_text("slot=b")
        expect(row1.locator(".col-devices a")).to_have_text(["board-b"])
        expect(row1.locator(".col-until time")).to_contain_text(_local(first_held["expires_at"]))
        row2 = card.locator(f"tr[data-reservation='{second['id']}']")
        expect(row2).to_have_attribute("data-state", "waiting")
        expect(row2.locator(".col-holder")).to_have_text(holder)
        expect(row2.locator(".col-wants")).to_contain_text("2 × simboard")
        expect(row2.locator(".col-wants .chip")).to_have_text("slot In a,b")
        expect(row2.locator(".col-devices")).to_have_text("—")
        waiting_until = me.get(f"/api/v1/reservations/{second['id']}").json()["expires_at"]
        expect(row2.locator(".col-until")).to_contain_text("unless refreshed")
        expect(row2.locator(".col-until time")).to_contain_text(_local(waiting_until))
        lister.screenshot("reservations-waiting.png")

        # The first released, both boards are free at once: the second is granted them.
        released = me.delete(f"/api/v1/reservations/{first['id']}")
        assert released.status_code in (200, 204), released.text
        held = _held(me, second["id"])
        expect(row1).to_have_count(0, timeout=LIVE_MS)
        expect(row2).to_have_attribute("data-state", "held", timeout=LIVE_MS)
        expect(row2.locator(".col-devices a")).to_have_text(["board-a", "board-b"])
        expect(row2.locator(".col-devices a").first).to_have_attribute("href", "#/devices/board-a")
        expect(row2.locator(".col-until time")).to_contain_text(_local(held["expires_at"]))
        expect(row2.locator(".col-until")).not_to_contain_text("unless refreshed")
        lister.screenshot("reservations-held.png")
        page.set_viewport_size(PHONE)
        assert not lister.overflows()
        lister.screenshot("reservations-phone.png")

        # The open device page says who holds the board until when.
        expect(line).to_be_visible(timeout=LIVE_MS)
        expect(line).to_contain_text(
            f"Reserved: {second['id']} by {holder} until {_local(held['expires_at'])}"
        )
        viewer.screenshot("device-reserved.png")

        # Released: gone from the list and from the device page, neither reloaded.
        released = me.delete(f"/api/v1/reservations/{second['id']}")
        assert released.status_code in (200, 204), released.text
        expect(row2).to_have_count(0, timeout=LIVE_MS)
        expect(card).to_contain_text("No device is reserved or waited for.")
        expect(line).to_be_hidden(timeout=LIVE_MS)
        for page_ in (page, viewer.page):
            assert page_.evaluate("window.notReloaded") is True
    finally:
        me.close()
