//! Attribution: which repository and branch each session worked in (`session_contexts`,
//! from the hook's `session.context`), the agent usage that puts a cost on it (agent
//! interactions, tool runs, Claude Code's lines of code: `usage_rows`, read from the raw
//! rows; the placed ones also in `session_usage`), its rollups
//! (`repo_usage_1h`, `repo_usage_1d`, `repo_sessions`), and the pull requests and pushes the
//! source-control webhooks describe.
//!
//! A usage row belongs to the latest context of its session at or before its time, else to
//! no repository (''); it is placed when that context names a repository or a branch (a
//! repository without a remote has a branch alone). A batch first stores its new contexts, then places its new usage
//! against every context known by then, then moves the older usage the new contexts now
//! explain (subtracting it from the old rollup keys and adding it to the new): so the order
//! in which contexts and usage arrive never changes the result, and each amount is counted
//! once, however often a batch is retried or the log replayed (only rows the raw tables
//! really inserted are folded here).

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use serde_json::Value;
use shared::events::{BranchPushed, Payload, PullRequestChanged};
use sqlx::PgConnection;
use uuid::Uuid;

use super::raw::RawRow;
use crate::batch::Decoded;

/// Claude Code's counter of lines added and removed (attribute `type`).
pub const LINES_METRIC: &str = "claude_code.lines_of_code.count";

/// The bucket origin of every rollup (as `span_floor` in the tenant template).
const ORIGIN: &str = "TIMESTAMPTZ '2000-01-03 00:00:00+00'";

/// One usage row: what one event adds to its session's spending.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Usage {
    pub session_id: String,
    pub occurred_at: DateTime<Utc>,
    pub event_id: Uuid,
    pub user_id: String,
    pub team_id: String,
    pub requests: i64,
    pub tool_runs: i64,
    pub cost_usd: f64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_read_tokens: i64,
    pub cache_creation_tokens: i64,
    pub lines_added: i64,
    pub lines_removed: i64,
}

impl Usage {
    /// The usage of an inserted raw row, if it has any: agent interactions (a request, its
    /// cost and tokens), tool runs, and delta points of [`LINES_METRIC`].
    pub fn of(row: &RawRow) -> Option<Usage> {
        let mut u = Usage {
            session_id: row.session_id.to_owned(),
            occurred_at: row.occurred_at,
            event_id: row.event_id,
            user_id: row.user_id.to_owned(),
            team_id: row.team_id.to_owned(),
            ..Usage::default()
        };
        let int = |v: &Value, k: &str| v.get(k).and_then(Value::as_i64).unwrap_or(0);
        match row.event_type {
            "agent.interacted" => {
                u.requests = 1;
                u.cost_usd = row.value;
                u.input_tokens = row.input_tokens;
                u.output_tokens = row.output_tokens;
                u.cache_read_tokens = int(&row.data, "cache_read_tokens");
                u.cache_creation_tokens = int(&row.data, "cache_creation_tokens");
            }
            "tool.executed" => u.tool_runs = 1,
            "metric.sample" if row.name == LINES_METRIC => {
                // Running totals (cumulative temporality) cannot be attributed point by
                // point; Claude Code sends increments unless told otherwise.
                let delta = row
                    .data
                    .pointer("/extra/temporality")
                    .and_then(Value::as_str)
                    == Some("delta");
                if !delta || !row.value.is_finite() || row.value < 0.0 || row.value > 1e9 {
                    return None;
                }
                let lines = row.value.round() as i64;
                match row.data.pointer("/labels/type").and_then(Value::as_str) {
                    Some("added") => u.lines_added = lines,
                    Some("removed") => u.lines_removed = lines,
                    _ => return None,
                }
            }
            _ => return None,
        }
        Some(u)
    }
}

/// One context of a session.
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    pub session_id: String,
    pub at: DateTime<Utc>,
    pub event_id: Uuid,
    pub user_id: String,
    pub repository: String,
    pub branch: String,
    pub commit: String,
    pub directory: String,
}

