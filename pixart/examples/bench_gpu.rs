//! The candle half of the GPU benchmark (`bench/gpu/run.sh`, figures in BENCHMARKS.md): one real-size
//! transformer forward, or the whole 4-step render, timed on a device and dtype, printed as one JSON line.
//!
//! ```text
//! bench_gpu transformer --dir MODEL/transformer --inputs inputs_128.safetensors --device cuda --dtype bf16 --batch 8
//! bench_gpu render --model MODEL --device cuda --dtype bf16 --size 1024 --batch 1 --steps 4 [--text-encoder] [--controlnet DIR]
//! ```
//!
//! Runs on the CPU too (`--device cpu --dtype f32`), which is how the script is checked on machines
//! without a GPU. Every timed region ends with `Device::synchronize`, so GPU work is counted, not
//! just queued. `render` without `--text-encoder` feeds random text features (T5 excluded: the
//! text encoder runs elsewhere, as in the paper's 8 GB set-up); with it, the prompts go through the
//! checkpoint's tokenizer and T5 on the device (T5 included). Peak device memory is measured from
//! outside (nvidia-smi) by the script, for candle and PyTorch alike.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Parser, Subcommand};
use pixart::pipeline::{
    Control, ControlInput, ModelSource, Pipeline, PipelineOptions, RenderItem, RenderRequest,
    device_from_str, dtype_from_str,
};
use pixart::transformer::{PixArtTransformer, conformance};

#[derive(Parser, Debug)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// One transformer forward on the conformance inputs, repeated to `--batch` rows.
    Transformer(TransformerArgs),
    /// The whole render: (T5) + LCM steps + VAE decode of every image.
    Render(RenderArgs),
}

#[derive(Args, Debug)]
struct Common {
    #[arg(long, default_value = "cuda")]
    device: String,
    #[arg(long, default_value = "bf16")]
    dtype: String,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed runs after one warm-up.
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

#[derive(Args, Debug)]
struct TransformerArgs {
    #[command(flatten)]
    common: Common,
    /// diffusers `transformer/` directory.
    #[arg(long)]
    dir: PathBuf,
    /// Conformance inputs with batch 1 (`hidden_states`, `timestep`, ...).
    #[arg(long)]
    inputs: PathBuf,
    /// Write the f32 `sample` of the first run here (batch as run).
    #[arg(long)]
    out: Option<PathBuf>,
    /// ControlNet adapter directory: time the controlled forward (needs `controlnet_cond` in the inputs,
    /// or uses the latents themselves as the control latents).
    #[arg(long)]
    controlnet: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct RenderArgs {
    #[command(flatten)]
    common: Common,
    /// A diffusers-layout model directory (`model_index.json`, `transformer/`, `vae/`, ...).
    #[arg(long)]
    model: PathBuf,
    /// Square image side in pixels.
    #[arg(long, default_value_t = 1024)]
    size: u32,
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// Encode the prompts with the checkpoint's T5 on the device (else random text features).
    #[arg(long)]
    text_encoder: bool,
    /// ControlNet adapter directory: every item gets an edge map at scale 1.
    #[arg(long)]
    controlnet: Option<PathBuf>,
}

fn main() -> Result<()> {
    match Cli::parse().mode {
        Mode::Transformer(a) => transformer(&a),
        Mode::Render(a) => render(&a),
    }
}

fn place(c: &Common) -> Result<(Device, DType)> {
    let device = device_from_str(&c.device).context("--device")?;
    let dtype = dtype_from_str(&c.dtype).context("--dtype")?;
    if device.is_cpu() && dtype != DType::F32 {
        bail!("--dtype {} needs --device cuda", c.dtype);
    }
    Ok((device, dtype))
}

/// Minimum and median of the timed runs, seconds.
fn stats(times: &[f64]) -> (f64, f64) {
    let mut s = times.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => (f64::NAN, f64::NAN),
        n => (s[0], s[n / 2]),
    }
}

/// Repeats every batch-1 float input along dim 0; integer/other tensors likewise.
fn batched(inputs: &HashMap<String, Tensor>, b: usize) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (k, v) in inputs {
        let v = if v.dims().first() == Some(&1) && b > 1 {
            Tensor::cat(&vec![v.clone(); b], 0)?
        } else {
            v.clone()
        };
        out.insert(k.clone(), v);
    }
    Ok(out)
}

