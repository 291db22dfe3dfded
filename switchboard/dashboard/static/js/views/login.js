// Sign in with an API token (viewer or higher); it is kept for this browser tab only.
import { h } from "../dom.js";

export function mount(root, { signIn, message }) {
  const input = h("input", {
    id: "token",
    name: "token",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    placeholder: "sbt_…",
    required: true,
  });
  const error = h("p", { class: "form-error", id: "login-error", role: "alert" }, message || "");
  error.hidden = !message;
  const button = h("button", { type: "submit", class: "button primary" }, "Sign in");
  const form = h(
    "form",
    { class: "login card", id: "login-form" },
    h("h1", {}, "Switchboard"),
    h("p", { class: "muted" }, "Sign in with an API token (viewer, submitter, operator or admin)."),
    h("label", { for: "token" }, "API token"),
    input,
    error,
    button,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = input.value.trim();
    if (!token) return;
    button.disabled = true;
    error.hidden = true;
    const problem = await signIn(token);
    button.disabled = false;
    if (problem) {
      error.textContent = problem;
      error.hidden = false;
      input.select();
    }
  });
  root.append(form);
  input.focus();
  return { title: "Sign in" };
}
