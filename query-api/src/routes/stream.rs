//! `GET /v1/stream`: Server-Sent Events of the caller's new activity (`activity` events),
//! after each burst the updated 24-hour totals (`totals` events), and what fires (`alert`
//! events: budget thresholds and rules the caller may see), tenant- and scope-bound.
//!
//! The projector publishes on the tenant's channel in Redis (`shared::watermark`) after each
//! commit; the hub's one subscriber ([`crate::hub`]) wakes the streams of that tenant, which
//! then read what was projected after their position — with the caller's visibility, from
//! the tenant's own schema under its role. While that subscription is down, streams check
//! every 2 s (and every 30 s otherwise, in case a notification was lost).
//!
//! A position is the projector transaction that wrote a row and the row's ordinal in it
//! (`feed_seq`, `feed_ord`, indexed): one tenant's transactions commit in that order (see
//! `migrations/tenant/0006_feed_position.sql`), so an event projected late, whatever its
//! times, is still after every position already read. Each event's `id` is its position,
//! so a client reconnecting with `Last-Event-ID` resumes where it left off.
//!
//! The credential is checked again every `stream_recheck_secs`; when it no longer holds the
//! stream sends a `closed` event and ends. Open streams are capped per tenant and in all.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use chrono::{DateTime, Utc};
use serde::Serialize;
use shared::problem::Problem;
use shared::serve::Peer;
use shared::tenant::TenantId;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::auth::{Reader, Visibility};
use crate::hub::Slot;
use crate::read::{db_error, tenant};
use crate::state::AppState;

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
    let Some(read) = tenant::open(s, tenant).await? else {
        return Ok(Position::BEFORE_ANY);
    };
    Ok(Position {
        version: read.fresh.version,
        seq: read.fresh.seq,
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
    let Some(mut entered) = tenant::enter(s, tenant).await? else {
        return Ok((at, Vec::new()));
    };
    let (tx, version) = (&mut *entered.tx, entered.version);
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
    let Some(mut entered) = tenant::enter(s, tenant).await? else {
        return Ok(Totals {
            events_24h: 0,
            commands_24h: 0,
            command_errors_24h: 0,
            as_of: None,
        });
    };
    let tx = &mut *entered.tx;
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
    /// Alerts after this (time, id) are still to be sent (they carry no event id: a client
    /// that reconnects finds the ones it missed at `GET /v1/firings`).
    alerts_after: (DateTime<Utc>, Uuid),
    alerts: VecDeque<serde_json::Value>,
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
                match self.s.auth.recheck(&self.reader).await {
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
            if let Some(alert) = self.alerts.pop_front() {
                return Some(
                    Event::default()
                        .event("alert")
                        .json_data(&alert)
                        .unwrap_or_else(|_| Event::default().comment("unserializable")),
                );
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
            match super::budgets::visible_firings(
                &self.s.pool,
                &self.reader,
                Some(self.alerts_after),
                20,
            )
            .await
            {
                Ok(fired) if !fired.is_empty() => {
                    if let Some((t, id, _)) = fired.last() {
                        self.alerts_after = (*t, *id);
                    }
                    self.alerts = fired.into_iter().map(|(_, _, v)| v).collect();
                    continue;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "live alerts query failed"),
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
    Peer(peer): Peer,
    headers: HeaderMap,
) -> Result<Sse<impl futures::Stream<Item = Result<Event, Infallible>>>, Problem> {
    // Counted against the tenant's read limit first, by the cached credential, so that
    // requests past it cost no control-plane query.
    let cached = s.auth.reader(&headers, peer).await?;
    crate::read::context::within_read_limit(&s, &cached).await?;
    // A stream outlives the short credential caches that other requests use: the credential
    // is checked as it is now (a key revoked a moment ago opens nothing).
    let reader = s.auth.reader_uncached(&headers, peer).await?;
    reader.require_individual_view("the live feed")?;
    if reader.audits_individual_reads() {
        let everyone = ["everyone in the live feed".to_string()];
        crate::read::privacy::record(&s, &reader, &everyone, "live feed").await?;
    }
    let slot = s.hub.admit(
        reader.tenant,
        s.config.stream_max_per_tenant,
        s.config.stream_max_total,
    )?;
    // Event ids are the feed's positions; one this API did not give (or not for the version
    // now served, or ahead of it) starts from now.
    let now = present(&s, reader.tenant).await.map_err(db_error)?;
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
        alerts_after: (Utc::now(), Uuid::nil()),
        alerts: VecDeque::new(),
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
}
