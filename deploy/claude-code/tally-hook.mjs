#!/usr/bin/env node
// Forwards Claude Code hook events to Tally: PostToolUse / PostToolUseFailure become
// `tool.executed`, SessionStart `session.started`, SessionEnd `session.ended`.
// It also tells Tally where the session works: at SessionStart, and whenever a later hook
// finds the working directory in another repository or on another branch, it sends a
// `session.context` (repository as host/owner/name from the `origin` remote, branch, commit,
// and the directory relative to the repository's root when paths are on), so that cost and
// tokens are attributed to the repository and branch. Finding a change reads `.git/HEAD`
// only; one `git` call is made per change. Turn it off with TALLY_HOOK_CONTEXT=0.
//
// Node.js only (Claude Code itself runs on Node), no dependencies. It reads the hook's JSON on
// stdin, POSTs one event, prints nothing and always exits 0; it gives up after
// TALLY_HOOK_TIMEOUT_MS (default 1000), so an unreachable Tally never blocks the agent.
// Configure it as an `"async": true` command hook (see README, "Claude Code").
//
// Environment:
//   TALLY_URL             ingest-api base URL (e.g. https://tally.example.com)
//   TALLY_API_KEY         an API key with scope `ingest`
//   TALLY_USER_ID         the user id events carry (default: the OS user name)
//   TALLY_TEAM_ID, TALLY_PROJECT_ID   optional dimensions
//   TALLY_HOOK_SEND_PATHS=1     include file paths and the working directory (default: no)
//   TALLY_HOOK_SEND_COMMANDS=1  include shell commands, patterns and error texts (default: no)
//   TALLY_HOOK_HASH=1           send paths and commands as salted SHA-256 instead of text
//   TALLY_HOOK_SALT             the salt for TALLY_HOOK_HASH (default: the API key, so that
//                               everyone sending with that key hashes a path alike)
//   TALLY_HOOK_TIMEOUT_MS       give up after this long (default 1000)
//   TALLY_HOOK_CONTEXT=0        do not send the session's repository and branch
//   TALLY_HOOK_STATE_DIR        where the last context of each session is remembered
//                               (default: <tmpdir>/tally-hook-<uid>)
// With TALLY_HOOK_HASH=1, repository and branch are sent as salted SHA-256 too, and only with
// TALLY_HOOK_SALT set (the tenant's, also given to its source-control integration so that
// pull requests still match); without a salt they are left out.
import { createHash, randomUUID } from "node:crypto";
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { tmpdir, userInfo } from "node:os";
import { dirname, join, relative, resolve } from "node:path";

const env = process.env;
const on = (name) => env[name] === "1" || env[name] === "true";

function guarded(value, allowed) {
  if (value === undefined || value === null || value === "") return undefined;
  if (!allowed) return undefined;
  const text = typeof value === "string" ? value : JSON.stringify(value);
  if (on("TALLY_HOOK_HASH")) {
    const salt = env.TALLY_HOOK_SALT ?? env.TALLY_API_KEY ?? "";
    return "sha256:" + createHash("sha256").update(salt + "\0" + text).digest("hex");
  }
  return text.length > 1000 ? text.slice(0, 1000) : text;
}

function common(h) {
  const user = env.TALLY_USER_ID || userInfo().username || "unknown";
  const c = { user_id: user, session_id: h.session_id };
  if (env.TALLY_TEAM_ID) c.team_id = env.TALLY_TEAM_ID;
  if (env.TALLY_PROJECT_ID) c.project_id = env.TALLY_PROJECT_ID;
  return c;
}

// ---- the session's repository and branch ----

