// A run's console, followed live: GET .../output/events (base64 chunks with offsets, then
// `end`) read through fetch, rendered with ANSI colours. A dropped connection resumes at
// the last offset received.
import { AnsiConsole } from "../ansi.js";
import { base64Bytes, sseEvents } from "../api.js";
import { h } from "../dom.js";

const RETRY_FIRST_MS = 500;
const RETRY_MAX_MS = 10_000;

export class StreamConsole {
  /** `attempt` null: the job's latest run (the server waits for one if none yet). */
  constructor(api, jobId, stream, attempt, { isSettled, onChange }) {
    this.api = api;
    this.jobId = jobId;
    this.stream = stream;
    this.attempt = attempt;
    this.isSettled = isSettled; // () => true when the job ended with no run to wait for
    this.onChange = onChange;
    this.pre = h("pre", { class: "console", "data-stream": stream, tabindex: "0", "aria-live": "off" });
    this.console = new AnsiConsole(this.pre);
    this.decoder = new TextDecoder("utf-8");
    this.offset = 0;
    this.done = false;
    this.following = false;
    this.controller = null;
  }

  get state() {
    if (this.done) return "ended";
    return this.following ? "following" : "paused";
  }

  start() {
    if (this.following || this.done) return;
    this.following = true;
    this.onChange();
    this.follow();
  }

  stop() {
    this.following = false;
    if (this.controller) this.controller.abort();
    this.onChange();
  }

  write(bytes) {
    const stick = this.atBottom();
    this.console.write(this.decoder.decode(bytes, { stream: true }));
    if (stick) this.pre.scrollTop = this.pre.scrollHeight;
  }

  atBottom() {
    return this.pre.scrollHeight - this.pre.scrollTop - this.pre.clientHeight < 24;
  }

  async follow() {
    let retry = RETRY_FIRST_MS;
    while (this.following && !this.done) {
      const controller = new AbortController();
      this.controller = controller;
      try {
        const query = { stream: this.stream, start: this.offset };
        if (this.attempt !== null) query.attempt = this.attempt;
        const response = await this.api.fetch(`jobs/${encodeURIComponent(this.jobId)}/output/events`, {
          query,
          signal: controller.signal,
          accept: "text/event-stream",
        });
        for await (const message of sseEvents(response.body)) {
          const data = JSON.parse(message.data);
          if (this.attempt === null) this.attempt = data.attempt;
          if (message.event === "output" && data.attempt === this.attempt) {
            // A resumed stream may repeat what we have: keep only the new bytes.
            const bytes = base64Bytes(data.data);
            const skip = Math.max(0, this.offset - data.offset);
            if (skip < bytes.length) this.write(bytes.subarray(skip));
            this.offset = Math.max(this.offset, data.offset + bytes.length);
            retry = RETRY_FIRST_MS;
          } else if (message.event === "end") {
            this.finish();
          }
        }
        // Closed without `end`: the job ended without ever running, or the connection dropped.
        if (!this.done && this.isSettled()) this.finish();
      } catch (error) {
        if (error.name === "AbortError" || !this.following) break;
        if (error.status === 404 || error.status === 401 || error.status === 403) {
          this.finish(error.message);
          break;
        }
      }
      if (this.done || !this.following) break;
      await new Promise((resolve) => setTimeout(resolve, retry));
      retry = Math.min(RETRY_MAX_MS, retry * 2);
    }
  }

  finish(problem = null) {
    this.console.write(this.decoder.decode());
    this.done = true;
    this.following = false;
    if (problem) this.pre.append(h("span", { class: "console-note" }, `\n[${problem}]`));
    this.onChange();
  }
}
