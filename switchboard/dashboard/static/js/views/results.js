// A job's results: its test report (counts, then the failed and erred cases with their
// messages) and its output files (with a download each). Names, paths and messages come
// from the job, so they are hostile: they only ever land in text nodes (dom.js's h).
import { fill, h } from "../dom.js";
import { bytes, duration } from "../format.js";
import { section } from "./common.js";

const RESULTS = ["passed", "failed", "error", "skipped"];
const TONES = { passed: "good", failed: "bad", error: "bad", skipped: "neutral" };
const PAGE = 50;
// A report is parsed after the run's files arrive and nothing is pushed when it is done,
// so a page showing a pending report asks again a little later.
const PENDING_POLL_MS = 1000;

function baseName(path) {
  return path.slice(path.lastIndexOf("/") + 1) || "file";
}

/** One file path for the URL: each part encoded, the slashes kept. */
function pathUrl(path) {
  return path.split("/").map(encodeURIComponent).join("/");
}

export class JobResults {
  constructor(api, life, id) {
    this.api = api;
    this.life = life;
    this.id = id;
    this.shownKey = null;
    this.pollTimer = null;
    this.generation = 0; // a slower earlier refresh must not overwrite a later one
    this.counts = h("p", { class: "test-counts", id: "tests-counts" });
    this.cases = h("ol", { class: "test-cases", id: "tests-failed" });
    this.more = h("button", { type: "button", class: "button subtle", id: "tests-more" }, "Show more failed cases");
    this.more.hidden = true;
    this.filesBody = h("div", { class: "table-wrap" });
    this.filesNote = h("p", { class: "muted small", id: "files-summary" });
    this.refused = h("ul", { class: "refused-files", id: "files-refused" });
    this.testsCard = section("Tests", this.counts, this.cases, this.more);
    this.testsCard.id = "job-tests";
    this.testsCard.hidden = true;
    this.filesCard = section("Files", this.filesNote, this.filesBody, this.refused);
    this.filesCard.id = "job-files";
    this.filesCard.hidden = true;
    this.next = null; // {result, after} of the next page of cases
    this.more.addEventListener("click", () => this.loadMore());
    life.onEnd(() => clearTimeout(this.pollTimer));
  }

  get elements() {
    return [this.testsCard, this.filesCard];
  }

  /** Called with each fresh job: fetch the lists again only when its summaries moved. */
  update(job) {
    const key = JSON.stringify([job.tests, job.files, job.phase]);
    if (key === this.shownKey) return;
    this.shownKey = key;
    this.refresh(job);
  }

  async refresh(job) {
    clearTimeout(this.pollTimer);
    const generation = ++this.generation;
    const base = `jobs/${encodeURIComponent(this.id)}`;
    const [files, failed, erred] = await Promise.all([
      job.files ? this.life.run(this.api.get(`${base}/files`, {}, this.life.signal)) : null,
      job.tests && job.tests.failed ? this.life.run(this.api.get(`${base}/tests`, { result: "failed", limit: PAGE }, this.life.signal)) : null,
      job.tests && job.tests.error ? this.life.run(this.api.get(`${base}/tests`, { result: "error", limit: PAGE }, this.life.signal)) : null,
    ]);
    if (!this.life.alive || generation !== this.generation) return;
    this.renderTests(job.tests, failed, erred);
    this.renderFiles(files);
    const pending = files && files.files.some((f) => f.report === "pending");
    // The job was read before its files: a report stored in between is not counted in it.
    const behind = files && !job.tests && files.files.some((f) => f.report === "stored");
    if (pending || behind) this.pollTimer = setTimeout(() => this.poll(), PENDING_POLL_MS);
  }

  async poll() {
    const job = await this.life.run(this.api.get(`jobs/${encodeURIComponent(this.id)}`, {}, this.life.signal));
    if (!job) return;
    this.shownKey = null; // a report may have been stored without the summaries moving yet
    this.update(job);
  }

  // ---- tests -----------------------------------------------------------------------------
  renderTests(tests, failed, erred) {
    this.testsCard.hidden = !tests;
    if (!tests) return;
    const attempt = (failed || erred || {}).attempt;
    fill(this.counts,
      h("span", { class: "count", "data-result": "total" }, h("strong", {}, String(tests.total)), " tests"),
      ...RESULTS.map((result) =>
        h("span", { class: `count badge tone-${tests[result] ? TONES[result] : "neutral"}`, "data-result": result }, `${tests[result]} ${result}`),
      ),
      attempt ? h("span", { class: "muted small" }, ` run ${attempt}`) : null,
    );
    const items = [...(failed ? failed.items : []), ...(erred ? erred.items : [])];
    fill(this.cases, ...items.map(caseItem));
    this.next = failed && failed.next_after ? { result: "failed", after: failed.next_after } : null;
    this.nextErred = erred && erred.next_after ? { result: "error", after: erred.next_after } : null;
    this.more.hidden = !this.next && !this.nextErred;
  }

