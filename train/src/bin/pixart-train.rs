//! `pixart-train`: the training stages of issue 10, one subcommand each.
//!
//! ```text
//! pixart-train vae --out runs/vae --steps 2000 --seed 0            # fresh run
//! pixart-train vae --out runs/vae --steps 2000 --seed 0 --resume   # continue after an interruption
//! ```

use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pixart_train::vae::{self, RunOptions, VaeTrainConfig};

#[derive(Parser)]
#[command(version, about = "Train PixArt-LCM's parts at toy scale on the CPU")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stage 1: a small SD-architecture AutoencoderKL; writes OUT/checkpoint and OUT/vae (diffusers).
    Vae(VaeArgs),
}

#[derive(clap::Args)]
struct VaeArgs {
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Total training steps (a resumed run continues up to this).
    #[arg(long, default_value_t = 2000)]
    steps: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue from OUT/checkpoint (its config must match this run's).
    #[arg(long)]
    resume: bool,
    /// Steps between checkpoints: an interruption loses at most this many.
    #[arg(long, default_value_t = 100)]
    save_every: u64,
    #[arg(long, default_value_t = VaeTrainConfig::default().batch_size)]
    batch_size: usize,
    #[arg(long, default_value_t = VaeTrainConfig::default().optimizer.lr)]
    lr: f64,
    #[arg(long, default_value_t = VaeTrainConfig::default().kl_weight)]
    kl_weight: f64,
    /// Channels per level, comma-separated (4 levels: the ×8 SD VAE).
    #[arg(long, value_delimiter = ',', default_values_t = VaeTrainConfig::default().block_out_channels)]
    channels: Vec<usize>,
    #[arg(long, default_value_t = VaeTrainConfig::default().norm_num_groups)]
    norm_groups: usize,
    #[arg(long, default_value_t = VaeTrainConfig::default().dataset_size)]
    dataset_size: u64,
    /// Print every step's figures as JSON lines on stdout.
    #[arg(long)]
    log: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Vae(a) => {
            let mut config = VaeTrainConfig {
                seed: a.seed,
                batch_size: a.batch_size,
                kl_weight: a.kl_weight,
                block_out_channels: a.channels,
                norm_num_groups: a.norm_groups,
                dataset_size: a.dataset_size,
                ..Default::default()
            };
            config.optimizer.lr = a.lr;
            let opts = RunOptions {
                out: a.out.clone(),
                steps: a.steps,
                save_every: a.save_every,
                resume: a.resume,
                progress: !a.log,
            };
            let log = a.log;
            let run = vae::train(&config, &opts, &candle_core::Device::Cpu, |r| {
                if log {
                    println!("{}", serde_json::to_string(r).expect("records serialise"));
                }
                ControlFlow::Continue(())
            })
            .with_context(|| format!("training the VAE into {}", a.out.display()))?;
            let mut secs = run.seconds_per_step.clone();
            secs.sort_by(f64::total_cmp);
            let median = secs.get(secs.len() / 2).copied().unwrap_or(f64::NAN);
            let last = run.records.last();
            eprintln!(
                "vae: steps {}..{} · min {:.3} / median {:.3} s/step · last loss {} · recon mse {} · held-out recon mse {:.5} → {:.5} · scaling_factor {:.4} · {}",
                run.start_step,
                run.end_step,
                secs.first().copied().unwrap_or(f64::NAN),
                median,
                last.map_or("-".into(), |r| format!("{:.5}", r.loss)),
                last.map_or("-".into(), |r| format!("{:.5}", r.recon)),
                run.probe_mse.0,
                run.probe_mse.1,
                run.scaling_factor.unwrap_or(f64::NAN),
                run.vae_dir.map_or("-".into(), |d| d.display().to_string()),
            );
        }
    }
    Ok(())
}
