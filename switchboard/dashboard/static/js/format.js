// How values look: phases, times, durations, labels.
import { h } from "./dom.js";

export const PHASES = [
  "queued",
  "assigned",
  "initializing",
  "running",
  "terminating",
  "succeeded",
  "failed",
  "timed_out",
  "canceled",
  "lost",
  "exhausted",
  "rejected",
];
export const ACTIVE = ["assigned", "initializing", "running", "terminating"];
export const TERMINAL = new Set(["succeeded", "failed", "timed_out", "canceled", "lost", "exhausted", "rejected"]);

const PHASE_TONE = {
  queued: "waiting",
  assigned: "starting",
  initializing: "starting",
  running: "running",
  terminating: "stopping",
  succeeded: "good",
  canceled: "neutral",
};

export function phaseBadge(phase) {
  const tone = PHASE_TONE[phase] || "bad";
  return h("span", { class: `badge tone-${tone}`, "data-phase": phase }, phase.replace("_", " "));
}

export function supervisorState(sup) {
  if (!sup.connected) return "offline";
  return sup.drained ? "draining" : "online";
}

export function stateBadge(state) {
  const tone = { online: "good", draining: "stopping", offline: "neutral" }[state];
  return h("span", { class: `badge tone-${tone}`, "data-state": state }, state);
}

/** A device's health (docs/lab.md), in the order an operator meets them. */
export const HEALTHS = ["good", "unknown", "looping", "bad", "maintenance", "retired"];
const HEALTH_TONE = { good: "good", unknown: "neutral", looping: "starting", bad: "bad", maintenance: "stopping", retired: "waiting" };

export function healthBadge(health, reason = "") {
  const tone = HEALTH_TONE[health] || "neutral";
  return h("span", { class: `badge tone-${tone}`, "data-health": health, title: reason || null }, health);
}

function pad(n) {
  return String(n).padStart(2, "0");
}

/** Local time, e.g. "2025-03-01 14:05:09". */
export function absTime(ts) {
  if (ts === null || ts === undefined) return "—";
  const d = new Date(ts * 1000);
  return (
    `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`
  );
}

/** Clock time with milliseconds, for timelines. */
export function clockTime(ts) {
  const d = new Date(ts * 1000);
  const ms = String(d.getMilliseconds()).padStart(3, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${ms}`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  const m = Math.floor(seconds / 60);
  if (m < 60) return `${m} min ${Math.floor(seconds % 60)} s`;
  const hours = Math.floor(m / 60);
  if (hours < 48) return `${hours} h ${m % 60} min`;
  return `${Math.floor(hours / 24)} d ${hours % 24} h`;
}

export function ago(ts) {
  const seconds = Date.now() / 1000 - ts;
  if (seconds < 2) return "just now";
  if (seconds < 60) return `${Math.floor(seconds)} s ago`;
  return `${duration(seconds).replace(/ \d+ (s|min|h)$/, "")} ago`;
}

/** A time shown relative to now ("12 s ago"), kept current by tickTimes(). */
export function relTime(ts) {
  if (ts === null || ts === undefined) return h("span", { class: "muted" }, "—");
  return h("time", { datetime: new Date(ts * 1000).toISOString(), "data-ts": ts, title: absTime(ts) }, ago(ts));
}

export function tickTimes(root = document) {
  for (const el of root.querySelectorAll("time[data-ts]")) {
    const text = ago(Number(el.dataset.ts));
    if (el.textContent !== text) el.textContent = text;
  }
}

export function labelChips(labels, marked = {}) {
  const entries = Object.entries(labels || {});
  if (!entries.length) return h("span", { class: "muted" }, "—");
  return h(
    "span",
    { class: "chips" },
    entries.map(([k, v]) =>
      h("span", { class: ["chip", k in marked && "chip-operator"], title: k in marked ? "set by an operator" : null }, `${k}=${v}`),
    ),
  );
}

export function shortId(id) {
  return id.length > 10 ? id.slice(0, 8) + "…" : id;
}

/** A byte count for people: "512 B", "1.5 KiB", "2.0 MiB". */
export function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${n} B` : `${value.toFixed(1)} ${units[unit]}`;
}
