//! Where the money went: agent cost, tokens, sessions and lines by repository and branch
//! (from the hook's session contexts, `projector::models::attribution`), and pull requests
//! with their cost and agent share.
//!
//! A pull request's cost is what was attributed to its repository and head branch from the
//! branch's first activity (after the previous pull request from that branch closed, if
//! any) until it was merged (or closed; until now while open). Its agent share is the lines
//! Claude Code added there in that window over the pull request's additions.

use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::events::FieldError;
use shared::problem::Problem;

use crate::range::Bucket;
use crate::read::csv::{respond, wants_csv};
use crate::read::privacy::ids_in;
use crate::read::{db_error, invalid, ranged, Read, TenantRead};

#[derive(Debug, Deserialize)]
pub struct RepoParams {
    pub range: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    /// `repository` (default) or `branch`: one row per repository, or per branch.
    pub by: Option<String>,
    /// Only this repository's branches.
    pub repository: Option<String>,
    /// Rows (1..=1000, default 20), the most expensive first.
    pub limit: Option<i64>,
    pub format: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct RepoRow {
    /// `host/owner/name` (or its private hash); empty for usage no context explains.
    pub repository: String,
    /// Absent when rows are per repository.
    pub branch: Option<String>,
    pub unattributed: bool,
    pub cost_usd: f64,
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_read_tokens: i64,
    pub cache_creation_tokens: i64,
    pub tool_runs: i64,
    pub lines_added: i64,
    pub lines_removed: i64,
    pub sessions: i64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RepoPage {
    pub as_of: Option<DateTime<Utc>>,
    pub by: String,
    pub rows: Vec<RepoRow>,
}

fn by_branch(by: Option<&str>) -> Result<bool, Problem> {
    match by {
        None | Some("repository") => Ok(false),
        Some("branch") => Ok(true),
        Some(_) => Err(invalid(FieldError::new("by", "use repository or branch"))),
    }
}

fn limit(l: Option<i64>, default: i64) -> Result<i64, Problem> {
    let l = l.unwrap_or(default);
    if (1..=1000).contains(&l) {
        Ok(l)
    } else {
        Err(invalid(FieldError::new("limit", "must be 1..=1000")))
    }
}

/// The statement of [`repositories`], given how a group's sessions are counted. By branch a
/// group holds each of its sessions once (`repo_sessions`' key is repository, branch and
/// session), so counting its rows is enough and spares PostgreSQL a sort per group; by
/// repository a session that moved between branches has a row for each, and is counted once.
macro_rules! repositories_sql {
    ($sessions:literal) => {
        concat!(
            "WITH u AS (
                SELECT repository, CASE WHEN $6 THEN branch END AS branch,
                       sum(cost_usd) AS cost_usd, sum(requests)::bigint AS requests,
                       sum(input_tokens)::bigint AS input_tokens,
                       sum(output_tokens)::bigint AS output_tokens,
                       sum(cache_read_tokens)::bigint AS cache_read_tokens,
                       sum(cache_creation_tokens)::bigint AS cache_creation_tokens,
                       sum(tool_runs)::bigint AS tool_runs,
                       sum(lines_added)::bigint AS lines_added,
                       sum(lines_removed)::bigint AS lines_removed
                  FROM repo_usage_span($1, $2)
                 WHERE ($3::text IS NULL OR user_id = $3)
                   AND ($4::text[] IS NULL OR team_id = ANY($4))
                   AND ($5::text IS NULL OR repository = $5)
                 GROUP BY 1, 2
                HAVING sum(requests) <> 0 OR sum(tool_runs) <> 0 OR sum(lines_added) <> 0
                    OR sum(lines_removed) <> 0),
             s AS (
                SELECT repository, CASE WHEN $6 THEN branch END AS branch,
                       ",
            $sessions,
            "::bigint AS sessions
                  FROM repo_sessions
                 WHERE first_at < $2 AND last_at >= $1
                   AND ($3::text IS NULL OR user_id = $3)
                   AND ($4::text[] IS NULL OR team_id = ANY($4))
                   AND ($5::text IS NULL OR repository = $5)
                 GROUP BY 1, 2)
             SELECT u.repository, u.branch, u.repository = '' AS unattributed, u.cost_usd,
                    u.requests, u.input_tokens, u.output_tokens, u.cache_read_tokens,
                    u.cache_creation_tokens, u.tool_runs, u.lines_added, u.lines_removed,
                    COALESCE(s.sessions, 0) AS sessions
               FROM u LEFT JOIN s ON s.repository = u.repository
                                 AND COALESCE(s.branch, '') = COALESCE(u.branch, '')
              ORDER BY u.cost_usd DESC, u.repository, u.branch
              LIMIT $7"
        )
    };
}
const REPOSITORIES_BY_BRANCH_SQL: &str = repositories_sql!("count(*)");
const REPOSITORIES_SQL: &str = repositories_sql!("count(DISTINCT session_id)");

/// `GET /v1/dashboard/repositories`: the most expensive repositories (or branches) of the
/// range, with their tokens, tool runs, lines and sessions; unattributed usage is one row.
pub async fn repositories(read: Read<RepoParams>) -> Result<Response, Problem> {
    read.reader.require_individual_view("cost by repository")?;
    let p = &read.params;
    let range = read.range()?;
    let csv = wants_csv(p.format.as_deref())?;
    let branch = by_branch(p.by.as_deref())?;
    let limit = limit(p.limit, 20)?;
    let visibility = &read.reader.visibility;
    let key = format!("repositories:{branch}:{:?}:{limit}", p.repository);
    let res = read
        .answer(&range, &key, |ctx| async move {
            let mut page = RepoPage {
                as_of: None,
                by: if branch { "branch" } else { "repository" }.into(),
                rows: Vec::new(),
            };
            let Some(TenantRead { mut tx, fresh, .. }) = ctx else {
                return Ok(page);
            };
            page.as_of = fresh.as_of;
            let (user, teams) = visibility.filters();
            page.rows = sqlx::query_as(if branch {
                REPOSITORIES_BY_BRANCH_SQL
            } else {
                REPOSITORIES_SQL
            })
            .bind(range.from)
            .bind(range.to)
            .bind(user)
            .bind(teams)
            .bind(p.repository.as_deref())
            .bind(branch)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_error)?;
            Ok(page)
        })
        .await?;
    respond(res, csv, "rows").await
}