fn transformer(a: &TransformerArgs) -> Result<()> {
    let (dev, dtype) = place(&a.common)?;
    let t_load = Instant::now();
    let model = PixArtTransformer::load(&a.dir, dtype, &dev)?;
    let adapter = a
        .controlnet
        .as_ref()
        .map(|d| pixart::controlnet::ControlNetAdapter::load(d, &model.config, dtype, &dev))
        .transpose()?;
    let load_s = t_load.elapsed().as_secs_f64();
    let mut inputs = candle_core::safetensors::load(&a.inputs, &dev)
        .with_context(|| format!("reading {}", a.inputs.display()))?;
    if adapter.is_some() && !inputs.contains_key("controlnet_cond") {
        let x = inputs["hidden_states"].clone();
        inputs.insert("controlnet_cond".into(), x);
    }
    let inputs = batched(&inputs, a.common.batch)?;
    let forward = || -> Result<Tensor> {
        let out = match &adapter {
            Some(ad) => pixart::controlnet::conformance::forward_named(&model, ad, &inputs)?,
            None => conformance::forward_named(&model, &inputs)?,
        };
        dev.synchronize()?;
        Ok(out)
    };
    let first = forward()?; // warm-up (kernel loading, cuBLAS handles)
    let mut times = Vec::new();
    for _ in 0..a.common.runs {
        let t = Instant::now();
        forward()?;
        times.push(t.elapsed().as_secs_f64());
    }
    if let Some(out) = &a.out {
        let sample = first
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .contiguous()?;
        candle_core::safetensors::save(&HashMap::from([("sample".to_string(), sample)]), out)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    let (min, median) = stats(&times);
    println!(
        "{}",
        serde_json::json!({
            "impl": "candle", "what": "transformer", "device": a.common.device,
            "dtype": a.common.dtype, "batch": a.common.batch,
            "latent": inputs["hidden_states"].dims()[2],
            "controlnet": adapter.as_ref().map(|ad| ad.num_layers()),
            "params": model.num_parameters(), "load_s": load_s,
            "runs": times.len(), "min_s": min, "median_s": median, "times_s": times,
        })
    );
    Ok(())
}

/// A white square outline on black: a plausible edge map at the generation size.
fn edge_map(side: u32) -> image::RgbImage {
    let (lo, hi) = (side / 4, 3 * side / 4);
    image::RgbImage::from_fn(side, side, |x, y| {
        let on = (x == lo || x == hi) && (lo..=hi).contains(&y)
            || (y == lo || y == hi) && (lo..=hi).contains(&x);
        image::Rgb(if on { [255; 3] } else { [0; 3] })
    })
}

fn render(a: &RenderArgs) -> Result<()> {
    let (dev, dtype) = place(&a.common)?;
    let t_load = Instant::now();
    let mut pipe = Pipeline::load(
        &ModelSource::Dir(a.model.clone()),
        PipelineOptions {
            device: dev.clone(),
            dtype,
            // Without --text-encoder T5 is never loaded; with it, it stays resident (as a worker runs it).
            offload_text_encoder: !a.text_encoder,
            controlnet: a.controlnet.clone(),
            ..PipelineOptions::default()
        },
    )?;
    let load_s = t_load.elapsed().as_secs_f64();
    let (gen_w, gen_h) = pipe.generation_size(a.size, a.size);
    let items: Vec<RenderItem> = (0..a.common.batch)
        .map(|i| RenderItem {
            prompt: format!("a small red circle in the top left corner on a blue background {i}"),
            seed: i as u64,
            control: a.controlnet.as_ref().map(|_| ControlInput {
                edge_map: edge_map(gen_w.min(gen_h)),
                scale: 1.0,
            }),
        })
        .collect();
    let caption = pipe.transformer().config.caption_channels;
    let f = pipe.vae().config().scale_factor() as u32;
    let (lh, lw) = ((gen_h / f) as usize, (gen_w / f) as usize);
    let b = a.common.batch;

    // One run; returns (total, text, denoise, decode) seconds.
    let run = |pipe: &mut Pipeline| -> Result<[f64; 4]> {
        let t0 = Instant::now();
        if a.text_encoder {
            let req = RenderRequest {
                width: a.size,
                height: a.size,
                steps: a.steps,
                items: items.clone(),
            };
            let prompts: Vec<&str> = req.items.iter().map(|i| i.prompt.as_str()).collect();
            let ids = pipe.tokenize(&prompts)?;
            let t = Instant::now();
            pipe.encode_ids(&ids)?;
            dev.synchronize()?;
            let text = t.elapsed().as_secs_f64();
            // The whole render again through the product's entry point (T5 included), for the total.
            let t = Instant::now();
            let out = pipe.render(&req, &mut |_| Control::Continue)?;
            anyhow::ensure!(out.len() == b, "rendered {} of {b} images", out.len());
            return Ok([t.elapsed().as_secs_f64(), text, f64::NAN, f64::NAN]);
        }
        let y = Tensor::randn(0f32, 1.0, (b, 120, caption), &dev)?;
        let mask = Tensor::ones((b, 120), DType::F32, &dev)?;
        let seeds: Vec<u64> = items.iter().map(|i| i.seed).collect();
        let (latents, _) = pipe.initial_latents(&seeds, lh, lw)?;
        let control = pipe.control_latents(&items, lh, lw)?;
        dev.synchronize()?;
        let t = Instant::now();
        let noise_shape = latents.dims().to_vec();
        let mut noise = |_i: usize| -> pixart::Result<Tensor> {
            Ok(Tensor::randn(0f32, 1.0, noise_shape.as_slice(), &dev)?)
        };
        let z = pipe.denoise_controlled(
            &latents,
            &y,
            &mask,
            control.as_ref().map(|(z, s)| (z, s.as_slice())),
            a.steps,
            gen_w,
            gen_h,
            &mut noise,
            &mut |_| Control::Continue,
        )?;
        dev.synchronize()?;
        let denoise = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let images = pipe.decode(&z, a.size, a.size)?; // copies to the host: synchronous
        let decode = t.elapsed().as_secs_f64();
        anyhow::ensure!(images.len() == b, "decoded {} of {b} images", images.len());
        Ok([t0.elapsed().as_secs_f64(), f64::NAN, denoise, decode])
    };
    run(&mut pipe)?; // warm-up
    let mut rows = Vec::new();
    for _ in 0..a.common.runs {
        rows.push(run(&mut pipe)?);
    }
    let col = |i: usize| -> Vec<f64> { rows.iter().map(|r| r[i]).collect() };
    let (min, median) = stats(&col(0));
    let med = |i: usize| stats(&col(i)).1;
    println!(
        "{}",
        serde_json::json!({
            "impl": "candle", "what": "render", "device": a.common.device,
            "dtype": a.common.dtype, "batch": b, "size": a.size, "steps": a.steps,
            "text_encoder": a.text_encoder, "controlnet": a.controlnet.is_some(),
            "load_s": load_s, "runs": rows.len(), "min_s": min, "median_s": median,
            "images_per_s": b as f64 / median,
            "median_text_s": med(1), "median_denoise_s": med(2), "median_decode_s": med(3),
            "times_s": col(0),
        })
    );
    Ok(())
}
