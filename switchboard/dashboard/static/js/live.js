// The one live connection of this page: GET /api/v1/live as server-sent events. Views
// subscribe while they are shown. After a reconnect (or when the server says it dropped
// events for us) subscribers get `resync` and refetch what they show.
import { sseEvents } from "./api.js";

const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 15_000;
// The server pings every 15 s: this long without a byte means the connection is dead.
const SILENCE_MS = 45_000;

export class Live {
  constructor(api, { onStatus = () => {}, onForbidden = () => {} } = {}) {
    this.api = api;
    this.onStatus = onStatus;
    this.onForbidden = onForbidden;
    this.handlers = new Set();
    this.controller = null;
    this.stopped = false;
    this.connectedOnce = false;
  }

  /** Call `handler(type, data)` for every event until the returned function is called. */
  subscribe(handler) {
    this.handlers.add(handler);
    return () => this.handlers.delete(handler);
  }

  emit(type, data) {
    for (const handler of [...this.handlers]) {
      try {
        handler(type, data);
      } catch (error) {
        console.error("live handler failed", type, error);
      }
    }
  }

  start() {
    this.stopped = false;
    this.run();
  }

  stop() {
    this.stopped = true;
    if (this.controller) this.controller.abort();
  }

  async run() {
    let backoff = BACKOFF_FIRST_MS;
    while (!this.stopped) {
      this.onStatus(this.connectedOnce ? "reconnecting" : "connecting");
      const controller = new AbortController();
      this.controller = controller;
      let watchdog = null;
      const alive = () => {
        clearTimeout(watchdog);
        watchdog = setTimeout(() => controller.abort(), SILENCE_MS);
      };
      try {
        alive();
        const response = await this.api.fetch("live", { signal: controller.signal, accept: "text/event-stream" });
        this.onStatus("live");
        if (this.connectedOnce) this.emit("resync", {});
        this.connectedOnce = true;
        backoff = BACKOFF_FIRST_MS;
        for await (const message of sseEvents(response.body, alive)) {
          let data = null;
          try {
            data = JSON.parse(message.data);
          } catch {
            continue;
          }
          this.emit(message.event, data);
        }
      } catch (error) {
        if (error.status === 401 || error.status === 403) {
          this.stopped = true;
          if (error.status === 403) this.onForbidden(error);
          this.onStatus("offline");
          return;
        }
      } finally {
        clearTimeout(watchdog);
      }
      if (this.stopped) break;
      this.onStatus("reconnecting");
      // Jittered: a restarted server isn't met by every browser at the same instant.
      await new Promise((resolve) => setTimeout(resolve, backoff / 2 + (Math.random() * backoff) / 2));
      backoff = Math.min(BACKOFF_MAX_MS, backoff * 2);
    }
    this.onStatus("offline");
  }
}