/// What a batch's inserted events bring to attribution.
#[derive(Debug, Default)]
pub struct Fold {
    pub contexts: Vec<Context>,
    pub usage: Vec<Usage>,
    /// Source-control events (not raw rows: their own table dedupes them).
    pub repository_events: Vec<(Uuid, DateTime<Utc>, &'static str, String, Value)>,
}

/// Folds the batch: contexts and usage of the raw rows really inserted (`ids` are their
/// events'), and every source-control event (deduplicated when written).
pub fn fold(events: &[&Decoded], ids: &HashSet<Uuid>, inserted: &[&RawRow]) -> Fold {
    let mut f = Fold {
        usage: inserted.iter().filter_map(|r| Usage::of(r)).collect(),
        ..Fold::default()
    };
    for e in events {
        match &e.payload {
            Payload::SessionContext(p) if ids.contains(&e.env.id) => f.contexts.push(Context {
                session_id: p.session_id.clone(),
                at: e.env.occurred_at,
                event_id: e.env.id,
                user_id: p.user_id.clone(),
                repository: p.repository.clone().unwrap_or_default(),
                branch: p.branch.clone().unwrap_or_default(),
                commit: p.commit.clone().unwrap_or_default(),
                directory: p.directory.clone().unwrap_or_default(),
            }),
            Payload::PullRequestChanged(PullRequestChanged { repository, .. })
            | Payload::BranchPushed(BranchPushed { repository, .. }) => f.repository_events.push((
                e.env.id,
                e.env.occurred_at,
                e.env.event_type.as_str(),
                repository.clone(),
                e.env.data.clone(),
            )),
            _ => {}
        }
    }
    f
}

/// Writes the fold (search_path already at the tenant's schema); the number of
/// source-control events that were new.
///
/// New usage is placed against every context known once the batch's contexts are stored,
/// so it is where it belongs before the moves; the moves then leave it where it is. In
/// `bulk` (a rebuild's load) usage is not written at all: [`rebuild`] places every usage
/// row of the raw tables and makes the rollups once the load is done.
pub async fn write(
    conn: &mut PgConnection,
    f: &Fold,
    events: &[&Decoded],
    bulk: bool,
) -> sqlx::Result<u64> {
    let since = insert_contexts(conn, &f.contexts).await?;
    if !bulk {
        insert_usage(conn, &f.usage).await?;
        if !since.is_empty() {
            reattribute(conn, &since).await?;
        }
    }
    write_repository_events(conn, f, events).await
}

/// The latest context of `u`'s session at or before its time, as a lateral join.
macro_rules! placed {
    ($u:literal) => {
        concat!(
            "LEFT JOIN LATERAL (SELECT c.repository, c.branch FROM session_contexts c
                                 WHERE c.session_id = ",
            $u,
            ".session_id AND c.at <= ",
            $u,
            ".occurred_at
                                 ORDER BY c.at DESC, c.event_id DESC LIMIT 1) c ON true"
        )
    };
}

/// Where a rebuild's load kept its usage rows before tenant template 0015 (the usage is now
/// read from the raw rows): a schema an older projector began to build may still have it.
const UNPLACED: &str = "session_usage_unplaced";

/// The usage rows of the raw tables (`usage_rows`, tenant template 0015) with their
/// placement: the latest context of their session at or before them, else '' for both.
fn usage_placed(filter: &str) -> String {
    format!(
        "SELECT n.*, COALESCE(c.repository, '') AS repository, COALESCE(c.branch, '') AS branch
           FROM (SELECT * FROM usage_rows {filter}) n {placed}",
        placed = placed!("n"),
    )
}

