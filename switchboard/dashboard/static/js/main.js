// The dashboard's entry point: sign-in, the hash router, and the one live connection.
import { Api, ApiError, tokenStore } from "./api.js";
import { h } from "./dom.js";
import { tickTimes } from "./format.js";
import { Live } from "./live.js";
import * as deviceView from "./views/device.js";
import * as devicesView from "./views/devices.js";
import * as jobView from "./views/job.js";
import * as jobsView from "./views/jobs.js";
import * as loginView from "./views/login.js";
import * as overviewView from "./views/overview.js";
import * as supervisorView from "./views/supervisor.js";
import * as supervisorsView from "./views/supervisors.js";

const main = document.getElementById("main");
const topbar = document.getElementById("topbar");
const liveStatus = document.getElementById("live-status");
const whoami = document.getElementById("whoami");

let session = null; // {api, live, ctx} while signed in
let current = null; // the mounted view: {unmount(), onLive(type, data)}

const MESSAGES = {
  401: "this token is not valid",
  403: "this token's role cannot view the dashboard",
};

/** Check a token against /api/v1/me: the token's identity, or an error to show. */
async function check(token) {
  try {
    const me = await new Api(token).get("me");
    if (!me.permissions.includes("view")) return { error: MESSAGES[403] };
    return { me };
  } catch (error) {
    if (error instanceof ApiError && MESSAGES[error.status]) return { error: MESSAGES[error.status] };
    return { error: `the switchboard could not be reached (${error.message})` };
  }
}

async function signIn(token) {
  const { me, error } = await check(token);
  if (error) return error;
  tokenStore.set(token);
  const api = new Api(token, () => signOut(MESSAGES[401]));
  const live = new Live(api, {
    onStatus: (state) => {
      liveStatus.dataset.state = state;
      liveStatus.textContent = state;
    },
    onForbidden: () => signOut(MESSAGES[403]),
  });
  const permissions = new Set(me.permissions);
  const ctx = { api, me, can: (permission) => permissions.has(permission) };
  session = { api, live, ctx };
  live.subscribe((type, data) => current && current.onLive && current.onLive(type, data));
  live.start();
  whoami.textContent = `${me.name} · ${me.role}`;
  topbar.hidden = false;
  render();
  return null;
}

function signOut(message = null) {
  if (session) session.live.stop();
  session = null;
  tokenStore.clear();
  topbar.hidden = true;
  render(message);
}

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const q = raw.indexOf("?");
  const path = q === -1 ? raw : raw.slice(0, q);
  const params = new URLSearchParams(q === -1 ? "" : raw.slice(q + 1));
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { parts, params };
}

function route(parts) {
  const [section, id, extra] = parts;
  if (extra !== undefined) return [null, {}];
  if (section === undefined) return [overviewView, {}, "overview"];
  if (section === "jobs") return id === undefined ? [jobsView, {}, "jobs"] : [jobView, { id }, "jobs"];
  if (section === "devices") return id === undefined ? [devicesView, {}, "devices"] : [deviceView, { id }, "devices"];
  if (section === "supervisors") {
    return id === undefined ? [supervisorsView, {}, "supervisors"] : [supervisorView, { id }, "supervisors"];
  }
  return [null, {}];
}

function unmount() {
  if (current && current.unmount) current.unmount();
  current = null;
}

function render(message = null) {
  unmount();
  const root = h("div", { class: "view" });
  main.replaceChildren(root);
  if (!session) {
    current = loginView.mount(root, { signIn, message });
    return;
  }
  const { parts, params } = parseHash();
  const [view, args, nav] = route(parts);
  for (const link of topbar.querySelectorAll("[data-nav]")) {
    link.classList.toggle("active", link.dataset.nav === nav);
  }
  if (!view) {
    root.append(h("h1", {}, "Not found"), h("p", {}, "Nothing lives at this address. ", h("a", { href: "#/" }, "Overview")));
    return;
  }
  current = view.mount(root, session.ctx, { ...args, params });
  document.title = `${current.title || "Dashboard"} · Switchboard`;
}

window.addEventListener("hashchange", () => {
  if (session) {
    render();
    window.scrollTo(0, 0);
  }
});
document.getElementById("logout").addEventListener("click", () => signOut());
setInterval(() => tickTimes(main), 1000);

const saved = tokenStore.get();
if (saved) {
  signIn(saved).then((error) => error && signOut(error));
} else {
  render();
}
