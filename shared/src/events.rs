//! The event contract: the envelope every fact travels in, the typed payloads of the metric
//! event types, their limits, and the one validation path that both ingest-api (to answer the
//! client) and the projector (to dead-letter what slipped through) use.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::tenant::TenantId;

/// Topic of the metric events.
pub const METRICS_TOPIC: &str = "tally.metrics.v1";
/// Suffix of a topic's dead-letter topic.
pub const DLQ_SUFFIX: &str = ".dlq";

/// Longest accepted identifier or name (user ids, command names, …).
pub const MAX_NAME_LEN: usize = 255;
/// Longest accepted error message.
pub const MAX_ERROR_MESSAGE_LEN: usize = 10_000;
/// Longest accepted duration: one hour.
pub const MAX_DURATION_MS: i64 = 3_600_000;
/// Most tokens one interaction may report in each direction.
pub const MAX_TOKENS: i64 = 1_000_000;
/// Most labels on one `metric.sample`.
pub const MAX_LABELS: usize = 64;
/// Most agents a `session.ended` may list in `agents_used`.
pub const MAX_AGENTS_USED: usize = 100;
/// Longest accepted label value, in characters.
pub const MAX_LABEL_VALUE_LEN: usize = 1024;
/// Topic of auth and control-plane events.
pub const AUTH_TOPIC: &str = "tally.auth.v1";

/// The event types this version of Tally understands: the metric types clients send, and the
/// auth and control-plane types only the server writes (through the outbox).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, PartialOrd, Ord)]
#[serde(try_from = "String")]
pub enum EventType {
    CommandExecuted,
    AgentInteracted,
    ToolExecuted,
    SessionStarted,
    SessionEnded,
    /// Where a session is working (repository, branch), from the hook.
    SessionContext,
    ProductivityRecorded,
    MetricSample,
    /// A pull (merge) request as a source-control webhook described it; written by the
    /// server's webhook receivers only.
    PullRequestChanged,
    /// A push to a branch, from a source-control webhook; server-written like the above.
    BranchPushed,
    Auth(AuthKind),
}

impl TryFrom<String> for EventType {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        EventType::parse(&s).ok_or_else(|| format!("unknown event type `{s}`"))
    }
}

/// Written as its name, without the `String` a serde `into` would allocate per event.
impl Serialize for EventType {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// Auth and control-plane event types (topic `tally.auth.v1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AuthKind {
    LoginSucceeded,
    LoginFailed,
    TokenRefreshed,
    RefreshReuseDetected,
    LoggedOut,
    PasswordChanged,
    SsoLogin,
    ApiKeyCreated,
    ApiKeyRevoked,
    TenantCreated,
    TenantDeactivated,
    UserCreated,
    UserUpdated,
    UserDeactivated,
    TeamChanged,
    /// A tenant's single sign-on settings were changed (by an owner).
    SsoSettingsChanged,
    /// A control-plane change or an SSO account link was refused for lack of rights.
    AccessDenied,
    /// A budget was created, changed or deleted, or the tenant's time zone changed.
    BudgetChanged,
    /// A notification channel was created, changed, paused, resumed or deleted, its secret
    /// rotated, or a delivery sent again.
    ChannelChanged,
    /// An alert rule was created, changed or deleted.
    RuleChanged,
    /// A source-control integration (GitHub, GitLab webhook secret) was set or removed.
    IntegrationChanged,
    /// The tenant's privacy settings changed: privacy mode, its group size, whether owners
    /// and admins see individuals, whether prompt text or command arguments are stored.
    PrivacyChanged,
    /// Someone read another person's individual data (privacy mode): who is the actor,
    /// whose is `target`, what is `detail`.
    IndividualRead,
    /// An invitation was made or taken back (`detail` says which; `target` is
    /// `invitation:{id}`, `email` whom it invites).
    InvitationChanged,
    /// A deactivated person was removed for good: their control-plane records are erased, and
    /// the snapshot (`extra.user`) is a tombstone, status `removed`, with no address.
    UserRemoved,
}

impl AuthKind {
    pub const ALL: [AuthKind; 25] = [
        AuthKind::LoginSucceeded,
        AuthKind::LoginFailed,
        AuthKind::TokenRefreshed,
        AuthKind::RefreshReuseDetected,
        AuthKind::LoggedOut,
        AuthKind::PasswordChanged,
        AuthKind::SsoLogin,
        AuthKind::ApiKeyCreated,
        AuthKind::ApiKeyRevoked,
        AuthKind::TenantCreated,
        AuthKind::TenantDeactivated,
        AuthKind::UserCreated,
        AuthKind::UserUpdated,
        AuthKind::UserDeactivated,
        AuthKind::TeamChanged,
        AuthKind::SsoSettingsChanged,
        AuthKind::AccessDenied,
        AuthKind::BudgetChanged,
        AuthKind::ChannelChanged,
        AuthKind::RuleChanged,
        AuthKind::IntegrationChanged,
        AuthKind::PrivacyChanged,
        AuthKind::IndividualRead,
        AuthKind::InvitationChanged,
        AuthKind::UserRemoved,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuthKind::LoginSucceeded => "auth.login_succeeded",
            AuthKind::LoginFailed => "auth.login_failed",
            AuthKind::TokenRefreshed => "auth.token_refreshed",
            AuthKind::RefreshReuseDetected => "auth.refresh_reuse_detected",
            AuthKind::LoggedOut => "auth.logged_out",
            AuthKind::PasswordChanged => "auth.password_changed",
            AuthKind::SsoLogin => "auth.sso_login",
            AuthKind::ApiKeyCreated => "auth.api_key_created",
            AuthKind::ApiKeyRevoked => "auth.api_key_revoked",
            AuthKind::TenantCreated => "tenant.created",
            AuthKind::TenantDeactivated => "tenant.deactivated",
            AuthKind::UserCreated => "user.created",
            AuthKind::UserUpdated => "user.updated",
            AuthKind::UserDeactivated => "user.deactivated",
            AuthKind::TeamChanged => "team.changed",
            AuthKind::SsoSettingsChanged => "auth.sso_settings_changed",
            AuthKind::AccessDenied => "auth.access_denied",
            AuthKind::BudgetChanged => "budget.changed",
            AuthKind::ChannelChanged => "channel.changed",
            AuthKind::RuleChanged => "rule.changed",
            AuthKind::IntegrationChanged => "integration.changed",
            AuthKind::PrivacyChanged => "privacy.changed",
            AuthKind::IndividualRead => "privacy.individual_read",
            AuthKind::InvitationChanged => "invitation.changed",
            AuthKind::UserRemoved => "user.removed",
        }
    }
}

/// The payload of every auth and control-plane event.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthEvent {
    /// The person the event is about (or who acted), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// The client address of the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// What the event concerns besides the user (an API key id, a refresh-token family, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// A short human reason (why a login failed, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extra: Object,
}

impl EventType {
    /// The types clients send.
    pub const ALL: [EventType; 8] = [
        EventType::CommandExecuted,
        EventType::AgentInteracted,
        EventType::ToolExecuted,
        EventType::SessionStarted,
        EventType::SessionEnded,
        EventType::SessionContext,
        EventType::ProductivityRecorded,
        EventType::MetricSample,
    ];

    /// The types only the server's own receivers write to the metrics topic.
    pub const SERVER_WRITTEN: [EventType; 2] =
        [EventType::PullRequestChanged, EventType::BranchPushed];

    /// The dotted wire name, e.g. `command.executed`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::CommandExecuted => "command.executed",
            EventType::AgentInteracted => "agent.interacted",
            EventType::ToolExecuted => "tool.executed",
            EventType::SessionStarted => "session.started",
            EventType::SessionEnded => "session.ended",
            EventType::SessionContext => "session.context",
            EventType::ProductivityRecorded => "productivity.recorded",
            EventType::MetricSample => "metric.sample",
            EventType::PullRequestChanged => "pull_request.changed",
            EventType::BranchPushed => "branch.pushed",
            EventType::Auth(k) => k.as_str(),
        }
    }

    pub fn parse(s: &str) -> Option<EventType> {
        EventType::ALL
            .into_iter()
            .chain(EventType::SERVER_WRITTEN)
            .find(|t| t.as_str() == s)
            .or_else(|| {
                AuthKind::ALL
                    .into_iter()
                    .find(|k| k.as_str() == s)
                    .map(EventType::Auth)
            })
    }

    /// Whether the type travels on the metrics topic (auth and control events have their
    /// own).
    pub fn is_metric(self) -> bool {
        !matches!(self, EventType::Auth(_))
    }

    /// Whether clients may send this type: auth and control events, and what the
    /// source-control webhooks report, are written by the server only.
    pub fn from_clients(self) -> bool {
        EventType::ALL.contains(&self)
    }

    /// The newest schema version of this type; older versions are upcast on decode.
    pub fn current_version(self) -> u32 {
        match self {
            // v2 (2026-11): `model`, `cost_usd` and the cache token counts became fields
            // of their own; v1 senders put them in `metadata` (see `upcast`).
            EventType::AgentInteracted => 2,
            _ => 1,
        }
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who sent an event.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Actor {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_id: Option<Uuid>,
}

/// Which door an event came in by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Api,
    Hook,
    Otlp,
    PromRw,
    Influx,
    Control,
    /// A source-control webhook (GitHub, GitLab).
    Webhook,
}

