// labpilot console: plain JS, no build step. Talks to /api, follows /api/campaigns/{id}/live.
"use strict";

const S = { me: null, cid: null, campaign: null, trialsOffset: 0, auditOffset: 0, pageSize: 25,
            ws: null, wsTimer: null, pending: new Set(), refreshTimer: null };
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") e.textContent = v;
    else if (k === "onclick") e.addEventListener("click", v);
    else if (k.startsWith("data-") || k === "class" || k === "title" || k === "id") e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c);
  return e;
}

function say(text, error = false) {
  const m = $("message");
  m.textContent = text || "";
  m.className = error ? "error" : "";
}

async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && S.me && S.me.csrf_token) headers["X-CSRF-Token"] = S.me.csrf_token;
  const r = await fetch(path, { method, headers, credentials: "same-origin",
                                body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) {
    const err = new Error((data && data.error) || `${method} ${path}: ${r.status}`);
    err.status = r.status; err.data = data;
    throw err;
  }
  return { status: r.status, data };
}

const fmt = (v) => (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(4)) : String(v));
const kv = (o) => Object.entries(o || {}).map(([k, v]) => `${k}=${fmt(v)}`).join(", ");
const when = (t) => (t ? new Date(t.endsWith("Z") || t.includes("+") ? t : t + "Z").toLocaleString() : "");

// ---- who ----------------------------------------------------------------------------------
async function loadMe() {
  S.me = (await api("GET", "/api/me")).data;
  $("who").textContent = S.me.name ? `${S.me.name} (${S.me.role})` : "anonymous";
  $("logout-button").hidden = !S.me.name || S.me.via !== "cookie";
}

async function login(ev) {
  ev.preventDefault();
  try {
    S.me = (await api("POST", "/api/login", { name: $("login-name").value, password: $("login-password").value })).data;
    $("login-password").value = "";
    say("");
    await start();
  } catch (e) { say(e.message, true); }
}

async function logout() {
  try { await api("POST", "/api/logout"); } catch (e) { /* the session is gone either way */ }
  closeLive();
  S.me = null; location.hash = ""; await start();
}

