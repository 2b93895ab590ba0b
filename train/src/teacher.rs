//! Stage 3: the PixArt-α teacher — a DiT trained from scratch with ε-prediction, the learned-σ bound
//! ([`crate::diffusion`]) and caption dropout (the unconditional input that classifier-free guidance and
//! LCD's guided teacher need), on the VAE stage's latents and the text stage's features.
//!
//! The model is [`pixart::transformer::PixArtTransformer`] in training mode over a `VarMap`
//! ([`crate::dit`]): the very module tree inference runs, so the exported `transformer/` loads in the farm
//! and in diffusers unchanged. Timesteps are uniform over the 1000 training steps, as in PixArt.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use pixart::config::{FeedForwardActivation, TransformerConfig};
use pixart::transformer::PixArtTransformer;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::diffusion::{MseWeighting, Posterior, teacher_loss};
use crate::lcd::{NoiseSchedule, TRAIN_TIMESTEPS, add_noise};
use crate::optim::{AdamW, AdamWParams, clip_grad_norm};
use crate::prep::{LatentPool, Prepared, Text};
use crate::seed::{self, Stream};
use crate::shard::{self, ShardLoss};
use crate::stage;
use crate::varmap::sorted_vars;
use crate::{Error, Result};

/// The stage name in checkpoints and errors.
pub const STAGE: &str = "teacher";

/// Everything that determines a teacher run's result except its length and inputs' locations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherConfig {
    pub seed: u64,
    pub image_size: u32,
    /// Distinct training samples (latents encoded once at the start).
    pub dataset_size: u64,
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub num_layers: usize,
    pub patch_size: usize,
    pub batch_size: usize,
    /// Probability that a sample's caption is replaced by the empty prompt.
    pub caption_dropout: f64,
    /// Weighting of the ε MSE over timesteps: PixArt's plain loss (the default, left out of the saved
    /// config so that checkpoints from before the option resume), or v-prediction's.
    #[serde(default, skip_serializing_if = "MseWeighting::is_pixart")]
    pub mse_weighting: MseWeighting,
    pub grad_clip: f64,
    pub optimizer: AdamWParams,
}

impl Default for TeacherConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            image_size: 64,
            dataset_size: 4096,
            num_attention_heads: 4,
            attention_head_dim: 32,
            num_layers: 6,
            patch_size: 2,
            batch_size: 64,
            caption_dropout: 0.1,
            mse_weighting: MseWeighting::Pixart,
            grad_clip: 1.0,
            optimizer: AdamWParams {
                lr: 3e-4,
                weight_decay: 0.03,
                ..Default::default()
            },
        }
    }
}

impl TeacherConfig {
    pub fn validate(&self) -> Result<()> {
        crate::stage::check_batch(self.batch_size, self.dataset_size)?;
        crate::stage::check_grad_clip(self.grad_clip)?;
        if !(0.0..1.0).contains(&self.caption_dropout) {
            return Error::invalid(
                "caption_dropout",
                format!("{} must be in [0, 1)", self.caption_dropout),
            );
        }
        if self.num_attention_heads == 0 || self.attention_head_dim == 0 || self.num_layers == 0 {
            return Error::invalid(
                "num_layers",
                "heads, head width and layers must be positive",
            );
        }
        self.optimizer.validate()
    }

    /// The diffusers config of the transformer for `latent_channels`-channel latents `latent_size` wide
    /// and `caption_channels`-wide text features.
    pub fn transformer(
        &self,
        latent_channels: usize,
        latent_size: usize,
        caption_channels: usize,
    ) -> TransformerConfig {
        let d = self.num_attention_heads * self.attention_head_dim;
        TransformerConfig {
            num_attention_heads: self.num_attention_heads,
            attention_head_dim: self.attention_head_dim,
            in_channels: latent_channels,
            out_channels: 2 * latent_channels,
            num_layers: self.num_layers,
            cross_attention_dim: d,
            attention_bias: true,
            sample_size: latent_size,
            patch_size: self.patch_size,
            activation_fn: FeedForwardActivation::GeluTanh,
            norm_eps: 1e-6,
            caption_channels,
            interpolation_scale: 1.0,
            use_additional_conditions: false,
            num_embeds_ada_norm: 1000,
            norm_type: "ada_norm_single".into(),
            norm_elementwise_affine: false,
        }
    }
}

