//! Source-control webhook receivers: `POST /v1/webhooks/github/{tenant}` (`pull_request`
//! and `push`, signed with `X-Hub-Signature-256`) and `POST /v1/webhooks/gitlab/{tenant}`
//! (merge request and push hooks, with `X-Gitlab-Token`), each checked against the tenant's
//! integration secret ([`crate::control::integrations`]).
//!
//! A verified delivery becomes one `pull_request.changed` or `branch.pushed` event on the
//! metrics topic, with an id derived from the signed body (a provider's redelivery is the same
//! bytes), so a redelivery — or a captured delivery replayed — is the same event and the
//! projector counts it once. Anything not verified is refused with 401
//! and records nothing (the same answer whether or not the tenant exists or has the
//! integration, though a tenant without it is answered before the body is read); other event
//! kinds are acknowledged and ignored. Deliveries have a budget of their own ([`budget`]).

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, NaiveDateTime, Utc};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use shared::events::{Actor, Envelope, EventType, FieldError, Payload, Source};
use shared::repos::{normalize, private_name};
use shared::tenant::TenantId;
use uuid::Uuid;

use crate::control::integrations::{self, Sealed};
use crate::error::IngestError;
use crate::ingest::door::{append, read_limited};
use crate::ingest::sink::Batch;
use crate::ingest::storable::{check_storable, unstorable_paths};
use crate::ingest::values;
use crate::ingest::Data;
use crate::shed::{Charges, Limits, Shed};
use crate::state::AppState;

/// The largest delivery read (GitHub's pull request payloads are tens of kilobytes; it caps
/// deliveries at 25 MB, which nothing here needs).
pub const MAX_WEBHOOK_BYTES: usize = 2 * 1024 * 1024;

/// How long a delivery's body may take to arrive (GitHub and GitLab send theirs at once).
const WEBHOOK_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What deliveries may hold at once: a budget apart from the ingest doors', since anyone may
/// send one and only its signature (GitHub's, over the body) or token (GitLab's) says who.
/// Sixteen at once, four per tenant in the path, each charged its declared length (or as it
/// arrives) within `MAX_WEBHOOK_BYTES`, from before its integration is looked up until it is
/// answered.
pub fn budget() -> Shed {
    Shed::new(Limits {
        requests: 16,
        bytes: 8 * MAX_WEBHOOK_BYTES,
        tenant_requests: 4,
        tenant_bytes: 2 * MAX_WEBHOOK_BYTES,
        max_body: MAX_WEBHOOK_BYTES,
    })
}

/// Namespace of the ids derived from a delivery's signed body.
const DELIVERY_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_5b1e_2a7d_4c4e_9d1a_7a11_7a11_0003);

/// What a verified delivery asks of us.
#[derive(Debug, PartialEq)]
pub enum Delivery {
    /// An event to append, with its data.
    Event(EventType, DateTime<Utc>, Value),
    /// A kind we do not record (a ping, an issue comment…), acknowledged.
    Ignored(String),
}

pub async fn github(
    State(s): State<AppState>,
    Path(tenant): Path<String>,
    request: Request,
) -> Response {
    receive(&s, "github", &tenant, request).await
}

pub async fn gitlab(
    State(s): State<AppState>,
    Path(tenant): Path<String>,
    request: Request,
) -> Response {
    receive(&s, "gitlab", &tenant, request).await
}

async fn receive(s: &AppState, provider: &'static str, tenant: &str, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    match handle(s, provider, tenant, &parts.headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn refused() -> IngestError {
    IngestError::new(
        StatusCode::UNAUTHORIZED,
        "bad-signature",
        "Unauthorized",
        "the delivery's signature does not verify with this tenant's integration secret",
    )
}