/// A rebuild's usage, once a bulk load has stored every raw row (search_path points at the
/// new schema, which nobody else writes to): every usage row of the raw tables is placed
/// against the latest context of its session at or before it — where the live path's
/// placement and moves leave it — the placed ones are stored in `session_usage`, and the
/// usage rollups (`repo_usage_1h`, `repo_usage_1d`, `repo_sessions`) are made set-wise from
/// all of them: what the live path's upserts and moves leave, as they keep each rollup the
/// sum of the usage rows under its key. Starts from empty tables, so it can run again.
pub async fn rebuild(conn: &mut PgConnection) -> sqlx::Result<()> {
    // The contexts the placement looks up (and the sessions) were written with autovacuum
    // off.
    sqlx::query("ANALYZE session_contexts, sessions")
        .execute(&mut *conn)
        .await?;
    sqlx::query("SET LOCAL work_mem = '256MB'")
        .execute(&mut *conn)
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS {UNPLACED}"
    )))
    .execute(&mut *conn)
    .await?;
    sqlx::query("TRUNCATE session_usage, repo_usage_1h, repo_usage_1d, repo_sessions")
        .execute(&mut *conn)
        .await?;
    // In the order of the key, the lookups and the key's inserts go page after page.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TEMPORARY TABLE usage_placed ON COMMIT DROP AS {}",
        usage_placed("ORDER BY session_id, occurred_at, event_id")
    )))
    .execute(&mut *conn)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO session_usage (session_id, occurred_at, event_id, user_id, team_id,
                                    {AMOUNTS}, repository, branch)
         SELECT session_id, occurred_at, event_id, user_id, team_id, {AMOUNTS}, repository,
                branch
           FROM usage_placed WHERE (repository, branch) <> ('', '')
          ORDER BY session_id, occurred_at, event_id
         ON CONFLICT DO NOTHING"
    )))
    .execute(&mut *conn)
    .await?;
    for grain in ["1h", "1d"] {
        sqlx::query(sqlx::AssertSqlSafe(rollup_upsert("usage_placed", grain)))
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO repo_sessions {}",
        sessions_select("usage_placed WHERE session_id <> ''")
    )))
    .execute(&mut *conn)
    .await?;
    sqlx::query("DROP TABLE usage_placed")
        .execute(&mut *conn)
        .await?;
    sqlx::query("ANALYZE session_usage, repo_usage_1h, repo_usage_1d, repo_sessions")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Stores contexts; for each session that got new ones, the earliest and latest new
/// context's times.
async fn insert_contexts(
    conn: &mut PgConnection,
    contexts: &[Context],
) -> sqlx::Result<BTreeMap<String, (DateTime<Utc>, DateTime<Utc>)>> {
    if contexts.is_empty() {
        return Ok(BTreeMap::new());
    }
    let col = |f: fn(&Context) -> &str| contexts.iter().map(f).collect::<Vec<_>>();
    let rows: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
        "INSERT INTO session_contexts (session_id, at, event_id, user_id, repository, branch,
                                       commit_sha, directory)
         SELECT * FROM UNNEST($1::text[], $2::timestamptz[], $3::uuid[], $4::text[], $5::text[],
                              $6::text[], $7::text[], $8::text[])
         ON CONFLICT DO NOTHING
         RETURNING session_id, at",
    )
    .bind(col(|c| &c.session_id))
    .bind(contexts.iter().map(|c| c.at).collect::<Vec<_>>())
    .bind(contexts.iter().map(|c| c.event_id).collect::<Vec<_>>())
    .bind(col(|c| &c.user_id))
    .bind(col(|c| &c.repository))
    .bind(col(|c| &c.branch))
    .bind(col(|c| &c.commit))
    .bind(col(|c| &c.directory))
    .fetch_all(&mut *conn)
    .await?;
    let mut since: BTreeMap<String, (DateTime<Utc>, DateTime<Utc>)> = BTreeMap::new();
    for (session, at) in rows {
        since
            .entry(session)
            .and_modify(|(lo, hi)| {
                *lo = (*lo).min(at);
                *hi = (*hi).max(at);
            })
            .or_insert((at, at));
    }
    Ok(since)
}

/// The kind of the usage row `u` (1 an agent interaction, 2 a tool run, 3 lines of code),
/// derived from its amounts as `session_usage.kind` is (tenant template 0016).
const USAGE_KIND: &str =
    "(CASE WHEN u.requests <> 0 THEN 1 WHEN u.tool_runs <> 0 THEN 2 ELSE 3 END)::smallint";

/// The amount columns, in table order.
const AMOUNTS: &str = "requests, tool_runs, cost_usd, input_tokens, output_tokens, \
                       cache_read_tokens, cache_creation_tokens, lines_added, lines_removed";