/// One event as it is stored in Kafka: the contract between the write and the read side.
/// Its `data` is read as JSON (`Value`); a writer may hold it in any form that serializes
/// as that JSON (ingest-api holds the typed [`Payload`] of most events it stamps).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<D = Value> {
    pub id: Uuid,
    pub tenant_id: TenantId,
    #[serde(rename = "type")]
    pub event_type: EventType,
    pub schema_version: u32,
    #[serde(
        serialize_with = "crate::rfc3339::serialize",
        deserialize_with = "crate::rfc3339::deserialize"
    )]
    pub occurred_at: DateTime<Utc>,
    #[serde(
        serialize_with = "crate::rfc3339::serialize",
        deserialize_with = "crate::rfc3339::deserialize"
    )]
    pub received_at: DateTime<Utc>,
    pub actor: Actor,
    pub source: Source,
    pub data: D,
}

/// An envelope's `data` in whatever form its writer holds it.
pub trait EventData {
    /// What spreads a tenant's events over the partitions (see [`Envelope::kafka_key`]):
    /// the first of `session_id`, `user_id`, `name` and `target` that the data's JSON has
    /// as a string, appended to `out`.
    fn write_spread(&self, out: &mut String);
}

/// The top-level fields whose text spreads a tenant's events, in the order they are looked for.
const SPREAD_FIELDS: [&str; 4] = ["session_id", "user_id", "name", "target"];

impl EventData for Value {
    fn write_spread(&self, out: &mut String) {
        if let Some(s) = SPREAD_FIELDS
            .iter()
            .find_map(|k| self.get(*k).and_then(Value::as_str))
        {
            out.push_str(s);
        }
    }
}

impl EventData for Payload {
    /// As the payload's JSON ([`Payload::to_value`]) spreads, read from its fields.
    fn write_spread(&self, out: &mut String) {
        use std::fmt::Write as _;
        let text = match self {
            Payload::CommandExecuted(p) => Some(p.session_id.as_deref().unwrap_or(&p.user_id)),
            Payload::AgentInteracted(p) => Some(p.session_id.as_deref().unwrap_or(&p.user_id)),
            Payload::ToolExecuted(p) => Some(p.session_id.as_str()),
            Payload::SessionStarted(p) => Some(p.session_id.as_str()),
            Payload::SessionEnded(p) => Some(p.session_id.as_str()),
            Payload::SessionContext(p) => Some(p.session_id.as_str()),
            Payload::ProductivityRecorded(p) => p.user_id.as_deref(),
            Payload::MetricSample(p) => Some(p.name.as_str()),
            Payload::PullRequestChanged(_) | Payload::BranchPushed(_) => None,
            Payload::Auth(_, p) => match p.user_id {
                Some(id) => {
                    let _ = write!(out, "{id}");
                    None
                }
                None => p.target.as_deref(),
            },
        };
        if let Some(text) = text {
            out.push_str(text);
        }
    }
}

impl<D> Envelope<D> {
    /// The same envelope with its `data` in another form.
    pub fn map_data<E>(self, f: impl FnOnce(D) -> E) -> Envelope<E> {
        Envelope {
            id: self.id,
            tenant_id: self.tenant_id,
            event_type: self.event_type,
            schema_version: self.schema_version,
            occurred_at: self.occurred_at,
            received_at: self.received_at,
            actor: self.actor,
            source: self.source,
            data: f(self.data),
        }
    }
}

impl<D: EventData> Envelope<D> {
    /// The record key: the tenant plus a component that keeps one session's (or user's) events
    /// in order on one partition while spreading a large tenant over all of them.
    pub fn kafka_key(&self) -> String {
        let mut key = String::new();
        self.write_kafka_key(&mut key);
        key
    }

    /// [`Envelope::kafka_key`], appended to `out`.
    pub fn write_kafka_key(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = write!(out, "{}:", self.tenant_id);
        self.data.write_spread(out);
    }
}

impl Envelope {
    /// Decodes (and upcasts) the payload. The projector calls this on every record.
    pub fn payload(&self) -> Result<Payload, Vec<FieldError>> {
        Payload::decode_ref(self.event_type, self.schema_version, &self.data, "data")
    }
}

/// Whether a record may hold the envelope of one of `tenants`, told without decoding it
/// whole, for a replay of some tenants to skip the others' records cheaply. `false` only for
/// a record whose whole decode (as [`Envelope`]) fails or names a tenant not in `tenants`:
/// one with no payload, or whose envelope is an object whose first top-level `tenant_id`
/// names another tenant (a second `tenant_id` fails the whole decode). Anything else — an
/// array, an object without a readable `tenant_id` — is left to the whole decode. A key that
/// names one of `tenants` (ingest-api keys each record `{tenant}:…`) spares that record the
/// partial read; a key never makes it `false`. The fuzz target `replay_filter` checks it
/// against the whole decode.
pub fn may_belong_to(
    tenants: &HashSet<TenantId>,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
) -> bool {
    let keyed = key
        .and_then(|k| k.get(..36))
        .and_then(|k| Uuid::try_parse_ascii(k).ok());
    if keyed.is_some_and(|t| tenants.contains(&TenantId(t))) {
        return true;
    }
    let Some(payload) = payload else {
        return false;
    };
    first_tenant_id(payload).is_none_or(|t| tenants.contains(&t))
}

/// The first top-level `tenant_id` of a JSON object, read up to it and no further; `None`
/// if the text is not an object or no `tenant_id` could be read before anything
/// unreadable.
fn first_tenant_id(payload: &[u8]) -> Option<TenantId> {
    use serde::de::{Deserializer as _, IgnoredAny, MapAccess, Visitor};
    /// Whether a key is `tenant_id`, compared where serde_json holds it (no copy).
    struct IsTenantId(bool);
    impl<'de> Deserialize<'de> for IsTenantId {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Key;
            impl Visitor<'_> for Key {
                type Value = IsTenantId;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a field name")
                }
                fn visit_str<E>(self, v: &str) -> Result<IsTenantId, E> {
                    Ok(IsTenantId(v == "tenant_id"))
                }
            }
            d.deserialize_identifier(Key)
        }
    }
    struct First<'a>(&'a mut Option<TenantId>);
    impl<'de> Visitor<'de> for First<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an envelope")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(IsTenantId(is)) = map.next_key()? {
                if is {
                    *self.0 = Some(map.next_value()?);
                    return Ok(());
                }
                map.next_value::<IgnoredAny>()?;
            }
            Ok(())
        }
    }
    let mut found = None;
    // Stopping inside the object is an error to serde_json (it expects the object's end):
    // what was read before it is what counts.
    let _ = serde_json::Deserializer::from_slice(payload).deserialize_map(First(&mut found));
    found
}

/// One offending field of a rejected event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    /// Index of the event in the request's batch (absent for a single event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// Path of the field, e.g. `data.duration_ms`.
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            index: None,
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Outcome of a command or interaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Success,
    Error,
    Timeout,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Success => "success",
            Status::Error => "error",
            Status::Timeout => "timeout",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn is_error(self) -> bool {
        self != Status::Success
    }
}

/// The productivity metrics a client may record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProductivityMetric {
    CommandsPerHour,
    ErrorRate,
    SessionDuration,
    ProductivityScore,
    CodeQualityScore,
    ResponseTime,
    TaskCompletionTime,
    AgentUsageFrequency,
}

impl ProductivityMetric {
    pub fn as_str(self) -> &'static str {
        match self {
            ProductivityMetric::CommandsPerHour => "commands_per_hour",
            ProductivityMetric::ErrorRate => "error_rate",
            ProductivityMetric::SessionDuration => "session_duration",
            ProductivityMetric::ProductivityScore => "productivity_score",
            ProductivityMetric::CodeQualityScore => "code_quality_score",
            ProductivityMetric::ResponseTime => "response_time",
            ProductivityMetric::TaskCompletionTime => "task_completion_time",
            ProductivityMetric::AgentUsageFrequency => "agent_usage_frequency",
        }
    }
}

