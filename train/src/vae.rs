//! Stage 1: a small AutoencoderKL in the Stable-Diffusion VAE architecture, trained on the dataset's images
//! with reconstruction (MSE) + a small KL term, exported as a diffusers `vae/` directory.
//!
//! The model *is* the inference model: it is candle-transformers' `AutoEncoderKL` (the module tree that
//! [`pixart::vae::Vae`] loads) built on a `VarMap` instead of a checkpoint, so the exported weights load
//! into inference unchanged and every key is the diffusers key. Two things are rebuilt here from candle's
//! public blocks, on the same variables:
//!
//! * the encoder path up to the posterior moments — candle's `DiagonalGaussianDistribution` hides the
//!   log-variance the KL term needs;
//! * item-by-item encode/decode — candle 0.11's `AutoEncoderKL` disagrees with diffusers for batch > 1
//!   (see `pixart::vae`), so a batched forward would train a function that inference does not compute.
//!
//! Every op on this path has a backward in candle 0.11 (convolutions, GroupNorm — composed ops —, SiLU,
//! the composed `softmax` of the mid-block attention, nearest upsampling with a single consumer); the
//! tests check that every variable receives a gradient. Initialisation is PyTorch's default (uniform
//! ±1/√fan_in for weights and biases, GroupNorm 1/0), drawn from the run's seed because candle's CPU
//! random numbers cannot be seeded.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    DownEncoderBlock2D, DownEncoderBlock2DConfig, UNetMidBlock2D, UNetMidBlock2DConfig,
};
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use image::RgbImage;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::dataset::{DatasetConfig, Split};
use crate::optim::{AdamW, AdamWParams, clip_grad_norm};
use crate::progress::Progress;
use crate::seed::{self, Stream};
use crate::varmap::sorted_vars;
use crate::{Error, Result};

/// The stage name in checkpoints and errors.
pub const STAGE: &str = "vae";

/// Everything that determines a VAE run's result except its length: resuming checks it field by field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeTrainConfig {
    /// Seeds the dataset, the initialisation, the batches and the posterior noise.
    pub seed: u64,
    /// Side of the training images (the dataset's generation size).
    pub image_size: u32,
    /// Distinct training images (drawn from the dataset's training split, held-out combinations excluded).
    pub dataset_size: u64,
    /// Channels per level; `n` levels downsample by `2^(n−1)` (4 levels: the SD VAE's ×8).
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub batch_size: usize,
    /// Weight of the KL term; both terms are per-element means. SD's 1e-6 on sums would be ≈2e-8 here:
    /// this stronger pull keeps the latents near unit scale for the diffusion stages.
    pub kl_weight: f64,
    /// Global gradient-norm clip.
    pub grad_clip: f64,
    pub optimizer: AdamWParams,
}

impl Default for VaeTrainConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            image_size: 64,
            dataset_size: 1024,
            block_out_channels: vec![16, 32, 32, 32],
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 8,
            batch_size: 8,
            kl_weight: 1e-4,
            grad_clip: 1.0,
            optimizer: AdamWParams {
                lr: 2e-3,
                weight_decay: 0.0,
                ..Default::default()
            },
        }
    }
}

impl VaeTrainConfig {
    pub fn validate(&self) -> Result<()> {
        let bad =
            |field: &'static str, message: String| Err(Error::InvalidInput { field, message });
        if self.block_out_channels.is_empty() {
            return bad("block_out_channels", "is empty".into());
        }
        if self.norm_num_groups == 0
            || self
                .block_out_channels
                .iter()
                .any(|c| *c == 0 || c % self.norm_num_groups != 0)
        {
            return bad(
                "norm_num_groups",
                format!(
                    "{} must divide every entry of block_out_channels {:?}",
                    self.norm_num_groups, self.block_out_channels
                ),
            );
        }
        let factor = self.scale_factor() as u32;
        if !self.image_size.is_multiple_of(factor) {
            return bad(
                "image_size",
                format!(
                    "{} is not a multiple of the VAE's ×{factor} downsampling",
                    self.image_size
                ),
            );
        }
        if self.batch_size == 0 || self.latent_channels == 0 || self.layers_per_block == 0 {
            return bad(
                "batch_size",
                "batch_size, latent_channels and layers_per_block must be positive".into(),
            );
        }
        if (self.dataset_size as usize) < self.batch_size {
            return bad(
                "dataset_size",
                format!(
                    "{} is below batch_size {}",
                    self.dataset_size, self.batch_size
                ),
            );
        }
        if !self.optimizer.lr.is_finite() || self.optimizer.lr <= 0.0 {
            return bad(
                "optimizer.lr",
                format!("{} must be positive", self.optimizer.lr),
            );
        }
        Ok(())
    }

