//! Per-step cost of the ControlNet-Transformer adapter: one transformer forward without and with the
//! 13-block adapter at the real XL-2 configuration, timed in the same process; the candle half of the
//! "ControlNet adapter cost" section of BENCHMARKS.md.
//!
//! ```text
//! python3 bench/controlnet_torch.py make --dir target/bench/cn
//! python3 bench/controlnet_torch.py run --dir target/bench/cn --runs 3 --threads 2      # PyTorch side
//! RAYON_NUM_THREADS=2 cargo run --release -p pixart --example bench_controlnet -- --dir target/bench/cn --runs 3
//! ```
//!
//! Loads `DIR/base` and `DIR/adapter` (random weights) and `DIR/inputs_<latent>.safetensors`, runs one warm-up
//! and `--runs` timed forwards of each in f32 on the CPU (or `--device cuda` with the `cuda` feature), prints
//! min and median of each, the measured time ratio and the analytic FLOP ratio. When
//! `DIR/torch_out_<latent>.safetensors` exists (written by the PyTorch run) it also reports the relative error
//! of both outputs against PyTorch's.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use pixart::controlnet::{ControlCondition, ControlNetAdapter};
use pixart::transformer::PixArtTransformer;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Latent side (32 = 256 px).
    #[arg(long, default_value_t = 32)]
    latent: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// `f32`, `f16` or `bf16` (half precision only on a GPU).
    #[arg(long, default_value = "f32")]
    dtype: String,
}

fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (v[0], median)
}

/// Multiply-adds ×2 of one PixArt block on `n` image tokens and `l` text tokens, width `d` (matmuls only:
/// norms, softmax and GELU are a few percent).
fn block_flops(n: f64, l: f64, d: f64) -> f64 {
    let attn1 = 4.0 * n * d * d + 2.0 * n * n * d;
    let attn2 = 2.0 * n * d * d + 2.0 * l * d * d + 2.0 * n * l * d;
    let ff = 8.0 * n * d * d;
    2.0 * (attn1 + attn2 + ff)
}

fn rel_err(ours: &Tensor, reference: &Tensor) -> Result<f32> {
    let ours = ours.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let diff = (ours - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
    Ok(diff / scale)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = pixart::pipeline::device_from_str(&args.device)?;
    let dtype = pixart::pipeline::dtype_from_str(&args.dtype)?;
    let t0 = Instant::now();
    let base = PixArtTransformer::load(args.dir.join("base"), dtype, &device)?;
    let adapter = ControlNetAdapter::load(args.dir.join("adapter"), &base.config, dtype, &device)?;
    eprintln!(
        "loaded base ({} params) + adapter ({} blocks, {} params) in {:.1?}",
        base.num_parameters(),
        adapter.num_layers(),
        adapter.num_parameters(),
        t0.elapsed()
    );
    let path = args.dir.join(format!("inputs_{}.safetensors", args.latent));
    let inp = candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| path.display().to_string())?;
    let x = &inp["hidden_states"];
    let t = &inp["timestep"];
    let y = &inp["encoder_hidden_states"];
    let mask = &inp["encoder_attention_mask"];
    let res_ar = Some((&inp["resolution"], &inp["aspect_ratio"]));
    let cond = ControlCondition {
        latents: &inp["controlnet_cond"],
        scale: &[1.0],
    };
    let sync = |t: &Tensor| -> Result<()> {
        // Reading one value waits for the device to finish the forward.
        t.flatten_all()?.narrow(0, 0, 1)?.to_device(&Device::Cpu)?;
        Ok(())
    };

    let run_base = || -> Result<Tensor> { Ok(base.forward(x, t, y, Some(mask), res_ar)?) };
    let run_ctrl =
        || -> Result<Tensor> { Ok(adapter.forward(&base, x, t, y, Some(mask), res_ar, &cond)?) };
    let mut out_base = run_base()?; // warm-up
    sync(&out_base)?;
    let mut out_ctrl = run_ctrl()?;
    sync(&out_ctrl)?;
    let (mut tb, mut tc) = (Vec::new(), Vec::new());
    // Interleaved so that background load on a shared machine hits both alike.
    for _ in 0..args.runs {
        let s = Instant::now();
        out_base = run_base()?;
        sync(&out_base)?;
        tb.push(s.elapsed().as_secs_f64());
        let s = Instant::now();
        out_ctrl = run_ctrl()?;
        sync(&out_ctrl)?;
        tc.push(s.elapsed().as_secs_f64());
    }
    let (bmin, bmed) = stats(tb.clone());
    let (cmin, cmed) = stats(tc.clone());

    let cfg = &base.config;
    let d = cfg.inner_dim() as f64;
    let n = ((args.latent / cfg.patch_size) * (args.latent / cfg.patch_size)) as f64;
    let l = y.dim(1)? as f64;
    let blocks = cfg.num_layers as f64;
    let k = adapter.num_layers() as f64;
    let base_flops = blocks * block_flops(n, l, d);
    // Copies, plus before_proj once and after_proj per copy (the extra patch embedding is negligible).
    let extra = k * block_flops(n, l, d) + (k + 1.0) * 2.0 * n * d * d;

    let mut result = serde_json::json!({
        "impl": "candle",
        "device": args.device,
        "dtype": args.dtype,
        "threads": std::env::var("RAYON_NUM_THREADS").ok(),
        "latent": args.latent,
        "text_tokens": l,
        "adapter_blocks": adapter.num_layers(),
        "base_s": {"min": bmin, "median": bmed, "all": tb},
        "controlled_s": {"min": cmin, "median": cmed, "all": tc},
        "ratio_median": cmed / bmed,
        "ratio_min": cmin / bmin,
        "flop_ratio": (base_flops + extra) / base_flops,
        "gflops_base": base_flops / 1e9,
    });
    let torch = args
        .dir
        .join(format!("torch_out_{}.safetensors", args.latent));
    if torch.exists() {
        let r = candle_core::safetensors::load(&torch, &Device::Cpu)?;
        result["rel_err_vs_torch"] = serde_json::json!({
            "base": rel_err(&out_base, &r["base"])?,
            "controlled": rel_err(&out_ctrl, &r["controlled"])?,
        });
    }
    println!("{result}");
    Ok(())
}
