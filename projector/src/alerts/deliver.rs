//! Delivering firings: at least once, with the same `webhook-id` (the delivery's id) on every
//! attempt, retried with exponential back-off and jitter for more than a day, every attempt
//! recorded. A delivery is leased while it is attempted, so that another instance (or this
//! one restarted after a crash) takes it over only once the lease has run out. Each attempt
//! runs in its own task under a bounded concurrency and timeout: a slow receiver holds one
//! slot for at most the timeout, never the others, and one tenant's deliveries hold fewer than
//! twice [`TENANT_SHARE`] of the slots at once. A delivery that runs out of attempts
//! pauses its channel, and the tenant's other channels are told.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use serde_json::{json, Value};
use shared::secretbox::SecretKey;
use shared::webhooks::{self, ChannelSecrets};
use sqlx::PgPool;
use tokio::sync::{watch, Notify, Semaphore};
use uuid::Uuid;

/// Waits after each failed attempt (±20 % jitter): 5 s, 20 s, 1 min, 5 min, 15 min, 30 min,
/// 1 h, 2 h, 4 h, then 8 h three times — attempts over about 32 hours.
const BACKOFF_SECS: [i64; 12] = [
    5, 20, 60, 300, 900, 1800, 3600, 7200, 14_400, 28_800, 28_800, 28_800,
];
/// How long one attempt may take, connection included.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// A claimed delivery is another instance's to take over after this.
const LEASE_SECS: i64 = 30;
/// Most attempts in flight per process.
const CONCURRENCY: usize = 32;
/// One tenant's share of them: a tenant holding this many is not claimed for until one ends,
/// and a claim takes no more than this, so a tenant holds fewer than twice as many. One whose
/// receivers hang (each attempt then holds its slot for [`ATTEMPT_TIMEOUT`]) with thousands of
/// deliveries due cannot hold the other tenants' back.
const TENANT_SHARE: usize = 8;
/// What is kept of a receiver's answer.
const EXCERPT_BYTES: usize = 512;

/// The wait after attempt `n` (1-based) failed, or `None` when it was the last.
pub fn backoff(n: i32, jitter: f64) -> Option<TimeDelta> {
    let base = *BACKOFF_SECS.get(usize::try_from(n).ok()?.checked_sub(1)?)?;
    let ms = (base as f64 * 1000.0 * (1.0 + 0.2 * jitter.clamp(-1.0, 1.0))) as i64;
    Some(TimeDelta::milliseconds(ms))
}

pub struct Deliverer {
    pub pool: PgPool,
    pub key: Option<SecretKey>,
    pub client: reqwest::Client,
    pub wake: Arc<Notify>,
}

/// Attempts in flight, by tenant.
type Held = Arc<Mutex<HashMap<Uuid, usize>>>;

/// One attempt of a tenant in flight: counted in [`Held`] while it lives, however its task
/// ends (a panicking attempt too, which would otherwise leave its tenant counted for ever).
struct Holding {
    held: Held,
    tenant: Uuid,
}

impl Holding {
    fn new(held: &Held, tenant: Uuid) -> Holding {
        *held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(tenant)
            .or_default() += 1;
        Holding {
            held: held.clone(),
            tenant,
        }
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Entry::Occupied(mut n) = held.entry(self.tenant) {
            *n.get_mut() -= 1;
            if *n.get() == 0 {
                n.remove();
            }
        }
    }
}

struct Claimed {
    id: Uuid,
    tenant: Uuid,
    channel: Uuid,
    attempt: i32,
    /// The attempt's number in its round (a redelivery begins a new one).
    in_round: i32,
    kind: String,
    sealed: Vec<u8>,
    payload: Value,
}

