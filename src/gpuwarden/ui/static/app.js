// gpuwarden's node page: reads /ui/api/state, follows /ui/api/events, and acts through
// /ui/api/mode and /ui/api/unblock. No library, no build step.
"use strict";

const TIERS = {
  ok: { label: "OK", mark: "\u2713" },
  warn: { label: "WARN", mark: "!" },
  alert: { label: "ALERT", mark: "!!" },
  critical: { label: "CRITICAL", mark: "\u2716" },
};
const REFRESHING = /^(mode\.|workload\.|crashloop\.|vram\.|proxy\.|release\.|config\.|gpu\.)/;
const POLL_MS = 2000;

let state = null;
let signInError = "";
const notes = new Map(); // workload -> [class, text], an unblock's outcome
let stream = null;
let refreshTimer = null;
const follows = new Map(); // transition id -> progress element

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function clock(unix) {
  if (!unix) return "-";
  return new Date(unix * 1000).toLocaleTimeString([], { hour12: false });
}

function ago(unix) {
  if (!unix || !state) return "";
  const s = Math.max(0, Math.round(state.now - unix));
  if (s < 90) return `${s} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

function span(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function mib(value) {
  return value === null || value === undefined ? "?" : `${value.toLocaleString()} MiB`;
}

async function call(method, path, body) {
  const init = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  let doc = {};
  try { doc = await resp.json(); } catch (e) { doc = { error: `HTTP ${resp.status}` }; }
  return { status: resp.status, doc };
}

function banner(text) {
  const node = $("banner");
  node.hidden = !text;
  node.textContent = text || "";
}

async function refresh() {
  clearTimeout(refreshTimer);
  if (document.hidden) { // nobody looks: no reads (the event stream stays open)
    refreshTimer = setTimeout(refresh, POLL_MS);
    return;
  }
  const { status, doc } = await call("GET", "/ui/api/state").catch(() => ({ status: 0, doc: {} }));
  if (status === 200) {
    state = doc;
    render();
    banner(signInError);
    if (!stream) follow(doc.last_event_id);
  } else if (status === 401) {
    state = null;
    renderSignedOut(doc.error);
  } else {
    banner(status ? `the node answered ${status}: ${doc.error || ""}` : "the node does not answer; retrying");
  }
  refreshTimer = setTimeout(refresh, POLL_MS);
}

function soon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refresh, 100);
}

function follow(since) {
  stream = new EventSource(`/ui/api/events?since=${since}`);
  stream.onopen = () => { $("live").textContent = "(live)"; };
  stream.onerror = () => { $("live").textContent = "(reconnecting)"; };
  stream.onmessage = (msg) => onEvent(JSON.parse(msg.data));
}

function onEvent(event) {
  if (state && event.severity !== "debug") {
    state.events.push(event);
    state.events = state.events.slice(-40);
    state.last_event_id = event.id;
    renderEvents();
  }
  const progress = follows.get(event.transition_id);
  if (progress) showProgress(progress, event);
  if (REFRESHING.test(event.event)) soon();
}

// Refusals are written for the CLI and the API; on the page, force is the box.
function forPage(text) {
  return String(text || "").replace(/switch with --force \(API: "force": true\)/g,
    "tick \"force\" and switch again").replace(/--force/g, "\"force\"");
}

function showProgress(box, event) {
  const name = event.event;
  if (name === "mode.switch.step") {
    box.className = "progress";
    box.textContent = `${event.from} \u2192 ${event.to}: ${event.step}\u2026`;
  } else if (name === "mode.switch.completed" || name === "mode.reconcile") {
    const total = event.timings && event.timings.total_s;
    box.className = "progress completed";
    box.textContent = `${event.mode || event.to} is running` +
      (total !== undefined ? ` (${total.toFixed(2)} s)` : "");
    follows.delete(event.transition_id);
  } else if (name === "mode.switch.failed" || name === "mode.switch.refused") {
    box.className = `progress ${name === "mode.switch.failed" ? "failed" : "refused"}`;
    box.textContent = `${name === "mode.switch.failed" ? "failed" : "refused"}: ${forPage(event.reason || event.error || event.message)}`;
    follows.delete(event.transition_id);
  }
}

async function switchMode(gpu, mode, force, box) {
  box.hidden = false;
  box.className = "progress";
  box.textContent = `asking for ${mode}\u2026`;
  const { status, doc } = await call("POST", "/ui/api/mode", { mode, gpu, force });
  if (status === 202 || status === 200) {
    box.dataset.id = doc.id;
    follows.set(doc.id, box);
    if (status === 200) showProgress(box, { event: "mode.switch.completed", to: doc.to, transition_id: doc.id, timings: doc.timings });
    else box.textContent = `switching to ${mode} (at most ${Math.ceil(doc.limit_s || 0)} s)\u2026`;
    // The end may already be out: read the switch once after subscribing.
    const again = await call("GET", `/ui/api/switches/${doc.id}`);
    if (again.status === 200 && again.doc.done && follows.has(doc.id)) {
      const d = again.doc;
      if (d.ok) showProgress(box, { event: "mode.switch.completed", to: d.to, transition_id: doc.id, timings: d.timings });
      else showProgress(box, { event: "mode.switch.failed", transition_id: doc.id, error: d.error });
    }
  } else {
    box.className = "progress refused";
    box.textContent = `refused: ${forPage(doc.error || `HTTP ${status}`)}`;
  }
  soon();
}

async function unblock(workload) {
  const { status, doc } = await call("POST", "/ui/api/unblock", { workload });
  notes.set(workload, status === 200
    ? ["progress completed", `${workload} unblocked${doc.started ? " and started" : ""}`]
    : ["progress refused", `refused: ${forPage(doc.error || `HTTP ${status}`)}`]);
  setTimeout(() => { notes.delete(workload); if (state) renderWorkloads(); }, 20000);
  if (state) renderWorkloads();
  soon();
}

function tierBadge(tier) {
  const t = TIERS[tier] || { label: (tier || "unknown").toUpperCase(), mark: "?" };
  return el("span", { class: `tier tier-${TIERS[tier] ? tier : "unknown"}`, "data-tier": tier },
    `${t.mark} ${t.label}`);
}

function drawChart(canvas, samples, total, thresholds) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 600;
  const height = canvas.clientHeight || 190;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.clearRect(0, 0, width, height);
  const left = 44, right = 8, top = 8, bottom = 20;
  const w = width - left - right, h = height - top - bottom;
  const now = state.now, span = 600;
  const x = (t) => left + w * (1 - (now - t) / span);
  const y = (m) => top + h * (1 - m / (total || 1));
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = "#5a6170";
  g.strokeStyle = "#d9d9de";
  g.lineWidth = 1;
  g.strokeRect(left, top, w, h);
  for (const minute of [10, 5, 0]) {
    g.fillText(minute ? `-${minute} min` : "now", x(now - minute * 60) - (minute ? 18 : 22), height - 5);
  }
  g.fillText(`${Math.round(total / 1024)} GiB`, 2, top + 9);
  const lines = [["warn", thresholds.warn, "#b7791f", [6, 3]], ["alert", thresholds.alert, "#c05621", [3, 3]],
    ["critical", thresholds.critical, "#c53030", [1, 2]]];
  lines.forEach(([name, fraction, colour, dash], i) => {
    const yy = y(total * fraction);
    g.strokeStyle = colour;
    g.setLineDash(dash);
    g.beginPath(); g.moveTo(left, yy); g.lineTo(left + w, yy); g.stroke();
    g.fillStyle = colour;
    // Side by side: the three lines are close together, their labels must not be.
    g.fillText(`${name} ${Math.round(fraction * 100)}%`, left + 4 + i * Math.min(110, w / 3), yy - 3);
  });
  g.setLineDash([]);
  const points = samples.filter((s) => now - s[0] <= span);
  if (!points.length) return;
  g.beginPath();
  g.moveTo(x(points[0][0]), y(0));
  for (const [t, used] of points) g.lineTo(x(t), y(used));
  g.lineTo(x(points[points.length - 1][0]), y(0));
  g.closePath();
  g.fillStyle = "rgba(43, 108, 176, 0.18)";
  g.fill();
  g.beginPath();
  points.forEach(([t, used], i) => (i ? g.lineTo(x(t), y(used)) : g.moveTo(x(t), y(used))));
  g.strokeStyle = "#2b6cb0";
  g.lineWidth = 2;
  g.stroke();
}

function renderGpu(gpu) {
  const signedIn = Boolean(state.signed_in);
  const modes = Object.entries(state.status.modes).filter(([, m]) => m.gpu === gpu.index);
  const transition = gpu.transition;
  const box = el("div", { class: "progress", id: `progress-${gpu.index}`, hidden: true, "aria-live": "polite" });
  const old = $(`progress-${gpu.index}`);
  if (old && !old.hidden) { box.hidden = false; box.className = old.className; box.textContent = old.textContent; box.dataset.id = old.dataset.id; if (old.dataset.id && follows.has(old.dataset.id)) follows.set(old.dataset.id, box); }
  const force = el("input", { type: "checkbox", id: `force-${gpu.index}`, disabled: !signedIn });
  const buttons = modes.map(([name]) => el("button", {
    type: "button", "data-mode": name, "aria-pressed": String(gpu.mode === name),
    disabled: !signedIn || null, title: signedIn ? `switch GPU ${gpu.index} to ${name}` : "sign in to switch",
    onclick: () => switchMode(gpu.index, name, force.checked, box),
  }, name));
  const canvas = el("canvas", { role: "img", "aria-label": `VRAM of GPU ${gpu.index} over the last 10 minutes` });
  const holders = el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "pid"), el("th", {}, "VRAM"), el("th", {}, "held by"))),
    el("tbody", {}, (gpu.processes || []).length ? [] : el("tr", {}, el("td", { colspan: 3, class: "muted" }, "nothing holds VRAM")),
      (gpu.processes || []).map((p) => el("tr", {},
      el("td", {}, p.pid), el("td", {}, mib(p.used_mib)),
      el("td", { class: p.workload ? "" : "bad" }, p.workload || `UNOWNED (${p.command || "?"})`)))));
  const last = gpu.last_switch;
  const timings = last && last.timings ? Object.entries(last.timings).filter(([k]) => k !== "total_s")
    .map(([k, v]) => `${k.replace("_s", "")} ${Number(v).toFixed(2)} s`).join(", ") : "";
  const card = el("section", { class: "card gpu", "data-gpu": gpu.index },
    el("div", { class: "gpu-head" },
      el("h2", {}, `GPU ${gpu.index} \u00b7 ${gpu.name || ""}`),
      el("span", { class: "figure", id: `used-${gpu.index}` }, `${mib(gpu.used_mib)} / ${mib(gpu.total_mib)}`),
      el("span", {}, `${Math.round((gpu.used_fraction || 0) * 100)} %`),
      tierBadge(gpu.tier)),
    gpu.fault ? el("p", { class: "bad" }, `cannot read this GPU: ${gpu.fault.detail || gpu.fault.fault || gpu.fault}`) : null,
    canvas,
    el("div", { class: "cols" },
      el("div", {},
        el("h3", {}, "Mode"),
        el("p", {}, el("strong", { id: `mode-${gpu.index}` }, gpu.mode || "-"),
          gpu.mode_since ? ` since ${clock(gpu.mode_since)} (${ago(gpu.mode_since)})` : ""),
        gpu.lease ? el("p", { class: "muted", id: `lease-${gpu.index}` }, `lease: given back after ${span(gpu.lease.lease_s)} without demand; ${span(gpu.lease.ends_in_s)} left`) : null,
        transition ? el("p", { class: "progress" }, `switching ${transition.from} \u2192 ${transition.to}: ${transition.step} (by ${transition.requested_by})`) : null,
        last ? el("p", { class: "muted" }, `last switch ${last.from} \u2192 ${last.to} at ${clock(last.at)} by ${last.requested_by}` +
          (last.total_s !== null && last.total_s !== undefined ? ` in ${last.total_s.toFixed(2)} s` : "") + (timings ? ` (${timings})` : "")) : null,
        gpu.last_failure ? el("p", { class: "bad" }, `last failure: ${gpu.last_failure.error || JSON.stringify(gpu.last_failure)}`) : null,
        el("div", { class: "modes", role: "group", "aria-label": "switch mode" }, buttons,
          el("label", { for: `force-${gpu.index}`, class: "muted" }, force, " force")),
        signedIn ? null : el("p", { class: "muted" }, "Sign in with an API token to switch."),
        box),
      el("div", {}, el("h3", {}, "Who holds what"), holders)));
  requestAnimationFrame(() => drawChart(canvas, state.history[String(gpu.index)] || [], gpu.total_mib, state.thresholds));
  return card;
}

function renderWorkloads() {
  const signedIn = Boolean(state.signed_in);
  const rows = state.status.workloads.map((w) => {
    const note = notes.get(w.name);
    const box = el("div", { class: note ? note[0] : "progress", hidden: !note, "aria-live": "polite" },
      note ? note[1] : "");
    const state_ = w.blocked ? el("span", { class: "bad" }, "BLOCKED") : el("span", { class: w.state === "running" ? "good" : "" }, w.state);
    return el("tr", { "data-workload": w.name },
      el("td", {}, w.name), el("td", {}, w.kind), el("td", {}, state_),
      el("td", {}, w.blocked ? `${w.block.reason} (since ${clock(w.block.since)}) `
        : w.stopped ? `${w.stopped.reason}${w.stopped.at ? ` at ${clock(w.stopped.at)}` : ""}` : (w.detail || ""),
        w.blocked ? el("button", { type: "button", disabled: !signedIn || null, onclick: () => unblock(w.name) }, "Unblock") : null, box));
  });
  $("workloads").replaceChildren(el("table", {},
    el("thead", {}, el("tr", {}, el("th", {}, "workload"), el("th", {}, "kind"), el("th", {}, "state"), el("th", {}, "detail"))),
    el("tbody", {}, rows)));
}

function renderProxies() {
  const proxies = state.status.proxies || [];
  const jobs = state.status.workloads.filter((w) => w.jobs);
  const parts = [];
  if (proxies.length) {
    parts.push(el("table", {},
      el("thead", {}, el("tr", {}, el("th", {}, "proxy"), el("th", {}, "mode"), el("th", {}, "in flight"), el("th", {}, "waiting"))),
      el("tbody", {}, proxies.map((p) => el("tr", { "data-proxy": p.workload },
        el("td", {}, `${p.workload} `, el("span", { class: "muted" }, p.listen)),
        el("td", {}, p.mode, p.up ? " (up)" : ""),
        el("td", {}, p.in_flight),
        el("td", {}, p.waiting ? `${p.waiting}, oldest ${p.oldest_wait_s.toFixed(1)} s: ${p.blocker || "waiting for its mode"}` : "0"))))));
  } else {
    parts.push(el("p", { class: "muted" }, "No demand proxies configured."));
  }
  for (const w of jobs) {
    const j = w.jobs;
    parts.push(el("p", { "data-jobs": w.name }, `${w.name} jobs: `, j.error ? el("span", { class: "bad" }, j.error)
      : `${j.running} running, ${j.pending} queued`));
  }
  $("proxies").replaceChildren(...parts);
}

function renderAlerts() {
  const items = [];
  for (const w of state.status.workloads.filter((x) => x.blocked)) {
    items.push(el("li", { class: "bad" }, `\u2716 ${w.name} blocked: ${w.block.reason}`));
  }
  for (const a of state.alerts) {
    items.push(el("li", { class: a.severity === "warning" ? "warned" : "bad" },
      `${a.severity.toUpperCase()} ${clock(a.time)}: ${a.message}`));
  }
  $("alerts").replaceChildren(items.length ? el("ul", {}, items) : el("p", { class: "good" }, "\u2713 none open"));
}

function renderEvents() {
  const shown = state.events.filter((e) => e.severity !== "debug");
  $("events").replaceChildren(...shown.slice().reverse().map((e) => el("li", { "data-event": e.event },
    el("span", {}, clock(e.time)), el("span", { class: `ev-sev sev-${e.severity}` }, e.severity),
    el("span", { class: "ev-name" }, e.event),
    el("span", {}, e.message, e.requested_by ? el("span", { class: "muted ev-by" }, ` \u2014 ${e.requested_by}`) : null))));
}

function render() {
  $("node").textContent = `${state.status.backend} backend`;
  renderSignedIn(state.signed_in);
  $("gpus").replaceChildren(...state.status.gpus.map(renderGpu));
  renderWorkloads();
  renderProxies();
  renderAlerts();
  renderEvents();
}

function renderSignedIn(name) {
  $("signed-in").textContent = name ? `signed in as ${name}` : "";
  $("sign-in").hidden = Boolean(name);
  $("sign-out").hidden = !name;
}

function renderSignedOut(message) {
  renderSignedIn(null);
  banner(message || "sign in to see this node");
}

$("sign-in").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const input = $("token");
  const { status, doc } = await call("POST", "/ui/api/session", { token: input.value });
  input.value = "";
  if (status !== 200) {
    // Kept until the next sign-in: the reads that follow must not wipe it.
    signInError = `sign-in refused: ${doc.error || `HTTP ${status}`}`;
    banner(signInError);
    input.focus();
    return;
  }
  signInError = "";
  refresh();
});

$("sign-out").addEventListener("click", async () => {
  await call("POST", "/ui/api/session/end", {});
  refresh();
});

document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
window.addEventListener("resize", () => { if (state) render(); });
refresh();
