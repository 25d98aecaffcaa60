// The dashboard page's script, served as a file so the page's CSP allows no inline script.
"use strict";
// ingest-api's address, as the server put it in the page.
const INGEST = document.querySelector('meta[name="tally-ingest-url"]').content;
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("tally.token");
let feedAbort = null;
// What the signed-in person may see (GET /v1/dashboard/access): in privacy mode, managers and
// viewers get totals of at least k people only, and individual views are hidden.
// Where each read of someone else's data is audited, individual views open only on request,
// so that the page's own refreshes do not fill the audit log.
let access = { individual_views: true };
const individual = () => access.individual_views !== false && (!access.reads_audited || $("show-people").checked);
// `path`'s answer when individual views are open to the viewer, else `empty`.
const apiIf = (path, empty) => (individual() ? api(path) : Promise.resolve(empty));

function fmt(n, digits = 0) {
  if (n === null || n === undefined) return "–";
  return Number(n).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
}
async function api(path) {
  const res = await fetch(path, { headers: { Authorization: "Bearer " + token } });
  if (res.status === 401) { signOut(); throw new Error("signed out"); }
  if (!res.ok) throw new Error(path + ": " + res.status);
  return res.json();
}
function rows(table, head, items) {
  const t = $(table);
  t.replaceChildren();
  const tr = document.createElement("tr");
  for (const [h, num] of head) { const th = document.createElement("th"); th.textContent = h; if (num) th.className = "num"; tr.append(th); }
  t.append(tr);
  for (const cells of items) {
    const r = document.createElement("tr");
    cells.forEach((c, i) => { const td = document.createElement("td"); td.textContent = c; if (head[i][1]) td.className = "num"; r.append(td); });
    t.append(r);
  }
}
const PALETTE = ["#3b5bdb", "#e8590c", "#2b8a3e", "#ae3ec9", "#f59f00", "#0c8599", "#c2255c", "#5c940d", "#868e96"];
const charts = {};
const money = (v) => (v === null || v === undefined ? "–" : "$" + fmt(v, 2));

// A time chart with axes, units, a legend that follows the cursor and, with `stacked`, each
// series drawn on top of the ones before (the legend still shows each one's own value).
// `xs`: bucket starts (ISO strings); `series`: [{label, values}].
function timeChart(id, xs, series, { unit, format, stacked }) {
  const el = $(id);
  if (charts[id]) { charts[id].destroy(); delete charts[id]; }
  el.replaceChildren();
  if (!xs.length || !series.length) return;
  const raw = series.map((s) => s.values.map((v) => v ?? 0));
  const drawn = stacked ? raw.map((_, i) => raw[0].map((_, j) => raw.slice(0, i + 1).reduce((a, r) => a + r[j], 0))) : raw;
  const opts = {
    width: Math.max(320, el.clientWidth || 600), height: 220,
    scales: { x: { time: true } },
    axes: [
      { label: "time (local)" },
      { label: unit, size: 70, values: (u, ticks) => ticks.map(format) },
    ],
    series: [
      { label: "time", value: (u, t) => (t === null ? "–" : new Date(t * 1000).toLocaleString()) },
      ...series.map((s, i) => ({
        label: s.label,
        stroke: PALETTE[i % PALETTE.length],
        fill: stacked ? PALETTE[i % PALETTE.length] + "55" : undefined,
        width: 2,
        value: (u, v, si, di) => (di === null || di === undefined ? "–" : format(raw[i][di])),
      })),
    ],
    bands: stacked ? series.slice(1).map((_, i) => ({ series: [i + 2, i + 1] })) : [],
  };
  const data = [xs.map((t) => Date.parse(t) / 1000), ...drawn];
  charts[id] = new uPlot(opts, data, el);
}

// The commands time series: one line, counts per bucket.
function chart(series) {
  const pts = (series[0] && series[0].points) || [];
  $("chart-note").textContent = pts.length ? pts.length + " buckets" : "no commands in this range";
  timeChart("chart", pts.map((p) => p.t), [{ label: "commands", values: pts.map((p) => p.count) }],
    { unit: "commands", format: (v) => fmt(v) });
}

