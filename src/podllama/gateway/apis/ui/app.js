// The podllama dashboard: plain JavaScript over the management API (/admin), logged in by an HttpOnly session
// cookie. Everything shown is set as text (never as HTML): names, logs and config come from outside.
"use strict";

const $ = (id) => document.getElementById(id);
let current = "servers";
let timer = null;
let logTimer = null;
let configEtag = null;
let configOriginal = "";

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body, headers = {}) {
  const init = { method, headers: { ...headers }, credentials: "same-origin" };
  if (body !== undefined) {
    if (typeof body === "string") init.body = body;
    else { init.body = JSON.stringify(body); init.headers["Content-Type"] = "application/json"; }
  }
  const r = await fetch(path, init);
  if (r.status === 401 && path !== "/ui/login") { showLogin(); throw new ApiError(401, "logged out"); }
  const text = await r.text();
  let data = text;
  try { data = JSON.parse(text); } catch { /* TOML or text */ }
  if (!r.ok) throw new ApiError(r.status, (data && data.error && data.error.message) || `${r.status} ${r.statusText}`);
  return { data, headers: r.headers };
}

function say(id, message, bad = false) {
  const node = $(id);
  node.textContent = message;
  node.classList.toggle("bad", bad);
}

const human = (n) => n >= 2 ** 30 ? `${(n / 2 ** 30).toFixed(1)} GiB` : `${(n / 2 ** 20).toFixed(0)} MiB`;
const seconds = (s) => s == null ? "-" : s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`;
const duration = (s) => s == null ? "-" : s < 90 ? `${Math.round(s)} s` : s < 5400 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`;
const list = (s) => s.split(",").map((x) => x.trim()).filter(Boolean);

function memory(m) {
  if (!m) return "-";
  const measured = m.measured || {}, estimate = m.estimate || {};
  const devices = [...new Set([...Object.keys(estimate), ...Object.keys(measured)])];
  return devices.map((d) => (d in measured ? human(measured[d]) : `~${human(estimate[d])}`) + (d === "cpu" ? "" : ` ${d}`)).join(", ") || "-";
}

// -- login -----------------------------------------------------------------------------------------------
function showLogin() {
  clearInterval(timer);
  clearInterval(logTimer);
  for (const s of document.querySelectorAll("section")) s.hidden = s.id !== "login";
  $("tabs").hidden = true;
  $("logout").hidden = true;
  $("login-key").focus();
}

async function start() {
  const { data } = await api("GET", "/ui/session");
  $("stack").textContent = `stack ${data.stack}`;
  if (!data.logged_in) return showLogin();
  $("login").hidden = true;
  $("tabs").hidden = false;
  $("logout").hidden = false;
  show(current);
}

$("login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  try {
    await api("POST", "/ui/login", { key: $("login-key").value });
    $("login-key").value = "";
    say("login-error", "");
    await start();
  } catch (err) { say("login-error", err.message, true); }
});

$("logout").addEventListener("click", async () => { await api("POST", "/ui/logout"); showLogin(); });

// -- tabs ----------------------------------------------------------------------------------------------------
const refreshers = { servers: loadServers, models: loadModels, requests: loadRequests, keys: loadKeys, config: loadConfig };
const every = { servers: 2000, requests: 2000 };

function show(tab) {
  current = tab;
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === tab);
  for (const s of document.querySelectorAll("section.tab")) s.hidden = s.id !== tab;
  clearInterval(timer);
  const refresh = () => refreshers[tab]().catch((err) => { if (err.status !== 401) console.error(err); });
  refresh();
  if (every[tab]) timer = setInterval(refresh, every[tab]);
}

for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => show(b.dataset.tab));

// -- servers -------------------------------------------------------------------------------------------------
async function act(server, verb) {
  say("servers-message", `${verb} ${server} …`);
  try {
    await api("POST", `/admin/servers/${encodeURIComponent(server)}/${verb}`);
    say("servers-message", `${server}: ${verb} done`);
  } catch (err) { say("servers-message", `${server}: ${err.message}`, true); }
  loadServers();
}