/// Where the earlier stages' outputs are and how the run is driven.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub out: PathBuf,
    /// A directory holding `vae/` (the VAE stage's `--out`).
    pub vae: PathBuf,
    /// A directory holding `tokenizer/` and `text_encoder/` (the text stage's `--out`).
    pub text: PathBuf,
    pub steps: u64,
    pub save_every: u64,
    pub resume: bool,
    pub progress: bool,
    /// Train on this exported dataset (`pixart-train dataset`) instead of rendering the procedural one.
    pub dataset: Option<PathBuf>,
}

/// One step's figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f32,
    pub mse: f32,
    pub vb: f32,
    pub grad_norm: f64,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct TeacherRun {
    pub start_step: u64,
    pub records: Vec<StepRecord>,
    pub seconds_per_step: Vec<f64>,
    pub end_step: u64,
    /// Seconds spent encoding the latent pool and captions before the first step.
    pub prepare_seconds: f64,
    /// `Some(out/transformer)` once exported (`None` when `on_step` stopped the run).
    pub transformer_dir: Option<PathBuf>,
    /// The trained model's error per noise level ([`crate::probe`]; empty when interrupted).
    pub probe: Vec<crate::probe::NoiseLevel>,
}

/// The training batch of `step`: which samples, their timesteps, the noise and which captions drop.
pub struct Batch {
    pub indices: Vec<u32>,
    pub timesteps: Vec<usize>,
    pub dropped: Vec<bool>,
    pub noise: Tensor,
}

/// Draws the batch of `step` (a function of seed and step only: resumes draw the same batches).
pub fn draw_batch(
    config: &TeacherConfig,
    step: u64,
    latent_shape: &[usize],
    device: &Device,
) -> Result<Batch> {
    let mut rng = seed::rng(config.seed, step, Stream::Batch);
    let b = config.batch_size;
    let indices = (0..b)
        .map(|_| rng.random_range(0..config.dataset_size as u32))
        .collect();
    let timesteps = (0..b)
        .map(|_| rng.random_range(0..TRAIN_TIMESTEPS))
        .collect();
    let dropped = (0..b)
        .map(|_| rng.random::<f64>() < config.caption_dropout)
        .collect();
    let mut shape = vec![b];
    shape.extend_from_slice(latent_shape);
    let noise = seed::randn(
        &mut seed::rng(config.seed, step, Stream::Noise),
        &shape,
        device,
    )?;
    Ok(Batch {
        indices,
        timesteps,
        dropped,
        noise,
    })
}

/// A batch's model inputs: built on the calling thread (the frozen text encoder keeps a cache), then read
/// by every shard ([`crate::shard`]).
pub struct BatchInputs {
    pub x0: Tensor,
    pub x_t: Tensor,
    pub y: Tensor,
    pub mask: Tensor,
    pub t: Tensor,
}

/// The noised latents, captions and timesteps of `batch`.
pub fn batch_inputs(
    post: &Posterior,
    pool: &LatentPool,
    text: &mut Text,
    batch: &Batch,
) -> Result<BatchInputs> {
    let device = pool.latents.device().clone();
    let x0 = pool
        .latents
        .index_select(&Tensor::new(batch.indices.as_slice(), &device)?, 0)?;
    let ac: Vec<f64> = batch
        .timesteps
        .iter()
        .map(|&t| post.alphas_cumprod[t])
        .collect();
    let x_t = add_noise(&x0, &batch.noise, &ac)?;
    let prompts: Vec<Option<&str>> = batch
        .indices
        .iter()
        .zip(&batch.dropped)
        .map(|(&i, &d)| (!d).then(|| pool.samples[i as usize].caption.as_str()))
        .collect();
    let (y, mask) = text.batch(&prompts)?;
    let t: Vec<f32> = batch.timesteps.iter().map(|&t| t as f32).collect();
    let t = Tensor::from_vec(t, batch.timesteps.len(), &device)?;
    Ok(BatchInputs {
        x0,
        x_t,
        y,
        mask,
        t,
    })
}

