//! One-shot local text-to-image with PixArt-LCM (what `pixfarm generate` will call).
//!
//! ```text
//! cargo run --release -p pixart --example generate -- --model models/tiny-pixart-lcm \
//!     --prompt "a red fox in the snow" --seed 7 --size 1024x1024 [--steps 4] [--device cpu] -o out.png
//! cargo run --release -p pixart --example generate -- --hub PixArt-alpha/PixArt-LCM-XL-2-1024-MS ...
//! ```
//!
//! With several `--seed` values (or `--count N`) the images render as one batch and are written
//! as `out-0.png`, `out-1.png`, ….

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use pixart::pipeline::{
    Control, ModelSource, Pipeline, PipelineOptions, RenderItem, RenderRequest, TimestepSpacing,
    device_from_str, dtype_from_str,
};

#[derive(Parser, Debug)]
#[command(about = "Render images with PixArt-LCM on this machine")]
struct Args {
    /// A diffusers-layout model directory.
    #[arg(long, conflicts_with = "hub")]
    model: Option<PathBuf>,
    /// A Hugging Face hub model id (uses the local hub cache; downloads when online).
    #[arg(long)]
    hub: Option<String>,
    #[arg(long)]
    prompt: String,
    /// One or more seeds (comma-separated); each gives one image.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    seed: Vec<u64>,
    /// Render this many images with seeds seed, seed+1, … (overrides a seed list).
    #[arg(long)]
    count: Option<usize>,
    /// WIDTHxHEIGHT in pixels (multiples of 16).
    #[arg(long, default_value = "1024x1024")]
    size: String,
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Transformer dtype: f32 (CPU), f16 or bf16 (GPU).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Free T5 after encoding (lets a 1024 px render fit a small GPU).
    #[arg(long)]
    offload_text_encoder: bool,
    /// Use the original PixArt repository's LCM timestep selection.
    #[arg(long)]
    original_timesteps: bool,
    #[arg(short = 'o', long, default_value = "out.png")]
    output: PathBuf,
}

fn parse_size(s: &str) -> Result<(u32, u32)> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .context("--size must look like 1024x768")?;
    Ok((
        w.trim().parse().context("--size width")?,
        h.trim().parse().context("--size height")?,
    ))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let source = match (&args.model, &args.hub) {
        (Some(dir), None) => ModelSource::Dir(dir.clone()),
        (None, Some(id)) => ModelSource::Hub {
            model_id: id.clone(),
            revision: None,
        },
        (None, None) => ModelSource::Hub {
            model_id: pixart::loading::DEFAULT_MODEL_ID.into(),
            revision: None,
        },
        (Some(_), Some(_)) => bail!("give either --model or --hub"),
    };
    let (width, height) = parse_size(&args.size)?;
    let seeds: Vec<u64> = match args.count {
        Some(n) => (0..n as u64).map(|i| args.seed[0] + i).collect(),
        None => args.seed.clone(),
    };
    let opts = PipelineOptions {
        device: device_from_str(&args.device)?,
        dtype: dtype_from_str(&args.dtype)?,
        offload_text_encoder: args.offload_text_encoder,
        timestep_spacing: if args.original_timesteps {
            TimestepSpacing::Original
        } else {
            TimestepSpacing::Diffusers
        },
        controlnet: None,
    };
    let t0 = Instant::now();
    let mut pipe = Pipeline::load(&source, opts)?;
    eprintln!(
        "loaded {} in {:.2?}",
        pipe.paths().root.display(),
        t0.elapsed()
    );
    let req = RenderRequest {
        width,
        height,
        steps: args.steps,
        items: seeds
            .iter()
            .map(|&seed| RenderItem {
                prompt: args.prompt.clone(),
                seed,
                control: None,
            })
            .collect(),
    };
    pipe.validate(&req)?;
    let (gw, gh) = pipe.generation_size(width, height);
    if (gw, gh) != (width, height) {
        eprintln!("rendering at the aspect-ratio bin {gw}x{gh}, then resizing to {width}x{height}");
    }
    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {elapsed_precise}")?
            .progress_chars("=> "),
    );
    let t1 = Instant::now();
    let outputs = pipe.render(&req, &mut |p| {
        bar.set_position(p.step as u64);
        Control::Continue
    })?;
    bar.finish();
    let elapsed = t1.elapsed();
    for (i, out) in outputs.iter().enumerate() {
        let path = if outputs.len() == 1 {
            args.output.clone()
        } else {
            let stem = args
                .output
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("out");
            args.output.with_file_name(format!("{stem}-{i}.png"))
        };
        std::fs::write(&path, pixart::image_ops::encode_png(&out.image)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {} (seed {})", path.display(), seeds[i]);
    }
    eprintln!(
        "{} image(s) in {:.2?} ({:.2?} per image)",
        outputs.len(),
        elapsed,
        elapsed / outputs.len() as u32
    );
    Ok(())
}
