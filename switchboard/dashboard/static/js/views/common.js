// Pieces the views share: job and device tables, load bars, error banners, batched re-rendering.
import { fill, h } from "../dom.js";
import { healthBadge, labelChips, phaseBadge, relTime, shortId } from "../format.js";

/** Coalesce many calls into one run of `fn` shortly after (live events come in bursts). */
export function batched(fn, delayMs = 30) {
  let timer = null;
  const run = () => {
    timer = null;
    fn();
  };
  const schedule = () => {
    if (timer === null) timer = setTimeout(run, delayMs);
  };
  schedule.cancel = () => {
    clearTimeout(timer);
    timer = null;
  };
  return schedule;
}

/** A view's lifetime: an abort signal for its requests and a place to show failures. */
export class ViewLife {
  constructor(errorBox) {
    this.controller = new AbortController();
    this.errorBox = errorBox;
    this.cleanups = [];
  }

  get signal() {
    return this.controller.signal;
  }

  get alive() {
    return !this.controller.signal.aborted;
  }

  onEnd(fn) {
    this.cleanups.push(fn);
  }

  end() {
    this.controller.abort();
    for (const fn of this.cleanups) fn();
  }

  /** Await `promise`; on failure show it (unless the view is gone) and return null. */
  async run(promise) {
    try {
      const value = await promise;
      if (this.alive && this.errorBox) this.errorBox.hidden = true;
      return this.alive ? value : null;
    } catch (error) {
      if (this.alive && error.name !== "AbortError") this.fail(error);
      return null;
    }
  }

  fail(error) {
    if (!this.errorBox) return;
    this.errorBox.textContent = error.message || String(error);
    this.errorBox.hidden = false;
  }
}

export function errorBanner() {
  const box = h("p", { class: "banner error", role: "alert" });
  box.hidden = true;
  return box;
}

/** A horizontal bar for 0..1 (width through the CSSOM, which the CSP allows). */
export function bar(fraction, tone = "") {
  const fill = h("span", { class: `bar-fill ${tone}` });
  fill.style.width = `${Math.max(0, Math.min(1, fraction)) * 100}%`;
  return h("span", { class: "bar", "aria-hidden": "true" }, fill);
}

