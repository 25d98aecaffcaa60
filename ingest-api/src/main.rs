use clap::{Parser, Subcommand};
use ingest_api::{control, App, Config};

/// Tally's ingest-api: authenticated event ingestion into Kafka.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API (the default).
    Serve,
    /// Operator commands (tenants, API keys).
    #[command(subcommand)]
    Admin(control::cli::AdminCommand),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config: Config = shared::config::load().map_err(anyhow::Error::msg)?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Admin(cmd) => {
            let pool = shared::db::pool(&config.common, "tally-admin")?;
            control::cli::run(&pool, &config.common.topic_prefix, cmd).await
        }
        Command::Serve => {
            shared::telemetry::init_tracing(&config.common.log_format);
            let app = App::build(config).await?;
            tracing::info!(addr = %app.local_addr(), "ingest-api listening");
            app.run_until(shared::health::shutdown_signal()).await
        }
    }
}