// ---- routing ------------------------------------------------------------------------------
async function start() {
  await loadMe();
  const needLogin = S.me.auth_required && !S.me.name;
  $("login").hidden = !needLogin;
  $("campaigns").hidden = true; $("campaign").hidden = true;
  if (needLogin) return;
  const m = location.hash.match(/^#c\/([0-9]+-[0-9]+)$/);
  if (m) await openCampaign(m[1]); else await showCampaigns();
}

async function showCampaigns() {
  closeLive();
  S.cid = null;
  $("campaign").hidden = true; $("campaigns").hidden = false;
  const rows = (await api("GET", "/api/campaigns")).data;
  const body = $("campaign-rows"); body.replaceChildren();
  for (const c of rows) {
    const a = el("a", { href: `#c/${c.id}`, text: c.name, "data-testid": `campaign-link-${c.id}` });
    body.append(el("tr", { "data-testid": `campaign-row-${c.id}` }, el("td", {}, a), el("td", { text: c.status + (c.paused ? " (paused)" : "") }),
      el("td", { text: String(c.counts.completed) }), el("td", { text: String(c.counts.proposed) }),
      el("td", { text: c.live ? "running now" : "" })));
  }
  if (!rows.length) body.append(el("tr", {}, el("td", { text: "no campaign yet: start one with 'labpilot run FILE'", colSpan: 5 })));
}

async function openCampaign(cid) {
  if (S.cid !== cid) { S.cid = cid; S.trialsOffset = 0; S.auditOffset = 0; openLive(cid); }
  $("campaigns").hidden = true; $("campaign").hidden = false;
  $("export-csv").href = `/api/campaigns/${cid}/export.csv`;
  $("export-parquet").href = `/api/campaigns/${cid}/export.parquet`;
  await refresh(["campaign", "waiting", "instruments", "figures", "trials", "audit"]);
}

// ---- one campaign ---------------------------------------------------------------------------
async function refresh(parts) {
  const jobs = { campaign: loadCampaign, waiting: loadWaiting, instruments: loadInstruments,
                 figures: loadFigures, trials: loadTrials, audit: loadAudit };
  await Promise.all(parts.map(async (p) => {
    try { await jobs[p](); } catch (e) {
      if (e.status === 401) { await start(); return; }
      say(`${p}: ${e.message}`, true);
    }
  }));
}

async function loadCampaign() {
  const c = (await api("GET", `/api/campaigns/${S.cid}`)).data;
  S.campaign = c;
  $("campaign-name").textContent = c.name;
  const status = $("campaign-status");
  status.textContent = c.status + (c.paused ? ", paused" : "") + (c.live ? ", running now" : "");
  status.dataset.status = c.status; status.dataset.paused = String(c.paused); status.dataset.live = String(c.live);
  const b = c.budget;
  const frac = Math.min(1, b.trials_done / Math.max(1, b.max_trials));
  $("progress-bar").style.width = `${(100 * frac).toFixed(1)}%`;
  $("budget").textContent = `${b.trials_done} of ${b.max_trials} trials` +
    (b.max_wall_time ? `, ${Math.round(b.wall_seconds)} of ${b.max_wall_time} s` : `, ${Math.round(b.wall_seconds)} s`) +
    (b.override ? " (budget set by an operator)" : "") + (c.stop_reason ? ` — ${c.stop_reason}` : "");
  $("best").textContent = c.best ? `best ${c.best.objective} = ${fmt(c.best.value)} (trial ${c.best.trial})` : "";
  const canControl = S.me && S.me.can_control;
  $("run-controls").hidden = !canControl;
  if (canControl) {
    $("pause-button").hidden = c.paused; $("resume-button").hidden = !c.paused;
  }
  const sel = $("trial-state");
  if (sel.options.length === 1) for (const s of Object.keys(c.counts)) sel.append(el("option", { value: s, text: s }));
}

async function loadWaiting() {
  const rows = (await api("GET", `/api/campaigns/${S.cid}/waiting`)).data;
  const body = $("waiting-rows"); body.replaceChildren();
  $("waiting-empty").hidden = rows.length > 0;
  const canControl = S.me && S.me.can_control;
  for (const w of rows) {
    const p = w.proposal || {};
    const pred = Object.keys(p.predicted_mean || {}).map((k) =>
      `${k} ${fmt(p.predicted_mean[k])} ± ${p.predicted_sd && p.predicted_sd[k] != null ? fmt(p.predicted_sd[k]) : "?"}`).join(", ");
    const actions = el("td");
    if (canControl) {
      actions.append(
        el("button", { class: "ok", text: "approve", "data-testid": `approve-${w.trial}`, onclick: () => approve(w.trial) }),
        el("button", { text: "edit", "data-testid": `edit-${w.trial}`, onclick: () => editThenApprove(w) }),
        el("button", { class: "danger", text: "reject", "data-testid": `reject-${w.trial}`, onclick: () => reject(w.trial) }));
    }
    body.append(el("tr", { "data-testid": `waiting-row-${w.trial}` }, el("td", { text: String(w.trial) }),
      el("td", {}, el("code", { text: kv(w.parameters) })), el("td", { text: pred }),
      el("td", { text: p.ood_score == null ? "" : fmt(p.ood_score), "data-testid": `ood-${w.trial}` }),
      el("td", { text: p.model_version || "" }), el("td", { text: w.awaiting }), actions));
  }
}

async function loadInstruments() {
  const rows = (await api("GET", `/api/campaigns/${S.cid}/stations`)).data;
  const ul = $("instruments"); ul.replaceChildren();
  const canControl = S.me && S.me.can_control;
  for (const r of rows) {
    let text = r.trial != null ? `${r.station}: trial ${r.trial} (${kv(r.parameters)}) since ${when(r.running_since)}`
                               : `${r.station}: idle`;
    if (r.held) text += ` — held by interlock ${r.held.pv}=${fmt(r.held.value)} (allowed ${r.held.allowed}) since ${when(r.held.since)}`;
    if (!r.in_rotation) text += ` — out of rotation since ${when(r.out_since)} (${r.out_by}): ${r.out_reason}`;
    const li = el("li", { "data-testid": `instrument-${r.station}`, class: r.in_rotation ? "" : "state-failed", text });
    if (canControl) {
      li.append(r.in_rotation
        ? el("button", { text: "take out", "data-testid": `retire-${r.station}`, onclick: () => retire(r.station) })
        : el("button", { class: "ok", text: "restore", "data-testid": `restore-${r.station}`,
                         onclick: () => command(`stations/${encodeURIComponent(r.station)}/restore`, {}, `restore ${r.station}`) }));
    }
    ul.append(li);
  }
  if (!rows.length) ul.append(el("li", { class: "muted", text: "no instrument" }));
}

function retire(station) {
  const reason = prompt(`Why take ${station} out of rotation?`);
  if (!reason) return;
  command(`stations/${encodeURIComponent(station)}/retire`, { reason }, `take ${station} out`);
}

async function loadTrials() {
  const state = $("trial-state").value;
  const q = new URLSearchParams({ limit: S.pageSize, offset: S.trialsOffset });
  if (state) q.append("state", state);
  const page = (await api("GET", `/api/campaigns/${S.cid}/trials?${q}`)).data;
  const body = $("trial-rows"); body.replaceChildren();
  for (const t of page.items) {
    const tr = el("tr", { "data-testid": `trial-row-${t.number}`, class: `state-${t.state}` },
      el("td", { text: String(t.number) }), el("td", { text: t.state + (t.awaiting ? " (waiting)" : ""), "data-testid": `trial-state-${t.number}` }),
      el("td", {}, el("code", { text: kv(t.parameters) })), el("td", {}, el("code", { text: kv(t.outcomes) })),
      el("td", { text: t.instrument || "" }), el("td", { text: t.reason || "" }));
    tr.dataset.state = t.state;
    body.append(tr);
  }
  $("trials-page").textContent = `${page.total ? page.offset + 1 : 0}-${page.offset + page.items.length} of ${page.total}`;
  $("trials-prev").disabled = page.offset === 0;
  $("trials-next").disabled = page.offset + page.items.length >= page.total;
}

async function loadAudit() {
  const page = (await api("GET", `/api/campaigns/${S.cid}/audit?limit=${S.pageSize}&offset=${S.auditOffset}`)).data;
  const body = $("audit-rows"); body.replaceChildren();
  for (const c of page.items) {
    const tr = el("tr", { "data-testid": `audit-row-${c.id}` }, el("td", { text: when(c.at) }),
      el("td", { text: `${c.user} (${c.role})` }), el("td", { text: c.via }), el("td", { text: c.action }),
      el("td", { text: c.trial == null ? "" : String(c.trial) }), el("td", { text: c.status }),
      el("td", { text: c.outcome }), el("td", { text: c.reason }));
    tr.dataset.action = c.action; tr.dataset.status = c.status;
    body.append(tr);
  }
  $("audit-page").textContent = `${page.total ? page.offset + 1 : 0}-${page.offset + page.items.length} of ${page.total}`;
  $("audit-prev").disabled = page.offset === 0;
  $("audit-next").disabled = page.offset + page.items.length >= page.total;
}

// ---- plots ------------------------------------------------------------------------------------
const LAYOUT = { margin: { l: 50, r: 20, t: 10, b: 40 }, height: 290, showlegend: true, legend: { orientation: "h" } };

function plot(id, traces, layout) {
  if (!window.Plotly) return;
  try { Plotly.react($(id), traces, { ...LAYOUT, ...layout }, { displaylogo: false, responsive: true }); }
  catch (e) { $(id).textContent = `cannot draw: ${e.message}`; }
}

async function loadFigures() {
  const f = (await api("GET", `/api/campaigns/${S.cid}/figures`)).data;
  const o0 = f.objectives[0].name;
  plot("plot-best", [{ x: f.trials, y: f.best_so_far, mode: "lines+markers", line: { shape: "hv" }, name: `best ${o0}` }],
       { xaxis: { title: { text: "trial" } }, yaxis: { title: { text: o0 } } });
  plot("plot-objective", f.objectives.map((o) => ({ x: f.trials, y: f.values[o.name], mode: "markers", name: o.name })),
       { xaxis: { title: { text: "trial" } } });
  const stateNum = { completed: 0, running: 1, approved: 1, proposed: 1, failed: 2, vetoed: 3, rejected: 3, abandoned: 2 };
  if (f.param_trials.length) {
    plot("plot-params", [{ type: "parcoords",
      line: { color: f.param_states.map((s) => stateNum[s] ?? 1), colorscale: [[0, "#137a3a"], [0.33, "#2463eb"], [0.66, "#b42318"], [1, "#999"]], cmin: 0, cmax: 3 },
      dimensions: f.parameters.map((p) => ({ label: p, values: f.param_values[p].map((v) => (typeof v === "number" ? v : NaN)) })) }], { showlegend: false });
  }
  const pareto = f.objectives.length >= 2;
  $("pareto-panel").hidden = !pareto;
  if (pareto) {
    const [a, b] = [f.objectives[0].name, f.objectives[1].name];
    const on = new Set(f.pareto);
    const idx = f.trials.map((n, i) => i);
    const front = idx.filter((i) => on.has(f.trials[i])).sort((i, j) => f.values[a][i] - f.values[a][j]);
    plot("plot-pareto", [
      { x: f.values[a], y: f.values[b], text: f.trials.map((n) => `trial ${n}`), mode: "markers", name: "trials" },
      { x: front.map((i) => f.values[a][i]), y: front.map((i) => f.values[b][i]), mode: "lines+markers", name: "Pareto front" }],
      { xaxis: { title: { text: a } }, yaxis: { title: { text: b } } });
  }
  plot("plot-calibration", Object.keys(f.calibration).map((k) => ({ x: f.model_numbers, y: f.calibration[k], mode: "lines+markers", name: k })),
       { xaxis: { title: { text: "model version" } } });
}

// ---- control ---------------------------------------------------------------------------------
async function command(path, body, what) {
  try {
    const r = await api("POST", `/api/campaigns/${S.cid}/${path}`, body);
    const c = r.data;
    say(c.status === "applied" ? `${what}: ${c.outcome}` : `${what}: written; the campaign carries it out when it runs`);
  } catch (e) { say(`${what} refused: ${e.message}`, true); }
  await refresh(["campaign", "waiting", "trials", "audit", "instruments"]);
}

const approve = (n) => command(`trials/${n}/approve`, {}, `approve trial ${n}`);
function reject(n) {
  const reason = window.prompt(`Why reject trial ${n}?`);
  if (reason === null) return;
  if (!reason.trim()) { say("a rejection needs a reason", true); return; }
  return command(`trials/${n}/reject`, { reason }, `reject trial ${n}`);
}
function editThenApprove(w) {
  const box = $("edit-fields"); box.replaceChildren();
  $("edit-title").textContent = `Edit trial ${w.trial}, then approve`;
  for (const [k, v] of Object.entries(w.parameters)) {
    box.append(el("label", {}, `${k} `, el("input", { name: k, value: String(v), "data-testid": `edit-field-${k}` })), el("br"));
  }
  const dlg = $("edit-dialog");
  dlg.onclose = () => {
    if (dlg.returnValue !== "ok") return;
    const edits = {};
    for (const input of box.querySelectorAll("input")) {
      const old = String(w.parameters[input.name]);
      if (input.value !== old) edits[input.name] = isNaN(Number(input.value)) ? input.value : Number(input.value);
    }
    command(`trials/${w.trial}/approve`, Object.keys(edits).length ? { edits } : {}, `approve trial ${w.trial}`);
  };
  dlg.showModal();
}

// ---- live ---------------------------------------------------------------------------------------
const TOPIC_PARTS = {
  trial: ["campaign", "waiting", "instruments", "trials", "figures"], proposal: ["waiting", "trials", "campaign"],
  veto: ["trials", "campaign"], model: ["figures"], command: ["audit", "campaign", "waiting", "instruments"],
  station: ["instruments", "campaign"], suspension: ["instruments"], retry: ["instruments"],
  refresh: ["campaign", "waiting", "instruments", "figures", "trials", "audit"],
};
const LEDGER_PARTS = { trials: TOPIC_PARTS.trial, commands: ["audit", "campaign", "waiting"], models: ["figures"],
                       campaign: ["campaign"] };

function schedule(parts) {
  for (const p of parts) S.pending.add(p);
  if (S.refreshTimer) return;
  S.refreshTimer = setTimeout(async () => {
    const parts = [...S.pending]; S.pending.clear(); S.refreshTimer = null;
    await refresh(parts);
  }, 150);
}

function openLive(cid) {
  closeLive();
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/api/campaigns/${cid}/live`;
  const ws = new WebSocket(url);
  S.ws = ws;
  ws.onopen = () => { $("live-indicator").textContent = "live"; $("live-indicator").className = "on"; };
  ws.onmessage = (ev) => {
    let m; try { m = JSON.parse(ev.data); } catch (e) { return; }
    for (const one of (m.topic === "batch" ? m.items : [m])) {  // a burst arrives as one frame
      if (one.topic === "ledger") schedule((one.body.changed || []).flatMap((k) => LEDGER_PARTS[k] || []));
      else if (TOPIC_PARTS[one.topic]) schedule(TOPIC_PARTS[one.topic]);
    }
  };
  ws.onclose = () => {
    $("live-indicator").textContent = "offline"; $("live-indicator").className = "off";
    if (S.ws === ws && S.cid === cid) S.wsTimer = setTimeout(() => openLive(cid), 2000);
  };
}

function closeLive() {
  clearTimeout(S.wsTimer);
  if (S.ws) { const ws = S.ws; S.ws = null; ws.close(); }
}

// ---- wiring --------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", login);
  $("logout-button").addEventListener("click", logout);
  $("home-link").addEventListener("click", (e) => { e.preventDefault(); location.hash = ""; });
  $("pause-button").addEventListener("click", () => command("pause", {}, "pause"));
  $("resume-button").addEventListener("click", () => command("resume", {}, "resume"));
  $("stop-button").addEventListener("click", () => { if (confirm("Stop the campaign? Running trials finish first.")) command("stop", {}, "stop"); });
  $("trial-state").addEventListener("change", () => { S.trialsOffset = 0; refresh(["trials"]); });
  $("trials-prev").addEventListener("click", () => { S.trialsOffset = Math.max(0, S.trialsOffset - S.pageSize); refresh(["trials"]); });
  $("trials-next").addEventListener("click", () => { S.trialsOffset += S.pageSize; refresh(["trials"]); });
  $("audit-prev").addEventListener("click", () => { S.auditOffset = Math.max(0, S.auditOffset - S.pageSize); refresh(["audit"]); });
  $("audit-next").addEventListener("click", () => { S.auditOffset += S.pageSize; refresh(["audit"]); });
  window.addEventListener("hashchange", () => start().catch((e) => say(e.message, true)));
  start().catch((e) => say(e.message, true));
});