async function loadServers() {
  const { data } = await api("GET", "/admin/status");
  const rows = data.servers.map((r) => {
    const actions = el("td", {},
      el("button", { onclick: () => act(r.server, "restart") }, "restart"),
      r.state === "running" ? el("button", { onclick: () => act(r.server, "stop") }, "stop")
        : el("button", { onclick: () => act(r.server, "start") }, "start"));
    if (r.start === "on-demand") {
      actions.append(el("button", { onclick: () => act(r.server, "load") }, "load"),
        el("button", { onclick: () => act(r.server, "unload") }, "unload"));
    }
    actions.append(el("button", { onclick: () => followLog(r.server) }, "log"));
    return el("tr", { "data-server": r.server },
      el("td", {}, r.replica > 1 ? `${r.server} #${r.replica}` : r.server), el("td", {}, r.role), el("td", {}, r.model),
      el("td", { class: `state-${r.state}` }, r.state), el("td", { class: `health-${r.health}` }, r.health ?? "-"),
      el("td", { class: "stage" }, data.stages?.[r.server]?.detail ?? "-"),
      el("td", { class: "num" }, duration(r.uptime_s)), el("td", { class: "num" }, String(r.restarts ?? 0)),
      el("td", { class: "num" }, memory(r.memory)), actions);
  });
  $("servers-rows").replaceChildren(...rows);
  $("servers-note").textContent = data.config_error ? `config error: ${data.config_error}` : `config ${data.config_version ?? ""}`;
  const c = data.conformance;  // the last update's check of the new build against the running one
  $("servers-check").replaceChildren(...(c ? [
    "Last update check ", el("code", {}, `${c.current.slice(0, 12)} → ${c.candidate.slice(0, 12)}`),
    ` (${new Date(c.at * 1000).toLocaleString()}, gate ${c.gate}): `,
    el("span", { class: c.passed ? "health-ok" : "state-failed" }, c.passed ? "no differences" : "differences"),
    ` — ${c.summary}. Report: ${c.report}`] : []));
}

function followLog(server) {
  clearInterval(logTimer);
  $("logbox").hidden = false;
  $("log-name").textContent = server;
  const pull = async () => {
    try {
      const { data } = await api("GET", `/admin/servers/${encodeURIComponent(server)}/logs?tail=200`);
      const pre = $("log");
      const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
      pre.textContent = Object.values(data.replicas).join("\n") || "(no log)";
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    } catch (err) { $("log").textContent = err.message; }
  };
  pull();
  logTimer = setInterval(pull, 2000);
}

$("log-close").addEventListener("click", () => { clearInterval(logTimer); $("logbox").hidden = true; });

// -- models --------------------------------------------------------------------------------------------------
async function loadModels() {
  const { data } = await api("GET", "/admin/models");
  $("models-rows").replaceChildren(...data.map((m) => el("tr", {},
    el("td", {}, m.id), el("td", { class: "num" }, human(m.size)), el("td", {}, m.source ?? "-"),
    el("td", {}, (m.revision || "").slice(0, 12) || "-"), el("td", {}, (m.used_by || []).join(", ") || "-"))));
}

$("pull-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const body = { ref: $("pull-ref").value.trim() };
  if ($("pull-revision").value.trim()) body.revision = $("pull-revision").value.trim();
  try {
    const { data: job } = await api("POST", "/admin/models/pull", body);
    say("models-message", `pulling ${body.ref} …`);
    const bar = $("pull-progress");
    bar.hidden = false;
    for (;;) {
      const { data: j } = await api("GET", `/admin/jobs/${job.id}`);
      const parts = Object.values(j.progress || {});
      const done = parts.reduce((a, p) => a + p.done, 0), total = parts.reduce((a, p) => a + p.total, 0);
      bar.value = total ? done / total : 0;
      if (j.state !== "running") {
        bar.hidden = true;
        say("models-message", j.state === "done" ? `pulled ${body.ref}` : `pull failed: ${j.error}`, j.state !== "done");
        break;
      }
      say("models-message", `pulling ${body.ref}: ${human(done)} of ${total ? human(total) : "?"}${j.last ? ` — ${j.last}` : ""}`);
      await new Promise((r) => setTimeout(r, 500));
    }
    loadModels();
  } catch (err) { say("models-message", err.message, true); }
});

$("verify").addEventListener("click", async () => {
  say("models-message", "verifying every file …");
  try {
    const { data } = await api("POST", "/admin/models/verify");
    const bad = Object.entries(data.models).filter(([, p]) => p.length);
    say("models-message", bad.length ? bad.map(([id, p]) => `${id}: ${p.join("; ")}`).join(" | ")
      : `all ${Object.keys(data.models).length} models verified: every byte matches`, bad.length > 0);
  } catch (err) { say("models-message", err.message, true); }
});

