//! Model conformance harness (see `docs/conformance.md`): runs one model component on tensors read from a
//! safetensors file and writes its outputs to another, so any diffusers-layout checkpoint and any reference
//! implementation can be compared with ours on exactly the same inputs.
//!
//! ```text
//! cargo run --release -p pixart --example conformance -- transformer --model DIR [--controlnet DIR] --inputs IN --out OUT
//! cargo run --release -p pixart --example conformance -- lcm --model DIR --scheduler DIR [--controlnet DIR] --inputs IN --out OUT
//! cargo run --release -p pixart --example conformance -- vae-decode --vae DIR --inputs IN --out OUT
//! cargo run --release -p pixart --example conformance -- vae-encode --vae DIR --inputs IN --out OUT
//! cargo run --release -p pixart --example conformance -- t5 --text-encoder DIR --inputs IN --out OUT
//! ```
//!
//! Everything runs in f32 on the CPU. On bad input the program exits non-zero with one line naming the
//! missing or mis-shaped tensor.
//!
//! Ownership while two helpers edit this file: `transformer` mode (and the shared helpers) belong to
//! model-transformer; `lcm`, `vae-decode`, `vae-encode` and `t5` belong to model-pipeline.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(about = "Run one PixArt component on safetensors inputs and write its outputs")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// One transformer forward: `sample` (B, out_channels, H, W).
    Transformer(TransformerArgs),
    /// The PixArt-LCM sampling loop with guidance off: `latents`, `timesteps`.
    Lcm(LcmArgs),
    /// VAE decode of sampler latents: `sample` (B, 3, 8h, 8w).
    VaeDecode(VaeArgs),
    /// VAE encode (posterior mean × scaling_factor): `latents` (B, 4, H/8, W/8).
    VaeEncode(VaeArgs),
    /// T5 encoder: `last_hidden_state` (B, L, d_model).
    T5(T5Args),
}

#[derive(Args, Debug)]
struct TransformerArgs {
    /// diffusers `transformer/` directory (config.json + diffusion_pytorch_model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// diffusers-community ControlNet adapter directory.
    #[arg(long)]
    controlnet: Option<PathBuf>,
    #[arg(long)]
    inputs: PathBuf,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct LcmArgs {
    #[arg(long)]
    model: PathBuf,
    /// Directory holding `scheduler_config.json`.
    #[arg(long)]
    scheduler: PathBuf,
    #[arg(long)]
    controlnet: Option<PathBuf>,
    #[arg(long)]
    inputs: PathBuf,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct VaeArgs {
    /// diffusers `vae/` directory.
    #[arg(long)]
    vae: PathBuf,
    #[arg(long)]
    inputs: PathBuf,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct T5Args {
    /// `text_encoder/` directory (config.json + model.safetensors or shards).
    #[arg(long)]
    text_encoder: PathBuf,
    #[arg(long)]
    inputs: PathBuf,
    #[arg(long)]
    out: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.mode {
        Mode::Transformer(a) => run_transformer(&a),
        Mode::Lcm(a) => run_lcm(&a),
        Mode::VaeDecode(a) => run_vae_decode(&a),
        Mode::VaeEncode(a) => run_vae_encode(&a),
        Mode::T5(a) => run_t5(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, outermost context first, so scripts can grep it.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Shared helpers (model-transformer)
// ---------------------------------------------------------------------------------------------------------

/// Reads every tensor of a safetensors file onto the CPU.
fn load_inputs(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading inputs {}", path.display()))
}

/// Writes the outputs as f32 contiguous tensors.
fn save_outputs(outputs: HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let mut out = HashMap::new();
    for (k, v) in outputs {
        let v = if v.dtype() == DType::F32 {
            v
        } else {
            v.to_dtype(DType::F32)?
        };
        out.insert(k, v.contiguous()?);
    }
    candle_core::safetensors::save(&out, path)
        .with_context(|| format!("writing outputs {}", path.display()))
}

/// Fetches a required input tensor, naming it when absent.
#[allow(dead_code)]
fn required(inputs: &HashMap<String, Tensor>, name: &str) -> Result<Tensor> {
    match inputs.get(name) {
        Some(t) => Ok(t.clone()),
        None => bail!("input tensor `{name}` is missing"),
    }
}

/// Masks may arrive as f32 or i64 (transformers writes i64): return f32 with 1 = keep, 0 = pad.
#[allow(dead_code)]
fn mask_as_f32(mask: &Tensor) -> Result<Tensor> {
    Ok(mask.to_dtype(DType::F32)?)
}

// ---------------------------------------------------------------------------------------------------------
// transformer (model-transformer)
// ---------------------------------------------------------------------------------------------------------

fn run_transformer(a: &TransformerArgs) -> Result<()> {
    match &a.controlnet {
        // `controlnet_cond` and the optional `conditioning_scale` join the inputs.
        Some(adapter) => {
            pixart::controlnet::conformance::run_files(&a.model, adapter, &a.inputs, &a.out)?
        }
        None => pixart::transformer::conformance::run_files(&a.model, &a.inputs, &a.out)?,
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// lcm (model-pipeline)
// ---------------------------------------------------------------------------------------------------------

fn run_lcm(a: &LcmArgs) -> Result<()> {
    use pixart::pipeline::{TimestepSpacing, conformance};
    let transformer =
        pixart::transformer::PixArtTransformer::load(&a.model, DType::F32, &Device::Cpu)?;
    let adapter = a
        .controlnet
        .as_ref()
        .map(|dir| {
            pixart::controlnet::ControlNetAdapter::load(
                dir,
                &transformer.config,
                DType::F32,
                &Device::Cpu,
            )
        })
        .transpose()?;
    let scheduler = pixart::scheduler::LcmSchedulerConfig::from_path(&a.scheduler)?;
    let inputs = load_inputs(&a.inputs)?;
    let out = conformance::lcm_controlled(
        &transformer,
        adapter.as_ref(),
        &scheduler,
        TimestepSpacing::Diffusers,
        &inputs,
    )?;
    save_outputs(out, &a.out)
}

// ---------------------------------------------------------------------------------------------------------
// vae-decode (model-pipeline)
// ---------------------------------------------------------------------------------------------------------

fn run_vae_decode(a: &VaeArgs) -> Result<()> {
    let vae = pixart::vae::Vae::load(&a.vae, &Device::Cpu)?;
    let out = pixart::pipeline::conformance::vae_decode(&vae, &load_inputs(&a.inputs)?)?;
    save_outputs(out, &a.out)
}

// ---------------------------------------------------------------------------------------------------------
// vae-encode (model-pipeline)
// ---------------------------------------------------------------------------------------------------------

fn run_vae_encode(a: &VaeArgs) -> Result<()> {
    let vae = pixart::vae::Vae::load(&a.vae, &Device::Cpu)?;
    let out = pixart::pipeline::conformance::vae_encode(&vae, &load_inputs(&a.inputs)?)?;
    save_outputs(out, &a.out)
}

// ---------------------------------------------------------------------------------------------------------
// t5 (model-pipeline)
// ---------------------------------------------------------------------------------------------------------

fn run_t5(a: &T5Args) -> Result<()> {
    let mut encoder =
        pixart::text_encoder::TextEncoder::load(&a.text_encoder, DType::F32, &Device::Cpu)?;
    let out = pixart::pipeline::conformance::t5(&mut encoder, &load_inputs(&a.inputs)?)?;
    save_outputs(out, &a.out)
}
