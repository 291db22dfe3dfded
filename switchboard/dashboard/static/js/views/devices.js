// The lab's devices: counts by health, filters by class, health and host (the API's own
// filters), and rows that follow each device's health, check and holder live; under
// them, the reservations waiting or held.
import { fill, h } from "../dom.js";
import { HEALTHS } from "../format.js";
import { DeviceTable, ViewLife, batched, errorBanner } from "./common.js";
import { ReservationsCard } from "./reservations.js";

export function mount(root, ctx, { params }) {
  const errors = errorBanner();
  const life = new ViewLife(errors);
  const filter = { class: params.get("class") || "", health: params.get("health") || "", host: params.get("host") || "" };
  // Every device of the class and host filters, whatever its health: what the counts count.
  const scope = new Map();
  let loadSeq = 0;
  let loadController = null;

  const counts = h("div", { class: "tabs", role: "tablist", "aria-label": "Health", id: "devices-counts" });
  const klass = h("input", { type: "text", id: "devices-class", placeholder: "Class", value: filter.class, "aria-label": "Class" });
  const health = h(
    "select",
    { id: "devices-health", "aria-label": "Health" },
    h("option", { value: "" }, "Any health"),
    HEALTHS.map((name) => h("option", { value: name }, name)),
  );
  const host = h("input", { type: "text", id: "devices-host", placeholder: "Host (supervisor id)", value: filter.host, "aria-label": "Host" });
  const clear = h("button", { type: "button", class: "button subtle" }, "Clear");
  const table = new DeviceTable(["id", "class", "host", "health", "check", "holder", "labels"], "No devices match.");
  table.el.id = "devices-table";
  health.value = filter.health;
  const reservations = new ReservationsCard(ctx, life);

  root.append(
    h("h1", {}, "Devices"),
    counts,
    h("form", { class: "filters", id: "devices-filters", role: "search" }, klass, health, host, clear),
    errors,
    h("section", { class: "card flush" }, table.el),
    reservations.el,
  );

  function inScope(device) {
    return (!filter.class || device.class === filter.class) && (!filter.host || device.supervisor_id === filter.host);
  }

  function matches(device) {
    return inScope(device) && (!filter.health || device.health === filter.health);
  }

  function renderCounts() {
    const tally = { all: scope.size };
    for (const name of HEALTHS) tally[name] = 0;
    for (const device of scope.values()) tally[device.health] = (tally[device.health] || 0) + 1;
    fill(counts,
      ...["all", ...HEALTHS].map((name) => {
        const selected = (filter.health || "all") === name;
        const tab = h(
          "button",
          { type: "button", role: "tab", class: "tab", "data-count": name, "aria-selected": String(selected) },
          `${name} `,
          h("span", { class: "count" }, String(tally[name])),
        );
        tab.addEventListener("click", () => {
          health.value = name === "all" ? "" : name;
          refilter();
        });
        return tab;
      }),
    );
  }

  function query(withHealth) {
    return { class: filter.class, host: filter.host, health: withHealth ? filter.health : "" };
  }

  function syncUrl() {
    const search = new URLSearchParams();
    for (const [key, value] of Object.entries(query(true))) if (value) search.append(key, value);
    const text = search.toString();
    history.replaceState(null, "", `#/devices${text ? "?" + text : ""}`);
  }

  async function load() {
    const seq = ++loadSeq;
    if (loadController) loadController.abort();
    loadController = new AbortController();
    const signal = loadController.signal;
    const [all, shown] = await Promise.all([
      life.run(ctx.api.get("devices", query(false), signal)),
      filter.health ? life.run(ctx.api.get("devices", query(true), signal)) : null,
    ]);
    if (!all || seq !== loadSeq || (filter.health && !shown)) return;
    scope.clear();
    for (const device of all) scope.set(device.id, device);
    table.set(filter.health ? shown : all);
    renderCounts();
  }

  function refilter() {
    filter.class = klass.value.trim();
    filter.health = health.value;
    filter.host = host.value.trim();
    syncUrl();
    load();
  }

  let typing = null;
  for (const input of [klass, host]) {
    input.addEventListener("input", () => {
      clearTimeout(typing);
      typing = setTimeout(refilter, 250);
    });
  }
  health.addEventListener("change", refilter);
  root.querySelector("form").addEventListener("submit", (event) => {
    event.preventDefault();
    clearTimeout(typing);
    refilter();
  });
  clear.addEventListener("click", () => {
    klass.value = host.value = health.value = "";
    refilter();
  });
  const scheduleCounts = batched(renderCounts, 50);
  life.onEnd(() => {
    clearTimeout(typing);
    scheduleCounts.cancel();
    if (loadController) loadController.abort();
  });

  load();
  return {
    title: "Devices",
    unmount: () => life.end(),
    onLive(type, data) {
      reservations.onLive(type, data);
      if (type === "device") {
        if (inScope(data)) scope.set(data.id, data);
        else scope.delete(data.id);
        if (matches(data)) table.put(data);
        else table.remove(data.id);
        scheduleCounts();
      } else if (type === "device_removed") {
        scope.delete(data.id);
        table.remove(data.id);
        scheduleCounts();
      } else if (type === "resync") {
        load();
      }
    },
  };
}