impl Deliverer {
    /// Sends what is due until `stop` flips.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let slots = Arc::new(Semaphore::new(CONCURRENCY));
        let held: Held = Arc::default();
        loop {
            // At most a tenant's share at a time, and none of a tenant that holds its share:
            // the oldest due deliveries of one tenant fill its share, then others' are taken.
            let free = slots.available_permits().min(TENANT_SHARE);
            let full: Vec<Uuid> = held
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .filter(|(_, &n)| n >= TENANT_SHARE)
                .map(|(t, _)| *t)
                .collect();
            let claimed = match free {
                0 => Vec::new(),
                n => self.claim(n as i64, &full).await.unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "cannot claim due deliveries");
                    Vec::new()
                }),
            };
            let busy = claimed.len() == free && free > 0;
            for c in claimed {
                let permit = slots.clone().acquire_owned().await.expect("never closed");
                let holding = Holding::new(&held, c.tenant);
                let me = self.clone();
                tokio::spawn(async move {
                    me.attempt(c).await;
                    drop((holding, permit));
                });
            }
            if busy {
                continue;
            }
            tokio::select! {
                _ = stop.changed() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Leases up to `n` due deliveries of unpaused channels, none of the tenants in `full`, and
    /// counts their attempt. At most [`TENANT_SHARE`] of one tenant: `n` is no more.
    async fn claim(&self, n: i64, full: &[Uuid]) -> sqlx::Result<Vec<Claimed>> {
        type Row = (Uuid, Uuid, Uuid, i32, i32, String, Vec<u8>, Value);
        let rows: Vec<Row> = sqlx::query_as(
            "WITH due AS (
                 SELECT d.id FROM control.deliveries d
                   JOIN control.channels c ON c.id = d.channel_id
                  WHERE d.status = 'pending' AND d.next_attempt_at <= now()
                    AND (d.leased_until IS NULL OR d.leased_until < now())
                    AND c.paused_at IS NULL
                    AND NOT (d.tenant_id = ANY($3))
                  ORDER BY d.next_attempt_at
                  LIMIT $1
                  FOR UPDATE OF d SKIP LOCKED),
             leased AS (
                 UPDATE control.deliveries d
                    SET leased_until = now() + make_interval(secs => $2), attempts = attempts + 1
                   FROM due WHERE d.id = due.id
                 RETURNING d.id, d.tenant_id, d.channel_id, d.attempts, d.round_start,
                           d.firing_id)
             SELECT l.id, l.tenant_id, l.channel_id, l.attempts, l.round_start, c.kind, c.sealed,
                    f.payload
               FROM leased l
               JOIN control.channels c ON c.id = l.channel_id
               JOIN control.firings f ON f.id = l.firing_id",
        )
        .bind(n)
        .bind(LEASE_SECS as f64)
        .bind(full)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(id, tenant, channel, attempt, round_start, kind, sealed, payload)| Claimed {
                    id,
                    tenant,
                    channel,
                    attempt,
                    in_round: attempt - round_start,
                    kind,
                    sealed,
                    payload,
                },
            )
            .collect())
    }

    async fn attempt(&self, c: Claimed) {
        let started = Instant::now();
        let outcome = self.send(&c).await;
        let latency = started.elapsed().as_millis().min(i32::MAX as u128) as i32;
        let (code, excerpt, error) = match &outcome {
            Ok((code, excerpt)) => (Some(i32::from(*code)), Some(excerpt.clone()), None),
            Err(e) => (None, None, Some(e.clone())),
        };
        let ok = code.is_some_and(|c| (200..300).contains(&c));
        metrics::counter!("alert_delivery_attempts_total", "ok" => ok.to_string()).increment(1);
        if let Err(e) = self.record(&c, code, excerpt, error, latency, ok).await {
            // The lease runs out and the attempt is made again: at least once.
            tracing::warn!(delivery = %c.id, error = %e, "cannot record a delivery attempt");
        }
    }

    /// Sends one attempt: the status and the first bytes of the answer, or why there was none.
    async fn send(&self, c: &Claimed) -> Result<(u16, String), String> {
        let key = self
            .key
            .as_ref()
            .ok_or("the service's secret_key is not configured")?;
        let secrets = ChannelSecrets::open(key, &c.sealed)
            .ok_or("the channel cannot be opened with the service's secret_key")?;
        let now = Utc::now();
        let (body, headers) = match c.kind.as_str() {
            "slack" => (slack_body(&c.payload), Vec::new()),
            _ => {
                let body = serde_json::to_vec(&c.payload).expect("JSON");
                let id = c.id.to_string();
                let ts = now.timestamp();
                let sig = webhooks::signature(&secrets.signing(now), &id, ts, &body);
                let headers = vec![
                    ("webhook-id", id),
                    ("webhook-timestamp", ts.to_string()),
                    ("webhook-signature", sig),
                ];
                (body, headers)
            }
        };
        let mut req = self
            .client
            .post(&secrets.url)
            .header("content-type", "application/json")
            .body(body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let mut res = req.send().await.map_err(|e| describe(&e))?;
        let status = res.status().as_u16();
        let mut excerpt = Vec::new();
        while excerpt.len() < EXCERPT_BYTES {
            match res.chunk().await {
                Ok(Some(chunk)) => excerpt.extend_from_slice(&chunk),
                _ => break,
            }
        }
        excerpt.truncate(EXCERPT_BYTES);
        Ok((status, String::from_utf8_lossy(&excerpt).replace('\0', "")))
    }

    async fn record(
        &self,
        c: &Claimed,
        code: Option<i32>,
        excerpt: Option<String>,
        error: Option<String>,
        latency: i32,
        ok: bool,
    ) -> sqlx::Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO control.delivery_attempts (delivery_id, attempt, status_code, latency_ms, error, excerpt)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(c.id)
        .bind(c.attempt)
        .bind(code)
        .bind(latency)
        .bind(error)
        .bind(excerpt)
        .execute(&mut *tx)
        .await?;
        if ok {
            sqlx::query(
                "UPDATE control.deliveries SET status = 'delivered', delivered_at = now(), leased_until = NULL
                  WHERE id = $1",
            )
            .bind(c.id)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE control.channels SET consecutive_failures = 0 WHERE id = $1 AND consecutive_failures <> 0")
                .bind(c.channel)
                .execute(&mut *tx)
                .await?;
        } else {
            let jitter = rand::random::<f64>() * 2.0 - 1.0;
            match backoff(c.in_round, jitter) {
                Some(wait) => {
                    sqlx::query(
                        "UPDATE control.deliveries SET next_attempt_at = $2, leased_until = NULL WHERE id = $1",
                    )
                    .bind(c.id)
                    .bind(Utc::now() + wait)
                    .execute(&mut *tx)
                    .await?;
                }
                None => self.give_up(&mut tx, c).await?,
            }
        }
        tx.commit().await
    }

    /// The last attempt failed: the delivery has failed, and its channel is paused; the
    /// tenant's other channels are told (a firing of its own).
    async fn give_up(&self, tx: &mut sqlx::PgConnection, c: &Claimed) -> sqlx::Result<()> {
        sqlx::query(
            "UPDATE control.deliveries SET status = 'failed', leased_until = NULL WHERE id = $1",
        )
        .bind(c.id)
        .execute(&mut *tx)
        .await?;
        let reason = format!("delivery {} failed after {} attempts", c.id, c.in_round);
        let paused: Option<(String, Option<Uuid>)> = sqlx::query_as(
            "UPDATE control.channels
                SET consecutive_failures = consecutive_failures + 1, paused_at = now(),
                    paused_reason = $2, updated_at = now()
              WHERE id = $1 AND paused_at IS NULL
             RETURNING name, owner_user_id",
        )
        .bind(c.channel)
        .bind(&reason)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((name, owner)) = paused else {
            return Ok(());
        };
        tracing::warn!(channel = %c.channel, %reason, "notification channel paused");
        let id = Uuid::now_v7();
        let payload = json!({
            "type": "channel.paused",
            "timestamp": Utc::now(),
            "data": {"firing_id": id, "tenant_id": c.tenant, "channel_id": c.channel,
                     "channel_name": name, "owner_user_id": owner, "reason": reason},
        });
        sqlx::query(
            "INSERT INTO control.firings (id, tenant_id, source, source_id, dedup, scope, scope_id, payload)
             VALUES ($1, $2, 'channel', $3, $4, 'tenant', '', $5) ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(c.tenant)
        .bind(c.channel)
        .bind(format!("channel-paused:{}", c.id))
        .bind(payload)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO control.deliveries (id, tenant_id, firing_id, channel_id)
             SELECT gen_random_uuid(), $1, $2, id FROM control.channels
              WHERE tenant_id = $1 AND id <> $3 AND paused_at IS NULL
                AND EXISTS (SELECT 1 FROM control.firings WHERE id = $2)",
        )
        .bind(c.tenant)
        .bind(id)
        .bind(c.channel)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

/// Why a request got no answer, without the URL (it may hold a credential).
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    let mut cause = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    match cause.is_empty() {
        true => kind.to_string(),
        false => format!("{kind}: {cause}"),
    }
}

