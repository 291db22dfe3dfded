// The REST API with the operator's token, and a reader for server-sent events over fetch
// (EventSource can't send an Authorization header).

const TOKEN_KEY = "switchboard.token";

export const tokenStore = {
  get: () => sessionStorage.getItem(TOKEN_KEY),
  set: (token) => sessionStorage.setItem(TOKEN_KEY, token),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.kind = (body && body.error) || "error";
  }
}

/** A relative API URL (works behind a path prefix): arrays repeat their parameter. */
export function apiUrl(path, query = {}) {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(query)) {
    for (const v of Array.isArray(value) ? value : [value]) {
      if (v !== null && v !== undefined && v !== "") params.append(key, String(v));
    }
  }
  const qs = params.toString();
  return `api/v1/${path}${qs ? "?" + qs : ""}`;
}

async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: the status alone
  }
  return new ApiError(response.status, body);
}

export class Api {
  /** `onUnauthorized` runs when the token stops working (revoked, or the role changed). */
  constructor(token, onUnauthorized = () => {}) {
    this.token = token;
    this.onUnauthorized = onUnauthorized;
  }

  headers(extra = {}) {
    return { Authorization: `Bearer ${this.token}`, ...extra };
  }

  /** The response of a request; a status >= 400 throws an ApiError. */
  async fetch(path, { query, method = "GET", body, signal, accept } = {}) {
    const headers = this.headers(accept ? { Accept: accept } : {});
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(apiUrl(path, query), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
    if (!response.ok) {
      const error = await errorOf(response);
      if (response.status === 401) this.onUnauthorized(error);
      throw error;
    }
    return response;
  }

  async get(path, query, signal) {
    return (await this.fetch(path, { query, signal })).json();
  }

  async post(path, body, signal) {
    return (await this.fetch(path, { method: "POST", body, signal })).json();
  }

  async put(path, body, signal) {
    return (await this.fetch(path, { method: "PUT", body, signal })).json();
  }

  /** Fetch bytes with the token and hand them to the browser as a file download. */
  async download(path, query, filename) {
    const blob = await (await this.fetch(path, { query })).blob();
    const url = URL.createObjectURL(blob);
    const link = document.createElement("a");
    link.href = url;
    link.download = filename;
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  }
}

/**
 * The events of a text/event-stream body: {event, data, id}. Comment lines (": ping") are
 * skipped but still call `onActivity`, so a watchdog sees the connection is alive.
 */
export async function* sseEvents(body, onActivity = () => {}) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = "message";
  let data = [];
  let id = null;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      onActivity();
      buffer += value;
      let newline;
      while ((newline = buffer.search(/\r\n|\r|\n/)) !== -1) {
        // a lone \r at the very end may be the first half of \r\n: wait for more
        if (buffer[newline] === "\r" && newline === buffer.length - 1) break;
        const line = buffer.slice(0, newline);
        buffer = buffer.slice(newline + (buffer.startsWith("\r\n", newline) ? 2 : 1));
        if (line === "") {
          if (data.length) yield { event, data: data.join("\n"), id };
          event = "message";
          data = [];
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon === -1 ? line : line.slice(0, colon);
        let value = colon === -1 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "event") event = value;
        else if (field === "data") data.push(value);
        else if (field === "id") id = value;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

/** Decode base64 to bytes. */
export function base64Bytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}
