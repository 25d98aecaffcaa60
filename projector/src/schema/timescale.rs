//! Whether tenant schemas get TimescaleDB hypertables: the `timescale` setting, what the
//! server offers, and the extension created (or refused) before any tenant schema is made.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// `TALLY_TIMESCALE`: whether the projector creates the TimescaleDB extension. The same
/// variable tells `deploy/local/up.sh` whether to preload it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Timescale {
    /// Use it where PostgreSQL has it preloaded; native partitions (with a warning when it is
    /// installed but not preloaded) elsewhere.
    #[default]
    Auto,
    /// Require it: migrating fails, saying why, where it cannot be used.
    On,
    /// Never create it (a database that already has it keeps using it).
    Off,
}

/// Creates the TimescaleDB extension where `timescale` and the server allow it ([`plan`]), so
/// tenant schemas made from now on get hypertables; fails, saying why, where `timescale`
/// cannot be honoured.
pub async fn ensure_extension(pool: &PgPool, timescale: Timescale) -> anyhow::Result<()> {
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
    match plan(timescale, found).map_err(anyhow::Error::msg)? {
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

/// What [`ensure_extension`] does about TimescaleDB.
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
pub fn plan(mode: Timescale, found: TimescaleFound) -> Result<TimescalePlan, String> {
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
        assert_eq!(plan(auto, found(false, true, true)), Ok(Create));
        assert_eq!(plan(auto, found(false, false, false)), Ok(Native));
        assert!(matches!(
            plan(auto, found(false, true, false)),
            Ok(NativeWarn(w)) if w.contains("shared_preload_libraries")
        ));
        assert_eq!(plan(auto, found(true, true, true)), Ok(Use));
    }

    #[test]
    fn on_refuses_what_cannot_work_and_off_creates_nothing() {
        assert!(plan(Timescale::On, found(false, true, false))
            .unwrap_err()
            .contains("preload"));
        assert!(plan(Timescale::On, found(false, false, false)).is_err());
        assert_eq!(
            plan(Timescale::Off, found(false, true, true)),
            Ok(TimescalePlan::Native)
        );
        // A database that has the extension cannot work without it being loaded, whatever
        // the mode.
        for mode in [Timescale::Auto, Timescale::On, Timescale::Off] {
            assert!(plan(mode, found(true, true, false)).is_err());
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
