//! Per-user productivity and team comparison, computed from the rollups.
//!
//! Productivity score (0–100), per user over the range: see [`FORMULA`]. A team's score is
//! the same formula over all its commands and agents, with the command term taken per
//! active user.

use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::events::FieldError;
use shared::problem::Problem;
use shared::tenant::TenantId;

use crate::auth::Visibility;
use crate::range::{Grain, TimeRange};
use crate::read::csv::{respond, wants_csv};
use crate::read::privacy::{ids_in, Cells};
use crate::read::{db_error, invalid, ranged, Read, TenantRead};

#[derive(Debug, Deserialize)]
pub struct RankedParams {
    /// `json` (default) or `csv`.
    pub format: Option<String>,
    pub range: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    /// Rows per page (1..=1000, default 100).
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

ranged!(RankedParams);

/// A page of a list ranked by score (descending), then key: the rows after `cursor`.
struct Page {
    limit: usize,
    after: Option<(f64, String)>,
}

impl Page {
    fn parse(limit: Option<usize>, cursor: Option<&str>) -> Result<Page, Problem> {
        let limit = limit.unwrap_or(100);
        if !(1..=1000).contains(&limit) {
            return Err(invalid(FieldError::new("limit", "must be 1..=1000")));
        }
        let after = cursor.map(crate::cursor::decode_ranked).transpose()?;
        Ok(Page { limit, after })
    }

    /// The page's rows of `sorted` (sorted by score descending, then key) and the cursor of
    /// the next page (absent on the last).
    fn take<T>(
        &self,
        sorted: Vec<T>,
        rank: impl Fn(&T) -> (f64, &str),
    ) -> (Vec<T>, Option<String>) {
        let start = match &self.after {
            None => 0,
            Some((score, key)) => sorted.partition_point(|row| {
                let (s, k) = rank(row);
                s > *score || (s == *score && k <= key.as_str())
            }),
        };
        let mut rows: Vec<T> = sorted.into_iter().skip(start).collect();
        let more = rows.len() > self.limit;
        rows.truncate(self.limit);
        let next = more
            .then(|| {
                rows.last().map(|r| {
                    let (s, k) = rank(r);
                    crate::cursor::encode_ranked(s, k)
                })
            })
            .flatten();
        (rows, next)
    }

    fn cache_key(&self) -> String {
        format!("{}:{:?}", self.limit, self.after)
    }
}

/// The inputs of the score and the score itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Score {
    pub commands: i64,
    pub success_rate: f64,
    pub avg_command_ms: Option<f64>,
    pub distinct_agents: i64,
    pub score: f64,
}

