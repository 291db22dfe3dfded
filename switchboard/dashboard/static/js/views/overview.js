// The overview: supervisors by state with their current runs, queue depth per priority,
// jobs finished per minute, and the latest failures. Counts are aggregated by the server
// (GET /overview, then `overview` events); only active jobs are loaded here.
import { fill, h, s } from "../dom.js";
import { ACTIVE, clockTime, phaseBadge, relTime, stateBadge, supervisorState } from "../format.js";
import { JobTable, ViewLife, bar, batched, errorBanner, section } from "./common.js";

/** Supervisors listed per state before "show all" (the full list has its own page). */
const SHOWN_PER_STATE = 60;
/** Current runs listed per supervisor. */
const RUNS_PER_SUPERVISOR = 6;

export function mount(root, ctx) {
  const errors = errorBanner();
  const life = new ViewLife(errors);
  const state = { overview: null, supervisors: new Map(), active: new Map(), group: "online" };

  const stats = h("div", { class: "stats", id: "overview-stats" });
  const chart = h("div", { class: "chart", id: "finished-chart" });
  const queue = h("div", { id: "queue-depth" });
  const failures = new JobTable(["name", "phase", "outcome", "supervisor", "updated"], "No failures lately.");
  const tabs = h("div", { class: "tabs", role: "tablist", "aria-label": "Supervisor state" });
  const supList = h("div", { class: "supervisor-list", id: "overview-supervisors" });

  root.append(
    h("h1", {}, "Overview"),
    errors,
    stats,
    h(
      "div",
      { class: "grid-2" },
      section("Jobs finished per minute", chart),
      section("Queue by priority", queue),
    ),
    section("Supervisors", tabs, supList),
    h("section", { class: "card" }, h("h2", {}, "Recent failures"), failures.el),
  );

  function renderStats() {
    const o = state.overview;
    if (!o) return;
    const queued = o.queue.reduce((sum, q) => sum + q.count, 0);
    const card = (key, label, value, tone) =>
      h("div", { class: `stat tone-${tone}`, "data-stat": key }, h("span", { class: "stat-value" }, String(value)), h("span", { class: "stat-label" }, label));
    fill(stats,
      card("online", "online", o.supervisors.online, "good"),
      card("draining", "draining", o.supervisors.draining, "stopping"),
      card("offline", "offline", o.supervisors.offline, "neutral"),
      card("running", "running", o.running, "running"),
      card("queued", "queued", queued, "waiting"),
    );
    renderChart(o.finished);
    renderQueue(o.queue);
    failures.set(o.recent_failures);
  }

  function renderChart(minutes) {
    const peak = Math.max(1, ...minutes.map((m) => m.succeeded + m.failed));
    const width = 10 * Math.max(1, minutes.length);
    const height = 100;
    const bars = minutes.map((m, i) => {
      const okHeight = (m.succeeded / peak) * height;
      const badHeight = (m.failed / peak) * height;
      return s(
        "g",
        {},
        s("title", {}, `${clockTime(m.minute).slice(0, 5)}: ${m.succeeded} succeeded, ${m.failed} failed`),
        s("rect", { x: i * 10 + 1, y: height - okHeight, width: 8, height: okHeight, class: "bar-ok" }),
        s("rect", { x: i * 10 + 1, y: height - okHeight - badHeight, width: 8, height: badHeight, class: "bar-bad" }),
        // an invisible full-height target, so every minute has a tooltip
        s("rect", { x: i * 10, y: 0, width: 10, height, class: "bar-hit" }),
      );
    });
    const total = minutes.reduce((sum, m) => sum + m.succeeded + m.failed, 0);
    const failed = minutes.reduce((sum, m) => sum + m.failed, 0);
    fill(chart,
      h("div", { class: "chart-top muted" }, h("span", {}, `peak ${peak}/min`), h("span", {}, `${total} in the last hour, ${failed} not successful`)),
      s("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none", role: "img", "aria-label": "jobs finished per minute, last hour" }, bars),
      h(
        "div",
        { class: "chart-axis muted" },
        h("span", {}, `${minutes.length} min ago`),
        h("span", { class: "legend" }, h("i", { class: "key ok" }), "succeeded ", h("i", { class: "key bad" }), "other endings"),
        h("span", {}, "now"),
      ),
    );
  }

  function renderQueue(depths) {
    if (!depths.length) {
      fill(queue, h("p", { class: "muted empty" }, "Nothing queued."));
      return;
    }
    const most = Math.max(...depths.map((q) => q.count));
    fill(queue,
      h(
        "table",
        { class: "table compact" },
        h("thead", {}, h("tr", {}, h("th", {}, "Priority"), h("th", {}, "Jobs"), h("th", { class: "grow" }, ""))),
        h(
          "tbody",
          {},
          depths.map((q) =>
            h("tr", { "data-priority": q.priority }, h("td", {}, String(q.priority)), h("td", {}, String(q.count)), h("td", { class: "grow" }, bar(q.count / most, "waiting"))),
          ),
        ),
      ),
      h("p", { class: "muted small" }, h("a", { href: "#/jobs?phase=queued" }, "Queued jobs →")),
    );
  }

  function renderSupervisors() {
    const groups = { online: [], draining: [], offline: [] };
    for (const sup of state.supervisors.values()) groups[supervisorState(sup)].push(sup);
    const runsBy = new Map();
    for (const job of state.active.values()) {
      if (!job.supervisor_id) continue;
      if (!runsBy.has(job.supervisor_id)) runsBy.set(job.supervisor_id, []);
      runsBy.get(job.supervisor_id).push(job);
    }
    fill(tabs,
      ...Object.entries(groups).map(([name, list]) => {
        const tab = h(
          "button",
          { type: "button", role: "tab", class: "tab", "data-group": name, "aria-selected": String(state.group === name) },
          `${name} `,
          h("span", { class: "count" }, String(list.length)),
        );
        tab.addEventListener("click", () => {
          state.group = name;
          renderSupervisors();
        });
        return tab;
      }),
    );
    const list = groups[state.group].sort((a, b) => a.name.localeCompare(b.name));
    if (!list.length) {
      fill(supList, h("p", { class: "muted empty" }, `No ${state.group} supervisors.`));
      return;
    }
    const shown = list.slice(0, SHOWN_PER_STATE);
    fill(supList,
      ...shown.map((sup) => supervisorCard(sup, runsBy.get(sup.id) || [])),
      list.length > shown.length
        ? h("p", { class: "muted" }, h("a", { href: `#/supervisors?state=${state.group}` }, `All ${list.length} ${state.group} supervisors →`))
        : null,
    );
  }

  function supervisorCard(sup, runs) {
    const st = supervisorState(sup);
    runs.sort((a, b) => b.updated_at - a.updated_at);
    return h(
      "div",
      { class: "supervisor-card", "data-supervisor": sup.id, "data-state": st },
      h(
        "div",
        { class: "supervisor-head" },
        h("a", { href: `#/supervisors/${encodeURIComponent(sup.id)}`, class: "supervisor-name" }, sup.name),
        stateBadge(st),
        h("span", { class: "load", title: "runs / capacity" }, `${sup.running} / ${sup.max_jobs}`),
        bar(sup.max_jobs ? sup.running / sup.max_jobs : 0, "running"),
      ),
      runs.length
        ? h(
            "ul",
            { class: "run-chips" },
            runs.slice(0, RUNS_PER_SUPERVISOR).map((job) =>
              h("li", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.name), " ", phaseBadge(job.phase)),
            ),
            runs.length > RUNS_PER_SUPERVISOR
              ? h("li", {}, h("a", { href: `#/jobs?supervisor=${encodeURIComponent(sup.id)}` }, `+${runs.length - RUNS_PER_SUPERVISOR} more`))
              : null,
          )
        : h("p", { class: "muted small" }, st === "offline" ? ["last seen ", relTime(sup.last_seen)] : "idle"),
    );
  }

  const scheduleSupervisors = batched(renderSupervisors);
  const scheduleStats = batched(renderStats);
  life.onEnd(() => {
    scheduleSupervisors.cancel();
    scheduleStats.cancel();
  });

  async function load() {
    const [overview, supervisors, active] = await Promise.all([
      life.run(ctx.api.get("overview", {}, life.signal)),
      life.run(ctx.api.get("supervisors", {}, life.signal)),
      life.run(ctx.api.get("jobs", { phase: ACTIVE, limit: 500 }, life.signal)),
    ]);
    if (overview) {
      state.overview = overview;
      renderStats();
    }
    if (supervisors) state.supervisors = new Map(supervisors.map((sup) => [sup.id, sup]));
    if (active) state.active = new Map(active.items.map((job) => [job.id, job]));
    renderSupervisors();
  }

  load();
  return {
    title: "Overview",
    unmount: () => life.end(),
    onLive(type, data) {
      if (type === "overview") {
        state.overview = data;
        scheduleStats();
      } else if (type === "supervisor") {
        state.supervisors.set(data.id, data);
        scheduleSupervisors();
      } else if (type === "job") {
        if (ACTIVE.includes(data.phase)) state.active.set(data.id, data);
        else if (!state.active.delete(data.id)) return;
        scheduleSupervisors();
      } else if (type === "job_deleted") {
        if (state.active.delete(data.id)) scheduleSupervisors();
      } else if (type === "resync") {
        load();
      }
    },
  };
}
