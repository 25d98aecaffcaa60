//! `GET /v1/stream`: Server-Sent Events of the caller's new activity (`activity` events) and,
//! after each burst, the updated 24-hour totals (`totals` events), tenant- and scope-bound.
//!
//! The projector publishes `tally:projected:<tenant>` in Redis after each commit; a single
//! subscriber here wakes the streams of that tenant, which then read what was projected after
//! their position — with the caller's visibility, from the tenant's own schema under its
//! role. While that subscription is down, streams check every 2 s (and every 30 s otherwise,
//! in case a notification was lost).
//!
//! A position is the projector transaction that wrote a row and the row's ordinal in it
//! (`feed_seq`, `feed_ord`, indexed): one tenant's transactions commit in that order (see
//! `migrations/tenant/0006_feed_position.sql`), so an event projected late, whatever its
//! times, is still after every position already read. Each event's `id` is its position,
//! so a client reconnecting with `Last-Event-ID` resumes where it left off.
//!
//! The credential is checked again every `stream_recheck_secs`; when it no longer holds the
//! stream sends a `closed` event and ends. Open streams are capped per tenant and in all.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;
use shared::problem::Problem;
use shared::tenant::TenantId;
use shared::tenant_sql;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::auth::{Reader, Visibility};
use crate::state::AppState;

/// Per-tenant wake-ups, fed by one Redis subscription, and the count of open streams.
#[derive(Clone, Default)]
pub struct Hub {
    tenants: Arc<Mutex<HashMap<TenantId, broadcast::Sender<()>>>>,
    /// Whether the Redis subscription is up (wake-ups arrive).
    live: Arc<AtomicBool>,
    open: Arc<Mutex<OpenStreams>>,
}

#[derive(Default)]
struct OpenStreams {
    per_tenant: HashMap<TenantId, usize>,
    total: usize,
}

/// One open stream, counted (also in `sse_connections`) for as long as it lives, however it
/// ends.
struct Slot {
    open: Arc<Mutex<OpenStreams>>,
    tenant: TenantId,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("hub lock");
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_tenant.get_mut(&self.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.per_tenant.remove(&self.tenant);
            }
        }
        metrics::gauge!("sse_connections").decrement(1.0);
    }
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

    /// A place for one more stream of `tenant`, or a 429 when the tenant or the process
    /// already has as many open as allowed.
    fn admit(&self, tenant: TenantId, per_tenant: usize, total: usize) -> Result<Slot, Problem> {
        let mut open = self.open.lock().expect("hub lock");
        let mine = open.per_tenant.get(&tenant).copied().unwrap_or(0);
        let refuse = |detail: String| {
            metrics::counter!("sse_refused_total").increment(1);
            Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-streams",
                "Too many live feeds",
                detail,
            )
            .with_retry_after(30)
        };
        if mine >= per_tenant {
            return Err(refuse(format!(
                "this tenant already has {mine} live feeds open (at most {per_tenant}); close one"
            )));
        }
        if open.total >= total {
            return Err(refuse(
                "this server has as many live feeds open as it serves; retry later".into(),
            ));
        }
        open.total += 1;
        *open.per_tenant.entry(tenant).or_default() += 1;
        metrics::gauge!("sse_connections").increment(1.0);
        Ok(Slot {
            open: self.open.clone(),
            tenant,
        })
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

/// A place in a tenant's feed: after row `ord` of projector transaction `seq` of projection
/// version `version` (version 0: before the tenant had any projection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub version: i32,
    pub seq: i64,
    pub ord: i32,
}

impl Position {
    /// Before anything of whichever projection the tenant gets first.
    const BEFORE_ANY: Position = Position {
        version: 0,
        seq: 0,
        ord: -1,
    };

    /// As an SSE event id: `<version>.<seq>.<ord>`.
    pub fn encode(&self) -> String {
        format!("{}.{}.{}", self.version, self.seq, self.ord)
    }

