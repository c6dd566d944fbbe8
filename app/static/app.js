// Amend status page: the public API only, the key in sessionStorage, progress from server-sent events.
"use strict";
const $ = (sel) => document.querySelector(sel);
const keyStore = "amend-api-key";
const streams = new Map();
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const pct = (v) => (v == null ? "" : `${(100 * v).toFixed(1)}%`);
const num = (v) => (v == null ? "" : Number(v).toPrecision(3));

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { Authorization: `Bearer ${sessionStorage.getItem(keyStore)}`, ...(options.headers || {}) } });
  if (response.status === 401) { signOut("That key was refused."); throw new Error("unauthorized"); }
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) throw new Error(body?.error ? `${body.error.code}: ${body.error.message}` : `HTTP ${response.status}`);
  return body;
}

// SSE over fetch: EventSource cannot send an Authorization header.
async function follow(jobId, onEvent) {
  const controller = new AbortController();
  streams.set(jobId, controller);
  try {
    const response = await fetch(`/v1/jobs/${jobId}/events`, { signal: controller.signal, headers: { Accept: "text/event-stream", Authorization: `Bearer ${sessionStorage.getItem(keyStore)}` } });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        const fields = Object.fromEntries(block.split("\n").map((line) => [line.slice(0, line.indexOf(": ")), line.slice(line.indexOf(": ") + 2)]));
        onEvent(fields.event, JSON.parse(fields.data));
      }
    }
  } catch (error) { if (error.name !== "AbortError") console.warn(error); }
  finally { streams.delete(jobId); }
}

function stopStreams() { for (const c of streams.values()) c.abort(); streams.clear(); }

function table(columns, rows) {
  return `<table><thead><tr>${columns.map((c) => `<th>${esc(c)}</th>`).join("")}</tr></thead><tbody>${rows.join("") || `<tr><td colspan="${columns.length}" class="muted">nothing yet</td></tr>`}</tbody></table>`;
}

function jobRow(job) {
  return `<tr data-job="${esc(job.id)}"><td><a data-open="${esc(job.id)}">${esc(job.id)}</a></td><td>${esc(job.type)}</td><td>${esc(job.method)}</td>
    <td class="state ${esc(job.state)}">${esc(job.state)}</td>
    <td><span class="bar" role="progressbar" aria-valuenow="${Math.round(100 * job.progress)}"><span style="width:${100 * job.progress}%"></span></span> <span class="pct">${Math.round(100 * job.progress)}%</span></td>
    <td class="stage muted">${esc(job.stage)}</td><td class="muted">${esc(job.created_at.slice(0, 19).replace("T", " "))}</td></tr>`;
}

function updateRow(jobId, data) {
  const row = document.querySelector(`tr[data-job="${jobId}"]`);
  if (!row) return;
  if (data.progress != null) {
    row.querySelector(".bar").setAttribute("aria-valuenow", Math.round(100 * data.progress));
    row.querySelector(".bar > span").style.width = `${100 * data.progress}%`;
    row.querySelector(".pct").textContent = `${Math.round(100 * data.progress)}%`;
  }
  const state = row.querySelector(".state");
  state.textContent = data.state; state.className = `state ${data.state}`;
  if (data.stage) row.querySelector(".stage").textContent = data.stage;
}

async function showJobs() {
  stopStreams();
  const params = new URLSearchParams({ limit: "50" });
  for (const name of ["state", "type"]) { const v = $(`#filter-${name}`).value; if (v) params.set(name, v); }
  const page = await api(`/v1/jobs?${params}`);
  $("#jobs-table").innerHTML = table(["job", "type", "method", "state", "progress", "stage", "created"], page.items.map(jobRow));
  for (const job of page.items.filter((j) => j.state === "queued" || j.state === "running")) {
    follow(job.id, (event, data) => { if (event !== "event") updateRow(job.id, data); });
  }
}

function reportView(report) {
  const modules = Object.entries(report.modules || {});
  if (!modules.length) return `<pre>${esc(JSON.stringify(report, null, 2))}</pre>`;
  const rows = [];
  const kept = {};
  for (const [name, m] of modules) {
    for (const t of m.tasks || []) {
      if (!t.present) continue;
      (kept[t.task] ||= []).push(t.energy_kept_fraction);
      rows.push(`<tr><td>${esc(name)}</td><td>${esc(t.task)}</td><td class="num">${pct(t.energy_kept_fraction)}</td><td class="num">${pct(t.sign_conflict)}</td><td class="num">${num(m.compression_error)}</td><td class="num">${num(m.deviation_from_sum)}</td><td class="num">${esc(m.rank)}</td></tr>`);
    }
  }
  const tasks = Object.keys(kept);
  const bars = tasks.map((t, i) => {
    const values = kept[t].filter((v) => v != null);
    const mean = values.length ? values.reduce((a, b) => a + b, 0) / values.length : 0;
    return `<rect x="${40 + i * 70}" y="${130 - 100 * mean}" width="40" height="${100 * mean}" fill="#2f6fde"></rect><text x="${40 + i * 70}" y="145">task ${esc(t)}</text><text x="${40 + i * 70}" y="${125 - 100 * mean}">${pct(mean)}</text>`;
  }).join("");
  return `<svg id="report-chart" width="${60 + tasks.length * 70}" height="150" role="img" aria-label="energy kept per task"><text x="0" y="12">energy kept (mean over modules)</text>${bars}</svg>
    <div id="report-table">${table(["module", "task", "energy kept", "sign conflict", "compression error", "deviation from sum", "rank"], rows)}</div>`;
}