/// The loss of samples `r` of a batch (a mean over those samples).
pub fn shard_loss(
    config: &TeacherConfig,
    model: &PixArtTransformer,
    post: &Posterior,
    inputs: &BatchInputs,
    batch: &Batch,
    r: std::ops::Range<usize>,
) -> Result<crate::diffusion::TeacherLoss> {
    let rows = |t: &Tensor| t.narrow(0, r.start, r.len());
    let (x0, x_t, noise) = (rows(&inputs.x0)?, rows(&inputs.x_t)?, rows(&batch.noise)?);
    let out = model
        .forward(
            &x_t,
            &rows(&inputs.t)?,
            &rows(&inputs.y)?,
            Some(&rows(&inputs.mask)?),
            None,
        )?
        .to_dtype(DType::F32)?;
    teacher_loss(
        post,
        &x0,
        &x_t,
        &noise,
        &out,
        &batch.timesteps[r],
        config.mse_weighting,
    )
}

/// The loss of one batch (shared with the tests).
pub fn batch_loss(
    config: &TeacherConfig,
    model: &PixArtTransformer,
    post: &Posterior,
    pool: &LatentPool,
    text: &mut Text,
    batch: &Batch,
) -> Result<crate::diffusion::TeacherLoss> {
    let inputs = batch_inputs(post, pool, text, batch)?;
    shard_loss(
        config,
        model,
        post,
        &inputs,
        batch,
        0..batch.timesteps.len(),
    )
}

