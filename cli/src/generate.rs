//! `pixfarm generate`: one image on this machine, no farm involved.

use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use pixart::pipeline::{
    Control, ControlInput, ModelSource, Pipeline, PipelineOptions, RenderItem, RenderRequest,
    StepProgress, TimestepSpacing,
};
use pixfarm_worker::WorkerConfig;

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Model directory in the diffusers layout (default: the bundled shapes model).
    #[arg(
        long,
        env = "PIXFARM_MODEL_DIR",
        default_value = "models/pixart-lcm-shapes"
    )]
    pub model: PathBuf,
    #[arg(long)]
    pub prompt: String,
    /// Noise seed; the same seed, prompt and settings give the same image.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image size as WxH (the bundled model was trained at 64×64; the real PixArt-LCM at 1024×1024).
    #[arg(long, default_value = "64x64", value_parser = crate::input::parse_size)]
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
    /// Control image that guides the render (needs `--controlnet-dir`).
    #[arg(long, requires = "controlnet_dir")]
    pub control_image: Option<PathBuf>,
    /// How the control image becomes an edge map: `edge` (it is one), `canny` or `hed`.
    #[arg(long, default_value = "edge")]
    pub control_kind: pixfarm_core::ControlKind,
    /// ControlNet conditioning scale (0-2).
    #[arg(long, default_value_t = 1.0)]
    pub control_scale: f32,
    /// Canny thresholds (kind `canny`).
    #[arg(long, default_value_t = pixart::control::DEFAULT_CANNY_LOW)]
    pub canny_low: f32,
    #[arg(long, default_value_t = pixart::control::DEFAULT_CANNY_HIGH)]
    pub canny_high: f32,
    /// ControlNet-Transformer adapter directory (diffusers-community layout).
    #[arg(long, env = "PIXFARM_CONTROLNET_DIR")]
    pub controlnet_dir: Option<PathBuf>,
    /// HED weights (kind `hed`).
    #[arg(long, env = "PIXFARM_HED_WEIGHTS")]
    pub hed_weights: Option<PathBuf>,
    /// Also write the edge map that guided the render here.
    #[arg(long)]
    pub edge_map_output: Option<PathBuf>,
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
        .map_err(|e| anyhow::anyhow!("cannot open device {}: {e}", spec.describe()))?;
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
    let hed_device = device.clone();
    let mut pipeline = Pipeline::load(
        &ModelSource::Dir(args.model.clone()),
        PipelineOptions {
            device,
            dtype,
            offload_text_encoder: false,
            timestep_spacing: TimestepSpacing::default(),
            controlnet: args.controlnet_dir.clone(),
        },
    )
    .with_context(|| format!("cannot load the model from {}", args.model.display()))?;
    loading.finish_and_clear();

    let control = match &args.control_image {
        None => None,
        Some(path) => {
            let edge_map = edge_map(&args, &pipeline, path, &hed_device)?;
            if let Some(out) = &args.edge_map_output {
                edge_map
                    .save(out)
                    .with_context(|| format!("cannot write {}", out.display()))?;
            }
            Some(ControlInput {
                edge_map,
                scale: args.control_scale,
            })
        }
    };

    let request = RenderRequest {
        width: args.size.0,
        height: args.size.1,
        steps: args.steps,
        items: vec![RenderItem {
            prompt: args.prompt.clone(),
            seed: args.seed,
            control,
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

/// The edge map for `--control-image`, made by the worker's own code (fit to the generation size,
/// then the chosen detector), so a local render is guided exactly as a farm render.
fn edge_map(
    args: &GenerateArgs,
    pipeline: &Pipeline,
    path: &std::path::Path,
    device: &candle_core::Device,
) -> anyhow::Result<image::RgbImage> {
    let img = image::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let hed = match args.control_kind {
        pixfarm_core::ControlKind::Hed => {
            let weights = args
                .hed_weights
                .as_deref()
                .context("--control-kind hed needs --hed-weights FILE")?;
            Some(pixart::control::Hed::load(weights, device)?)
        }
        _ => None,
    };
    let job = pixfarm_worker::engine::EdgeJob {
        image: img,
        kind: args.control_kind,
        low_threshold: Some(args.canny_low),
        high_threshold: Some(args.canny_high),
        width: args.size.0,
        height: args.size.1,
    };
    pixfarm_worker::engine::edge_map(pipeline, hed.as_ref(), job)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.reason))
}