/// The documented formula. `commands_per_person` scales the volume term for teams.
pub fn score(
    commands: i64,
    errors: i64,
    duration_sum: i64,
    agents: i64,
    commands_per_person: f64,
) -> Score {
    let success_rate = if commands > 0 {
        1.0 - errors as f64 / commands as f64
    } else {
        0.0
    };
    let avg = (commands > 0).then(|| duration_sum as f64 / commands as f64);
    let speed = match avg {
        Some(a) if a > 0.0 => (5000.0 / a).min(1.0),
        Some(_) => 1.0,
        None => 0.0,
    };
    let value = 40.0 * success_rate
        + 30.0 * speed
        + 20.0 * (agents as f64 / 10.0).min(1.0)
        + 10.0 * (commands_per_person / 50.0).min(1.0);
    Score {
        commands,
        success_rate,
        avg_command_ms: avg,
        distinct_agents: agents,
        score: (value * 10.0).round() / 10.0,
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct UserProductivity {
    pub user_id: String,
    #[serde(flatten)]
    pub score: Score,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ProductivityAnswer {
    pub tenant_id: TenantId,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub as_of: Option<DateTime<Utc>>,
    pub formula: String,
    /// How many users the whole list has (over every page).
    pub total: usize,
    pub users: Vec<UserProductivity>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

pub const FORMULA: &str = "40 × success rate + 30 × min(1, 5000 ms / average command time) + 20 × min(1, distinct agents / 10) + 10 × min(1, commands / 50)";

type Row = (String, i64, i64, i64, i64, i64);

/// Most users (or teams) one ranked list reads: each is a row held while the list is scored
/// and sorted, and anyone with an ingest key can make up ids.
pub const MAX_RANKED: i64 = 100_000;

/// Per key (user or team): commands, errors, duration sum, distinct agents, active users;
/// with `k`, only from the (team, day) cells of at least `k` active people (`range` is then
/// whole days). More than [`MAX_RANKED`] keys in the range: 400 naming `range`.
async fn rows(
    tx: &mut sqlx::PgConnection,
    range: &TimeRange,
    column: &str,
    visibility: &Visibility,
    cells: Option<&Cells>,
) -> Result<Vec<Row>, Problem> {
    let (user_filter, team_filter) = visibility.filters();
    let (k, ids, teams) = Cells::binds(cells);
    let rows: Vec<Row> = sqlx::query_as(by_grain!(
        Cells::grain(cells, Grain::for_range(range)),
        "SELECT CASE $3 WHEN 'team' THEN team_id ELSE user_id END AS k,
                coalesce(sum(count) FILTER (WHERE event_type = 'command.executed'), 0)::bigint,
                coalesce(sum(errors) FILTER (WHERE event_type = 'command.executed'), 0)::bigint,
                coalesce(sum(duration_sum) FILTER (WHERE event_type = 'command.executed'), 0)::bigint,
                count(DISTINCT name) FILTER (WHERE event_type = 'agent.interacted'),
                count(DISTINCT user_id) FILTER (WHERE user_id <> '')
           FROM ",
        " WHERE bucket >= $1 AND bucket < $2
            AND ($4::text IS NULL OR user_id = $4) AND ($5::text[] IS NULL OR team_id = ANY($5))
            AND ($6::int IS NULL OR (bucket, team_id, event_type) IN (SELECT * FROM private_cells($1, $2, $6, $7, $8)))
          GROUP BY 1
         HAVING (CASE $3 WHEN 'team' THEN min(team_id) ELSE min(user_id) END) <> ''
          LIMIT $9"
    ))
    .bind(range.from)
    .bind(range.to)
    .bind(column)
    .bind(user_filter)
    .bind(team_filter)
    .bind(k)
    .bind(ids)
    .bind(teams)
    .bind(MAX_RANKED + 1)
    .fetch_all(tx)
    .await
    .map_err(db_error)?;
    if rows.len() as i64 > MAX_RANKED {
        let why = format!("holds more than {MAX_RANKED} of them; narrow it");
        return Err(invalid(FieldError::new("range", why)));
    }
    Ok(rows)
}

/// What both ranked lists take: the format, the range and the page.
fn ranked(read: &Read<RankedParams>) -> Result<(bool, TimeRange, Page), Problem> {
    let p = &read.params;
    let csv = wants_csv(p.format.as_deref())?;
    let range = read.range()?;
    let page = Page::parse(p.limit, p.cursor.as_deref())?;
    Ok((csv, range, page))
}

/// `GET /v1/dashboard/productivity`: every visible user's score with its inputs.
pub async fn productivity(read: Read<RankedParams>) -> Result<Response, Problem> {
    read.reader
        .require_individual_view("per-user productivity")?;
    let (csv, range, page) = ranked(&read)?;
    let (tenant, visibility) = (read.reader.tenant, &read.reader.visibility);
    let key = format!("productivity:{}", page.cache_key());
    let res = read
        .answer(&range, &key, |ctx| async move {
            let mut answer = ProductivityAnswer {
                tenant_id: tenant,
                from: range.from,
                to: range.to,
                as_of: None,
                formula: FORMULA.into(),
                total: 0,
                users: Vec::new(),
                next_cursor: None,
            };
            let Some(TenantRead { mut tx, fresh, .. }) = ctx else {
                return Ok(answer);
            };
            answer.as_of = fresh.as_of;
            let rows = rows(&mut tx, &range, "user", visibility, None).await?;
            let mut users: Vec<UserProductivity> = rows
                .into_iter()
                .map(|(user, cmds, errs, dsum, agents, _)| UserProductivity {
                    user_id: user,
                    score: score(cmds, errs, dsum, agents, cmds as f64),
                })
                .collect();
            users.sort_by(|a, b| {
                b.score
                    .score
                    .total_cmp(&a.score.score)
                    .then(a.user_id.cmp(&b.user_id))
            });
            answer.total = users.len();
            (answer.users, answer.next_cursor) =
                page.take(users, |u| (u.score.score, u.user_id.as_str()));
            Ok(answer)
        })
        .await?;
    let res = read
        .audited("productivity", res, |a| ids_in(a, "users", "user_id"))
        .await?;
    respond(res, csv, "users").await
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TeamRow {
    pub team_id: String,
    pub active_users: i64,
    #[serde(flatten)]
    pub score: Score,
    /// 1 = best score.
    pub rank: usize,
    /// Share of the other teams this team scores at or above (100 = best).
    pub percentile: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TeamsAnswer {
    pub tenant_id: TenantId,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub as_of: Option<DateTime<Utc>>,
    /// How many teams the whole comparison has (over every page).
    pub total: usize,
    pub teams: Vec<TeamRow>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// `GET /v1/dashboard/teams`: team comparison with rank and percentile.
pub async fn teams(read: Read<RankedParams>) -> Result<Response, Problem> {
    let (csv, range, page) = ranked(&read)?;
    let cells = read.cells().await?;
    let (tenant, visibility) = (read.reader.tenant, &read.reader.visibility);
    let key = format!(
        "teams:{}:{}",
        page.cache_key(),
        cells.as_ref().map_or(String::new(), Cells::digest)
    );
    let cells = cells.as_ref();
    let k = cells.map(|c| c.k);
    let res = read
        .answer(&range, &key, |ctx| async move {
            let mut answer = TeamsAnswer {
                tenant_id: tenant,
                from: range.from,
                to: range.to,
                as_of: None,
                total: 0,
                teams: Vec::new(),
                next_cursor: None,
            };
            let Some(TenantRead { mut tx, fresh, .. }) = ctx else {
                return Ok(answer);
            };
            answer.as_of = fresh.as_of.filter(|_| k.is_none());
            let rows = rows(&mut tx, &range, "team", visibility, cells).await?;
            let mut teams: Vec<(String, i64, Score)> = rows
                .into_iter()
                .map(|(team, cmds, errs, dsum, agents, people)| {
                    let per_person = cmds as f64 / people.max(1) as f64;
                    (team, people, score(cmds, errs, dsum, agents, per_person))
                })
                .collect();
            teams.sort_by(|a, b| b.2.score.total_cmp(&a.2.score).then(a.0.cmp(&b.0)));
            let n = teams.len();
            let ranked: Vec<TeamRow> = teams
                .into_iter()
                .enumerate()
                .map(|(i, (team_id, active_users, score))| TeamRow {
                    team_id,
                    active_users,
                    score,
                    rank: i + 1,
                    percentile: if n > 1 {
                        100.0 * (n - 1 - i) as f64 / (n - 1) as f64
                    } else {
                        100.0
                    },
                })
                .collect();
            answer.total = n;
            (answer.teams, answer.next_cursor) =
                page.take(ranked, |t| (t.score.score, t.team_id.as_str()));
            Ok(answer)
        })
        .await?;
    respond(res, csv, "teams").await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_score_follows_the_documented_formula() {
        // 50 commands, all successful, 2.5 s each, 5 agents: 40 + 30 + 10 + 10.
        assert_eq!(score(50, 0, 125_000, 5, 50.0).score, 90.0);
        // Half failed, 10 s each, no agents, 10 commands: 20 + 15 + 0 + 2.
        assert_eq!(score(10, 5, 100_000, 0, 10.0).score, 37.0);
        assert_eq!(score(0, 0, 0, 0, 0.0).score, 0.0);
        assert_eq!(score(100, 0, 0, 20, 100.0).score, 100.0);
    }

    #[test]
    fn pages_follow_each_other_without_gaps_or_repeats() {
        // Sorted as the endpoints sort: score descending, then key; ties on the score.
        let rows: Vec<(f64, String)> = [
            (90.0, "a"),
            (80.5, "b"),
            (80.5, "c"),
            (80.5, "d"),
            (12.0, "e"),
        ]
        .iter()
        .map(|(s, k)| (*s, k.to_string()))
        .collect();
        for limit in 1..=6 {
            let mut seen = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let page = Page::parse(Some(limit), cursor.as_deref()).unwrap();
                let (got, next) = page.take(rows.clone(), |r| (r.0, r.1.as_str()));
                assert!(got.len() <= limit);
                seen.extend(got);
                match next {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            assert_eq!(seen, rows, "limit {limit}");
        }
        assert!(Page::parse(Some(0), None).is_err());
        assert!(Page::parse(Some(1001), None).is_err());
        assert!(Page::parse(None, Some("garbage")).is_err());
    }
}
