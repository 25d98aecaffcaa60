// The dashboard page's script, served as a file so the page's CSP allows no inline script.
"use strict";
// ingest-api's address, as the server put it in the page.
const INGEST = document.querySelector('meta[name="tally-ingest-url"]').content;
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("tally.token");
let feedAbort = null;

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
function chart(series) {
  const svg = $("chart");
  svg.replaceChildren();
  const pts = (series[0] && series[0].points) || [];
  $("chart-note").textContent = pts.length ? pts.length + " buckets" : "no commands in this range";
  if (!pts.length) return;
  const max = Math.max(...pts.map((p) => p.count), 1);
  const t0 = Date.parse(pts[0].t), t1 = Date.parse(pts[pts.length - 1].t) || t0 + 1;
  const x = (t) => pts.length === 1 ? 300 : ((Date.parse(t) - t0) / (t1 - t0 || 1)) * 590 + 5;
  const y = (c) => 175 - (c / max) * 165;
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", pts.map((p) => x(p.t) + "," + y(p.count)).join(" "));
  line.setAttribute("fill", "none"); line.setAttribute("stroke", "#3b5bdb"); line.setAttribute("stroke-width", "2");
  svg.append(line);
}
async function refresh() {
  const range = $("range").value, bucket = $("bucket").value;
  const q = "range=" + range;
  // Claude Code's own counters (OpenTelemetry metrics), summed over the range.
  const metric = (name, extra = "") => api("/v1/dashboard/metrics?" + q + "&step=1d&agg=sum&name=" + name + extra);
  const total = (m, group) => m.series.filter((s) => group === undefined || s.group === group)
    .flatMap((s) => s.points).reduce((sum, point) => sum + point[1], 0);
  const [o, ts, tc, ta, tt, p, teams, lines, commits, prs] = await Promise.all([
    api("/v1/dashboard/overview?" + q),
    api("/v1/dashboard/timeseries?" + q + "&bucket=" + bucket + "&type=command.executed"),
    api("/v1/dashboard/top?" + q + "&dimension=command"),
    api("/v1/dashboard/top?" + q + "&dimension=agent"),
    api("/v1/dashboard/top?" + q + "&dimension=tool"),
    api("/v1/dashboard/productivity?" + q),
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
  await budgets();
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
  await refresh();
  liveFeed();
}
$("login").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("login-error").textContent = "";
  try {
    const res = await fetch(INGEST + "/v1/auth/login", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ email: $("email").value, password: $("password").value }),
    });
    const body = await res.json();
    if (!res.ok) { $("login-error").textContent = body.detail || "sign-in failed"; return; }
    token = body.access_token; sessionStorage.setItem("tally.token", token);
    await start();
  } catch (err) { $("login-error").textContent = String(err); }
});
$("signout").addEventListener("click", signOut);
$("range").addEventListener("change", refresh);
$("bucket").addEventListener("change", refresh);
setInterval(() => { if (token) refresh().catch(() => {}); }, 30000);
if (token) start().catch(signOut); else $("login").hidden = false;