#[derive(Debug, Deserialize)]
pub struct RepoSeriesParams {
    pub range: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    /// `1h` or `1d` (default `1d`).
    pub step: Option<String>,
    /// `repository` (default) or `branch`.
    pub by: Option<String>,
    pub repository: Option<String>,
    /// How many get their own series (1..=20, default 5); the rest are summed as `other`.
    pub limit: Option<i64>,
}

ranged!(RepoParams, RepoSeriesParams, PullParams, WeeklyParams);

#[derive(Debug, Serialize, Deserialize)]
pub struct RepoSeries {
    pub as_of: Option<DateTime<Utc>>,
    pub step: String,
    pub series: Vec<RepoLine>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RepoLine {
    /// The repository (or branch); null for `other`.
    pub key: Option<String>,
    pub unattributed: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub other: bool,
    /// (bucket, cost in US dollars)
    pub points: Vec<(DateTime<Utc>, f64)>,
}

/// `GET /v1/dashboard/repositories/series`: cost over time, one series per repository (or
/// branch), for charts stacked by repository.
pub async fn repository_series(read: Read<RepoSeriesParams>) -> Result<Response, Problem> {
    read.reader.require_individual_view("cost by repository")?;
    let p = &read.params;
    let range = read.range()?;
    let branch = by_branch(p.by.as_deref())?;
    let step = match p.step.as_deref().unwrap_or("1d") {
        s @ ("1h" | "1d") => Bucket::parse(s).map_err(invalid)?,
        _ => return Err(invalid(FieldError::new("step", "use 1h or 1d"))),
    };
    let top = p.limit.unwrap_or(5);
    if !(1..=20).contains(&top) {
        return Err(invalid(FieldError::new("limit", "must be 1..=20")));
    }
    let points = (range.to - range.from).num_seconds() / step.width().num_seconds();
    if points > read.config().max_points {
        return Err(invalid(FieldError::new(
            "step",
            "too many points; pick a wider step",
        )));
    }
    let visibility = &read.reader.visibility;
    let key = format!(
        "repository-series:{branch}:{:?}:{top}:{step:?}",
        p.repository
    );
    read.answer(&range, &key, |ctx| async move {
        let mut out = RepoSeries {
            as_of: None,
            step: p.step.clone().unwrap_or_else(|| "1d".into()),
            series: Vec::new(),
        };
        let Some(TenantRead { mut tx, fresh, .. }) = ctx else {
            return Ok(out);
        };
        out.as_of = fresh.as_of;
        let (user, teams) = visibility.filters();
        let rows: Vec<(DateTime<Utc>, String, bool, f64)> = sqlx::query_as(
            "WITH u AS (
                SELECT bucket, CASE WHEN $6 THEN repository || ' ' || branch ELSE repository END AS k,
                       cost_usd
                  FROM repo_usage_span($1, $2)
                 WHERE $8::interval = '1 day'::interval
                   AND ($3::text IS NULL OR user_id = $3)
                   AND ($4::text[] IS NULL OR team_id = ANY($4))
                   AND ($5::text IS NULL OR repository = $5)
                UNION ALL
                SELECT bucket, CASE WHEN $6 THEN repository || ' ' || branch ELSE repository END,
                       cost_usd
                  FROM repo_usage_1h
                 WHERE $8::interval <> '1 day'::interval
                   AND bucket >= date_bin('1 hour', $1, TIMESTAMPTZ '2000-01-03 00:00:00+00')
                   AND bucket < $2
                   AND ($3::text IS NULL OR user_id = $3)
                   AND ($4::text[] IS NULL OR team_id = ANY($4))
                   AND ($5::text IS NULL OR repository = $5)),
             top AS (SELECT k FROM u GROUP BY k HAVING sum(cost_usd) > 0
                      ORDER BY sum(cost_usd) DESC, k LIMIT $7)
             SELECT date_bin($8::interval, u.bucket, TIMESTAMPTZ '2000-01-03 00:00:00+00') AS b,
                    COALESCE(top.k, '') AS k, top.k IS NULL AS other, sum(u.cost_usd)
               FROM u LEFT JOIN top ON top.k = u.k
              GROUP BY 1, 2, 3
              ORDER BY 3, 2, 1",
        )
        .bind(range.from)
        .bind(range.to)
        .bind(user)
        .bind(teams)
        .bind(p.repository.as_deref())
        .bind(branch)
        .bind(top)
        .bind(step.width())
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        for (bucket, k, other, cost) in rows {
            let key = (!other).then(|| k.clone());
            match out.series.last_mut() {
                Some(line) if line.key == key && line.other == other => {
                    line.points.push((bucket, cost))
                }
                _ => out.series.push(RepoLine {
                    unattributed: !other && (k.is_empty() || k == " "),
                    key,
                    other,
                    points: vec![(bucket, cost)],
                }),
            }
        }
        Ok(out)
    })
    .await
}

