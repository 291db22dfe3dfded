// One supervisor: labels, resources, backends, the devices it declares, current and recent
// runs, last heartbeat, connection history, and drain / resume for operators.
import { fill, h } from "../dom.js";
import { ACTIVE, absTime, duration, labelChips, relTime, stateBadge, supervisorState } from "../format.js";
import { DeviceTable, JobTable, ViewLife, bar, batched, errorBanner, section } from "./common.js";

export function mount(root, ctx, { id }) {
  const errors = errorBanner();
  const life = new ViewLife(errors);
  let sup = null;
  let busy = false;

  const title = h("h1", {}, id);
  const badge = h("span", { id: "supervisor-state" });
  const actions = h("div", { class: "actions", id: "supervisor-actions" });
  const facts = h("dl", { class: "facts", id: "supervisor-facts" });
  const labels = h("div", { id: "supervisor-labels" });
  const resources = h("div", { id: "supervisor-resources" });
  const current = new JobTable(["name", "phase", "priority", "created", "updated"], "No runs here now.");
  const recent = new JobTable(["name", "phase", "outcome", "attempts", "updated"], "No runs yet.");
  const connections = h("div", { id: "supervisor-connections" });
  const devices = new DeviceTable(["id", "class", "health", "check", "holder"]);
  const devicesCard = section("Devices", devices.el, h("p", { class: "small" }, h("a", { href: `#/devices?host=${encodeURIComponent(id)}` }, "In the devices list →")));
  devicesCard.id = "supervisor-devices";
  devicesCard.hidden = true; // shown once it declares a device
  current.el.id = "supervisor-current";
  recent.el.id = "supervisor-recent";

  root.append(
    h("p", { class: "crumbs" }, h("a", { href: "#/supervisors" }, "Supervisors"), " / ", h("span", { class: "id" }, id)),
    h("div", { class: "page-head" }, h("div", { class: "title-line" }, title, badge), actions),
    errors,
    h("section", { class: "card" }, facts),
    h("div", { class: "grid-2" }, section("Labels", labels), section("Resources", resources)),
    devicesCard,
    section("Current runs", current.el),
    section("Recent runs", recent.el, h("p", { class: "small" }, h("a", { href: `#/jobs?supervisor=${encodeURIComponent(id)}` }, "All jobs that ran here →"))),
    section("Connections", connections),
  );

  function renderSupervisor() {
    const state = supervisorState(sup);
    title.textContent = sup.name;
    document.title = `${sup.name} · Switchboard`;
    fill(badge, stateBadge(state));
    const buttons = [];
    if (ctx.can("operate")) {
      const resume = sup.drained;
      const button = h(
        "button",
        { type: "button", class: resume ? "button primary" : "button", id: resume ? "resume-supervisor" : "drain-supervisor", disabled: busy },
        resume ? "Resume" : "Drain",
      );
      button.title = resume ? "Let it take new runs again" : "Take no new runs here; current runs finish";
      button.addEventListener("click", () => setDrained(!resume));
      buttons.push(button);
    }
    fill(actions, ...buttons);
    const fact = (label, ...value) => [h("dt", {}, label), h("dd", { "data-fact": label.toLowerCase() }, ...value)];
    fill(facts,
      ...fact("Id", h("code", {}, sup.id)),
      ...fact("State", state, sup.drained ? " (drained: takes no new runs)" : ""),
      ...fact("Last heard", relTime(sup.last_seen), sup.last_seen ? h("span", { class: "muted" }, ` · ${absTime(sup.last_seen)}`) : ""),
      ...fact("Connected since", sup.connected ? relTime(sup.connected_at) : h("span", { class: "muted" }, "not connected")),
      ...fact("Runs", `${sup.running} of ${sup.max_jobs} `, bar(sup.max_jobs ? sup.running / sup.max_jobs : 0, "running")),
      ...fact("Backends", sup.backends.length ? h("span", { class: "chips" }, sup.backends.map((b) => h("span", { class: "chip" }, b))) : "—"),
      ...fact("Session", String(sup.session)),
      ...fact("Software", sup.software || "—"),
    );
    const advertised = sup.advertised_labels || {};
    fill(labels,
      h("h3", {}, "Advertised"),
      labelChips(advertised),
      h("h3", {}, "Set by operators"),
      labelChips(sup.operator_labels, sup.operator_labels),
      h("p", { class: "muted small" }, "Operator labels override advertised ones with the same key."),
    );
    const entries = Object.entries(sup.resources);
    fill(resources,
      entries.length
        ? h(
            "table",
            { class: "table compact" },
            h("thead", {}, h("tr", {}, h("th", {}, "Resource"), h("th", {}, "Count"))),
            h("tbody", {}, entries.map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", {}, String(v))))),
          )
        : h("p", { class: "muted empty" }, "No countable resources advertised."),
    );
  }

  async function setDrained(drained) {
    busy = true;
    renderSupervisor();
    const updated = await life.run(ctx.api.post(`supervisors/${encodeURIComponent(id)}/${drained ? "drain" : "resume"}`));
    busy = false;
    if (updated) sup = updated;
    if (sup) renderSupervisor();
  }

  function renderConnections(list) {
    if (!list.length) {
      fill(connections, h("p", { class: "muted empty" }, "Never connected."));
      return;
    }
    fill(connections,
      h(
        "table",
        { class: "table" },
        h("thead", {}, h("tr", {}, ["Session", "Connected", "Disconnected", "Lasted", "Why it ended"].map((t) => h("th", {}, t)))),
        h(
          "tbody",
          {},
          list.map((c) =>
            h(
              "tr",
              { "data-session": c.session },
              h("td", { "data-label": "Session" }, String(c.session)),
              h("td", { "data-label": "Connected" }, absTime(c.connected_at)),
              h("td", { "data-label": "Disconnected" }, c.disconnected_at ? absTime(c.disconnected_at) : h("span", { class: "badge tone-good" }, "connected")),
              h("td", { "data-label": "Lasted" }, duration((c.disconnected_at || Date.now() / 1000) - c.connected_at)),
              h("td", { "data-label": "Why it ended" }, c.reason || ""),
            ),
          ),
        ),
      ),
    );
  }

  const path = `supervisors/${encodeURIComponent(id)}`;

  async function loadRuns() {
    const [now, latest] = await Promise.all([
      life.run(ctx.api.get("jobs", { supervisor: id, phase: ACTIVE, limit: 100 }, life.signal)),
      life.run(ctx.api.get("jobs", { supervisor: id, limit: 20 }, life.signal)),
    ]);
    // `supervisor=` means "had a run there": keep the jobs whose current run is here.
    if (now) current.set(now.items.filter((job) => job.supervisor_id === id));
    if (latest) recent.set(latest.items);
  }

  async function loadDevices() {
    const list = await life.run(ctx.api.get("devices", { host: id }, life.signal));
    if (!list) return;
    devices.set(list);
    devicesCard.hidden = list.length === 0;
  }

  async function loadConnections() {
    const list = await life.run(ctx.api.get(`${path}/connections`, {}, life.signal));
    if (list) renderConnections(list);
  }

  async function load() {
    const fresh = await life.run(ctx.api.get(path, {}, life.signal));
    if (!fresh) return;
    sup = fresh;
    renderSupervisor();
    loadRuns();
    loadConnections();
    loadDevices();
  }

  // A busy supervisor changes jobs many times a second: refetch its lists at most twice a second.
  const scheduleRuns = batched(loadRuns, 500);
  const scheduleConnections = batched(loadConnections, 200);
  life.onEnd(() => {
    scheduleRuns.cancel();
    scheduleConnections.cancel();
  });
  load();

  return {
    title: id,
    unmount: () => life.end(),
    onLive(type, data) {
      if (type === "supervisor" && data.id === id) {
        const reconnected = !sup || sup.connected !== data.connected || sup.session !== data.session;
        sup = data;
        renderSupervisor();
        if (reconnected) scheduleConnections();
      } else if (type === "job") {
        if (data.supervisor_id === id || current.has(data.id) || recent.has(data.id)) scheduleRuns();
      } else if (type === "heartbeats") {
        // Every few seconds: when each connected supervisor was last heard from.
        const heard = data.last_heard[id];
        if (sup && sup.connected && heard && !busy) {
          sup = { ...sup, last_seen: heard };
          renderSupervisor();
        }
      } else if (type === "device" && (data.supervisor_id === id || devices.has(data.id))) {
        if (data.supervisor_id === id) devices.put(data);
        else devices.remove(data.id);
        devicesCard.hidden = devices.size === 0;
      } else if (type === "device_removed") {
        devices.remove(data.id);
        devicesCard.hidden = devices.size === 0;
      } else if (type === "job_deleted") {
        current.remove(data.id);
        recent.remove(data.id);
      } else if (type === "resync") {
        load();
      }
    },
  };
}