// `host/owner/name` for a remote URL in any of git's spellings (what the server does too).
function normalizeRemote(url) {
  let s = String(url ?? "").trim();
  let host, path;
  const scheme = s.match(/^([a-z][a-z0-9+.-]*):\/\/([^/]*)\/(.*)$/i);
  if (scheme) {
    if (scheme[1].toLowerCase() === "file") return undefined;
    host = scheme[2].split("@").pop().split(":")[0];
    path = scheme[3];
  } else {
    const scp = s.match(/^([^/:]+):(.*)$/);
    if (!scp) return undefined;
    host = scp[1].split("@").pop();
    path = scp[2];
  }
  host = host.replace(/\.+$/, "").toLowerCase();
  // Lower-cased first, then every trailing `.git` and `/` goes, as the server does.
  path = path.replace(/^\/+|\/+$/g, "").toLowerCase();
  while (path.endsWith(".git")) path = path.slice(0, -4).replace(/\/+$/, "");
  if (!host || !/^[a-z0-9.-]+$/.test(host) || !path || path.split("/").some((p) => !p || p === "." || p === "..")) return undefined;
  return `${host}/${path}`;
}

// The `.git` of the repository holding `dir` and what its HEAD says, read from files only.
function gitHead(dir) {
  for (let d = resolve(dir); ; d = dirname(d)) {
    const dotgit = join(d, ".git");
    if (existsSync(dotgit)) {
      let gitdir = dotgit;
      if (statSync(dotgit).isFile()) {
        const m = readFileSync(dotgit, "utf8").match(/^gitdir:\s*(.+)$/m);
        if (!m) return null;
        gitdir = resolve(d, m[1].trim());
      }
      return { root: d, gitdir, head: readFileSync(join(gitdir, "HEAD"), "utf8").trim() };
    }
    if (dirname(d) === d) return null;
  }
}

