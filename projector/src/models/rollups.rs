//! Rollups: per-minute, per-hour and per-day aggregates of the rows a batch really inserted,
//! per key (`activity_*`) and for the whole tenant (`activity_all_*`, and who was active:
//! `active_users_*`). Folding is pure (table-tested here); [`append`] writes a batch's
//! per-minute per-key deltas to the pending table, which [`compact`] folds into one row per
//! key in every grain; [`upsert`] adds the tenant-wide deltas to their tables,
//! [`insert_active_users`] records the active users. A rebuild instead folds them set-wise
//! from the raw rows once they are all loaded ([`rebuild`]).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use shared::histogram;
use shared::tenant::SchemaName;
use sqlx::{AssertSqlSafe, PgConnection, PgPool};

use super::raw::{copy_text, RawRow, RawTable};
use crate::schema::set_search_path;

/// A rollup's time grain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    Minute,
    Hour,
    Day,
}

impl Grain {
    pub const ALL: [Grain; 3] = [Grain::Minute, Grain::Hour, Grain::Day];

    pub const fn table(self) -> &'static str {
        match self {
            Grain::Minute => "activity_1m",
            Grain::Hour => "activity_1h",
            Grain::Day => "activity_1d",
        }
    }

    /// The table its per-key rows are stored in, one per key: the folded half of the view
    /// of that name (tenant template 0010).
    pub const fn store(self) -> &'static str {
        match self {
            Grain::Minute => "activity_1m_folded",
            Grain::Hour => "activity_1h_folded",
            Grain::Day => "activity_1d_folded",
        }
    }

    /// Every per-key delta of this grain not folded yet, the other half of the view
    /// [`Grain::table`]: the minute's pending rows ([`PENDING`]), for the hour and the day in
    /// their buckets (tenant template 0011). The pending rows' histograms are sparse; the views
    /// give them back dense (template 0012). A range of the hour's or the day's view finds no
    /// index since template 0014: readers of whole hours and days go through
    /// `activity_whole_hours` and `activity_whole_days`, which find the pending minutes by
    /// their own bucket.
    pub const fn unfolded(self) -> &'static str {
        match self {
            Grain::Minute => "activity_1m_pending",
            Grain::Hour => "activity_1h_unfolded",
            Grain::Day => "activity_1d_unfolded",
        }
    }

    pub fn width(self) -> TimeDelta {
        match self {
            Grain::Minute => TimeDelta::minutes(1),
            Grain::Hour => TimeDelta::hours(1),
            Grain::Day => TimeDelta::days(1),
        }
    }

    /// The tenant-wide rollup table of this grain.
    pub const fn tenant_table(self) -> &'static str {
        match self {
            Grain::Minute => "activity_all_1m",
            Grain::Hour => "activity_all_1h",
            Grain::Day => "activity_all_1d",
        }
    }

    /// The table of who was active in each bucket of this grain.
    pub const fn users_table(self) -> &'static str {
        match self {
            Grain::Minute => "active_users_1m",
            Grain::Hour => "active_users_1h",
            Grain::Day => "active_users_1d",
        }
    }

    /// The bucket `t` falls into (UTC, aligned to the epoch like `date_bin`).
    pub fn bucket(self, t: DateTime<Utc>) -> DateTime<Utc> {
        t.duration_trunc(self.width())
            .expect("grains are far smaller than the representable range")
    }
}

/// Which rollup table family deltas go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cube {
    /// One row per bucket, event type, user, team, project and name (`activity_*`): every
    /// filtered or grouped view.
    Keys,
    /// One row per bucket and event type (`activity_all_*`, the key's other dimensions
    /// empty): the views of the whole tenant, whose cost then grows with buckets only.
    Tenant,
}

impl Cube {
    pub const ALL: [Cube; 2] = [Cube::Keys, Cube::Tenant];

    pub fn table(self, grain: Grain) -> &'static str {
        match self {
            Cube::Keys => grain.table(),
            Cube::Tenant => grain.tenant_table(),
        }
    }
}

/// The dimensions of one rollup row.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub bucket: DateTime<Utc>,
    pub event_type: &'static str,
    pub user_id: String,
    pub team_id: String,
    pub project_id: String,
    pub name: String,
}

impl Key {
    /// The key of a tenant-wide row: the other dimensions empty.
    fn tenant(bucket: DateTime<Utc>, event_type: &'static str) -> Key {
        Key {
            bucket,
            event_type,
            user_id: String::new(),
            team_id: String::new(),
            project_id: String::new(),
            name: String::new(),
        }
    }
}

/// The measures of one rollup row.
#[derive(Debug, Clone, PartialEq)]
pub struct Measures {
    pub count: i64,
    pub errors: i64,
    pub duration_sum: i64,
    pub duration_max: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub value_sum: f64,
    pub duration_hist: Vec<i64>,
}

impl Default for Measures {
    fn default() -> Self {
        Measures {
            count: 0,
            errors: 0,
            duration_sum: 0,
            duration_max: 0,
            input_tokens: 0,
            output_tokens: 0,
            value_sum: 0.0,
            duration_hist: vec![0; histogram::BUCKETS],
        }
    }
}

impl Measures {
    /// Adds another delta into this one: counts and sums add up, maxima take the greater,
    /// histograms merge (as the upserts do in SQL).
    pub fn add(&mut self, m: &Measures) {
        self.count += m.count;
        self.errors += m.errors;
        self.duration_sum += m.duration_sum;
        self.duration_max = self.duration_max.max(m.duration_max);
        self.input_tokens += m.input_tokens;
        self.output_tokens += m.output_tokens;
        self.value_sum += m.value_sum;
        histogram::merge(&mut self.duration_hist, &m.duration_hist);
    }

    /// Counts one raw row in.
    fn count(&mut self, f: &Fact<'_>) {
        self.count += 1;
        self.errors += i64::from(f.is_error);
        self.duration_sum += f.duration_ms;
        self.duration_max = self.duration_max.max(f.duration_ms);
        self.input_tokens += f.input_tokens;
        self.output_tokens += f.output_tokens;
        self.value_sum += f.value;
        self.duration_hist[histogram::index(f.duration_ms)] += 1;
    }
}

/// What the rollups take from one raw row: a [`RawRow`] of a batch, or a stored row read
/// back by a rebuild.
#[derive(Debug, Clone, Copy)]
struct Fact<'r> {
    occurred_at: DateTime<Utc>,
    event_type: &'static str,
    user_id: &'r str,
    team_id: &'r str,
    project_id: &'r str,
    name: &'r str,
    is_error: bool,
    duration_ms: i64,
    input_tokens: i64,
    output_tokens: i64,
    value: f64,
}

impl<'r> Fact<'r> {
    fn of(r: &'r RawRow<'_>) -> Fact<'r> {
        Fact {
            occurred_at: r.occurred_at,
            event_type: r.event_type,
            user_id: r.user_id,
            team_id: r.team_id,
            project_id: r.project_id,
            name: r.name,
            is_error: r.is_error,
            duration_ms: r.duration_ms,
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            value: r.value,
        }
    }

    fn key(&self, bucket: DateTime<Utc>) -> Key {
        Key {
            bucket,
            event_type: self.event_type,
            user_id: self.user_id.into(),
            team_id: self.team_id.into(),
            project_id: self.project_id.into(),
            name: self.name.into(),
        }
    }

    /// Whether `key` is this row's key at `bucket`.
    fn is_keyed(&self, key: &Key, bucket: DateTime<Utc>) -> bool {
        key.bucket == bucket
            && key.event_type == self.event_type
            && key.user_id == self.user_id
            && key.team_id == self.team_id
            && key.project_id == self.project_id
            && key.name == self.name
    }
}

