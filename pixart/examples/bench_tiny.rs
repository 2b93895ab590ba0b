//! Images per second of the bundled tiny checkpoint, end to end (tokenize, T5, 4 LCM steps, VAE
//! decode, PNG encode), at 256×256, batch 1 and batch 8, on the CPU. Figures go to BENCHMARKS.md
//! ("tiny checkpoint end to end").
//!
//! ```text
//! cargo run --release -p pixart --example bench_tiny [-- --iters 20 --size 256]
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use pixart::pipeline::{
    Control, ModelSource, Pipeline, PipelineOptions, RenderItem, RenderRequest,
};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 10)]
    iters: usize,
    #[arg(long, default_value_t = 256)]
    size: u32,
    #[arg(long, default_value_t = 4)]
    steps: usize,
    #[arg(long)]
    model: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dir = args.model.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-pixart-lcm")
    });
    let mut pipe = Pipeline::load(&ModelSource::Dir(dir), PipelineOptions::default())?;
    println!(
        "tiny checkpoint end to end, {0}x{0}, {1} steps, CPU f32",
        args.size, args.steps
    );
    for batch in [1usize, 8] {
        let req = RenderRequest {
            width: args.size,
            height: args.size,
            steps: args.steps,
            items: (0..batch)
                .map(|i| RenderItem {
                    prompt: format!("a red fox number {i} in the snow"),
                    seed: i as u64,
                    control: None,
                })
                .collect(),
        };
        pipe.render(&req, &mut |_| Control::Continue)?; // warm-up
        let mut times = Vec::with_capacity(args.iters);
        for _ in 0..args.iters {
            let t = Instant::now();
            let out = pipe.render(&req, &mut |_| Control::Continue)?;
            for o in &out {
                std::hint::black_box(pixart::image_ops::encode_png(&o.image)?);
            }
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "batch {batch}: median {:.1} ms per batch (min {:.1} ms) -> {:.1} images/s",
            median * 1e3,
            times[0] * 1e3,
            batch as f64 / median
        );
    }
    // Where the time of one batch-1 image goes.
    let t = Instant::now();
    let ids = pipe.tokenize(&["a red fox in the snow"])?;
    let (y, mask) = pipe.encode_ids(&ids)?;
    let t_text = t.elapsed();
    let f = pipe.vae().config().scale_factor();
    let lat = (args.size as usize) / f;
    let (latents, mut streams) = pipe.initial_latents(&[0], lat, lat)?;
    let t = Instant::now();
    let mut noise = |_i: usize| -> pixart::Result<candle_core::Tensor> {
        Ok(streams[0]
            .next_tensor(&[4, lat, lat], &candle_core::Device::Cpu)?
            .unsqueeze(0)?)
    };
    let x = pipe.denoise(
        &latents,
        &y,
        &mask,
        args.steps,
        args.size,
        args.size,
        &mut noise,
        &mut |_| Control::Continue,
    )?;
    let t_denoise = t.elapsed();
    let t = Instant::now();
    let img = pipe.decode(&x, args.size, args.size)?;
    let t_decode = t.elapsed();
    let t = Instant::now();
    std::hint::black_box(pixart::image_ops::encode_png(&img[0])?);
    let t_png = t.elapsed();
    println!(
        "batch 1 breakdown: text {t_text:.2?}, {} LCM steps {t_denoise:.2?}, VAE decode {t_decode:.2?}, PNG {t_png:.2?}",
        args.steps
    );
    Ok(())
}
