//! Control-image preprocessing on the CPU: time resize + centre crop, Canny and HED at a given
//! size (figures for BENCHMARKS.md, "Control image preprocessing"), or write the edge maps of one
//! image to look at.
//!
//! ```text
//! # timing: a synthetic 1536×1152 photo-like image fitted to 1024×1024; HED with random weights
//! # at the released network's widths unless --hed points at ControlNetHED.pth
//! cargo run --release -p pixart --example edges -- --size 1024 --runs 5
//! # one image: writes canny.png and hed.png
//! cargo run --release -p pixart --example edges -- --input photo.png --hed ControlNetHED.pth --out out/
//! ```
//! The reference timings (OpenCV, PyTorch) come from `pixart/examples/edges_reference.py` with
//! the same sizes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use image::{DynamicImage, RgbImage};
use pixart::control::{self, DEFAULT_CANNY_HIGH, DEFAULT_CANNY_LOW, Hed};

#[derive(Parser, Debug)]
struct Args {
    /// Output side in pixels (square).
    #[arg(long, default_value_t = 1024)]
    size: u32,
    /// Timed runs per operation (after one warm-up).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// HED weights (.pth or .safetensors); random weights at the real widths otherwise.
    #[arg(long)]
    hed: Option<PathBuf>,
    /// Process this image once and write canny.png / hed.png to --out instead of timing.
    #[arg(long)]
    input: Option<PathBuf>,
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// Skip HED (it dominates the run time on a small CPU).
    #[arg(long)]
    no_hed: bool,
}

/// The released network's shape (`ControlNetHED_Apache2`) with random weights: the timing does
/// not depend on the values.
fn random_real_hed() -> Result<Hed> {
    let dev = Device::Cpu;
    let mut t = HashMap::new();
    t.insert(
        "norm".to_string(),
        Tensor::zeros((1, 3, 1, 1), DType::F32, &dev)?,
    );
    let mut cin = 3;
    for (n, (cout, layers)) in [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]
        .into_iter()
        .enumerate()
    {
        for i in 0..layers {
            let std = (2.0 / (cin * 9) as f64).sqrt();
            let w = (Tensor::randn(0f32, 1f32, (cout, cin, 3, 3), &dev)? * std)?;
            t.insert(format!("block{}.convs.{i}.weight", n + 1), w);
            t.insert(
                format!("block{}.convs.{i}.bias", n + 1),
                Tensor::zeros(cout, DType::F32, &dev)?,
            );
            cin = cout;
        }
        t.insert(
            format!("block{}.projection.weight", n + 1),
            (Tensor::randn(0f32, 1f32, (1, cout, 1, 1), &dev)? * 0.01)?,
        );
        t.insert(
            format!("block{}.projection.bias", n + 1),
            Tensor::zeros(1, DType::F32, &dev)?,
        );
    }
    Ok(Hed::from_tensors(t, "random-real-width".as_ref())?)
}

/// A deterministic photo-like test image: gradients, a disc, stripes.
fn synthetic(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
        let d = ((fx - 0.4).powi(2) + (fy - 0.5).powi(2)).sqrt();
        let disc = if d < 0.25 { 120.0 } else { 0.0 };
        let stripes = if (x / 37 + y / 53) % 2 == 0 {
            40.0
        } else {
            0.0
        };
        image::Rgb([
            (60.0 + 120.0 * fx + disc) as u8,
            (30.0 + 150.0 * fy + stripes) as u8,
            (200.0 - 100.0 * fx * fy + disc / 2.0) as u8,
        ])
    })
}

fn time<T>(label: &str, runs: usize, mut f: impl FnMut() -> Result<T>) -> Result<()> {
    std::hint::black_box(f()?);
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        std::hint::black_box(f()?);
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    println!(
        "{label:<28} min {:9.2} ms  median {:9.2} ms  ({runs} runs)",
        ms[0],
        ms[ms.len() / 2]
    );
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let hed = if args.no_hed {
        None
    } else if let Some(p) = &args.hed {
        Some(Hed::load(p, &Device::Cpu)?)
    } else {
        Some(random_real_hed()?)
    };
    let s = args.size;

    if let Some(input) = &args.input {
        let img = image::open(input).with_context(|| input.display().to_string())?;
        control::check_control_image_size(img.width(), img.height())?;
        let fitted = control::resize_center_crop(&img, s, s);
        std::fs::create_dir_all(&args.out)?;
        control::canny(&fitted, DEFAULT_CANNY_LOW, DEFAULT_CANNY_HIGH)?
            .save(args.out.join("canny.png"))?;
        if let Some(hed) = &hed {
            hed.detect(&fitted)?.save(args.out.join("hed.png"))?;
        }
        println!("wrote {}", args.out.display());
        return Ok(());
    }

    let src = DynamicImage::ImageRgb8(synthetic(s * 3 / 2, s * 9 / 8));
    let fitted = control::resize_center_crop(&src, s, s);
    println!(
        "control preprocessing, CPU, {s}×{s} output, {} rayon threads",
        rayon_threads()
    );
    time(
        &format!("resize_center_crop {}→{s}", s * 3 / 2),
        args.runs,
        || Ok(control::resize_center_crop(&src, s, s)),
    )?;
    time("canny (gray + edges)", args.runs, || {
        Ok(control::canny(
            &fitted,
            DEFAULT_CANNY_LOW,
            DEFAULT_CANNY_HIGH,
        )?)
    })?;
    if let Some(hed) = &hed {
        time("hed detect_f32", args.runs, || Ok(hed.detect_f32(&fitted)?))?;
    }
    Ok(())
}

fn rayon_threads() -> String {
    std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| {
        std::thread::available_parallelism()
            .map(|n| n.get().to_string())
            .unwrap_or_else(|_| "?".into())
    })
}
