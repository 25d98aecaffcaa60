//! Rollups: per-minute, per-hour and per-day aggregates of the rows a batch really inserted,
//! per key (`activity_*`) and for the whole tenant (`activity_all_*`, and who was active:
//! `active_users_*`). Folding is pure (table-tested here); [`upsert`] adds the folded deltas
//! to the tables, [`insert_active_users`] records the active users.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use shared::histogram;
use shared::tenant::TenantId;
use sqlx::PgConnection;

use super::raw::RawRow;

/// A rollup's time grain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    Minute,
    Hour,
    Day,
}

impl Grain {
    pub const ALL: [Grain; 3] = [Grain::Minute, Grain::Hour, Grain::Day];

    pub fn table(self) -> &'static str {
        match self {
            Grain::Minute => "activity_1m",
            Grain::Hour => "activity_1h",
            Grain::Day => "activity_1d",
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
    pub fn tenant_table(self) -> &'static str {
        match self {
            Grain::Minute => "activity_all_1m",
            Grain::Hour => "activity_all_1h",
            Grain::Day => "activity_all_1d",
        }
    }

    /// The table of who was active in each bucket of this grain.
    pub fn users_table(self) -> &'static str {
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
}

/// Folds rows into per-key rollup deltas for one grain. Keys come out sorted, so concurrent
/// projector instances upsert rollup rows in the same order and cannot deadlock.
pub fn fold<'a>(
    rows: impl IntoIterator<Item = &'a RawRow<'a>>,
    grain: Grain,
) -> BTreeMap<Key, Measures> {
    let mut out: BTreeMap<Key, Measures> = BTreeMap::new();
    for r in rows {
        let key = Key {
            bucket: grain.bucket(r.occurred_at),
            event_type: r.event_type,
            user_id: r.user_id.clone(),
            team_id: r.team_id.clone(),
            project_id: r.project_id.clone(),
            name: r.name.clone(),
        };
        let m = out.entry(key).or_default();
        m.count += 1;
        m.errors += i64::from(r.is_error);
        m.duration_sum += r.duration_ms;
        m.duration_max = m.duration_max.max(r.duration_ms);
        m.input_tokens += r.input_tokens;
        m.output_tokens += r.output_tokens;
        m.value_sum += r.value;
        m.duration_hist[histogram::index(r.duration_ms)] += 1;
    }
    out
}

/// The tenant-wide deltas of per-key ones ([`fold`]): summed per bucket and event type, the
/// key's other dimensions empty. Sorted like them.
pub fn tenant_wide(keyed: &BTreeMap<Key, Measures>) -> BTreeMap<Key, Measures> {
    let mut out: BTreeMap<Key, Measures> = BTreeMap::new();
    for (k, m) in keyed {
        let key = Key {
            bucket: k.bucket,
            event_type: k.event_type,
            user_id: String::new(),
            team_id: String::new(),
            project_id: String::new(),
            name: String::new(),
        };
        out.entry(key).or_default().add(m);
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
/// take the greater, histograms merge.
macro_rules! merge_measures {
    () => {
        " count = a.count + EXCLUDED.count,
          errors = a.errors + EXCLUDED.errors,
          duration_sum = a.duration_sum + EXCLUDED.duration_sum,
          duration_max = GREATEST(a.duration_max, EXCLUDED.duration_max),
          input_tokens = a.input_tokens + EXCLUDED.input_tokens,
          output_tokens = a.output_tokens + EXCLUDED.output_tokens,
          value_sum = a.value_sum + EXCLUDED.value_sum,
          duration_hist = hist_add(a.duration_hist, EXCLUDED.duration_hist)"
    };
}

/// Upsert of per-key rollup deltas from parallel arrays (keys unique within one statement),
/// expanded at compile time per table.
macro_rules! rollup_sql {
    ($table:literal) => {
        concat!(
            "INSERT INTO ",
            $table,
            " AS a (bucket, event_type, user_id, team_id, project_id, name, count, errors,
                   duration_sum, duration_max, input_tokens, output_tokens, value_sum,
                   duration_hist)
             SELECT b, t, u, tm, p, n, c, e, ds, dm, it, ot, vs, h::bigint[]
               FROM UNNEST($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[],
                           $6::text[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[],
                           $11::bigint[], $12::bigint[], $13::float8[], $14::text[])
                    AS x(b, t, u, tm, p, n, c, e, ds, dm, it, ot, vs, h)
             ON CONFLICT (bucket, event_type, user_id, team_id, project_id, name) DO UPDATE SET",
            merge_measures!()
        )
    };
}

/// The same for the tenant-wide rollups, keyed by bucket and event type only.
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
            merge_measures!()
        )
    };
}

