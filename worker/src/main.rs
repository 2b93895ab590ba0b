//! `pixfarm-worker`: the render worker binary. Flags or `PIXFARM_*` environment; SIGTERM or
//! ctrl-c drains (finish the batch, upload, acknowledge) and exits 0.

use clap::Parser;
use pixfarm_worker::{WorkerConfig, run};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(name = "pixfarm-worker", version, about = "pixfarm render worker")]
struct Cli {
    #[command(flatten)]
    config: WorkerConfig,
    /// Log as JSON lines (for log shippers); the same as `--log-format json`.
    #[arg(long, env = "PIXFARM_LOG_JSON", default_value_t = false)]
    log_json: bool,
    /// `text` for people, `json` (one object per line) for log shippers.
    #[arg(long, env = "PIXFARM_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn main() -> anyhow::Result<()> {
    // SAFETY: before the async runtime, or any other thread, exists.
    #[allow(unsafe_code)]
    unsafe {
        pixart::threads::settle()
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve())
}

/// The worker's life: logging, then render until SIGTERM drains it.
async fn serve() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_env("PIXFARM_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    if cli.log_json || cli.log_format == "json" {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    run(cli.config, shutdown_signal()).await?;
    Ok(())
}

/// Resolves on SIGTERM (Kubernetes, systemd) or ctrl-c.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