#[derive(Debug, Deserialize)]
pub struct PullParams {
    pub range: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub repository: Option<String>,
    /// `open`, `closed` or `merged`; default all.
    pub state: Option<String>,
    /// With `repository`: one pull request, with its sessions.
    pub number: Option<i64>,
    pub limit: Option<i64>,
    pub format: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct PullRow {
    pub repository: String,
    pub number: i64,
    pub provider: String,
    pub state: String,
    pub title: String,
    pub author: String,
    pub url: String,
    pub head_branch: String,
    /// Where the head branch lives when it is a fork's (else empty).
    pub head_repository: String,
    pub base_branch: String,
    pub opened_at: Option<DateTime<Utc>>,
    pub merged_at: Option<DateTime<Utc>>,
    pub closed_at: Option<DateTime<Utc>>,
    pub additions: Option<i64>,
    pub deletions: Option<i64>,
    /// Agent cost attributed to the head branch within the pull request's window.
    pub cost_usd: f64,
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub sessions: i64,
    /// Lines Claude Code added on the head branch within the window.
    pub agent_lines_added: i64,
    /// `agent_lines_added / additions` (null without additions).
    pub agent_share: Option<f64>,
    /// The window: the branch's first attributed activity, and its end (merge, close, now).
    pub first_activity_at: Option<DateTime<Utc>>,
    pub window_end: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct PullSession {
    pub session_id: String,
    pub user_id: String,
    pub first_at: DateTime<Utc>,
    pub last_at: DateTime<Utc>,
    pub cost_usd: f64,
    pub requests: i64,
    pub lines_added: i64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PullPage {
    pub as_of: Option<DateTime<Utc>>,
    pub pull_requests: Vec<PullRow>,
    /// With `number`: the sessions that worked on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<Vec<PullSession>>,
}

/// Each pull request with its window (`lo`, `hi`] on its head branch: from the end of the
/// previous pull request from the same branch, to its merge, close or now.
const WINDOWS: &str = "
    w AS (
        SELECT pr.*,
               COALESCE(NULLIF(pr.head_repository, ''), pr.repository) AS head_repo,
               COALESCE((SELECT max(COALESCE(q.merged_at, q.closed_at)) FROM pull_requests q
                          WHERE q.repository = pr.repository AND q.head_branch = pr.head_branch
                            AND q.head_repository = pr.head_repository
                            AND q.number <> pr.number
                            AND COALESCE(q.merged_at, q.closed_at) < COALESCE(pr.opened_at, pr.updated_at)),
                        '-infinity') AS lo,
               COALESCE(pr.merged_at, pr.closed_at, now()) AS hi
          FROM pull_requests pr)";

/// The usage of each windowed pull request (visible to the reader: `$3` user, `$4` teams).
const PULL_COLUMNS: &str = "
    w.repository, w.number, w.provider, w.state, w.title, w.author, w.url, w.head_branch,
    w.head_repository, w.base_branch, w.opened_at, w.merged_at, w.closed_at, w.additions, w.deletions,
    COALESCE(x.cost_usd, 0) AS cost_usd, COALESCE(x.requests, 0) AS requests,
    COALESCE(x.input_tokens, 0) AS input_tokens, COALESCE(x.output_tokens, 0) AS output_tokens,
    COALESCE(x.sessions, 0) AS sessions, COALESCE(x.lines_added, 0) AS agent_lines_added,
    CASE WHEN w.additions > 0
         THEN LEAST(1.0, COALESCE(x.lines_added, 0)::float8 / w.additions) END AS agent_share,
    x.first_at AS first_activity_at, w.hi AS window_end";

/// The usage on a pull request's head branch in its window. `repository <> ''` (always true
/// of a pull request's) lets the planner read the index of placed usage (tenant template 0013).
const PULL_USAGE: &str = "
    LEFT JOIN LATERAL (
        SELECT sum(u.cost_usd) AS cost_usd, sum(u.requests)::bigint AS requests,
               sum(u.input_tokens)::bigint AS input_tokens,
               sum(u.output_tokens)::bigint AS output_tokens,
               count(DISTINCT u.session_id) FILTER (WHERE u.session_id <> '')::bigint AS sessions,
               sum(u.lines_added)::bigint AS lines_added, min(u.occurred_at) AS first_at
          FROM session_usage u
         WHERE u.repository = w.head_repo AND u.repository <> '' AND u.branch = w.head_branch
           AND u.occurred_at > w.lo AND u.occurred_at <= w.hi
           AND ($3::text IS NULL OR u.user_id = $3)
           AND ($4::text[] IS NULL OR u.team_id = ANY($4))) x ON true";

/// Which pull requests a reader sees: all of them when they see the whole tenant; otherwise
/// those with usage they may see in their window (a developer's own, a manager's teams'), so
/// that no one reads the titles, authors and merge times of work outside what they see.
const VISIBLE_PULL: &str = "($3::text IS NULL AND $4::text[] IS NULL) OR x.first_at IS NOT NULL";

/// `GET /v1/dashboard/pull-requests`: pull requests opened, merged or closed in the range
/// (newest first), each with its cost and agent share; with `repository` and `number`, that
/// one with the sessions that worked on it.
pub async fn pull_requests(read: Read<PullParams>) -> Result<Response, Problem> {
    read.reader
        .require_individual_view("the pull request list")?;
    let p = &read.params;
    let range = read.range()?;
    let csv = wants_csv(p.format.as_deref())?;
    let limit = limit(p.limit, 100)?;
    if let Some(s) = p.state.as_deref() {
        if !["open", "closed", "merged"].contains(&s) {
            return Err(invalid(FieldError::new(
                "state",
                "use open, closed or merged",
            )));
        }
    }
    if p.number.is_some() && p.repository.is_none() {
        return Err(invalid(FieldError::new(
            "repository",
            "is required with number",
        )));
    }
    let visibility = &read.reader.visibility;
    let key = format!(
        "pull-requests:{:?}:{:?}:{:?}:{limit}",
        p.repository, p.state, p.number
    );
    let res = read
        .answer(&range, &key, |ctx| async move {
            let mut page = PullPage {
                as_of: None,
                pull_requests: Vec::new(),
                sessions: None,
            };
            let Some(TenantRead { mut tx, fresh, .. }) = ctx else {
                return Ok(page);
            };
            page.as_of = fresh.as_of;
            let (user, teams) = visibility.filters();
            let sql = format!(
                "WITH {WINDOWS}
                 SELECT {PULL_COLUMNS} FROM w {PULL_USAGE}
                  WHERE ($5::text IS NULL OR w.repository = $5)
                    AND ({VISIBLE_PULL})
                    AND ($6::text IS NULL OR w.state = $6)
                    AND ($7::bigint IS NULL OR w.number = $7)
                    AND ($7::bigint IS NOT NULL
                         OR greatest(w.opened_at, w.merged_at, w.closed_at, w.updated_at) >= $1
                        AND least(w.opened_at, w.updated_at) < $2)
                  ORDER BY COALESCE(w.merged_at, w.closed_at, w.opened_at, w.updated_at) DESC,
                           w.repository, w.number
                  LIMIT $8"
            );
            page.pull_requests = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(range.from)
                .bind(range.to)
                .bind(user)
                .bind(teams)
                .bind(p.repository.as_deref())
                .bind(p.state.as_deref())
                .bind(p.number)
                .bind(limit)
                .fetch_all(&mut *tx)
                .await
                .map_err(db_error)?;
            if p.number.is_some() {
                if let Some(pr) = page.pull_requests.first() {
                    let lo = sqlx::query_scalar::<_, Option<DateTime<Utc>>>(
                        "SELECT max(COALESCE(q.merged_at, q.closed_at))
                           FROM pull_requests q
                           JOIN pull_requests pr ON pr.repository = $1 AND pr.number = $3
                          WHERE q.repository = $1 AND q.head_branch = $2 AND q.number <> $3
                            AND q.head_repository = pr.head_repository
                            AND COALESCE(q.merged_at, q.closed_at) < $4",
                    )
                    .bind(&pr.repository)
                    .bind(&pr.head_branch)
                    .bind(pr.number)
                    .bind(pr.opened_at.unwrap_or(pr.window_end))
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db_error)?;
                    page.sessions = Some(
                        sqlx::query_as(
                            "SELECT session_id, max(user_id) AS user_id, min(occurred_at) AS first_at,
                                    max(occurred_at) AS last_at, sum(cost_usd) AS cost_usd,
                                    sum(requests)::bigint AS requests,
                                    sum(lines_added)::bigint AS lines_added
                               FROM session_usage
                              WHERE repository = $1 AND repository <> '' AND branch = $2
                                AND occurred_at > COALESCE($5, '-infinity') AND occurred_at <= $6
                                AND ($3::text IS NULL OR user_id = $3)
                                AND ($4::text[] IS NULL OR team_id = ANY($4))
                              GROUP BY session_id
                              ORDER BY sum(cost_usd) DESC, session_id
                              LIMIT 1000",
                        )
                        .bind(if pr.head_repository.is_empty() {
                            &pr.repository
                        } else {
                            &pr.head_repository
                        })
                        .bind(&pr.head_branch)
                        .bind(user)
                        .bind(teams)
                        .bind(lo)
                        .bind(pr.window_end)
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(db_error)?,
                    );
                }
            }
            Ok(page)
        })
        .await?;
    let res = read
        .audited("pull requests", res, |a| {
            let mut people = ids_in(a, "sessions", "user_id");
            people.extend(ids_in(a, "pull_requests", "author"));
            people
        })
        .await?;
    respond(res, csv, "pull_requests").await
}

#[derive(Debug, Deserialize)]
pub struct WeeklyParams {
    pub range: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub repository: Option<String>,
    pub format: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct WeekRow {
    /// Monday 00:00 UTC of the week.
    pub week: DateTime<Utc>,
    pub merged: i64,
    pub median_cost_usd: Option<f64>,
    /// The median over the merged pull requests that report their additions.
    pub median_agent_share: Option<f64>,
    pub cost_usd: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WeeklyPage {
    pub as_of: Option<DateTime<Utc>>,
    pub weeks: Vec<WeekRow>,
}

/// `GET /v1/dashboard/pull-requests/weekly`: pull requests merged per week of the range,
/// with their median cost and agent share.
pub async fn weekly(read: Read<WeeklyParams>) -> Result<Response, Problem> {
    read.reader
        .require_individual_view("pull requests by week")?;
    let p = &read.params;
    let range = read.range()?;
    let csv = wants_csv(p.format.as_deref())?;
    let visibility = &read.reader.visibility;
    let key = format!("pull-requests-weekly:{:?}", p.repository);
    let res = read
        .answer(&range, &key, |ctx| async move {
            let mut page = WeeklyPage {
                as_of: None,
                weeks: Vec::new(),
            };
            let Some(TenantRead { mut tx, fresh, .. }) = ctx else {
                return Ok(page);
            };
            page.as_of = fresh.as_of;
            let (user, teams) = visibility.filters();
            let sql = format!(
                "WITH {WINDOWS},
                 m AS (SELECT {PULL_COLUMNS} FROM w {PULL_USAGE}
                        WHERE w.state = 'merged' AND w.merged_at >= $1 AND w.merged_at < $2
                          AND ($5::text IS NULL OR w.repository = $5) AND ({VISIBLE_PULL}))
                 SELECT date_trunc('week', merged_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS week,
                        count(*)::bigint AS merged,
                        percentile_cont(0.5) WITHIN GROUP (ORDER BY cost_usd) AS median_cost_usd,
                        percentile_cont(0.5) WITHIN GROUP (ORDER BY agent_share)
                            AS median_agent_share,
                        COALESCE(sum(cost_usd), 0) AS cost_usd
                   FROM m GROUP BY 1 ORDER BY 1"
            );
            page.weeks = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(range.from)
                .bind(range.to)
                .bind(user)
                .bind(teams)
                .bind(p.repository.as_deref())
                .fetch_all(&mut *tx)
                .await
                .map_err(db_error)?;
            Ok(page)
        })
        .await?;
    respond(res, csv, "weeks").await
}
