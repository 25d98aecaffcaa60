use query_api::{App, Config};

/// Tally's query-api: dashboards from the projections.
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = shared::config::load().map_err(anyhow::Error::msg)?;
    shared::telemetry::init_tracing(&config.common.log_format);
    let app = App::build(config).await?;
    tracing::info!(addr = %app.local_addr(), "query-api listening");
    app.run_until(shared::health::shutdown_signal()).await
}
