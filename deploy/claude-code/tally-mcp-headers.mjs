#!/usr/bin/env node
// Claude Code's `headersHelper` for Tally's MCP server: prints the `Authorization` header of a
// fresh access token of the person signed in, so the agent answers with their rights only.
// Access tokens last 15 minutes; this keeps the person's refresh token (rotated at each use,
// as ingest-api requires) in a file only they can read, and refreshes when needed.
//
// Once:   TALLY_EMAIL=me@example.com node tally-mcp-headers.mjs --login   (password on stdin)
// Then, in .mcp.json (or `claude mcp add-json`):
//   {"mcpServers": {"tally": {"type": "http", "url": "https://tally.example/mcp",
//     "headersHelper": "node /path/to/tally-mcp-headers.mjs"}}}
//
// Settings (environment): TALLY_URL — ingest-api, where people sign in (default
// http://127.0.0.1:8080); TALLY_CREDENTIALS — the file kept (default
// ~/.config/tally/mcp-credentials.json); TALLY_TENANT — the tenant to sign in to, needed when
// the address and password open accounts in several (the failure lists them). Exit status 1
// with a reason on stderr when it cannot sign in (Claude Code then shows the server as failed).
import { closeSync, mkdirSync, openSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { homedir } from "node:os";
import { dirname, join } from "node:path";

const TALLY_URL = (process.env.TALLY_URL || "http://127.0.0.1:8080").replace(/\/+$/, "");
const FILE = process.env.TALLY_CREDENTIALS || join(homedir(), ".config", "tally", "mcp-credentials.json");
const LOCK = FILE + ".lock";
// A token this close to its end is refreshed first.
const MARGIN_MS = 60_000;

function fail(why) {
  process.stderr.write(`tally-mcp-headers: ${why}\n`);
  process.exit(1);
}

async function post(path, body) {
  const res = await fetch(TALLY_URL + path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(10_000),
  });
  const answer = await res.json().catch(() => ({}));
  if (!res.ok && Array.isArray(answer.tenants)) {
    const choices = answer.tenants.map((t) => `${t.id} (${t.name})`).join(", ");
    fail(`${path}: ${answer.detail} — set TALLY_TENANT to one of ${choices}`);
  }
  if (!res.ok) fail(`${path}: ${res.status} ${answer.detail || ""}`.trim());
  return answer;
}

/// Keeps `tokens` (written whole, then renamed: never half a file; readable by its owner only).
function keep(tokens) {
  mkdirSync(dirname(FILE), { recursive: true, mode: 0o700 });
  const kept = {
    access_token: tokens.access_token,
    expires_at: Date.now() + tokens.expires_in * 1000,
    refresh_token: tokens.refresh_token,
  };
  const tmp = `${FILE}.${process.pid}.tmp`;
  writeFileSync(tmp, JSON.stringify(kept), { mode: 0o600 });
  renameSync(tmp, FILE);
  return kept;
}

function load() {
  try {
    return JSON.parse(readFileSync(FILE, "utf8"));
  } catch {
    fail(`no credentials in ${FILE}; sign in once with --login`);
  }
}

/// Runs `f` holding the lock file: two helpers refreshing the same token at once would look
/// like a stolen token to ingest-api, which then ends the whole sign-in.
async function locked(f) {
  const deadline = Date.now() + 15_000;
  for (;;) {
    try {
      closeSync(openSync(LOCK, "wx", 0o600));
      break;
    } catch (e) {
      if (e.code !== "EEXIST") throw e;
      // A lock left by a helper that died is taken over after 30 s.
      try {
        if (Date.now() - statSync(LOCK).mtimeMs > 30_000) rmSync(LOCK, { force: true });
      } catch {}
      if (Date.now() > deadline) fail(`${LOCK} is held; remove it if no helper is running`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  try {
    return await f();
  } finally {
    rmSync(LOCK, { force: true });
  }
}

async function readStdin() {
  let text = "";
  for await (const chunk of process.stdin) text += chunk;
  return text.split(/\r?\n/)[0];
}

if (process.argv.includes("--login")) {
  const email = process.env.TALLY_EMAIL || fail("set TALLY_EMAIL");
  const password = process.env.TALLY_PASSWORD || (await readStdin());
  const tenant = process.env.TALLY_TENANT || undefined;
  keep(await post("/v1/auth/login", { email, password, tenant }));
  process.stderr.write(`tally-mcp-headers: signed in as ${email}; credentials in ${FILE}\n`);
} else {
  let tokens = load();
  if (!(tokens.expires_at - Date.now() > MARGIN_MS)) {
    tokens = await locked(async () => {
      // Another helper may have refreshed while this one waited.
      const now = load();
      if (now.expires_at - Date.now() > MARGIN_MS) return now;
      return keep(await post("/v1/auth/refresh", { refresh_token: now.refresh_token }));
    });
  }
  process.stdout.write(JSON.stringify({ Authorization: `Bearer ${tokens.access_token}` }) + "\n");
}
