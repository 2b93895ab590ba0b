//! The text-to-image pipeline: prompts in, images out.
//!
//! API CONTRACT: the types in this file up to [`RenderOutput`] were fixed early so the worker could
//! build against them; they only gain fields with defaults and methods.
//!
//! [`Pipeline::render`] runs PixArt-LCM with guidance off, as diffusers' `PixArtAlphaPipeline` does
//! with an `LCMScheduler`:
//!
//! 1. validate the request ([`Pipeline::validate`]: sizes a multiple of 16 px and at most
//!    [`MAX_SIDE`], steps 1..=8, non-empty prompts — each error names the field);
//! 2. pick the generation size: the nearest aspect-ratio bin when the model has a table
//!    (`sample_size` 128/64/32, see [`crate::image_ops`]), else the requested size;
//! 3. tokenize and T5-encode every prompt (padded to 120 with a mask; T5 optionally freed after);
//! 4. draw each item's initial latents and injected noise from *its own* seed on the CPU
//!    ([`SeededNoise`]), so an image depends only on (prompt, seed, size, steps) — never on its batch
//!    neighbours or the device;
//! 5. run the LCM loop, one batched transformer forward per step, micro-conditions (resolution and
//!    aspect ratio of the binned size, in pixels) only when the model uses them;
//! 6. VAE-decode item by item (bounded memory) in f32, resize + centre-crop back to the request.
//!
//! ControlNet (PixArt-δ, [`crate::controlnet`]): with `PipelineOptions::controlnet` set, items may carry a
//! [`ControlInput`] — an edge map already at the generation size and a scale in `[0, 2]`. The edge map is
//! normalised to `[−1, 1]` (3 channels) and VAE-encoded to the posterior mean × scaling factor once per render;
//! every LCM step then runs the adapter. A batch may mix controlled and uncontrolled items: uncontrolled rows get
//! a zero control latent and scale 0, which leaves their base stream bit-for-bit unchanged (so an uncontrolled
//! image does not depend on its controlled neighbours).
//!
//! ```no_run
//! use pixart::pipeline::*;
//! # fn main() -> pixart::Result<()> {
//! let mut pipe = Pipeline::load(&ModelSource::Dir("models/tiny-pixart-lcm".into()), PipelineOptions::default())?;
//! let req = RenderRequest {
//!     width: 64, height: 64, steps: 4,
//!     items: vec![RenderItem { prompt: "a red fox in the snow".into(), seed: 7, control: None }],
//! };
//! let images = pipe.render(&req, &mut |_p| Control::Continue)?;
//! std::fs::write("fox.png", pixart::image_ops::encode_png(&images[0].image)?).unwrap();
//! # Ok(()) }
//! ```

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use crate::controlnet::{ControlCondition, ControlNetAdapter};
use crate::image_ops::{
    AspectRatioTable, classify_height_width_bin, image_to_tensor, resize_and_crop_tensor,
    tensor_to_images,
};
use crate::loading::{ModelPaths, resolve};
use crate::scheduler::{LcmScheduler, LcmSchedulerConfig, SeededNoise};
use crate::text_encoder::{MAX_SEQUENCE_LENGTH, T5Tokenizer, TextEncoder};
use crate::transformer::PixArtTransformer;
use crate::vae::Vae;
use crate::{Error, Result};

/// Which LCM timestep selection to use (see `scheduler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimestepSpacing {
    /// diffusers >= 0.24 (`floor(linspace(0, 50, n, endpoint=false))` over the reversed 50-step grid).
    #[default]
    Diffusers,
    /// The original PixArt repository (every `50 / n`-th entry of the reversed grid).
    Original,
}

/// Where the weights come from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A local directory in the diffusers layout (`model_index.json`, `transformer/`, ...).
    Dir(PathBuf),
    /// A Hugging Face hub model id, resolved through the local hub cache (and the network when there is one).
    Hub {
        model_id: String,
        revision: Option<String>,
    },
}

/// How the pipeline is placed and run.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub device: candle_core::Device,
    /// Dtype of the transformer (f32 on CPU; f16/bf16 on GPU). T5 and the VAE choose their own safe dtypes.
    pub dtype: candle_core::DType,
    /// Drop the T5 encoder from device memory after each encode (re-loaded on demand).
    pub offload_text_encoder: bool,
    pub timestep_spacing: TimestepSpacing,
    /// A ControlNet-Transformer adapter directory (diffusers-community layout: `config.json` with
    /// `num_layers` + `diffusion_pytorch_model.safetensors`), loaded with the transformer's dtype.
    pub controlnet: Option<PathBuf>,
}