/// The kind of a `metric.sample`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SampleKind {
    #[default]
    Gauge,
    Counter,
    Histogram,
    Summary,
}

type Object = Map<String, Value>;

/// `command.executed`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandExecuted {
    pub user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    pub command_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Object>,
    pub duration_ms: i64,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Object>,
    /// Fields this version does not know, kept rather than dropped.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extra: Object,
}

/// `agent.interacted`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentInteracted {
    pub user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_event_id: Option<Uuid>,
    pub agent_name: String,
    pub interaction_type: String,
    #[serde(default)]
    pub input_tokens: i64,
    #[serde(default)]
    pub output_tokens: i64,
    /// Input tokens read from the prompt cache (v2).
    #[serde(default)]
    pub cache_read_tokens: i64,
    /// Input tokens written to the prompt cache (v2).
    #[serde(default)]
    pub cache_creation_tokens: i64,
    /// The model that answered (v2; v1 had it in `metadata.model`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// What the interaction cost in US dollars (v2; v1 had it in `metadata.cost_usd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    pub duration_ms: i64,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Object>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extra: Object,
}

/// `tool.executed` — what Claude Code's PostToolUse hooks send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolExecuted {
    pub user_id: String,
    pub session_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    pub tool_name: String,
    pub duration_ms: i64,
    pub success: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Object>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extra: Object,
}

/// `session.started`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionStarted {
    pub session_id: String,
    pub user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Object>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extra: Object,
}

/// `session.ended`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionEnded {
    pub session_id: String,
    pub user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Object>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commands_executed: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents_used: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub productivity_score: Option<f64>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extra: Object,
}

/// `session.context` — where a session is working. The hook sends one when the session
/// starts and whenever its working directory's repository or branch changes; the session's
/// agent usage from then on is attributed to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionContext {
    pub session_id: String,
    pub user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    /// The repository: a remote URL or `host/owner/name` (stored normalised, see
    /// [`crate::repos::normalize`]), or `sha256:<hex>` when names are kept private. Absent
    /// outside a repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// The working directory relative to the repository's root (only when paths are sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<String>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extra: Object,
}

/// `pull_request.changed` — a pull request (GitHub) or merge request (GitLab) as its
/// webhook described it, in the provider's neutral form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullRequestChanged {
    /// `github` or `gitlab`.
    pub provider: String,
    /// `host/owner/name` (or its salted hash, as the tenant's hooks send it).
    pub repository: String,
    pub number: i64,
    /// What happened: the provider's action (opened, closed, synchronize, merge…).
    pub action: String,
    /// `open`, `closed` or `merged`.
    pub state: String,
    pub head_branch: String,
    /// Where the head branch lives when it is not `repository` (a fork).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_repository: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opened_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_at: Option<DateTime<Utc>>,
    /// When the provider last changed it: a newer description replaces an older one.
    pub updated_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub additions: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletions: Option<i64>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extra: Object,
}

/// `branch.pushed` — commits pushed to a branch, from a source-control webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BranchPushed {
    pub provider: String,
    pub repository: String,
    pub branch: String,
    /// The branch's commit after the push (absent when it was deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    #[serde(default)]
    pub commits: i64,
    #[serde(default)]
    pub deleted: bool,
    #[serde(default)]
    pub forced: bool,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extra: Object,
}

/// `productivity.recorded`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductivityRecorded {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    pub metric_type: ProductivityMetric,
    pub value: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<Object>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extra: Object,
}

/// `metric.sample` — what OTLP, Prometheus remote write and line protocol become.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricSample {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub value: f64,
    #[serde(default)]
    pub kind: SampleKind,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extra: Object,
}

impl MetricSample {
    /// The sample's normalized form, [`Payload::to_value`]'s, built from its own parts
    /// rather than copies of them: an OTLP point, built typed by ingest-api, becomes its
    /// envelope's `data` this way.
    pub fn into_value(self) -> Value {
        let labels = self
            .labels
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect();
        let mut data = Map::new();
        data.insert("name".into(), Value::String(self.name));
        data.insert("labels".into(), Value::Object(labels));
        data.insert("value".into(), Value::from(self.value));
        data.insert("kind".into(), Value::from(self.kind.as_str()));
        if !self.extra.is_empty() {
            data.insert("extra".into(), Value::Object(self.extra));
        }
        Value::Object(data)
    }
}

impl SampleKind {
    /// As it is written in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            SampleKind::Gauge => "gauge",
            SampleKind::Counter => "counter",
            SampleKind::Histogram => "histogram",
            SampleKind::Summary => "summary",
        }
    }
}

/// A decoded, validated payload.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    CommandExecuted(CommandExecuted),
    AgentInteracted(AgentInteracted),
    ToolExecuted(ToolExecuted),
    SessionStarted(SessionStarted),
    SessionEnded(SessionEnded),
    SessionContext(SessionContext),
    ProductivityRecorded(ProductivityRecorded),
    MetricSample(MetricSample),
    PullRequestChanged(PullRequestChanged),
    BranchPushed(BranchPushed),
    Auth(AuthKind, AuthEvent),
}

/// A payload serializes as its data alone (the envelope carries its type).
impl Serialize for Payload {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Payload::CommandExecuted(p) => p.serialize(s),
            Payload::AgentInteracted(p) => p.serialize(s),
            Payload::ToolExecuted(p) => p.serialize(s),
            Payload::SessionStarted(p) => p.serialize(s),
            Payload::SessionEnded(p) => p.serialize(s),
            Payload::SessionContext(p) => p.serialize(s),
            Payload::ProductivityRecorded(p) => p.serialize(s),
            Payload::MetricSample(p) => p.serialize(s),
            Payload::PullRequestChanged(p) => p.serialize(s),
            Payload::BranchPushed(p) => p.serialize(s),
            Payload::Auth(_, p) => p.serialize(s),
        }
    }
}

/// Field names of each payload type, so unknown fields can be moved into `extra`.
fn known_fields(t: EventType) -> &'static [&'static str] {
    match t {
        EventType::CommandExecuted => fields_of::<CommandExecuted>(),
        EventType::AgentInteracted => fields_of::<AgentInteracted>(),
        EventType::ToolExecuted => fields_of::<ToolExecuted>(),
        EventType::SessionStarted => fields_of::<SessionStarted>(),
        EventType::SessionEnded => fields_of::<SessionEnded>(),
        EventType::SessionContext => fields_of::<SessionContext>(),
        EventType::ProductivityRecorded => fields_of::<ProductivityRecorded>(),
        EventType::MetricSample => fields_of::<MetricSample>(),
        EventType::PullRequestChanged => fields_of::<PullRequestChanged>(),
        EventType::BranchPushed => fields_of::<BranchPushed>(),
        EventType::Auth(_) => fields_of::<AuthEvent>(),
    }
}

/// The field names serde's derive gave struct `T`, read by letting `T` deserialize from a
/// deserializer that only records them (no allocation), so the list cannot drift from the
/// struct.
fn fields_of<T: DeserializeOwned>() -> &'static [&'static str] {
    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("field names read")
        }
    }
    impl std::error::Error for Stop {}
    impl serde::de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Stop {
            Stop
        }
    }
    struct Fields(&'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for &mut Fields {
        type Error = Stop;
        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            self.0 = fields;
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut found = Fields(&[]);
    let _ = T::deserialize(&mut found);
    found.0
}

/// Brings `data` of an older schema version to the current one, one version at a time.
/// The log keeps events as they were written; the projector decodes every record through
/// here, so old events project exactly like new ones.
fn upcast(t: EventType, version: u32, obj: &mut Map<String, Value>) {
    if t == EventType::AgentInteracted && version < 2 {
        // v1 → v2: `metadata.{model, cost_usd, cache_read_tokens, cache_creation_tokens}`
        // became top-level fields. A v1 value that does not fit the v2 field stays in
        // `metadata`, untouched.
        let Some(Value::Object(meta)) = obj.get_mut("metadata") else {
            return;
        };
        let mut moved = Vec::new();
        for (field, fits) in [
            ("model", Value::is_string as fn(&Value) -> bool),
            ("cost_usd", Value::is_number),
            ("cache_read_tokens", Value::is_i64),
            ("cache_creation_tokens", Value::is_i64),
        ] {
            if meta.get(field).is_some_and(fits) {
                moved.push((field, meta.remove(field).expect("present")));
            }
        }
        for (field, v) in moved {
            obj.entry(field).or_insert(v);
        }
    }
}