/// Folds rows into per-key rollup deltas for one grain. Keys come out sorted, and so do the
/// tenant-wide ones made from them ([`tenant_wide`]): concurrent projector instances upsert
/// those in the same order and cannot deadlock.
pub fn fold<'a>(
    rows: impl IntoIterator<Item = &'a RawRow<'a>>,
    grain: Grain,
) -> BTreeMap<Key, Measures> {
    let mut out: BTreeMap<Key, Measures> = BTreeMap::new();
    for r in rows {
        let f = Fact::of(r);
        out.entry(f.key(grain.bucket(f.occurred_at)))
            .or_default()
            .count(&f);
    }
    out
}

/// The tenant-wide deltas of per-key ones ([`fold`]): summed per bucket and event type, the
/// key's other dimensions empty. Sorted like them.
pub fn tenant_wide(keyed: &BTreeMap<Key, Measures>) -> BTreeMap<Key, Measures> {
    let mut out: BTreeMap<Key, Measures> = BTreeMap::new();
    for (k, m) in keyed {
        out.entry(Key::tenant(k.bucket, k.event_type))
            .or_default()
            .add(m);
    }
    out
}

/// Who was active in the buckets of per-key deltas ([`fold`]): (bucket, user id) pairs,
/// sorted (events without a user count for no one).
pub fn active_users(keyed: &BTreeMap<Key, Measures>) -> BTreeSet<(DateTime<Utc>, &str)> {
    keyed
        .keys()
        .filter(|k| !k.user_id.is_empty())
        .map(|k| (k.bucket, k.user_id.as_str()))
        .collect()
}

/// How an upsert merges a delta into an existing rollup row: counts and sums add up, maxima
/// take the greater, histograms merge by `$hist`: `hist_merge` keeps the span of its
/// arguments (the per-key folded rows, sparse since tenant template 0017), `hist_add` answers
/// dense (the tenant-wide rows).
macro_rules! merge_measures {
    ($hist:literal) => {
        concat!(
            " count = a.count + EXCLUDED.count,
          errors = a.errors + EXCLUDED.errors,
          duration_sum = a.duration_sum + EXCLUDED.duration_sum,
          duration_max = GREATEST(a.duration_max, EXCLUDED.duration_max),
          input_tokens = a.input_tokens + EXCLUDED.input_tokens,
          output_tokens = a.output_tokens + EXCLUDED.output_tokens,
          value_sum = a.value_sum + EXCLUDED.value_sum,
          duration_hist = ",
            $hist,
            "(a.duration_hist, EXCLUDED.duration_hist)"
        )
    };
}

/// The per-key and tenant-wide sums of `value_sum` that rows (as parallel arrays) would make,
/// computed so that one out of float8's range is an error (22003). A key's stored sum is its
/// folded row (a key probe) plus its pending rows, read once for the batch's buckets and
/// summed per key: the work grows with the rows pending in those buckets plus the keys, not
/// with their product.
macro_rules! overflow_sql {
    ($folded:literal, $pending:expr, $tenant:literal) => {
        concat!(
            "WITH x AS (
                SELECT b, t, u, tm, p, n, sum(v) AS v
                  FROM UNNEST($1::timestamptz[], $2::text[], $3::text[], $4::text[],
                              $5::text[], $6::text[], $7::float8[]) AS x(b, t, u, tm, p, n, v)
                 GROUP BY b, t, u, tm, p, n),
             pend AS (
                SELECT bucket AS b, event_type AS t, user_id AS u, team_id AS tm,
                       project_id AS p, name AS n, sum(value_sum) AS s
                  FROM ",
            $pending,
            " WHERE bucket IN (SELECT b FROM x)
                 GROUP BY 1, 2, 3, 4, 5, 6),
             k AS (
                SELECT coalesce((SELECT f.value_sum FROM ",
            $folded,
            " f WHERE f.bucket = x.b AND f.event_type = x.t AND f.user_id = x.u
                                     AND f.team_id = x.tm AND f.project_id = x.p
                                     AND f.name = x.n), 0)
                       + coalesce(pend.s, 0) + x.v AS s
                  FROM x LEFT JOIN pend USING (b, t, u, tm, p, n)),
             w AS (
                SELECT (SELECT coalesce(sum(a.value_sum), 0) FROM ",
            $tenant,
            " a WHERE a.bucket = x.b AND a.event_type = x.t) + sum(x.v) AS s
                  FROM x GROUP BY b, t)
             SELECT (SELECT count(*) FROM k WHERE s IS NOT NULL)
                  + (SELECT count(*) FROM w WHERE s IS NOT NULL)"
        )
    };
}

/// The rows of `$source` summed per key, with their buckets widened by `$bucket` (an
/// expression of `bucket`): one grain's deltas, from the pending rows or from a finer grain's
/// sums. A sum out of bigint's range is an error (22003), as it would be in the column. The
/// histograms' sums are sparse (`hist_merge_sum`, control migration 0020): a key with one
/// row keeps its histogram as it is, and a sum loops over the buckets its rows span.
macro_rules! sum_by_key_sql {
    ($source:literal, $bucket:literal) => {
        concat!(
            "SELECT ",
            $bucket,
            " AS bucket, event_type, user_id, team_id, project_id, name,
                    sum(count)::bigint AS count, sum(errors)::bigint AS errors,
                    sum(duration_sum)::bigint AS duration_sum, max(duration_max) AS duration_max,
                    sum(input_tokens)::bigint AS input_tokens,
                    sum(output_tokens)::bigint AS output_tokens, sum(value_sum) AS value_sum,
                    hist_merge_sum(duration_hist) AS duration_hist
               FROM ",
            $source,
            " GROUP BY 1, event_type, user_id, team_id, project_id, name"
        )
    };
}

/// Upserts the per-key sums `$sums` (one row per key of `$folded`'s grain) into `$folded`,
/// their histograms stored as the sums made them, sparse (tenant template 0017: the views
/// give them back dense and 1-based, as readers unnest them).
macro_rules! fold_into_sql {
    ($folded:literal, $sums:literal) => {
        concat!(
            "INSERT INTO ",
            $folded,
            " AS a (bucket, event_type, user_id, team_id, project_id, name, count, errors,
                   duration_sum, duration_max, input_tokens, output_tokens, value_sum,
                   duration_hist)
             SELECT bucket, event_type, user_id, team_id, project_id, name, count, errors,
                    duration_sum, duration_max, input_tokens, output_tokens, value_sum,
                    duration_hist
               FROM ",
            $sums,
            " ORDER BY bucket, event_type, user_id, team_id, project_id, name
             ON CONFLICT (bucket, event_type, user_id, team_id, project_id, name) DO UPDATE SET",
            merge_measures!("hist_merge"),
            " RETURNING 1"
        )
    };
}

