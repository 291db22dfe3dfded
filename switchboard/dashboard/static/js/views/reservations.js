// The lab's reservations (docs/lab.md): who holds what until when. A card for the devices
// page that lists the waiting and held ones, and the line a device's page shows while a
// held one has it. Reservations have no live event of their own: a device that changes
// hands is one, and a poll every few seconds catches the rest (one asked, or extended).
import { fill, h } from "../dom.js";
import { absTime, duration } from "../format.js";
import { batched, deviceLink, section } from "./common.js";

export const POLL_MS = 5000;
const STATE_TONE = { waiting: "waiting", held: "good", released: "neutral", expired: "neutral" };

export function reservationBadge(state) {
  return h("span", { class: `badge tone-${STATE_TONE[state] || "neutral"}`, "data-state": state }, state);
}

/** When a time to come is: its local time, and how far off ("in 59 min"). */
export function until(ts) {
  const left = ts - Date.now() / 1000;
  return h(
    "time",
    { datetime: new Date(ts * 1000).toISOString(), class: "until" },
    absTime(ts),
    h("span", { class: "muted" }, left > 0 ? ` (in ${duration(left)})` : " (now)"),
  );
}

/** What it asks for: "2 × nrf52840dk", then its selector's terms. */
export function wants(r) {
  const terms = [
    ...Object.entries(r.selector.match_labels || {}).map(([k, v]) => `${k}=${v}`),
    ...(r.selector.match_expressions || []).map((e) => `${e.key} ${e.operator}${e.values.length ? " " + e.values.join(",") : ""}`),
  ];
  return [
    `${r.count} × `,
    r.class ? h("code", {}, r.class) : "any device",
    terms.length ? [" ", h("span", { class: "chips" }, terms.map((t) => h("span", { class: "chip" }, t)))] : null,
  ];
}

const COLUMNS = [
  ["Reservation", "id", (r) => h("code", {}, r.id)],
  ["State", "state", (r) => reservationBadge(r.state)],
  ["Holder", "holder", (r) => r.actor],
  ["Wants", "wants", (r) => h("span", {}, wants(r))],
  ["Devices", "devices", (r) => (r.devices.length ? h("span", {}, r.devices.flatMap((id, i) => [i ? ", " : null, deviceLink(id)])) : h("span", { class: "muted" }, "—"))],
  [
    "Until",
    "until",
    (r) => h("span", {}, until(r.expires_at), r.state === "waiting" ? h("span", { class: "muted small" }, " unless refreshed") : null),
  ],
];

/** The waiting and held reservations, oldest first, kept current while `life` lasts. */
export class ReservationsCard {
  constructor(ctx, life) {
    this.ctx = ctx;
    this.life = life;
    this.tbody = h("tbody");
    this.empty = h("p", { class: "muted empty" }, "No device is reserved or waited for.");
    this.table = h(
      "table",
      { class: "table reservations-table" },
      h("thead", {}, h("tr", {}, COLUMNS.map(([title, key]) => h("th", { scope: "col", class: `col-${key}` }, title)))),
      this.tbody,
    );
    this.el = section("Reservations", h("div", { class: "table-wrap" }, this.table, this.empty));
    this.el.id = "reservations";
    this.seq = 0;
    this.held = new Map(); // device id -> the reservation it belonged to at the last event
    this.schedule = batched(() => this.load(), 200);
    const timer = setInterval(() => this.load(), POLL_MS);
    life.onEnd(() => {
      clearInterval(timer);
      this.schedule.cancel();
    });
    this.render([]);
    this.load();
  }

  async load() {
    const seq = ++this.seq;
    const found = await this.life.run(this.ctx.api.get("reservations", {}, this.life.signal));
    if (found && seq === this.seq) this.render(found);
  }

  render(found) {
    fill(
      this.tbody,
      found.map((r) =>
        h(
          "tr",
          { "data-reservation": r.id, "data-state": r.state },
          COLUMNS.map(([title, key, cell]) => h("td", { "data-label": title, class: `col-${key}` }, cell(r))),
        ),
      ),
    );
    this.empty.hidden = found.length > 0;
    this.table.hidden = found.length === 0;
  }

  /** A device that changed hands (a grant, a release) is news for the list. */
  onLive(type, data) {
    if (type === "resync") this.schedule();
    if (type !== "device") return;
    const now = data.reservation || null;
    if ((this.held.get(data.id) || null) !== now) this.schedule();
    this.held.set(data.id, now);
  }
}

/** A device page's line while a held reservation has the device: "Reserved: r-… by ci
 * (3f9a…) until …"; empty otherwise. */
export function reservedLine(lease) {
  if (!lease || lease.state !== "held") return [];
  return [
    h("strong", {}, "Reserved: "),
    h("code", { class: "reservation-id" }, lease.id),
    " by ",
    h("span", { class: "reservation-holder" }, lease.actor),
    " until ",
    until(lease.expires_at),
  ];
}
