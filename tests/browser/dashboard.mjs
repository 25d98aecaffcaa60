// Signs in to the dashboard page in headless Chromium, checks that the numbers on the page are
// the API's, posts an event and waits for it in the live feed without reloading, and saves a
// screenshot. Run by the Rust e2e test `dashboard` with:
//   QUERY_URL, INGEST_URL, EMAIL, PASSWORD, INGEST_KEY, SCREENSHOT, TENANT_ID (the address
// has the same password in a second tenant, so the page asks which)
import { chromium } from "playwright-core";

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const [query, ingest, email, password, ingestKey, shot, tenantId] =
  ["QUERY_URL", "INGEST_URL", "EMAIL", "PASSWORD", "INGEST_KEY", "SCREENSHOT", "TENANT_ID"].map(env);

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
  console.log(`ok - ${what}`);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
  page.on("pageerror", (e) => console.log("page error:", e.message));
  await page.goto(query + "/");
  await page.fill("#email", email);
  await page.fill("#password", password);
  await page.click("#signin");
  await page.waitForSelector("#tenant-choice:not([hidden])", { timeout: 15000 });
  const offered = await page.$$eval("#tenant option", (os) => os.map((o) => o.value));
  check(offered.length === 2 && offered.includes(tenantId), "the page asks which of the two tenants");
  await page.selectOption("#tenant", tenantId);
  await page.click("#signin");
  await page.waitForSelector("#app:not([hidden])", { timeout: 15000 });
  await page.waitForFunction(() => document.querySelector('[data-testid="events_total"]').textContent !== "–", null, { timeout: 15000 });

  check(await page.isHidden("#login"), "the sign-in form is gone once signed in");

  // The page's numbers are the API's numbers.
  const token = await page.evaluate(() => sessionStorage.getItem("tally.token"));
  const api = async (path) => (await fetch(query + path, { headers: { Authorization: "Bearer " + token } })).json();
  const o = await api("/v1/dashboard/overview?range=24h");
  const text = async (id) => (await page.textContent(`[data-testid="${id}"]`)).trim();
  const n = (v) => Number(v).toLocaleString("en-US", { maximumFractionDigits: 0 });
  check(await text("events_total") === n(o.events_total), `events card shows ${n(o.events_total)}`);
  check(await text("commands") === n(o.commands.count), `commands card shows ${n(o.commands.count)}`);
  check(await text("active_users") === n(o.active_users), `active users card shows ${o.active_users}`);
  check(await text("sessions") === n(o.sessions), `sessions card shows ${o.sessions}`);
  check(await text("tokens") === `${n(o.tokens.input)} / ${n(o.tokens.output)}`, "tokens card");
  check(await text("cost") === "$" + Number(o.cost_usd).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 }), "cost card");
  const metric = async (name, extra = "") => api(`/v1/dashboard/metrics?range=24h&step=1d&agg=sum&name=${name}${extra}`);
  const sum = (m, group) => m.series.filter((s) => group === undefined || s.group === group)
    .flatMap((s) => s.points).reduce((a, p) => a + p[1], 0);
  const lines = await metric("claude_code.lines_of_code.count", "&group_by=type");
  const [added, removed] = [sum(lines, "added"), sum(lines, "removed")];
  check(added > 0 && await text("lines") === `${n(added)} / ${n(removed)}`, `lines card shows ${added} / ${removed}`);
  const [commits, prs] = [sum(await metric("claude_code.commit.count")), sum(await metric("claude_code.pull_request.count"))];
  check(commits > 0 && await text("commits") === `${n(commits)} / ${n(prs)}`, `commits card shows ${commits} / ${prs}`);
  const top = await api("/v1/dashboard/top?range=24h&dimension=command");
  const firstTop = await page.textContent("#top-command tr:nth-child(2) td:first-child");
  check(firstTop === top.items[0].key, `top command is ${top.items[0].key}`);
  // Charts: uPlot (served by query-api) with axes, units and a legend.
  await page.waitForSelector("#chart .uplot canvas", { timeout: 15000 });
  check((await page.$$("#chart .u-axis")).length >= 2, "the commands chart has its axes");
  check((await page.textContent("#chart .u-legend")).includes("commands"), "the commands chart has a legend");
  await page.waitForSelector("#cost-chart .uplot canvas", { timeout: 15000 });
  const series = await api("/v1/dashboard/repositories/series?range=24h&step=1h&limit=6");
  const legend = await page.textContent("#cost-chart .u-legend");
  check(series.series.length > 0 && series.series.every((s) => legend.includes(s.other ? "other" : s.unattributed ? "unattributed" : s.key)),
    "the cost chart is stacked by repository, with a legend");
  const over = await page.$("#cost-chart .u-over");
  const box = await over.boundingBox();
  await page.mouse.move(box.x + box.width - 4, box.y + box.height / 2);
  check(/\$\d/.test(await page.textContent("#cost-chart .u-legend")), "hovering the cost chart shows dollars in its legend");
  await page.selectOption("#cost-by", "team");
  await page.waitForFunction(() => document.querySelector("#cost-note").textContent.includes("series"), null, { timeout: 15000 });
  check((await page.$$("#cost-chart .uplot")).length === 1, "the cost chart can be stacked by team");

  // Repositories, pull requests and a session's timeline.
  const repos = await api("/v1/dashboard/repositories?range=24h");
  const firstRepo = await page.textContent("#repositories tr:nth-child(2) td:first-child");
  check(repos.rows.length > 0 && firstRepo === (repos.rows[0].unattributed ? "unattributed" : repos.rows[0].repository),
    `the most expensive repository is ${firstRepo}`);
  const pulls = await api("/v1/dashboard/pull-requests?range=24h&limit=20");
  const prText = await page.textContent("#pull-requests");
  check(pulls.pull_requests.length === 1 && prText.includes(pulls.pull_requests[0].repository + "#" + pulls.pull_requests[0].number)
    && prText.includes(Math.round(pulls.pull_requests[0].agent_share * 100) + " %"), "the pull request is listed with its agent share");
  const link = await page.$("#sessions-table a.session");
  check(link !== null, "the sessions table links to a timeline");
  const sessionId = await link.textContent();
  await link.click();
  await page.waitForSelector("#timeline .prompt", { timeout: 15000 });
  const timeline = await api("/v1/dashboard/sessions/" + encodeURIComponent(sessionId) + "/timeline");
  check((await page.$$("#timeline .prompt")).length === timeline.prompts.length && timeline.prompts.length > 0,
    `the timeline page shows the session's ${timeline.prompts.length} prompts`);
  check((await page.textContent('[data-testid="timeline-totals"]')).includes("$" + Number(timeline.totals.cost_usd).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 })),
    "the timeline shows the session's cost");
  const budgets = await api("/v1/budgets");
  const budgetText = await page.textContent("#budgets .budget");
  check(budgets.length === 1 && (await page.$$("#budgets .budget .bar")).length === 1
    && budgetText.includes("browser tokens") && budgetText.includes(n(budgets[0].status.spent) + " tokens"),
    "the budget is shown as a bar with what was spent");

  // The page's files and larger answers come gzip-compressed (fewer bytes on the wire than
  // decoded), and a reload revalidates the answers: 304, no body (Resource Timing counts a
  // revalidated response as 300 bytes of headers and its cached body as encoded). Relative
  // ranges end at the next whole minute, so a reload across a minute's turn asks anew: up to
  // three reloads.
  const entries = () => page.evaluate(() => performance.getEntriesByType("resource").map((e) =>
    ({ path: new URL(e.name).pathname, transfer: e.transferSize, encoded: e.encodedBodySize, decoded: e.decodedBodySize })));
  const answers = (list) => list.filter((e) => e.path.startsWith("/v1/dashboard/"));
  const first = await entries();
  const compressed = first.filter((e) => e.encoded > 0 && e.encoded < e.decoded).map((e) => e.path);
  check(compressed.includes("/vendor/uplot.js") && compressed.some((p) => p.startsWith("/v1/dashboard/")),
    `the page's files and larger answers come compressed (${[...new Set(compressed)].join(", ")})`);
  let revalidated = [];
  for (let i = 0; i < 3 && revalidated.length === 0; i++) {
    await page.reload();
    await page.waitForSelector("#app:not([hidden])", { timeout: 15000 });
    await page.waitForFunction(() => document.querySelector('[data-testid="events_total"]').textContent !== "–", null, { timeout: 15000 });
    await page.waitForTimeout(1000);
    revalidated = answers(await entries()).filter((e) => e.transfer === 300 && e.encoded > 0).map((e) => e.path);
  }
  check(revalidated.length > 0, `a reload revalidated ${revalidated.length} dashboard answers (304)`);

  // A new event appears in the live feed without a reload.
  const id = crypto.randomUUID();
  const res = await fetch(ingest + "/v1/events", {
    method: "POST",
    headers: { Authorization: "Bearer " + ingestKey, "Content-Type": "application/json" },
    body: JSON.stringify({ id, type: "command.executed", occurred_at: new Date().toISOString(),
      data: { user_id: "browser-user", command_name: "live-check", duration_ms: 42, status: "success" } }),
  });
  check(res.status === 202, "the event was accepted");
  await page.waitForSelector(`#feed li[data-event-id="${id}"]`, { timeout: 20000 });
  check((await page.textContent(`#feed li[data-event-id="${id}"]`)).includes("live-check"), "the live feed shows it");

  await page.screenshot({ path: shot, fullPage: true });
  console.log(`screenshot: ${shot}`);

  // Privacy mode, with owners held to aggregates too: the page says so and hides every
  // individual view (query-api learns the setting within its 10 s credential cache).
  const patched = await fetch(ingest + "/v1/admin/settings", {
    method: "PATCH",
    headers: { Authorization: "Bearer " + token, "Content-Type": "application/json" },
    body: JSON.stringify({ privacy_mode: true, privacy_admins_see_individuals: false }),
  });
  check(patched.status === 200, "the owner turns privacy mode on");
  const since = Date.now();
  while (!(await page.textContent("#privacy")).includes("at least 5 people")) {
    if (Date.now() - since > 20000) throw new Error("the page never showed privacy mode");
    await page.waitForTimeout(1000);
    await page.reload();
    await page.waitForSelector("#app:not([hidden])", { timeout: 15000 });
    await page.waitForFunction(() => document.querySelector('[data-testid="events_total"]').textContent !== "–", null, { timeout: 15000 });
  }
  check(await page.isVisible('[data-testid="privacy"]'), "the page shows that the tenant is in privacy mode");
  check(await page.isHidden("#sessions-table") && await page.isHidden("#productivity") && await page.isHidden("#top-command")
    && await page.isHidden("#repositories") && await page.isHidden("#feed"), "individual views are hidden");
  const shown = await api("/v1/dashboard/overview?range=24h");
  check(shown.min_group === 5 && await text("events_total") === n(shown.events_total),
    `the cards show the aggregate of groups of 5 or more (${n(shown.events_total)} events)`);
} finally {
  await browser.close();
}