/// Folds the minute's pending rows that `$which` (a `DELETE` of them) takes into the
/// minute's, the hour's and the day's folded tables (buckets as [`Grain::bucket`] makes
/// them: `date_bin` from the epoch), in the statement that deletes them; answers the rows
/// moved. The hour's sums are made from the minute's and the day's from the hour's (an
/// hour lies within one day from the epoch), so the histogram merges (`hist_merge_sum`, the
/// costliest part of a fold) number the pending rows, not three times as many.
macro_rules! compact_sql {
    ($which:literal) => {
        concat!(
            "WITH moved AS (",
            $which,
            " RETURNING *),
                  m AS MATERIALIZED (",
            sum_by_key_sql!("moved", "bucket"),
            "), h AS MATERIALIZED (",
            sum_by_key_sql!("m", "date_bin('1 hour', bucket, TIMESTAMPTZ 'epoch')"),
            "), d AS MATERIALIZED (",
            sum_by_key_sql!("h", "date_bin('1 day', bucket, TIMESTAMPTZ 'epoch')"),
            "), minute AS (",
            fold_into_sql!("activity_1m_folded", "m"),
            "), hour AS (",
            fold_into_sql!("activity_1h_folded", "h"),
            "), day AS (",
            fold_into_sql!("activity_1d_folded", "d"),
            ") SELECT count(*) FROM moved"
        )
    };
}

/// The table a batch appends its per-key deltas to ([`append`]): per minute, the hour's and
/// the day's derived from them when [`compact`] folds them.
pub const PENDING: &str = "activity_1m_pending";

/// The fold of every pending row ([`compact`]).
const COMPACT_SQL: &str = compact_sql!("DELETE FROM activity_1m_pending");

/// The fold of the pending rows of minutes before `$1` ([`fold_before`]).
const COMPACT_BEFORE_SQL: &str = compact_sql!("DELETE FROM activity_1m_pending WHERE bucket < $1");

/// Upsert of tenant-wide rollup deltas from parallel arrays (keys unique within one
/// statement), keyed by bucket and event type, expanded at compile time per table.
macro_rules! tenant_rollup_sql {
    ($table:literal) => {
        concat!(
            "INSERT INTO ",
            $table,
            " AS a (bucket, event_type, count, errors, duration_sum, duration_max, input_tokens,
                   output_tokens, value_sum, duration_hist)
             SELECT b, t, c, e, ds, dm, it, ot, vs, h::bigint[]
               FROM UNNEST($1::timestamptz[], $2::text[], $3::bigint[], $4::bigint[],
                           $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[],
                           $9::float8[], $10::text[])
                    AS x(b, t, c, e, ds, dm, it, ot, vs, h)
             ON CONFLICT (bucket, event_type) DO UPDATE SET",
            merge_measures!("hist_add")
        )
    };
}

/// One static statement per grain; the table is chosen from a closed set, not formatted.
fn upsert_sql(grain: Grain) -> &'static str {
    match grain {
        Grain::Minute => tenant_rollup_sql!("activity_all_1m"),
        Grain::Hour => tenant_rollup_sql!("activity_all_1h"),
        Grain::Day => tenant_rollup_sql!("activity_all_1d"),
    }
}

/// Adds one grain's tenant-wide deltas ([`tenant_wide`]) to its rollup table (search_path
/// already points at the tenant's schema): counts and sums add up, maxima take the greater,
/// histograms merge. These sums are where a value that would overflow is refused.
pub async fn upsert(
    conn: &mut PgConnection,
    grain: Grain,
    deltas: &BTreeMap<Key, Measures>,
) -> sqlx::Result<()> {
    if deltas.is_empty() {
        return Ok(());
    }
    let keys = || deltas.keys();
    let vals = || deltas.values();
    // Histograms travel as array literals: UNNEST cannot take an array of arrays of
    // different rows, and a text[] of literals casts back losslessly.
    let hist: Vec<String> = vals()
        .map(|m| {
            let mut literal = String::new();
            hist_literal(&mut literal, &m.duration_hist, HistForm::of(Cube::Tenant));
            literal
        })
        .collect();
    sqlx::query(upsert_sql(grain))
        .bind(keys().map(|k| k.bucket).collect::<Vec<_>>())
        .bind(keys().map(|k| k.event_type).collect::<Vec<_>>())
        .bind(vals().map(|m| m.count).collect::<Vec<_>>())
        .bind(vals().map(|m| m.errors).collect::<Vec<_>>())
        .bind(vals().map(|m| m.duration_sum).collect::<Vec<_>>())
        .bind(vals().map(|m| m.duration_max).collect::<Vec<_>>())
        .bind(vals().map(|m| m.input_tokens).collect::<Vec<_>>())
        .bind(vals().map(|m| m.output_tokens).collect::<Vec<_>>())
        .bind(vals().map(|m| m.value_sum).collect::<Vec<_>>())
        .bind(hist)
        .execute(conn)
        .await?;
    Ok(())
}

/// The columns of a per-key rollup row, in the order [`rollup_line`] writes them.
const KEYED_COLUMNS: &str = "bucket, event_type, user_id, team_id, project_id, name, count, \
    errors, duration_sum, duration_max, input_tokens, output_tokens, value_sum, duration_hist";

/// Appends per-minute per-key deltas ([`fold`]) to the minute's pending table with one
/// `COPY` (search_path already points at the tenant's schema): no key is probed or locked,
/// and no histogram merged, until [`compact`] folds them into every grain. Their histograms
/// are sparse ([`HistForm::Sparse`]).
pub async fn append(
    conn: &mut PgConnection,
    minutes: &BTreeMap<Key, Measures>,
) -> sqlx::Result<()> {
    if minutes.is_empty() {
        return Ok(());
    }
    let mut lines = String::with_capacity(minutes.len() * 128);
    for (k, m) in minutes {
        rollup_line(&mut lines, Cube::Keys, k, m, HistForm::of(Cube::Keys));
    }
    copy_lines(conn, PENDING, KEYED_COLUMNS, lines).await
}

/// Sends `lines` (COPY text format) into `table`'s `columns`.
async fn copy_lines(
    conn: &mut PgConnection,
    table: &str,
    columns: &str,
    lines: String,
) -> sqlx::Result<()> {
    let mut copy = conn
        .copy_in_raw(&format!("COPY {table} ({columns}) FROM STDIN"))
        .await?;
    copy.send(lines.into_bytes()).await?;
    copy.finish().await?;
    Ok(())
}

/// Moves the pending deltas of every grain into their folded tables, one row per key
/// (summed and merged into the row already there), in one transaction; returns the pending
/// rows folded, or `None` when another session holds the schema's lock (another instance
/// folding it, retention, an upgrade): then it is tried again later; `Some(0)` for a schema
/// without every template, left to its upgrade. A reader sees every
/// event once before, during and after: the view it reads is one statement, under one
/// snapshot, and the rows leave the pending table in the transaction that adds them to the
/// folded one.
pub async fn compact(pool: &PgPool, schema: &SchemaName) -> sqlx::Result<Option<u64>> {
    let mut tx = pool.begin().await?;
    if !crate::schema::try_lock(&mut tx, schema).await? {
        return Ok(None);
    }
    // Only a schema with every template is folded as this binary folds (an older one's
    // deltas are folded by its upgrade, tenant template 0011). Checked under the lock an
    // upgrade takes too, not only when the schema was listed: the listing may be older than
    // a change of the schema's template (as the e2e test of the 0010 upgrade makes one).
    if !crate::schema::has_every_template(&mut tx, schema).await? {
        return Ok(Some(0));
    }
    set_search_path(&mut tx, schema).await?;
    let moved = fold_pending(&mut tx).await?;
    tx.commit().await?;
    Ok(Some(moved))
}

