//! The MCP server (Model Context Protocol, Streamable HTTP transport, `POST /mcp`): Tally's
//! read API as tools an agent can call, answering with the rights of whoever's credential
//! calls — the same access token or read key, the same visibility, privacy mode, audit and
//! rate limit as the REST API, because each tool call *is* a call of the REST endpoint it
//! names (through this service's own router, with the caller's credential).
//!
//! It speaks the current revision, 2026-07-28 (stateless: `server/discover`, and every
//! request carrying its protocol version and client capabilities in `_meta`), and the
//! `initialize`-era revisions before it for older clients. Either way the server keeps no
//! session and opens no server-to-client stream (GET and DELETE answer 405); every answer is
//! a single `application/json` JSON-RPC response. A notification or a response from the
//! client gets 202.

use std::fmt::Write as _;
use std::net::IpAddr;

use axum::body::{to_bytes, Body};
use axum::extract::State;
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use shared::problem::Problem;
use shared::serve::Peer;
use tower::ServiceExt;

use crate::read::context::within_read_limit;
use crate::routes::access::Access;
use crate::state::AppState;
use crate::App;

/// The stateless revision spoken (`server/discover`, `_meta` on every request).
pub const MODERN: &str = "2026-07-28";

/// The `initialize`-era revisions spoken, newest first; a client initializing with another
/// gets the newest.
pub const PROTOCOL_VERSIONS: [&str; 4] = ["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];

/// Every revision, newest first (`server/discover`'s `supportedVersions`).
const ALL_VERSIONS: [&str; 5] = [
    MODERN,
    PROTOCOL_VERSIONS[0],
    PROTOCOL_VERSIONS[1],
    PROTOCOL_VERSIONS[2],
    PROTOCOL_VERSIONS[3],
];

/// The `_meta` keys of a 2026-07-28 request.
const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
const META_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";

/// Largest JSON-RPC message taken.
const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Largest REST answer a tool reads back: the largest a read makes.
const MAX_ANSWER_BYTES: usize = crate::read::encoding::MAX_ANSWER;

/// Rows a tool's text lists (the structured answer has them all).
const TEXT_ROWS: usize = 20;

/// JSON-RPC error codes.
const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
/// 2026-07-28: an `MCP-Protocol-Version`, `Mcp-Method` or `Mcp-Name` header that says other
/// than the body.
const HEADER_MISMATCH: i64 = -32020;
/// 2026-07-28: a protocol version this server does not speak.
const UNSUPPORTED_VERSION: i64 = -32022;

/// One tool: its name, what it answers, its input schema, and the REST call it makes.
struct Tool {
    name: &'static str,
    title: &'static str,
    description: &'static str,
    /// (name, JSON schema, required)
    params: fn() -> Vec<(&'static str, Value, bool)>,
    /// The REST path and query for validated arguments.
    call: fn(&Map<String, Value>) -> String,
    /// A short readable text of the REST answer.
    text: fn(&Value) -> String,
}

fn range_params() -> Vec<(&'static str, Value, bool)> {
    vec![
        (
            "range",
            json!({"type": "string", "enum": ["1h", "24h", "7d", "30d", "90d"],
                   "description": "A preset ending now (default 24h); or give from and to."}),
            false,
        ),
        (
            "from",
            json!({"type": "string", "maxLength": 40,
                   "description": "Start, RFC 3339 (e.g. 2026-12-01T00:00:00Z)."}),
            false,
        ),
        (
            "to",
            json!({"type": "string", "maxLength": 40,
                   "description": "End, RFC 3339 (default now)."}),
            false,
        ),
    ]
}

const TOOLS: [Tool; 6] = [
    Tool {
        name: "usage_summary",
        title: "Usage and cost summary",
        description: "What was spent and done over a time range, within what the caller may \
                      see (a developer: their own; a manager: their teams; in privacy mode, \
                      only groups of at least k people): cost in US dollars, agent requests, \
                      tokens, commands, tool runs, sessions and active people. Same as GET \
                      /v1/dashboard/overview.",
        params: range_params,
        call: |a| {
            format!(
                "/v1/dashboard/overview?{}",
                query(a, &["range", "from", "to"])
            )
        },
        text: usage_text,
    },
    Tool {
        name: "top",
        title: "Top N",
        description: "The largest commands, agents (models), tools, users, teams or projects \
                      over a range, by count, errors or average duration. Same as GET \
                      /v1/dashboard/top.",
        params: || {
            let mut p = range_params();
            p.extend([
                (
                    "dimension",
                    json!({"type": "string",
                           "enum": ["command", "agent", "tool", "user", "team", "project"],
                           "description": "What to rank (default command)."}),
                    false,
                ),
                (
                    "by",
                    json!({"type": "string", "enum": ["count", "errors", "duration"],
                           "description": "Rank by (default count)."}),
                    false,
                ),
                (
                    "limit",
                    json!({"type": "integer", "minimum": 1, "maximum": 100,
                           "description": "How many (default 10)."}),
                    false,
                ),
            ]);
            p
        },
        call: |a| {
            let q = query(a, &["range", "from", "to", "dimension", "by", "limit"]);
            format!("/v1/dashboard/top?{q}")
        },
        text: top_text,
    },
    Tool {
        name: "sessions",
        title: "Recent sessions",
        description: "Agent sessions over a range, newest first, with their user, team, \
                      duration and commands; pass a session_id to session_timeline for its \
                      prompts and cost. Same as GET /v1/dashboard/sessions.",
        params: || {
            let mut p = range_params();
            p.push((
                "limit",
                json!({"type": "integer", "minimum": 1, "maximum": 100,
                       "description": "How many (default 20)."}),
                false,
            ));
            p
        },
        call: |a| {
            let mut a = a.clone();
            a.entry("limit").or_insert(json!(20));
            format!(
                "/v1/dashboard/sessions?{}",
                query(&a, &["range", "from", "to", "limit"])
            )
        },
        text: sessions_text,
    },
    Tool {
        name: "session_timeline",
        title: "A session's timeline",
        description: "One session's prompts in order, each with its API requests (model, \
                      tokens, cost, cache hits, errors) and tool runs, the session's totals \
                      and its most expensive prompts. Same as GET \
                      /v1/dashboard/sessions/{id}/timeline.",
        params: || {
            vec![(
                "session_id",
                json!({"type": "string", "minLength": 1, "maxLength": 255,
                       "description": "The session's id (Claude Code's session.id)."}),
                true,
            )]
        },
        call: |a| {
            let id = a.get("session_id").and_then(Value::as_str).unwrap_or("");
            format!("/v1/dashboard/sessions/{}/timeline", encode(id))
        },
        text: timeline_text,
    },
    Tool {
        name: "budget_status",
        title: "Budget status",
        description: "The budgets the caller may see, each with what was spent in its \
                      current period, what remains, and when it runs out at the current \
                      rate. Same as GET /v1/budgets (the list is under `budgets`).",
        params: Vec::new,
        call: |_| "/v1/budgets".into(),
        text: budgets_text,
    },
    Tool {
        name: "cost_by_repository",
        title: "Cost by repository or branch",
        description: "Cost, tokens, tool runs, lines and sessions per repository or per \
                      branch over a range, the most expensive first; usage no repository \
                      explains is `unattributed`. Same as GET /v1/dashboard/repositories.",
        params: || {
            let mut p = range_params();
            p.extend([
                (
                    "by",
                    json!({"type": "string", "enum": ["repository", "branch"],
                           "description": "One row per repository (default) or per branch."}),
                    false,
                ),
                (
                    "repository",
                    json!({"type": "string", "maxLength": 255,
                           "description": "Only this repository's branches (host/owner/name)."}),
                    false,
                ),
                (
                    "limit",
                    json!({"type": "integer", "minimum": 1, "maximum": 100,
                           "description": "How many rows (default 20)."}),
                    false,
                ),
            ]);
            p
        },
        call: |a| {
            let q = query(a, &["range", "from", "to", "by", "repository", "limit"]);
            format!("/v1/dashboard/repositories?{q}")
        },
        text: repos_text,
    },
];

impl Tool {
    fn input_schema(&self) -> Value {
        let params = (self.params)();
        let required: Vec<&str> = params.iter().filter(|p| p.2).map(|p| p.0).collect();
        let properties: Map<String, Value> = params
            .into_iter()
            .map(|(n, s, _)| (n.to_string(), s))
            .collect();
        json!({"type": "object", "properties": properties, "required": required,
               "additionalProperties": false})
    }

    fn describe(&self) -> Value {
        json!({
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "inputSchema": self.input_schema(),
            "annotations": {"readOnlyHint": true, "openWorldHint": false},
        })
    }

    /// The arguments, checked against the input schema, or why not (a tool error: the
    /// model can correct itself).
    fn check(&self, args: &Value) -> Result<Map<String, Value>, String> {
        let args = match args {
            Value::Null => Map::new(),
            Value::Object(m) => m.clone(),
            _ => return Err("arguments must be an object".into()),
        };
        let params = (self.params)();
        for name in args.keys() {
            if !params.iter().any(|p| p.0 == name) {
                let known: Vec<&str> = params.iter().map(|p| p.0).collect();
                return Err(format!(
                    "unknown argument `{}`; {} takes {}",
                    name.chars().take(64).collect::<String>(),
                    self.name,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ));
            }
        }
        for (name, schema, required) in &params {
            let Some(v) = args.get(*name) else {
                if *required {
                    return Err(format!("`{name}` is required"));
                }
                continue;
            };
            check_value(name, schema, v)?;
        }
        Ok(args)
    }
}

/// `v` against the few schema keywords the tools use.
fn check_value(name: &str, schema: &Value, v: &Value) -> Result<(), String> {
    let num = |k: &str| schema.get(k).and_then(Value::as_i64);
    match schema["type"].as_str() {
        Some("string") => {
            let s = v
                .as_str()
                .ok_or_else(|| format!("`{name}` must be a string"))?;
            let n = s.chars().count() as i64;
            if num("minLength").is_some_and(|m| n < m) || num("maxLength").is_some_and(|m| n > m) {
                return Err(format!(
                    "`{name}` must have {}..={} characters",
                    num("minLength").unwrap_or(0),
                    num("maxLength").unwrap_or(i64::MAX)
                ));
            }
            if s.contains('\0') {
                return Err(format!("`{name}` must not contain NUL"));
            }
            if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
                if !allowed.iter().any(|a| a == v) {
                    let names: Vec<&str> = allowed.iter().filter_map(Value::as_str).collect();
                    return Err(format!("`{name}` must be one of {}", names.join(", ")));
                }
            }
        }
        Some("integer") => {
            let i = v
                .as_i64()
                .ok_or_else(|| format!("`{name}` must be an integer"))?;
            let (lo, hi) = (num("minimum"), num("maximum"));
            if lo.is_some_and(|m| i < m) || hi.is_some_and(|m| i > m) {
                return Err(format!(
                    "`{name}` must be {}..={}",
                    lo.unwrap_or(i64::MIN),
                    hi.unwrap_or(i64::MAX)
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

/// Percent-encodes `s` for a URL path segment or query value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The query string of the arguments named in `names` that were given.
fn query(args: &Map<String, Value>, names: &[&str]) -> String {
    names
        .iter()
        .filter_map(|n| {
            let v = args.get(*n)?;
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            Some(format!("{n}={}", encode(&v)))
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// A JSON-RPC response.
fn reply(id: &Value, result: Value) -> Response {
    json_response(json!({"jsonrpc": "2.0", "id": id, "result": result}))
}

fn error(id: &Value, code: i64, message: impl Into<String>) -> Response {
    error_with(StatusCode::OK, id, code, message, None)
}

/// A JSON-RPC error with an HTTP status (2026-07-28 gives protocol errors 400 and unknown
/// methods 404) and optional `data`.
fn error_with(
    status: StatusCode,
    id: &Value,
    code: i64,
    message: impl Into<String>,
    data: Option<Value>,
) -> Response {
    let mut e = json!({"code": code, "message": message.into()});
    if let Some(d) = data {
        e["data"] = d;
    }
    let mut r = json_response(json!({"jsonrpc": "2.0", "id": id, "error": e}));
    *r.status_mut() = status;
    r
}

fn json_response(v: Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// The server's name, as `initialize` gives it and as 2026-07-28 results carry it in `_meta`.
fn server_info() -> Value {
    json!({"name": "tally", "title": "Tally", "version": env!("CARGO_PKG_VERSION")})
}

/// A header's value as text ("" when absent or not text).
fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Whether a request speaks 2026-07-28: it says so in its header or in its `_meta`
/// (`initialize` never does; it is how older clients begin).
fn is_modern(method: &str, headers: &HeaderMap, params: &Value) -> bool {
    method != "initialize"
        && (header_text(headers, "mcp-protocol-version") == MODERN
            || params
                .get("_meta")
                .and_then(|m| m.get(META_VERSION))
                .is_some())
}

/// A 2026-07-28 request's envelope checked: its `_meta` keys, its headers against its body,
/// its version; the JSON-RPC error to answer when one does not hold (`None` when all do).
fn check_envelope(
    id: &Value,
    method: &str,
    params: &Value,
    headers: &HeaderMap,
) -> Option<Response> {
    let meta = params.get("_meta").and_then(Value::as_object);
    let version = meta
        .and_then(|m| m.get(META_VERSION))
        .and_then(Value::as_str);
    let capabilities = meta.and_then(|m| m.get(META_CAPABILITIES));
    let Some(version) = version.filter(|_| capabilities.is_some_and(Value::is_object)) else {
        return Some(error_with(
            StatusCode::BAD_REQUEST,
            id,
            INVALID_PARAMS,
            format!("params._meta must hold {META_VERSION} and {META_CAPABILITIES}"),
            None,
        ));
    };
    let name = params.get("name").and_then(Value::as_str);
    let mismatch = [
        (
            "MCP-Protocol-Version",
            "mcp-protocol-version",
            Some(version),
        ),
        ("Mcp-Method", "mcp-method", Some(method)),
        ("Mcp-Name", "mcp-name", name),
    ]
    .into_iter()
    .find(|(_, h, body)| {
        let sent = header_text(headers, h);
        !sent.is_empty() && !sent.starts_with("=?") && Some(sent) != *body
    });
    if let Some((header, ..)) = mismatch {
        return Some(error_with(
            StatusCode::BAD_REQUEST,
            id,
            HEADER_MISMATCH,
            format!("the {header} header says other than the request's body"),
            None,
        ));
    }
    if version != MODERN {
        return Some(error_with(
            StatusCode::BAD_REQUEST,
            id,
            UNSUPPORTED_VERSION,
            "Unsupported protocol version",
            Some(json!({"supported": [MODERN], "requested": version})),
        ));
    }
    None
}

/// A 2026-07-28 result: complete, with the server's name in `_meta`.
fn modern(mut result: Value) -> Value {
    result["resultType"] = json!("complete");
    result["_meta"] = json!({"io.modelcontextprotocol/serverInfo": server_info()});
    result
}

/// A tool's answer: readable text, and the REST answer as structured content.
fn tool_result(text: String, structured: Option<Value>, is_error: bool) -> Value {
    let mut r = json!({"content": [{"type": "text", "text": text}], "isError": is_error});
    if let Some(s) = structured {
        r["structuredContent"] = s;
    }
    r
}

/// `GET` and `DELETE /mcp`: this server opens no stream and keeps no session.
pub async fn not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::ALLOW, "POST")],
        Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "Method not allowed",
            "this MCP server is stateless: POST JSON-RPC messages to /mcp",
        ),
    )
        .into_response()
}

/// Refuses a browser page of another origin (DNS rebinding): a request with an `Origin`
/// must come from this service's own host.
fn foreign_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return false;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let origin_host = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .unwrap_or("");
    origin_host.is_empty() || !origin_host.eq_ignore_ascii_case(host)
}

/// `POST /mcp`.
pub async fn post(
    State(s): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match handle(&s, &headers, peer, body).await {
        Ok(r) => r,
        Err(p) => {
            let mut r = p.into_response();
            if r.status() == StatusCode::UNAUTHORIZED {
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
            }
            r
        }
    }
}

async fn handle(
    s: &AppState,
    headers: &HeaderMap,
    peer: Option<IpAddr>,
    body: Body,
) -> Result<Response, Problem> {
    if foreign_origin(headers) {
        return Err(Problem::forbidden(
            "requests from a web page of another origin are refused",
        ));
    }
    // The credential first: an anonymous caller learns nothing else.
    let reader = s.auth.reader(headers, peer).await?;
    within_read_limit(s, &reader).await?;
    if let Some(v) = headers
        .get("mcp-protocol-version")
        .and_then(|v| v.to_str().ok())
    {
        if !ALL_VERSIONS.contains(&v) {
            return Ok(error_with(
                StatusCode::BAD_REQUEST,
                &Value::Null,
                UNSUPPORTED_VERSION,
                "Unsupported protocol version",
                Some(json!({"supported": ALL_VERSIONS,
                            "requested": v.chars().take(40).collect::<String>()})),
            ));
        }
    }
    let bytes = match to_bytes(body, MAX_MESSAGE_BYTES).await {
        Ok(b) => b,
        Err(_) => return Err(Problem::too_large(MAX_MESSAGE_BYTES)),
    };
    let msg: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => return Ok(error(&Value::Null, PARSE_ERROR, format!("not JSON: {e}"))),
    };
    let Some(obj) = msg.as_object() else {
        return Ok(error(
            &Value::Null,
            INVALID_REQUEST,
            "a message is one JSON-RPC object (batches are not supported)",
        ));
    };
    let id = match obj.get("id") {
        // A notification, or a response to a request of ours (there are none): accepted.
        None => return Ok(StatusCode::ACCEPTED.into_response()),
        Some(id @ (Value::String(_) | Value::Number(_))) => id.clone(),
        Some(_) => {
            return Ok(error(
                &Value::Null,
                INVALID_REQUEST,
                "id must be a string or number",
            ))
        }
    };
    if obj.get("jsonrpc") != Some(&json!("2.0")) {
        return Ok(error(&id, INVALID_REQUEST, "jsonrpc must be \"2.0\""));
    }
    let Some(method) = obj.get("method").and_then(Value::as_str) else {
        if obj.contains_key("result") || obj.contains_key("error") {
            return Ok(StatusCode::ACCEPTED.into_response());
        }
        return Ok(error(&id, INVALID_REQUEST, "method is missing"));
    };
    let params = obj.get("params").cloned().unwrap_or(Value::Null);
    let modern_request = is_modern(method, headers, &params);
    if modern_request {
        if let Some(refused) = check_envelope(&id, method, &params, headers) {
            return Ok(refused);
        }
    }
    let answer = |result: Value| {
        if modern_request {
            reply(&id, modern(result))
        } else {
            reply(&id, result)
        }
    };
    Ok(match method {
        "server/discover" if modern_request => answer(json!({
            "supportedVersions": ALL_VERSIONS,
            "capabilities": {"tools": {"listChanged": false}},
            "instructions": instructions(&Access::of(&reader)),
            "ttlMs": 0,
            // The instructions say what this caller sees.
            "cacheScope": "private",
        })),
        "initialize" => {
            let asked = params.get("protocolVersion").and_then(Value::as_str);
            let version = asked
                .filter(|v| PROTOCOL_VERSIONS.contains(v))
                .unwrap_or(PROTOCOL_VERSIONS[0]);
            let access = Access::of(&reader);
            reply(
                &id,
                json!({
                    "protocolVersion": version,
                    "capabilities": {"tools": {"listChanged": false}},
                    "serverInfo": server_info(),
                    "instructions": instructions(&access),
                }),
            )
        }
        // 2026-07-28 has no ping.
        "ping" if !modern_request => reply(&id, json!({})),
        "tools/list" => {
            let mut list = json!({"tools": TOOLS.iter().map(Tool::describe).collect::<Vec<_>>()});
            if modern_request {
                // The same tools for everyone.
                list["ttlMs"] = json!(0);
                list["cacheScope"] = json!("public");
            }
            answer(list)
        }
        "tools/call" => {
            let name = params.get("name").and_then(Value::as_str).unwrap_or("");
            let Some(tool) = TOOLS.iter().find(|t| t.name == name) else {
                let names: Vec<&str> = TOOLS.iter().map(|t| t.name).collect();
                return Ok(error(
                    &id,
                    INVALID_PARAMS,
                    format!(
                        "unknown tool `{}`; the tools are {}",
                        name.chars().take(64).collect::<String>(),
                        names.join(", ")
                    ),
                ));
            };
            let args = params.get("arguments").unwrap_or(&Value::Null);
            let result = match tool.check(args) {
                Err(why) => tool_result(format!("invalid arguments: {why}"), None, true),
                Ok(args) => call(s, headers, peer, tool, &args).await,
            };
            answer(result)
        }
        _ => error_with(
            if modern_request {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::OK
            },
            &id,
            METHOD_NOT_FOUND,
            format!(
                "method `{}` is not supported",
                method.chars().take(64).collect::<String>()
            ),
            None,
        ),
    })
}

/// What the server tells the agent about itself and the caller.
fn instructions(access: &Access) -> String {
    let sees = match access.sees {
        "tenant" => "the whole tenant".to_string(),
        "teams" => format!(
            "the teams {}",
            access.teams.clone().unwrap_or_default().join(", ")
        ),
        _ => "their own data only".to_string(),
    };
    let mut s = format!(
        "Tally: what AI coding agents cost and did. Every answer covers what the caller may \
         see: {sees}. Costs are US dollars as the agents reported them; times are UTC."
    );
    if let Some(k) = access.min_group {
        let _ = write!(
            s,
            " The tenant is in privacy mode: the caller sees only totals of groups of at \
             least {k} people, by whole UTC days; individual views answer an error."
        );
    }
    s
}

/// Runs `tool`'s REST call with the caller's credential (and address, `peer`) and turns the
/// answer into a tool result: the REST answer as structured content (an array under its
/// name), or the problem's detail as a tool error.
async fn call(
    s: &AppState,
    headers: &HeaderMap,
    peer: Option<IpAddr>,
    tool: &Tool,
    args: &Map<String, Value>,
) -> Value {
    let uri = (tool.call)(args);
    let mut req = Request::get(uri.trim_end_matches('?'));
    for h in [
        header::AUTHORIZATION,
        header::HeaderName::from_static("x-api-key"),
    ] {
        if let Some(v) = headers.get(&h) {
            req = req.header(h, v);
        }
    }
    let Ok(mut req) = req.body(Body::empty()) else {
        return tool_result("the arguments do not make a request".into(), None, true);
    };
    if let Some(ip) = peer {
        // The call is the caller's: its key is looked up within the caller's address's share.
        let from = std::net::SocketAddr::new(ip, 0);
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(from));
    }
    let res = match App::router(s.clone()).oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let status = res.status();
    let body = to_bytes(res.into_body(), MAX_ANSWER_BYTES)
        .await
        .unwrap_or_default();
    let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if !status.is_success() {
        let detail = answer["detail"].as_str().unwrap_or("the request failed");
        return tool_result(format!("{} ({})", detail, status.as_u16()), None, true);
    }
    let structured = match answer {
        Value::Array(items) => json!({ "budgets": items }),
        other => other,
    };
    tool_result((tool.text)(&structured), Some(structured), false)
}

fn money(v: &Value) -> String {
    format!("${:.2}", v.as_f64().unwrap_or(0.0))
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

fn span(a: &Value) -> String {
    format!(
        "{} to {} UTC",
        a["from"].as_str().unwrap_or("?"),
        a["to"].as_str().unwrap_or("?")
    )
}

fn usage_text(a: &Value) -> String {
    let mut s = format!(
        "From {}: cost {}; {} agent requests ({} failed); {} input and {} output tokens; \
         {} commands ({} failed); {} tool runs; {} sessions; {} active people.",
        span(a),
        money(&a["cost_usd"]),
        int(&a["agents"]["count"]),
        int(&a["agents"]["errors"]),
        int(&a["tokens"]["input"]),
        int(&a["tokens"]["output"]),
        int(&a["commands"]["count"]),
        int(&a["commands"]["errors"]),
        int(&a["tools"]["count"]),
        int(&a["sessions"]),
        int(&a["active_users"]),
    );
    if let Some(k) = a["min_group"].as_u64() {
        let _ = write!(
            s,
            " Privacy mode: only teams' days with at least {k} people count."
        );
    }
    s
}

fn top_text(a: &Value) -> String {
    let mut s = format!(
        "Top {} by {}, {}:",
        a["dimension"].as_str().unwrap_or("?"),
        a["by"].as_str().unwrap_or("?"),
        span(a)
    );
    for (i, item) in a["items"].as_array().into_iter().flatten().enumerate() {
        let avg = item["duration_avg_ms"]
            .as_f64()
            .map_or("-".into(), |ms| format!("{ms:.0} ms"));
        let _ = write!(
            s,
            "\n{}. {} — {} ({} errors, average {avg})",
            i + 1,
            item["key"].as_str().unwrap_or(""),
            int(&item["count"]),
            int(&item["errors"]),
        );
    }
    s
}

fn sessions_text(a: &Value) -> String {
    let rows = a["sessions"].as_array().cloned().unwrap_or_default();
    let mut s = format!("{} sessions, newest first:", rows.len());
    for r in rows.iter().take(TEXT_ROWS) {
        let _ = write!(
            s,
            "\n- {} by {} (team {}), started {}, {} commands",
            r["session_id"].as_str().unwrap_or(""),
            r["user_id"].as_str().unwrap_or(""),
            r["team_id"].as_str().unwrap_or(""),
            r["started_at"].as_str().unwrap_or("?"),
            int(&r["commands_executed"]),
        );
    }
    s
}

fn timeline_text(a: &Value) -> String {
    let t = &a["totals"];
    let mut s = format!(
        "Session {} of {}: started {}, ended {}; cost {}, {} API requests ({} failed), {} \
         input and {} output tokens, {} tool runs ({} failed); {} prompts.",
        a["session_id"].as_str().unwrap_or(""),
        a["user_id"].as_str().unwrap_or("?"),
        a["started_at"].as_str().unwrap_or("?"),
        a["ended_at"].as_str().unwrap_or("not yet"),
        money(&t["cost_usd"]),
        int(&t["requests"]),
        int(&t["errors"]),
        int(&t["input_tokens"]),
        int(&t["output_tokens"]),
        int(&t["tool_runs"]),
        int(&t["tool_failures"]),
        a["prompts"].as_array().map_or(0, Vec::len),
    );
    let prompts = a["prompts"].as_array().cloned().unwrap_or_default();
    for id in a["top_prompts"].as_array().into_iter().flatten() {
        if let Some(p) = prompts.iter().find(|p| &p["prompt_id"] == id) {
            let _ = write!(
                s,
                "\nExpensive prompt {} at {}: {}, {} requests.",
                id.as_str().unwrap_or(""),
                p["at"].as_str().unwrap_or("?"),
                money(&p["totals"]["cost_usd"]),
                int(&p["totals"]["requests"]),
            );
        }
    }
    s
}

fn budgets_text(a: &Value) -> String {
    let list = a["budgets"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        return "No budgets you may see.".into();
    }
    let mut s = String::new();
    for b in list.iter().take(TEXT_ROWS) {
        let (budget, st) = (&b["budget"], &b["status"]);
        let scope = match budget["scope_id"].as_str() {
            Some(id) if !id.is_empty() => {
                format!("{} {id}", budget["scope"].as_str().unwrap_or(""))
            }
            _ => budget["scope"].as_str().unwrap_or("").to_string(),
        };
        let _ = write!(
            s,
            "{}{} ({scope}, {}): spent {} of {} ({:.0} %), forecast: {}{}.",
            if s.is_empty() { "" } else { "\n" },
            budget["name"].as_str().unwrap_or(""),
            budget["period"].as_str().unwrap_or(""),
            money(&st["spent"]),
            money(&budget["amount"]),
            st["percent"].as_f64().unwrap_or(0.0),
            st["forecast"]["outcome"].as_str().unwrap_or("?"),
            st["forecast"]["reaches_at"]
                .as_str()
                .map_or(String::new(), |t| format!(" at {t}")),
        );
    }
    s
}

fn repos_text(a: &Value) -> String {
    let rows = a["rows"].as_array().cloned().unwrap_or_default();
    let mut s = format!("Cost by {}:", a["by"].as_str().unwrap_or("repository"));
    for r in rows.iter().take(TEXT_ROWS) {
        let name = if r["unattributed"].as_bool() == Some(true) {
            "unattributed".to_string()
        } else {
            match r["branch"].as_str() {
                Some(b) => format!("{} {b}", r["repository"].as_str().unwrap_or("")),
                None => r["repository"].as_str().unwrap_or("").to_string(),
            }
        };
        let _ = write!(
            s,
            "\n- {name}: {}, {} requests, {} sessions, +{}/-{} lines",
            money(&r["cost_usd"]),
            int(&r["requests"]),
            int(&r["sessions"]),
            int(&r["lines_added"]),
            int(&r["lines_removed"]),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_checked_against_each_tools_schema() {
        let top = TOOLS.iter().find(|t| t.name == "top").unwrap();
        assert!(top.check(&json!({"limit": 5, "dimension": "user"})).is_ok());
        assert!(top.check(&Value::Null).is_ok());
        for (bad, says) in [
            (json!({"limit": 0}), "`limit` must be 1..=100"),
            (json!({"limit": "5"}), "`limit` must be an integer"),
            (json!({"dimension": "salary"}), "`dimension` must be one of"),
            (json!({"nope": 1}), "unknown argument `nope`"),
            (json!([1]), "arguments must be an object"),
            (json!({"range": "1y"}), "`range` must be one of"),
        ] {
            let err = top.check(&bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        let timeline = TOOLS.iter().find(|t| t.name == "session_timeline").unwrap();
        assert!(timeline.check(&json!({})).unwrap_err().contains("required"));
        assert!(timeline
            .check(&json!({"session_id": "a\u{0}b"}))
            .unwrap_err()
            .contains("NUL"));
        assert!(timeline
            .check(&json!({"session_id": "x".repeat(256)}))
            .is_err());
    }

    #[test]
    fn calls_become_encoded_rest_requests() {
        let timeline = TOOLS.iter().find(|t| t.name == "session_timeline").unwrap();
        let args = timeline.check(&json!({"session_id": "a/b?c d"})).unwrap();
        assert_eq!(
            (timeline.call)(&args),
            "/v1/dashboard/sessions/a%2Fb%3Fc%20d/timeline"
        );
        let repos = TOOLS
            .iter()
            .find(|t| t.name == "cost_by_repository")
            .unwrap();
        let args = repos
            .check(&json!({"by": "branch", "repository": "github.com/a/b&x=1", "limit": 3}))
            .unwrap();
        assert_eq!(
            (repos.call)(&args),
            "/v1/dashboard/repositories?by=branch&repository=github.com%2Fa%2Fb%26x%3D1&limit=3"
        );
    }

    #[test]
    fn every_tool_has_an_object_schema() {
        for t in &TOOLS {
            let d = t.describe();
            assert_eq!(d["inputSchema"]["type"], "object", "{}", t.name);
            assert_eq!(d["inputSchema"]["additionalProperties"], false);
        }
    }

    #[test]
    fn requests_of_the_stateless_revision_are_checked_before_they_are_served() {
        let meta = |v: &str| json!({"_meta": {META_VERSION: v, META_CAPABILITIES: {}}});
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, v.parse().unwrap());
            }
            h
        };
        let modern_headers = headers(&[
            ("mcp-protocol-version", MODERN),
            ("mcp-method", "tools/list"),
        ]);
        assert!(is_modern("tools/list", &modern_headers, &Value::Null));
        assert!(is_modern("tools/list", &HeaderMap::new(), &meta(MODERN)));
        assert!(!is_modern("initialize", &modern_headers, &meta(MODERN)));
        assert!(!is_modern(
            "tools/list",
            &headers(&[("mcp-protocol-version", "2025-11-25")]),
            &json!({})
        ));
        let id = json!(1);
        assert!(check_envelope(&id, "tools/list", &meta(MODERN), &modern_headers).is_none());
        let status = |r: Option<Response>| r.expect("refused").status().as_u16();
        // No envelope, another version, headers that disagree with the body.
        assert_eq!(
            status(check_envelope(
                &id,
                "tools/list",
                &json!({}),
                &modern_headers
            )),
            400
        );
        assert_eq!(
            status(check_envelope(
                &id,
                "tools/list",
                &meta("2099-01-01"),
                &HeaderMap::new()
            )),
            400
        );
        assert_eq!(
            status(check_envelope(
                &id,
                "tools/call",
                &meta(MODERN),
                &modern_headers
            )),
            400
        );
        let call = json!({"name": "top", "_meta": {META_VERSION: MODERN, META_CAPABILITIES: {}}});
        let named = headers(&[("mcp-method", "tools/call"), ("mcp-name", "usage_summary")]);
        assert_eq!(
            status(check_envelope(&id, "tools/call", &call, &named)),
            400
        );
        let result = modern(json!({"tools": []}));
        assert_eq!(result["resultType"], "complete");
        assert_eq!(
            result["_meta"]["io.modelcontextprotocol/serverInfo"]["name"],
            "tally"
        );
    }

    #[test]
    fn origins_of_other_hosts_are_foreign() {
        let with = |origin: Option<&str>| {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, "tally.example:8081".parse().unwrap());
            if let Some(o) = origin {
                h.insert(header::ORIGIN, o.parse().unwrap());
            }
            foreign_origin(&h)
        };
        assert!(!with(None));
        assert!(!with(Some("http://tally.example:8081")));
        assert!(with(Some("https://evil.example")));
        assert!(with(Some("null")));
    }
}
