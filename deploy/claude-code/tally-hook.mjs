#!/usr/bin/env node
// Forwards Claude Code hook events to Tally: PostToolUse / PostToolUseFailure become
// `tool.executed`, SessionStart `session.started`, SessionEnd `session.ended`.
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
import { createHash, randomUUID } from "node:crypto";
import { userInfo } from "node:os";

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

function toEvent(h) {
  const user = env.TALLY_USER_ID || userInfo().username || "unknown";
  const common = { user_id: user, session_id: h.session_id };
  if (env.TALLY_TEAM_ID) common.team_id = env.TALLY_TEAM_ID;
  if (env.TALLY_PROJECT_ID) common.project_id = env.TALLY_PROJECT_ID;
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
        ...common,
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
      return { id: randomUUID(), type: "session.started", occurred_at: now, data: { ...common, context } };
    }
    case "SessionEnd":
      return {
        id: randomUUID(),
        type: "session.ended",
        occurred_at: now,
        data: { ...common, agents_used: ["claude-code"], context: { reason: h.reason } },
      };
    default:
      return null;
  }
}

async function main() {
  if (!env.TALLY_URL || !env.TALLY_API_KEY) return;
  let raw = "";
  for await (const chunk of process.stdin) raw += chunk;
  const event = toEvent(JSON.parse(raw));
  if (!event || !event.data.session_id) return;
  const timeout = Number(env.TALLY_HOOK_TIMEOUT_MS ?? 1000);
  await fetch(new URL("/v1/events", env.TALLY_URL), {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${env.TALLY_API_KEY}` },
    body: JSON.stringify(event),
    signal: AbortSignal.timeout(timeout),
  });
}

// Whatever happens, the agent goes on: no output, exit 0.
main().catch(() => {}).finally(() => process.exit(0));