/// One static statement per grain and cube; the table is chosen from a closed set, not
/// formatted.
fn upsert_sql(grain: Grain, cube: Cube) -> &'static str {
    match (cube, grain) {
        (Cube::Keys, Grain::Minute) => rollup_sql!("activity_1m"),
        (Cube::Keys, Grain::Hour) => rollup_sql!("activity_1h"),
        (Cube::Keys, Grain::Day) => rollup_sql!("activity_1d"),
        (Cube::Tenant, Grain::Minute) => tenant_rollup_sql!("activity_all_1m"),
        (Cube::Tenant, Grain::Hour) => tenant_rollup_sql!("activity_all_1h"),
        (Cube::Tenant, Grain::Day) => tenant_rollup_sql!("activity_all_1d"),
    }
}

/// Adds one grain's deltas ([`fold`], or [`tenant_wide`] of them for `Cube::Tenant`) to its
/// rollup table (search_path already points at the tenant's schema): counts and sums add up,
/// maxima take the greater, histograms merge.
pub async fn upsert(
    conn: &mut PgConnection,
    grain: Grain,
    cube: Cube,
    deltas: &BTreeMap<Key, Measures>,
) -> sqlx::Result<()> {
    if deltas.is_empty() {
        return Ok(());
    }
    let keys = || deltas.keys();
    let vals = || deltas.values();
    // Histograms travel as array literals: UNNEST cannot take an array of arrays of
    // different rows, and a text[] of literals casts back losslessly. Trailing empty
    // buckets are left off (most rows hold a few durations): `hist_add` and the readers
    // treat missing buckets as zero.
    let hist: Vec<String> = vals()
        .map(|m| {
            let used = m
                .duration_hist
                .iter()
                .rposition(|n| *n != 0)
                .map_or(1, |last| last + 1);
            let parts: Vec<String> = m.duration_hist[..used].iter().map(i64::to_string).collect();
            format!("{{{}}}", parts.join(","))
        })
        .collect();
    let query = sqlx::query(upsert_sql(grain, cube))
        .bind(keys().map(|k| k.bucket).collect::<Vec<_>>())
        .bind(keys().map(|k| k.event_type).collect::<Vec<_>>());
    let query = match cube {
        Cube::Keys => query
            .bind(keys().map(|k| k.user_id.as_str()).collect::<Vec<_>>())
            .bind(keys().map(|k| k.team_id.as_str()).collect::<Vec<_>>())
            .bind(keys().map(|k| k.project_id.as_str()).collect::<Vec<_>>())
            .bind(keys().map(|k| k.name.as_str()).collect::<Vec<_>>()),
        Cube::Tenant => query,
    };
    query
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

/// Every grain's per-key deltas of one batch ([`fold`]), in [`Grain::ALL`] order.
pub type Deltas = [BTreeMap<Key, Measures>; 3];

/// Folds rows into every grain's per-key deltas.
pub fn fold_all<'a>(rows: &[&'a RawRow<'a>]) -> Deltas {
    Grain::ALL.map(|grain| fold(rows.iter().copied(), grain))
}

/// Adds `from` into `into`, key by key.
fn merge(into: &mut BTreeMap<Key, Measures>, from: BTreeMap<Key, Measures>) {
    for (k, m) in from {
        match into.entry(k) {
            std::collections::btree_map::Entry::Occupied(mut e) => e.get_mut().add(&m),
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(m);
            }
        }
    }
}

/// Writes one grain's per-key deltas and what follows from them: the tenant-wide rollup and
/// the active users (search_path already points at the tenant's schema).
pub async fn write_grain(
    conn: &mut PgConnection,
    grain: Grain,
    keyed: &BTreeMap<Key, Measures>,
) -> sqlx::Result<()> {
    upsert(conn, grain, Cube::Keys, keyed).await?;
    upsert(conn, grain, Cube::Tenant, &tenant_wide(keyed)).await?;
    insert_active_users(conn, grain, &active_users(keyed)).await
}