/// Moves the usage each session's new contexts explain — from the earliest new context to the
/// first older context after the latest new one — to the context that now explains it, and
/// the amounts between the rollups' keys with it; rebuilds those sessions' `repo_sessions`
/// rows. The usage is read from the raw rows (`usage_rows`), its old place from
/// `session_usage` ('' when absent there), which then gets the row (placed now), loses it
/// (placed nowhere now) or sees it move. (The doors take contexts at most an hour old, so
/// this reaches back an hour at most.)
async fn reattribute(
    conn: &mut PgConnection,
    since: &BTreeMap<String, (DateTime<Utc>, DateTime<Utc>)>,
) -> sqlx::Result<()> {
    let sessions: Vec<&str> = since.keys().map(String::as_str).collect();
    let times: Vec<DateTime<Utc>> = since.values().map(|(lo, _)| *lo).collect();
    let latest: Vec<DateTime<Utc>> = since.values().map(|(_, hi)| *hi).collect();
    let sum = |sign: &str| {
        AMOUNTS
            .split(", ")
            .map(|c| format!("{sign}{c} AS {c}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let sql = format!(
        "WITH s AS (
            SELECT x.session_id, x.since,
                   COALESCE((SELECT min(c.at) FROM session_contexts c
                              WHERE c.session_id = x.session_id AND c.at > x.latest),
                            'infinity') AS until
              FROM UNNEST($1::text[], $2::timestamptz[], $3::timestamptz[])
                   AS x(session_id, since, latest)),
         t AS (
            SELECT u.session_id, u.occurred_at, u.event_id, {kind} AS kind, u.user_id, u.team_id,
                   {u_amounts}, p.session_id IS NOT NULL AS stored,
                   COALESCE(p.repository, '') AS old_repository,
                   COALESCE(p.branch, '') AS old_branch,
                   COALESCE(c.repository, '') AS repository, COALESCE(c.branch, '') AS branch
              FROM s CROSS JOIN LATERAL (
                       -- A fence: each session's range goes to the raw tables' indexes by
                       -- session and time, instead of a hash join over every raw row; $4,
                       -- the earliest since, prunes older partitions (when planning, or
                       -- when a generic plan starts).
                       SELECT * FROM usage_rows u
                        WHERE u.session_id = s.session_id AND u.session_id <> ''
                          AND u.occurred_at >= s.since AND u.occurred_at < s.until
                          AND u.occurred_at >= $4
                       OFFSET 0) u
              LEFT JOIN session_usage p ON p.session_id = u.session_id
                                       AND p.occurred_at = u.occurred_at
                                       AND p.event_id = u.event_id AND p.kind = {kind}
              {placed}),
         moved AS (SELECT * FROM t WHERE (old_repository, old_branch) <> (repository, branch)),
         upd AS (
            UPDATE session_usage u SET repository = m.repository, branch = m.branch
              FROM moved m
             WHERE m.stored AND (m.repository, m.branch) <> ('', '')
               AND u.session_id = m.session_id AND u.occurred_at = m.occurred_at
               AND u.event_id = m.event_id AND u.kind = m.kind),
         del AS (
            DELETE FROM session_usage u USING moved m
             WHERE m.stored AND (m.repository, m.branch) = ('', '')
               AND u.session_id = m.session_id AND u.occurred_at = m.occurred_at
               AND u.event_id = m.event_id AND u.kind = m.kind),
         ins AS (
            INSERT INTO session_usage (session_id, occurred_at, event_id, user_id, team_id,
                                       {AMOUNTS}, repository, branch)
            SELECT session_id, occurred_at, event_id, user_id, team_id, {AMOUNTS}, repository,
                   branch
              FROM moved WHERE NOT stored AND (repository, branch) <> ('', '')
            ON CONFLICT DO NOTHING),
         d AS (
            SELECT occurred_at, old_repository AS repository, old_branch AS branch, user_id,
                   team_id, {minus} FROM moved
            UNION ALL
            SELECT occurred_at, repository, branch, user_id, team_id, {plus} FROM moved),
         by_day AS ({rollup_days})
         {rollup}",
        u_amounts = AMOUNTS
            .split(", ")
            .map(|c| format!("u.{c}"))
            .collect::<Vec<_>>()
            .join(", "),
        placed = placed!("u"),
        kind = USAGE_KIND,
        minus = sum("-"),
        plus = sum(""),
        rollup = rollup_upsert("d", "1h"),
        rollup_days = rollup_upsert("d", "1d"),
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&sessions)
        .bind(&times)
        .bind(&latest)
        .bind(times.iter().min())
        .execute(&mut *conn)
        .await?;
    // Every retained usage row of a session is under one of its `repo_sessions` rows (this
    // batch's new usage too: `insert_usage` ran first; retention keeps those at least as
    // long as raw rows), so each session's earliest `first_at` bounds the raw rows to read
    // (older partitions and TimescaleDB's compressed chunks stay out), and a session without
    // any has no usage to read (a session's first context usually comes before its usage).
    // Those rows are deleted in the same statement that reads the bound from them.
    let firsts: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
        "WITH gone AS (DELETE FROM repo_sessions WHERE session_id = ANY($1)
                        RETURNING session_id, first_at)
         SELECT session_id, min(first_at) FROM gone GROUP BY session_id",
    )
    .bind(&sessions)
    .fetch_all(&mut *conn)
    .await?;
    if firsts.is_empty() {
        return Ok(());
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO repo_sessions AS s {}",
        sessions_select(&format!(
            "(SELECT u.*, COALESCE(p.repository, '') AS repository,
                     COALESCE(p.branch, '') AS branch
                FROM UNNEST($1::text[], $2::timestamptz[]) AS f(session_id, first)
                CROSS JOIN LATERAL (
                    SELECT * FROM usage_rows u
                     WHERE u.session_id = f.session_id AND u.session_id <> ''
                       AND u.occurred_at >= f.first AND u.occurred_at >= $3
                    OFFSET 0) u
                LEFT JOIN session_usage p ON p.session_id = u.session_id
                                         AND p.occurred_at = u.occurred_at
                                         AND p.event_id = u.event_id
                                         AND p.kind = {USAGE_KIND}) u"
        ))
    )))
    .bind(firsts.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>())
    .bind(firsts.iter().map(|(_, t)| *t).collect::<Vec<_>>())
    .bind(firsts.iter().map(|(_, t)| *t).min())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// `INSERT INTO repo_usage_<grain>` of the rows of `from` (with `occurred_at`, the keys and
