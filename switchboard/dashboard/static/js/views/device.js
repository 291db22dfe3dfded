// One device: what it is, its health with the history of every change (who or which job,
// when, why), and for operators a control to set its health with a reason.
import { fill, h } from "../dom.js";
import { HEALTHS, healthBadge, labelChips, relTime } from "../format.js";
import { ViewLife, batched, errorBanner, holder, lastCheck, runLink, section, supervisorLink } from "./common.js";

export function mount(root, ctx, { id }) {
  const errors = errorBanner();
  const life = new ViewLife(errors);
  const path = `devices/${encodeURIComponent(id)}`;
  let device = null;

  const badge = h("span", { id: "device-health" });
  const facts = h("dl", { class: "facts", id: "device-facts" });
  const history = h("div", { id: "device-history" });
  const control = h("div", { id: "device-control" });

  root.append(
    h("p", { class: "crumbs" }, h("a", { href: "#/devices" }, "Devices"), " / ", h("span", { class: "id" }, id)),
    h("div", { class: "page-head" }, h("div", { class: "title-line" }, h("h1", {}, id), badge)),
    errors,
    h("section", { class: "card" }, facts),
    control,
    section("Health history", history),
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
  life.onEnd(() => scheduleLoad.cancel());
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