async fn handle(
    s: &AppState,
    provider: &'static str,
    tenant: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, IngestError> {
    let tenant = Uuid::parse_str(tenant)
        .map(TenantId)
        .map_err(|_| refused())?;
    // Held from here (the integration's lookup included), so that what anyone can send is
    // bounded by the webhooks' own budget.
    let declared = s.webhooks.declared(headers);
    let _held = s.webhooks.hold(tenant, declared)?;
    // A tenant without this integration, or a GitLab delivery without its token, is refused
    // before its body is read.
    let settings = integrations::load(&s.pool, &s.config.common.secret_key, tenant, provider)
        .await
        .map_err(|e| IngestError::internal("reading the integration", e))?
        .ok_or_else(refused)?;
    if provider != "github" && !verify_gitlab(&settings.secret, headers) {
        metrics::counter!("ingest_webhooks_refused_total", "provider" => provider).increment(1);
        return Err(refused());
    }
    let mut charges = Charges::new(&s.webhooks, tenant, declared);
    let bytes = read_limited(body, MAX_WEBHOOK_BYTES, &mut charges, WEBHOOK_BODY_TIMEOUT).await?;
    if provider == "github" && !verify_github(&settings.secret, headers, &bytes) {
        metrics::counter!("ingest_webhooks_refused_total", "provider" => provider).increment(1);
        return Err(refused());
    }
    values::check(&bytes)?;
    let payload: Value = serde_json::from_slice(&bytes).map_err(|e| {
        IngestError::bad_request("malformed-json", format!("the body is not valid JSON: {e}"))
    })?;
    let delivery = match provider {
        "github" => github_delivery(header(headers, "x-github-event"), &payload, &settings),
        _ => gitlab_delivery(&payload, &settings),
    }
    .map_err(|e| IngestError::validation("the delivery cannot be recorded", vec![e]))?;
    drop(payload);
    let (event_type, at, data) = match delivery {
        Delivery::Ignored(kind) => {
            integrations::count(&s.pool, tenant, provider).await;
            return Ok((StatusCode::OK, Json(json!({"ignored": kind}))).into_response());
        }
        Delivery::Event(t, at, data) => (t, at, data),
    };
    let received = Utc::now();
    let at = within_bounds(s, event_type, at, received)?;
    // The id of what was signed: a redelivery (the same bytes) is the same event, and so is
    // a captured delivery sent again under another delivery id, which the signature does
    // not cover.
    let digest = hex::encode(Sha256::digest(&bytes));
    let id = Uuid::new_v5(
        &DELIVERY_NAMESPACE,
        format!("{}\0{provider}\0{digest}", tenant.0).as_bytes(),
    );
    let envelope = Envelope {
        id,
        tenant_id: tenant,
        event_type,
        schema_version: event_type.current_version(),
        occurred_at: at,
        received_at: received,
        actor: Actor::default(),
        source: Source::Webhook,
        data,
    };
    // What the database could not store is refused here, like any client's event.
    let nul = unstorable_paths(&envelope.data, "data");
    let payload = Payload::decode(
        event_type,
        envelope.schema_version,
        envelope.data.clone(),
        "data",
    )
    .map_err(|errors| IngestError::validation("the delivery cannot be recorded", errors))?;
    let unstorable: Vec<FieldError> = nul
        .into_iter()
        .chain(check_storable(&payload, "data"))
        .collect();
    if !unstorable.is_empty() {
        return Err(IngestError::validation(
            "the delivery cannot be recorded",
            unstorable,
        ));
    }
    // Only the record is held while the log acknowledges it: the body, its tree and the
    // typed payload are let go of first.
    let batch = Batch::of(vec![envelope.map_data(Data::Json)])?;
    drop((bytes, payload, charges));
    append(s, batch, "webhook").await?;
    integrations::count(&s.pool, tenant, provider).await;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"accepted": 1, "ids": [id]})),
    )
        .into_response())
}

/// A delivery's time within the doors' bounds (the retention window, the future skew), as any
/// client's event: a day far off would get a partition of its own, and one in the future
/// would stand above every later state of its branch or pull request. A push is taken when
/// it is received when its head commit's date (its author's, which may be anything) is out
/// of bounds; a pull request's time is the provider's own, and out of bounds it is a
/// delivery captured long ago or forged, refused (422 naming `occurred_at`).
fn within_bounds(
    s: &AppState,
    event_type: EventType,
    at: DateTime<Utc>,
    received: DateTime<Utc>,
) -> Result<DateTime<Utc>, IngestError> {
    let oldest = received - chrono::Duration::days(s.config.retention_days);
    let newest = received + chrono::Duration::seconds(s.config.max_future_skew_secs);
    if (oldest..=newest).contains(&at) {
        return Ok(at);
    }
    if event_type == EventType::BranchPushed {
        return Ok(received);
    }
    let reason = format!(
        "the delivery's time {} is outside the last {} days and the next {} s",
        at.to_rfc3339(),
        s.config.retention_days,
        s.config.max_future_skew_secs
    );
    Err(IngestError::validation(
        "the delivery cannot be recorded",
        vec![FieldError::new("occurred_at", reason)],
    ))
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> &'h str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim()
}

