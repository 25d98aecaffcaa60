use clap::{Parser, Subcommand};
use projector::{tools, App, Config};

/// mimalloc rather than glibc's allocator, for librdkafka's C allocations too (`override`):
/// glibc's arenas kept the fetch buffers of a drained backlog resident (127 MB after draining
/// 400 000 events; 32 MB once mimalloc has purged them). Built not to ask for transparent huge
/// pages (`no_thp`; `MIMALLOC_ALLOW_THP=0` where the host's mode is `always`): with them,
/// resident memory doubled. Deployments set `MIMALLOC_PURGE_DELAY=0` too (`deploy/Dockerfile`,
/// `deploy/local/services.sh`): freed memory goes back at once, not a second later. (Not in
/// ingest-api: measured again with that setting, it was no faster there than glibc's;
/// tests/PERFORMANCE.md, thirty-ninth session.)
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tally's projector: Kafka → PostgreSQL projections, exactly once.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Consume and project (the default).
    Run,
    /// Apply the control-schema migrations, bring tenant schemas up to date, and exit.
    Migrate,
    /// Per topic and partition: the stored offset, the log end and the lag.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Rebuild projections from offset 0 into a new version, switch to it when it has
    /// caught up, and drop the old one. The current version serves until the switch.
    Replay {
        /// Only this tenant (default: every tenant).
        #[arg(long)]
        tenant: Option<shared::tenant::TenantId>,
        /// Print the final report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Apply retention once: drop partitions and rollup rows older than each tenant's
    /// windows, create the coming days' partitions.
    Retention,
    /// Inspect dead letters and send them back after a fix.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List the dead letters of a topic.
    List {
        #[arg(long, default_value = "metrics", value_parser = ["metrics", "auth"])]
        topic: String,
    },
    /// Print one dead letter's headers and payload.
    Show {
        #[arg(long, default_value = "metrics", value_parser = ["metrics", "auth"])]
        topic: String,
        #[arg(long)]
        partition: i32,
        #[arg(long)]
        offset: i64,
    },
    /// Send dead letters back to their source topic: one (--partition, --offset) or --all.
    Redrive {
        #[arg(long, default_value = "metrics", value_parser = ["metrics", "auth"])]
        topic: String,
        #[arg(long)]
        partition: Option<i32>,
        #[arg(long)]
        offset: Option<i64>,
        #[arg(long)]
        all: bool,
    },
}

fn dlq_topic(config: &Config, which: &str) -> String {
    if which == "auth" {
        config.common.auth_dlq_topic()
    } else {
        config.common.metrics_dlq_topic()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config: Config = shared::config::load().map_err(anyhow::Error::msg)?;
    config.check().map_err(anyhow::Error::msg)?;
    shared::telemetry::init_tracing(&config.common.log_format);
    match cli.command.unwrap_or(Command::Run) {
        Command::Migrate => {
            let pool = shared::db::pool(&config.common, "tally-projector-migrate")?;
            projector::migrate(&pool, config.timescale).await?;
            println!("migrations applied");
        }
        Command::Run => {
            let app = App::build(config).await?;
            tracing::info!(addr = %app.local_addr(), "projector running");
            app.run_until(shared::health::shutdown_signal()).await?;
        }
        Command::Replay { tenant, json } => {
            let pool = shared::db::pool(&config.common, "tally-projector-replay")?;
            let report = projector::replay::replay(
                &config,
                &pool,
                tenant,
                std::time::Duration::from_secs(2),
                &mut |p| {
                    eprintln!(
                        "replay {}: {} records read, {} events projected, {:.0} records/s, lag {}, ETA {}",
                        p.phase,
                        p.records,
                        p.projected,
                        p.rate,
                        p.lag,
                        p.eta_secs.map_or("-".into(), |s| format!("{s:.0} s"))
                    )
                },
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "replayed {} tenant(s): {} records read, {} events projected in {:.1} s ({:.0} records/s); switch held live writes {:.0} ms",
                    report.tenants,
                    report.records,
                    report.projected,
                    report.seconds,
                    report.records_per_sec,
                    report.switch_ms
                );
                if report.dead_lettered > 0 {
                    println!(
                        "  {} record(s) could not be projected and were dead-lettered (see `projector dlq list`)",
                        report.dead_lettered
                    );
                }
                for (t, old, new) in &report.versions {
                    println!("  {t}: v{old} -> v{new} (v{old} dropped)");
                }
            }
        }
        Command::Retention => {
            let pool = shared::db::pool(&config.common, "tally-projector-retention")?;
            let pass = projector::retention::run_once(&pool, config.partitions_ahead_days).await?;
            let swept = projector::housekeeping::sweep(&pool, config.keep()).await?;
            // The tenants' pass as it always was, with the control schema's sweep beside it.
            let mut report = serde_json::to_value(&pass)?;
            report["control"] = serde_json::to_value(&swept)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Status { json } => {
            let pool = shared::db::pool(&config.common, "tally-projector-status")?;
            let rows = tools::status(&config, &pool).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<12} {:<34} {:>9} {:>12} {:>12} {:>10}",
                    "projection", "topic", "partition", "stored", "log end", "lag"
                );
                for r in &rows {
                    println!(
                        "{:<12} {:<34} {:>9} {:>12} {:>12} {:>10}",
                        r.projection, r.topic, r.partition, r.stored, r.log_end, r.lag
                    );
                }
                println!("total lag: {}", rows.iter().map(|r| r.lag).sum::<i64>());
                for r in rows.iter().filter(|r| r.stalled_since.is_some()) {
                    println!(
                        "STALLED {} partition {} since {}: {}",
                        r.topic,
                        r.partition,
                        r.stalled_since.map(|t| t.to_rfc3339()).unwrap_or_default(),
                        r.last_error.as_deref().unwrap_or("")
                    );
                }
            }
        }
        Command::Dlq(DlqCommand::List { topic }) => {
            for d in tools::dead_letters(&config, &dlq_topic(&config, &topic)).await? {
                println!(
                    "{}/{}\tfrom {}/{}/{}\t{}",
                    d.partition,
                    d.offset,
                    d.source_topic,
                    d.source_partition,
                    d.source_offset,
                    d.error
                );
            }
        }
        Command::Dlq(DlqCommand::Show {
            topic,
            partition,
            offset,
        }) => {
            let all = tools::dead_letters(&config, &dlq_topic(&config, &topic)).await?;
            let d = all
                .iter()
                .find(|d| d.partition == partition && d.offset == offset)
                .ok_or_else(|| anyhow::anyhow!("no dead letter at {partition}/{offset}"))?;
            println!("{}", serde_json::to_string_pretty(d)?);
            println!("{}", d.payload_text());
        }
        Command::Dlq(DlqCommand::Redrive {
            topic,
            partition,
            offset,
            all,
        }) => {
            let letters = tools::dead_letters(&config, &dlq_topic(&config, &topic)).await?;
            let chosen: Vec<_> = match (all, partition, offset) {
                (true, None, None) => letters,
                (false, Some(p), Some(o)) => letters
                    .into_iter()
                    .filter(|d| d.partition == p && d.offset == o)
                    .collect(),
                _ => anyhow::bail!("give --all, or --partition and --offset"),
            };
            anyhow::ensure!(!chosen.is_empty(), "no such dead letter");
            println!("redriven: {}", tools::redrive(&config, &chosen).await?);
        }
    }
    Ok(())
}