/// Trains the teacher into `opts.out/checkpoint`, exporting `opts.out/transformer`. `on_step` as in
/// [`crate::vae::train`]: `Break` stops at once without saving, as a kill would.
pub fn train(
    config: &TeacherConfig,
    opts: &RunOptions,
    device: &Device,
    mut on_step: impl FnMut(&StepRecord) -> ControlFlow<()>,
) -> Result<TeacherRun> {
    config.validate()?;
    stage::preflight(&opts.out, opts.save_every, opts.resume)?;
    let ckpt = checkpoint::dir(&opts.out);
    let prep = Prepared::load(
        &opts.vae,
        &opts.text,
        config.image_size,
        config.seed,
        config.dataset_size,
        opts.dataset.as_deref(),
    )?;
    let (latent_shape, prepare_seconds) = (prep.latent_shape(), prep.seconds);
    let (pool, mut text) = (&prep.pool, prep.text);

    let tcfg = config.transformer(latent_shape[0], latent_shape[1], text.channels());
    let inputs = crate::inputs::fingerprints(&crate::inputs::frozen_inputs(
        &opts.vae,
        &opts.text,
        opts.dataset.as_deref(),
    ))?;
    let config_json = stage_config(config, &tcfg, inputs);
    let varmap: VarMap = crate::dit::init_varmap(&tcfg, config.seed, device)?;
    let model = PixArtTransformer::trainable(tcfg.clone(), &varmap)?;
    let vars = sorted_vars(&varmap);
    let mut optimizer = AdamW::new(vars.clone(), config.optimizer.clone())?;
    let (start, _) = stage::restore(
        &ckpt,
        opts.resume,
        STAGE,
        &config_json,
        &varmap,
        &mut optimizer,
        device,
    )?;
    let post = Posterior::new(&NoiseSchedule::pixart());

    struct Steps<'a> {
        config: &'a TeacherConfig,
        model: &'a PixArtTransformer,
        post: &'a Posterior,
        pool: &'a LatentPool,
        text: &'a mut Text,
        vars: &'a [(String, candle_core::Var)],
        varmap: &'a VarMap,
        optimizer: &'a mut AdamW,
        latent_shape: &'a [usize],
        ckpt: &'a Path,
        config_json: &'a serde_json::Value,
    }
    impl stage::Trainer for Steps<'_> {
        type Record = StepRecord;
        fn step(&mut self, step: u64) -> Result<(StepRecord, f32)> {
            let device = self.model.device().clone();
            let batch = draw_batch(self.config, step, self.latent_shape, &device)?;
            let inputs = batch_inputs(self.post, self.pool, self.text, &batch)?;
            let b = batch.timesteps.len();
            let shards = shard::default_shards(b);
            let (config, model, post) = (self.config, self.model, self.post);
            let (grads, outs) = shard::backward(b, &shards, self.vars, |r| {
                let loss = shard_loss(config, model, post, &inputs, &batch, r)?;
                Ok(ShardLoss {
                    extra: (loss.mse.to_scalar::<f32>()?, loss.vb.to_scalar::<f32>()?),
                    loss: loss.total,
                })
            })?;
            let value = shard::batch_loss(b, &shards, &outs)?;
            let part = |f: fn(&(f32, f32)) -> f32| {
                let values: Vec<f32> = outs.iter().map(|o| f(&o.extra)).collect();
                shard::combine(b, &shards, &values)
            };
            let (Some(mut grads), true) = (grads, value.is_finite()) else {
                return Ok((
                    StepRecord {
                        step: step + 1,
                        loss: value,
                        mse: f32::NAN,
                        vb: f32::NAN,
                        grad_norm: f64::NAN,
                    },
                    value,
                ));
            };
            let grad_norm = clip_grad_norm(&mut grads, self.vars, self.config.grad_clip)?;
            self.optimizer.step(&grads)?;
            let record = StepRecord {
                step: step + 1,
                loss: value,
                mse: part(|e| e.0),
                vb: part(|e| e.1),
                grad_norm,
            };
            Ok((record, value))
        }
        fn save(&mut self, step: u64) -> Result<()> {
            checkpoint::save(
                self.ckpt,
                STAGE,
                step,
                self.config_json,
                self.varmap,
                self.optimizer,
            )
        }
    }
    let mut steps = Steps {
        config,
        model: &model,
        post: &post,
        pool,
        text: &mut text,
        vars: &vars,
        varmap: &varmap,
        optimizer: &mut optimizer,
        latent_shape: &latent_shape,
        ckpt: &ckpt,
        config_json: &config_json,
    };
    let driven = stage::drive(
        STAGE,
        &mut steps,
        start,
        opts.steps,
        opts.save_every,
        opts.progress,
        &mut on_step,
    )?;
    let mut run = TeacherRun {
        start_step: start,
        end_step: driven.end_step,
        records: driven.records,
        seconds_per_step: driven.seconds_per_step,
        prepare_seconds,
        transformer_dir: None,
        probe: Vec::new(),
    };
    if !driven.interrupted {
        let dir = opts.out.join("transformer");
        crate::dit::export(&varmap, &tcfg, &dir)?;
        run.transformer_dir = Some(dir);
        run.probe = crate::probe::probe(&model, pool, &mut text, 64, config.seed + 17)?;
    }
    Ok(run)
}

/// The JSON a checkpoint of a transformer stage records and a resume must match: the run config and the
/// transformer's diffusers config.
pub fn stage_config(
    run: &impl Serialize,
    transformer: &TransformerConfig,
    inputs: serde_json::Value,
) -> serde_json::Value {
    let t: serde_json::Value =
        serde_json::from_str(&transformer.to_json_string()).expect("a config serialises to JSON");
    serde_json::json!({"run": run, "transformer": t, "inputs": inputs})
}

/// Reads an exported `transformer/` directory into variables (for the stages that start from the teacher).
pub fn load_transformer_vars(dir: &Path, device: &Device) -> Result<(TransformerConfig, VarMap)> {
    let config =
        TransformerConfig::from_file(dir.join("config.json")).map_err(|e| Error::ModelDir {
            path: dir.join("config.json"),
            message: e.to_string(),
        })?;
    let varmap = crate::varmap::load_varmap(
        &dir.join("diffusion_pytorch_model.safetensors"),
        DType::F32,
        device,
    )?;
    Ok((config, varmap))
}