/// One image to render: a prompt and the seed that fixes its noise.
#[derive(Debug, Clone)]
pub struct RenderItem {
    pub prompt: String,
    pub seed: u64,
    /// Edge-map guidance; needs a pipeline loaded with a ControlNet adapter.
    pub control: Option<ControlInput>,
}

/// The control image of one item.
#[derive(Debug, Clone)]
pub struct ControlInput {
    /// The edge map (white edges on black, as HED/Canny produce), already at the generation size
    /// ([`Pipeline::generation_size`]); `crate::control` resizes and centre-crops user images to it.
    pub edge_map: image::RgbImage,
    /// `conditioning_scale`, in `[0, MAX_CONTROL_SCALE]`: multiplies every adapter output (0 = no control).
    pub scale: f32,
}

/// A batch of images that share size and step count, rendered as one batched forward per step.
#[derive(Debug, Clone)]
pub struct RenderRequest {
    pub width: u32,
    pub height: u32,
    /// LCM steps, 1..=8.
    pub steps: usize,
    pub items: Vec<RenderItem>,
}

/// Reported after every denoising step.
#[derive(Debug, Clone, Copy)]
pub struct StepProgress {
    pub step: usize,
    pub total: usize,
}

/// What the caller wants after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Stop the batch: `render` returns `Error::Cancelled`.
    Cancel,
}

/// One rendered image, in request order, at exactly the requested width and height.
#[derive(Debug, Clone)]
pub struct RenderOutput {
    pub image: image::RgbImage,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            offload_text_encoder: false,
            timestep_spacing: TimestepSpacing::Diffusers,
            controlnet: None,
        }
    }
}

/// Largest accepted `conditioning_scale`. Beyond 2 the adapter's residuals dominate the base stream and images
/// fall apart; the issue and the farm's validation use the same bound.
pub const MAX_CONTROL_SCALE: f32 = 2.0;

/// Largest width or height accepted (px). 4096 px is a 512×512 latent, 65,536 image tokens: far
/// outside what PixArt was trained on and already at the edge of one GPU's memory.
pub const MAX_SIDE: u32 = 4096;
/// Most LCM steps accepted (the PixArt-LCM model card recommends 4; 1–8 are meaningful).
pub const MAX_STEPS: usize = 8;

/// Parses `cpu`, `cuda` or `cuda:N` (CUDA needs the `cuda` feature) and opens the device. A CUDA
/// device is checked at once (driver present, compute capability the kernels were built for), so a
/// worker on the wrong machine fails at start-up with the cause, not at its first batch.
pub fn device_from_str(s: &str) -> Result<Device> {
    let bad = |m: String| Error::InvalidInput {
        field: "device",
        message: m,
    };
    match s.trim() {
        "cpu" => Ok(Device::Cpu),
        "cuda" => crate::cuda::open(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => crate::cuda::open(n),
            _ => Err(bad(format!(
                "expected `cpu`, `cuda` or `cuda:N`, got `{other}`"
            ))),
        },
    }
}

/// Parses `f32`, `f16` or `bf16`.
pub fn dtype_from_str(s: &str) -> Result<DType> {
    match s.trim() {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(Error::InvalidInput {
            field: "dtype",
            message: format!("expected f32, f16 or bf16, got `{other}`"),
        }),
    }
}

/// The PixArt-LCM loop with guidance off, shared by [`Pipeline`] and the conformance harness.
///
/// * `latents` (B, C, h, w) f32: the initial noise;
/// * `y` (B, L, caption_channels), `mask` (B, L): text features and their mask;
/// * `res_ar`: `(resolution (B, 2), aspect_ratio (B, 1))` for micro-condition models;
/// * `noise(i)`: the (B, C, h, w) noise injected after step `i` (called for `i < steps − 1`);
/// * `on_step`: called after every step; [`Control::Cancel`] stops with [`Error::Cancelled`].
///
/// Returns the final latents (f32, before VAE scaling).
#[allow(clippy::too_many_arguments)]
pub fn sample_lcm(
    transformer: &PixArtTransformer,
    scheduler: &LcmScheduler,
    latents: &Tensor,
    y: &Tensor,
    mask: &Tensor,
    res_ar: Option<(&Tensor, &Tensor)>,
    noise: &mut dyn FnMut(usize) -> Result<Tensor>,
    on_step: &mut dyn FnMut(StepProgress) -> Control,
) -> Result<Tensor> {
    sample_lcm_controlled(
        transformer,
        None,
        scheduler,
        latents,
        y,
        mask,
        res_ar,
        noise,
        on_step,
    )
}