/// `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>`, compared in constant time.
pub fn verify_github(secret: &str, headers: &HeaderMap, body: &[u8]) -> bool {
    let Some(hex_sig) = header(headers, "x-hub-signature-256").strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// `X-Gitlab-Token` equal to the secret (compared as digests, in constant time).
pub fn verify_gitlab(secret: &str, headers: &HeaderMap) -> bool {
    let token = header(headers, "x-gitlab-token");
    if token.is_empty() {
        return false;
    }
    let (a, b) = (
        Sha256::digest(token.as_bytes()),
        Sha256::digest(secret.as_bytes()),
    );
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Names as the tenant stores them: plain, or salted hashes with private names.
struct Namer<'a>(Option<&'a str>);

impl Namer<'_> {
    fn repository(&self, field: &str, urls: &[Option<&str>]) -> Result<String, FieldError> {
        let name = urls
            .iter()
            .flatten()
            .find_map(|u| normalize(u))
            .ok_or_else(|| FieldError::new(field, "names no repository URL"))?;
        Ok(self.hide(name))
    }
    fn branch(&self, b: &str) -> String {
        self.hide(b.to_string())
    }
    fn hide(&self, text: String) -> String {
        match self.0 {
            Some(salt) => private_name(salt, &text),
            None => text,
        }
    }
    fn private(&self) -> bool {
        self.0.is_some()
    }
    /// A pull request's optional fields, as both providers describe them: where a fork's head
    /// branch lives, the base branch, and (unless names are private) title and URL; the author.
    fn describe(
        &self,
        d: &mut serde_json::Map<String, Value>,
        fork: Option<String>,
        base: Option<&str>,
        title: Option<&str>,
        url: Option<&str>,
        author: Option<&str>,
    ) {
        if let Some(f) = fork {
            d.insert("head_repository".into(), Value::from(self.hide(f)));
        }
        if let Some(b) = base {
            d.insert("base_branch".into(), Value::from(self.branch(b)));
        }
        if !self.private() {
            if let Some(t) = title {
                d.insert(
                    "title".into(),
                    Value::from(t.chars().take(1000).collect::<String>()),
                );
            }
            if let Some(u) = url {
                d.insert("url".into(), Value::from(u));
            }
        }
        if let Some(a) = author {
            d.insert("author".into(), Value::from(a));
        }
    }
}

fn text<'v>(v: &'v Value, pointer: &str) -> Option<&'v str> {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// A provider's time: RFC 3339, or GitLab's older `2013-12-03 17:23:34 UTC`.
fn time(v: &Value, pointer: &str) -> Option<DateTime<Utc>> {
    let s = text(v, pointer)?;
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            NaiveDateTime::parse_from_str(s.trim_end_matches(" UTC"), "%Y-%m-%d %H:%M:%S")
                .ok()
                .map(|t| t.and_utc())
        })
        .or_else(|| {
            DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S %z")
                .ok()
                .map(|t| t.with_timezone(&Utc))
        })
}

fn required<T>(v: Option<T>, field: &str) -> Result<T, FieldError> {
    v.ok_or_else(|| FieldError::new(field, "is required"))
}

