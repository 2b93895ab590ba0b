//! `pixfarm generate`: one image on this machine, no farm involved.

use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use pixart::pipeline::{
    Control, ModelSource, Pipeline, PipelineOptions, RenderItem, RenderRequest, StepProgress,
    TimestepSpacing,
};
use pixfarm_worker::WorkerConfig;

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Model directory in the diffusers layout.
    #[arg(
        long,
        env = "PIXFARM_MODEL_DIR",
        default_value = "models/tiny-pixart-lcm"
    )]
    pub model: PathBuf,
    #[arg(long)]
    pub prompt: String,
    /// Noise seed; the same seed, prompt and settings give the same image.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image size as WxH.
    #[arg(long, default_value = "1024x1024", value_parser = crate::input::parse_size)]
    pub size: (u32, u32),
    /// LCM steps (1-8).
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
    /// `cpu`, `cuda`, `cuda:N` or `metal`.
    #[arg(long, env = "PIXFARM_DEVICE", default_value = "cpu")]
    pub device: String,
    /// `auto`, `f32`, `f16` or `bf16`.
    #[arg(long, env = "PIXFARM_DTYPE", default_value = "auto")]
    pub dtype: String,
    /// Output PNG.
    #[arg(short, long, default_value = "out.png")]
    pub output: PathBuf,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    // Device and dtype parsing is the worker's, so both accept the same values.
    let wc = WorkerConfig {
        device: args.device.clone(),
        dtype: args.dtype.clone(),
        ..WorkerConfig::default()
    };
    let spec = wc.parse_device().map_err(|e| anyhow::anyhow!("{e}"))?;
    let device = spec
        .open()
        .with_context(|| format!("cannot open device {}", spec.describe()))?;
    let dtype = wc
        .parse_dtype()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .unwrap_or(if device.is_cpu() {
            candle_core::DType::F32
        } else {
            candle_core::DType::BF16
        });
    let loading =
        ProgressBar::new_spinner().with_message(format!("loading {}", args.model.display()));
    loading.enable_steady_tick(std::time::Duration::from_millis(100));
    let mut pipeline = Pipeline::load(
        &ModelSource::Dir(args.model.clone()),
        PipelineOptions {
            device,
            dtype,
            offload_text_encoder: false,
            timestep_spacing: TimestepSpacing::default(),
            controlnet: None,
        },
    )
    .with_context(|| format!("cannot load the model from {}", args.model.display()))?;
    loading.finish_and_clear();

    let request = RenderRequest {
        width: args.size.0,
        height: args.size.1,
        steps: args.steps,
        items: vec![RenderItem {
            prompt: args.prompt.clone(),
            seed: args.seed,
            control: None,
        }],
    };
    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("[{elapsed_precise}] {bar:30} step {pos}/{len}  ETA {eta}")
            .expect("valid template"),
    );
    let mut on_step = |p: StepProgress| {
        bar.set_length(p.total as u64);
        bar.set_position(p.step as u64);
        Control::Continue
    };
    let outputs = pipeline
        .render(&request, &mut on_step)
        .context("rendering failed")?;
    bar.finish_and_clear();
    let image = &outputs
        .first()
        .context("the pipeline returned no image")?
        .image;
    image
        .save(&args.output)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    println!(
        "wrote {} ({}x{}, seed {}, {} steps)",
        args.output.display(),
        image.width(),
        image.height(),
        args.seed,
        args.steps
    );
    Ok(())
}
