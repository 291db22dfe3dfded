// Every supervisor, filtered by state and name in the browser (the API lists them whole).
import { fill, h } from "../dom.js";
import { labelChips, relTime, stateBadge, supervisorState } from "../format.js";
import { ViewLife, bar, batched, errorBanner } from "./common.js";

const SHOWN = 200;

export function mount(root, ctx, { params }) {
  const errors = errorBanner();
  const life = new ViewLife(errors);
  const supervisors = new Map();
  let group = params.get("state") || "all";
  let limit = SHOWN;

  const search = h("input", { type: "search", id: "supervisors-q", placeholder: "Name, id or label", "aria-label": "Search supervisors" });
  const tabs = h("div", { class: "tabs", role: "tablist", "aria-label": "State" });
  const tbody = h("tbody");
  const more = h("button", { type: "button", class: "button subtle" }, "Show more");
  const empty = h("p", { class: "muted empty" }, "No supervisors match.");
  const table = h(
    "table",
    { class: "table", id: "supervisors-table" },
    h("thead", {}, h("tr", {}, ["Name", "State", "Runs", "Labels", "Backends", "Last heard"].map((t) => h("th", { scope: "col" }, t)))),
    tbody,
  );

  root.append(
    h("h1", {}, "Supervisors"),
    h("div", { class: "filters" }, search, tabs),
    errors,
    h("section", { class: "card flush" }, h("div", { class: "table-wrap" }, table, empty)),
    more,
  );

  function matches(sup, text) {
    if (group !== "all" && supervisorState(sup) !== group) return false;
    if (!text) return true;
    const haystack = [sup.id, sup.name, ...Object.entries(sup.labels).map(([k, v]) => `${k}=${v}`)].join(" ").toLowerCase();
    return haystack.includes(text);
  }

  function render() {
    const counts = { all: 0, online: 0, draining: 0, offline: 0 };
    for (const sup of supervisors.values()) {
      counts.all++;
      counts[supervisorState(sup)]++;
    }
    fill(tabs,
      ...Object.keys(counts).map((name) => {
        const tab = h("button", { type: "button", role: "tab", class: "tab", "aria-selected": String(group === name) }, `${name} `, h("span", { class: "count" }, String(counts[name])));
        tab.addEventListener("click", () => {
          group = name;
          limit = SHOWN;
          history.replaceState(null, "", name === "all" ? "#/supervisors" : `#/supervisors?state=${name}`);
          render();
        });
        return tab;
      }),
    );
    const text = search.value.trim().toLowerCase();
    const list = [...supervisors.values()].filter((sup) => matches(sup, text)).sort((a, b) => a.name.localeCompare(b.name));
    fill(tbody,
      ...list.slice(0, limit).map((sup) => {
        const state = supervisorState(sup);
        return h(
          "tr",
          { "data-supervisor": sup.id },
          h("td", { "data-label": "Name" }, h("a", { href: `#/supervisors/${encodeURIComponent(sup.id)}` }, sup.name)),
          h("td", { "data-label": "State" }, stateBadge(state)),
          h("td", { "data-label": "Runs" }, `${sup.running} / ${sup.max_jobs} `, bar(sup.max_jobs ? sup.running / sup.max_jobs : 0, "running")),
          h("td", { "data-label": "Labels" }, labelChips(sup.labels, sup.operator_labels)),
          h("td", { "data-label": "Backends" }, sup.backends.join(", ")),
          h("td", { "data-label": "Last heard" }, relTime(sup.last_seen)),
        );
      }),
    );
    empty.hidden = list.length > 0;
    table.hidden = list.length === 0;
    more.hidden = list.length <= limit;
  }

  const schedule = batched(render, 100);
  life.onEnd(() => schedule.cancel());
  search.addEventListener("input", schedule);
  more.addEventListener("click", () => {
    limit += SHOWN;
    render();
  });

  async function load() {
    const list = await life.run(ctx.api.get("supervisors", {}, life.signal));
    if (!list) return;
    supervisors.clear();
    for (const sup of list) supervisors.set(sup.id, sup);
    render();
  }

  load();
  return {
    title: "Supervisors",
    unmount: () => life.end(),
    onLive(type, data) {
      if (type === "supervisor") {
        supervisors.set(data.id, data);
        schedule();
      } else if (type === "resync") {
        load();
      }
    },
  };
}