    /// An id [`Position::encode`] made; `None` for anything else.
    pub fn decode(s: &str) -> Option<Position> {
        let mut parts = s.trim().split('.');
        let p = Position {
            version: parts.next()?.parse().ok()?,
            seq: parts.next()?.parse().ok()?,
            ord: parts.next()?.parse().ok()?,
        };
        (parts.next().is_none() && p.version >= 0 && p.seq >= 0).then_some(p)
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
    #[serde(skip)]
    feed_seq: i64,
    #[serde(skip)]
    feed_ord: i32,
}

const SINCE_SQL: &str = "SELECT event_id, occurred_at, received_at, event_type, user_id, team_id,
        name, status, duration_ms, feed_seq, feed_ord
   FROM activity_events
  WHERE (feed_seq, feed_ord) > ($1, $2)
    AND ($3::text IS NULL OR user_id = $3) AND ($4::text[] IS NULL OR team_id = ANY($4))
  ORDER BY feed_seq, feed_ord
  LIMIT 1000";

/// The position after everything the tenant's active projection has now.
async fn present(s: &AppState, tenant: TenantId) -> Result<Position, sqlx::Error> {
    let mut tx = s.pool.begin().await?;
    let Some(version) = tenant_sql::enter_active_readonly(&mut tx, tenant).await? else {
        return Ok(Position::BEFORE_ANY);
    };
    let seq: i64 = sqlx::query_scalar("SELECT seq FROM projection_state")
        .fetch_one(&mut *tx)
        .await?;
    Ok(Position {
        version,
        seq,
        ord: i32::MAX,
    })
}

/// Events of the tenant projected after `at`, oldest first, and the position they follow:
/// `at` itself, or — when the active projection is not the one `at` belongs to — its
/// start (the tenant's first projection) or its present (a replay switched versions, and
/// the old version's positions mean nothing in the new one).
async fn since(
    s: &AppState,
    tenant: TenantId,
    visibility: &Visibility,
    at: Position,
) -> Result<(Position, Vec<Item>), sqlx::Error> {
    let mut tx = s.pool.begin().await?;
    let Some(version) = tenant_sql::enter_active_readonly(&mut tx, tenant).await? else {
        return Ok((at, Vec::new()));
    };
    let at = if at.version == version {
        at
    } else if at.version == 0 {
        Position {
            version,
            seq: 0,
            ord: -1,
        }
    } else {
        let seq: i64 = sqlx::query_scalar("SELECT seq FROM projection_state")
            .fetch_one(&mut *tx)
            .await?;
        Position {
            version,
            seq,
            ord: i32::MAX,
        }
    };
    let (user_filter, team_filter) = visibility.filters();
    let items = sqlx::query_as(SINCE_SQL)
        .bind(at.seq)
        .bind(at.ord)
        .bind(user_filter)
        .bind(team_filter)
        .fetch_all(&mut *tx)
        .await?;
    Ok((at, items))
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

/// One open stream.
struct Feed {
    s: AppState,
    reader: Reader,
    wake: broadcast::Receiver<()>,
    at: Position,
    queue: VecDeque<Item>,
    totals_due: bool,
    next_check: Instant,
    closed: bool,
    _slot: Slot,
}

impl Feed {
    fn recheck_interval(&self) -> Duration {
        Duration::from_secs(self.s.config.stream_recheck_secs)
    }

    /// The next event to send, waiting for one; `None` ends the stream.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if self.closed || self.s.shutdown.is_set() {
                return None;
            }
            if Instant::now() >= self.next_check {
                self.next_check = Instant::now() + self.recheck_interval();
                match crate::auth::recheck(&self.s, &self.reader).await {
                    Ok(()) => {}
                    // It cannot be checked right now: stay open and check again next time.
                    Err(p) if p.status >= 500 => {
                        tracing::warn!(detail = %p.detail, "live feed credential re-check failed");
                    }
                    Err(p) => {
                        self.closed = true;
                        metrics::counter!("sse_closed_total", "reason" => "credential")
                            .increment(1);
                        let body = serde_json::json!({"status": p.status, "detail": p.detail});
                        return Some(
                            Event::default()
                                .event("closed")
                                .json_data(body)
                                .unwrap_or_else(|_| Event::default().event("closed")),
                        );
                    }
                }
            }
            if self.queue.is_empty() && self.totals_due {
                self.totals_due = false;
                match totals(&self.s, self.reader.tenant, &self.reader.visibility).await {
                    Ok(t) => {
                        return Some(
                            Event::default()
                                .event("totals")
                                .json_data(&t)
                                .unwrap_or_else(|_| Event::default().comment("unserializable")),
                        );
                    }
                    Err(e) => tracing::warn!(error = %e, "live totals query failed"),
                }
            }
            if let Some(item) = self.queue.pop_front() {
                self.at = Position {
                    version: self.at.version,
                    seq: item.feed_seq,
                    ord: item.feed_ord,
                };
                return Some(
                    Event::default()
                        .event("activity")
                        .id(self.at.encode())
                        .json_data(&item)
                        .unwrap_or_else(|_| Event::default().comment("unserializable")),
                );
            }
            match since(
                &self.s,
                self.reader.tenant,
                &self.reader.visibility,
                self.at,
            )
            .await
            {
                Ok((at, items)) => {
                    self.at = at;
                    if !items.is_empty() {
                        self.queue = items.into();
                        self.totals_due = true;
                        continue;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "live feed query failed"),
            }
            // Wait for the projector's notification (one sent while the query ran is already
            // queued), or look again after the poll interval or at the next re-check.
            let wait = self
                .s
                .hub
                .poll_interval()
                .min(self.next_check.saturating_duration_since(Instant::now()));
            let _ = tokio::time::timeout(wait, self.wake.recv()).await;
        }
    }
}

