//! Privacy mode on the read side: the audit of reads of other people's individual data.
//! Which reader sees what is [`crate::auth::Reader::aggregates_only`]; the aggregates such a
//! reader gets are each view's own (team × day cells of at least `k` people).

use axum::body::Body;
use axum::response::Response;
use serde_json::Value;
use shared::events::{Actor, AuthEvent, AuthKind};
use shared::outbox;
use shared::problem::Problem;

use crate::auth::{Credential, Reader};
use crate::state::AppState;

/// What privacy mode's aggregates are made of, for a reader who sees only those: the
/// smallest group `k`, and the tenant's active members as (user id, team) pairs (`''` for a
/// member of no team) — the only people a cell counts (`private_cells` in the tenant
/// template).
pub struct Cells {
    pub k: i32,
    pub ids: Vec<String>,
    pub teams: Vec<String>,
}

impl Cells {
    /// The cells of `reader`'s tenant, or `None` when the reader is not held to aggregates.
    pub async fn of(pool: &sqlx::PgPool, reader: &Reader) -> Result<Option<Cells>, Problem> {
        let Some(k) = reader.aggregates_only() else {
            return Ok(None);
        };
        let pairs: Vec<(String, String)> = sqlx::query_as(
            "SELECT u.external_id, t
               FROM control.users u,
                    unnest(CASE WHEN cardinality(u.teams) = 0 THEN ARRAY[''] ELSE u.teams END) t
              WHERE u.tenant_id = $1 AND u.status = 'active'
              ORDER BY 1, 2",
        )
        .bind(reader.tenant.0)
        .fetch_all(pool)
        .await
        .map_err(crate::read::db_error)?;
        let (ids, teams) = pairs.into_iter().unzip();
        Ok(Some(Cells {
            k: i32::try_from(k).unwrap_or(i32::MAX),
            ids,
            teams,
        }))
    }

    /// The SQL parameters of `private_cells`: k, the ids and their teams (all null for a
    /// reader not held to aggregates, whose queries then skip the cells).
    pub fn binds(cells: Option<&Cells>) -> (Option<i32>, Option<&[String]>, Option<&[String]>) {
        match cells {
            None => (None, None, None),
            Some(c) => (Some(c.k), Some(&c.ids), Some(&c.teams)),
        }
    }

    /// The rollups a query reads: the daily ones with cells (they are days, over a range of
    /// whole days), else `otherwise`.
    pub fn grain(cells: Option<&Cells>, otherwise: crate::range::Grain) -> crate::range::Grain {
        match cells {
            Some(_) => crate::range::Grain::Day,
            None => otherwise,
        }
    }

    /// For the cache key: answers computed with other members are other answers.
    pub fn digest(&self) -> String {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (self.k, &self.ids, &self.teams).hash(&mut h);
        format!("cells={:016x}", h.finish())
    }
}

/// The most people one audit entry names; beyond them it says how many more.
const MAX_NAMED: usize = 50;

/// Largest answer body read back to learn whose data it holds.
const MAX_AUDITED_BODY: usize = 64 << 20;

/// The `target` of an audit entry naming `whose` (user ids as events carry them).
fn target(whose: &[String]) -> String {
    let mut named: Vec<&str> = whose.iter().take(MAX_NAMED).map(String::as_str).collect();
    let more = whose.len().saturating_sub(MAX_NAMED);
    let more = format!("and {more} more");
    if whose.len() > MAX_NAMED {
        named.push(&more);
    }
    named.join(", ")
}

/// Writes `privacy.individual_read` (who: the actor; whose: `target`; what: `detail`) to
/// the outbox; ingest-api's relay sends it to the audit log within a second.
pub async fn record(
    s: &AppState,
    reader: &Reader,
    whose: &[String],
    what: &str,
) -> Result<(), Problem> {
    let actor = match &reader.credential {
        Credential::ApiKey { key_id } => Actor {
            api_key_id: Some(*key_id),
            ..Actor::default()
        },
        Credential::AccessToken { user_id, .. } => Actor {
            user_id: Some(*user_id),
            ..Actor::default()
        },
    };
    let event = AuthEvent {
        user_id: actor.user_id,
        target: Some(target(whose)),
        detail: Some(what.to_string()),
        ..AuthEvent::default()
    };
    let env = outbox::auth_event(reader.tenant, AuthKind::IndividualRead, actor, event);
    let mut conn = s.pool.acquire().await.map_err(unaudited)?;
    outbox::record(&mut conn, &s.config.common.topic_prefix, &env)
        .await
        .map_err(unaudited)
}

fn unaudited(e: sqlx::Error) -> Problem {
    tracing::error!(error = %e, "an individual read could not be audited");
    Problem::unavailable(
        "this read of individual data cannot be audited right now, so it is not served",
        2,
    )
}

/// `res`, after auditing the reader's read of the people in it other than themself (the
/// user ids `whose` finds in the JSON answer), when their reads are audited; a read that
/// cannot be audited is not served (503).
pub async fn audited(
    s: &AppState,
    reader: &Reader,
    what: &str,
    res: Response,
    whose: impl Fn(&Value) -> Vec<String>,
) -> Result<Response, Problem> {
    if !reader.audits_individual_reads() || !res.status().is_success() {
        return Ok(res);
    }
    let (parts, sent, json) = super::encoding::read_back(res, MAX_AUDITED_BODY)
        .await
        .ok_or_else(|| Problem::unavailable("the answer could not be read back", 1))?;
    // An answer that cannot be read cannot be audited, so it is not served.
    let answer: Value = serde_json::from_slice(&json)
        .map_err(|_| Problem::unavailable("the answer could not be read back", 1))?;
    let mut people: Vec<String> = whose(&answer)
        .into_iter()
        .filter(|p| !p.is_empty() && Some(p) != reader.person.as_ref())
        .collect();
    people.sort();
    people.dedup();
    if !people.is_empty() {
        record(s, reader, &people, what).await?;
    }
    Ok(Response::from_parts(parts, Body::from(sent)))
}

/// The strings in the array at `list` of `answer`.
pub fn strings_at(answer: &Value, list: &str) -> Vec<String> {
    answer
        .get(list)
        .and_then(Value::as_array)
        .map(|v| {
            v.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The string values at `field` of each object in the array at `list` of `answer`.
pub fn ids_in(answer: &Value, list: &str, field: &str) -> Vec<String> {
    answer
        .get(list)
        .and_then(Value::as_array)
        .map(|rows| {
            rows.iter()
                .filter_map(|r| r.get(field).and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_names_at_most_fifty_people() {
        let few: Vec<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
        assert_eq!(target(&few), "a, b");
        let many: Vec<String> = (0..60).map(|i| format!("u{i}")).collect();
        let t = target(&many);
        assert!(t.starts_with("u0, u1, "), "{t}");
        assert!(t.ends_with("u49, and 10 more"), "{t}");
    }
}
