//! One PixArt transformer forward at the real XL-2 size, timed; the candle half of the benchmark in
//! `bench/transformer.sh` (numbers in BENCHMARKS.md).
//!
//! ```text
//! python3 bench/transformer_torch.py make --dir target/bench/xl
//! RAYON_NUM_THREADS=2 cargo run --release -p pixart --example bench_transformer -- --dir target/bench/xl --runs 5
//! ```
//!
//! Loads `DIR` (a diffusers `transformer/` directory) and `DIR/inputs_<latent>.safetensors`, runs one warm-up
//! and `--runs` timed forwards in f32 on the CPU, then one forward under a tracing layer that sums the time
//! spent in each span (`embed`, `norm`, `attn1`, `attn2`, `ff`, `final`, whole `block`s). When
//! `DIR/torch_out_<latent>.safetensors` exists it also reports the relative error against PyTorch's output.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use pixart::transformer::{PixArtTransformer, conformance};
use tracing::Subscriber;
use tracing::span::{Attributes, Id};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Latent side (32 = 256 px, 128 = 1024 px).
    #[arg(long, default_value_t = 32)]
    latent: usize,
    /// Only time the attention core (q·kᵀ, softmax, ·v) of one self-attention at this latent size.
    #[arg(long)]
    attn_only: bool,
    /// Skip the per-span profile run.
    #[arg(long)]
    no_profile: bool,
}

/// Sums wall time per span name (spans are entered and exited on one thread here).
#[derive(Default)]
struct Profile {
    totals: Mutex<HashMap<&'static str, (Duration, usize)>>,
}

struct Started(Instant);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for &'static Profile {
    fn on_new_span(&self, _attrs: &Attributes<'_>, _id: &Id, _ctx: LayerContext<'_, S>) {}

    fn on_enter(&self, id: &Id, ctx: LayerContext<'_, S>) {
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Started(Instant::now()));
        }
    }

    fn on_exit(&self, id: &Id, ctx: LayerContext<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(Started(t)) = span.extensions_mut().remove::<Started>()
        {
            let mut totals = self.totals.lock().unwrap();
            let e = totals.entry(span.name()).or_default();
            e.0 += t.elapsed();
            e.1 += 1;
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dev = Device::Cpu;
    if args.attn_only {
        let n = (args.latent / 2) * (args.latent / 2);
        let q = Tensor::randn(0f32, 0.3, (1, 16, n, 72), &dev)?;
        let k = Tensor::randn(0f32, 0.3, (1, 16, n, 72), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, 16, n, 72), &dev)?;
        pixart::attention::attend(&q, &k, &v, None)?;
        let t = Instant::now();
        pixart::attention::attend(&q, &k, &v, None)?;
        println!(
            "attention core, {n} tokens, 16 heads: {:.3} s",
            t.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let t_load = Instant::now();
    let model = PixArtTransformer::load(&args.dir, DType::F32, &dev)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let inputs_path = args.dir.join(format!("inputs_{}.safetensors", args.latent));
    let inputs = candle_core::safetensors::load(&inputs_path, &dev)
        .context("inputs (run transformer_torch.py make)")?;

    let mut out = conformance::forward_named(&model, &inputs)?; // warm-up
    let mut times = Vec::new();
    for _ in 0..args.runs {
        let t = Instant::now();
        out = conformance::forward_named(&model, &inputs)?;
        times.push(t.elapsed().as_secs_f64());
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = if sorted.is_empty() {
        f64::NAN
    } else {
        sorted[sorted.len() / 2]
    };
    let min = sorted.first().copied().unwrap_or(f64::NAN);

    let torch_out = args
        .dir
        .join(format!("torch_out_{}.safetensors", args.latent));
    let rel_err = if torch_out.exists() {
        let r = candle_core::safetensors::load(&torch_out, &dev)?;
        let r: &Tensor = &r["sample"];
        let diff = (&out - r)?.abs()?.max_all()?.to_scalar::<f32>()?;
        Some(diff / r.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0))
    } else {
        None
    };

    println!(
        "{}",
        serde_json::json!({
            "impl": "candle",
            "threads": candle_core::utils::get_num_threads(),
            "latent": args.latent,
            "params": model.num_parameters(),
            "load_s": load_s,
            "runs": times.len(),
            "min_s": min,
            "median_s": median,
            "times_s": times,
            "rel_err_vs_torch": rel_err,
        })
    );

    if !args.no_profile {
        kernel_comparison(args.latent)?;
    }

    if !args.no_profile {
        let profile: &'static Profile = Box::leak(Box::default());
        let subscriber = tracing_subscriber::registry().with(profile);
        let t = Instant::now();
        tracing::subscriber::with_default(subscriber, || {
            conformance::forward_named(&model, &inputs)
        })?;
        let total = t.elapsed();
        let totals = profile.totals.lock().unwrap();
        println!("profile of one forward: {:.3} s", total.as_secs_f64());
        let mut rows: Vec<_> = totals.iter().collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.1.0));
        for (name, (d, n)) in rows {
            println!(
                "  {name:<20} {:>8.3} s  {:>5.1} %  ({n} spans)",
                d.as_secs_f64(),
                100.0 * d.as_secs_f64() / total.as_secs_f64()
            );
        }
    }
    Ok(())
}

/// Times candle's own GELU / softmax against `pixart::kernels` on the shapes one forward uses (28 blocks).
fn kernel_comparison(latent: usize) -> Result<()> {
    let dev = Device::Cpu;
    let n = (latent / 2) * (latent / 2);
    let ff = Tensor::randn(0f32, 1.0, (1, n, 4608), &dev)?;
    let scores = Tensor::randn(0f32, 3.0, (1, 16, n, n), &dev)?;
    let time = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> Result<f64> {
        f()?;
        let t = Instant::now();
        for _ in 0..28 {
            f()?;
        }
        Ok(t.elapsed().as_secs_f64())
    };
    let g_candle = time(&|| ff.gelu())?;
    let g_ours = time(&|| pixart::kernels::gelu_tanh(&ff).map_err(candle_core::Error::wrap))?;
    let s_candle = time(&|| candle_nn::ops::softmax_last_dim(&scores))?;
    let s_ours =
        time(&|| pixart::kernels::softmax_last_dim(&scores).map_err(candle_core::Error::wrap))?;
    // The FF up-projection as candle's Linear runs it (rhs = wᵀ view) and with a pre-transposed weight.
    let x = Tensor::randn(0f32, 1.0, (n, 1152), &dev)?;
    let w = Tensor::randn(0f32, 0.03, (4608, 1152), &dev)?;
    let wt = w.t()?.contiguous()?;
    let mm_t = time(&|| x.matmul(&w.t()?))?;
    let mm_c = time(&|| x.matmul(&wt))?;
    let gflop = 28.0 * 2.0 * (n * 1152 * 4608) as f64 / 1e9;
    println!(
        "matmul ({n}x1152)@(1152x4608) x28: w.t() view {mm_t:.3} s ({:.0} GFLOP/s), \
         contiguous (in,out) weight {mm_c:.3} s ({:.0} GFLOP/s)",
        gflop / mm_t,
        gflop / mm_c
    );
    println!(
        "kernels x28 (one forward's worth): gelu candle {g_candle:.3} s, ours {g_ours:.3} s; \
         attn1 softmax candle {s_candle:.3} s, ours {s_ours:.3} s"
    );
    Ok(())
}