impl Payload {
    /// Decodes `data` of the given type and version: upcasts old versions, keeps unknown
    /// fields in `extra`, and checks every limit. `prefix` names the data field in errors.
    pub fn decode(
        t: EventType,
        version: u32,
        data: Value,
        prefix: &str,
    ) -> Result<Payload, Vec<FieldError>> {
        Payload::decode_as_needed(t, version, Cow::Owned(data), prefix).map(|(p, _)| p)
    }

    /// [`Payload::decode`], and the payload's normalized form ([`Payload::to_value`]): the
    /// write side's envelope carries it. Most clients' `data` already is that form, upcast
    /// and with unknown fields moved into `extra` in place: then it is kept as it came,
    /// rather than built again from the payload and the client's copy dropped.
    pub fn decode_normalized(
        t: EventType,
        version: u32,
        data: Value,
        prefix: &str,
    ) -> Result<(Payload, Value), Vec<FieldError>> {
        let (payload, data) = Payload::decode_as_needed(t, version, Cow::Owned(data), prefix)?;
        let data = data.into_owned();
        let form = if payload.is_written_as(&data) {
            debug_assert_eq!(payload.to_value(), data);
            data
        } else {
            payload.to_value()
        };
        Ok((payload, form))
    }

    /// [`Payload::decode`] of a borrowed `data` (an envelope's, as ingest-api wrote it),
    /// copied only if it has to change.
    pub fn decode_ref(
        t: EventType,
        version: u32,
        data: &Value,
        prefix: &str,
    ) -> Result<Payload, Vec<FieldError>> {
        Payload::decode_as_needed(t, version, Cow::Borrowed(data), prefix).map(|(p, _)| p)
    }

    /// Decodes `data`, changing it (in place when it is owned, in a copy when it is
    /// borrowed) only where it has to: an old version is upcast, unknown fields are moved
    /// into `extra`. Returns the payload and `data` as it read it.
    fn decode_as_needed<'a>(
        t: EventType,
        version: u32,
        mut data: Cow<'a, Value>,
        prefix: &str,
    ) -> Result<(Payload, Cow<'a, Value>), Vec<FieldError>> {
        if version == 0 || version > t.current_version() {
            return Err(vec![FieldError::new(
                "schema_version",
                format!(
                    "unsupported schema_version {version} for {t}; versions 1..={} are known",
                    t.current_version()
                ),
            )]);
        }
        let Some(obj) = data.as_object() else {
            return Err(vec![FieldError::new(prefix, "must be a JSON object")]);
        };
        let known = known_fields(t);
        // Unknown fields are kept, in `extra`, never silently dropped. (Upcasting adds known
        // fields only, so it leaves these as they are.)
        let unknown: Vec<String> = obj
            .keys()
            .filter(|k| !known.contains(&k.as_str()))
            .cloned()
            .collect();
        if version < t.current_version() || !unknown.is_empty() {
            let obj = data
                .to_mut()
                .as_object_mut()
                .expect("checked to be an object");
            upcast(t, version, obj);
            if !unknown.is_empty() {
                let mut extra = match obj.remove("extra") {
                    Some(Value::Object(m)) => m,
                    Some(other) => {
                        let mut m = Map::new();
                        m.insert("extra".into(), other);
                        m
                    }
                    None => Map::new(),
                };
                for k in unknown {
                    if let Some(v) = obj.remove(&k) {
                        extra.insert(k, v);
                    }
                }
                obj.insert("extra".into(), Value::Object(extra));
            }
        }
        let payload = Payload::typed(t, &data, prefix)?;
        Ok((payload, data))
    }

    /// The payload of a current-version `data` whose unknown fields are in `extra`, its
    /// limits checked.
    fn typed(t: EventType, data: &Value, prefix: &str) -> Result<Payload, Vec<FieldError>> {
        let payload = read_payload(t, &FromValue { data, prefix })?;
        let errors = payload.check_limits(prefix);
        if errors.is_empty() {
            Ok(payload)
        } else {
            Err(errors)
        }
    }

    /// The payload of a current-version `data`, read from its JSON text without building a
    /// tree, when that text is as the contract stores it: known fields only, each once, no
    /// NUL character (which PostgreSQL cannot store in text), every limit kept. Then it is
    /// the payload [`Payload::decode_normalized`] reads from the same text. `None` for
    /// anything else, which only that decoding names (or moves into `extra`, or upcasts).
    pub fn from_text(t: EventType, text: &str) -> Option<Payload> {
        // A NUL can only be written escaped; this also refuses an escaped backslash before
        // `u0000`, which the decoding then reads.
        if text.contains("\\u0000") {
            return None;
        }
        // serde_json reads a struct from an array too, by position; the tree refuses it.
        if !text.trim_start().starts_with('{') {
            return None;
        }
        let payload = read_payload(t, &FromText(text)).ok()?;
        let shallow = payload
            .open_maps()
            .all(|m| m.values().all(|v| nesting(v) <= MAX_TEXT_NESTING));
        (shallow && payload.check_limits("data").is_empty()).then_some(payload)
    }

    /// The payload's maps of any JSON (`extra`, and `args`, `context`, `metadata`,
    /// `details` or `dimensions` where its type has them): the only places where its JSON
    /// nests deeper than its own fields.
    pub fn open_maps(&self) -> impl Iterator<Item = &Object> {
        let (a, b, extra): (Option<&Object>, Option<&Object>, &Object) = match self {
            Payload::CommandExecuted(p) => (p.args.as_ref(), p.context.as_ref(), &p.extra),
            Payload::AgentInteracted(p) => (p.metadata.as_ref(), None, &p.extra),
            Payload::ToolExecuted(p) => (p.details.as_ref(), None, &p.extra),
            Payload::SessionStarted(p) => (p.context.as_ref(), None, &p.extra),
            Payload::SessionEnded(p) => (p.context.as_ref(), None, &p.extra),
            Payload::SessionContext(p) => (None, None, &p.extra),
            Payload::ProductivityRecorded(p) => (p.dimensions.as_ref(), None, &p.extra),
            Payload::MetricSample(p) => (None, None, &p.extra),
            Payload::PullRequestChanged(p) => (None, None, &p.extra),
            Payload::BranchPushed(p) => (None, None, &p.extra),
            Payload::Auth(_, p) => (None, None, &p.extra),
        };
        a.into_iter().chain(b).chain(std::iter::once(extra))
    }

    pub fn event_type(&self) -> EventType {
        match self {
            Payload::CommandExecuted(_) => EventType::CommandExecuted,
            Payload::AgentInteracted(_) => EventType::AgentInteracted,
            Payload::ToolExecuted(_) => EventType::ToolExecuted,
            Payload::SessionStarted(_) => EventType::SessionStarted,
            Payload::SessionEnded(_) => EventType::SessionEnded,
            Payload::SessionContext(_) => EventType::SessionContext,
            Payload::ProductivityRecorded(_) => EventType::ProductivityRecorded,
            Payload::MetricSample(_) => EventType::MetricSample,
            Payload::PullRequestChanged(_) => EventType::PullRequestChanged,
            Payload::BranchPushed(_) => EventType::BranchPushed,
            Payload::Auth(k, _) => EventType::Auth(*k),
        }
    }

    /// The payload in its normalized JSON form (as stored in the envelope).
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("payload types serialize infallibly")
    }

    /// Whether [`Payload::to_value`] would be `v`, found without building it.
    pub fn is_written_as(&self, v: &Value) -> bool {
        crate::json_eq::serialized_as(self, v)
    }

    /// Every field of the payload outside its limits (lengths, ranges, label counts), named
    /// below `prefix`. Decoding checks them; a payload built typed is checked with this.
    pub fn check_limits(&self, prefix: &str) -> Vec<FieldError> {
        let mut c = Checker {
            prefix,
            errors: Vec::new(),
        };
        match self {
            Payload::CommandExecuted(p) => {
                c.name("user_id", &p.user_id);
                c.opt_name("team_id", &p.team_id);
                c.opt_name("project_id", &p.project_id);
                c.opt_name("session_id", &p.session_id);
                c.name("command_name", &p.command_name);
                c.range("duration_ms", p.duration_ms, 0, MAX_DURATION_MS);
                c.error_message(&p.error_message);
            }
            Payload::AgentInteracted(p) => {
                c.name("user_id", &p.user_id);
                c.opt_name("team_id", &p.team_id);
                c.opt_name("project_id", &p.project_id);
                c.opt_name("session_id", &p.session_id);
                c.name("agent_name", &p.agent_name);
                c.len("interaction_type", &p.interaction_type, 1, 100);
                c.range("input_tokens", p.input_tokens, 0, MAX_TOKENS);
                c.range("output_tokens", p.output_tokens, 0, MAX_TOKENS);
                c.range("cache_read_tokens", p.cache_read_tokens, 0, MAX_TOKENS);
                c.range(
                    "cache_creation_tokens",
                    p.cache_creation_tokens,
                    0,
                    MAX_TOKENS,
                );
                c.opt_name("model", &p.model);
                if let Some(cost) = p.cost_usd {
                    c.float("cost_usd", cost, Some((0.0, 1e6)));
                }
                c.range("duration_ms", p.duration_ms, 0, MAX_DURATION_MS);
                c.error_message(&p.error_message);
            }
            Payload::ToolExecuted(p) => {
                c.name("user_id", &p.user_id);
                c.name("session_id", &p.session_id);
                c.opt_name("team_id", &p.team_id);
                c.opt_name("project_id", &p.project_id);
                c.name("tool_name", &p.tool_name);
                c.range("duration_ms", p.duration_ms, 0, MAX_DURATION_MS);
                c.error_message(&p.error_message);
            }
            Payload::SessionStarted(p) => {
                c.name("session_id", &p.session_id);
                c.name("user_id", &p.user_id);
                c.opt_name("team_id", &p.team_id);
                c.opt_name("project_id", &p.project_id);
            }
            Payload::SessionEnded(p) => {
                c.name("session_id", &p.session_id);
                c.name("user_id", &p.user_id);
                c.opt_name("team_id", &p.team_id);
                c.opt_name("project_id", &p.project_id);
                if let Some(n) = p.commands_executed {
                    c.range("commands_executed", n, 0, i64::from(i32::MAX));
                }
                if let Some(s) = p.productivity_score {
                    c.float("productivity_score", s, Some((0.0, 100.0)));
                }
                if p.agents_used.len() > MAX_AGENTS_USED {
                    // Refused already: its elements are not each looked at.
                    c.push("agents_used", format!("at most {MAX_AGENTS_USED} agents"));
                } else {
                    for (i, a) in p.agents_used.iter().enumerate() {
                        c.name(&format!("agents_used[{i}]"), a);
                    }
                }
            }
            Payload::SessionContext(p) => {
                c.name("session_id", &p.session_id);
                c.name("user_id", &p.user_id);
                c.opt_name("team_id", &p.team_id);
                c.opt_name("project_id", &p.project_id);
                c.opt_name("repository", &p.repository);
                c.opt_name("branch", &p.branch);
                if let Some(commit) = &p.commit {
                    c.len("commit", commit, 1, 64);
                }
                if let Some(d) = &p.directory {
                    c.len("directory", d, 0, 1000);
                }
            }
            Payload::PullRequestChanged(p) => {
                c.name("provider", &p.provider);
                c.name("repository", &p.repository);
                c.range("number", p.number, 1, i64::from(i32::MAX));
                c.name("action", &p.action);
                if !["open", "closed", "merged"].contains(&p.state.as_str()) {
                    c.push("state", "must be open, closed or merged".into());
                }
                c.name("head_branch", &p.head_branch);
                c.opt_name("head_repository", &p.head_repository);
                c.opt_name("base_branch", &p.base_branch);
                if let Some(t) = &p.title {
                    c.len("title", t, 0, 1000);
                }
                c.opt_name("author", &p.author);
                if let Some(u) = &p.url {
                    c.len("url", u, 0, 1000);
                }
                for (f, n) in [("additions", p.additions), ("deletions", p.deletions)] {
                    if let Some(n) = n {
                        c.range(f, n, 0, i64::from(i32::MAX));
                    }
                }
            }
            Payload::BranchPushed(p) => {
                c.name("provider", &p.provider);
                c.name("repository", &p.repository);
                c.name("branch", &p.branch);
                if let Some(a) = &p.after {
                    c.len("after", a, 1, 64);
                }
                c.range("commits", p.commits, 0, 1_000_000);
            }
            Payload::ProductivityRecorded(p) => {
                c.opt_name("user_id", &p.user_id);
                c.opt_name("team_id", &p.team_id);
                c.opt_name("project_id", &p.project_id);
                c.float("value", p.value, None);
                if let Some(u) = &p.unit {
                    c.len("unit", u, 0, 50);
                }
            }
            Payload::MetricSample(p) => {
                c.name("name", &p.name);
                c.float("value", p.value, None);
                if p.labels.len() > MAX_LABELS {
                    c.push("labels", format!("at most {MAX_LABELS} labels"));
                }
                for (k, v) in &p.labels {
                    // The field's name is written only for a label that is refused: this
                    // runs on every label of every OTLP point.
                    if !fits(k, 1, MAX_NAME_LEN) {
                        c.len(&format!("labels.{k}"), k, 1, MAX_NAME_LEN);
                    }
                    if !fits(v, 0, MAX_LABEL_VALUE_LEN) {
                        c.len(&format!("labels.{k}"), v, 0, MAX_LABEL_VALUE_LEN);
                    }
                }
            }
            Payload::Auth(_, p) => {
                if let Some(e) = &p.email {
                    c.len("email", e, 0, 254);
                }
                if let Some(d) = &p.detail {
                    c.len("detail", d, 0, 1000);
                }
                // A snapshot the read models could not use refuses the event (so the
                // projector dead-letters it) instead of being skipped unseen.
                use crate::people::{Snapshot, TeamSnapshot, UserSnapshot};
                for e in [
                    UserSnapshot::from_extra(&p.extra).err(),
                    TeamSnapshot::from_extra(&p.extra).err(),
                ]
                .into_iter()
                .flatten()
                {
                    c.push(&e.field, e.reason);
                }
            }
        }
        c.errors
    }
}