/// Rollup deltas a rebuild holds back across batches, per tenant and grain: a bulk load
/// folds many batches into one upsert per key instead of one per batch. A grain is written
/// once it holds `cap` keys, everything once all tenants together hold three times that
/// (so memory stays bounded however many tenants a replay rebuilds), and everything at the
/// end.
#[derive(Debug, Default)]
pub struct Pending {
    cap: usize,
    tenants: BTreeMap<TenantId, Deltas>,
}

impl Pending {
    pub fn new(cap: usize) -> Pending {
        Pending {
            cap,
            tenants: BTreeMap::new(),
        }
    }

    /// Holds a committed batch's deltas of `tenant`.
    pub fn add(&mut self, tenant: TenantId, deltas: Deltas) {
        let held = self.tenants.entry(tenant).or_default();
        for (into, from) in held.iter_mut().zip(deltas) {
            merge(into, from);
        }
    }

    /// Takes the deltas to write now (see [`Pending`]); every one with `all`.
    pub fn take(&mut self, all: bool) -> Vec<(TenantId, Grain, BTreeMap<Key, Measures>)> {
        let held: usize = self.tenants.values().flatten().map(BTreeMap::len).sum();
        let all = all || held >= 3 * self.cap;
        let mut out = Vec::new();
        for (tenant, held) in &mut self.tenants {
            for (grain, keyed) in Grain::ALL.into_iter().zip(held.iter_mut()) {
                if !keyed.is_empty() && (all || keyed.len() >= self.cap) {
                    out.push((*tenant, grain, std::mem::take(keyed)));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::raw::RawTable;
    use chrono::TimeZone;
    use uuid::Uuid;

    fn row(t: DateTime<Utc>, user: &str, name: &str, dur: i64, err: bool) -> RawRow<'static> {
        RawRow {
            table: RawTable::CommandExecutions,
            event_type: "command.executed",
            event_id: Uuid::new_v4(),
            occurred_at: t,
            received_at: t,
            user_id: user.into(),
            team_id: String::new(),
            project_id: String::new(),
            session_id: String::new(),
            name: name.into(),
            status: if err { "error" } else { "success" }.into(),
            is_error: err,
            duration_ms: dur,
            input_tokens: 1,
            output_tokens: 2,
            value: 0.5,
            data: std::borrow::Cow::Owned(serde_json::Value::Null),
        }
    }

    #[test]
    fn each_grain_upserts_its_own_table() {
        for grain in Grain::ALL {
            for cube in Cube::ALL {
                let sql = upsert_sql(grain, cube);
                assert!(
                    sql.starts_with(&format!("INSERT INTO {} AS a (", cube.table(grain))),
                    "{sql}"
                );
            }
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

    #[test]
    fn held_deltas_are_written_per_full_grain_and_all_when_tenants_together_hold_too_many() {
        let t0 = Utc.with_ymd_and_hms(2026, 11, 25, 13, 0, 10).unwrap();
        let one = [row(t0, "a", "build", 10, false)];
        let one_deltas = || fold_all(&one.iter().collect::<Vec<_>>());
        let mut pending = Pending::new(2);
        let a = TenantId(Uuid::new_v4());
        pending.add(a, one_deltas());
        assert!(pending.take(false).is_empty(), "under the cap, kept");
        // Another minute: the minute grain reaches the cap, the hour and day do not.
        let later = [row(t0 + TimeDelta::minutes(1), "a", "build", 10, false)];
        pending.add(a, fold_all(&later.iter().collect::<Vec<_>>()));
        let taken = pending.take(false);
        assert_eq!(taken.len(), 1);
        assert_eq!((taken[0].1, taken[0].2.len()), (Grain::Minute, 2));
        // The same key again merges: the hour holds one key counting both.
        let hour = &pending.tenants[&a][1];
        assert_eq!(hour.values().map(|m| m.count).collect::<Vec<_>>(), [2]);
        // Three tenants of one key per grain each: 8 keys held, over 3 × 2: all of them.
        for _ in 0..2 {
            pending.add(TenantId(Uuid::new_v4()), one_deltas());
        }
        let taken = pending.take(false);
        let keys: usize = taken.iter().map(|(_, _, k)| k.len()).sum();
        assert_eq!(keys, 8);
        assert!(pending.take(true).is_empty(), "nothing is left");
    }
}