  async loadMore() {
    const page = this.next || this.nextErred;
    if (!page) return;
    this.more.disabled = true;
    const body = await this.life.run(
      this.api.get(`jobs/${encodeURIComponent(this.id)}/tests`, { result: page.result, limit: PAGE, after: page.after }, this.life.signal),
    );
    this.more.disabled = false;
    if (!body) return;
    // Failed cases come first, then erred ones: a page of failed ones goes before the erred.
    const firstErred = this.cases.querySelector('li[data-result="error"]');
    for (const item of body.items) this.cases.insertBefore(caseItem(item), page.result === "failed" ? firstErred : null);
    const following = body.next_after ? { result: page.result, after: body.next_after } : null;
    if (page.result === "failed") this.next = following;
    else this.nextErred = following;
    this.more.hidden = !this.next && !this.nextErred;
  }

  // ---- files -----------------------------------------------------------------------------
  renderFiles(listing) {
    this.filesCard.hidden = !listing || (listing.files.length === 0 && listing.refused.length === 0 && !listing.refused_unlisted);
    if (this.filesCard.hidden) return;
    const total = listing.files.reduce((sum, f) => sum + f.size, 0);
    this.filesNote.textContent =
      `Run ${listing.attempt}: ${listing.files.length} file${listing.files.length === 1 ? "" : "s"}, ${bytes(total)}` +
      (listing.refused.length || listing.refused_unlisted
        ? ` · ${listing.refused.length + listing.refused_unlisted} not kept`
        : "");
    fill(this.filesBody,
      listing.files.length
        ? h(
            "table",
            { class: "table compact files-table" },
            h("thead", {}, h("tr", {}, h("th", {}, "Path"), h("th", {}, "Size"), h("th", {}, "Type"), h("th", {}, "Report"), h("th", {}, ""))),
            h("tbody", {}, listing.files.map((file) => this.fileRow(file, listing.attempt))),
          )
        : null,
    );
    fill(this.refused,
      ...listing.refused.map((r) => h("li", { "data-path": r.path }, h("code", {}, r.path), h("span", { class: "muted" }, ` not kept: ${r.reason}`))),
      listing.refused_unlisted ? h("li", { class: "muted" }, `${listing.refused_unlisted} more not kept (counted by the supervisor)`) : null,
    );
  }

  fileRow(file, attempt) {
    const link = h("button", { type: "button", class: "button subtle file-download" }, "Download");
    link.addEventListener("click", async () => {
      link.disabled = true;
      // The API wants the token, which a plain link can't send: fetch, then save the bytes.
      await this.life.run(
        this.api.download(`jobs/${encodeURIComponent(this.id)}/files/${pathUrl(file.path)}`, { attempt }, baseName(file.path)),
      );
      link.disabled = false;
    });
    let report = "";
    if (file.report === "refused") report = h("span", { class: "badge tone-bad", title: file.report_error || "" }, `refused: ${file.report_error || "?"}`);
    else if (file.report) report = h("span", { class: `badge tone-${file.report === "stored" ? "good" : "waiting"}` }, file.report);
    return h(
      "tr",
      { "data-path": file.path },
      h("td", { class: "file-path" }, h("code", {}, file.path)),
      h("td", { class: "file-size", title: `${file.size} bytes` }, bytes(file.size)),
      h("td", { class: "muted" }, file.media_type || ""),
      h("td", { class: "file-report" }, report),
      h("td", {}, link),
    );
  }
}

function caseItem(item) {
  const where = [item.classname, item.name].filter(Boolean).join(" › ");
  return h(
    "li",
    { class: "test-case", "data-result": item.result },
    h(
      "div",
      { class: "case-head" },
      h("span", { class: `badge tone-${TONES[item.result] || "bad"}` }, item.result),
      " ",
      item.suite ? h("span", { class: "muted case-suite" }, item.suite, " · ") : null,
      h("span", { class: "case-name" }, where),
      item.duration_s !== null && item.duration_s !== undefined ? h("span", { class: "muted small" }, ` ${duration(item.duration_s)}`) : null,
    ),
    item.message ? h("pre", { class: "case-message" }, item.message) : null,
  );
}