// The first `url` of remote "origin" (else of any remote) in a git config file.
function remoteUrl(configText) {
  let section = null;
  let first;
  for (const line of configText.split(/\r?\n/)) {
    const sec = line.match(/^\s*\[\s*remote\s+"([^"]*)"\s*\]/);
    if (sec) { section = sec[1]; continue; }
    if (/^\s*\[/.test(line)) { section = null; continue; }
    const url = section !== null && line.match(/^\s*url\s*=\s*(.+?)\s*$/);
    if (url) {
      if (section === "origin") return url[1];
      first ??= url[1];
    }
  }
  return first;
}

function stateFile(sessionId) {
  const uid = typeof process.getuid === "function" ? process.getuid() : "user";
  const dir = env.TALLY_HOOK_STATE_DIR || join(tmpdir(), `tally-hook-${uid}`);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  return join(dir, createHash("sha256").update(String(sessionId)).digest("hex").slice(0, 32) + ".json");
}

// A `session.context` when the session starts in a repository, or its repository or branch
// changed since the last one sent (leaving every repository included); null otherwise.
function contextEvent(h, force) {
  if (env.TALLY_HOOK_CONTEXT === "0" || !h.cwd || !h.session_id) return null;
  const file = stateFile(h.session_id);
  let found = null;
  try { found = gitHead(h.cwd); } catch { found = null; }
  const key = found ? `${found.root}\0${found.head}` : "none";
  let last = null;
  try { last = JSON.parse(readFileSync(file, "utf8")); } catch { last = null; }
  if (!force && last && last.key === key) return null;
  const data = common(h);
  if (found) {
    // The one git call of a change: root, common dir (worktrees), commit, branch. In a
    // repository without commits it fails; HEAD's own text still names the branch.
    let root = found.root, commonDir = found.gitdir, commit, branch;
    const named = found.head.match(/^ref:\s*refs\/heads\/(.+)$/);
    branch = named ? named[1] : undefined;
    try {
      const out = execFileSync("git", ["-C", h.cwd, "rev-parse", "--show-toplevel", "--git-common-dir", "HEAD", "--abbrev-ref", "HEAD"],
        { encoding: "utf8", timeout: 500, stdio: ["ignore", "pipe", "ignore"] }).split("\n");
      root = out[0] || root;
      commonDir = resolve(h.cwd, out[1] || commonDir);
      commit = out[2];
      if (out[3] && out[3] !== "HEAD") branch = out[3];
    } catch {
      // no commits yet, or no git: what the files say
    }
    let repository;
    try { repository = normalizeRemote(remoteUrl(readFileSync(join(commonDir, "config"), "utf8"))); } catch {}
    // Private names need the tenant's salt: without it they are left out (unattributed),
    // never sent as an unsalted hash anyone could reverse by guessing.
    const hash = on("TALLY_HOOK_HASH");
    const salt = env.TALLY_HOOK_SALT ?? "";
    const priv = (t) => "sha256:" + createHash("sha256").update(salt + "\0" + t).digest("hex");
    const fits = (t) => t && t.length <= 255 && !/[\s\x00-\x1f\x7f]/.test(t);
    if (!hash || salt) {
      if (fits(repository)) data.repository = hash ? priv(repository) : repository;
      if (fits(branch)) data.branch = hash ? priv(branch) : branch;
    }
    if (/^[0-9a-f]{7,64}$/.test(commit ?? "")) data.commit = commit;
    const rel = relative(root, resolve(h.cwd));
    if (on("TALLY_HOOK_SEND_PATHS")) data.directory = guarded(rel === "" ? "." : rel, true);
  }
  // Remembered only once Tally has taken it (see main), so a lost context is sent again.
  const remember = () => {
    try { writeFileSync(file, JSON.stringify({ key, at: new Date().toISOString() }), { mode: 0o600 }); } catch {}
  };
  // Outside any repository, a context is only worth sending to end the last one.
  if (!found && (!last || last.key === "none")) {
    remember();
    return null;
  }
  return { remember, event: { id: randomUUID(), type: "session.context", occurred_at: new Date().toISOString(), data } };
}

function toEvent(h) {
  const common_ = common(h);
  const now = new Date().toISOString();
  const input = h.tool_input ?? {};
  switch (h.hook_event_name) {
    case "PostToolUse":
    case "PostToolUseFailure": {
      const failed = h.hook_event_name === "PostToolUseFailure";
      const details = { tool_use_id: h.tool_use_id };
      const path = guarded(input.file_path ?? input.path ?? input.notebook_path, on("TALLY_HOOK_SEND_PATHS"));
      if (path) details.file_path = path;
      const command = guarded(input.command ?? input.pattern ?? input.url, on("TALLY_HOOK_SEND_COMMANDS"));
      if (command) details.command = command;
      if (h.is_interrupt) details.interrupted = true;
      const data = {
        ...common_,
        tool_name: h.tool_name,
        duration_ms: Math.max(0, Math.round(h.duration_ms ?? 0)),
        success: !failed,
        details,
      };
      if (failed) data.error_message = guarded(h.error, on("TALLY_HOOK_SEND_COMMANDS")) ?? "tool failed";
      return { id: randomUUID(), type: "tool.executed", occurred_at: now, data };
    }
    case "SessionStart": {
      const context = { source: h.source, model: h.model, agent: "claude-code" };
      const cwd = guarded(h.cwd, on("TALLY_HOOK_SEND_PATHS"));
      if (cwd) context.cwd = cwd;
      return { id: randomUUID(), type: "session.started", occurred_at: now, data: { ...common_, context } };
    }
    case "SessionEnd":
      return {
        id: randomUUID(),
        type: "session.ended",
        occurred_at: now,
        data: { ...common_, agents_used: ["claude-code"], context: { reason: h.reason } },
      };
    default:
      return null;
  }
}

async function main() {
  if (!env.TALLY_URL || !env.TALLY_API_KEY) return;
  let raw = "";
  for await (const chunk of process.stdin) raw += chunk;
  const h = JSON.parse(raw);
  const events = [];
  // The context goes first, so the events it explains come after it.
  let context = null;
  if (h.hook_event_name !== "SessionEnd") {
    try { context = contextEvent(h, h.hook_event_name === "SessionStart"); } catch { context = null; }
    if (context) events.push(context.event);
  }
  const event = toEvent(h);
  if (event) events.push(event);
  const sendable = events.filter((e) => e.data.session_id);
  if (sendable.length === 0) return;
  const timeout = Number(env.TALLY_HOOK_TIMEOUT_MS ?? 1000);
  const res = await fetch(new URL("/v1/events", env.TALLY_URL), {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${env.TALLY_API_KEY}` },
    body: JSON.stringify(sendable.length === 1 ? sendable[0] : sendable),
    signal: AbortSignal.timeout(timeout),
  });
  if (res.ok && context) context.remember();
}

// Whatever happens, the agent goes on: no output, exit 0.
main().catch(() => {}).finally(() => process.exit(0));