    /// Pixels per latent pixel.
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    fn candle(&self) -> AutoEncoderKLConfig {
        AutoEncoderKLConfig {
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: self.layers_per_block,
            latent_channels: self.latent_channels,
            norm_num_groups: self.norm_num_groups,
            use_quant_conv: true,
            use_post_quant_conv: true,
        }
    }
}

/// diffusers' `Encoder` + `quant_conv` up to the posterior moments (mean and log-variance), on the same
/// variables as candle's `AutoEncoderKL` (the layout of `pixart::vae`'s mean encoder).
struct MomentEncoder {
    conv_in: candle_nn::Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: candle_nn::GroupNorm,
    conv_out: candle_nn::Conv2d,
    quant_conv: candle_nn::Conv2d,
}

impl MomentEncoder {
    fn new(vb: VarBuilder, cfg: &VaeTrainConfig) -> candle_core::Result<Self> {
        let venc = vb.pp("encoder");
        let pad1 = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let ch = &cfg.block_out_channels;
        let conv_in = candle_nn::conv2d(3, ch[0], 3, pad1, venc.pp("conv_in"))?;
        let mut down_blocks = Vec::with_capacity(ch.len());
        for (i, &out) in ch.iter().enumerate() {
            let inp = if i > 0 { ch[i - 1] } else { ch[0] };
            let bcfg = DownEncoderBlock2DConfig {
                num_layers: cfg.layers_per_block,
                resnet_eps: 1e-6,
                resnet_groups: cfg.norm_num_groups,
                add_downsample: i + 1 != ch.len(),
                downsample_padding: 0,
                ..Default::default()
            };
            down_blocks.push(DownEncoderBlock2D::new(
                venc.pp("down_blocks").pp(i.to_string()),
                inp,
                out,
                bcfg,
            )?);
        }
        let last = *ch.last().expect("validated non-empty");
        let mid_cfg = UNetMidBlock2DConfig {
            resnet_eps: 1e-6,
            output_scale_factor: 1.,
            attn_num_head_channels: None,
            resnet_groups: Some(cfg.norm_num_groups),
            ..Default::default()
        };
        let mid_block = UNetMidBlock2D::new(venc.pp("mid_block"), last, None, mid_cfg)?;
        let conv_norm_out =
            candle_nn::group_norm(cfg.norm_num_groups, last, 1e-6, venc.pp("conv_norm_out"))?;
        let lc = 2 * cfg.latent_channels;
        let conv_out = candle_nn::conv2d(last, lc, 3, pad1, venc.pp("conv_out"))?;
        let quant_conv = candle_nn::conv2d(lc, lc, 1, Default::default(), vb.pp("quant_conv"))?;
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block,
            conv_norm_out,
            conv_out,
            quant_conv,
        })
    }

    /// (B, 2·latent, h, w): mean then log-variance, as diffusers splits them.
    fn moments(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = xs.apply(&self.conv_in)?;
        for block in &self.down_blocks {
            xs = xs.apply(block)?;
        }
        let xs = self
            .mid_block
            .forward(&xs, None)?
            .apply(&self.conv_norm_out)?;
        candle_nn::ops::silu(&xs)?
            .apply(&self.conv_out)?
            .apply(&self.quant_conv)
    }
}

/// One step's loss and its parts.
#[derive(Debug, Clone)]
pub struct VaeLoss {
    pub total: Tensor,
    /// Mean squared error of the reconstruction (images in [−1, 1]).
    pub recon: Tensor,
    /// Mean KL divergence per latent element from N(0, 1).
    pub kl: Tensor,
}

/// The VAE on live variables.
pub struct TrainableVae {
    varmap: VarMap,
    encoder: MomentEncoder,
    autoencoder: AutoEncoderKL,
    config: VaeTrainConfig,
}

impl std::fmt::Debug for TrainableVae {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainableVae")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl TrainableVae {
    /// A freshly initialised VAE, seeded by `config.seed`.
    pub fn new(config: &VaeTrainConfig, device: &Device) -> Result<Self> {
        config.validate()?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let autoencoder = AutoEncoderKL::new(vb.clone(), 3, 3, config.candle())?;
        let encoder = MomentEncoder::new(vb, config)?;
        init(&varmap, config.seed, device)?;
        Ok(Self {
            varmap,
            encoder,
            autoencoder,
            config: config.clone(),
        })
    }

    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    pub fn config(&self) -> &VaeTrainConfig {
        &self.config
    }