/// every amount), summed per bucket and key and added to what is there.
fn rollup_upsert(from: &str, grain: &str) -> String {
    let width = if grain == "1d" { "1 day" } else { "1 hour" };
    let sums = AMOUNTS
        .split(", ")
        .map(|c| format!("sum({c})"))
        .collect::<Vec<_>>()
        .join(", ");
    let adds = AMOUNTS
        .split(", ")
        .map(|c| format!("{c} = r.{c} + EXCLUDED.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO repo_usage_{grain} AS r (bucket, repository, branch, user_id, team_id, {AMOUNTS})
         SELECT date_bin('{width}', occurred_at, {ORIGIN}), repository, branch, user_id, team_id,
                {sums}
           FROM {from} GROUP BY 1, 2, 3, 4, 5
         ON CONFLICT (bucket, repository, branch, user_id, team_id) DO UPDATE SET {adds}"
    )
}

/// The `repo_sessions` rows of the usage rows in `from`.
fn sessions_select(from: &str) -> String {
    format!(
        "SELECT repository, branch, session_id, max(user_id), max(team_id), min(occurred_at),
                max(occurred_at), sum(requests), sum(cost_usd), sum(lines_added)
           FROM {from} GROUP BY repository, branch, session_id"
    )
}

/// Places new usage rows against every context known now, stores the placed ones (the
/// others stay in the raw rows alone: `usage_rows`) and adds them all to the rollups. The
/// batch's raw inserts already dropped every row seen before, so each is added once.
async fn insert_usage(conn: &mut PgConnection, usage: &[Usage]) -> sqlx::Result<()> {
    if usage.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "WITH n AS (
            SELECT * FROM UNNEST($1::text[], $2::timestamptz[], $3::uuid[], $4::text[],
                                 $5::text[], $6::bigint[], $7::bigint[], $8::float8[],
                                 $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[],
                                 $13::bigint[], $14::bigint[])
                AS n(session_id, occurred_at, event_id, user_id, team_id, {AMOUNTS})),
         p AS MATERIALIZED (
            SELECT n.*, COALESCE(c.repository, '') AS repository, COALESCE(c.branch, '') AS branch
              FROM n {placed}),
         ins AS (
            INSERT INTO session_usage (session_id, occurred_at, event_id, user_id, team_id,
                                       {AMOUNTS}, repository, branch)
            SELECT session_id, occurred_at, event_id, user_id, team_id, {AMOUNTS}, repository,
                   branch
              FROM p WHERE (repository, branch) <> ('', '')
            ON CONFLICT DO NOTHING),
         roll AS ({rollup}),
         roll_days AS ({rollup_days})
         INSERT INTO repo_sessions AS s
         {sessions}
         ON CONFLICT (repository, branch, session_id) DO UPDATE SET
            first_at = LEAST(s.first_at, EXCLUDED.first_at),
            last_at = GREATEST(s.last_at, EXCLUDED.last_at),
            requests = s.requests + EXCLUDED.requests,
            cost_usd = s.cost_usd + EXCLUDED.cost_usd,
            lines_added = s.lines_added + EXCLUDED.lines_added",
        placed = placed!("n"),
        rollup = rollup_upsert("p", "1h"),
        rollup_days = rollup_upsert("p", "1d"),
        sessions = sessions_select("p WHERE session_id <> ''"),
    );
    let ints = |f: fn(&Usage) -> i64| usage.iter().map(f).collect::<Vec<_>>();
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(
            usage
                .iter()
                .map(|u| u.session_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(usage.iter().map(|u| u.occurred_at).collect::<Vec<_>>())
        .bind(usage.iter().map(|u| u.event_id).collect::<Vec<_>>())
        .bind(usage.iter().map(|u| u.user_id.as_str()).collect::<Vec<_>>())
        .bind(usage.iter().map(|u| u.team_id.as_str()).collect::<Vec<_>>())
        .bind(ints(|u| u.requests))
        .bind(ints(|u| u.tool_runs))
        .bind(usage.iter().map(|u| u.cost_usd).collect::<Vec<_>>())
        .bind(ints(|u| u.input_tokens))
        .bind(ints(|u| u.output_tokens))
        .bind(ints(|u| u.cache_read_tokens))
        .bind(ints(|u| u.cache_creation_tokens))
        .bind(ints(|u| u.lines_added))
        .bind(ints(|u| u.lines_removed))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Stores the source-control events not seen before, then folds the new ones into
/// `pull_requests` (the newest description of each wins) and `branch_pushes`. Returns how
/// many were new.
async fn write_repository_events(
    conn: &mut PgConnection,
    f: &Fold,
    events: &[&Decoded],
) -> sqlx::Result<u64> {
    if f.repository_events.is_empty() {
        return Ok(0);
    }
    let e = &f.repository_events;
    let new: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO repository_events (event_id, occurred_at, type, repository, data)
         SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::jsonb[])
         ON CONFLICT DO NOTHING
         RETURNING event_id",
    )
    .bind(e.iter().map(|x| x.0).collect::<Vec<_>>())
    .bind(e.iter().map(|x| x.1).collect::<Vec<_>>())
    .bind(e.iter().map(|x| x.2).collect::<Vec<_>>())
    .bind(e.iter().map(|x| x.3.as_str()).collect::<Vec<_>>())
    .bind(e.iter().map(|x| x.4.clone()).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;
    let new: HashSet<Uuid> = new.into_iter().collect();
    // One row per pull request per statement: the newest description of the batch.
    let mut prs: BTreeMap<(String, i64), &PullRequestChanged> = BTreeMap::new();
    let mut pushes = Vec::new();
    for d in events.iter().filter(|d| new.contains(&d.env.id)) {
        match &d.payload {
            Payload::PullRequestChanged(p) => {
                let slot = prs.entry((p.repository.clone(), p.number)).or_insert(p);
                if newer(p, slot) {
                    *slot = p;
                }
            }
            Payload::BranchPushed(p) => pushes.push((d.env.occurred_at, p)),
            _ => {}
        }
    }
    if !prs.is_empty() {
        upsert_pull_requests(conn, &prs.into_values().collect::<Vec<_>>()).await?;
    }
    for (at, p) in pushes {
        sqlx::query(
            "INSERT INTO branch_pushes AS b (repository, branch, pushed_at, after_sha, pushes,
                                             commits, deleted)
             VALUES ($1, $2, $3, $4, 1, $5, $6)
             ON CONFLICT (repository, branch) DO UPDATE SET
                pushes = b.pushes + 1,
                commits = b.commits + EXCLUDED.commits,
                after_sha = CASE WHEN EXCLUDED.pushed_at >= b.pushed_at
                                 THEN EXCLUDED.after_sha ELSE b.after_sha END,
                deleted = CASE WHEN EXCLUDED.pushed_at >= b.pushed_at
                               THEN EXCLUDED.deleted ELSE b.deleted END,
                pushed_at = GREATEST(b.pushed_at, EXCLUDED.pushed_at)",
        )
        .bind(&p.repository)
        .bind(&p.branch)
        .bind(at)
        .bind(p.after.clone().unwrap_or_default())
        .bind(p.commits)
        .bind(p.deleted)
        .execute(&mut *conn)
        .await?;
    }
    Ok(new.len() as u64)
}