/// A valid value for every field of every payload type. When a field fails to decode, it is
/// reported and replaced by this stand-in so decoding can go on and report every other bad
/// field too (serde stops at the first).
fn stand_in(t: EventType, field: &str) -> Option<Value> {
    let v = match field {
        "user_id" | "team_id" | "project_id" | "session_id" | "command_name" | "agent_name"
        | "interaction_type" | "tool_name" | "name" | "unit" | "error_message" | "branch"
        | "commit" | "directory" | "provider" | "action" | "head_branch" | "base_branch"
        | "title" | "author" | "url" | "after" => Value::from("x"),
        "repository" | "head_repository" => Value::from("example.com/x"),
        "state" => Value::from("open"),
        "number" => Value::from(1),
        "additions" | "deletions" | "commits" => Value::from(0),
        "deleted" | "forced" => Value::from(false),
        "opened_at" | "merged_at" | "closed_at" | "updated_at" => {
            Value::from("2026-01-01T00:00:00Z")
        }
        "args" | "context" | "metadata" | "details" | "dimensions" | "labels" | "extra" => {
            Value::Object(Map::new())
        }
        "duration_ms" | "input_tokens" | "output_tokens" | "commands_executed" | "value"
        | "productivity_score" => Value::from(0),
        "status" => Value::from("success"),
        "success" => Value::from(true),
        "agents_used" => Value::Array(vec![]),
        "metric_type" => Value::from("error_rate"),
        "kind" => Value::from("gauge"),
        "command_event_id" => Value::from(Uuid::nil().to_string()),
        _ => return None,
    };
    known_fields(t).contains(&field).then_some(v)
}

/// How deep a value in a payload's open map ([`Payload::open_maps`]) may nest for the
/// payload to be read from its text. serde_json reads its text without counting the depth
/// its `data` sits at in the request, so a deeper payload is left to the tree, which counts
/// it (serde_json reads at most 127 levels; the request, the event, `data` and the map take
/// four).
pub const MAX_TEXT_NESTING: usize = 60;

/// How many arrays and objects `v` opens inside one another: 0 for a scalar, 1 for `[1]`.
pub fn nesting(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(nesting).max().unwrap_or(0),
        Value::Object(m) => 1 + m.values().map(nesting).max().unwrap_or(0),
        _ => 0,
    }
}

/// One form of a payload's `data` that each payload struct can be read from.
trait DataReader {
    type Error;
    fn read<T: DeserializeOwned>(&self, t: EventType) -> Result<T, Self::Error>;
    /// The error of a `session.context` whose repository names none Tally can read.
    fn bad_repository(&self) -> Self::Error;
}

/// `data` as a tree, every offending field named below `prefix`.
struct FromValue<'a> {
    data: &'a Value,
    prefix: &'a str,
}