    /// Posterior mean and log-variance (clamped to [−30, 20] as diffusers does) of images in [−1, 1].
    pub fn moments(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut out = Vec::with_capacity(images.dim(0)?);
        for i in 0..images.dim(0)? {
            out.push(self.encoder.moments(&images.narrow(0, i, 1)?)?);
        }
        let m = Tensor::cat(&out, 0)?;
        let lc = self.config.latent_channels;
        Ok((
            m.narrow(1, 0, lc)?,
            m.narrow(1, lc, lc)?.clamp(-30f32, 20f32)?,
        ))
    }

    /// Decodes unscaled latents (not × scaling factor) to images in ≈[−1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let mut out = Vec::with_capacity(z.dim(0)?);
        for i in 0..z.dim(0)? {
            out.push(self.autoencoder.decode(&z.narrow(0, i, 1)?)?);
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// The loss on `images` with the posterior sampled by `noise` (standard normal, latent-shaped).
    pub fn loss(&self, images: &Tensor, noise: &Tensor) -> Result<VaeLoss> {
        let (mean, logvar) = self.moments(images)?;
        let z = (&mean + (logvar.affine(0.5, 0.0)?.exp()? * noise)?)?;
        let recon = (self.decode(&z)? - images)?.sqr()?.mean_all()?;
        let kl = (((mean.sqr()? + logvar.exp()?)? - 1.0)? - &logvar)?
            .affine(0.5, 0.0)?
            .mean_all()?;
        let total = (&recon + (&kl * self.config.kl_weight)?)?;
        Ok(VaeLoss { total, recon, kl })
    }

    /// The deterministic reconstruction decode(mean) and its mean squared error.
    pub fn reconstruction_mse(&self, images: &Tensor) -> Result<f32> {
        let (mean, _) = self.moments(images)?;
        let err = (self.decode(&mean)? - images)?.sqr()?.mean_all()?;
        Ok(err.to_scalar::<f32>()?)
    }

    /// `1 / std` of the posterior means of `images`: the `scaling_factor` that gives the diffusion stages
    /// unit-variance latents (SD's 0.18215 was found the same way).
    pub fn scaling_factor(&self, images: &Tensor) -> Result<f64> {
        let (mean, _) = self.moments(images)?;
        let mean = mean.flatten_all()?;
        let mu = mean.mean_all()?.to_scalar::<f32>()? as f64;
        let var = (mean - mu)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
        let s = 1.0 / var.sqrt().max(1e-6);
        Ok(s)
    }

    /// Writes a diffusers VAE directory: `config.json` and `diffusion_pytorch_model.safetensors` with
    /// diffusers' current attention key names (`to_q`, …, `to_out.0`; candle builds the legacy `query`,
    /// …, `proj_attn` names on an empty `VarMap`, and loads either).
    pub fn export(&self, dir: &Path, scaling_factor: f64) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let c = &self.config;
        let n = c.block_out_channels.len();
        let config = serde_json::json!({
            "_class_name": "AutoencoderKL",
            "_diffusers_version": "0.30.0",
            "act_fn": "silu",
            "block_out_channels": c.block_out_channels,
            "down_block_types": vec!["DownEncoderBlock2D"; n],
            "force_upcast": true,
            "in_channels": 3,
            "latent_channels": c.latent_channels,
            "layers_per_block": c.layers_per_block,
            "norm_num_groups": c.norm_num_groups,
            "out_channels": 3,
            "sample_size": c.image_size,
            "scaling_factor": scaling_factor,
            "up_block_types": vec!["UpDecoderBlock2D"; n],
        });
        let path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&config).expect("JSON values serialise");
        std::fs::write(&path, text + "\n").map_err(|source| Error::Io { path, source })?;
        let tensors: HashMap<String, Tensor> = sorted_vars(&self.varmap)
            .into_iter()
            .map(|(name, var)| (diffusers_key(&name), var.as_tensor().clone()))
            .collect();
        let path = dir.join("diffusion_pytorch_model.safetensors");
        candle_core::safetensors::save(&tensors, &path).map_err(|e| Error::Io {
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(())
    }
}

/// candle's legacy attention names → diffusers' current ones.
fn diffusers_key(name: &str) -> String {
    if !name.contains(".attentions.") {
        return name.to_string();
    }
    for (old, new) in [
        (".query.", ".to_q."),
        (".key.", ".to_k."),
        (".value.", ".to_v."),
        (".proj_attn.", ".to_out.0."),
    ] {
        if name.contains(old) {
            return name.replacen(old, new, 1);
        }
    }
    name.to_string()
}

/// PyTorch's default initialisation, seeded: weights and biases uniform in ±1/√fan_in (fan_in from the
/// layer's weight), 1-D weights (GroupNorm scales) one.
fn init(varmap: &VarMap, seed: u64, device: &Device) -> Result<()> {
    let vars = sorted_vars(varmap);
    let fan_in: HashMap<String, usize> = vars
        .iter()
        .filter(|(n, v)| n.ends_with(".weight") && v.rank() >= 2)
        .map(|(n, v)| {
            (
                n.trim_end_matches(".weight").to_string(),
                v.dims()[1..].iter().product(),
            )
        })
        .collect();
    let mut rng = seed::rng(seed, 0, Stream::Init);
    for (name, var) in &vars {
        let dims = var.dims().to_vec();
        let layer = name
            .rsplit_once('.')
            .map(|(l, _)| l.to_string())
            .unwrap_or_default();
        let value = match (name.ends_with(".weight"), dims.len(), fan_in.get(&layer)) {
            (true, 1, _) => Tensor::ones(dims.as_slice(), DType::F32, device)?,
            (_, _, Some(&f)) => seed::uniform(&mut rng, &dims, 1.0 / (f as f32).sqrt(), device)?,
            // A 1-D bias without a weighted layer: a GroupNorm shift.
            _ => Tensor::zeros(dims.as_slice(), DType::F32, device)?,
        };
        var.set(&value)?;
    }
    Ok(())
}

/// An RGB image as a (3, H, W) tensor in [−1, 1].
pub fn image_to_tensor(image: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = image.dimensions();
    let t = Tensor::from_vec(image.as_raw().clone(), (h as usize, w as usize, 3), device)?
        .permute((2, 0, 1))?
        .to_dtype(DType::F32)?;
    Ok(t.affine(1.0 / 127.5, -1.0)?)
}

/// Images `0..count` of the dataset's training split at the config's seed and size, (count, 3, H, W).
pub fn training_images(config: &VaeTrainConfig, count: u64, device: &Device) -> Result<Tensor> {
    images(config, Split::Train, count, device)
}

/// `count` images of `split`, (count, 3, H, W) in [−1, 1].
pub fn images(
    config: &VaeTrainConfig,
    split: Split,
    count: u64,
    device: &Device,
) -> Result<Tensor> {
    let data = DatasetConfig {
        image_size: config.image_size,
        seed: config.seed,
        ..Default::default()
    };
    data.validate()?;
    let list = data
        .samples(split, count)
        .iter()
        .map(|s| image_to_tensor(&s.scene.render(config.image_size), device))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&list, 0)?)
}