/// `GET /v1/stream`
pub async fn stream(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> Result<Sse<impl futures::Stream<Item = Result<Event, Infallible>>>, Problem> {
    // A stream outlives the short credential caches that other requests use: the credential
    // is checked as it is now (a key revoked a moment ago opens nothing).
    let reader = crate::auth::reader_uncached(&s, &headers).await?;
    let slot = s.hub.admit(
        reader.tenant,
        s.config.stream_max_per_tenant,
        s.config.stream_max_total,
    )?;
    // Event ids are the feed's positions; one this API did not give (or not for the version
    // now served, or ahead of it) starts from now.
    let now = present(&s, reader.tenant)
        .await
        .map_err(super::dashboard::db_error)?;
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(Position::decode);
    let at = match resume {
        Some(p) if p.version == 0 || (p.version == now.version && p.seq <= now.seq) => p,
        _ => now,
    };
    let feed = Feed {
        wake: s.hub.subscribe(reader.tenant),
        next_check: Instant::now() + Duration::from_secs(s.config.stream_recheck_secs),
        s,
        reader,
        at,
        queue: VecDeque::new(),
        totals_due: false,
        closed: false,
        _slot: slot,
    };
    let events = futures::stream::unfold(feed, |mut feed| async move {
        let event = feed.next().await?;
        Some((Ok::<_, Infallible>(event), feed))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_others_are_ignored() {
        let p = Position {
            version: 2,
            seq: 41,
            ord: 7,
        };
        assert_eq!(Position::decode(&p.encode()), Some(p));
        for bad in ["", "1.2", "1.2.3.4", "a.b.c", "-1.2.3", "MjAyNi0xMS0wMQ"] {
            assert_eq!(Position::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn streams_are_capped_per_tenant_and_in_all() {
        let hub = Hub::default();
        let (a, b) = (TenantId(Uuid::now_v7()), TenantId(Uuid::now_v7()));
        let a1 = hub.admit(a, 2, 3).unwrap();
        let _a2 = hub.admit(a, 2, 3).unwrap();
        assert_eq!(hub.admit(a, 2, 3).err().map(|p| p.status), Some(429));
        let _b1 = hub.admit(b, 2, 3).unwrap();
        assert_eq!(hub.admit(b, 2, 3).err().map(|p| p.status), Some(429));
        drop(a1);
        assert!(hub.admit(b, 2, 3).is_ok());
    }
}