async function showJob(jobId) {
  stopStreams();
  switchTo("detail");
  const job = await api(`/v1/jobs/${jobId}`);
  const events = await api(`/v1/jobs/${jobId}/events`);
  let html = `<section><h2>Job ${esc(job.id)}</h2>${table(["type", "method", "state", "progress", "attempts", "created", "finished"],
    [`<tr><td>${esc(job.type)}</td><td>${esc(job.method)}</td><td class="state ${esc(job.state)}">${esc(job.state)}</td><td>${Math.round(100 * job.progress)}%</td><td>${esc(job.attempts)}</td><td>${esc(job.created_at)}</td><td>${esc(job.finished_at)}</td></tr>`])}
    ${job.error ? `<p class="error">${esc(job.error.code)}: ${esc(job.error.message)}</p>` : ""}</section>
    <section><h2>Events</h2>${table(["time", "state", "progress", "stage"], events.items.map((e) => `<tr><td>${esc(e.time.slice(0, 23).replace("T", " "))}</td><td>${esc(e.state)}</td><td>${Math.round(100 * e.progress)}%</td><td>${esc(e.stage)}</td></tr>`))}</section>`;
  if (job.result?.report_key) {
    try { html += `<section><h2>Report</h2>${reportView(await api(`/v1/jobs/${jobId}/report`))}</section>`; }
    catch (error) { html += `<section><h2>Report</h2><p class="error">${esc(error.message)}</p></section>`; }
  }
  if (job.result?.audit_key) {
    try { html += `<section><h2>Audit record</h2><pre>${esc(JSON.stringify(await api(`/v1/jobs/${jobId}/audit`), null, 2))}</pre></section>`; }
    catch (error) { html += `<section><h2>Audit record</h2><p class="error">${esc(error.message)}</p></section>`; }
  }
  $("#detail").innerHTML = html;
}

async function showList(view, path, columns, cell) {
  stopStreams();
  try {
    const page = await api(path);
    $(`#${view}`).innerHTML = `<section>${table(columns, page.items.map((item) => `<tr>${columns.map((c) => `<td>${esc(cell(item, c))}</td>`).join("")}</tr>`))}</section>`;
  } catch (error) {
    $(`#${view}`).innerHTML = `<section><p class="muted">${esc(path)}: ${esc(error.message)}</p></section>`;
  }
}

const views = {
  jobs: showJobs,
  adapters: () => showList("adapters", "/v1/adapters?limit=100", ["id", "name", "version", "rank", "n_modules", "size_bytes", "created_at"], (a, c) => a[c]),
  models: () => showList("models", "/v1/models?limit=100", ["id", "name", "version", "family", "architecture", "size_bytes", "created_at"], (m, c) => m[c]),
  schedules: () => showList("schedules", "/v1/schedules?limit=100", ["id", "name", "when", "next_run_at", "paused", "created_at"],
    (s, c) => (c === "when" ? s.cron || (s.interval_seconds && `every ${s.interval_seconds} s`) || s.run_at : s[c])),
  requests: () => showList("requests", "/v1/unlearning-requests?state=pending&limit=100", ["id", "state", "target", "dataset", "rows", "deadline", "created_at"],
    (r, c) => (c === "rows" ? r.rows.length : c === "target" ? JSON.stringify(r.target) : r[c])),
};

function switchTo(view) {
  for (const el of document.querySelectorAll("[data-view]")) el.classList.toggle("hidden", el.dataset.view !== view);
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("active", b.dataset.show === view);
}

function signOut(message) {
  stopStreams();
  sessionStorage.removeItem(keyStore);
  $("#app").classList.add("hidden"); $("#signin").classList.remove("hidden");
  $("#signin-error").textContent = message || "";
}

async function start() {
  $("#signin").classList.add("hidden"); $("#app").classList.remove("hidden");
  switchTo("jobs");
  await showJobs();
}

document.addEventListener("DOMContentLoaded", () => {
  $("#signin-form").addEventListener("submit", (e) => { e.preventDefault(); sessionStorage.setItem(keyStore, $("#api-key").value.trim()); start(); });
  $("#signout").addEventListener("click", () => signOut());
  for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => { switchTo(b.dataset.show); views[b.dataset.show](); });
  for (const f of document.querySelectorAll(".filters select")) f.addEventListener("change", showJobs);
  $("#refresh").addEventListener("click", showJobs);
  document.body.addEventListener("click", (e) => { const id = e.target.dataset?.open; if (id) showJob(id); });
  if (sessionStorage.getItem(keyStore)) start();
});
