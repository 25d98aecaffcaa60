//! Batch preparation: before a batch's transaction, every tenant of it has its schema for
//! the version it writes and the partitions its rows need (DDL in transactions of their
//! own, remembered so each batch does not ask again); inside it, the live projection's
//! versions are checked under lock (version fencing against a replay's switch).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{NaiveDate, Utc};
use shared::tenant::TenantId;
use sqlx::{PgConnection, PgPool};

use crate::batch::{Decoded, WriteError};
use crate::schema::{self, partitions, Lock};

/// Each tenant's projection version a batch writes to.
pub type Versions = HashMap<TenantId, i32>;

/// Where schemas and partitions already exist (per tenant and version), so each batch does
/// not ask again.
#[derive(Default, Clone)]
pub struct Prepared {
    /// Each tenant's active version as last read. Batches check it under lock when they
    /// write ([`Target::Live`]); a mismatch clears this cache.
    versions: Versions,
    tenants: HashSet<(TenantId, i32)>,
    partitions: HashSet<(TenantId, i32, NaiveDate)>,
}

impl Prepared {
    /// Forgets everything (e.g. after a failure that may have left state half-made).
    pub fn clear(&mut self) {
        *self = Prepared::default();
    }

    /// Takes in what another copy learned (a batch's attempt fills a copy of its own): the
    /// schemas and partitions it knows made, and the versions it read.
    pub fn absorb(&mut self, other: Prepared) {
        self.versions.extend(other.versions);
        self.tenants.extend(other.tenants);
        self.partitions.extend(other.partitions);
    }

    /// Whether every tenant of `events` has its version, schema and the partitions the
    /// events need known here: preparing them makes no DDL.
    pub fn ready_for(&self, events: &[Decoded]) -> bool {
        events.iter().all(|e| {
            let t = e.env.tenant_id;
            self.versions.get(&t).is_some_and(|&v| {
                self.tenants.contains(&(t, v))
                    && self
                        .partitions
                        .contains(&(t, v, e.env.occurred_at.date_naive()))
            })
        })
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
    known: &mut HashSet<TenantId>,
    tenant: TenantId,
) -> sqlx::Result<bool> {
    if known.contains(&tenant) {
        return Ok(true);
    }
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM control.tenants WHERE id = $1)")
            .bind(tenant.0)
            .fetch_one(pool)
            .await?;
    // Unknown tenants are not remembered: one may be created later and its dead letters
    // redriven.
    if exists {
        known.insert(tenant);
    }
    Ok(exists)
}

/// Makes sure every tenant of the batch has its schema and the partitions its rows need
/// (for a rebuild's `bulk` load, partitions autovacuum leaves alone until the load is
/// done). Runs in transactions of its own before the batch's (DDL is idempotent).
pub async fn prepare(
    pool: &PgPool,
    prepared: &mut Prepared,
    versions: &Versions,
    ahead_days: i64,
    events: &[Decoded],
    bulk: bool,
) -> Result<(), WriteError> {
    let mut conn = pool.acquire().await?;
    let today = Utc::now().date_naive();
    let mut needed: BTreeMap<(TenantId, i32), Vec<NaiveDate>> = BTreeMap::new();
    for e in events {
        let t = e.env.tenant_id;
        let v = versions.get(&t).copied().unwrap_or(1);
        if !prepared.tenants.contains(&(t, v)) {
            if schema::create_tenant_schema(&mut conn, t, v).await?
                == schema::SchemaState::Superseded
            {
                return Err(WriteError::VersionMoved);
            }
            let ahead = partitions::days_ahead(today, ahead_days);
            partitions::make_partitions(&mut conn, &t.schema(v), &ahead, !bulk).await?;
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
        partitions::make_partitions(&mut conn, &t.schema(v), &days, !bulk).await?;
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
        let read = schema::active_versions(&mut conn, &unknown, Lock::None).await?;
        prepared.versions.extend(read);
    }
    Ok(tenants
        .into_iter()
        .map(|t| (t, prepared.versions[&t]))
        .collect())
}

/// The tenants of a batch, each once.
fn tenants_of(events: &[Decoded]) -> Vec<TenantId> {
    let set: BTreeSet<TenantId> = events.iter().map(|e| e.env.tenant_id).collect();
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

/// The versions a batch writes to; for the live projection, checked under lock against
/// those the batch was prepared for.
pub async fn target_versions<'a>(
    tx: &mut PgConnection,
    target: Target<'a>,
) -> Result<&'a Versions, WriteError> {
    match target {
        Target::Fixed(v) => Ok(v),
        Target::Live(prepared_for) => {
            let tenants: Vec<TenantId> = prepared_for.keys().copied().collect();
            let now = schema::active_versions(tx, &tenants, Lock::Share).await?;
            if tenants.iter().any(|t| now.get(t) != prepared_for.get(t)) {
                return Err(WriteError::VersionMoved);
            }
            Ok(prepared_for)
        }
    }
}
