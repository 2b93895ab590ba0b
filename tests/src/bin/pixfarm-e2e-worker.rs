//! The render worker, built inside the e2e crate so that Cargo builds it
//! before the tests and tells them where it is (`CARGO_BIN_EXE_…`). Same
//! flags and `PIXFARM_*` environment as `pixfarm-worker`.

use clap::Parser;
use pixfarm_worker::{WorkerConfig, run};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    config: WorkerConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PIXFARM_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    run(cli.config, pixfarm_coordinator::shutdown_signal()).await?;
    Ok(())
}
