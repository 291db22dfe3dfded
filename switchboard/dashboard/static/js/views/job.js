// One job: what it is (spec, with secrets already redacted by the API), its runs as a
// timeline, its console live per stream, download of the full output, its test report
// and output files, and cancel.
import { fill, h } from "../dom.js";
import { TERMINAL, absTime, clockTime, duration, labelChips, phaseBadge, relTime } from "../format.js";
import { ViewLife, batched, deviceLink, errorBanner, section, supervisorLink } from "./common.js";
import { StreamConsole } from "./output.js";
import { JobResults } from "./results.js";

const STREAMS = ["stdout", "stderr"];

// Every run's streams, and a device's serial console for each device a run of the job
// was granted (its stream `console:<device>`, docs/lab.md "Serial console").
function streamsOf(job) {
  const devices = new Set();
  for (const run of job ? job.runs : []) for (const d of run.devices || []) devices.add(d);
  return [...STREAMS, ...[...devices].sort().map((d) => `console:${d}`)];
}

function safeFileName(text) {
  return text.replace(/[^A-Za-z0-9._-]+/g, "_").slice(0, 80) || "job";
}

export function mount(root, ctx, { id }) {
  const errors = errorBanner();
  const life = new ViewLife(errors);
  let job = null;
  let followLatest = true; // the console shows the latest run, switching when a new one starts
  let active = "stdout";
  let consoles = null; // stream name → StreamConsole (stdout, stderr, console:<device>…)
  let cancelStep = "idle"; // idle → confirm → sending

  const title = h("h1", { class: "job-title" }, id);
  const actions = h("div", { class: "actions", id: "job-actions" });
  const facts = h("dl", { class: "facts", id: "job-facts" });
  const runs = h("div", { class: "runs", id: "job-runs" });
  const spec = h("pre", { class: "code", id: "job-spec" });
  const history = h("ol", { class: "history", id: "job-history" });
  const attemptSelect = h("select", { id: "output-attempt", "aria-label": "Run" });
  const tabs = h("div", { class: "tabs", role: "tablist", "aria-label": "Output stream" });
  const consoleBox = h("div", { class: "console-box" });
  const status = h("span", { class: "muted small", id: "output-status" });
  const download = h("button", { type: "button", class: "button", id: "output-download" }, "Download");
  const results = new JobResults(ctx.api, life, id); // tests and files: shown once the job has them

  root.append(
    h("p", { class: "crumbs" }, h("a", { href: "#/jobs" }, "Jobs"), " / ", h("span", { class: "id" }, id)),
    h("div", { class: "page-head" }, title, actions),
    errors,
    h("section", { class: "card" }, facts),
    h(
      "section",
      { class: "card output" },
      h("div", { class: "output-head" }, h("h2", {}, "Output"), attemptSelect, tabs, status, download),
      consoleBox,
    ),
    ...results.elements,
    section("Runs", runs),
    h("div", { class: "grid-2" }, section("Spec", spec), section("History", history)),
  );

  // ---- output ----------------------------------------------------------------------------
  function makeConsoles(attempt) {
    if (consoles) for (const c of Object.values(consoles)) c.stop();
    const settled = () => job !== null && TERMINAL.has(job.phase) && job.runs.length === 0;
    consoles = {};
    for (const stream of streamsOf(job)) {
      consoles[stream] = new StreamConsole(ctx.api, id, stream, attempt, { isSettled: settled, onChange: renderOutputHead });
    }
    showStream(active in consoles ? active : "stdout");
  }

  function showStream(stream) {
    active = stream;
    for (const [name, c] of Object.entries(consoles)) {
      if (name === stream) c.start();
      else c.stop();
    }
    fill(consoleBox, consoles[stream].pre);
    renderOutputHead();
  }

  function renderOutputHead() {
    if (!consoles) return;
    fill(tabs,
      ...Object.keys(consoles).map((stream) => {
        const tab = h(
          "button",
          { type: "button", role: "tab", class: "tab", "data-stream": stream, "aria-selected": String(stream === active) },
          stream,
        );
        tab.addEventListener("click", () => showStream(stream));
        return tab;
      }),
    );
    const c = consoles[active];
    const words = { following: "live", ended: "complete", paused: "paused" };
    status.textContent = words[c.state] + (c.console.trimmed ? " · earlier output trimmed here; download has all" : "");
    status.dataset.state = c.state;
    download.disabled = !job || job.runs.length === 0;
  }

  download.addEventListener("click", async () => {
    const c = consoles[active];
    const attempt = c.attempt || (job && job.runs.length ? job.runs[job.runs.length - 1].attempt : null);
    if (attempt === null) return;
    download.disabled = true;
    await life.run(
      ctx.api.download(
        `jobs/${encodeURIComponent(id)}/output`,
        { stream: active, attempt },
        `${safeFileName(job ? job.name : id)}-${id}-run${attempt}.${active.replace(":", "-")}.log`,
      ),
    );
    download.disabled = false;
  });

  attemptSelect.addEventListener("change", () => {
    followLatest = attemptSelect.value === "";
    makeConsoles(followLatest ? latestAttempt() : Number(attemptSelect.value));
  });

  function latestAttempt() {
    return job && job.runs.length ? job.runs[job.runs.length - 1].attempt : null;
  }

  function renderAttempts() {
    const value = attemptSelect.value;
    fill(attemptSelect,
      h("option", { value: "" }, "Latest run"),
      ...job.runs.map((run) => h("option", { value: String(run.attempt) }, `Run ${run.attempt}`)),
    );
    attemptSelect.value = followLatest ? "" : value;
    attemptSelect.hidden = job.runs.length < 2;
  }

  // ---- the job ---------------------------------------------------------------------------
  function renderActions() {
    const buttons = [];
    // A submitter may cancel only what its own token submitted; an operator anything.
    const mayCancel = ctx.can("cancel_any") || (ctx.can("cancel") && job && job.owner === ctx.me.id);
    if (mayCancel && job && !TERMINAL.has(job.phase)) {
      if (job.cancel_requested || cancelStep === "sending") {
        buttons.push(h("button", { type: "button", class: "button danger", id: "cancel-job", disabled: true }, "Canceling…"));
      } else if (cancelStep === "confirm") {
        const yes = h("button", { type: "button", class: "button danger", id: "cancel-confirm" }, "Yes, cancel it");
        const no = h("button", { type: "button", class: "button subtle" }, "Keep it");
        yes.addEventListener("click", cancel);
        no.addEventListener("click", () => {
          cancelStep = "idle";
          renderActions();
        });
        buttons.push(h("span", { class: "confirm" }, "Cancel this job? ", yes, no));
      } else {
        const button = h("button", { type: "button", class: "button danger", id: "cancel-job" }, "Cancel job");
        button.addEventListener("click", () => {
          cancelStep = "confirm";
          renderActions();
        });
        buttons.push(button);
      }
    }
    fill(actions, ...buttons);
  }

  async function cancel() {
    cancelStep = "sending";
    renderActions();
    await life.run(ctx.api.post(`jobs/${encodeURIComponent(id)}/cancel`));
    cancelStep = "idle";
    reload();
  }

  function renderFacts() {
    const fact = (label, ...value) => [h("dt", {}, label), h("dd", { "data-fact": label.toLowerCase() }, ...value)];
    const last = job.runs[job.runs.length - 1];
    fill(facts,
      ...fact("Phase", phaseBadge(job.phase), job.cancel_requested && !TERMINAL.has(job.phase) ? " cancel requested" : ""),
      ...fact("Id", h("code", {}, job.id)),
      ...fact("Priority", String(job.priority)),
      ...fact("Submitted", relTime(job.created_at), h("span", { class: "muted" }, ` · ${absTime(job.created_at)}`)),
      ...fact("Submitted by", job.owner ? h("span", { title: `token ${job.owner}` }, job.owner_name || job.owner) : "—"),
      ...fact("Updated", relTime(job.updated_at)),
      ...fact("Supervisor", supervisorLink(last ? last.supervisor_id : null)),
      ...(last && last.devices && last.devices.length ? fact("Devices", devicesOf(last)) : []),
      ...fact("Exit code", job.exit_code === null || job.exit_code === undefined ? "—" : String(job.exit_code)),
      ...(job.reason ? fact("Reason", job.reason) : []),
      ...(job.waiting_for
        ? fact("Waiting for", h("a", { href: `#/jobs/${encodeURIComponent(job.waiting_for)}` }, job.waiting_for),
          h("span", { class: "muted" }, " to end: its output files are this job's inputs"))
        : job.unschedulable ? fact("Unschedulable", h("span", { class: "warn" }, job.unschedulable)) : []),
      ...fact("Labels", labelChips(job.spec.labels)),
    );
  }

  /** The devices a run was granted, each linked to its page. */
  function devicesOf(run) {
    return h("span", { class: "run-devices" }, run.devices.flatMap((d, i) => (i ? [", ", deviceLink(d)] : [deviceLink(d)])));
  }

  function renderRuns() {
    if (!job.runs.length) {
      fill(runs, h("p", { class: "muted empty" }, job.unschedulable ? `Not scheduled: ${job.unschedulable}` : "No run yet."));
      return;
    }
    fill(runs,
      ...[...job.runs].reverse().map((run) => {
        const first = run.phases.length ? run.phases[0].at : run.created_at;
        const took = run.started_at ? (run.ended_at || Date.now() / 1000) - run.started_at : null;
        return h(
          "article",
          { class: "run", "data-attempt": run.attempt },
          h(
            "header",
            { class: "run-head" },
            h("strong", {}, `Run ${run.attempt}`),
            " on ",
            supervisorLink(run.supervisor_id),
            " ",
            phaseBadge(run.phase),
            run.exit_code !== null && run.exit_code !== undefined ? h("span", { class: "muted" }, ` exit ${run.exit_code}`) : null,
            took !== null ? h("span", { class: "muted" }, ` · ran ${duration(took)}`) : null,
            run.devices && run.devices.length ? [h("span", { class: "muted" }, " · devices "), devicesOf(run)] : null,
          ),
          h(
            "ol",
            { class: "timeline" },
            run.phases.map((p) =>
              h(
                "li",
                { "data-phase": p.phase },
                phaseBadge(p.phase),
                h("time", { datetime: new Date(p.at * 1000).toISOString(), title: absTime(p.at) }, clockTime(p.at)),
                h("span", { class: "muted delta" }, p.at > first ? `+${duration(p.at - first)}` : ""),
                p.stage || p.message ? h("span", { class: "phase-note" }, [p.stage, p.message].filter(Boolean).join(": ")) : null,
              ),
            ),
          ),
          run.error || run.reason ? h("p", { class: "run-error" }, [run.reason, run.error].filter(Boolean).join(" — ")) : null,
        );
      }),
    );
  }

  function renderHistory(events) {
    fill(history,
      ...events.map((e) =>
        h(
          "li",
          {},
          h("time", { title: absTime(e.at) }, clockTime(e.at)),
          " ",
          h("span", { class: "kind" }, e.kind),
          e.attempt ? h("span", { class: "muted" }, ` run ${e.attempt}`) : null,
          " ",
          e.message,
          e.actor ? h("span", { class: "muted" }, ` — ${e.actor}`) : null,
        ),
      ),
    );
  }

  function render() {
    title.textContent = job.name;
    document.title = `${job.name} · Switchboard`;
    renderActions();
    renderFacts();
    renderRuns();
    renderAttempts();
    if (!consoles) {
      makeConsoles(null);
    } else if (followLatest) {
      const latest = latestAttempt();
      const shown = consoles[active].attempt;
      if (latest !== null && shown !== null && latest > shown) makeConsoles(latest); // a new run began
    }
    if (streamsOf(job).join() !== Object.keys(consoles).join()) {
      makeConsoles(consoles[active].attempt); // a run was granted a device: its console's tab
    }
    renderOutputHead();
    results.update(job);
  }

  async function reload() {
    const [fresh, events] = await Promise.all([
      life.run(ctx.api.get(`jobs/${encodeURIComponent(id)}`, {}, life.signal)),
      life.run(ctx.api.get(`jobs/${encodeURIComponent(id)}/events`, {}, life.signal)),
    ]);
    if (!fresh) return;
    const firstLoad = job === null;
    job = fresh;
    if (firstLoad) spec.textContent = JSON.stringify(job.spec, null, 2);
    render();
    if (events) renderHistory(events);
  }

  const scheduleReload = batched(reload, 100);
  life.onEnd(() => {
    scheduleReload.cancel();
    if (consoles) for (const c of Object.values(consoles)) c.stop();
  });
  reload();

  return {
    title: id,
    unmount: () => life.end(),
    onLive(type, data) {
      if ((type === "job" && data.id === id) || type === "resync") scheduleReload();
      else if (type === "job_deleted" && data.id === id) life.fail(new Error("This job was deleted."));
    },
  };
}
