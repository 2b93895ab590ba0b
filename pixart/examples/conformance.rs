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
//! Everything runs in f32 on the CPU unless `--device cuda[:N]` (a `--features cuda` build) and
//! `--dtype bf16|f16` say otherwise: the GPU check (`bench/gpu/run.sh`) runs the committed golden cases
//! through the CUDA kernels this way. Outputs are always written as f32. On bad input the program exits
//! non-zero with one line naming the missing or mis-shaped tensor.
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
    /// `cpu`, `cuda` or `cuda:N` (CUDA needs a `--features cuda` build).
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    /// Model dtype: `f32`, or `bf16`/`f16` on a GPU (the VAE always runs in f32).
    #[arg(long, global = true, default_value = "f32")]
    dtype: String,
    #[command(subcommand)]
    mode: Mode,
}

/// Where and in what precision the mode runs.
struct Place {
    device: Device,
    dtype: DType,
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
    let result = place(&cli).and_then(|at| match &cli.mode {
        Mode::Transformer(a) => run_transformer(a, &at),
        Mode::Lcm(a) => run_lcm(a, &at),
        Mode::VaeDecode(a) => run_vae_decode(a, &at),
        Mode::VaeEncode(a) => run_vae_encode(a, &at),
        Mode::T5(a) => run_t5(a, &at),
    });
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

fn place(cli: &Cli) -> Result<Place> {
    let device = pixart::pipeline::device_from_str(&cli.device).context("--device")?;
    let dtype = pixart::pipeline::dtype_from_str(&cli.dtype).context("--dtype")?;
    if device.is_cpu() && dtype != DType::F32 {
        bail!(
            "--dtype {} needs a GPU (--device cuda); the CPU runs f32",
            cli.dtype
        );
    }
    Ok(Place { device, dtype })
}

/// Reads every tensor of a safetensors file onto the device (as stored: f32 or i64).
fn load_inputs(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device)
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

fn run_transformer(a: &TransformerArgs, at: &Place) -> Result<()> {
    if at.device.is_cpu() {
        // The library calls the golden tests run, byte for byte.
        match &a.controlnet {
            // `controlnet_cond` and the optional `conditioning_scale` join the inputs.
            Some(adapter) => {
                pixart::controlnet::conformance::run_files(&a.model, adapter, &a.inputs, &a.out)?
            }
            None => pixart::transformer::conformance::run_files(&a.model, &a.inputs, &a.out)?,
        }
        return Ok(());
    }
    let model = pixart::transformer::PixArtTransformer::load(&a.model, at.dtype, &at.device)?;
    let inputs = load_inputs(&a.inputs, &at.device)?;
    let sample = match &a.controlnet {
        Some(dir) => {
            let adapter = pixart::controlnet::ControlNetAdapter::load(
                dir,
                &model.config,
                at.dtype,
                &at.device,
            )?;
            pixart::controlnet::conformance::forward_named(&model, &adapter, &inputs)?
        }
        None => pixart::transformer::conformance::forward_named(&model, &inputs)?,
    };
    save_outputs(HashMap::from([("sample".to_string(), sample)]), &a.out)
}

// ---------------------------------------------------------------------------------------------------------
// lcm (model-pipeline)
// ---------------------------------------------------------------------------------------------------------

fn run_lcm(a: &LcmArgs, at: &Place) -> Result<()> {
    use pixart::pipeline::{TimestepSpacing, conformance};
    let transformer = pixart::transformer::PixArtTransformer::load(&a.model, at.dtype, &at.device)?;
    let adapter = a
        .controlnet
        .as_ref()
        .map(|dir| {
            pixart::controlnet::ControlNetAdapter::load(
                dir,
                &transformer.config,
                at.dtype,
                &at.device,
            )
        })
        .transpose()?;
    let scheduler = pixart::scheduler::LcmSchedulerConfig::from_path(&a.scheduler)?;
    let inputs = load_inputs(&a.inputs, &at.device)?;
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

fn run_vae_decode(a: &VaeArgs, at: &Place) -> Result<()> {
    let vae = pixart::vae::Vae::load(&a.vae, &at.device)?;
    let out =
        pixart::pipeline::conformance::vae_decode(&vae, &load_inputs(&a.inputs, &at.device)?)?;
    save_outputs(out, &a.out)
}

// ---------------------------------------------------------------------------------------------------------
// vae-encode (model-pipeline)
// ---------------------------------------------------------------------------------------------------------

fn run_vae_encode(a: &VaeArgs, at: &Place) -> Result<()> {
    let vae = pixart::vae::Vae::load(&a.vae, &at.device)?;
    let out =
        pixart::pipeline::conformance::vae_encode(&vae, &load_inputs(&a.inputs, &at.device)?)?;
    save_outputs(out, &a.out)
}

// ---------------------------------------------------------------------------------------------------------
// t5 (model-pipeline)
// ---------------------------------------------------------------------------------------------------------

fn run_t5(a: &T5Args, at: &Place) -> Result<()> {
    let mut encoder =
        pixart::text_encoder::TextEncoder::load(&a.text_encoder, at.dtype, &at.device)?;
    let out =
        pixart::pipeline::conformance::t5(&mut encoder, &load_inputs(&a.inputs, &at.device)?)?;
    save_outputs(out, &a.out)
}