/// A GitHub delivery of kind `event` (`X-GitHub-Event`).
pub fn github_delivery(event: &str, p: &Value, settings: &Sealed) -> Result<Delivery, FieldError> {
    let names = Namer(settings.repository_salt.as_deref());
    match event {
        "pull_request" => {
            let pr = required(p.get("pull_request"), "pull_request")?;
            let repository = names.repository(
                "repository.html_url",
                &[
                    text(p, "/repository/html_url"),
                    text(pr, "/base/repo/html_url"),
                ],
            )?;
            let number = required(
                pr.get("number").or(p.get("number")).and_then(Value::as_i64),
                "pull_request.number",
            )?;
            let merged = pr.get("merged").and_then(Value::as_bool) == Some(true)
                || text(pr, "/merged_at").is_some();
            let state = match (text(pr, "/state"), merged) {
                (_, true) => "merged",
                (Some("closed"), false) => "closed",
                _ => "open",
            };
            let updated_at = required(
                time(pr, "/updated_at").or_else(|| time(pr, "/created_at")),
                "pull_request.updated_at",
            )?;
            let head_repo = text(pr, "/head/repo/html_url").and_then(normalize);
            let base_repo = text(pr, "/base/repo/html_url")
                .or(text(p, "/repository/html_url"))
                .and_then(normalize);
            let fork = head_repo.filter(|h| Some(h) != base_repo.as_ref());
            let mut data = json!({
                "provider": "github",
                "repository": repository,
                "number": number,
                "action": text(p, "/action").unwrap_or("unknown"),
                "state": state,
                "head_branch": names.branch(required(text(pr, "/head/ref"), "pull_request.head.ref")?),
                "updated_at": updated_at,
            });
            let d = data.as_object_mut().expect("object");
            names.describe(
                d,
                fork,
                text(pr, "/base/ref"),
                text(pr, "/title"),
                text(pr, "/html_url"),
                text(pr, "/user/login"),
            );
            for (field, pointer) in [
                ("opened_at", "/created_at"),
                ("merged_at", "/merged_at"),
                ("closed_at", "/closed_at"),
            ] {
                if let Some(t) = time(pr, pointer) {
                    d.insert(field.into(), json!(t));
                }
            }
            for field in ["additions", "deletions"] {
                if let Some(n) = pr.get(field).and_then(Value::as_i64) {
                    d.insert(field.into(), Value::from(n));
                }
            }
            Ok(Delivery::Event(
                EventType::PullRequestChanged,
                updated_at,
                data,
            ))
        }
        "push" => {
            let Some(branch) = text(p, "/ref").and_then(|r| r.strip_prefix("refs/heads/")) else {
                return Ok(Delivery::Ignored("push of a tag".into()));
            };
            let repository = names.repository(
                "repository.html_url",
                &[text(p, "/repository/html_url"), text(p, "/repository/url")],
            )?;
            let deleted = p.get("deleted").and_then(Value::as_bool) == Some(true);
            // When GitHub took the push (`repository.pushed_at`, seconds in a push's payload);
            // else its head commit's date, which is its author's and may be anything (out of
            // the doors' bounds, the push is taken as received: `within_bounds`).
            let pushed_at = p
                .pointer("/repository/pushed_at")
                .and_then(Value::as_i64)
                .and_then(|secs| DateTime::from_timestamp(secs, 0));
            let at = pushed_at
                .or_else(|| time(p, "/head_commit/timestamp"))
                .unwrap_or_else(Utc::now);
            let mut data = json!({
                "provider": "github",
                "repository": repository,
                "branch": names.branch(branch),
                "commits": p.get("commits").and_then(Value::as_array).map_or(0, Vec::len),
                "deleted": deleted,
                "forced": p.get("forced").and_then(Value::as_bool) == Some(true),
            });
            if let Some(after) = text(p, "/after").filter(|_| !deleted) {
                data["after"] = Value::from(after);
            }
            Ok(Delivery::Event(EventType::BranchPushed, at, data))
        }
        "" => Err(FieldError::new("X-GitHub-Event", "the header is required")),
        other => Ok(Delivery::Ignored(other.chars().take(100).collect())),
    }
}

