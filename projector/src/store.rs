//! Writes one batch in one transaction: raw rows, rollups of the rows really inserted,
//! sessions, the tenants' watermarks, and the next Kafka offsets (compare-and-set).

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, NaiveDate, Utc};
use shared::events::{Envelope, Payload};
use shared::tenant::TenantId;
use shared::tenant_sql::{self, Lock};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::rollup::{self, Grain};
use crate::rows::{fold_sessions, RawRow, RawTable};

/// A decoded event waiting in a batch.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub env: Envelope,
    pub payload: Payload,
    /// Where the record was read from: (partition, offset). Used to dead-letter it.
    pub origin: (i32, i64),
}

/// The range of offsets a batch covers on one partition: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetRange {
    pub start: i64,
    pub end: i64,
}

/// What a committed batch did.
#[derive(Debug, Default, Clone)]
pub struct Written {
    pub inserted: u64,
    pub duplicates: u64,
    /// Tenants whose projection advanced, with their new watermark sequence.
    pub tenants: Vec<(TenantId, i64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The stored offsets were not where this batch started: another instance owns (or
    /// advanced) the partition. Nothing was written.
    #[error("offsets of partition {partition} moved under us; batch rolled back")]
    Fenced { partition: i32 },
    /// A replay switched a tenant of the batch to a new projection version after the batch
    /// was prepared. Nothing was written; prepare again with the new versions.
    #[error("a tenant's projection version changed; batch rolled back")]
    VersionMoved,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Each tenant's projection version a batch writes to.
pub type Versions = HashMap<TenantId, i32>;

/// Where schemas and partitions already exist (per tenant and version), so each batch does
/// not ask again.
#[derive(Default)]
pub struct Prepared {
    /// Each tenant's active version as last read. Batches check it under lock when they
    /// write ([`Target::Live`]); a mismatch clears this cache.
    versions: Versions,
    tenants: HashSet<(TenantId, i32)>,
    known: HashSet<TenantId>,
    partitions: HashSet<(TenantId, i32, NaiveDate)>,
}

impl Prepared {
    /// Forgets everything (e.g. after a failure that may have left state half-made).
    pub fn clear(&mut self) {
        *self = Prepared::default();
    }

    /// Forgets the tenants' versions only (after a replay switched one); the schemas and
    /// partitions already made stay made.
    pub fn forget_versions(&mut self) {
        self.versions.clear();
    }
}

/// Whether the tenant exists in the control plane (events of unknown tenants are poison).
pub async fn tenant_known(
    pool: &PgPool,
    prepared: &mut Prepared,
    tenant: TenantId,
) -> sqlx::Result<bool> {
    if prepared.known.contains(&tenant) {
        return Ok(true);
    }
    let known: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM control.tenants WHERE id = $1)")
            .bind(tenant.0)
            .fetch_one(pool)
            .await?;
    // Unknown tenants are not remembered: one may be created later and its dead letters
    // redriven.
    if known {
        prepared.known.insert(tenant);
    }
    Ok(known)
}

/// Makes sure every tenant of the batch has its schema and the partitions its rows need.
/// Runs in transactions of its own before the batch's (DDL is idempotent).
pub async fn prepare(
    pool: &PgPool,
    prepared: &mut Prepared,
    versions: &Versions,
    ahead_days: i64,
    events: &[Decoded],
) -> Result<(), WriteError> {
    let mut conn = pool.acquire().await?;
    let today = Utc::now().date_naive();
    let mut needed: BTreeMap<(TenantId, i32), Vec<NaiveDate>> = BTreeMap::new();
    for e in events {
        let t = e.env.tenant_id;
        let v = versions.get(&t).copied().unwrap_or(1);
        if !prepared.tenants.contains(&(t, v)) {
            if tenant_sql::create_tenant_schema(&mut conn, t, v).await?
                == tenant_sql::SchemaState::Superseded
            {
                return Err(WriteError::VersionMoved);
            }
            let ahead = tenant_sql::days_ahead(today, ahead_days);
            tenant_sql::ensure_partitions(&mut conn, &t.schema(v), &ahead).await?;
            for d in ahead {
                prepared.partitions.insert((t, v, d));
            }
            prepared.tenants.insert((t, v));
        }
        let day = e.env.occurred_at.date_naive();
        if !prepared.partitions.contains(&(t, v, day)) {
            let days = needed.entry((t, v)).or_default();
            if !days.contains(&day) {
                days.push(day);
            }
        }
    }
    for ((t, v), days) in needed {
        tenant_sql::ensure_partitions(&mut conn, &t.schema(v), &days).await?;
        for d in days {
            prepared.partitions.insert((t, v, d));
        }
    }
    Ok(())
}

/// The active versions of the batch's tenants, read from the database only for tenants
/// not seen since the cache was last cleared.
pub async fn live_versions(
    pool: &PgPool,
    prepared: &mut Prepared,
    events: &[Decoded],
) -> sqlx::Result<Versions> {
    let tenants = tenants_of(events);
    let unknown: Vec<TenantId> = tenants
        .iter()
        .filter(|t| !prepared.versions.contains_key(t))
        .copied()
        .collect();
    if !unknown.is_empty() {
        let mut conn = pool.acquire().await?;
        let read = tenant_sql::active_versions(&mut conn, &unknown, Lock::None).await?;
        prepared.versions.extend(read);
    }
    Ok(tenants
        .into_iter()
        .map(|t| (t, prepared.versions[&t]))
        .collect())
}

/// The tenants of a batch, each once.
fn tenants_of(events: &[Decoded]) -> Vec<TenantId> {
    let set: std::collections::BTreeSet<TenantId> =
        events.iter().map(|e| e.env.tenant_id).collect();
    set.into_iter().collect()
}

/// Which versions a batch writes: the live projection's (checked under lock in the batch's
/// transaction) or the fixed ones a replay builds.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// The active versions of exactly the batch's tenants, as read before `prepare`; the
    /// write re-reads them `FOR SHARE` and gives up with [`WriteError::VersionMoved`] if a
    /// replay switched one since.
    Live(&'a Versions),
    /// A replay's new versions (not yet served; nobody else writes them).
    Fixed(&'a Versions),
}

/// Writes the batch and advances the offsets, all in one transaction.
pub async fn write(
    pool: &PgPool,
    projection: &str,
    topic: &str,
    target: Target<'_>,
    events: &[Decoded],
    offsets: &BTreeMap<i32, OffsetRange>,
) -> Result<Written, WriteError> {
    let mut tx = pool.begin().await?;
    let mut written = Written::default();
    let versions = target_versions(&mut tx, target).await?;
    for (tenant, events) in by_tenant(events) {
        let version = versions.get(&tenant).copied().unwrap_or(1);
        tenant_sql::set_search_path(&mut tx, &tenant.schema(version)).await?;
        let (inserted, duplicates, seq) = write_tenant(&mut tx, &events).await?;
        written.inserted += inserted;
        written.duplicates += duplicates;
        written.tenants.push((tenant, seq));
    }

    for (partition, range) in offsets {
        advance_offset(&mut tx, projection, topic, *partition, *range).await?;
    }
    tx.commit().await?;
    Ok(written)
}

/// The versions a batch writes to; for the live projection, checked under lock against
/// those the batch was prepared for.
async fn target_versions<'a>(
    tx: &mut PgConnection,
    target: Target<'a>,
) -> Result<&'a Versions, WriteError> {
    match target {
        Target::Fixed(v) => Ok(v),
        Target::Live(prepared_for) => {
            let tenants: Vec<TenantId> = prepared_for.keys().copied().collect();
            let now = tenant_sql::active_versions(tx, &tenants, Lock::Share).await?;
            if tenants.iter().any(|t| now.get(t) != prepared_for.get(t)) {
                return Err(WriteError::VersionMoved);
            }
            Ok(prepared_for)
        }
    }
}

/// A batch's events grouped by tenant, each group in the batch's order.
fn by_tenant(events: &[Decoded]) -> BTreeMap<TenantId, Vec<&Decoded>> {
    let mut groups: BTreeMap<TenantId, Vec<&Decoded>> = BTreeMap::new();
    for e in events {
        groups.entry(e.env.tenant_id).or_default().push(e);
    }
    groups
}

/// Why PostgreSQL refused a statement because of the values it was given, not because it
/// is unavailable or busy: data exceptions (class 22: a NUL byte, a number out of range),
/// program limits (class 54: an index row over the btree limit), not-null and check
/// violations. No retry can change these; everything else (connection loss, serialization
/// failures, shutdown, lock timeouts) may pass on a retry.
pub fn refused_record(e: &sqlx::Error) -> Option<String> {
    let db = e.as_database_error()?;
    let code = db.code()?;
    let the_records_fault =
        code.starts_with("22") || code.starts_with("54") || code == "23502" || code == "23514";
    the_records_fault.then(|| format!("refused by PostgreSQL ({code}): {}", db.message()))
}

/// The events of a batch PostgreSQL refuses for their own sake (see [`refused_record`]), by
/// index into `events`, each with the reason.
///
/// Writes the batch in a transaction that is rolled back at the end, each group of one
/// tenant's events under a savepoint. A group that fails with a record fault is rolled back
/// to its savepoint and halved, until the events that fail on their own are found: k poison
/// events among n cost about k·log₂n statements. Groups that pass stay written, so a value
/// refused only together with others (a sum overflowing) is found too. Any other failure
/// ends the search with that error.
pub async fn find_refused(
    pool: &PgPool,
    target: Target<'_>,
    events: &[Decoded],
) -> Result<Vec<(usize, String)>, WriteError> {
    let mut by_tenant: BTreeMap<TenantId, Vec<usize>> = BTreeMap::new();
    for (i, e) in events.iter().enumerate() {
        by_tenant.entry(e.env.tenant_id).or_default().push(i);
    }
    let mut tx = pool.begin().await?;
    let versions = target_versions(&mut tx, target).await?;
    let mut refused = Vec::new();
    for (tenant, group) in by_tenant {
        let version = versions.get(&tenant).copied().unwrap_or(1);
        tenant_sql::set_search_path(&mut tx, &tenant.schema(version)).await?;
        // Groups still to try, the earliest events on top.
        let mut todo: Vec<Vec<usize>> = vec![group];
        while let Some(group) = todo.pop() {
            let refs: Vec<&Decoded> = group.iter().map(|&i| &events[i]).collect();
            sqlx::query("SAVEPOINT probe").execute(&mut *tx).await?;
            match write_tenant(&mut tx, &refs).await {
                Ok(_) => {
                    sqlx::query("RELEASE SAVEPOINT probe")
                        .execute(&mut *tx)
                        .await?;
                }
                Err(WriteError::Db(e)) => {
                    let Some(reason) = refused_record(&e) else {
                        return Err(WriteError::Db(e));
                    };
                    sqlx::query("ROLLBACK TO SAVEPOINT probe")
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query("RELEASE SAVEPOINT probe")
                        .execute(&mut *tx)
                        .await?;
                    if let [one] = group.as_slice() {
                        refused.push((*one, reason));
                    } else {
                        let (first, rest) = group.split_at(group.len() / 2);
                        todo.push(rest.to_vec());
                        todo.push(first.to_vec());
                    }
                }
                Err(other) => return Err(other),
            }
        }
    }
    tx.rollback().await?;
    refused.sort_by_key(|(i, _)| *i);
    Ok(refused)
}

/// Writes one tenant's events (search_path already points at its schema).
/// Returns (inserted, duplicates, new watermark seq).
async fn write_tenant(
    conn: &mut PgConnection,
    events: &[&Decoded],
) -> Result<(u64, u64, i64), WriteError> {
    // The tenant's row lock first: this transaction's seq is the live feed position of every
    // row it writes, and the lock makes the tenant's transactions commit in seq order.
    let feed_seq: i64 =
        sqlx::query_scalar("SELECT seq + 1 FROM projection_state FOR NO KEY UPDATE")
            .fetch_one(&mut *conn)
            .await?;
    let audited = insert_audit(conn, events).await?;
    apply_people(conn, events).await?;
    let rows: Vec<RawRow> = events
        .iter()
        .filter_map(|e| RawRow::from_event(&e.env, &e.payload))
        .collect();
    let mut by_table: BTreeMap<RawTable, (Vec<&RawRow>, Vec<i32>)> = BTreeMap::new();
    for (ord, r) in rows.iter().enumerate() {
        let (rows, ords) = by_table.entry(r.table).or_default();
        rows.push(r);
        ords.push(i32::try_from(ord).unwrap_or(i32::MAX));
    }
    let mut inserted_rows: Vec<&RawRow> = Vec::with_capacity(rows.len());
    let phase = std::time::Instant::now();
    for (table, (rows, ords)) in by_table {
        let mut new_ids: HashSet<Uuid> =
            insert_raw(conn, table, &rows, (feed_seq, ords.as_slice()))
                .await?
                .into_iter()
                .collect();
        // `remove` makes a duplicate id inside the same batch count once.
        inserted_rows.extend(rows.into_iter().filter(|r| new_ids.remove(&r.event_id)));
    }
    let inserted = inserted_rows.len() as u64;
    let duplicates = (events.len() - rows.len()) as u64 - audited + rows.len() as u64 - inserted;

    record_phase("raw", phase);
    for grain in Grain::ALL {
        let phase = std::time::Instant::now();
        let deltas = rollup::fold(inserted_rows.iter().copied(), grain);
        upsert_rollup(conn, grain, &deltas).await?;
        record_phase(grain.table(), phase);
    }
    let phase = std::time::Instant::now();

    let inserted_ids: HashSet<Uuid> = inserted_rows.iter().map(|r| r.event_id).collect();
    let sessions = fold_sessions(
        events
            .iter()
            .filter(|e| inserted_ids.contains(&e.env.id))
            .map(|e| (&e.env, &e.payload)),
    );
    upsert_sessions(conn, &sessions).await?;
    record_phase("sessions", phase);

    let as_of: Option<DateTime<Utc>> = events.iter().map(|e| e.env.received_at).max();
    let seq: i64 = sqlx::query_scalar(
        "UPDATE projection_state
            SET seq = seq + 1, events = events + $1, as_of = greatest(as_of, $2)
          RETURNING seq",
    )
    .bind(inserted as i64)
    .bind(as_of)
    .fetch_one(&mut *conn)
    .await?;
    debug_assert_eq!(
        seq, feed_seq,
        "projection_state is locked by this transaction"
    );
    Ok((inserted + audited, duplicates, seq))
}

/// Keeps the tenant's `users` and `teams` read models from the snapshots that user and team
/// events carry (`extra.user`, `extra.team`). Newer snapshots win, so replays and
/// duplicates change nothing.
async fn apply_people(conn: &mut PgConnection, events: &[&Decoded]) -> sqlx::Result<()> {
    use shared::people::{Snapshot, TeamSnapshot, UserSnapshot};
    for e in events {
        let shared::events::Payload::Auth(_, a) = &e.payload else {
            continue;
        };
        // Decoding refused (dead-lettered) every event whose snapshot does not parse.
        if let Ok(Some(u)) = UserSnapshot::from_extra(&a.extra) {
            sqlx::query(
                "INSERT INTO users AS u (user_id, email, role, status, external_id, teams, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (user_id) DO UPDATE SET email = EXCLUDED.email, role = EXCLUDED.role,
                        status = EXCLUDED.status, external_id = EXCLUDED.external_id,
                        teams = EXCLUDED.teams, updated_at = EXCLUDED.updated_at
                  WHERE u.updated_at <= EXCLUDED.updated_at",
            )
            .bind(u.user_id)
            .bind(u.email)
            .bind(u.role)
            .bind(u.status)
            .bind(u.external_id)
            .bind(u.teams)
            .bind(e.env.occurred_at)
            .execute(&mut *conn)
            .await?;
        }
        if let Ok(Some(t)) = TeamSnapshot::from_extra(&a.extra) {
            sqlx::query(
                "INSERT INTO teams AS t (key, name, members, deleted, updated_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (key) DO UPDATE SET name = EXCLUDED.name, members = EXCLUDED.members,
                        deleted = EXCLUDED.deleted, updated_at = EXCLUDED.updated_at
                  WHERE t.updated_at <= EXCLUDED.updated_at",
            )
            .bind(t.key)
            .bind(t.name.unwrap_or_default())
            .bind(t.members)
            .bind(t.deleted)
            .bind(e.env.occurred_at)
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}

/// Auth events of the tenant go to its audit log (once per event id).
async fn insert_audit(conn: &mut PgConnection, events: &[&Decoded]) -> sqlx::Result<u64> {
    let audit: Vec<(&Decoded, &shared::events::AuthEvent)> = events
        .iter()
        .filter_map(|e| match &e.payload {
            shared::events::Payload::Auth(_, a) => Some((*e, a)),
            _ => None,
        })
        .collect();
    if audit.is_empty() {
        return Ok(0);
    }
    let done = sqlx::query(
        "INSERT INTO audit_log (event_id, occurred_at, type, user_id, email, ip, target, detail,
                               actor, data)
         SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::uuid[], $5::text[],
                              $6::text[], $7::text[], $8::text[], $9::jsonb[], $10::jsonb[])
         ON CONFLICT DO NOTHING",
    )
    .bind(audit.iter().map(|(e, _)| e.env.id).collect::<Vec<_>>())
    .bind(
        audit
            .iter()
            .map(|(e, _)| e.env.occurred_at)
            .collect::<Vec<_>>(),
    )
    .bind(
        audit
            .iter()
            .map(|(e, _)| e.env.event_type.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(audit.iter().map(|(_, a)| a.user_id).collect::<Vec<_>>())
    .bind(
        audit
            .iter()
            .map(|(_, a)| a.email.clone())
            .collect::<Vec<_>>(),
    )
    .bind(audit.iter().map(|(_, a)| a.ip.clone()).collect::<Vec<_>>())
    .bind(
        audit
            .iter()
            .map(|(_, a)| a.target.clone())
            .collect::<Vec<_>>(),
    )
    .bind(
        audit
            .iter()
            .map(|(_, a)| a.detail.clone())
            .collect::<Vec<_>>(),
    )
    .bind(
        audit
            .iter()
            .map(|(e, _)| serde_json::to_value(&e.env.actor).expect("actors serialize"))
            .collect::<Vec<_>>(),
    )
    .bind(
        audit
            .iter()
            .map(|(e, _)| e.env.data.clone())
            .collect::<Vec<_>>(),
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Time spent per write phase, to see where a batch's time goes.
fn record_phase(phase: &'static str, since: std::time::Instant) {
    metrics::histogram!("projector_phase_seconds", "phase" => phase)
        .record(since.elapsed().as_secs_f64());
}

/// Inserts one table's rows; `feed` is the batch's live feed seq and each row's ordinal.
async fn insert_raw(
    conn: &mut PgConnection,
    table: RawTable,
    rows: &[&RawRow<'_>],
    feed: (i64, &[i32]),
) -> sqlx::Result<Vec<Uuid>> {
    // One static statement per table; the table is chosen from a closed set, not formatted.
    let sql = match table {
        RawTable::CommandExecutions => insert_sql!("command_executions"),
        RawTable::AgentInteractions => insert_sql!("agent_interactions"),
        RawTable::ToolExecutions => insert_sql!("tool_executions"),
        RawTable::SessionEvents => insert_sql!("session_events"),
        RawTable::ProductivityMetrics => insert_sql!("productivity_metrics"),
        RawTable::MetricSamples => insert_sql!("metric_samples"),
    };
    // Columns are borrowed from the rows: nothing is copied on the way to the statement.
    let col =
        |f: for<'r> fn(&'r RawRow<'_>) -> &'r str| rows.iter().map(|r| f(r)).collect::<Vec<&str>>();
    sqlx::query_scalar(sql)
        .bind(rows.iter().map(|r| r.event_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.occurred_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.received_at).collect::<Vec<_>>())
        .bind(col(|r| &r.user_id))
        .bind(col(|r| &r.team_id))
        .bind(col(|r| &r.project_id))
        .bind(col(|r| &r.session_id))
        .bind(col(|r| &r.name))
        .bind(col(|r| &r.status))
        .bind(rows.iter().map(|r| r.duration_ms).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.input_tokens).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.output_tokens).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.value).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.data.as_ref()).collect::<Vec<_>>())
        .bind(feed.1)
        .bind(feed.0)
        .fetch_all(conn)
        .await
}

async fn upsert_rollup(
    conn: &mut PgConnection,
    grain: Grain,
    deltas: &BTreeMap<rollup::Key, rollup::Measures>,
) -> sqlx::Result<()> {
    if deltas.is_empty() {
        return Ok(());
    }
    let sql = match grain {
        Grain::Minute => rollup_sql!("activity_1m"),
        Grain::Hour => rollup_sql!("activity_1h"),
        Grain::Day => rollup_sql!("activity_1d"),
    };
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
    sqlx::query(sql)
        .bind(keys().map(|k| k.bucket).collect::<Vec<_>>())
        .bind(keys().map(|k| k.event_type).collect::<Vec<_>>())
        .bind(keys().map(|k| k.user_id.as_str()).collect::<Vec<_>>())
        .bind(keys().map(|k| k.team_id.as_str()).collect::<Vec<_>>())
        .bind(keys().map(|k| k.project_id.as_str()).collect::<Vec<_>>())
        .bind(keys().map(|k| k.name.as_str()).collect::<Vec<_>>())
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

async fn upsert_sessions(
    conn: &mut PgConnection,
    sessions: &[crate::rows::SessionUpdate],
) -> sqlx::Result<()> {
    if sessions.is_empty() {
        return Ok(());
    }
    let agents: Vec<String> = sessions
        .iter()
        .map(|s| serde_json::to_string(&s.agents_used).expect("strings serialize"))
        .collect();
    sqlx::query(
        "INSERT INTO sessions AS s (session_id, user_id, team_id, project_id, started_at,
                                    ended_at, commands_executed, productivity_score, agents_used)
         SELECT x.sid, x.uid, x.tid, x.pid, x.st, x.en, x.ce, x.ps,
                ARRAY(SELECT jsonb_array_elements_text(x.ag::jsonb))
           FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
                       $6::timestamptz[], $7::bigint[], $8::float8[], $9::text[])
                AS x(sid, uid, tid, pid, st, en, ce, ps, ag)
         ON CONFLICT (session_id) DO UPDATE SET
            started_at = LEAST(s.started_at, EXCLUDED.started_at),
            ended_at = GREATEST(s.ended_at, EXCLUDED.ended_at),
            commands_executed = COALESCE(EXCLUDED.commands_executed, s.commands_executed),
            productivity_score = COALESCE(EXCLUDED.productivity_score, s.productivity_score),
            agents_used = CASE WHEN cardinality(EXCLUDED.agents_used) > 0
                               THEN EXCLUDED.agents_used ELSE s.agents_used END",
    )
    .bind(
        sessions
            .iter()
            .map(|s| s.session_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        sessions
            .iter()
            .map(|s| s.user_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        sessions
            .iter()
            .map(|s| s.team_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        sessions
            .iter()
            .map(|s| s.project_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(sessions.iter().map(|s| s.started_at).collect::<Vec<_>>())
    .bind(sessions.iter().map(|s| s.ended_at).collect::<Vec<_>>())
    .bind(
        sessions
            .iter()
            .map(|s| s.commands_executed)
            .collect::<Vec<_>>(),
    )
    .bind(
        sessions
            .iter()
            .map(|s| s.productivity_score)
            .collect::<Vec<_>>(),
    )
    .bind(agents)
    .execute(conn)
    .await?;
    Ok(())
}

/// Compare-and-set of one partition's next offset. A batch may only advance a partition
/// from where the stored offset says it stands; otherwise the instance was fenced.
async fn advance_offset(
    conn: &mut PgConnection,
    projection: &str,
    topic: &str,
    partition: i32,
    range: OffsetRange,
) -> Result<(), WriteError> {
    let updated = sqlx::query(
        "UPDATE control.projector_offsets
            SET next_offset = $5, updated_at = now(), stalled_since = NULL, last_error = NULL
          WHERE projection = $1 AND topic = $2 AND partition = $3 AND next_offset = $4",
    )
    .bind(projection)
    .bind(topic)
    .bind(partition)
    .bind(range.start)
    .bind(range.end)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if updated == 1 {
        return Ok(());
    }
    // No row matched: either this partition was never projected (then the batch must start
    // at its beginning, and is inserted), or it moved (then the insert finds the row and
    // does nothing, and we are fenced).
    if range.start != 0 {
        return Err(WriteError::Fenced { partition });
    }
    let inserted = sqlx::query(
        "INSERT INTO control.projector_offsets (projection, topic, partition, next_offset)
         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
    )
    .bind(projection)
    .bind(topic)
    .bind(partition)
    .bind(range.end)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if inserted == 1 {
        Ok(())
    } else {
        Err(WriteError::Fenced { partition })
    }
}

/// The stored next offsets of a projection's partitions on a topic.
pub async fn stored_offsets(
    pool: &PgPool,
    projection: &str,
    topic: &str,
) -> sqlx::Result<HashMap<i32, i64>> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM control.projector_offsets
          WHERE projection = $1 AND topic = $2",
    )
    .bind(projection)
    .bind(topic)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Records on the stored offsets of `partitions` that their batch keeps failing, and why,
/// for `projector status` (cleared by the next batch that lands). Best effort: the database
/// may be the thing that is failing.
pub async fn note_stall(
    pool: &PgPool,
    projection: &str,
    topic: &str,
    partitions: &[i32],
    error: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE control.projector_offsets
            SET stalled_since = coalesce(stalled_since, now()), last_error = left($4, 2000)
          WHERE projection = $1 AND topic = $2 AND partition = ANY($3)",
    )
    .bind(projection)
    .bind(topic)
    .bind(partitions)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}