/// A firing as a Slack message.
pub fn slack_body(payload: &Value) -> Vec<u8> {
    let d = &payload["data"];
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "—".into(),
        v => v.to_string(),
    };
    let link = d["dashboard_url"].as_str().unwrap_or("");
    let (title, summary, facts) = match payload["type"].as_str() {
        Some("budget.threshold_crossed") => {
            let b = &d["budget"];
            let unit = match b["metric"].as_str() {
                Some("cost_usd") => "$",
                _ => "",
            };
            let forecast = match d["forecast"]["reaches_at"].as_str() {
                Some(t) => format!("at this rate the budget is reached at {t}"),
                None => match d["forecast"]["outcome"].as_str() {
                    Some("reached") => "the budget is reached".into(),
                    _ => "at this rate the budget is not reached this period".into(),
                },
            };
            (
                format!(
                    "Budget {}: {} % crossed",
                    text(&b["name"]),
                    text(&d["threshold"])
                ),
                format!(
                    "{unit}{:.2} of {unit}{:.2} spent this {} ({:.0} %); {forecast}.",
                    d["spent"].as_f64().unwrap_or(0.0),
                    b["amount"].as_f64().unwrap_or(0.0),
                    text(&b["period"]),
                    d["percent"].as_f64().unwrap_or(0.0),
                ),
                vec![
                    (
                        "Scope".to_string(),
                        format!("{} {}", text(&b["scope"]), text(&b["scope_id"]))
                            .trim()
                            .to_string(),
                    ),
                    (
                        "Period".to_string(),
                        format!("{} – {}", text(&d["period_start"]), text(&d["period_end"])),
                    ),
                ],
            )
        }
        Some("rule.triggered") => {
            let (r, e) = (&d["rule"], &d["evaluation"]);
            let value = e["value"]
                .as_f64()
                .map_or("—".to_string(), |v| format!("{v:.2}"));
            let summary = match r["kind"].as_str() {
                Some("silence") => format!(
                    "No events for {} minutes after activity before.",
                    text(&r["window_minutes"])
                ),
                Some("anomaly") => format!(
                    "{} {value} over the last {} minutes against a baseline of {:.2} (z = {:.1}).",
                    text(&r["measure"]),
                    text(&r["window_minutes"]),
                    e["baseline_mean"].as_f64().unwrap_or(0.0),
                    e["score"].as_f64().unwrap_or(0.0),
                ),
                _ => format!(
                    "{} is {value} over the last {} minutes ({} {}).",
                    text(&r["kind"]).replace('_', " "),
                    text(&r["window_minutes"]),
                    text(&r["op"]),
                    text(&r["threshold"]),
                ),
            };
            (
                format!("Alert {}", text(&r["name"])),
                summary,
                vec![(
                    "Scope".to_string(),
                    format!("{} {}", text(&r["scope"]), text(&r["scope_id"]))
                        .trim()
                        .to_string(),
                )],
            )
        }
        Some("channel.paused") => (
            format!("Notification channel {} paused", text(&d["channel_name"])),
            text(&d["reason"]),
            Vec::new(),
        ),
        other => (
            other.unwrap_or("Tally").to_string(),
            d.to_string(),
            Vec::new(),
        ),
    };
    serde_json::to_vec(&webhooks::slack_message(&title, &summary, &facts, link)).expect("JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_go_on_for_more_than_a_day_with_jitter() {
        let total: i64 = (1..=12)
            .map(|n| backoff(n, 0.0).unwrap().num_seconds())
            .sum();
        assert!(total > 24 * 3600, "{total}");
        assert_eq!(backoff(13, 0.0), None);
        assert_eq!(backoff(0, 0.0), None);
        assert_eq!(backoff(1, 1.0), Some(TimeDelta::seconds(6)));
        assert_eq!(backoff(1, -1.0), Some(TimeDelta::seconds(4)));
    }

    #[test]
    fn a_budget_firing_reads_well_in_slack() {
        let payload = json!({"type": "budget.threshold_crossed", "data": {
            "budget": {"name": "Team A daily", "metric": "cost_usd", "amount": 10.0,
                       "period": "day", "scope": "team", "scope_id": "team-a"},
            "threshold": 80, "spent": 9.0, "percent": 90.0,
            "forecast": {"outcome": "will_reach", "reaches_at": "2026-12-02T15:00:00Z"},
            "dashboard_url": "https://tally.example.com/"}});
        let m: Value = serde_json::from_slice(&slack_body(&payload)).unwrap();
        assert_eq!(
            m["blocks"][0]["text"]["text"],
            "Budget Team A daily: 80 % crossed"
        );
        let summary = m["blocks"][1]["text"]["text"].as_str().unwrap();
        assert!(
            summary.starts_with("$9.00 of $10.00 spent this day (90 %)"),
            "{summary}"
        );
        assert_eq!(
            m["blocks"][3]["elements"][0]["url"],
            "https://tally.example.com/"
        );
    }
}