/// Folds every pending delta in the caller's transaction, which holds the schema's lock
/// ([`crate::schema::try_lock`]) and whose search_path points at the schema; answers the
/// pending rows folded.
async fn fold_pending(conn: &mut PgConnection) -> sqlx::Result<u64> {
    let moved: i64 = sqlx::query_scalar(COMPACT_SQL).fetch_one(conn).await?;
    Ok(u64::try_from(moved).unwrap_or(0))
}

/// Folds the pending deltas of minutes before `cutoff`, as [`fold_pending`] does every one:
/// for retention, before the minute's window would delete them (they are the hour's and the
/// day's too until folded).
pub async fn fold_before(conn: &mut PgConnection, cutoff: DateTime<Utc>) -> sqlx::Result<u64> {
    let moved: i64 = sqlx::query_scalar(COMPACT_BEFORE_SQL)
        .bind(cutoff)
        .fetch_one(conn)
        .await?;
    Ok(u64::try_from(moved).unwrap_or(0))
}

/// How a histogram is written into a rollup row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HistForm {
    /// 1-based, its trailing empty buckets left off: the tenant-wide tables', which readers
    /// unnest.
    Dense,
    /// Only the span of its non-empty buckets, the array's lower bound its first bucket's
    /// (`[25:27]={1,0,2}`): the per-key rows', pending (tenant template 0012) and folded
    /// (0017), which readers read through the views' `hist_dense`.
    Sparse,
}

impl HistForm {
    /// The form `cube`'s rows keep their histograms in.
    fn of(cube: Cube) -> HistForm {
        match cube {
            Cube::Keys => HistForm::Sparse,
            Cube::Tenant => HistForm::Dense,
        }
    }
}

/// Appends a histogram as an array literal of `form`: `hist_add` and the readers treat
/// missing buckets as zero. A histogram without durations is `{0}` in either form.
fn hist_literal(out: &mut String, hist: &[i64], form: HistForm) {
    use std::fmt::Write as _;
    let Some(last) = hist.iter().rposition(|n| *n != 0) else {
        out.push_str("{0}");
        return;
    };
    let first = match form {
        HistForm::Dense => 0,
        HistForm::Sparse => hist.iter().position(|n| *n != 0).unwrap_or(0),
    };
    if first > 0 {
        let _ = write!(out, "[{}:{}]=", first + 1, last + 1);
    }
    out.push('{');
    for (i, n) in hist[first..=last].iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{n}");
    }
    out.push('}');
}

/// Insert of (bucket, user) pairs that keeps the ones already recorded.
macro_rules! active_users_sql {
    ($table:literal) => {
        concat!(
            "INSERT INTO ",
            $table,
            " (bucket, user_id) SELECT * FROM UNNEST($1::timestamptz[], $2::text[])
             ON CONFLICT DO NOTHING"
        )
    };
}

/// Records active users ([`active_users`]) in the grain's `active_users_*` table.
pub async fn insert_active_users(
    conn: &mut PgConnection,
    grain: Grain,
    users: &BTreeSet<(DateTime<Utc>, &str)>,
) -> sqlx::Result<()> {
    if users.is_empty() {
        return Ok(());
    }
    let sql = match grain {
        Grain::Minute => active_users_sql!("active_users_1m"),
        Grain::Hour => active_users_sql!("active_users_1h"),
        Grain::Day => active_users_sql!("active_users_1d"),
    };
    sqlx::query(sql)
        .bind(users.iter().map(|(b, _)| *b).collect::<Vec<_>>())
        .bind(users.iter().map(|(_, u)| *u).collect::<Vec<_>>())
        .execute(conn)
        .await?;
    Ok(())
}

/// A value this large in magnitude can make a rollup's sum overflow float8 with a few
/// others; below it, that takes hundreds of millions of events.
pub const HUGE_VALUE: f64 = 1e300;

