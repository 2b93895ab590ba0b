//! `pixfarm`: submit, watch and fetch render jobs; run the coordinator, a
//! worker, a local render, or the whole farm on one machine (`pixfarm dev`).

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = pixfarm::commands::Cli::parse();
    match pixfarm::commands::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", sentence(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined into one sentence (no Debug dumps),
/// skipping causes whose text an outer message already repeats.
fn sentence(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