/// [`sample_lcm`] with an optional ControlNet adapter and its control input, used at every step (the control
/// latents do not change between steps).
#[allow(clippy::too_many_arguments)]
pub fn sample_lcm_controlled(
    transformer: &PixArtTransformer,
    control: Option<(&ControlNetAdapter, &ControlCondition<'_>)>,
    scheduler: &LcmScheduler,
    latents: &Tensor,
    y: &Tensor,
    mask: &Tensor,
    res_ar: Option<(&Tensor, &Tensor)>,
    noise: &mut dyn FnMut(usize) -> Result<Tensor>,
    on_step: &mut dyn FnMut(StepProgress) -> Control,
) -> Result<Tensor> {
    let cfg = &transformer.config;
    let (b, c, _, _) = latents.dims4()?;
    if c != cfg.in_channels {
        return Err(Error::Tensor {
            name: "latents".into(),
            message: format!("expected {} channels, got {c}", cfg.in_channels),
        });
    }
    let device = transformer.device().clone();
    let mut x = latents.to_dtype(DType::F32)?.to_device(&device)?;
    let n = scheduler.num_steps();
    for (i, &t) in scheduler.timesteps().iter().enumerate() {
        let _span = tracing::debug_span!("lcm_step", step = i, timestep = t, batch = b).entered();
        let ts = Tensor::full(t as f32, b, &device)?;
        let out = match control {
            Some((adapter, cond)) => {
                adapter.forward(transformer, &x, &ts, y, Some(mask), res_ar, cond)?
            }
            None => transformer.forward(&x, &ts, y, Some(mask), res_ar)?,
        };
        // Learned sigma: keep the ε half (diffusers: `out_channels // 2 == latent_channels`).
        let eps = if cfg.out_channels == 2 * c {
            out.narrow(1, 0, c)?
        } else {
            out
        };
        let eps = eps.to_dtype(DType::F32)?;
        let z = if i + 1 < n {
            Some(noise(i)?.to_dtype(DType::F32)?.to_device(&device)?)
        } else {
            None
        };
        x = scheduler.step(i, &eps, &x, z.as_ref())?.prev_sample;
        if on_step(StepProgress {
            step: i + 1,
            total: n,
        }) == Control::Cancel
        {
            return Err(Error::Cancelled);
        }
    }
    Ok(x)
}

/// A loaded PixArt-LCM pipeline. Not `Sync`-shared: one render at a time (`&mut self`), which is
/// how the worker's engine task drives the device anyway.
pub struct Pipeline {
    paths: ModelPaths,
    opts: PipelineOptions,
    tokenizer: T5Tokenizer,
    text_encoder: Option<TextEncoder>,
    transformer: PixArtTransformer,
    controlnet: Option<ControlNetAdapter>,
    vae: Vae,
    scheduler_config: LcmSchedulerConfig,
    aspect_table: Option<AspectRatioTable>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("paths", &self.paths)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Resolves and loads every component. The transformer gets `opts.dtype` (f16/bf16 only on a
    /// GPU), T5 f32 on the CPU and bf16 instead of f16 on a GPU, the VAE always f32.
    pub fn load(source: &ModelSource, opts: PipelineOptions) -> Result<Self> {
        let _span = tracing::info_span!("pipeline_load", source = ?source).entered();
        if opts.device.is_cpu() && opts.dtype != DType::F32 {
            return Err(Error::InvalidInput {
                field: "dtype",
                message: format!(
                    "{:?} is only supported on a GPU; use f32 on the CPU",
                    opts.dtype
                ),
            });
        }
        if !matches!(opts.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::InvalidInput {
                field: "dtype",
                message: format!("{:?} is not f32, f16 or bf16", opts.dtype),
            });
        }
        let paths = resolve(source)?;
        let tokenizer = T5Tokenizer::from_dir(&paths.tokenizer)?;
        let scheduler_config = LcmSchedulerConfig::from_path(&paths.scheduler)?;
        let transformer = PixArtTransformer::load(&paths.transformer, opts.dtype, &opts.device)?;
        let controlnet = opts
            .controlnet
            .as_ref()
            .map(|dir| ControlNetAdapter::load(dir, &transformer.config, opts.dtype, &opts.device))
            .transpose()?;
        let vae = Vae::load(&paths.vae, &opts.device)?;
        let text_encoder = if opts.offload_text_encoder {
            None
        } else {
            Some(TextEncoder::load(
                &paths.text_encoder,
                opts.dtype,
                &opts.device,
            )?)
        };
        if let Some(te) = &text_encoder
            && te.d_model() != transformer.config.caption_channels
        {
            return Err(Error::Config {
                path: paths.transformer.join("config.json"),
                message: format!(
                    "`caption_channels` is {} but the text encoder's d_model is {}",
                    transformer.config.caption_channels,
                    te.d_model()
                ),
            });
        }
        if vae.config().latent_channels != transformer.config.in_channels {
            return Err(Error::Config {
                path: paths.transformer.join("config.json"),
                message: format!(
                    "`in_channels` is {} but the VAE has {} latent channels",
                    transformer.config.in_channels,
                    vae.config().latent_channels
                ),
            });
        }
        // LCM: 1..=8 steps must be possible with this scheduler.
        LcmScheduler::new(&scheduler_config, MAX_STEPS, opts.timestep_spacing)?;
        let aspect_table = AspectRatioTable::for_sample_size(transformer.config.sample_size);
        Ok(Self {
            paths,
            opts,
            tokenizer,
            text_encoder,
            transformer,
            controlnet,
            vae,
            scheduler_config,
            aspect_table,
        })
    }

    pub fn paths(&self) -> &ModelPaths {
        &self.paths
    }

    pub fn options(&self) -> &PipelineOptions {
        &self.opts
    }

    pub fn transformer(&self) -> &PixArtTransformer {
        &self.transformer
    }

    pub fn vae(&self) -> &Vae {
        &self.vae
    }

    /// Whether a ControlNet adapter is loaded (items with a [`ControlInput`] are accepted).
    pub fn has_controlnet(&self) -> bool {
        self.controlnet.is_some()
    }

    pub fn controlnet(&self) -> Option<&ControlNetAdapter> {
        self.controlnet.as_ref()
    }

    pub fn tokenizer(&self) -> &T5Tokenizer {
        &self.tokenizer
    }

    /// The aspect-ratio table in use, if the model has one (binning on).
    pub fn aspect_ratio_table(&self) -> Option<AspectRatioTable> {
        self.aspect_table
    }

    /// Pixel size granularity: one latent pixel per VAE factor, and an even latent for the patch.
    pub fn size_multiple(&self) -> u32 {
        (self.vae.config().scale_factor() * self.transformer.config.patch_size) as u32
    }

    /// The schedule for `steps` with this pipeline's spacing.
    pub fn scheduler(&self, steps: usize) -> Result<LcmScheduler> {
        LcmScheduler::new(&self.scheduler_config, steps, self.opts.timestep_spacing)
    }

    /// Checks a request against what the model can render; each error names the field.
    pub fn validate(&self, req: &RenderRequest) -> Result<()> {
        let m = self.size_multiple();
        for (field, v) in [("width", req.width), ("height", req.height)] {
            if v == 0 || v % m != 0 {
                return Err(Error::InvalidInput {
                    field,
                    message: format!("must be a positive multiple of {m} px, got {v}"),
                });
            }
            if v > MAX_SIDE {
                return Err(Error::InvalidInput {
                    field,
                    message: format!("must be at most {MAX_SIDE} px, got {v}"),
                });
            }
        }
        if !(1..=MAX_STEPS).contains(&req.steps) {
            return Err(Error::InvalidInput {
                field: "steps",
                message: format!("must be between 1 and {MAX_STEPS}, got {}", req.steps),
            });
        }
        if req.items.is_empty() {
            return Err(Error::InvalidInput {
                field: "items",
                message: "the batch is empty".into(),
            });
        }
        for (i, item) in req.items.iter().enumerate() {
            if item.prompt.trim().is_empty() {
                return Err(Error::InvalidInput {
                    field: "prompt",
                    message: format!("item {i}: the prompt is empty"),
                });
            }
        }
        let (gen_w, gen_h) = self.generation_size(req.width, req.height);
        for (i, control) in req
            .items
            .iter()
            .enumerate()
            .filter_map(|(i, it)| it.control.as_ref().map(|c| (i, c)))
        {
            if self.controlnet.is_none() {
                return Err(Error::InvalidInput {
                    field: "control",
                    message: format!(
                        "item {i}: has a control image but no ControlNet adapter is loaded \
                         (set PipelineOptions::controlnet)"
                    ),
                });
            }
            let (w, h) = control.edge_map.dimensions();
            if (w, h) != (gen_w, gen_h) {
                return Err(Error::InvalidInput {
                    field: "control.edge_map",
                    message: format!(
                        "item {i}: the edge map is {w}×{h} px but this request renders at {gen_w}×{gen_h} \
                         (resize and centre-crop it to the generation size first)"
                    ),
                });
            }
            if !(0.0..=MAX_CONTROL_SCALE).contains(&control.scale) {
                return Err(Error::InvalidInput {
                    field: "control.scale",
                    message: format!(
                        "item {i}: must be between 0 and {MAX_CONTROL_SCALE}, got {}",
                        control.scale
                    ),
                });
            }
        }
        Ok(())
    }

    /// Control latents `(B, C, h, w)` and per-row scales for a batch, or `None` when no item is controlled.
    /// Edge maps are encoded one by one (bounded memory); uncontrolled rows get zeros and scale 0.
    pub fn control_latents(
        &self,
        items: &[RenderItem],
        latent_h: usize,
        latent_w: usize,
    ) -> Result<Option<(Tensor, Vec<f32>)>> {
        if items.iter().all(|i| i.control.is_none()) {
            return Ok(None);
        }
        let _s = tracing::info_span!("encode_controls").entered();
        let c = self.transformer.config.in_channels;
        let mut rows = Vec::with_capacity(items.len());
        let mut scales = Vec::with_capacity(items.len());
        for item in items {
            match &item.control {
                Some(ctrl) => {
                    let img = image_to_tensor(&ctrl.edge_map, &self.opts.device)?;
                    let z = self.vae.encode_mean(&img)?.to_dtype(DType::F32)?;
                    let (_, zc, zh, zw) = z.dims4()?;
                    if (zc, zh, zw) != (c, latent_h, latent_w) {
                        return Err(Error::InvalidInput {
                            field: "control.edge_map",
                            message: format!(
                                "encodes to {:?}, expected (1, {c}, {latent_h}, {latent_w})",
                                z.dims()
                            ),
                        });
                    }
                    rows.push(z);
                    scales.push(ctrl.scale);
                }
                None => {
                    rows.push(Tensor::zeros(
                        (1, c, latent_h, latent_w),
                        DType::F32,
                        &self.opts.device,
                    )?);
                    scales.push(0.0);
                }
            }
        }
        Ok(Some((Tensor::cat(&rows, 0)?, scales)))
    }

    /// The size actually rendered for a request (the aspect-ratio bin, or the request itself),
    /// as `(width, height)`.
    pub fn generation_size(&self, width: u32, height: u32) -> (u32, u32) {
        match self.aspect_table {
            Some(t) => {
                let (h, w) = classify_height_width_bin(height, width, t);
                (w, h)
            }
            None => (width, height),
        }
    }

    /// Token ids of each prompt (pre-processed, EOS, ≤ 120, unpadded).
    pub fn tokenize(&self, prompts: &[&str]) -> Result<Vec<Vec<u32>>> {
        prompts.iter().map(|p| self.tokenizer.encode(p)).collect()
    }

    /// T5 features of token-id lists: `(y (B, 120, d) f32, mask (B, 120) f32)`. Loads T5 if it
    /// was offloaded, and frees it again afterwards when `offload_text_encoder` is set.
    pub fn encode_ids(&mut self, ids: &[Vec<u32>]) -> Result<(Tensor, Tensor)> {
        if self.text_encoder.is_none() {
            self.text_encoder = Some(TextEncoder::load(
                &self.paths.text_encoder,
                self.opts.dtype,
                &self.opts.device,
            )?);
        }
        let te = self.text_encoder.as_mut().expect("loaded above");
        let out = te.encode_ids(ids, MAX_SEQUENCE_LENGTH);
        if self.opts.offload_text_encoder {
            self.text_encoder = None;
        }
        out
    }

    /// Initial latents (B, C, h, w) and the per-item noise streams that continue after them.
    pub fn initial_latents(
        &self,
        seeds: &[u64],
        latent_h: usize,
        latent_w: usize,
    ) -> Result<(Tensor, Vec<SeededNoise>)> {
        let c = self.transformer.config.in_channels;
        let mut streams: Vec<SeededNoise> = seeds.iter().map(|&s| SeededNoise::new(s)).collect();
        let rows = streams
            .iter_mut()
            .map(|s| s.next_tensor(&[c, latent_h, latent_w], &self.opts.device))
            .collect::<Result<Vec<_>>>()?;
        Ok((Tensor::stack(&rows, 0)?, streams))
    }

    /// Micro-condition tensors for a generation size, when the model uses them.
    pub fn micro_conditions(
        &self,
        batch: usize,
        gen_w: u32,
        gen_h: u32,
    ) -> Result<Option<(Tensor, Tensor)>> {
        if !self.transformer.config.use_additional_conditions {
            return Ok(None);
        }
        let dev = &self.opts.device;
        let res = Tensor::from_vec([gen_h as f32, gen_w as f32].repeat(batch), (batch, 2), dev)?;
        let ar = Tensor::from_vec(
            vec![(gen_h as f64 / gen_w as f64) as f32; batch],
            (batch, 1),
            dev,
        )?;
        Ok(Some((res, ar)))
    }

    /// Runs the LCM loop from given latents and text features; `noise(i)` supplies the noise
    /// injected after step `i`.
    #[allow(clippy::too_many_arguments)]
    pub fn denoise(
        &self,
        latents: &Tensor,
        y: &Tensor,
        mask: &Tensor,
        steps: usize,
        gen_w: u32,
        gen_h: u32,
        noise: &mut dyn FnMut(usize) -> Result<Tensor>,
        on_step: &mut dyn FnMut(StepProgress) -> Control,
    ) -> Result<Tensor> {
        self.denoise_controlled(latents, y, mask, None, steps, gen_w, gen_h, noise, on_step)
    }

    /// [`Pipeline::denoise`] with control latents `(B, C, h, w)` and per-row scales (see
    /// [`Pipeline::control_latents`]); needs the adapter.
    #[allow(clippy::too_many_arguments)]
    pub fn denoise_controlled(
        &self,
        latents: &Tensor,
        y: &Tensor,
        mask: &Tensor,
        control: Option<(&Tensor, &[f32])>,
        steps: usize,
        gen_w: u32,
        gen_h: u32,
        noise: &mut dyn FnMut(usize) -> Result<Tensor>,
        on_step: &mut dyn FnMut(StepProgress) -> Control,
    ) -> Result<Tensor> {
        let scheduler = self.scheduler(steps)?;
        let b = latents.dim(0)?;
        let mc = self.micro_conditions(b, gen_w, gen_h)?;
        let cond = match control {
            Some((latents, scale)) => {
                let adapter = self
                    .controlnet
                    .as_ref()
                    .ok_or_else(|| Error::InvalidInput {
                        field: "control",
                        message: "control latents given but no ControlNet adapter is loaded".into(),
                    })?;
                Some((adapter, ControlCondition { latents, scale }))
            }
            None => None,
        };
        sample_lcm_controlled(
            &self.transformer,
            cond.as_ref().map(|(a, c)| (*a, c)),
            &scheduler,
            latents,
            y,
            mask,
            mc.as_ref().map(|(r, a)| (r, a)),
            noise,
            on_step,
        )
    }

    /// Decodes latents item by item and resizes + crops to `width × height` (a no-op when the
    /// generation size already is that).
    pub fn decode(
        &self,
        latents: &Tensor,
        width: u32,
        height: u32,
    ) -> Result<Vec<image::RgbImage>> {
        let mut out = Vec::with_capacity(latents.dim(0)?);
        for i in 0..latents.dim(0)? {
            let img = self.vae.decode(&latents.narrow(0, i, 1)?)?;
            let img = resize_and_crop_tensor(&img, width as usize, height as usize)?;
            out.extend(tensor_to_images(&img)?);
        }
        Ok(out)
    }

    /// Renders a batch; `on_step` sees every denoising step and may cancel.
    pub fn render(
        &mut self,
        req: &RenderRequest,
        on_step: &mut dyn FnMut(StepProgress) -> Control,
    ) -> Result<Vec<RenderOutput>> {
        self.validate(req)?;
        let (gen_w, gen_h) = self.generation_size(req.width, req.height);
        let span = tracing::info_span!(
            "render",
            batch = req.items.len(),
            width = req.width,
            height = req.height,
            gen_width = gen_w,
            gen_height = gen_h,
            steps = req.steps
        );
        let _enter = span.enter();
        let prompts: Vec<&str> = req.items.iter().map(|i| i.prompt.as_str()).collect();
        let ids = self.tokenize(&prompts)?;
        let (y, mask) = {
            let _s = tracing::info_span!("encode_prompts").entered();
            self.encode_ids(&ids)?
        };
        let f = self.vae.config().scale_factor() as u32;
        let (lh, lw) = ((gen_h / f) as usize, (gen_w / f) as usize);
        let seeds: Vec<u64> = req.items.iter().map(|i| i.seed).collect();
        let (latents, mut streams) = self.initial_latents(&seeds, lh, lw)?;
        let control = self.control_latents(&req.items, lh, lw)?;
        let c = self.transformer.config.in_channels;
        let device = self.opts.device.clone();
        let mut noise = |_i: usize| -> Result<Tensor> {
            let rows = streams
                .iter_mut()
                .map(|s| s.next_tensor(&[c, lh, lw], &device))
                .collect::<Result<Vec<_>>>()?;
            Ok(Tensor::stack(&rows, 0)?)
        };
        let latents = self.denoise_controlled(
            &latents,
            &y,
            &mask,
            control.as_ref().map(|(z, s)| (z, s.as_slice())),
            req.steps,
            gen_w,
            gen_h,
            &mut noise,
            on_step,
        )?;
        let images = {
            let _s = tracing::info_span!("decode").entered();
            self.decode(&latents, req.width, req.height)?
        };
        Ok(images
            .into_iter()
            .map(|image| RenderOutput { image })
            .collect())
    }
}

/// The conformance harness's `lcm`, `vae-decode`, `vae-encode` and `t5` modes
/// (docs/conformance.md) as library calls, so tests run exactly what the command line runs.
pub mod conformance {
    use std::collections::HashMap;
    use std::path::Path;

    use candle_core::{DType, Device, Tensor};

    use super::{Control, TimestepSpacing, sample_lcm_controlled};
    use crate::controlnet::{ControlCondition, ControlNetAdapter};
    use crate::scheduler::{LcmScheduler, LcmSchedulerConfig};
    use crate::text_encoder::TextEncoder;
    use crate::transformer::PixArtTransformer;
    use crate::transformer::conformance::input;
    use crate::vae::Vae;
    use crate::{Error, Result};

    /// Named tensors in, named tensors out.
    pub type Tensors = HashMap<String, Tensor>;

    fn rank(t: &Tensor, name: &str, r: usize, what: &str) -> Result<()> {
        if t.rank() != r {
            return Err(Error::Tensor {
                name: name.into(),
                message: format!("expected shape {what}, got {:?}", t.dims()),
            });
        }
        Ok(())
    }

    /// `lcm` mode: `latents`, `encoder_hidden_states`, `encoder_attention_mask`,
    /// `num_inference_steps`, `noise` (S−1, B, C, H, W), optional `resolution` / `aspect_ratio`
    /// → `latents`, `timesteps`.
    pub fn lcm(
        transformer: &PixArtTransformer,
        scheduler: &LcmSchedulerConfig,
        spacing: TimestepSpacing,
        inputs: &Tensors,
    ) -> Result<Tensors> {
        lcm_controlled(transformer, None, scheduler, spacing, inputs)
    }

    /// `lcm --controlnet` mode: [`lcm`] plus `controlnet_cond` (B, C, H, W) and optional
    /// `conditioning_scale` (1,) — or one value per row — when `adapter` is given. Control inputs
    /// without an adapter are an error, not silently ignored.
    pub fn lcm_controlled(
        transformer: &PixArtTransformer,
        adapter: Option<&ControlNetAdapter>,
        scheduler: &LcmSchedulerConfig,
        spacing: TimestepSpacing,
        inputs: &Tensors,
    ) -> Result<Tensors> {
        let control = match adapter {
            Some(a) => Some((
                a,
                input(inputs, "controlnet_cond")?.clone(),
                crate::controlnet::conformance::conditioning_scale(inputs)?,
            )),
            None => {
                if inputs.contains_key("controlnet_cond") {
                    return Err(Error::Tensor {
                        name: "controlnet_cond".into(),
                        message: "given but no ControlNet adapter was loaded (--controlnet)".into(),
                    });
                }
                None
            }
        };
        let cond = control.as_ref().map(|(a, z, s)| {
            (
                *a,
                ControlCondition {
                    latents: z,
                    scale: s,
                },
            )
        });
        let latents = input(inputs, "latents")?;
        rank(latents, "latents", 4, "(B, C, H, W)")?;
        let y = input(inputs, "encoder_hidden_states")?;
        let mask = input(inputs, "encoder_attention_mask")?.to_dtype(DType::F32)?;
        let steps_t = input(inputs, "num_inference_steps")?;
        let steps = steps_t
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let steps = match steps.as_slice() {
            [s] if *s >= 1.0 && s.fract() == 0.0 => *s as usize,
            _ => {
                return Err(Error::Tensor {
                    name: "num_inference_steps".into(),
                    message: format!("expected one positive integer value, got {steps:?}"),
                });
            }
        };
        let sched = LcmScheduler::new(scheduler, steps, spacing)?;
        let noise_all = if steps > 1 {
            let n = input(inputs, "noise")?;
            let mut want = vec![steps - 1];
            want.extend_from_slice(latents.dims());
            if n.dims() != want.as_slice() {
                return Err(Error::Tensor {
                    name: "noise".into(),
                    message: format!("expected shape {want:?}, got {:?}", n.dims()),
                });
            }
            Some(n.to_dtype(DType::F32)?)
        } else {
            None
        };
        let res_ar = if transformer.config.use_additional_conditions {
            Some((
                input(inputs, "resolution")?.to_dtype(DType::F32)?,
                input(inputs, "aspect_ratio")?.to_dtype(DType::F32)?,
            ))
        } else {
            None
        };
        let mut noise =
            |i: usize| -> Result<Tensor> { Ok(noise_all.as_ref().expect("steps > 1").get(i)?) };
        let out = sample_lcm_controlled(
            transformer,
            cond.as_ref().map(|(a, c)| (*a, c)),
            &sched,
            latents,
            y,
            &mask,
            res_ar.as_ref().map(|(r, a)| (r, a)),
            &mut noise,
            &mut |_| Control::Continue,
        )?;
        let ts: Vec<f32> = sched.timesteps().iter().map(|&t| t as f32).collect();
        let n = ts.len();
        Ok(HashMap::from([
            ("latents".to_string(), out.to_device(&Device::Cpu)?),
            (
                "timesteps".to_string(),
                Tensor::from_vec(ts, n, &Device::Cpu)?,
            ),
        ]))
    }

    /// `vae-decode` mode: `latents` → `sample`.
    pub fn vae_decode(vae: &Vae, inputs: &Tensors) -> Result<Tensors> {
        let sample = vae.decode(input(inputs, "latents")?)?;
        Ok(HashMap::from([("sample".to_string(), sample)]))
    }

    /// `vae-encode` mode: `image` → `latents` (posterior mean × scaling_factor).
    pub fn vae_encode(vae: &Vae, inputs: &Tensors) -> Result<Tensors> {
        let latents = vae.encode_mean(input(inputs, "image")?)?;
        Ok(HashMap::from([("latents".to_string(), latents)]))
    }

    /// `t5` mode: `input_ids` (i64 or float), `attention_mask` → `last_hidden_state` (zero at pads).
    pub fn t5(encoder: &mut TextEncoder, inputs: &Tensors) -> Result<Tensors> {
        let ids = input(inputs, "input_ids")?;
        rank(ids, "input_ids", 2, "(B, L)")?;
        let mask = input(inputs, "attention_mask")?;
        let out = encoder.encode_masked(ids, mask)?;
        Ok(HashMap::from([("last_hidden_state".to_string(), out)]))
    }

    /// Reads a safetensors input file onto the CPU.
    pub fn load_tensors(path: &Path) -> Result<Tensors> {
        candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        })
    }

    /// Writes outputs as contiguous f32 tensors.
    pub fn save_tensors(outputs: &Tensors, path: &Path) -> Result<()> {
        let mut out = HashMap::new();
        for (k, v) in outputs {
            out.insert(
                k.clone(),
                v.to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?
                    .contiguous()?,
            );
        }
        candle_core::safetensors::save(&out, path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_dtypes_parse() {
        assert!(device_from_str("cpu").unwrap().is_cpu());
        let e = device_from_str("tpu").unwrap_err().to_string();
        assert!(e.contains("device"), "{e}");
        assert_eq!(dtype_from_str("bf16").unwrap(), DType::BF16);
        assert!(
            dtype_from_str("f8")
                .unwrap_err()
                .to_string()
                .contains("dtype")
        );
    }
}
