// Jobs: filters (phase, label, supervisor), search by name or id, server-side paging by
// cursor, and rows that follow their job's phase live.
import { h } from "../dom.js";
import { ACTIVE, PHASES, TERMINAL } from "../format.js";
import { JobTable, ViewLife, errorBanner } from "./common.js";

const PAGE = 50;
/** Live inserts stop past this many rows on one page (the user can reload the list). */
const MAX_ROWS = PAGE * 3;

const PRESETS = {
  active: ACTIVE,
  ended: [...TERMINAL],
  unsuccessful: [...TERMINAL].filter((p) => p !== "succeeded"),
};

function labelMatches(labels, term) {
  const negated = term.startsWith("!");
  const notEq = term.indexOf("!=");
  const eq = term.indexOf("=");
  if (notEq > 0) return labels[term.slice(0, notEq)] !== term.slice(notEq + 2);
  if (eq > 0) return labels[term.slice(0, eq)] === term.slice(eq + 1);
  return negated ? !(term.slice(1) in labels) : term in labels;
}

export function mount(root, ctx, { params }) {
  const errors = errorBanner();
  const life = new ViewLife(errors);
  const filter = {
    q: params.get("q") || "",
    phases: params.getAll("phase"),
    labels: params.getAll("label"),
    supervisor: params.get("supervisor") || "",
  };
  const cursors = [null]; // the cursor of each page visited: [page 1, page 2, ...]
  let nextCursor = null;
  let loadSeq = 0;
  let loadController = null;

  const q = h("input", { type: "search", id: "jobs-q", placeholder: "Name or id", value: filter.q, "aria-label": "Search by name or id" });
  const phase = h(
    "select",
    { id: "jobs-phase", "aria-label": "Phase" },
    h("option", { value: "" }, "Any phase"),
    h("option", { value: "preset:active" }, "Active"),
    h("option", { value: "preset:ended" }, "Ended"),
    h("option", { value: "preset:unsuccessful" }, "Ended, not successful"),
    PHASES.map((p) => h("option", { value: p }, p.replace("_", " "))),
  );
  const label = h("input", { type: "text", id: "jobs-label", placeholder: "Labels: key=value, !key", value: filter.labels.join(", "), "aria-label": "Label filter" });
  const supervisor = h("input", { type: "text", id: "jobs-supervisor", placeholder: "Supervisor id", value: filter.supervisor, "aria-label": "Supervisor" });
  const clear = h("button", { type: "button", class: "button subtle" }, "Clear");
  const table = new JobTable(["name", "phase", "priority", "labels", "supervisor", "attempts", "outcome", "created"], "No jobs match.");
  const newer = h("button", { type: "button", class: "button", id: "jobs-newer" }, "← Newer");
  const older = h("button", { type: "button", class: "button", id: "jobs-older" }, "Older →");
  const pageInfo = h("span", { class: "muted", id: "jobs-page" });
  const overflow = h("button", { type: "button", class: "button subtle", id: "jobs-reload" }, "More jobs arrived: reload the list");
  overflow.hidden = true;

  phase.value = presetOf(filter.phases);

  root.append(
    h("h1", {}, "Jobs"),
    h("form", { class: "filters", id: "jobs-filters", role: "search" }, q, phase, label, supervisor, clear),
    errors,
    overflow,
    h("section", { class: "card flush" }, table.el),
    h("nav", { class: "pager", "aria-label": "Pages" }, newer, pageInfo, older),
  );

  function presetOf(phases) {
    for (const [name, list] of Object.entries(PRESETS)) {
      if (phases.length === list.length && list.every((p) => phases.includes(p))) return `preset:${name}`;
    }
    return phases.length === 1 ? phases[0] : "";
  }

  function readFilter() {
    filter.q = q.value.trim();
    filter.phases = phase.value.startsWith("preset:") ? PRESETS[phase.value.slice(7)] : phase.value ? [phase.value] : [];
    filter.labels = label.value.split(",").map((t) => t.trim()).filter(Boolean);
    filter.supervisor = supervisor.value.trim();
  }

  function query() {
    return { q: filter.q, phase: filter.phases, label: filter.labels, supervisor: filter.supervisor };
  }

  function syncUrl() {
    const search = new URLSearchParams();
    for (const [key, value] of Object.entries(query())) {
      for (const v of Array.isArray(value) ? value : [value]) if (v) search.append(key, v);
    }
    const text = search.toString();
    history.replaceState(null, "", `#/jobs${text ? "?" + text : ""}`);
  }

  function matches(job) {
    if (filter.phases.length && !filter.phases.includes(job.phase)) return false;
    if (filter.supervisor && job.supervisor_id !== filter.supervisor) return false;
    if (!filter.labels.every((term) => labelMatches(job.labels || {}, term))) return false;
    if (filter.q) {
      const text = filter.q.toLowerCase();
      if (!job.name.toLowerCase().includes(text) && !job.id.startsWith(filter.q)) return false;
    }
    return true;
  }

  async function load() {
    const seq = ++loadSeq;
    if (loadController) loadController.abort();
    loadController = new AbortController();
    const cursor = cursors[cursors.length - 1];
    const page = await life.run(ctx.api.get("jobs", { ...query(), cursor, limit: PAGE }, loadController.signal));
    if (!page || seq !== loadSeq) return;
    table.set(page.items);
    nextCursor = page.next_cursor;
    overflow.hidden = true;
    newer.disabled = cursors.length === 1;
    older.disabled = !nextCursor;
    pageInfo.textContent = `page ${cursors.length}`;
  }

  function refilter() {
    readFilter();
    syncUrl();
    cursors.length = 1;
    load();
  }

  let typing = null;
  for (const input of [q, label, supervisor]) {
    input.addEventListener("input", () => {
      clearTimeout(typing);
      typing = setTimeout(refilter, 250);
    });
  }
  life.onEnd(() => {
    clearTimeout(typing);
    if (loadController) loadController.abort();
  });
  phase.addEventListener("change", refilter);
  root.querySelector("form").addEventListener("submit", (event) => {
    event.preventDefault();
    clearTimeout(typing);
    refilter();
  });
  clear.addEventListener("click", () => {
    q.value = label.value = supervisor.value = phase.value = "";
    refilter();
  });
  older.addEventListener("click", () => {
    if (!nextCursor) return;
    cursors.push(nextCursor);
    load();
  });
  newer.addEventListener("click", () => {
    if (cursors.length > 1) cursors.pop();
    load();
  });
  overflow.addEventListener("click", () => load());

  /** A job not shown: insert it where its creation time puts it, if that is on this page. */
  function insert(job) {
    const rows = [...table.rows.values()];
    const before = rows.find((entry) => entry.job.created_at <= job.created_at);
    if (cursors.length > 1 && (!before || before === rows[0])) return; // belongs on a newer page
    if (!before && nextCursor) return; // belongs on an older page
    if (table.size >= MAX_ROWS) {
      overflow.hidden = false;
      return;
    }
    const row = table.makeRow(job);
    if (before) before.row.before(row);
    else table.tbody.append(row);
    row.classList.add("changed");
    setTimeout(() => row.classList.remove("changed"), 1200);
    table.updateEmpty();
  }

  load();
  return {
    title: "Jobs",
    unmount: () => life.end(),
    onLive(type, data) {
      if (type === "job") {
        if (table.has(data.id)) {
          table.update(data);
          table.rows.get(data.id).row.classList.toggle("outside-filter", !matches(data));
        } else if (matches(data)) {
          insert(data);
        }
      } else if (type === "job_deleted") {
        table.remove(data.id);
      } else if (type === "resync") {
        load();
      }
    },
  };
}