// Agent cost over time, stacked by repository, team or model.
async function costChart(range) {
  // In privacy mode the cost chart is stacked by team, the grain the viewer may see.
  const by = individual() ? $("cost-by").value : "team";
  const step = range === "1h" || range === "24h" ? "1h" : "1d";
  let lines = [];
  if (by === "repository") {
    const r = await api("/v1/dashboard/repositories/series?range=" + range + "&step=" + step + "&limit=6");
    lines = r.series.map((s) => ({ label: s.other ? "other" : s.unattributed ? "unattributed" : s.key, points: s.points }));
  } else if (by === "team") {
    const r = await api("/v1/dashboard/timeseries?range=" + range + "&bucket=" + step + "&type=agent.interacted&group_by=team&limit=6");
    lines = r.series.map((s) => ({ label: s.other ? "other" : s.group || "no team", points: s.points.map((p) => [p.t, p.value_sum]) }));
  } else {
    const r = await api("/v1/dashboard/metrics?range=" + range + "&step=" + step + "&agg=sum&name=claude_code.cost.usage&group_by=model&limit=6");
    lines = r.series.map((s) => ({ label: s.other ? "other" : s.group || "no model", points: s.points }));
  }
  const xs = [...new Set(lines.flatMap((l) => l.points.map((p) => p[0])))].sort();
  const at = (l) => { const m = new Map(l.points.map((p) => [Date.parse(p[0]), p[1]])); return xs.map((t) => m.get(Date.parse(t)) ?? 0); };
  $("cost-note").textContent = lines.length ? lines.length + " series, " + xs.length + " buckets of " + step : "no agent cost in this range";
  timeChart("cost-chart", xs, lines.map((l) => ({ label: l.label, values: at(l) })),
    { unit: "USD", format: (v) => "$" + fmt(v, 2), stacked: true });
}