export function jobLink(job) {
  return h("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, class: "job-link" }, job.name);
}

export function supervisorLink(id) {
  if (!id) return h("span", { class: "muted" }, "—");
  return h("a", { href: `#/supervisors/${encodeURIComponent(id)}` }, id);
}

function outcome(job) {
  const parts = [];
  if (job.exit_code !== null && job.exit_code !== undefined) parts.push(`exit ${job.exit_code}`);
  if (job.reason) parts.push(job.reason);
  if (job.unschedulable) parts.push(job.unschedulable);
  return parts.length ? parts.join(" · ") : "";
}

const COLUMNS = {
  name: ["Name", (j) => [jobLink(j), h("span", { class: "id", title: j.id }, shortId(j.id))]],
  phase: ["Phase", (j) => phaseBadge(j.phase)],
  priority: ["Prio", (j) => String(j.priority)],
  labels: ["Labels", (j) => labelChips(j.labels)],
  supervisor: ["Supervisor", (j) => supervisorLink(j.supervisor_id)],
  attempts: ["Runs", (j) => String(j.attempts)],
  outcome: ["Outcome", (j) => outcome(j)],
  created: ["Created", (j) => relTime(j.created_at)],
  updated: ["Updated", (j) => relTime(j.updated_at)],
};

export function jobRow(job, columns) {
  return h(
    "tr",
    { "data-job-id": job.id, "data-phase": job.phase },
    columns.map((c) => h("td", { "data-label": COLUMNS[c][0], class: `col-${c}` }, COLUMNS[c][1](job))),
  );
}

/** A table of jobs; keeps a row per job id so live updates replace just that row. */
export class JobTable {
  constructor(columns, emptyText = "No jobs.") {
    this.columns = columns;
    this.emptyText = emptyText;
    this.rows = new Map();
    this.tbody = h("tbody");
    this.empty = h("p", { class: "muted empty" }, emptyText);
    this.table = h(
      "table",
      { class: "table jobs-table" },
      h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col", class: `col-${c}` }, COLUMNS[c][0])))),
      this.tbody,
    );
    this.el = h("div", { class: "table-wrap" }, this.table, this.empty);
  }

  set(jobs) {
    this.rows.clear();
    fill(this.tbody, ...jobs.map((job) => this.makeRow(job)));
    this.updateEmpty();
  }

  makeRow(job) {
    const row = jobRow(job, this.columns);
    this.rows.set(job.id, { job, row });
    return row;
  }

  has(id) {
    return this.rows.has(id);
  }

  get size() {
    return this.rows.size;
  }

  /** Replace the row of a job shown; false if it isn't shown. */
  update(job) {
    const entry = this.rows.get(job.id);
    if (!entry) return false;
    const row = this.makeRow(job);
    entry.row.replaceWith(row);
    if (entry.job.phase !== job.phase) {
      row.classList.add("changed");
      setTimeout(() => row.classList.remove("changed"), 1200);
    }
    return true;
  }

  prepend(job) {
    this.tbody.prepend(this.makeRow(job));
    this.updateEmpty();
  }

  remove(id) {
    const entry = this.rows.get(id);
    if (!entry) return;
    entry.row.remove();
    this.rows.delete(id);
    this.updateEmpty();
  }

  updateEmpty() {
    this.empty.hidden = this.rows.size > 0;
    this.table.hidden = this.rows.size === 0;
  }
}

export function section(title, ...children) {
  return h("section", { class: "card" }, h("h2", {}, title), ...children);
}

export function deviceLink(id) {
  return h("a", { href: `#/devices/${encodeURIComponent(id)}`, class: "device-link" }, id);
}

/** A run as the API names it, "JOB#ATTEMPT", linked to its job. */
export function runLink(run) {
  const hash = run.lastIndexOf("#");
  const job = hash === -1 ? run : run.slice(0, hash);
  const attempt = hash === -1 ? "" : ` run ${run.slice(hash + 1)}`;
  return h("a", { href: `#/jobs/${encodeURIComponent(job)}`, class: "run-link", title: run }, shortId(job), attempt);
}

/** The last health check: its result, when, and the job that ran it (or the one running). */
export function lastCheck(device) {
  const parts = [];
  if (device.check_result) {
    const tone = { pass: "good", fail: "bad" }[device.check_result] || "neutral";
    parts.push(h("span", { class: `badge tone-${tone}`, "data-check": device.check_result }, device.check_result), " ", relTime(device.check_at));
    if (device.check_job) parts.push(" ", runLink(device.check_job));
  }
  if (device.checking) parts.push(parts.length ? " · " : "", "checking now: ", runLink(device.checking));
  return parts.length ? h("span", { class: "check" }, parts) : h("span", { class: "muted" }, "never checked");
}

/** Who holds it: the run it was granted to (free: —). */
export function holder(device) {
  return device.holder ? runLink(device.holder) : h("span", { class: "muted" }, "—");
}

const DEVICE_COLUMNS = {
  id: ["Device", (d) => deviceLink(d.id)],
  class: ["Class", (d) => h("code", {}, d.class)],
  host: ["Host", (d) => supervisorLink(d.supervisor_id)],
  health: ["Health", (d) => healthBadge(d.health, d.health_reason)],
  check: ["Last check", (d) => lastCheck(d)],
  holder: ["Holder", (d) => holder(d)],
  labels: ["Labels", (d) => labelChips(d.labels)],
};

/** A table of devices by id; a live event replaces just its device's row. */
export class DeviceTable {
  constructor(columns, emptyText = "No devices.") {
    this.columns = columns;
    this.devices = new Map();
    this.rows = new Map();
    this.tbody = h("tbody");
    this.empty = h("p", { class: "muted empty" }, emptyText);
    this.table = h(
      "table",
      { class: "table devices-table" },
      h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col", class: `col-${c}` }, DEVICE_COLUMNS[c][0])))),
      this.tbody,
    );
    this.el = h("div", { class: "table-wrap" }, this.table, this.empty);
    this.updateEmpty();
  }

  makeRow(device) {
    return h(
      "tr",
      { "data-device": device.id, "data-health": device.health },
      this.columns.map((c) => h("td", { "data-label": DEVICE_COLUMNS[c][0], class: `col-${c}` }, DEVICE_COLUMNS[c][1](device))),
    );
  }

  set(devices) {
    this.devices.clear();
    this.rows.clear();
    for (const device of devices) {
      this.devices.set(device.id, device);
      this.rows.set(device.id, this.makeRow(device));
    }
    fill(this.tbody, ...this.rows.values());
    this.updateEmpty();
  }

  /** Show `device` (in id order), replacing its row if shown. */
  put(device) {
    const before = this.devices.get(device.id);
    const row = this.makeRow(device);
    this.devices.set(device.id, device);
    const old = this.rows.get(device.id);
    this.rows.set(device.id, row);
    if (old) {
      old.replaceWith(row);
    } else {
      const next = [...this.rows.keys()].filter((id) => id > device.id).sort()[0];
      if (next) this.rows.get(next).before(row);
      else this.tbody.append(row);
    }
    if (!before || before.health !== device.health) {
      row.classList.add("changed");
      setTimeout(() => row.classList.remove("changed"), 1200);
    }
    this.updateEmpty();
  }

  remove(id) {
    const row = this.rows.get(id);
    if (!row) return;
    row.remove();
    this.rows.delete(id);
    this.devices.delete(id);
    this.updateEmpty();
  }

  has(id) {
    return this.rows.has(id);
  }

  get size() {
    return this.rows.size;
  }

  updateEmpty() {
    this.empty.hidden = this.rows.size > 0;
    this.table.hidden = this.rows.size === 0;
  }
}
