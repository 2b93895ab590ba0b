//! `pixfarm`: submit, watch and fetch render jobs; run the coordinator, a
//! worker, a local render, or the whole farm on one machine (`pixfarm dev`).

use clap::Parser;

fn main() -> std::process::ExitCode {
    // SAFETY: before the async runtime, or any other thread, exists (`pixfarm dev` and `generate` render
    // in this process).
    #[allow(unsafe_code)]
    unsafe {
        pixart::threads::settle()
    };
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> std::process::ExitCode {
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