impl DataReader for FromValue<'_> {
    type Error = Vec<FieldError>;
    fn read<T: DeserializeOwned>(&self, t: EventType) -> Result<T, Vec<FieldError>> {
        parse(t, self.data, self.prefix)
    }
    fn bad_repository(&self) -> Vec<FieldError> {
        vec![FieldError::new(
            format!("{}.repository", self.prefix),
            "is neither a remote URL, host/owner/name nor sha256:<64 hex>",
        )]
    }
}

/// `data` as JSON text; what is wrong is not named.
struct FromText<'a>(&'a str);

impl DataReader for FromText<'_> {
    type Error = ();
    fn read<T: DeserializeOwned>(&self, _: EventType) -> Result<T, ()> {
        serde_json::from_str(self.0).map_err(drop)
    }
    fn bad_repository(&self) {}
}

/// The payload of type `t`, its struct read by `r`; a `session.context`'s repository
/// normalized.
fn read_payload<R: DataReader>(t: EventType, r: &R) -> Result<Payload, R::Error> {
    Ok(match t {
        EventType::CommandExecuted => Payload::CommandExecuted(r.read(t)?),
        EventType::AgentInteracted => Payload::AgentInteracted(r.read(t)?),
        EventType::ToolExecuted => Payload::ToolExecuted(r.read(t)?),
        EventType::SessionStarted => Payload::SessionStarted(r.read(t)?),
        EventType::SessionEnded => Payload::SessionEnded(r.read(t)?),
        EventType::SessionContext => {
            let mut p: SessionContext = r.read(t)?;
            if let Some(repository) = &p.repository {
                match crate::repos::normalize(repository) {
                    Some(n) => p.repository = Some(n),
                    None => return Err(r.bad_repository()),
                }
            }
            Payload::SessionContext(p)
        }
        EventType::ProductivityRecorded => Payload::ProductivityRecorded(r.read(t)?),
        EventType::MetricSample => Payload::MetricSample(r.read(t)?),
        EventType::PullRequestChanged => Payload::PullRequestChanged(r.read(t)?),
        EventType::BranchPushed => Payload::BranchPushed(r.read(t)?),
        EventType::Auth(k) => Payload::Auth(k, r.read(t)?),
    })
}

fn parse<T: DeserializeOwned>(
    t: EventType,
    data: &Value,
    prefix: &str,
) -> Result<T, Vec<FieldError>> {
    if !data.is_object() {
        return Err(vec![FieldError::new(prefix, "must be a JSON object")]);
    }
    // Nearly every event: read by reference, nothing copied, and no path kept (tracking
    // it allocates every map key read, about a third of the cost); only a refused event is
    // read again to name its fields.
    if let Ok(v) = T::deserialize(data) {
        return Ok(v);
    }
    let first = match serde_path_to_error::deserialize::<_, T>(data) {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    // Otherwise every offending field is named: each try reads a copy in which the fields
    // found so far are replaced by stand-ins.
    let mut data = data.clone();
    let mut errors: Vec<FieldError> = Vec::new();
    let mut found = Some(first);
    for _ in 0..=known_fields(t).len() {
        let e = match found.take() {
            Some(e) => e,
            None => match serde_path_to_error::deserialize::<_, T>(&data) {
                Ok(_) => break,
                Err(e) => e,
            },
        };
        let path = e.path().to_string();
        let reason = e.into_inner().to_string();
        // serde names a missing field only in its message.
        let top = match reason.strip_prefix("missing field `") {
            Some(rest) => rest.trim_end_matches('`').to_string(),
            None => path.split(['.', '[']).next().unwrap_or("").to_string(),
        };
        let field = if path == "." || path.is_empty() {
            format!("{prefix}.{top}")
        } else {
            format!("{prefix}.{path}")
        };
        errors.push(FieldError::new(field, reason));
        let obj = data.as_object_mut().expect("checked to be an object");
        match stand_in(t, &top) {
            Some(v) if obj.get(&top) != Some(&v) => {
                obj.insert(top, v);
            }
            _ => break,
        }
    }
    Err(errors)
}

/// Whether `s` has `min..=max` characters.
fn fits(s: &str, min: usize, max: usize) -> bool {
    (min..=max).contains(&s.chars().count())
}

struct Checker<'a> {
    prefix: &'a str,
    errors: Vec<FieldError>,
}

