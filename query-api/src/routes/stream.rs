//! `GET /v1/stream`: Server-Sent Events of the caller's new activity (`activity` events) and,
//! after each burst, the updated 24-hour totals (`totals` events), tenant- and scope-bound.
//!
//! The projector publishes `tally:projected:<tenant>` in Redis after each commit; a single
//! subscriber here wakes the streams of that tenant, which then read what was projected since
//! their last event (by `received_at`) — with the caller's visibility, from the tenant's own
//! schema under its role. While that subscription is down, streams check every 2 s (and
//! every 30 s otherwise, in case a notification was lost). Each event's `id` is its
//! position, so a client reconnecting with `Last-Event-ID` resumes where it left off.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;
use shared::problem::Problem;
use shared::tenant::TenantId;
use shared::tenant_sql;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::auth::Visibility;
use crate::state::AppState;

/// Per-tenant wake-ups, fed by one Redis subscription.
#[derive(Clone, Default)]
pub struct Hub {
    tenants: Arc<Mutex<HashMap<TenantId, broadcast::Sender<()>>>>,
    /// Whether the Redis subscription is up (wake-ups arrive).
    live: Arc<AtomicBool>,
}

impl Hub {
    /// How long a stream waits for a wake-up before it looks for itself.
    fn poll_interval(&self) -> Duration {
        if self.live.load(Ordering::Relaxed) {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(2)
        }
    }

    fn subscribe(&self, tenant: TenantId) -> broadcast::Receiver<()> {
        self.tenants
            .lock()
            .expect("hub lock")
            .entry(tenant)
            .or_insert_with(|| broadcast::channel(16).0)
            .subscribe()
    }

    fn wake(&self, tenant: TenantId) {
        if let Some(tx) = self.tenants.lock().expect("hub lock").get(&tenant) {
            let _ = tx.send(());
        }
    }

