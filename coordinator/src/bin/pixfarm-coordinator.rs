//! `pixfarm-coordinator`: the coordinator as a standalone binary (the same as
//! `pixfarm coordinator`). Stops gracefully on SIGTERM or Ctrl-C.

use anyhow::Context;
use clap::Parser;
use pixfarm_coordinator::{CoordinatorConfig, serve, shutdown_signal};

#[derive(Parser)]
#[command(
    name = "pixfarm-coordinator",
    version,
    about = "The pixfarm gRPC coordinator"
)]
struct Cli {
    #[command(flatten)]
    config: CoordinatorConfig,
    /// `text` for people, `json` (one object per line) for log shippers.
    #[arg(long, env = "PIXFARM_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One sentence, no Debug dump or backtrace.
            let mut msg = String::new();
            for cause in e.chain().map(|c| c.to_string()) {
                if !msg.contains(&cause) {
                    if !msg.is_empty() {
                        msg.push_str(": ");
                    }
                    msg.push_str(&cause);
                }
            }
            eprintln!("error: {msg}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if cli.log_format == "json" {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let listener = tokio::net::TcpListener::bind(cli.config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.config.listen))?;
    serve(cli.config, listener, shutdown_signal())
        .await
        .context("the coordinator stopped with an error")?;
    Ok(())
}