/// Checks, per grain, each per-key and tenant-wide rollup sum that the rows of huge value
/// ([`HUGE_VALUE`]) among `rows` would change: the stored sum plus theirs. PostgreSQL refuses
/// one that overflows float8 (22003), so the batch fails as a record's fault and the
/// bisection dead-letters the row that tips it (`batch::find_refused`). Appended deltas are
/// summed only later, when no event could be blamed (and a tenant-wide sum cannot stand in
/// for the per-key ones: values of both signs keep it finite). Real traffic has no such
/// rows, and then nothing is sent.
pub async fn refuse_overflows(conn: &mut PgConnection, rows: &[&RawRow<'_>]) -> sqlx::Result<()> {
    let huge: Vec<&RawRow> = rows
        .iter()
        .filter(|r| r.value.abs() >= HUGE_VALUE)
        .copied()
        .collect();
    if huge.is_empty() {
        return Ok(());
    }
    let col =
        |f: for<'r> fn(&'r RawRow<'_>) -> &'r str| huge.iter().map(|r| f(r)).collect::<Vec<&str>>();
    for grain in Grain::ALL {
        sqlx::query(overflow_check_sql(grain))
            .bind(
                huge.iter()
                    .map(|r| grain.bucket(r.occurred_at))
                    .collect::<Vec<_>>(),
            )
            .bind(col(|r| r.event_type))
            .bind(col(|r| r.user_id))
            .bind(col(|r| r.team_id))
            .bind(col(|r| r.project_id))
            .bind(col(|r| r.name))
            .bind(huge.iter().map(|r| r.value).collect::<Vec<_>>())
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// The pending minute rows of each bucket of width `$width` (an hour or a day) that an
/// overflow check asks about, in that bucket: found by their own minute's bucket, one range
/// of the key index per bucket asked about (the pending table has no index by hour or day
/// since tenant template 0014), so that buckets far apart do not read the minutes between.
macro_rules! pending_in {
    ($width:literal) => {
        concat!(
            "(SELECT xb.b AS bucket, p.event_type, p.user_id, p.team_id, p.project_id, p.name,
                     p.value_sum
                FROM (SELECT DISTINCT b FROM x) xb,
                     LATERAL (SELECT * FROM activity_1m_pending
                               WHERE bucket >= xb.b AND bucket < xb.b + INTERVAL '",
            $width,
            "') p) u"
        )
    };
}

/// One grain's overflow check ([`refuse_overflows`]): its folded rows, its unfolded ones
/// and its tenant-wide rollup, each table chosen from a closed set, not formatted.
fn overflow_check_sql(grain: Grain) -> &'static str {
    match grain {
        Grain::Minute => overflow_sql!(
            "activity_1m_folded",
            "activity_1m_pending",
            "activity_all_1m"
        ),
        Grain::Hour => overflow_sql!(
            "activity_1h_folded",
            pending_in!("1 hour"),
            "activity_all_1h"
        ),
        Grain::Day => overflow_sql!(
            "activity_1d_folded",
            pending_in!("1 day"),
            "activity_all_1d"
        ),
    }
}

/// Writes the rollups of a batch's inserted rows (search_path already points at the
/// tenant's schema): the per-minute per-key deltas appended ([`append`]; the fold derives
/// the hour's and the day's), and at every grain the tenant-wide deltas ([`upsert`]) and
/// the active users, widened from the minute's.
pub async fn write(conn: &mut PgConnection, rows: &[&RawRow<'_>]) -> sqlx::Result<()> {
    let minutes = fold(rows.iter().copied(), Grain::Minute);
    let phase = std::time::Instant::now();
    append(conn, &minutes).await?;
    crate::batch::record_phase("activity_pending", phase);
    let tenant = tenant_wide(&minutes);
    let users = active_users(&minutes);
    for grain in Grain::ALL {
        let phase = std::time::Instant::now();
        upsert(conn, grain, &widen(&tenant, grain)).await?;
        let users: BTreeSet<_> = users.iter().map(|(b, u)| (grain.bucket(*b), *u)).collect();
        insert_active_users(conn, grain, &users).await?;
        crate::batch::record_phase(grain.tenant_table(), phase);
    }
    Ok(())
}

/// Per-minute deltas summed into `grain`'s buckets (minute buckets lie within one bucket of
/// every wider grain: all are aligned to the epoch). Sorted like them.
pub fn widen(minutes: &BTreeMap<Key, Measures>, grain: Grain) -> BTreeMap<Key, Measures> {
    let mut out: BTreeMap<Key, Measures> = BTreeMap::new();
    for (k, m) in minutes {
        let key = Key {
            bucket: grain.bucket(k.bucket),
            ..k.clone()
        };
        out.entry(key).or_default().add(m);
    }
    out
}

/// The rollup tables as readers name them: per key, tenant-wide and active users, each at
/// minute, hour and day (the per-key ones are views of their folded rows and the pending
/// minute rows, [`Grain::store`], [`Grain::unfolded`]).
pub const TABLES: [&str; 9] = [
    Grain::Minute.table(),
    Grain::Hour.table(),
    Grain::Day.table(),
    Grain::Minute.tenant_table(),
    Grain::Hour.tenant_table(),
    Grain::Day.tenant_table(),
    Grain::Minute.users_table(),
    Grain::Hour.users_table(),
    Grain::Day.users_table(),
];

/// The tables the rollups are stored in, in [`TABLES`]' order (the order [`Copies`] keeps
/// its buffers in): the per-key ones are the folded halves.
pub const STORES: [&str; 9] = [
    Grain::Minute.store(),
    Grain::Hour.store(),
    Grain::Day.store(),
    Grain::Minute.tenant_table(),
    Grain::Hour.tenant_table(),
    Grain::Day.tenant_table(),
    Grain::Minute.users_table(),
    Grain::Hour.users_table(),
    Grain::Day.users_table(),
];

/// Appends one per-key (`Cube::Keys`) or tenant-wide rollup row to `line` in COPY text
/// format, its columns as [`KEYED_COLUMNS`] (less the key's user, team, project and name
/// for a tenant-wide row), its histogram in `form`.
fn rollup_line(line: &mut String, cube: Cube, key: &Key, m: &Measures, form: HistForm) {
    use chrono::SecondsFormat::Secs;
    use std::fmt::Write as _;
    let _ = write!(
        line,
        "{}\t{}\t",
        key.bucket.to_rfc3339_opts(Secs, true),
        key.event_type
    );
    if cube == Cube::Keys {
        for s in [&key.user_id, &key.team_id, &key.project_id, &key.name] {
            copy_text(line, s);
            line.push('\t');
        }
    }
    let _ = write!(
        line,
        "{}\t{}\t{}\t{}\t{}\t{}\t{:?}\t",
        m.count,
        m.errors,
        m.duration_sum,
        m.duration_max,
        m.input_tokens,
        m.output_tokens,
        m.value_sum
    );
    hist_literal(line, &m.duration_hist, form);
    line.push('\n');
}

/// Rollup rows on their way into their tables by `COPY` (text format), one buffer per table,
/// for tables nobody upserts into meanwhile: a rebuild's, or a benchmark's bulk load. A
/// buffer is sent once it holds [`Copies::FLUSH_BYTES`], the rest by [`Copies::finish`].
#[derive(Debug, Default)]
pub struct Copies {
    /// Indexed like [`STORES`].
    lines: [String; 9],
    rows: u64,
}

impl Copies {
    const FLUSH_BYTES: usize = 4 << 20;

    fn slot(grain: Grain, table: usize) -> usize {
        let g = match grain {
            Grain::Minute => 0,
            Grain::Hour => 1,
            Grain::Day => 2,
        };
        table * 3 + g
    }

    /// Adds one row of a grain's per-key (`Cube::Keys`) or tenant-wide rollup.
    pub fn rollup(&mut self, grain: Grain, cube: Cube, key: &Key, m: &Measures) {
        let table = match cube {
            Cube::Keys => 0,
            Cube::Tenant => 1,
        };
        rollup_line(
            &mut self.lines[Self::slot(grain, table)],
            cube,
            key,
            m,
            HistForm::of(cube),
        );
        self.rows += 1;
    }

    /// Adds one (bucket, user) pair of a grain's active users.
    pub fn active_user(&mut self, grain: Grain, bucket: DateTime<Utc>, user: &str) {
        use chrono::SecondsFormat::Secs;
        let line = &mut self.lines[Self::slot(grain, 2)];
        line.push_str(&bucket.to_rfc3339_opts(Secs, true));
        line.push('\t');
        copy_text(line, user);
        line.push('\n');
        self.rows += 1;
    }

    /// Sends the buffers that grew large (search_path points at the tenant's schema).
    pub async fn send_full(&mut self, conn: &mut PgConnection) -> sqlx::Result<()> {
        self.send(conn, Self::FLUSH_BYTES).await
    }

    /// Sends everything held; returns how many rows were written in all.
    pub async fn finish(mut self, conn: &mut PgConnection) -> sqlx::Result<u64> {
        self.send(conn, 1).await?;
        Ok(self.rows)
    }

    async fn send(&mut self, conn: &mut PgConnection, at_least: usize) -> sqlx::Result<()> {
        for (i, table) in STORES.iter().enumerate() {
            if self.lines[i].len() < at_least {
                continue;
            }
            let columns = match i / 3 {
                0 => KEYED_COLUMNS,
                1 => {
                    "bucket, event_type, count, errors, duration_sum, duration_max, \
                      input_tokens, output_tokens, value_sum, duration_hist"
                }
                _ => "bucket, user_id",
            };
            copy_lines(conn, table, columns, std::mem::take(&mut self.lines[i])).await?;
        }
        Ok(())
    }
}

/// A rollup table's primary key: table, constraint name, definition.
pub type PrimaryKey = (String, String, String);

/// The primary keys of `schema`'s rollup tables, read once before a [`rebuild`] drops them
/// (so that a rebuild run again after a failure still knows what to build).
pub async fn primary_keys(
    conn: &mut PgConnection,
    schema: &SchemaName,
) -> sqlx::Result<Vec<PrimaryKey>> {
    sqlx::query_as(
        "SELECT t.relname::text, c.conname::text, pg_get_constraintdef(c.oid)
           FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid
           JOIN pg_namespace n ON n.oid = t.relnamespace
          WHERE c.contype = 'p' AND n.nspname = $1 AND t.relname = ANY($2)",
    )
    .bind(schema.as_str())
    .bind(&STORES[..])
    .fetch_all(conn)
    .await
}

/// Connections a [`rebuild`] folds on at once, each taking every other day: one folds in
/// this process while PostgreSQL sorts and copies for the other.
const FOLD_CONNECTIONS: usize = 2;

/// A rebuild's rollups, folded set-wise from the raw rows once a bulk load has stored them
/// all (nobody else writes to `schema`, nobody reads it before the switch, and the raw rows
/// of every day in `days` are there; other days hold none). Returns the rollup rows written.
///
/// The rollup tables are emptied and their primary keys (`keys`, from [`primary_keys`])
/// dropped, then each day's raw rows of every table are read in one sorted pass — by user,
/// table, team, project, name and time — so that every per-key rollup row, at every grain,
/// is a run of consecutive rows, and a user's active minutes and hours are one run too: each
/// is folded in memory held for one run (the tenant-wide rows, for one day) and written once
/// by `COPY`. Days are independent, so [`FOLD_CONNECTIONS`] connections fold them side by
/// side, each in a transaction of its own. The primary keys are built again at the end.
/// What comes out, into the folded tables, is what the live path's appended deltas add up
/// to for the same rows, per key (the e2e tests compare both). A rebuild that fails part way
/// leaves the tables half made; run again, it starts by emptying them.
pub async fn rebuild(
    pool: &PgPool,
    schema: &SchemaName,
    days: &BTreeSet<DateTime<Utc>>,
    keys: &[PrimaryKey],
) -> sqlx::Result<u64> {
    let mut tx = pool.begin().await?;
    set_search_path(&mut tx, schema).await?;
    // The pending deltas too: a rebuild's version has none (nothing writes it live before
    // the switch), unless a test or an operator did.
    sqlx::query(AssertSqlSafe(format!(
        "TRUNCATE {}, {PENDING}",
        STORES.join(", ")
    )))
    .execute(&mut *tx)
    .await?;
    for (table, name, _) in keys {
        sqlx::query(AssertSqlSafe(format!(
            "ALTER TABLE \"{table}\" DROP CONSTRAINT IF EXISTS \"{name}\""
        )))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;

    let mut folds = tokio::task::JoinSet::new();
    for first in 0..FOLD_CONNECTIONS {
        let share: Vec<_> = days
            .iter()
            .skip(first)
            .step_by(FOLD_CONNECTIONS)
            .copied()
            .collect();
        let (pool, schema) = (pool.clone(), schema.clone());
        folds.spawn(async move { fold_days(&pool, &schema, &share).await });
    }
    let mut rows = 0;
    while let Some(folded) = folds.join_next().await {
        // A fold that failed ends the rebuild (dropping `folds` stops the other one).
        rows += folded.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
    }

    let mut tx = pool.begin().await?;
    set_search_path(&mut tx, schema).await?;
    // Building the keys in memory where they fit.
    sqlx::query("SET LOCAL maintenance_work_mem = '256MB'")
        .execute(&mut *tx)
        .await?;
    for (table, name, definition) in keys {
        sqlx::query(AssertSqlSafe(format!(
            "ALTER TABLE \"{table}\" ADD CONSTRAINT \"{name}\" {definition}"
        )))
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(AssertSqlSafe(format!("ANALYZE {}", STORES.join(", "))))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(rows)
}

/// Folds the rollups of `days` on a connection of its own, in one transaction; returns the
/// rows written.
async fn fold_days(
    pool: &PgPool,
    schema: &SchemaName,
    days: &[DateTime<Utc>],
) -> sqlx::Result<u64> {
    let mut tx = pool.begin().await?;
    set_search_path(&mut tx, schema).await?;
    // Sorting a day's rows in memory where it fits.
    sqlx::query("SET LOCAL work_mem = '128MB'")
        .execute(&mut *tx)
        .await?;
    let mut fold = SortedFold::default();
    for day in days {
        read_day(&mut tx, *day, &mut fold).await?;
    }
    let rows = fold.out.finish(&mut tx).await?;
    tx.commit().await?;
    Ok(rows)
}

/// A stored raw row as a rebuild reads it: table (index into [`RawTable::ALL`]), time,
/// user, team, project, name, status, duration, tokens in and out, value.
type Stored = (
    i16,
    DateTime<Utc>,
    String,
    String,
    String,
    String,
    String,
    i64,
    i64,
    i64,
    f64,
);

/// Rows fetched from the cursor at a time.
const FETCH_ROWS: usize = 10_000;

/// Folds the raw rows of the day starting at `day` into `fold`, through a cursor.
async fn read_day(
    conn: &mut PgConnection,
    day: DateTime<Utc>,
    fold: &mut SortedFold,
) -> sqlx::Result<()> {
    use chrono::SecondsFormat::Secs;
    let (lo, hi) = (day, day + Grain::Day.width());
    let (lo, hi) = (
        lo.to_rfc3339_opts(Secs, true),
        hi.to_rfc3339_opts(Secs, true),
    );
    let parts: Vec<String> = RawTable::ALL
        .iter()
        .enumerate()
        .map(|(i, t)| {
            format!(
                "SELECT {i}::int2 AS t, occurred_at, user_id, team_id, project_id, name, status,
                        duration_ms, input_tokens, output_tokens, value
                   FROM {} WHERE occurred_at >= '{lo}' AND occurred_at < '{hi}'",
                t.name()
            )
        })
        .collect();
    sqlx::query(AssertSqlSafe(format!(
        "DECLARE rollup_rebuild NO SCROLL CURSOR FOR SELECT * FROM ({}) r
          ORDER BY user_id COLLATE \"C\", t, team_id COLLATE \"C\", project_id COLLATE \"C\",
                   name COLLATE \"C\", occurred_at",
        parts.join(" UNION ALL ")
    )))
    .execute(&mut *conn)
    .await?;
    loop {
        let rows: Vec<Stored> = sqlx::query_as(AssertSqlSafe(format!(
            "FETCH {FETCH_ROWS} FROM rollup_rebuild"
        )))
        .fetch_all(&mut *conn)
        .await?;
        for r in &rows {
            let table = RawTable::ALL[usize::try_from(r.0).unwrap_or(0)];
            fold.row(&Fact {
                occurred_at: r.1,
                event_type: table.event_type(&r.5),
                user_id: &r.2,
                team_id: &r.3,
                project_id: &r.4,
                name: &r.5,
                is_error: table.is_error(&r.6),
                duration_ms: r.7,
                input_tokens: r.8,
                output_tokens: r.9,
                value: r.10,
            });
        }
        fold.out.send_full(&mut *conn).await?;
        if rows.len() < FETCH_ROWS {
            break;
        }
    }
    sqlx::query("CLOSE rollup_rebuild")
        .execute(&mut *conn)
        .await?;
    fold.end_day();
    Ok(())
}

/// The fold of one day's raw rows in the order [`read_day`] reads them: per grain, the
/// per-key row being summed (its rows are consecutive) and the day's tenant-wide rows; the
/// active buckets of the user being read.
#[derive(Debug, Default)]
struct SortedFold {
    keyed: [Option<(Key, Measures)>; 3],
    tenant: [BTreeMap<(DateTime<Utc>, &'static str), Measures>; 3],
    user: String,
    active: [BTreeSet<DateTime<Utc>>; 3],
    out: Copies,
}

impl SortedFold {
    fn row(&mut self, f: &Fact<'_>) {
        if f.user_id != self.user {
            self.end_user();
            self.user = f.user_id.into();
        }
        for (i, grain) in Grain::ALL.into_iter().enumerate() {
            let bucket = grain.bucket(f.occurred_at);
            let current = &mut self.keyed[i];
            if !current.as_ref().is_some_and(|(k, _)| f.is_keyed(k, bucket)) {
                if let Some((k, m)) = current.replace((f.key(bucket), Measures::default())) {
                    self.out.rollup(grain, Cube::Keys, &k, &m);
                }
            }
            if let Some((_, m)) = current.as_mut() {
                m.count(f);
            }
            self.tenant[i]
                .entry((bucket, f.event_type))
                .or_default()
                .count(f);
            if !f.user_id.is_empty() {
                self.active[i].insert(bucket);
            }
        }
    }

    /// Writes the active buckets of the user whose rows ended.
    fn end_user(&mut self) {
        for (grain, buckets) in Grain::ALL.into_iter().zip(&mut self.active) {
            for bucket in std::mem::take(buckets) {
                self.out.active_user(grain, bucket, &self.user);
            }
        }
    }

    /// Writes what the day held: its last per-key rows, its last user's active buckets and
    /// its tenant-wide rows.
    fn end_day(&mut self) {
        self.end_user();
        self.user.clear();
        for (i, grain) in Grain::ALL.into_iter().enumerate() {
            if let Some((k, m)) = self.keyed[i].take() {
                self.out.rollup(grain, Cube::Keys, &k, &m);
            }
            for ((bucket, event_type), m) in std::mem::take(&mut self.tenant[i]) {
                let key = Key::tenant(bucket, event_type);
                self.out.rollup(grain, Cube::Tenant, &key, &m);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::raw::RawTable;
    use chrono::TimeZone;
    use uuid::Uuid;

    fn row<'a>(t: DateTime<Utc>, user: &'a str, name: &'a str, dur: i64, err: bool) -> RawRow<'a> {
        RawRow {
            table: RawTable::CommandExecutions,
            event_type: "command.executed",
            event_id: Uuid::new_v4(),
            occurred_at: t,
            received_at: t,
            user_id: user,
            team_id: "",
            project_id: "",
            session_id: "",
            name,
            status: if err { "error" } else { "success" },
            is_error: err,
            duration_ms: dur,
            input_tokens: 1,
            output_tokens: 2,
            value: 0.5,
            data: std::borrow::Cow::Owned(serde_json::Value::Null),
        }
    }

    #[test]
    fn each_grain_upserts_its_own_tenant_table() {
        for grain in Grain::ALL {
            let sql = upsert_sql(grain);
            assert!(
                sql.starts_with(&format!("INSERT INTO {} AS a (", grain.tenant_table())),
                "{sql}"
            );
        }
    }

    #[test]
    fn histograms_are_written_dense_or_as_the_span_of_their_buckets() {
        let literal = |hist: &[i64], form| {
            let mut out = String::new();
            hist_literal(&mut out, hist, form);
            out
        };
        let mut hist = vec![0; histogram::BUCKETS];
        assert_eq!(literal(&hist, HistForm::Dense), "{0}");
        assert_eq!(literal(&hist, HistForm::Sparse), "{0}");
        hist[24] = 1;
        hist[26] = 2;
        assert_eq!(
            literal(&hist, HistForm::Dense),
            format!("{{{}1,0,2}}", "0,".repeat(24))
        );
        assert_eq!(literal(&hist, HistForm::Sparse), "[25:27]={1,0,2}");
        hist[0] = 3;
        assert_eq!(
            literal(&hist, HistForm::Sparse),
            literal(&hist, HistForm::Dense)
        );
        assert!(literal(&hist, HistForm::Sparse).starts_with("{3,0,"));
    }

    #[test]
    fn minute_deltas_are_folded_into_every_grain() {
        assert_eq!(PENDING, format!("{}_pending", Grain::Minute.table()));
        for sql in [COMPACT_SQL, COMPACT_BEFORE_SQL] {
            let moved = format!("WITH moved AS (DELETE FROM {PENDING}");
            assert!(sql.starts_with(&moved), "{sql}");
            for grain in Grain::ALL {
                assert_eq!(grain.store(), format!("{}_folded", grain.table()));
                let into = format!("INSERT INTO {} AS a", grain.store());
                assert_eq!(sql.matches(&into).count(), 1, "{grain:?}: {sql}");
            }
            // Each grain's sums come from the next finer one's: the pending rows are merged
            // once, not once per grain.
            assert_eq!(sql.matches("hist_merge_sum(").count(), 3, "{sql}");
            for (sums, source) in [("m", "moved"), ("h", "m"), ("d", "h")] {
                let cte = &sql[sql.find(&format!(" {sums} AS MATERIALIZED (")).unwrap()..];
                let body = &cte[..cte.find(" GROUP BY").unwrap()];
                assert!(body.ends_with(&format!("FROM {source}")), "{sums}: {body}");
            }
            // What each grain stores is its sums' sparse histograms, merged into a key's
            // row sparse too (tenant template 0017; the views make them dense for readers).
            for (grain, sums) in Grain::ALL.into_iter().zip(["m", "h", "d"]) {
                let into = format!("INSERT INTO {} AS a", grain.store());
                let insert = &sql[sql.find(&into).unwrap()..];
                let (insert, merge) = insert.split_at(insert.find("ON CONFLICT").unwrap());
                assert!(
                    insert.contains(&format!("FROM {sums} ORDER BY")),
                    "{grain:?}: {insert}"
                );
                assert!(!insert.contains("hist_dense"), "{grain:?}: {insert}");
                let merge = &merge[..merge.find("RETURNING").unwrap()];
                assert!(
                    merge.contains("hist_merge(a.duration_hist, EXCLUDED.duration_hist)"),
                    "{grain:?}: {merge}"
                );
            }
        }
        assert_eq!(Grain::Minute.unfolded(), PENDING);
        for grain in [Grain::Hour, Grain::Day] {
            assert_eq!(grain.unfolded(), format!("{}_unfolded", grain.table()));
        }
    }

    #[test]
    fn each_grains_overflow_check_reads_its_own_tables() {
        for grain in Grain::ALL {
            let sql = overflow_check_sql(grain);
            // The hour's and the day's unfolded rows are the pending minutes in their buckets,
            // read by the minute's bucket (tenant template 0014).
            for table in [grain.store(), PENDING, grain.tenant_table()] {
                let read = format!("FROM {table}");
                assert!(sql.contains(&read), "{grain:?} reads {table}: {sql}");
            }
            let widened = match grain {
                Grain::Minute => None,
                Grain::Hour => Some("bucket < xb.b + INTERVAL '1 hour'"),
                Grain::Day => Some("bucket < xb.b + INTERVAL '1 day'"),
            };
            if let Some(widened) = widened {
                assert!(sql.contains(widened), "{grain:?} widens: {sql}");
                assert!(!sql.contains(grain.unfolded()), "{grain:?}: {sql}");
            }
        }
    }

    #[test]
    fn minutes_widened_are_the_wider_grains_fold() {
        let t0 = Utc.with_ymd_and_hms(2026, 11, 25, 13, 59, 10).unwrap();
        let rows: Vec<RawRow> = [
            (0, "a", "build", 10, false),
            (30, "a", "build", 2000, true),
            (50, "b", "build", 7, false),
            (3_600, "a", "test", 1, false),
            (11 * 3_600, "a", "build", 90_000, false),
        ]
        .into_iter()
        .map(|(s, user, name, dur, err)| row(t0 + TimeDelta::seconds(s), user, name, dur, err))
        .collect();
        let minutes = fold(rows.iter(), Grain::Minute);
        for grain in Grain::ALL {
            assert_eq!(
                widen(&minutes, grain),
                fold(rows.iter(), grain),
                "{grain:?}"
            );
        }
    }

    #[test]
    fn buckets_align_like_date_bin() {
        let t = Utc.with_ymd_and_hms(2026, 11, 25, 13, 47, 59).unwrap();
        assert_eq!(
            Grain::Minute.bucket(t),
            Utc.with_ymd_and_hms(2026, 11, 25, 13, 47, 0).unwrap()
        );
        assert_eq!(
            Grain::Hour.bucket(t),
            Utc.with_ymd_and_hms(2026, 11, 25, 13, 0, 0).unwrap()
        );
        assert_eq!(
            Grain::Day.bucket(t),
            Utc.with_ymd_and_hms(2026, 11, 25, 0, 0, 0).unwrap()
        );
    }

    #[test]
    fn fold_sums_counts_errors_durations_and_tokens() {
        let t0 = Utc.with_ymd_and_hms(2026, 11, 25, 13, 0, 10).unwrap();
        let rows = vec![
            row(t0, "a", "build", 10, false),
            row(t0 + TimeDelta::seconds(20), "a", "build", 30, true),
            row(t0 + TimeDelta::minutes(2), "a", "build", 5, false),
            row(t0, "b", "test", 7, false),
        ];
        let minute = fold(&rows, Grain::Minute);
        assert_eq!(minute.len(), 3);
        let hour = fold(&rows, Grain::Hour);
        assert_eq!(hour.len(), 2);
        let a = hour.iter().find(|(k, _)| k.user_id == "a").unwrap().1;
        assert_eq!(
            (
                a.count,
                a.errors,
                a.duration_sum,
                a.duration_max,
                a.input_tokens,
                a.output_tokens
            ),
            (3, 1, 45, 30, 3, 6)
        );
        assert_eq!(a.value_sum, 1.5);
        assert_eq!(a.duration_hist.iter().sum::<i64>(), 3);
        // Every grain sees every row exactly once.
        for g in Grain::ALL {
            let keyed = fold(&rows, g);
            for deltas in [&keyed, &tenant_wide(&keyed)] {
                let total: i64 = deltas.values().map(|m| m.count).sum();
                assert_eq!(total, 4);
            }
        }
    }

    #[test]
    fn the_tenant_cube_sums_every_key_of_a_bucket_and_type() {
        let t0 = Utc.with_ymd_and_hms(2026, 11, 25, 13, 0, 10).unwrap();
        let rows = vec![
            row(t0, "a", "build", 10, false),
            row(t0 + TimeDelta::seconds(20), "b", "test", 30, true),
            row(t0 + TimeDelta::minutes(2), "", "build", 5, false),
        ];
        let minute = tenant_wide(&fold(&rows, Grain::Minute));
        assert_eq!(minute.len(), 2);
        let hour = tenant_wide(&fold(&rows, Grain::Hour));
        let (key, all) = hour.iter().next().unwrap();
        assert_eq!((key.user_id.as_str(), key.name.as_str()), ("", ""));
        assert_eq!(
            (all.count, all.errors, all.duration_sum, all.duration_max),
            (3, 1, 45, 30)
        );
        assert_eq!(all.duration_hist.iter().sum::<i64>(), 3);
        // Who was active: per bucket, each user once, no one for an event without a user.
        let minute = fold(&rows, Grain::Minute);
        let users: Vec<_> = active_users(&minute).into_iter().collect();
        assert_eq!(
            users,
            [
                (Grain::Minute.bucket(t0), "a"),
                (Grain::Minute.bucket(t0), "b")
            ]
        );
        assert_eq!(active_users(&fold(&rows, Grain::Day)).len(), 2);
    }

    /// What [`Copies`] holds, each table's lines sorted.
    fn lines(out: &Copies) -> Vec<Vec<String>> {
        out.lines
            .iter()
            .map(|l| {
                let mut v: Vec<String> = l.lines().map(String::from).collect();
                v.sort();
                v
            })
            .collect()
    }

    #[test]
    fn the_sorted_fold_of_a_rebuild_writes_what_the_batch_folds_would() {
        // Rows of several users, tables, teams, names, minutes and hours, over two days,
        // some without a user; tool errors and session kinds.
        let t0 = Utc.with_ymd_and_hms(2026, 11, 25, 22, 58, 10).unwrap();
        let mut rows = Vec::new();
        for i in 0..600i64 {
            let mut r = row(
                t0 + TimeDelta::seconds(i * 37 % 9000),
                ["a", "b", "", "c"][(i % 4) as usize],
                ["build", "test"][(i % 3 % 2) as usize],
                i * 13 % 5000,
                i % 7 == 0,
            );
            r.team_id = ["", "t1"][(i % 5 % 2) as usize];
            match i % 6 {
                1 => {
                    r.table = RawTable::ToolExecutions;
                    r.event_type = "tool.executed";
                }
                2 => {
                    r.table = RawTable::SessionEvents;
                    r.name = ["started", "ended", "context"][(i % 3) as usize];
                    r.event_type = r.table.event_type(r.name);
                    r.status = "";
                    r.is_error = false;
                }
                _ => {}
            }
            rows.push(r);
        }
        // The batch path: each grain folded, the tenant-wide rows and active users from it.
        let mut want = Copies::default();
        for grain in Grain::ALL {
            let keyed = fold(&rows, grain);
            for (k, m) in &keyed {
                want.rollup(grain, Cube::Keys, k, m);
            }
            for (k, m) in &tenant_wide(&keyed) {
                want.rollup(grain, Cube::Tenant, k, m);
            }
            for (bucket, user) in active_users(&keyed) {
                want.active_user(grain, bucket, user);
            }
        }
        // The rebuild: each day's rows in the order `read_day` reads them.
        let table_index = |t: RawTable| RawTable::ALL.iter().position(|x| *x == t).unwrap();
        rows.sort_by(|x, y| {
            (
                Grain::Day.bucket(x.occurred_at),
                &x.user_id,
                table_index(x.table),
            )
                .cmp(&(
                    Grain::Day.bucket(y.occurred_at),
                    &y.user_id,
                    table_index(y.table),
                ))
                .then_with(|| {
                    (&x.team_id, &x.project_id, &x.name, x.occurred_at).cmp(&(
                        &y.team_id,
                        &y.project_id,
                        &y.name,
                        y.occurred_at,
                    ))
                })
        });
        let mut sorted = SortedFold::default();
        let mut day = None;
        for r in &rows {
            let d = Grain::Day.bucket(r.occurred_at);
            if day.is_some_and(|day| day != d) {
                sorted.end_day();
            }
            day = Some(d);
            // As read back: event type and error from the stored table, name and status.
            let mut f = Fact::of(r);
            f.event_type = r.table.event_type(r.name);
            f.is_error = r.table.is_error(r.status);
            sorted.row(&f);
        }
        sorted.end_day();
        assert_eq!(want.rows, sorted.out.rows);
        assert_eq!(lines(&want), lines(&sorted.out));
        assert!(
            lines(&want).iter().all(|l| !l.is_empty()),
            "every table got rows"
        );
    }
}