// -- requests and usage ------------------------------------------------------------------------------------------
async function loadRequests() {
  const by = $("usage-by").value, since = $("usage-since").value;
  const [{ data: usage }, { data: recent }] = await Promise.all([
    api("GET", `/admin/usage?by=${by}&since=${since}`), api("GET", "/admin/requests?limit=50")]);
  $("usage-group").textContent = by;
  $("usage-rows").replaceChildren(...usage.map((u) => el("tr", {},
    el("td", {}, u[by]), el("td", { class: "num" }, String(u.requests)), el("td", { class: "num" }, String(u.errors)),
    el("td", { class: "num" }, String(u.prompt_tokens)), el("td", { class: "num" }, String(u.completion_tokens)),
    el("td", { class: "num" }, seconds(u.mean_latency_s)),
    el("td", { class: "num" }, u.p95_latency_s == null ? (u.requests ? "> 30 s" : "-") : `≤ ${seconds(u.p95_latency_s)}`))));
  chart(usage, by);
  const log = recent.log;
  $("log-state").textContent = `log: ${log.enabled ? "on" : "off"}, ${log.written} written, ${log.waiting} waiting, ` +
    `${log.dropped} dropped${log.error ? ` — ${log.error}` : ""}; ${mib(log.bytes)} on disk, rows kept ` +
    `${log.retention.log_days} days, usage ${log.retention.usage_days} days`;
  $("requests-rows").replaceChildren(...recent.requests.map((r) => el("tr", {},
    el("td", {}, new Date(r.ts * 1000).toLocaleTimeString()), el("td", {}, r.key ?? "-"), el("td", {}, r.route),
    el("td", {}, r.model ?? "-"), el("td", { class: r.status >= 400 ? "state-failed" : "" }, String(r.status)),
    el("td", { class: "num" }, r.prompt_tokens == null && r.completion_tokens == null ? "-"
      : `${r.prompt_tokens ?? "?"} + ${r.completion_tokens ?? "?"}`),
    el("td", { class: "num" }, seconds(r.latency)),
    el("td", { title: r.image ?? "" }, r.llama_commit ? r.llama_commit.slice(0, 12) : "-"))));
}

function mib(bytes) {
  return bytes == null ? "?" : bytes >= 2 ** 30 ? `${(bytes / 2 ** 30).toFixed(1)} GiB` : `${(bytes / 2 ** 20).toFixed(1)} MiB`;
}

function chart(usage, by) {
  const svg = $("usage-chart");
  const ns = "http://www.w3.org/2000/svg";
  const shown = usage.slice(0, 8), rowH = 28, left = 140;
  const w = svg.clientWidth || 800, h = Math.max(40, shown.length * rowH + 10);
  svg.setAttribute("height", h);
  const max = Math.max(1, ...usage.map((u) => u.prompt_tokens + u.completion_tokens));
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  const nodes = [];
  shown.forEach((u, i) => {
    const y = 5 + i * rowH, scale = (w - left - 80) / max;
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", 6); label.setAttribute("y", y + rowH * 0.65);
    label.textContent = String(u[by]).slice(0, 22);
    const p = document.createElementNS(ns, "rect");
    p.setAttribute("class", "bar-prompt"); p.setAttribute("x", left); p.setAttribute("y", y + 3);
    p.setAttribute("width", u.prompt_tokens * scale); p.setAttribute("height", rowH - 6);
    const c = document.createElementNS(ns, "rect");
    c.setAttribute("class", "bar-completion"); c.setAttribute("x", left + u.prompt_tokens * scale); c.setAttribute("y", y + 3);
    c.setAttribute("width", u.completion_tokens * scale); c.setAttribute("height", rowH - 6);
    const total = document.createElementNS(ns, "text");
    total.setAttribute("x", left + (u.prompt_tokens + u.completion_tokens) * scale + 6); total.setAttribute("y", y + rowH * 0.65);
    total.textContent = `${u.prompt_tokens + u.completion_tokens} tokens`;
    nodes.push(label, p, c, total);
  });
  if (!usage.length) {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", 10); t.setAttribute("y", 30); t.textContent = "no requests in this time";
    nodes.push(t);
  }
  svg.replaceChildren(...nodes);
}

$("usage-by").addEventListener("change", () => loadRequests());
$("usage-since").addEventListener("change", () => loadRequests());