/// How a run is driven (not part of its config: it may change between an interrupted run and its resume).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Output directory: `checkpoint/` and the exported `vae/`.
    pub out: PathBuf,
    /// Total steps of the run (a resumed run continues up to this).
    pub steps: u64,
    /// Save a checkpoint every this many steps (and at the end): an interruption loses at most this many.
    pub save_every: u64,
    /// Continue from `out/checkpoint` if there is one (otherwise start afresh).
    pub resume: bool,
    /// Draw the progress bar.
    pub progress: bool,
}

/// One step's figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepRecord {
    /// 1-based: the step that these figures end.
    pub step: u64,
    pub loss: f32,
    pub recon: f32,
    pub kl: f32,
    pub grad_norm: f64,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct VaeRun {
    /// Steps already done when this process started (0 for a fresh run).
    pub start_step: u64,
    /// The steps this process ran.
    pub records: Vec<StepRecord>,
    /// Wall time per step in this process (training steps only, not saving or exporting).
    pub seconds_per_step: Vec<f64>,
    /// Steps done at the end (the checkpoint's step unless interrupted).
    pub end_step: u64,
    /// `Some(dir)` of the exported VAE, `None` when `on_step` stopped the run.
    pub vae_dir: Option<PathBuf>,
    pub scaling_factor: Option<f64>,
}