/// A GitLab delivery (its kind is the payload's `object_kind`).
pub fn gitlab_delivery(p: &Value, settings: &Sealed) -> Result<Delivery, FieldError> {
    let names = Namer(settings.repository_salt.as_deref());
    let urls = [
        text(p, "/project/web_url"),
        text(p, "/project/git_http_url"),
        text(p, "/repository/homepage"),
    ];
    match text(p, "/object_kind").unwrap_or("") {
        "merge_request" => {
            let mr = required(p.get("object_attributes"), "object_attributes")?;
            let repository = names.repository("project.web_url", &urls)?;
            let number = required(
                mr.get("iid").and_then(Value::as_i64),
                "object_attributes.iid",
            )?;
            let state = match text(mr, "/state") {
                Some("merged") => "merged",
                Some("closed") | Some("locked") => "closed",
                _ => "open",
            };
            let updated_at = required(
                time(mr, "/updated_at").or_else(|| time(mr, "/created_at")),
                "object_attributes.updated_at",
            )?;
            let mut data = json!({
                "provider": "gitlab",
                "repository": repository,
                "number": number,
                "action": text(mr, "/action").unwrap_or("unknown"),
                "state": state,
                "head_branch": names.branch(required(text(mr, "/source_branch"), "object_attributes.source_branch")?),
                "updated_at": updated_at,
            });
            let d = data.as_object_mut().expect("object");
            let source = text(mr, "/source/web_url").and_then(normalize);
            let target = text(mr, "/target/web_url").and_then(normalize);
            let fork = source.filter(|s| target.is_some_and(|t| *s != t));
            names.describe(
                d,
                fork,
                text(mr, "/target_branch"),
                text(mr, "/title"),
                text(mr, "/url"),
                text(p, "/user/username"),
            );
            if let Some(t) = time(mr, "/created_at") {
                d.insert("opened_at".into(), json!(t));
            }
            // GitLab's hook names no merge or close time of its own: they are the update of
            // the `merge` or `close` action (the projector keeps the earliest merge).
            let action = text(mr, "/action").unwrap_or("");
            let merged_at = time(mr, "/merged_at")
                .or((state == "merged" && action == "merge").then_some(updated_at));
            if let Some(t) = merged_at {
                d.insert("merged_at".into(), json!(t));
            }
            let closed_at = time(mr, "/closed_at")
                .or((state == "closed" && action == "close").then_some(updated_at));
            if let Some(t) = closed_at {
                d.insert("closed_at".into(), json!(t));
            }
            Ok(Delivery::Event(
                EventType::PullRequestChanged,
                updated_at,
                data,
            ))
        }
        "push" => {
            let Some(branch) = text(p, "/ref").and_then(|r| r.strip_prefix("refs/heads/")) else {
                return Ok(Delivery::Ignored("push of a tag".into()));
            };
            let repository = names.repository("project.web_url", &urls)?;
            let after = text(p, "/after").unwrap_or("");
            let deleted = !after.is_empty() && after.chars().all(|c| c == '0');
            let mut data = json!({
                "provider": "gitlab",
                "repository": repository,
                "branch": names.branch(branch),
                "commits": p.get("total_commits_count").and_then(Value::as_i64).unwrap_or(0),
                "deleted": deleted,
            });
            if !after.is_empty() && !deleted {
                data["after"] = Value::from(after);
            }
            Ok(Delivery::Event(EventType::BranchPushed, Utc::now(), data))
        }
        "" => Err(FieldError::new("object_kind", "is required")),
        other => Ok(Delivery::Ignored(other.chars().take(100).collect())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain() -> Sealed {
        Sealed {
            secret: "s".repeat(20),
            repository_salt: None,
        }
    }

    fn github_pr(state: &str, merged: bool) -> Value {
        json!({
            "action": if merged { "closed" } else { "opened" },
            "number": 7,
            "pull_request": {
                "number": 7, "state": state, "merged": merged, "title": "Add widgets",
                "html_url": "https://github.com/Acme/Widgets/pull/7",
                "user": {"login": "octo"},
                "created_at": "2026-11-30T10:00:00Z", "updated_at": "2026-12-01T10:00:00Z",
                "closed_at": if merged { json!("2026-12-01T10:00:00Z") } else { Value::Null },
                "merged_at": if merged { json!("2026-12-01T10:00:00Z") } else { Value::Null },
                "head": {"ref": "feature/x"}, "base": {"ref": "main"},
                "additions": 120, "deletions": 4
            },
            "repository": {"full_name": "Acme/Widgets", "html_url": "https://github.com/Acme/Widgets"}
        })
    }

    #[test]
    fn a_merged_github_pull_request_becomes_one_event() {
        let Delivery::Event(t, at, d) =
            github_delivery("pull_request", &github_pr("closed", true), &plain()).unwrap()
        else {
            panic!("not recorded")
        };
        assert_eq!(t, EventType::PullRequestChanged);
        assert_eq!(at.to_rfc3339(), "2026-12-01T10:00:00+00:00");
        assert_eq!(d["repository"], "github.com/acme/widgets");
        assert_eq!(d["state"], "merged");
        assert_eq!(d["head_branch"], "feature/x");
        assert_eq!(d["additions"], 120);
        Payload::decode(t, 1, d, "data").expect("a valid event");
    }

    #[test]
    fn a_fork_names_where_its_head_branch_lives() {
        let mut pr = github_pr("open", false);
        pr["pull_request"]["head"]["repo"] =
            json!({"html_url": "https://github.com/someone/widgets"});
        pr["pull_request"]["base"]["repo"] = json!({"html_url": "https://github.com/acme/widgets"});
        let Delivery::Event(_, _, d) = github_delivery("pull_request", &pr, &plain()).unwrap()
        else {
            panic!("not recorded")
        };
        assert_eq!(d["repository"], "github.com/acme/widgets");
        assert_eq!(d["head_repository"], "github.com/someone/widgets");
        let Delivery::Event(_, _, own) =
            github_delivery("pull_request", &github_pr("open", false), &plain()).unwrap()
        else {
            panic!("not recorded")
        };
        assert!(own.get("head_repository").is_none());
    }

    #[test]
    fn private_names_hide_repository_branch_and_title() {
        let salted = Sealed {
            secret: "s".repeat(20),
            repository_salt: Some("pepper".into()),
        };
        let Delivery::Event(_, _, d) =
            github_delivery("pull_request", &github_pr("open", false), &salted).unwrap()
        else {
            panic!("not recorded")
        };
        assert_eq!(
            d["repository"],
            private_name("pepper", "github.com/acme/widgets")
        );
        assert_eq!(d["head_branch"], private_name("pepper", "feature/x"));
        assert!(d.get("title").is_none() && d.get("url").is_none());
    }

    #[test]
    fn signatures_are_checked() {
        let body = br#"{"a":1}"#;
        let mut mac = Hmac::<Sha256>::new_from_slice(b"topsecret-topsecret").unwrap();
        mac.update(body);
        let good = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        let mut h = HeaderMap::new();
        h.insert("x-hub-signature-256", good.parse().unwrap());
        assert!(verify_github("topsecret-topsecret", &h, body));
        assert!(!verify_github("topsecret-topsecreT", &h, body));
        assert!(!verify_github("topsecret-topsecret", &h, br#"{"a":2}"#));
        assert!(!verify_github(
            "topsecret-topsecret",
            &HeaderMap::new(),
            body
        ));
        let mut g = HeaderMap::new();
        g.insert("x-gitlab-token", "topsecret-topsecret".parse().unwrap());
        assert!(verify_gitlab("topsecret-topsecret", &g));
        assert!(!verify_gitlab("other-other-other", &g));
        assert!(!verify_gitlab("topsecret-topsecret", &HeaderMap::new()));
    }

    #[test]
    fn gitlab_merge_requests_and_pushes() {
        let mr = json!({
            "object_kind": "merge_request",
            "user": {"username": "dev"},
            "project": {"web_url": "https://gitlab.example.com/group/app"},
            "object_attributes": {
                "iid": 3, "state": "merged", "action": "merge", "source_branch": "fix",
                "target_branch": "main", "title": "Fix", "created_at": "2026-11-30 10:00:00 UTC",
                "updated_at": "2026-12-01 11:00:00 UTC"
            }
        });
        let Delivery::Event(_, _, d) = gitlab_delivery(&mr, &plain()).unwrap() else {
            panic!("not recorded")
        };
        assert_eq!(d["repository"], "gitlab.example.com/group/app");
        assert_eq!(d["state"], "merged");
        assert_eq!(d["merged_at"], "2026-12-01T11:00:00Z");
        let push = json!({"object_kind": "push", "ref": "refs/heads/fix",
            "after": "0000000000000000000000000000000000000000", "total_commits_count": 0,
            "project": {"web_url": "https://gitlab.example.com/group/app"}});
        let Delivery::Event(t, _, d) = gitlab_delivery(&push, &plain()).unwrap() else {
            panic!("not recorded")
        };
        assert_eq!(t, EventType::BranchPushed);
        assert_eq!(d["deleted"], true);
        assert!(matches!(
            gitlab_delivery(&json!({"object_kind": "note"}), &plain()),
            Ok(Delivery::Ignored(_))
        ));
        assert!(gitlab_delivery(&json!({}), &plain()).is_err());
    }
}