    /// Listens to the projector's notifications for as long as the process runs
    /// (reconnecting when Redis goes away).
    pub fn listen(&self, redis_url: String) {
        let hub = self.clone();
        tokio::spawn(async move {
            loop {
                let result = hub.listen_once(&redis_url).await;
                hub.live.store(false, Ordering::Relaxed);
                if let Err(e) = result {
                    tracing::debug!(error = %e, "live feed subscription lost; retrying");
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
    }

    async fn listen_once(&self, url: &str) -> redis::RedisResult<()> {
        let client = redis::Client::open(url)?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.psubscribe("tally:projected:*").await?;
        self.live.store(true, Ordering::Relaxed);
        let mut messages = pubsub.into_on_message();
        while let Some(msg) = messages.next().await {
            let channel = msg.get_channel_name();
            if let Some(t) = channel.strip_prefix("tally:projected:") {
                if let Ok(tenant) = t.parse() {
                    self.wake(tenant);
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Serialize, sqlx::FromRow)]
struct Item {
    event_id: Uuid,
    occurred_at: DateTime<Utc>,
    received_at: DateTime<Utc>,
    #[serde(rename = "type")]
    event_type: String,
    user_id: String,
    team_id: String,
    name: String,
    status: String,
    duration_ms: i64,
}

const SINCE_SQL: &str = "SELECT event_id, occurred_at, received_at, event_type, user_id, team_id,
        name, status, duration_ms
   FROM activity_events
  WHERE (received_at, event_id) > ($1, $5) AND occurred_at > $2
    AND ($3::text IS NULL OR user_id = $3) AND ($4::text[] IS NULL OR team_id = ANY($4))
  ORDER BY received_at, event_id
  LIMIT 1000";

/// Events of the tenant projected after `since` (by server time), oldest first.
async fn since(
    s: &AppState,
    tenant: TenantId,
    visibility: &Visibility,
    (since, after_id): (DateTime<Utc>, Uuid),
) -> Result<Vec<Item>, sqlx::Error> {
    let mut tx = s.pool.begin().await?;
    if tenant_sql::enter_active_readonly(&mut tx, tenant)
        .await?
        .is_none()
    {
        return Ok(Vec::new());
    }
    let (user_filter, team_filter) = visibility.filters();
    // occurred_at bound: received_at is not the partition key; events are at most the
    // retention window old, which keeps the scan to live partitions.
    let oldest = since - chrono::Duration::days(91);
    sqlx::query_as(SINCE_SQL)
        .bind(since)
        .bind(oldest)
        .bind(user_filter)
        .bind(team_filter)
        .bind(after_id)
        .fetch_all(&mut *tx)
        .await
}

/// Running totals of the last 24 hours, sent after each burst of activity.
#[derive(Debug, Serialize)]
struct Totals {
    events_24h: i64,
    commands_24h: i64,
    command_errors_24h: i64,
    as_of: Option<DateTime<Utc>>,
}

async fn totals(
    s: &AppState,
    tenant: TenantId,
    visibility: &Visibility,
) -> Result<Totals, sqlx::Error> {
    let mut tx = s.pool.begin().await?;
    if tenant_sql::enter_active_readonly(&mut tx, tenant)
        .await?
        .is_none()
    {
        return Ok(Totals {
            events_24h: 0,
            commands_24h: 0,
            command_errors_24h: 0,
            as_of: None,
        });
    }
    let (user_filter, team_filter) = visibility.filters();
    let (events, commands, errors): (i64, i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(count), 0)::bigint,
                coalesce(sum(count) FILTER (WHERE event_type = 'command.executed'), 0)::bigint,
                coalesce(sum(errors) FILTER (WHERE event_type = 'command.executed'), 0)::bigint
           FROM activity_1m
          WHERE bucket >= now() - interval '24 hours'
            AND ($1::text IS NULL OR user_id = $1) AND ($2::text[] IS NULL OR team_id = ANY($2))",
    )
    .bind(user_filter)
    .bind(team_filter)
    .fetch_one(&mut *tx)
    .await?;
    let as_of: Option<DateTime<Utc>> = sqlx::query_scalar("SELECT as_of FROM projection_state")
        .fetch_one(&mut *tx)
        .await?;
    Ok(Totals {
        events_24h: events,
        commands_24h: commands,
        command_errors_24h: errors,
        as_of,
    })
}

/// Counts an open live feed in `sse_connections` for as long as it lives, however it ends.
struct Connected;

impl Connected {
    fn new() -> Self {
        metrics::gauge!("sse_connections").increment(1.0);
        Connected
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        metrics::gauge!("sse_connections").decrement(1.0);
    }
}

/// `GET /v1/stream`
pub async fn stream(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> Result<Sse<impl futures::Stream<Item = Result<Event, Infallible>>>, Problem> {
    let reader = crate::auth::reader(&s, &headers).await?;
    // Event ids are the feed's cursors; one this API did not give starts from now.
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|c| crate::cursor::decode::<Uuid>(c).ok());
    let start = resume.unwrap_or_else(|| (Utc::now(), Uuid::nil()));
    let (tenant, visibility) = (reader.tenant, reader.visibility);
    let wake = s.hub.subscribe(tenant);
    let state = (
        s,
        wake,
        start,
        VecDeque::<Item>::new(),
        false,
        Connected::new(),
    );
    let events = futures::stream::unfold(
        state,
        move |(s, mut wake, mut cursor, mut queue, mut totals_due, connected)| {
            let visibility = visibility.clone();
            async move {
                loop {
                    if queue.is_empty() && totals_due {
                        totals_due = false;
                        match totals(&s, tenant, &visibility).await {
                            Ok(t) => {
                                let event = Event::default()
                                    .event("totals")
                                    .json_data(&t)
                                    .unwrap_or_else(|_| Event::default().comment("unserializable"));
                                return Some((
                                    Ok(event),
                                    (s, wake, cursor, queue, totals_due, connected),
                                ));
                            }
                            Err(e) => tracing::warn!(error = %e, "live totals query failed"),
                        }
                    }
                    if let Some(item) = queue.pop_front() {
                        cursor = cursor.max((item.received_at, item.event_id));
                        let event = Event::default()
                            .event("activity")
                            .id(crate::cursor::encode(item.received_at, item.event_id))
                            .json_data(&item)
                            .unwrap_or_else(|_| Event::default().comment("unserializable"));
                        return Some((Ok(event), (s, wake, cursor, queue, totals_due, connected)));
                    }
                    if s.shutdown.is_set() {
                        return None;
                    }
                    match since(&s, tenant, &visibility, cursor).await {
                        Ok(items) if !items.is_empty() => {
                            queue = items.into();
                            totals_due = true;
                            continue;
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "live feed query failed"),
                    }
                    // Wait for the projector's notification (one sent while the query ran
                    // is already queued), or look again after the poll interval.
                    let _ = tokio::time::timeout(s.hub.poll_interval(), wake.recv()).await;
                }
            }
        },
    );
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
