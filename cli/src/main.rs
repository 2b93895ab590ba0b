//! `pixfarm`: submit, watch and fetch render jobs; run the coordinator, a
//! worker, a local render, or the whole farm on one machine (`pixfarm dev`).

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = pixfarm::commands::Cli::parse();
    match pixfarm::commands::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` joins the context chain into one sentence; no Debug dumps.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