/// Whether `a` describes its pull request more recently than `b`: by the provider's
/// `updated_at`, then by how final its state is (merged, closed, open).
fn newer(a: &PullRequestChanged, b: &PullRequestChanged) -> bool {
    let rank = |s: &str| match s {
        "merged" => 2,
        "closed" => 1,
        _ => 0,
    };
    (a.updated_at, rank(&a.state)) > (b.updated_at, rank(&b.state))
}

async fn upsert_pull_requests(
    conn: &mut PgConnection,
    prs: &[&PullRequestChanged],
) -> sqlx::Result<()> {
    let text = |f: fn(&PullRequestChanged) -> Option<&str>| {
        prs.iter()
            .map(|p| f(p).unwrap_or("").to_string())
            .collect::<Vec<_>>()
    };
    let time = |f: fn(&PullRequestChanged) -> Option<DateTime<Utc>>| {
        prs.iter().map(|p| f(p)).collect::<Vec<_>>()
    };
    let rank =
        |t: &str| format!("CASE {t}.state WHEN 'merged' THEN 2 WHEN 'closed' THEN 1 ELSE 0 END");
    let newer = format!(
        "(EXCLUDED.updated_at, {}) >= (pr.updated_at, {})",
        rank("EXCLUDED"),
        rank("pr")
    );
    let replaced = [
        "provider",
        "state",
        "head_branch",
        "base_branch",
        "title",
        "author",
        "url",
        "closed_at",
        "updated_at",
        "head_repository",
    ]
    .map(|c| format!("{c} = CASE WHEN {newer} THEN EXCLUDED.{c} ELSE pr.{c} END"))
    .join(",\n            ");
    let sql = format!(
        "INSERT INTO pull_requests AS pr (repository, number, provider, state, head_branch,
                                          base_branch, title, author, url, opened_at, merged_at,
                                          closed_at, updated_at, additions, deletions,
                                          head_repository)
         SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                              $6::text[], $7::text[], $8::text[], $9::text[],
                              $10::timestamptz[], $11::timestamptz[], $12::timestamptz[],
                              $13::timestamptz[], $14::bigint[], $15::bigint[], $16::text[])
         ON CONFLICT (repository, number) DO UPDATE SET
            opened_at = LEAST(pr.opened_at, EXCLUDED.opened_at),
            merged_at = LEAST(pr.merged_at, EXCLUDED.merged_at),
            additions = CASE WHEN {newer} THEN COALESCE(EXCLUDED.additions, pr.additions)
                             ELSE COALESCE(pr.additions, EXCLUDED.additions) END,
            deletions = CASE WHEN {newer} THEN COALESCE(EXCLUDED.deletions, pr.deletions)
                             ELSE COALESCE(pr.deletions, EXCLUDED.deletions) END,
            {replaced}"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(
            prs.iter()
                .map(|p| p.repository.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(prs.iter().map(|p| p.number).collect::<Vec<_>>())
        .bind(prs.iter().map(|p| p.provider.as_str()).collect::<Vec<_>>())
        .bind(prs.iter().map(|p| p.state.as_str()).collect::<Vec<_>>())
        .bind(
            prs.iter()
                .map(|p| p.head_branch.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(text(|p| p.base_branch.as_deref()))
        .bind(text(|p| p.title.as_deref()))
        .bind(text(|p| p.author.as_deref()))
        .bind(text(|p| p.url.as_deref()))
        .bind(time(|p| p.opened_at))
        .bind(time(|p| p.merged_at))
        .bind(time(|p| p.closed_at))
        .bind(prs.iter().map(|p| p.updated_at).collect::<Vec<_>>())
        .bind(prs.iter().map(|p| p.additions).collect::<Vec<_>>())
        .bind(prs.iter().map(|p| p.deletions).collect::<Vec<_>>())
        .bind(text(|p| p.head_repository.as_deref()))
        .execute(&mut *conn)
        .await?;
    Ok(())
}
