// Lineguard dashboard, shared helpers. Plain ES2020, no build step. Text from the broker is only ever set
// with textContent, never parsed as HTML.
"use strict";

const LG = (() => {
  const body = document.body.dataset;
  const root = body.root || "";

  /** An element with attributes and children (strings become text nodes). */
  function el(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const pad = (n, width = 2) => String(n).padStart(width, "0");

  /** HH:MM:SS.mmm of a Unix time in seconds (local time). */
  function clock(ts, millis = false) {
    if (ts === null || ts === undefined) return "–";
    const d = new Date(ts * 1000);
    const base = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
    return millis ? `${base}.${pad(d.getMilliseconds(), 3)}` : base;
  }

  /** YYYY-MM-DD HH:MM:SS of a Unix time in seconds (local time). */
  function datetime(ts) {
    if (ts === null || ts === undefined) return "–";
    const d = new Date(ts * 1000);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${clock(ts)}`;
  }

  /** "12 s ago", "3 min ago", "2 h ago" for a Unix time in seconds. */
  function ago(ts) {
    if (!ts) return "–";
    const s = Math.max(0, Date.now() / 1000 - ts);
    if (s < 90) return `${Math.round(s)} s ago`;
    if (s < 5400) return `${Math.round(s / 60)} min ago`;
    if (s < 172800) return `${Math.round(s / 3600)} h ago`;
    return datetime(ts);
  }

  function number(value, digits = 3) {
    return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
  }

  /** fetch() a JSON API path; POSTs carry the session's CSRF token. Throws Error(reason) on a 4xx/5xx. */
  async function api(path, options = {}) {
    const headers = { Accept: "application/json", ...(options.headers || {}) };
    if (options.body !== undefined) headers["Content-Type"] = "application/json";
    if ((options.method || "GET") !== "GET") headers["X-CSRF-Token"] = body.csrf || "";
    const response = await fetch(root + path, {
      ...options,
      headers,
      body: options.body === undefined ? undefined : JSON.stringify(options.body),
      credentials: "same-origin",
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(data.detail || `${response.status} ${response.statusText}`);
    return data;
  }

  let toastTimer = null;
  function toast(text, bad = false) {
    document.querySelectorAll(".toast").forEach((node) => node.remove());
    const node = el("div", { class: bad ? "toast bad" : "toast", role: "status", text });
    document.body.append(node);
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => node.remove(), bad ? 8000 : 4000);
  }

  /** Show or clear one named banner (broker outage, lost link to the dashboard). */
  function banner(name, text) {
    const holder = document.getElementById("banners");
    let node = holder.querySelector(`.banner.${name}`);
    if (!text) {
      if (node) node.remove();
      return;
    }
    if (!node) {
      node = el("div", { class: `banner ${name}`, role: "alert" });
      holder.append(node);
    }
    node.textContent = text;
  }

  function showBroker(broker) {
    const pill = document.getElementById("broker");
    if (!broker) return;
    pill.textContent = broker.connected ? "broker connected" : "broker down";
    pill.className = broker.connected ? "pill ok" : "pill bad";
    pill.title = broker.detail;
    banner("broker", broker.connected ? "" : `MQTT broker unreachable since ${clock(broker.since_ts)}: ${broker.detail}. ` +
      "What is shown is the last known state; verdicts published meanwhile arrive when it is back.");
  }

  return { root, body, el, clock, datetime, ago, number, api, toast, banner, showBroker };
})();

// Pages without a live feed still show the broker link.
if (document.body.dataset.page !== "line") {
  LG.api("/api/health").then((health) => LG.showBroker(health.broker)).catch(() => {});
}