function cell(text, cls) {
  const td = document.createElement("td");
  if (text instanceof Node) td.append(text); else td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

async function attribution(range) {
  const byBranch = $("by-branch").checked;
  const [repos, prs, weekly] = await Promise.all([
    api("/v1/dashboard/repositories?range=" + range + (byBranch ? "&by=branch" : "")),
    api("/v1/dashboard/pull-requests?range=" + range + "&limit=20"),
    api("/v1/dashboard/pull-requests/weekly?range=" + (range === "1h" || range === "24h" ? "30d" : range)),
  ]);
  rows("repositories", [["repository"], ["cost", 1], ["requests", 1], ["sessions", 1], ["lines +/−", 1]],
    repos.rows.map((r) => [r.unattributed ? "unattributed" : r.repository + (byBranch ? " · " + r.branch : ""),
      money(r.cost_usd), fmt(r.requests), fmt(r.sessions), fmt(r.lines_added) + " / " + fmt(r.lines_removed)]));
  rows("pull-requests", [["pull request"], ["state"], ["cost", 1], ["agent share", 1]],
    prs.pull_requests.map((p) => [p.repository + "#" + p.number + (p.title ? " " + p.title : ""), p.state,
      money(p.cost_usd), p.agent_share === null ? "–" : fmt(p.agent_share * 100, 0) + " %"]));
  rows("weekly", [["week"], ["merged", 1], ["median cost", 1], ["median agent share", 1]],
    weekly.weeks.map((w) => [new Date(w.week).toLocaleDateString(), fmt(w.merged), money(w.median_cost_usd),
      w.median_agent_share === null ? "–" : fmt(w.median_agent_share * 100, 0) + " %"]));
}

async function sessionsTable(range) {
  const s = await api("/v1/dashboard/sessions?range=" + range + "&limit=20");
  const t = $("sessions-table");
  rows("sessions-table", [["session"], ["user"], ["started"], ["duration", 1]], []);
  for (const x of s.sessions) {
    const link = Object.assign(document.createElement("a"), { className: "session", textContent: x.session_id, href: "#session=" + encodeURIComponent(x.session_id) });
    const r = document.createElement("tr");
    r.append(cell(link), cell(x.user_id), cell(x.started_at ? new Date(x.started_at).toLocaleString() : "–"),
      cell(x.duration_s === null ? "–" : fmt(x.duration_s) + " s", "num"));
    t.append(r);
  }
}

// One session's timeline, grouped by prompt (the page's view of GET …/sessions/{id}/timeline).
async function showTimeline(id) {
  const box = $("timeline-box"), out = $("timeline");
  box.hidden = false;
  out.replaceChildren(Object.assign(document.createElement("div"), { className: "muted", textContent: "loading…" }));
  let t;
  try { t = await api("/v1/dashboard/sessions/" + encodeURIComponent(id) + "/timeline"); }
  catch (e) { out.replaceChildren(Object.assign(document.createElement("div"), { className: "error", textContent: "not visible: " + e.message })); return; }
  $("timeline-title").textContent = "Session " + t.session_id + (t.user_id ? " · " + t.user_id : "");
  const tot = t.totals;
  const head = Object.assign(document.createElement("div"), { className: "muted", textContent:
    money(tot.cost_usd) + " · " + fmt(tot.requests) + " requests (" + fmt(tot.errors) + " errors) · " +
    fmt(tot.input_tokens) + " in / " + fmt(tot.output_tokens) + " out / " + fmt(tot.cache_read_tokens) + " cache read · " +
    fmt(tot.tool_runs) + " tool runs (" + fmt(tot.tool_failures) + " failed)" + (t.truncated ? " · truncated" : "") });
  head.dataset.testid = "timeline-totals";
  out.replaceChildren(head);
  const describe = (i) => {
    const d = i.detail || {};
    switch (i.kind) {
      case "prompt": return "prompt" + (d.length !== null && d.length !== undefined ? " (" + d.length + " chars)" : "") + (d.text ? ": " + d.text : "");
      case "api_request": return "API " + (d.model || "") + " · " + fmt(d.input_tokens) + "/" + fmt(d.output_tokens) + " tokens · " + money(d.cost_usd) + " · " + fmt(d.duration_ms) + " ms" + (d.cache_hit_ratio === null ? "" : " · cache " + fmt(d.cache_hit_ratio * 100) + " %");
      case "api_error": return "API error " + (d.status_code || "") + " " + (d.error || "") + (d.attempt ? " (attempt " + d.attempt + ")" : "");
      case "tool_decision": return "decision: " + (d.tool || "") + " " + (d.decision || "");
      case "tool_result": return "tool " + (d.tool || "") + " · " + fmt(d.duration_ms) + " ms · " + (d.success ? "ok" : "failed");
      case "context": return "context: " + (d.repository || "no repository") + (d.branch ? " · " + d.branch : "");
      default: return i.kind.replace("_", " ");
    }
  };
  const list = (items) => {
    const ol = document.createElement("ol");
    for (const i of items) ol.append(Object.assign(document.createElement("li"), { textContent: new Date(i.at).toLocaleTimeString() + " — " + describe(i) }));
    return ol;
  };
  for (const g of t.prompts) {
    const div = document.createElement("div");
    div.className = "prompt" + (t.top_prompts.includes(g.prompt_id) ? " top" : "");
    div.dataset.promptId = g.prompt_id;
    const title = document.createElement("div");
    title.textContent = new Date(g.at).toLocaleString() + " · " + money(g.totals.cost_usd) + " · " + fmt(g.totals.requests) + " requests · " + fmt(g.totals.tool_runs) + " tools";
    if (t.top_prompts.includes(g.prompt_id)) title.append(" ", Object.assign(document.createElement("span"), { className: "tag", textContent: "top " + (t.top_prompts.indexOf(g.prompt_id) + 1) }));
    div.append(title, list(g.items));
    out.append(div);
  }
  if (t.other.length) {
    out.append(Object.assign(document.createElement("div"), { className: "muted", textContent: "outside any prompt" }), list(t.other));
  }
}
function route() {
  const m = location.hash.match(/^#session=(.+)$/);
  if (m) showTimeline(decodeURIComponent(m[1])); else $("timeline-box").hidden = true;
}
async function refresh() {
  const range = $("range").value, bucket = $("bucket").value;
  const q = "range=" + range;
  // Claude Code's own counters (OpenTelemetry metrics), summed over the range.
  const metric = (name, extra = "") => apiIf("/v1/dashboard/metrics?" + q + "&step=1d&agg=sum&name=" + name + extra, { series: [] });
  const total = (m, group) => m.series.filter((s) => group === undefined || s.group === group)
    .flatMap((s) => s.points).reduce((sum, point) => sum + point[1], 0);
  const [o, ts, tc, ta, tt, p, teams, lines, commits, prs] = await Promise.all([
    api("/v1/dashboard/overview?" + q),
    api("/v1/dashboard/timeseries?" + q + "&bucket=" + bucket + "&type=command.executed"),
    apiIf("/v1/dashboard/top?" + q + "&dimension=command", { items: [] }),
    apiIf("/v1/dashboard/top?" + q + "&dimension=agent", { items: [] }),
    apiIf("/v1/dashboard/top?" + q + "&dimension=tool", { items: [] }),
    apiIf("/v1/dashboard/productivity?" + q, { users: [], formula: "" }),
    api("/v1/dashboard/teams?" + q),
    metric("claude_code.lines_of_code.count", "&group_by=type"),
    metric("claude_code.commit.count"),
    metric("claude_code.pull_request.count"),
  ]);
  document.querySelector('[data-testid="events_total"]').textContent = fmt(o.events_total);
  document.querySelector('[data-testid="commands"]').textContent = fmt(o.commands.count);
  document.querySelector('[data-testid="error_rate"]').textContent = fmt(o.commands.error_rate * 100, 1) + " %";
  document.querySelector('[data-testid="duration_avg"]').textContent = o.commands.duration_avg_ms === null ? "–" : fmt(o.commands.duration_avg_ms) + " ms";
  document.querySelector('[data-testid="duration_p95"]').textContent = o.commands.duration_p95_ms === null ? "–" : fmt(o.commands.duration_p95_ms) + " ms";
  document.querySelector('[data-testid="active_users"]').textContent = fmt(o.active_users);
  document.querySelector('[data-testid="sessions"]').textContent = fmt(o.sessions);
  document.querySelector('[data-testid="tokens"]').textContent = fmt(o.tokens.input) + " / " + fmt(o.tokens.output);
  document.querySelector('[data-testid="cost"]').textContent = "$" + fmt(o.cost_usd, 2);
  document.querySelector('[data-testid="lines"]').textContent = fmt(total(lines, "added")) + " / " + fmt(total(lines, "removed"));
  document.querySelector('[data-testid="commits"]').textContent = fmt(total(commits)) + " / " + fmt(total(prs));
  $("asof").textContent = o.as_of ? "as of " + new Date(o.as_of).toLocaleTimeString() : "no data yet";
  chart(ts.series);
  const topRows = (l) => l.items.map((i) => [i.key, fmt(i.count), fmt(i.error_rate * 100, 1) + " %", i.duration_avg_ms === null ? "–" : fmt(i.duration_avg_ms)]);
  const topHead = [["name"], ["count", 1], ["errors", 1], ["avg ms", 1]];
  rows("top-command", topHead, topRows(tc));
  rows("top-agent", topHead, topRows(ta));
  rows("top-tool", topHead, topRows(tt));
  rows("productivity", [["user"], ["commands", 1], ["success", 1], ["score", 1]], p.users.map((u) => [u.user_id, fmt(u.commands), fmt(u.success_rate * 100, 1) + " %", fmt(u.score, 1)]));
  $("formula").textContent = "score = " + p.formula;
  rows("teams", [["team"], ["rank", 1], ["percentile", 1], ["score", 1]], teams.teams.map((t) => [t.team_id, t.rank, fmt(t.percentile), fmt(t.score, 1)]));
  const views = [budgets(), costChart(range)];
  if (individual()) views.push(attribution(range), sessionsTable(range));
  await Promise.all(views);
}
// Budgets as progress bars with their forecast, and what fired recently.
async function budgets() {
  const [list, fired] = await Promise.all([api("/v1/budgets"), api("/v1/firings?limit=10")]);
  const box = $("budgets");
  box.replaceChildren();
  if (!list.length) box.append(Object.assign(document.createElement("span"), { className: "muted", textContent: "none" }));
  for (const { budget: b, status: s } of list) {
    const money = b.metric === "cost_usd";
    const amount = (v) => (money ? "$" + fmt(v, 2) : fmt(v) + " tokens");
    const div = document.createElement("div");
    div.className = "budget";
    const title = document.createElement("div");
    title.textContent = b.name + " — " + amount(s.spent) + " of " + amount(b.amount) + " this " + b.period + " (" + fmt(s.percent) + " %)";
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.style.width = Math.min(100, s.percent) + "%";
    if (s.percent >= 100) fill.className = "over"; else if (s.percent >= 80) fill.className = "warn";
    bar.append(fill);
    const f = s.forecast;
    const note = document.createElement("div");
    note.className = "muted";
    note.textContent = f.outcome === "reached" ? "reached"
      : f.outcome === "will_reach" ? "at this rate reached " + new Date(f.reaches_at).toLocaleString() + " (" + f.confidence + " confidence)"
      : "not reached this " + b.period + " at this rate";
    div.append(title, bar, note);
    box.append(div);
  }
  const ul = $("firings");
  ul.replaceChildren();
  for (const x of fired) {
    const li = document.createElement("li");
    const d = x.data;
    li.textContent = new Date(x.fired_at).toLocaleString() + " — " + (x.type === "budget.threshold_crossed"
      ? d.budget.name + ": " + d.threshold + " % crossed (" + fmt(d.percent) + " %)"
      : x.type === "channel.paused" ? "channel " + d.channel_name + " paused: " + d.reason : x.type);
    ul.append(li);
  }
}
async function liveFeed() {
  if (feedAbort) feedAbort.abort();
  feedAbort = new AbortController();
  try {
    // EventSource cannot send a bearer token: read the event stream with fetch.
    const res = await fetch("/v1/stream", { headers: { Authorization: "Bearer " + token }, signal: feedAbort.signal });
    const reader = res.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let end;
      while ((end = buf.indexOf("\n\n")) >= 0) {
        const frame = buf.slice(0, end); buf = buf.slice(end + 2);
        const lines = frame.split("\n");
        const kind = (lines.find((l) => l.startsWith("event:")) || "event: message").slice(6).trim();
        const data = lines.filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
        if (!data) continue;
        if (kind === "totals") { scheduleRefresh(); continue; }
        if (kind !== "activity") continue;
        const e = JSON.parse(data);
        const li = document.createElement("li");
        li.dataset.eventId = e.event_id;
        li.textContent = new Date(e.occurred_at).toLocaleTimeString() + " · " + e.type + " · " + e.user_id + " · " + e.name + (e.status ? " · " + e.status : "");
        $("feed").prepend(li);
        while ($("feed").children.length > 200) $("feed").lastChild.remove();
      }
    }
  } catch (err) {
    if (err.name !== "AbortError") setTimeout(liveFeed, 2000);
  }
}
let refreshTimer = null;
// The feed's `totals` events say the projection moved: refresh the cards (at most once a second).
function scheduleRefresh() {
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => { refreshTimer = null; refresh().catch(() => {}); }, 1000);
}
function signOut() {
  sessionStorage.removeItem("tally.token"); token = null;
  if (feedAbort) feedAbort.abort();
  $("app").hidden = true; $("login").hidden = false;
}
async function start() {
  $("login").hidden = true; $("app").hidden = false;
  access = await api("/v1/dashboard/access");
  showIndividuals();
  $("show-people-label").hidden = !access.reads_audited;
  $("privacy").hidden = !access.privacy.on;
  $("privacy").textContent = !access.privacy.on ? ""
    : access.individual_views === false ? "Privacy mode: totals of teams' days with at least " + access.min_group + " people"
    : access.reads_audited ? "Privacy mode: your reads of others' data are audited" : "Privacy mode";
  await refresh();
  route();
  if (individual()) liveFeed();
}
function showIndividuals() {
  document.querySelectorAll("[data-individual]").forEach((e) => { e.hidden = !individual(); });
  $("cost-by").disabled = !individual();
}
$("login").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("login-error").textContent = "";
  try {
    // An address may have accounts in several tenants: when the password opens more than
    // one, the answer lists them (409 choose-tenant) and the person picks.
    const tenant = $("tenant-choice").hidden ? undefined : $("tenant").value;
    const res = await fetch(INGEST + "/v1/auth/login", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ email: $("email").value, password: $("password").value, tenant }),
    });
    const body = await res.json();
    if (res.status === 409 && Array.isArray(body.tenants)) {
      $("tenant").replaceChildren(...body.tenants.map((t) => new Option(t.name, t.id)));
      $("tenant-choice").hidden = false;
      $("login-error").textContent = "This address signs in to several tenants: choose one.";
      return;
    }
    if (!res.ok) { $("login-error").textContent = body.detail || "sign-in failed"; return; }
    token = body.access_token; sessionStorage.setItem("tally.token", token);
    await start();
  } catch (err) { $("login-error").textContent = String(err); }
});
$("email").addEventListener("input", () => { $("tenant-choice").hidden = true; });
$("signout").addEventListener("click", signOut);
$("range").addEventListener("change", refresh);
$("show-people").addEventListener("change", () => {
  showIndividuals();
  if (individual()) liveFeed(); else if (feedAbort) feedAbort.abort();
  refresh().catch(() => {});
});
$("bucket").addEventListener("change", refresh);
$("cost-by").addEventListener("change", () => costChart($("range").value).catch(() => {}));
$("by-branch").addEventListener("change", () => attribution($("range").value).catch(() => {}));
$("timeline-close").addEventListener("click", () => { location.hash = ""; });
window.addEventListener("hashchange", route);
setInterval(() => { if (token) refresh().catch(() => {}); }, 30000);
if (token) start().catch(signOut); else $("login").hidden = false;
