// One device: what it is, its health with the history of every change (who or which job,
// when, why), its power calls, for operators a control to set its health with a reason,
// and for operators and the holder of its lease its power buttons; while a held reservation
// has it, who holds it until when.
import { fill, h } from "../dom.js";
import { HEALTHS, healthBadge, labelChips, relTime } from "../format.js";
import { ViewLife, batched, errorBanner, holder, lastCheck, runLink, section, supervisorLink } from "./common.js";
import { POLL_MS, reservedLine } from "./reservations.js";

export function mount(root, ctx, { id }) {
  const errors = errorBanner();
  const life = new ViewLife(errors);
  const path = `devices/${encodeURIComponent(id)}`;
  let device = null;

  const badge = h("span", { id: "device-health" });
  const facts = h("dl", { class: "facts", id: "device-facts" });
  const reserved = h("p", { class: "banner reserved", id: "device-reserved", role: "status" });
  reserved.hidden = true;
  const history = h("div", { id: "device-history" });
  const control = h("div", { id: "device-control" });
  const powerControl = h("div", { id: "device-power" });
  const powerHistory = h("div", { id: "device-power-history" });

  root.append(
    h("p", { class: "crumbs" }, h("a", { href: "#/devices" }, "Devices"), " / ", h("span", { class: "id" }, id)),
    h("div", { class: "page-head" }, h("div", { class: "title-line" }, h("h1", {}, id), badge)),
    errors,
    reserved,
    h("section", { class: "card" }, facts),
    control,
    powerControl,
    section("Health history", history),
    section("Power history", powerHistory),
  );

  // ---- set health (operators only: the API refuses anyone else) ---------------------------
  const choice = h("select", { id: "set-health", "aria-label": "New health", required: true }, HEALTHS.map((name) => h("option", { value: name }, name)));
  const reason = h("input", {
    type: "text", id: "set-health-reason", required: true, maxlength: "1024",
    placeholder: "Why (kept in the history)", "aria-label": "Reason",
  });
  const apply = h("button", { type: "submit", class: "button primary", id: "set-health-apply" }, "Set health");
  const formError = h("p", { class: "form-error", id: "set-health-error", role: "alert" });
  formError.hidden = true;
  const form = h(
    "form",
    { class: "set-health", id: "set-health-form", novalidate: true }, // our message, not the browser's
    h("label", { for: "set-health" }, "New health"),
    choice,
    reason,
    apply,
    formError,
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setHealth();
  });
  if (ctx.can("operate")) {
    fill(control, section("Set health", form, h("p", { class: "muted small" }, "A device that is bad, in maintenance or retired gets no job; unknown runs its health check first, if its class has one.")));
  }

  async function setHealth() {
    const why = reason.value.trim();
    if (!why) {
      formError.textContent = "Say why: the reason is kept in the device's history.";
      formError.hidden = false;
      reason.focus();
      return;
    }
    apply.disabled = true;
    formError.hidden = true;
    try {
      device = await ctx.api.put(`${path}/health`, { health: choice.value, reason: why }, life.signal);
      reason.value = "";
      render();
    } catch (error) {
      if (life.alive && error.name !== "AbortError") {
        formError.textContent = error.message;
        formError.hidden = false;
      }
    } finally {
      apply.disabled = false;
    }
  }

  // ---- power (operators, and the holder of the lease the device belongs to) --------------
  const powerResult = h("div", { id: "power-result", class: "power-result", role: "status" });
  powerResult.hidden = true;
  const powerButtons = ["on", "off", "cycle", "status"].map((action) => {
    const button = h("button", { type: "button", class: "button", "data-power": action }, action === "status" ? "Status" : `Power ${action}`);
    button.addEventListener("click", () => switchPower(action));
    return button;
  });
  const powerCard = section(
    "Power",
    h("div", { class: "power-buttons" }, powerButtons),
    powerResult,
    h("p", { class: "muted small" }, "Runs the device's command on its host; every call is kept below and, while a run holds the device, in its timeline."),
  );
  let leaseSeq = 0;

  /** The reservation the device belongs to (looked up again at each load), or null. */
  async function currentLease() {
    if (!device.reservation) return null;
    return life.run(ctx.api.get(`reservations/${encodeURIComponent(device.reservation)}`, {}, life.signal));
  }

  function mayPower(lease) {
    if (!device.power) return false;
    if (ctx.can("operate")) return true;
    return lease !== null && lease.state === "held" && lease.owner !== null && lease.owner === ctx.me.id;
  }

  async function renderLease() {
    const seq = ++leaseSeq;
    const lease = await currentLease();
    if (!life.alive || seq !== leaseSeq) return;
    const line = reservedLine(lease);
    fill(reserved, ...line);
    reserved.hidden = line.length === 0;
    const allowed = mayPower(lease);
    if (allowed && !powerControl.firstChild) fill(powerControl, powerCard);
    else if (!allowed && powerControl.firstChild) fill(powerControl);
  }

  async function switchPower(action) {
    for (const button of powerButtons) button.disabled = true;
    powerResult.hidden = false;
    powerResult.dataset.result = "pending";
    fill(powerResult, h("p", {}, `power ${action} of ${id}…`));
    try {
      const answer = await ctx.api.post(`${path}/power`, { action }, life.signal);
      powerResult.dataset.result = answer.result;
      const status = answer.exit_code === null || answer.exit_code === undefined ? "" : ` (exit status ${answer.exit_code})`;
      fill(
        powerResult,
        h("p", { class: "power-line" }, `power ${action} of ${id}: `, h("strong", {}, answer.ok ? "ok" : answer.result), status, answer.reason ? ` — ${answer.reason}` : ""),
        answer.output ? h("pre", { class: "power-output" }, answer.output) : null,
      );
    } catch (error) {
      if (!life.alive || error.name === "AbortError") return;
      powerResult.dataset.result = "error";
      fill(powerResult, h("p", { class: "form-error" }, `power ${action} of ${id}: ${error.message}`));
    } finally {
      for (const button of powerButtons) button.disabled = false;
    }
    scheduleLoad(); // its power history has the call
  }

  function renderPowerHistory(calls) {
    if (!calls.length) {
      fill(powerHistory, h("p", { class: "muted empty" }, device.power ? "No power calls yet." : "It has no power commands."));
      return;
    }
    fill(powerHistory,
      h(
        "table",
        { class: "table history-table power-table" },
        h("thead", {}, h("tr", {}, ["When", "Who", "Action", "Result", "Job"].map((t) => h("th", { scope: "col" }, t)))),
        h(
          "tbody",
          {},
          calls.map((c) =>
            h(
              "tr",
              { "data-action": c.action, "data-result": c.result },
              h("td", { "data-label": "When" }, relTime(c.at)),
              h("td", { "data-label": "Who", class: "col-actor" }, c.actor),
              h("td", { "data-label": "Action", class: "col-action" }, c.action),
              h(
                "td",
                { "data-label": "Result", class: "col-result" },
                c.result,
                c.exit_code === null || c.exit_code === undefined ? "" : `, exit status ${c.exit_code}`,
                c.reason ? h("span", { class: "muted" }, ` (${c.reason})`) : "",
              ),
              h("td", { "data-label": "Job" }, c.job_id ? runLink(c.job_id) : h("span", { class: "muted" }, "—")),
            ),
          ),
        ),
      ),
    );
  }

  // ---- the device ---------------------------------------------------------------------------
  function render() {
    fill(badge, healthBadge(device.health, device.health_reason));
    const fact = (label, ...value) => [h("dt", {}, label), h("dd", { "data-fact": label.toLowerCase() }, ...value)];
    fill(facts,
      ...fact("Health", healthBadge(device.health), " ", device.health_reason, h("span", { class: "muted" }, " · since "), relTime(device.health_at)),
      ...fact("Class", h("code", {}, device.class)),
      ...fact("Host", supervisorLink(device.supervisor_id)),
      ...fact("Holder", holder(device)),
      ...fact("Last check", lastCheck(device)),
      ...fact("Console", device.console ? "yes" : "no"),
      ...fact("Power", device.power ? "yes" : "no"),
      ...fact("Labels", labelChips(device.labels)),
      ...fact("First seen", relTime(device.first_seen)),
      ...fact("Last declared", relTime(device.last_declared)),
    );
    renderHistory(device.history || []);
    renderPowerHistory(device.power_history || []);
    renderLease();
  }

  function renderHistory(changes) {
    if (!changes.length) {
      fill(history, h("p", { class: "muted empty" }, "No changes yet."));
      return;
    }
    fill(history,
      h(
        "table",
        { class: "table history-table" },
        h("thead", {}, h("tr", {}, ["When", "Health", "Who", "Job", "Why"].map((t) => h("th", { scope: "col" }, t)))),
        h(
          "tbody",
          {},
          changes.map((c) =>
            h(
              "tr",
              { "data-to": c.to },
              h("td", { "data-label": "When" }, relTime(c.at)),
              h("td", { "data-label": "Health" }, c.from ? [healthBadge(c.from), " → "] : null, healthBadge(c.to)),
              h("td", { "data-label": "Who", class: "col-actor" }, c.actor),
              h("td", { "data-label": "Job" }, c.job_id ? runLink(c.job_id) : h("span", { class: "muted" }, "—")),
              h("td", { "data-label": "Why", class: "col-reason" }, c.reason || h("span", { class: "muted" }, "—")),
            ),
          ),
        ),
      ),
    );
  }

  async function load() {
    const fresh = await life.run(ctx.api.get(path, {}, life.signal));
    if (!fresh) return;
    if (device === null) choice.value = fresh.health; // later, never under the operator's hand
    device = fresh;
    render();
  }

  const scheduleLoad = batched(load, 100);
  // An extended lease moves its end with no device event: look again now and then.
  const leaseTimer = setInterval(() => device && device.reservation && renderLease(), POLL_MS);
  life.onEnd(() => {
    scheduleLoad.cancel();
    clearInterval(leaseTimer);
  });
  load();

  return {
    title: id,
    unmount: () => life.end(),
    onLive(type, data) {
      // The event has no history: fetch the device again for it.
      if ((type === "device" && data.id === id) || type === "resync") scheduleLoad();
      else if (type === "device_removed" && data.id === id) life.fail(new Error("Its supervisor no longer declares this device."));
    },
  };
}
