use clap::{Parser, Subcommand};
use projector::{App, Config};

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
    /// Apply the control-schema migrations and exit.
    Migrate,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config: Config = shared::config::load().map_err(anyhow::Error::msg)?;
    shared::telemetry::init_tracing(&config.common.log_format);
    match cli.command.unwrap_or(Command::Run) {
        Command::Migrate => {
            let pool = shared::db::pool(&config.common, "tally-projector-migrate")?;
            projector::migrate(&pool).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Run => {
            let app = App::build(config).await?;
            tracing::info!(addr = %app.local_addr(), "projector running");
            app.run_until(shared::health::shutdown_signal()).await
        }
    }
}