impl Checker<'_> {
    fn push(&mut self, field: &str, reason: String) {
        self.errors
            .push(FieldError::new(format!("{}.{field}", self.prefix), reason));
    }
    fn len(&mut self, field: &str, s: &str, min: usize, max: usize) {
        if !fits(s, min, max) {
            let n = s.chars().count();
            self.push(field, format!("length must be {min}..={max}, got {n}"));
        }
    }
    fn name(&mut self, field: &str, s: &str) {
        self.len(field, s, 1, MAX_NAME_LEN);
    }
    fn opt_name(&mut self, field: &str, s: &Option<String>) {
        if let Some(s) = s {
            self.name(field, s);
        }
    }
    fn range(&mut self, field: &str, v: i64, min: i64, max: i64) {
        if v < min || v > max {
            self.push(field, format!("must be {min}..={max}, got {v}"));
        }
    }
    fn float(&mut self, field: &str, v: f64, bounds: Option<(f64, f64)>) {
        if !v.is_finite() {
            self.push(field, "must be a finite number".into());
        } else if let Some((lo, hi)) = bounds {
            if v < lo || v > hi {
                self.push(field, format!("must be {lo}..={hi}, got {v}"));
            }
        }
    }
    fn error_message(&mut self, s: &Option<String>) {
        if let Some(s) = s {
            self.len("error_message", s, 0, MAX_ERROR_MESSAGE_LEN);
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A sample built typed becomes the same `data` as one decoded and written again.
    #[test]
    fn a_sample_moved_into_its_form_is_its_payloads_form() {
        let kinds = [
            SampleKind::Gauge,
            SampleKind::Counter,
            SampleKind::Histogram,
            SampleKind::Summary,
        ];
        for (i, kind) in kinds.into_iter().enumerate() {
            assert_eq!(json!(kind), json!(kind.as_str()));
            for value in [0.0, -1.5, 1e300, f64::NAN, i as f64] {
                let mut extra = Map::new();
                if i % 2 == 1 {
                    extra.insert("unit".into(), json!("ms"));
                    extra.insert("bounds".into(), json!([1.0, {"a": null}]));
                }
                let sample = MetricSample {
                    name: format!("m{i}"),
                    labels: (0..i)
                        .map(|l| (format!("k{l}"), "v\u{e9}".repeat(l)))
                        .collect(),
                    value,
                    kind,
                    extra,
                };
                let expected = Payload::MetricSample(sample.clone()).to_value();
                assert_eq!(sample.into_value(), expected);
            }
        }
    }

    /// A client's `data` that already is its payload's form is what the envelope carries;
    /// one that is not is replaced by the form.
    #[test]
    fn data_already_normalized_is_kept_and_the_rest_normalized() {
        let sample = json!({"name": "m", "labels": {"a": "1"}, "value": 1.5, "kind": "counter"});
        let cases = [
            (sample.clone(), true),
            // An integer where the form has a float, a default left out, an empty `extra`,
            // an unknown field.
            (
                json!({"name": "m", "labels": {}, "value": 2, "kind": "gauge"}),
                false,
            ),
            (json!({"name": "m", "value": 1.5, "kind": "gauge"}), false),
            (
                json!({"name": "m", "labels": {}, "value": 1.5, "kind": "gauge", "extra": {}}),
                false,
            ),
            (
                json!({"name": "m", "labels": {}, "value": 1.5, "kind": "gauge", "x": 1}),
                false,
            ),
            (
                json!({"name": "m", "labels": {}, "value": 1.5, "kind": "gauge",
                    "extra": {"x": 1}}),
                true,
            ),
        ];
        for (data, kept) in cases {
            let (p, form) =
                Payload::decode_normalized(EventType::MetricSample, 1, data.clone(), "data")
                    .unwrap();
            assert_eq!(form, p.to_value(), "{data}");
            assert_eq!(form == data, kept, "{data}");
            assert_eq!(p.is_written_as(&data), kept, "{data}");
        }
    }

    #[test]
    fn data_decodes_the_same_borrowed_as_owned() {
        let command = json!({"user_id": "u", "command_name": "build", "duration_ms": 120,
                             "status": "success"});
        let with = |extra: Value| {
            let mut v = command.clone();
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            v
        };
        // Every key known, but version 1 of a type at version 2: it must still be upcast.
        let v1 = json!({"user_id": "u", "agent_name": "claude", "interaction_type": "chat",
                        "duration_ms": 7, "status": "success", "metadata": {"model": "m"}});
        let cases = [
            // Current version, every field known: read as it is.
            (EventType::CommandExecuted, 1, command.clone()),
            // Unknown fields, kept in `extra`; an `extra` of the wrong type.
            (EventType::CommandExecuted, 1, with(json!({"shell": "zsh"}))),
            (EventType::CommandExecuted, 1, with(json!({"extra": 5}))),
            (
                EventType::CommandExecuted,
                1,
                with(json!({"extra": 5, "shell": "zsh"})),
            ),
            (EventType::AgentInteracted, 1, v1.clone()),
            // Versions that do not exist.
            (EventType::CommandExecuted, 0, command.clone()),
            (EventType::CommandExecuted, 9, command.clone()),
            // Wrong fields: every one named, the same way.
            (
                EventType::CommandExecuted,
                1,
                json!({"user_id": 5, "duration_ms": "slow", "status": "success"}),
            ),
            (
                EventType::CommandExecuted,
                1,
                json!(["not", "an", "object"]),
            ),
        ];
        for (t, version, data) in cases {
            let owned = Payload::decode(t, version, data.clone(), "data");
            let borrowed = Payload::decode_ref(t, version, &data, "data");
            assert_eq!(owned, borrowed, "{t} v{version}: {data}");
            // And with its normalized form, whether kept or built.
            let normalized = Payload::decode_normalized(t, version, data.clone(), "data");
            match (&owned, normalized) {
                (Ok(p), Ok((q, form))) => {
                    assert_eq!(*p, q);
                    assert_eq!(form, p.to_value(), "{t} v{version}: {data}");
                }
                (Err(e), Err(f)) => assert_eq!(*e, f),
                (_, normalized) => panic!("{t} v{version}: {owned:?} but {normalized:?}"),
            }
        }
        assert!(Payload::decode_ref(EventType::CommandExecuted, 1, &command, "data").is_ok());
        let Ok(Payload::AgentInteracted(p)) =
            Payload::decode_ref(EventType::AgentInteracted, 1, &v1, "data")
        else {
            panic!("a v1 interaction decodes")
        };
        assert_eq!(p.model.as_deref(), Some("m"));
        // Every offending field, in the order they are found.
        let errors = Payload::decode_ref(
            EventType::CommandExecuted,
            1,
            &json!({"user_id": 5, "duration_ms": "slow", "status": "success"}),
            "data",
        )
        .unwrap_err();
        let found: Vec<(&str, &str)> = errors
            .iter()
            .map(|e| (e.field.as_str(), e.reason.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                (
                    "data.duration_ms",
                    "invalid type: string \"slow\", expected i64"
                ),
                (
                    "data.user_id",
                    "invalid type: integer `5`, expected a string"
                ),
                ("data.command_name", "missing field `command_name`"),
            ]
        );
    }

    /// Data of every payload type, as the contract stores it.
    fn every_type() -> Vec<(EventType, Value)> {
        vec![
            (
                EventType::CommandExecuted,
                json!({"user_id": "u", "session_id": "s",
                "command_name": "c", "duration_ms": 1, "status": "success", "args": {"a": 1}}),
            ),
            (
                EventType::CommandExecuted,
                json!({"user_id": "u", "command_name": "c",
                "duration_ms": 1, "status": "error", "extra": {"x": [1, 2.5, null]}}),
            ),
            (
                EventType::AgentInteracted,
                json!({"user_id": "u", "agent_name": "a",
                "interaction_type": "chat", "duration_ms": 1, "status": "success",
                "cost_usd": 0.1, "model": "m"}),
            ),
            (
                EventType::ToolExecuted,
                json!({"user_id": "u", "session_id": "s",
                "tool_name": "t", "duration_ms": 1, "success": true}),
            ),
            (
                EventType::SessionStarted,
                json!({"user_id": "u", "session_id": "s"}),
            ),
            (
                EventType::SessionEnded,
                json!({"user_id": "u", "session_id": "s",
                "agents_used": ["a"]}),
            ),
            (
                EventType::SessionContext,
                json!({"user_id": "u", "session_id": "s",
                "repository": "github.com/acme/widgets", "branch": "main"}),
            ),
            (
                EventType::ProductivityRecorded,
                json!({"user_id": "u",
                "metric_type": "error_rate", "value": 0.5}),
            ),
            (
                EventType::ProductivityRecorded,
                json!({"team_id": "t",
                "metric_type": "error_rate", "value": 0.5}),
            ),
            (
                EventType::MetricSample,
                json!({"name": "n", "labels": {"user_id": "u"},
                "value": 1.0, "kind": "counter"}),
            ),
            (
                EventType::PullRequestChanged,
                json!({"provider": "github",
                "repository": "github.com/acme/widgets", "number": 7, "action": "opened",
                "state": "open", "head_branch": "b", "updated_at": "2026-12-01T12:00:00Z",
                "title": "t"}),
            ),
            (
                EventType::BranchPushed,
                json!({"provider": "github",
                "repository": "github.com/acme/widgets", "branch": "main", "commits": 2}),
            ),
            (
                EventType::Auth(AuthKind::LoggedOut),
                json!({"user_id": Uuid::from_u128(7),
                "target": "k"}),
            ),
            (
                EventType::Auth(AuthKind::LoggedOut),
                json!({"target": "k", "ip": "::1"}),
            ),
            (EventType::Auth(AuthKind::LoggedOut), json!({})),
        ]
    }

    /// The typed payload spreads the log's partitions as its JSON does, and is read from its
    /// text as from its tree (a text with more to it is left to the tree).
    #[test]
    fn payloads_read_from_text_spread_as_their_json() {
        for (t, data) in every_type() {
            let payload = Payload::decode(t, t.current_version(), data.clone(), "data").unwrap();
            let (mut typed, mut json) = (String::new(), String::new());
            payload.write_spread(&mut typed);
            payload.to_value().write_spread(&mut json);
            assert_eq!(typed, json, "{t}: {data}");
            assert_eq!(
                Payload::from_text(t, &data.to_string()),
                Some(payload),
                "{t}"
            );
            let mut unknown = data.clone();
            unknown["mystery"] = json!(1);
            assert_eq!(Payload::from_text(t, &unknown.to_string()), None, "{t}");
            let written = serde_json::to_string(&Payload::from_text(t, &data.to_string())).unwrap();
            let read: Value = serde_json::from_str(&written).unwrap();
            let (_, normalized) =
                Payload::decode_normalized(t, t.current_version(), data, "data").unwrap();
            assert_eq!(read, normalized, "{t}: written as its normalized JSON");
        }
        assert_eq!(
            Payload::from_text(
                EventType::MetricSample,
                r#"{"name": "a\u0000", "value": 1}"#
            ),
            None
        );
        assert_eq!(
            Payload::from_text(
                EventType::MetricSample,
                &format!(r#"{{"name": "{}", "value": 1}}"#, "x".repeat(256))
            ),
            None,
            "past a limit"
        );
    }

    #[test]
    fn a_session_lists_at_most_its_share_of_agents() {
        let ended = |n: usize| {
            let agents: Vec<String> = (0..n).map(|i| format!("a{i}")).collect();
            json!({"user_id": "u", "session_id": "s", "agents_used": agents})
        };
        let decode = |data| Payload::decode(EventType::SessionEnded, 1, data, "data");
        assert!(decode(ended(MAX_AGENTS_USED)).is_ok());
        let errors = decode(ended(MAX_AGENTS_USED + 1)).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "data.agents_used");
    }

    #[test]
    fn known_fields_are_read_from_the_structs() {
        assert_eq!(
            known_fields(EventType::MetricSample),
            ["name", "labels", "value", "kind", "extra"]
        );
        assert_eq!(known_fields(EventType::AgentInteracted).len(), 18);
        assert!(known_fields(EventType::Auth(AuthKind::LoggedOut)).contains(&"detail"));
    }

    #[test]
    fn agent_interacted_v1_is_upcast_to_v2() {
        let v1 = json!({"user_id": "u", "agent_name": "claude", "interaction_type": "chat",
                        "input_tokens": 10, "output_tokens": 5, "duration_ms": 7,
                        "status": "success",
                        "metadata": {"model": "opus", "cost_usd": 0.25, "cache_read_tokens": 3,
                                     "temperature": 0.2}});
        let Payload::AgentInteracted(p) =
            Payload::decode(EventType::AgentInteracted, 1, v1, "data").unwrap()
        else {
            panic!("wrong type")
        };
        assert_eq!(p.model.as_deref(), Some("opus"));
        assert_eq!(p.cost_usd, Some(0.25));
        assert_eq!(p.cache_read_tokens, 3);
        assert_eq!(p.input_tokens, 10);
        // What v2 has no field for stays where v1 put it.
        assert_eq!(p.metadata.unwrap().get("temperature"), Some(&json!(0.2)));
        assert!(p.extra.is_empty());

        // The same fields sent as v2 decode the same; v2 does not look into metadata.
        let v2 = json!({"user_id": "u", "agent_name": "claude", "interaction_type": "chat",
                        "duration_ms": 7, "status": "success", "model": "opus",
                        "cost_usd": 0.25, "metadata": {"model": "other"}});
        let Payload::AgentInteracted(p) =
            Payload::decode(EventType::AgentInteracted, 2, v2, "data").unwrap()
        else {
            panic!("wrong type")
        };
        assert_eq!(p.model.as_deref(), Some("opus"));
        assert_eq!(p.metadata.unwrap().get("model"), Some(&json!("other")));
        assert!(Payload::decode(EventType::AgentInteracted, 3, json!({}), "data").is_err());
    }

    /// The envelope's stored form, byte for byte: what ingest-api writes to the log and every
    /// consumer reads (its times through `rfc3339`, its type without serde's `into`).
    #[test]
    fn an_envelope_is_written_in_its_stored_form() {
        let at = |s: &str| {
            DateTime::parse_from_rfc3339(s)
                .expect("a time")
                .with_timezone(&Utc)
        };
        let env = Envelope {
            id: Uuid::from_u128(1),
            tenant_id: TenantId(Uuid::from_u128(2)),
            event_type: EventType::CommandExecuted,
            schema_version: 1,
            occurred_at: at("2026-12-03T14:05:09.120Z"),
            received_at: at("2026-12-03T14:05:10Z"),
            actor: Actor {
                user_id: None,
                api_key_id: Some(Uuid::from_u128(3)),
            },
            source: Source::Api,
            data: json!({"user_id": "u"}),
        };
        assert_eq!(
            serde_json::to_string(&env).expect("serializes"),
            concat!(
                r#"{"id":"00000000-0000-0000-0000-000000000001","#,
                r#""tenant_id":"00000000-0000-0000-0000-000000000002","#,
                r#""type":"command.executed","schema_version":1,"#,
                r#""occurred_at":"2026-12-03T14:05:09.120Z","#,
                r#""received_at":"2026-12-03T14:05:10Z","#,
                r#""actor":{"api_key_id":"00000000-0000-0000-0000-000000000003"},"#,
                r#""source":"api","data":{"user_id":"u"}}"#
            )
        );
        let back: Envelope =
            serde_json::from_str(&serde_json::to_string(&env).expect("json")).expect("reads back");
        assert_eq!(back, env);
    }

    #[test]
    fn a_record_skipped_by_its_first_tenant_is_one_a_whole_decode_would_skip() {
        let ours = TenantId(Uuid::from_u128(7));
        let theirs = TenantId(Uuid::from_u128(8));
        let tenants = HashSet::from([ours]);
        let object = |t: &str| {
            format!(
                r#"{{"id":"00000000-0000-0000-0000-000000000001","tenant_id":"{t}","type":"command.executed","schema_version":1,"occurred_at":"2026-12-03T14:05:09Z","received_at":"2026-12-03T14:05:10Z","actor":{{}},"source":"api","data":{{"user_id":"u"}}}}"#
            )
        };
        let (mine, other) = (object(&ours.to_string()), object(&theirs.to_string()));
        let u = ours.0;
        // serde_json reads an envelope from an array too, its fields in order.
        let array = format!(
            r#"["00000000-0000-0000-0000-000000000001","{ours}","command.executed",1,"2026-12-03T14:05:09Z","2026-12-03T14:05:10Z",{{}},"api",{{"user_id":"u"}}]"#
        );
        // As jsonb gives it back (the outbox relay's auth records): keys reordered and spaced,
        // another tenant named inside `data` before the envelope's own.
        let reordered = format!(
            r#"{{"id": "00000000-0000-0000-0000-000000000001", "data": {{"tenant_id": "{theirs}", "user_id": "u"}}, "type": "command.executed", "actor": {{}}, "source": "api", "tenant_id": "{ours}", "occurred_at": "2026-12-03T14:05:09Z", "received_at": "2026-12-03T14:05:10Z", "schema_version": 1}}"#
        );
        let escaped_key = mine.replace(r#""tenant_id""#, r#""tenant\u005fid""#);
        let ours_then_theirs =
            mine.replacen(r#""type""#, &format!(r#""tenant_id":"{theirs}","type""#), 1);
        let theirs_then_ours = mine.replacen(
            r#""tenant_id""#,
            &format!(r#""tenant_id":"{theirs}","tenant_id""#),
            1,
        );
        let (our_key, their_key) = (format!("{ours}:u"), format!("{theirs}:u"));
        let upper_key = our_key.to_uppercase();
        let mut cases: Vec<(Option<&[u8]>, String, bool)> = vec![
            (Some(our_key.as_bytes()), mine.clone(), true),
            (Some(their_key.as_bytes()), other.clone(), false),
            (None, other.clone(), false),
            // The envelope decides wherever the key does not name one of the tenants.
            (Some(their_key.as_bytes()), mine.clone(), true),
            (None, mine.clone(), true),
            (Some(b"short"), mine.clone(), true),
            (
                Some(b"\xff\xfe not a key at all, not even UTF-8 \xff"),
                mine.clone(),
                true,
            ),
            (Some(upper_key.as_bytes()), other.clone(), true),
            (Some(their_key.as_bytes()), array.clone(), true),
            (Some(their_key.as_bytes()), reordered.clone(), true),
            (Some(their_key.as_bytes()), escaped_key.clone(), true),
            (Some(their_key.as_bytes()), format!("  \n{mine}"), true),
            (None, format!("\u{feff}{mine}"), true),
            (Some(their_key.as_bytes()), ours_then_theirs.clone(), true),
            (Some(their_key.as_bytes()), theirs_then_ours.clone(), false),
            (Some(their_key.as_bytes()), "{not json".into(), true),
            (
                Some(their_key.as_bytes()),
                r#"{"tenant_id":"nope"}"#.into(),
                true,
            ),
        ];
        // Every form of our id a whole decode reads.
        let forms = [
            u.to_string().to_uppercase(),
            u.braced().to_string(),
            u.urn().to_string(),
            u.simple().to_string(),
        ];
        cases.extend(
            forms
                .iter()
                .map(|id| (Some(their_key.as_bytes()), object(id), true)),
        );
        for (key, payload, may) in &cases {
            assert_eq!(
                may_belong_to(&tenants, *key, Some(payload.as_bytes())),
                *may,
                "{payload}"
            );
        }
        assert!(!may_belong_to(&tenants, Some(their_key.as_bytes()), None));
        // What it skips, a whole decode skips too; the samples it must keep decode whole.
        for (_, payload, may) in &cases {
            let whole = serde_json::from_slice::<Envelope>(payload.as_bytes());
            assert!(
                *may || whole.as_ref().map_or(true, |e| e.tenant_id != ours),
                "{payload}"
            );
        }
        for payload in [&mine, &array, &reordered, &escaped_key] {
            let whole: Envelope = serde_json::from_str(payload).expect(payload);
            assert_eq!(whole.tenant_id, ours, "{payload}");
        }
    }

    #[test]
    fn auth_events_round_trip() {
        let env = Envelope {
            id: Uuid::now_v7(),
            tenant_id: TenantId::new(),
            event_type: EventType::Auth(AuthKind::PasswordChanged),
            schema_version: 1,
            occurred_at: Utc::now(),
            received_at: Utc::now(),
            actor: Actor::default(),
            source: Source::Control,
            data: serde_json::to_value(AuthEvent {
                user_id: Some(Uuid::now_v7()),
                ip: Some("127.0.0.1".into()),
                ..Default::default()
            })
            .unwrap(),
        };
        let json = serde_json::to_value(&env).unwrap();
        assert_eq!(json["type"], "auth.password_changed");
        let back: Envelope = serde_json::from_value(json).unwrap();
        assert_eq!(back, env);
        assert!(matches!(
            back.payload().unwrap(),
            Payload::Auth(AuthKind::PasswordChanged, _)
        ));
        for k in AuthKind::ALL {
            assert_eq!(EventType::parse(k.as_str()), Some(EventType::Auth(k)));
        }
    }
}
