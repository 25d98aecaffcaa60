//! PostgreSQL pool setup.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::config::{Common, Timescale};

/// Opens a pool lazily: the service starts even if PostgreSQL is not up yet, and `/readyz`
/// says so.
pub fn pool(common: &Common, application_name: &str) -> Result<PgPool, sqlx::Error> {
    let opts: PgConnectOptions = common.database_url.parse()?;
    let opts = opts.application_name(application_name);
    Ok(PgPoolOptions::new()
        .max_connections(common.db_max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(opts))
}

/// The control-schema migrations (`migrations/control`), embedded in every binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/control");

/// Applies the control-schema migrations (idempotent; concurrent callers are serialized by
/// sqlx's migration lock). Creates the TimescaleDB extension first where `timescale` and the
/// server allow it ([`timescale_plan`]), so tenant schemas get hypertables. Tenant schemas
/// are the projector's: it upgrades them (`projector::migrate`).
pub async fn migrate(pool: &sqlx::PgPool, timescale: Timescale) -> anyhow::Result<()> {
    use anyhow::Context;
    // Under a lock of its own: two services creating the extension at once would collide on
    // pg_extension's unique name.
    let mut tx = pool.begin().await.context("connecting to PostgreSQL")?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('tally.migrate.extensions'))")
        .execute(&mut *tx)
        .await?;
    let found: (bool, bool, String) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'),
                EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'),
                current_setting('shared_preload_libraries')",
    )
    .fetch_one(&mut *tx)
    .await
    .context("connecting to PostgreSQL")?;
    let found = TimescaleFound {
        installed: found.0,
        available: found.1,
        preloaded: preloads_timescale(&found.2),
    };
    match timescale_plan(timescale, found).map_err(anyhow::Error::msg)? {
        TimescalePlan::Create => {
            sqlx::query("CREATE EXTENSION IF NOT EXISTS timescaledb")
                .execute(&mut *tx)
                .await
                .context("creating the timescaledb extension")?;
            tracing::info!("TimescaleDB extension created: tenant schemas get hypertables");
        }
        TimescalePlan::Use | TimescalePlan::Native => {}
        TimescalePlan::NativeWarn(why) => tracing::warn!("{why}"),
    }
    tx.commit().await?;
    MIGRATOR.run(pool).await.context("applying migrations")?;
    Ok(())
}

/// What the database says about TimescaleDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimescaleFound {
    /// The extension exists in this database.
    pub installed: bool,
    /// The server has its files (`pg_available_extensions`).
    pub available: bool,
    /// `shared_preload_libraries` names it, as it requires.
    pub preloaded: bool,
}

/// What [`migrate`] does about TimescaleDB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimescalePlan {
    /// Create the extension: tenant schemas made from now on get hypertables.
    Create,
    /// It is there already.
    Use,
    /// Native partitions.
    Native,
    /// Native partitions, although the operator probably wanted TimescaleDB: say why.
    NativeWarn(String),
}

const PRELOAD_HINT: &str = "add shared_preload_libraries = 'timescaledb' to postgresql.conf \
     and restart PostgreSQL (deploy/local/up.sh does so when TimescaleDB is installed)";

/// Decides what to do about TimescaleDB; `Err` says why Tally cannot start as configured.
pub fn timescale_plan(mode: Timescale, found: TimescaleFound) -> Result<TimescalePlan, String> {
    if found.installed {
        if !found.preloaded {
            return Err(format!(
                "this database has the timescaledb extension but PostgreSQL was started \
                 without loading it, so its hypertables cannot be used: {PRELOAD_HINT}"
            ));
        }
        return Ok(TimescalePlan::Use);
    }
    match (mode, found.available, found.preloaded) {
        (Timescale::Off, _, _) => Ok(TimescalePlan::Native),
        (_, true, true) => Ok(TimescalePlan::Create),
        (Timescale::Auto, false, _) => Ok(TimescalePlan::Native),
        (Timescale::Auto, true, false) => Ok(TimescalePlan::NativeWarn(format!(
            "TimescaleDB is installed in PostgreSQL but not preloaded, so tenant schemas use \
             native partitions; for hypertables, {PRELOAD_HINT} (TALLY_TIMESCALE=off silences this)"
        ))),
        (Timescale::On, true, false) => Err(format!(
            "TALLY_TIMESCALE=on, but PostgreSQL does not preload TimescaleDB: {PRELOAD_HINT}"
        )),
        (Timescale::On, false, _) => Err(
            "TALLY_TIMESCALE=on, but this PostgreSQL has no timescaledb extension installed".into(),
        ),
    }
}

/// Whether a `shared_preload_libraries` value loads TimescaleDB (names may carry a path or
/// quotes).
fn preloads_timescale(setting: &str) -> bool {
    setting.split(',').any(|lib| {
        let lib = lib.trim().trim_matches('"');
        let name = lib.rsplit('/').next().unwrap_or(lib);
        name == "timescaledb" || name == "timescaledb.so"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(installed: bool, available: bool, preloaded: bool) -> TimescaleFound {
        TimescaleFound {
            installed,
            available,
            preloaded,
        }
    }

    #[test]
    fn auto_creates_only_what_is_preloaded() {
        use TimescalePlan::*;
        let auto = Timescale::Auto;
        assert_eq!(timescale_plan(auto, found(false, true, true)), Ok(Create));
        assert_eq!(timescale_plan(auto, found(false, false, false)), Ok(Native));
        assert!(matches!(
            timescale_plan(auto, found(false, true, false)),
            Ok(NativeWarn(w)) if w.contains("shared_preload_libraries")
        ));
        assert_eq!(timescale_plan(auto, found(true, true, true)), Ok(Use));
    }

    #[test]
    fn on_refuses_what_cannot_work_and_off_creates_nothing() {
        assert!(timescale_plan(Timescale::On, found(false, true, false))
            .unwrap_err()
            .contains("preload"));
        assert!(timescale_plan(Timescale::On, found(false, false, false)).is_err());
        assert_eq!(
            timescale_plan(Timescale::Off, found(false, true, true)),
            Ok(TimescalePlan::Native)
        );
        // A database that has the extension cannot work without it being loaded, whatever
        // the mode.
        for mode in [Timescale::Auto, Timescale::On, Timescale::Off] {
            assert!(timescale_plan(mode, found(true, true, false)).is_err());
        }
    }

    #[test]
    fn preload_setting_is_parsed_as_a_list() {
        assert!(preloads_timescale("timescaledb"));
        assert!(preloads_timescale("pg_stat_statements, timescaledb"));
        assert!(preloads_timescale("$libdir/timescaledb"));
        assert!(!preloads_timescale(""));
        assert!(!preloads_timescale("pg_stat_statements"));
        assert!(!preloads_timescale("timescaledb_toolkit"));
    }
}