// -- keys ----------------------------------------------------------------------------------------------------
async function loadKeys() {
  const { data } = await api("GET", "/admin/keys?all=1");
  $("keys-rows").replaceChildren(...data.map((k) => {
    const scope = ["models", "servers", "roles"].filter((w) => k[w].length).map((w) => `${w}: ${k[w].join(", ")}`);
    const limits = ["rpm", "tpm", "concurrency"].filter((w) => k[w]).map((w) => `${k[w]} ${w}`);
    return el("tr", { "data-key": k.name },
      el("td", {}, k.name), el("td", {}, k.id), el("td", {}, k.prefix),
      el("td", {}, (k.admin ? "admin; " : "") + (scope.join("; ") || "everything")), el("td", {}, limits.join(", ") || "-"),
      el("td", {}, k.expires ?? "never"), el("td", { class: `state-${k.state}` }, k.state),
      el("td", {}, k.state === "active" ? el("button", { onclick: () => revoke(k) }, "revoke") : ""));
  }));
}

async function revoke(k) {
  if (!confirm(`Revoke key '${k.name}'? Requests with it are refused from now on.`)) return;
  try {
    await api("DELETE", `/admin/keys/${encodeURIComponent(k.id)}`);
    say("keys-message", `revoked ${k.name}`);
  } catch (err) { say("keys-message", err.message, true); }
  loadKeys();
}

$("key-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const num = (id) => $(id).value ? Number($(id).value) : null;
  const body = { name: $("key-name").value.trim(), models: list($("key-models").value), servers: list($("key-servers").value),
    roles: list($("key-roles").value), admin: $("key-admin").checked, rpm: num("key-rpm"), tpm: num("key-tpm"),
    concurrency: num("key-concurrency"), expires: $("key-expires").value || null };
  try {
    const { data } = await api("POST", "/admin/keys", body);
    $("new-key-name").textContent = data.name;
    $("new-key-value").textContent = data.key;
    $("new-key").hidden = false;
    $("key-form").reset();
    say("keys-message", "");
  } catch (err) { say("keys-message", err.message, true); }
  loadKeys();
});

// -- config --------------------------------------------------------------------------------------------------
async function loadConfig() {
  const { data, headers } = await api("GET", "/admin/config?format=toml");
  configEtag = headers.get("ETag");
  configOriginal = data;
  $("config-text").value = data;
  $("config-version").textContent = `version ${(configEtag || "").replaceAll('"', "")}`;
  $("config-apply").disabled = true;
  $("plan").hidden = true;
  say("config-message", "");
}

function diff(a, b) {
  // the lines of A and B with what was removed (-) and added (+), by their longest common subsequence
  const x = a.split("\n"), y = b.split("\n");
  const n = x.length, m = y.length;
  const lcs = Array.from({ length: n + 1 }, () => new Array(m + 1).fill(0));
  for (let i = n - 1; i >= 0; i--) for (let j = m - 1; j >= 0; j--)
    lcs[i][j] = x[i] === y[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
  const out = [];
  let i = 0, j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && x[i] === y[j]) { out.push([" ", x[i]]); i++; j++; }
    else if (j < m && (i >= n || lcs[i][j + 1] > lcs[i + 1][j])) { out.push(["+", y[j]]); j++; }
    else { out.push(["-", x[i]]); i++; }
  }
  return out;
}

$("config-text").addEventListener("input", () => { $("config-apply").disabled = true; });

$("config-plan").addEventListener("click", async () => {
  const text = $("config-text").value;
  try {
    const { data } = await api("PUT", "/admin/config?dry_run=1", text, { "Content-Type": "application/toml", "If-Match": configEtag });
    $("plan-summary").textContent = data.plan.summary;
    const lines = diff(configOriginal, text).filter(([k]) => k !== " ");
    $("plan-diff").replaceChildren(...(lines.length ? lines.map(([k, line]) =>
      el("span", { class: k === "+" ? "add" : "del" }, `${k} ${line}\n`)) : [el("span", {}, "(no change to the file)")]));
    $("plan").hidden = false;
    $("config-apply").disabled = false;
    say("config-message", "this is what applying would do; nothing has changed yet");
  } catch (err) {
    $("plan").hidden = true;
    say("config-message", err.message, true);
  }
});

$("config-apply").addEventListener("click", async () => {
  $("config-apply").disabled = true;
  say("config-message", "applying …");
  try {
    const { data } = await api("PUT", "/admin/config", $("config-text").value, { "Content-Type": "application/toml", "If-Match": configEtag });
    await loadConfig();
    say("config-message", `applied: ${data.plan.summary} (version ${data.version})`);
  } catch (err) { say("config-message", err.message, true); }
});

$("config-reset").addEventListener("click", () => loadConfig());

start();