/// Trains the VAE stage, saving checkpoints into `opts.out/checkpoint` and exporting `opts.out/vae`.
///
/// `on_step` sees each finished step; `ControlFlow::Break` stops the run at once *without* saving — as a
/// kill would — which is how the tests check what an interruption loses. The binary passes a closure that
/// always continues.
pub fn train(
    config: &VaeTrainConfig,
    opts: &RunOptions,
    device: &Device,
    mut on_step: impl FnMut(&StepRecord) -> ControlFlow<()>,
) -> Result<VaeRun> {
    config.validate()?;
    if opts.save_every == 0 {
        return Err(Error::InvalidInput {
            field: "save_every",
            message: "must be at least 1".into(),
        });
    }
    let config_json = serde_json::to_value(config).expect("the config serialises");
    let ckpt = checkpoint::dir(&opts.out);
    if checkpoint::exists(&ckpt) && !opts.resume {
        return Err(Error::Checkpoint {
            path: ckpt.join(checkpoint::STATE_FILE),
            field: "step".into(),
            message:
                "exists: pass --resume to continue this run, or choose another output directory"
                    .into(),
        });
    }
    let model = TrainableVae::new(config, device)?;
    let vars = sorted_vars(model.varmap());
    let mut optimizer = AdamW::new(vars.clone(), config.optimizer.clone())?;
    let mut step = 0;
    if opts.resume && checkpoint::exists(&ckpt) {
        let loaded = checkpoint::load(&ckpt, STAGE, &config_json, device)?;
        checkpoint::restore_varmap(
            model.varmap(),
            &loaded.params,
            &loaded.dir.join(checkpoint::PARAMS_FILE),
        )?;
        optimizer.load_state(
            &loaded.optimizer,
            loaded.state.optimizer_steps,
            &loaded.dir.join(checkpoint::OPTIMIZER_FILE),
        )?;
        step = loaded.state.step;
    }
    let start_step = step;
    let pool = training_images(config, config.dataset_size, device)?;
    let latent = config.image_size as usize / config.scale_factor();
    let progress = Progress::new(STAGE, step, opts.steps.max(step), opts.progress);
    let mut run = VaeRun {
        start_step,
        records: Vec::new(),
        seconds_per_step: Vec::new(),
        end_step: step,
        vae_dir: None,
        scaling_factor: None,
    };
    let mut saved = if start_step > 0 {
        Some(start_step)
    } else {
        None
    };
    while step < opts.steps {
        let t0 = Instant::now();
        let mut rng = seed::rng(config.seed, step, Stream::Batch);
        let idx: Vec<u32> = (0..config.batch_size)
            .map(|_| rng.random_range(0..config.dataset_size as u32))
            .collect();
        let x = pool.index_select(&Tensor::new(idx.as_slice(), device)?, 0)?;
        let noise = seed::randn(
            &mut seed::rng(config.seed, step, Stream::Noise),
            &[config.batch_size, config.latent_channels, latent, latent],
            device,
        )?;
        let loss = model.loss(&x, &noise)?;
        let value = loss.total.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(Error::NonFiniteLoss {
                stage: STAGE.into(),
                step: step + 1,
                value,
            });
        }
        let mut grads = loss.total.backward()?;
        let grad_norm = clip_grad_norm(&mut grads, &vars, config.grad_clip)?;
        optimizer.step(&grads)?;
        step += 1;
        run.seconds_per_step.push(t0.elapsed().as_secs_f64());
        let record = StepRecord {
            step,
            loss: value,
            recon: loss.recon.to_scalar::<f32>()?,
            kl: loss.kl.to_scalar::<f32>()?,
            grad_norm,
        };
        run.records.push(record);
        run.end_step = step;
        progress.update(step, value);
        if on_step(&record).is_break() {
            return Ok(run);
        }
        if step.is_multiple_of(opts.save_every) || step == opts.steps {
            checkpoint::save(&ckpt, STAGE, step, &config_json, model.varmap(), &optimizer)?;
            saved = Some(step);
        }
    }
    progress.finish();
    if saved != Some(step) {
        checkpoint::save(&ckpt, STAGE, step, &config_json, model.varmap(), &optimizer)?;
    }
    let probe = pool.narrow(0, 0, (config.dataset_size as usize).min(64))?;
    let scaling_factor = model.scaling_factor(&probe)?;
    let vae_dir = opts.out.join("vae");
    model.export(&vae_dir, scaling_factor)?;
    run.vae_dir = Some(vae_dir);
    run.scaling_factor = Some(scaling_factor);
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_keys_get_diffusers_names() {
        assert_eq!(
            diffusers_key("encoder.mid_block.attentions.0.proj_attn.weight"),
            "encoder.mid_block.attentions.0.to_out.0.weight"
        );
        assert_eq!(
            diffusers_key("decoder.mid_block.attentions.0.key.bias"),
            "decoder.mid_block.attentions.0.to_k.bias"
        );
        assert_eq!(
            diffusers_key("decoder.up_blocks.0.resnets.0.conv1.weight"),
            "decoder.up_blocks.0.resnets.0.conv1.weight"
        );
    }
}
