//! Stage 1: a small AutoencoderKL in the Stable-Diffusion VAE architecture, trained on the dataset's images
//! with reconstruction (MSE) + a small KL term, exported as a diffusers `vae/` directory.
//!
//! The module tree is the SD VAE's, with diffusers' parameter names (`encoder.down_blocks.0.resnets.0.conv1`,
//! `decoder.mid_block.attentions.0.to_q`, …), so the exported weights load into [`pixart::vae::Vae`]
//! (candle-transformers' `AutoEncoderKL`) unchanged; the tests check that inference computes what training
//! computed. It is rebuilt here rather than taken from candle-transformers for three reasons:
//!
//! * speed: candle's `conv2d` backward goes through a slow CPU `conv_transpose2d`; the convolutions here
//!   use [`crate::conv::conv2d`], whose backward is forward convolutions (the backward pass was ≈7× the
//!   forward);
//! * the KL term needs the posterior log-variance, which candle's `DiagonalGaussianDistribution` hides;
//! * candle builds the legacy attention names (`query`, …, `proj_attn`) on an empty `VarMap`.
//!
//! Every op on this path has a backward in candle 0.11 (the fast convolution, GroupNorm — [`crate::norm`] —,
//! SiLU, the composed `softmax` of the mid-block attention, nearest upsampling as a broadcast); the
//! tests check that every variable receives a gradient. Initialisation is PyTorch's default (uniform
//! ±1/√fan_in for weights and biases, GroupNorm 1/0), drawn from the run's seed because candle's CPU
//! random numbers cannot be seeded.

use std::collections::HashMap;
use std::ops::{ControlFlow, Range};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder, VarMap};
use image::RgbImage;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::dataset::{DatasetConfig, Split};
use crate::norm::GroupNorm;
use crate::optim::{AdamW, AdamWParams, clip_grad_norm};
use crate::progress::Progress;
use crate::seed::{self, Stream};
use crate::shard::{self, ShardLoss};
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
    /// Train on random `crop_size`² crops (on the latent grid) of the images: the network is convolutional, so
    /// a crop teaches the same local reconstruction at a fraction of the cost. `None`: whole images.
    #[serde(default)]
    pub crop_size: Option<u32>,
    /// Extra weight of the shape's pixels in the reconstruction error: each pixel counts
    /// `1 + foreground_weight · [pixel differs from the background]`, normalised by the mean weight.
    /// Why: the shapes cover 2–17 % of a picture, so a plain MSE is won by the background; the first
    /// VAE that reached a held-out MSE of 0.028 drew flat backgrounds with shapeless, off-colour
    /// blobs, and the analyser read back 40 % of the shapes. 0: plain MSE (left out of saved configs).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub foreground_weight: f64,
    /// With `crop_size`: every crop holds its image's shape centre (on the latent grid), so no step is
    /// spent on crops of bare background (a 32² crop of a 64² picture missed the shape about half the
    /// time). Left out of saved configs when off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub crop_on_shape: bool,
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
            crop_size: None,
            foreground_weight: 0.0,
            crop_on_shape: false,
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
        if self.block_out_channels.is_empty() {
            return Error::invalid("block_out_channels", "is empty");
        }
        if self.norm_num_groups == 0
            || self
                .block_out_channels
                .iter()
                .any(|c| *c == 0 || c % self.norm_num_groups != 0)
        {
            return Error::invalid(
                "norm_num_groups",
                format!(
                    "{} must divide every entry of block_out_channels {:?}",
                    self.norm_num_groups, self.block_out_channels
                ),
            );
        }
        let factor = self.scale_factor() as u32;
        if !self.image_size.is_multiple_of(factor) {
            return Error::invalid(
                "image_size",
                format!(
                    "{} is not a multiple of the VAE's ×{factor} downsampling",
                    self.image_size
                ),
            );
        }
        if let Some(crop) = self.crop_size
            && (crop == 0 || crop > self.image_size || !crop.is_multiple_of(factor))
        {
            return Error::invalid(
                "crop_size",
                format!(
                    "{crop} must be a positive multiple of the VAE's ×{factor} downsampling, at most image_size {}",
                    self.image_size
                ),
            );
        }
        if !self.foreground_weight.is_finite() || self.foreground_weight < 0.0 {
            return Error::invalid(
                "foreground_weight",
                format!("{} must be zero or positive", self.foreground_weight),
            );
        }
        if self.crop_on_shape && self.crop_size.is_none() {
            return Error::invalid("crop_on_shape", "needs crop_size");
        }
        if self.batch_size == 0 || self.latent_channels == 0 || self.layers_per_block == 0 {
            return Error::invalid(
                "batch_size",
                "batch_size, latent_channels and layers_per_block must be positive",
            );
        }
        if (self.dataset_size as usize) < self.batch_size {
            return Error::invalid(
                "dataset_size",
                format!(
                    "{} is below batch_size {}",
                    self.dataset_size, self.batch_size
                ),
            );
        }
        crate::stage::check_grad_clip(self.grad_clip)?;
        self.optimizer.validate()
    }

    /// Pixels per latent pixel.
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// GroupNorm epsilon of every SD-VAE block.
const EPS: f64 = 1e-6;

/// A convolution (weight and bias) through [`crate::conv::conv2d`].
struct Conv {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv {
    fn new(vb: VarBuilder, cin: usize, cout: usize, k: usize, stride: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get((cout, cin, k, k), "weight")?,
            bias: vb.get(cout, "bias")?.reshape((1, cout, 1, 1))?,
            stride,
            padding: if stride == 1 { k / 2 } else { 0 },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(crate::channel::add_bias(
            &crate::conv::conv2d(x, &self.weight, self.stride, self.padding)?,
            &self.bias,
        )?)
    }
}

fn norm(vb: VarBuilder, groups: usize, channels: usize) -> Result<GroupNorm> {
    GroupNorm::new(vb, groups, channels, EPS)
}

/// Nearest ×2 upsampling as a broadcast: its backward is a sum over the broadcast axes, where candle's
/// `upsample_nearest2d` backward goes through a slower generic path.
fn upsample2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, 2 * h, 2 * w))?)
}

fn silu_norm(norm: &GroupNorm, x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::silu(&norm.forward(x)?)?)
}

/// diffusers' `ResnetBlock2D` without time embedding.
struct Resnet {
    norm1: GroupNorm,
    conv1: Conv,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl Resnet {
    fn new(vb: VarBuilder, cin: usize, cout: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm1: norm(vb.pp("norm1"), groups, cin)?,
            conv1: Conv::new(vb.pp("conv1"), cin, cout, 3, 1)?,
            norm2: norm(vb.pp("norm2"), groups, cout)?,
            conv2: Conv::new(vb.pp("conv2"), cout, cout, 3, 1)?,
            shortcut: if cin != cout {
                Some(Conv::new(vb.pp("conv_shortcut"), cin, cout, 1, 1)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&silu_norm(&self.norm1, x)?)?;
        let h = self.conv2.forward(&silu_norm(&self.norm2, &h)?)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        Ok((skip + h)?)
    }
}

/// diffusers' single-head VAE `Attention` (as candle's `AttentionBlock`: the scale applied to q and k).
struct Attention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl Attention {
    fn new(vb: VarBuilder, c: usize, groups: usize) -> Result<Self> {
        let lin = |name: &str| -> Result<Linear> {
            let vb = vb.pp(name);
            Ok(Linear::new(
                vb.get((c, c), "weight")?,
                Some(vb.get(c, "bias")?),
            ))
        };
        Ok(Self {
            norm: norm(vb.pp("group_norm"), groups, c)?,
            q: lin("to_q")?,
            k: lin("to_k")?,
            v: lin("to_v")?,
            out: lin("to_out.0")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let scale = (c as f64).powf(-0.25);
        let q = (self.q.forward(&t)? * scale)?;
        let k = (self.k.forward(&t)? * scale)?;
        let v = self.v.forward(&t)?;
        let p = candle_nn::ops::softmax(&q.matmul(&k.t()?.contiguous()?)?, D::Minus1)?;
        let o = self.out.forward(&p.matmul(&v)?)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
        Ok((o + x)?)
    }
}

/// resnet → attention → resnet.
struct Mid {
    r0: Resnet,
    attn: Attention,
    r1: Resnet,
}

impl Mid {
    fn new(vb: VarBuilder, c: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            r0: Resnet::new(vb.pp("resnets.0"), c, c, groups)?,
            attn: Attention::new(vb.pp("attentions.0"), c, groups)?,
            r1: Resnet::new(vb.pp("resnets.1"), c, c, groups)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.r1.forward(&self.attn.forward(&self.r0.forward(x)?)?)
    }
}

/// A down (encoder) or up (decoder) block: resnets, then the resampler.
struct Block {
    resnets: Vec<Resnet>,
    resample: Option<Conv>,
}

/// diffusers' `AutoencoderKL`: `encoder`, `quant_conv`, `post_quant_conv`, `decoder`.
struct Network {
    enc_in: Conv,
    down: Vec<Block>,
    enc_mid: Mid,
    enc_norm: GroupNorm,
    enc_out: Conv,
    quant: Conv,
    post_quant: Conv,
    dec_in: Conv,
    dec_mid: Mid,
    up: Vec<Block>,
    dec_norm: GroupNorm,
    dec_out: Conv,
}

impl Network {
    fn new(vb: VarBuilder, cfg: &VaeTrainConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let lc = cfg.latent_channels;
        let last = *ch.last().expect("validated non-empty");
        let (ve, vd) = (vb.pp("encoder"), vb.pp("decoder"));
        let mut down = Vec::with_capacity(ch.len());
        for (i, &out) in ch.iter().enumerate() {
            let vb = ve.pp(format!("down_blocks.{i}"));
            let mut inp = if i > 0 { ch[i - 1] } else { ch[0] };
            let mut resnets = Vec::new();
            for j in 0..cfg.layers_per_block {
                resnets.push(Resnet::new(vb.pp(format!("resnets.{j}")), inp, out, g)?);
                inp = out;
            }
            let resample = if i + 1 != ch.len() {
                Some(Conv::new(vb.pp("downsamplers.0.conv"), out, out, 3, 2)?)
            } else {
                None
            };
            down.push(Block { resnets, resample });
        }
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(ch.len());
        for (i, &out) in rev.iter().enumerate() {
            let vb = vd.pp(format!("up_blocks.{i}"));
            let mut inp = if i > 0 { rev[i - 1] } else { rev[0] };
            let mut resnets = Vec::new();
            for j in 0..cfg.layers_per_block + 1 {
                resnets.push(Resnet::new(vb.pp(format!("resnets.{j}")), inp, out, g)?);
                inp = out;
            }
            let resample = if i + 1 != ch.len() {
                Some(Conv::new(vb.pp("upsamplers.0.conv"), out, out, 3, 1)?)
            } else {
                None
            };
            up.push(Block { resnets, resample });
        }
        Ok(Self {
            enc_in: Conv::new(ve.pp("conv_in"), 3, ch[0], 3, 1)?,
            down,
            enc_mid: Mid::new(ve.pp("mid_block"), last, g)?,
            enc_norm: norm(ve.pp("conv_norm_out"), g, last)?,
            enc_out: Conv::new(ve.pp("conv_out"), last, 2 * lc, 3, 1)?,
            quant: Conv::new(vb.pp("quant_conv"), 2 * lc, 2 * lc, 1, 1)?,
            post_quant: Conv::new(vb.pp("post_quant_conv"), lc, lc, 1, 1)?,
            dec_in: Conv::new(vd.pp("conv_in"), lc, last, 3, 1)?,
            dec_mid: Mid::new(vd.pp("mid_block"), last, g)?,
            up,
            dec_norm: norm(vd.pp("conv_norm_out"), g, ch[0])?,
            dec_out: Conv::new(vd.pp("conv_out"), ch[0], 3, 3, 1)?,
        })
    }

    /// (B, 2·latent, h, w): mean then log-variance, as diffusers splits them.
    fn moments(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.enc_in.forward(x)?;
        for block in &self.down {
            for r in &block.resnets {
                x = r.forward(&x)?;
            }
            if let Some(conv) = &block.resample {
                // diffusers pads (0, 1, 0, 1) before the stride-2 convolution.
                let padded = x
                    .pad_with_zeros(D::Minus1, 0, 1)?
                    .pad_with_zeros(D::Minus2, 0, 1)?;
                x = conv.forward(&padded)?;
            }
        }
        let x = self.enc_mid.forward(&x)?;
        let x = self.enc_out.forward(&silu_norm(&self.enc_norm, &x)?)?;
        self.quant.forward(&x)
    }

    fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let x = self.dec_in.forward(&self.post_quant.forward(z)?)?;
        let mut x = self.dec_mid.forward(&x)?;
        for block in &self.up {
            for r in &block.resnets {
                x = r.forward(&x)?;
            }
            if let Some(conv) = &block.resample {
                x = conv.forward(&upsample2(&x)?)?;
            }
        }
        self.dec_out.forward(&silu_norm(&self.dec_norm, &x)?)
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

/// A per-pixel weight `(B, 1, H, W)` on the reconstruction error and the mean it is normalised by.
#[derive(Debug, Clone, Copy)]
pub struct PixelWeight<'a> {
    pub weight: &'a Tensor,
    pub mean: f64,
}

/// A step's loss and its parts as numbers (a sharded step has no single graph to hold them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossValues {
    pub total: f32,
    pub recon: f32,
    pub kl: f32,
}

/// The VAE on live variables.
pub struct TrainableVae {
    varmap: VarMap,
    net: Network,
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
        let net = Network::new(vb, config)?;
        init(&varmap, config.seed, device)?;
        Ok(Self {
            varmap,
            net,
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
        let m = self.net.moments(images)?;
        let lc = self.config.latent_channels;
        Ok((
            m.narrow(1, 0, lc)?,
            m.narrow(1, lc, lc)?.clamp(-30f32, 20f32)?,
        ))
    }

    /// Decodes unscaled latents (not × scaling factor) to images in ≈[−1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.net.decode(z)
    }

    /// The loss on `images` with the posterior sampled by `noise` (standard normal, latent-shaped).
    pub fn loss(&self, images: &Tensor, noise: &Tensor) -> Result<VaeLoss> {
        self.loss_of(images, noise, None)
    }

    /// The loss with the reconstruction error weighted per pixel and normalised by `weight.mean` — the
    /// whole batch's mean weight when `images` is one shard of it, so that the shards' losses weighted by
    /// their share of the batch sum to the batch's loss (a shard's own mean weight would not).
    pub fn loss_of(
        &self,
        images: &Tensor,
        noise: &Tensor,
        weight: Option<PixelWeight<'_>>,
    ) -> Result<VaeLoss> {
        let (mean, logvar) = self.moments(images)?;
        let z = (&mean + (logvar.affine(0.5, 0.0)?.exp()? * noise)?)?;
        let err = (self.decode(&z)? - images)?.sqr()?;
        let recon = match weight {
            None => err.mean_all()?,
            Some(w) => (err.broadcast_mul(w.weight)?.mean_all()? / w.mean)?,
        };
        let kl = (((mean.sqr()? + logvar.exp()?)? - 1.0)? - &logvar)?
            .affine(0.5, 0.0)?
            .mean_all()?;
        let total = (&recon + (&kl * self.config.kl_weight)?)?;
        Ok(VaeLoss { total, recon, kl })
    }

    /// One training step's forward and backward on `images`, split into `shards` that run concurrently
    /// ([`shard::backward`]): the gradients of every variable summed over the shards (`None` when a
    /// shard's loss is not finite) and the batch's loss, reconstruction and KL. The samples are
    /// independent (GroupNorm normalises each alone), so the sum is the whole batch's gradient up to f32
    /// rounding.
    pub fn batch_backward(
        &self,
        images: &Tensor,
        noise: &Tensor,
        weight: Option<&Tensor>,
        shards: &[Range<usize>],
    ) -> Result<(Option<GradStore>, LossValues)> {
        let b = images.dim(0)?;
        // Normalised by the whole batch's mean weight in every shard.
        let weight = match weight {
            Some(w) => Some((w, w.mean_all()?.to_scalar::<f32>()? as f64)),
            None => None,
        };
        let vars = sorted_vars(&self.varmap);
        let (grads, outs) = shard::backward(b, shards, &vars, |r| {
            let rows = |t: &Tensor| t.narrow(0, r.start, r.len());
            let w = match weight {
                Some((w, mean)) => Some((rows(w)?, mean)),
                None => None,
            };
            let weight = w.as_ref().map(|(weight, mean)| PixelWeight {
                weight,
                mean: *mean,
            });
            let loss = self.loss_of(&rows(images)?, &rows(noise)?, weight)?;
            Ok(ShardLoss {
                extra: (loss.recon.to_scalar::<f32>()?, loss.kl.to_scalar::<f32>()?),
                loss: loss.total,
            })
        })?;
        let part = |f: fn(&(f32, f32)) -> f32| {
            let values: Vec<f32> = outs.iter().map(|o| f(&o.extra)).collect();
            shard::combine(b, shards, &values)
        };
        let values = LossValues {
            total: shard::batch_loss(b, shards, &outs)?,
            recon: part(|e| e.0),
            kl: part(|e| e.1),
        };
        Ok((grads, values))
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

    /// Writes a diffusers VAE directory: `config.json` and `diffusion_pytorch_model.safetensors`.
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
            .map(|(name, var)| (name, var.as_tensor().clone()))
            .collect();
        let path = dir.join("diffusion_pytorch_model.safetensors");
        candle_core::safetensors::save(&tensors, &path).map_err(|e| Error::Io {
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(())
    }
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

/// A random `crop`² window of each image, its corner on the `grid`-pixel lattice (so crops line up with the
/// latent cells as whole images do), the same window for every tensor of `xs` (images and their weights).
/// With `centres` (row, column per image), only windows holding the image's centre.
fn crop_batch(
    xs: &[&Tensor],
    crop: usize,
    grid: usize,
    centres: Option<&[(usize, usize)]>,
    rng: &mut impl Rng,
) -> Result<Vec<Tensor>> {
    let (b, _, h, w) = xs[0].dims4()?;
    // Grid-aligned starts in 0..=limit whose window [start, start + crop) holds `c`.
    let pick = |limit: usize, c: Option<usize>, rng: &mut dyn rand::RngCore| {
        let all = limit / grid;
        let (lo, hi) = match c {
            Some(c) => (
                (c + 1).saturating_sub(crop).div_ceil(grid),
                (c / grid).min(all),
            ),
            None => (0, all),
        };
        let (lo, hi) = if lo <= hi { (lo, hi) } else { (0, all) };
        rng.random_range(lo..=hi) * grid
    };
    let mut out = vec![Vec::with_capacity(b); xs.len()];
    for i in 0..b {
        let c = centres.map(|c| c[i]);
        let top = pick(h - crop, c.map(|c| c.0), rng);
        let left = pick(w - crop, c.map(|c| c.1), rng);
        for (x, list) in xs.iter().zip(&mut out) {
            list.push(x.get(i)?.narrow(1, top, crop)?.narrow(2, left, crop)?);
        }
    }
    out.iter().map(|list| Ok(Tensor::stack(list, 0)?)).collect()
}

/// The training images with what the foreground options need, rendered once.
#[derive(Debug)]
pub struct TrainingPool {
    /// `(count, 3, H, W)` in [−1, 1], as [`training_images`].
    pub images: Tensor,
    /// `(count, 1, H, W)`: 1 where a pixel is not the background colour.
    pub foreground: Tensor,
    /// Each shape's centre (row, column): its foreground's bounding-box centre.
    pub centres: Vec<(usize, usize)>,
}

/// Training images `0..count` (the images of [`training_images`], or of the exported dataset at
/// `dataset`) with their shapes' masks and centres.
pub fn training_pool(
    config: &VaeTrainConfig,
    count: u64,
    dataset: Option<&Path>,
    device: &Device,
) -> Result<TrainingPool> {
    let side = config.image_size as usize;
    let mut images = Vec::with_capacity(count as usize);
    let mut masks = Vec::with_capacity(count as usize * side * side);
    let mut centres = Vec::with_capacity(count as usize);
    for (s, img) in crate::dataset::training_set(dataset, &self::dataset(config)?, count)? {
        let bg = s.scene.background.rgb();
        let (mut y0, mut y1, mut x0, mut x1) = (side, 0, side, 0);
        for (x, y, p) in img.enumerate_pixels() {
            let on = p.0 != bg;
            masks.push(on as u8 as f32);
            if on {
                let (x, y) = (x as usize, y as usize);
                (y0, y1, x0, x1) = (y0.min(y), y1.max(y), x0.min(x), x1.max(x));
            }
        }
        centres.push(if y0 <= y1 {
            ((y0 + y1) / 2, (x0 + x1) / 2)
        } else {
            (side / 2, side / 2)
        });
        images.push(image_to_tensor(&img, device)?);
    }
    Ok(TrainingPool {
        images: Tensor::stack(&images, 0)?,
        foreground: Tensor::from_vec(masks, (count as usize, 1, side, side), device)?,
        centres,
    })
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
    let list = dataset(config)?
        .samples(split, count)
        .iter()
        .map(|s| image_to_tensor(&s.scene.render(config.image_size), device))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&list, 0)?)
}

/// The dataset the VAE trains on: the config's seed and image size.
fn dataset(config: &VaeTrainConfig) -> Result<DatasetConfig> {
    let data = DatasetConfig {
        image_size: config.image_size,
        seed: config.seed,
        ..Default::default()
    };
    data.validate()?;
    Ok(data)
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
    /// Train on this exported dataset (`pixart-train dataset`) instead of rendering the procedural one.
    pub dataset: Option<PathBuf>,
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
    /// Reconstruction MSE of decode(mean) on 8 held-out images (combinations never trained on) when this
    /// process started and when it ended: a noise-free view of progress (per-step losses swing with the
    /// batch).
    pub probe_mse: (f32, f32),
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
    let mut config_json = serde_json::to_value(config).expect("the config serialises");
    if let Some(dir) = &opts.dataset {
        config_json["inputs"] = crate::inputs::fingerprints(&[("dataset", dir.clone())])?;
    }
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
    let probe = images(config, Split::HeldOut, 8, device)?;
    let probe_before = model.reconstruction_mse(&probe)?;
    let TrainingPool {
        images: pool,
        foreground,
        centres,
    } = training_pool(config, config.dataset_size, opts.dataset.as_deref(), device)?;
    let latent = config.image_size as usize / config.scale_factor();
    let progress = Progress::new(STAGE, step, opts.steps.max(step), opts.progress);
    let mut run = VaeRun {
        start_step,
        records: Vec::new(),
        seconds_per_step: Vec::new(),
        end_step: step,
        vae_dir: None,
        scaling_factor: None,
        probe_mse: (probe_before, probe_before),
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
        let idx_t = Tensor::new(idx.as_slice(), device)?;
        let x = pool.index_select(&idx_t, 0)?;
        let wgt = if config.foreground_weight > 0.0 {
            let mask = foreground.index_select(&idx_t, 0)?;
            Some((mask * config.foreground_weight)?.affine(1.0, 1.0)?)
        } else {
            None
        };
        let batch_centres: Option<Vec<(usize, usize)>> = config
            .crop_on_shape
            .then(|| idx.iter().map(|&i| centres[i as usize]).collect());
        let (x, wgt, latent) = match config.crop_size {
            Some(crop) => {
                let mut xs = vec![&x];
                xs.extend(wgt.as_ref());
                let mut cropped = crop_batch(
                    &xs,
                    crop as usize,
                    config.scale_factor(),
                    batch_centres.as_deref(),
                    &mut rng,
                )?
                .into_iter();
                let x = cropped.next().expect("the images' crop");
                (x, cropped.next(), crop as usize / config.scale_factor())
            }
            None => (x, wgt, latent),
        };
        let noise = seed::randn(
            &mut seed::rng(config.seed, step, Stream::Noise),
            &[config.batch_size, config.latent_channels, latent, latent],
            device,
        )?;
        let shards = shard::default_shards(config.batch_size);
        let (grads, loss) = model.batch_backward(&x, &noise, wgt.as_ref(), &shards)?;
        let value = loss.total;
        let (Some(mut grads), true) = (grads, value.is_finite()) else {
            return Err(Error::NonFiniteLoss {
                stage: STAGE.into(),
                step: step + 1,
                value,
            });
        };
        let grad_norm = clip_grad_norm(&mut grads, &vars, config.grad_clip)?;
        optimizer.step(&grads)?;
        step += 1;
        run.seconds_per_step.push(t0.elapsed().as_secs_f64());
        let record = StepRecord {
            step,
            loss: value,
            recon: loss.recon,
            kl: loss.kl,
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
    run.probe_mse.1 = model.reconstruction_mse(&probe)?;
    if saved != Some(step) {
        checkpoint::save(&ckpt, STAGE, step, &config_json, model.varmap(), &optimizer)?;
    }
    let sample = pool.narrow(0, 0, (config.dataset_size as usize).min(64))?;
    let scaling_factor = model.scaling_factor(&sample)?;
    let vae_dir = opts.out.join("vae");
    model.export(&vae_dir, scaling_factor)?;
    run.vae_dir = Some(vae_dir);
    run.scaling_factor = Some(scaling_factor);
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shape-centred crops hold the centre wherever it is, on the latent grid; plain crops roam.
    #[test]
    fn shape_crops_hold_the_centre() {
        let x = Tensor::zeros((1, 3, 64, 64), DType::F32, &Device::Cpu).unwrap();
        let x = Tensor::arange(0f32, 64.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 64))
            .unwrap()
            .broadcast_add(&x)
            .unwrap();
        let mut rng = seed::rng(5, 0, Stream::Batch);
        // The crop's first column: each pixel of `x` holds its column.
        let left = |centres: Option<&[(usize, usize)]>, rng: &mut _| {
            let out = crop_batch(&[&x], 32, 8, centres, rng).unwrap();
            out[0]
                .flatten_all()
                .unwrap()
                .get(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as usize
        };
        for c in [0usize, 7, 8, 31, 32, 40, 63] {
            for _ in 0..20 {
                let left = left(Some(&[(c, c)]), &mut rng);
                assert_eq!(left % 8, 0);
                assert!(
                    (left..left + 32).contains(&c),
                    "centre {c}, window {left}.."
                );
            }
        }
        let lefts: std::collections::HashSet<usize> =
            (0..200).map(|_| left(None, &mut rng)).collect();
        assert_eq!(lefts.len(), 5, "{lefts:?}");
    }

    /// The foreground mask is exactly the pixels the scene did not paint with its background, and the
    /// centre lies on the shape's box.
    #[test]
    fn foreground_is_the_shape() {
        let config = VaeTrainConfig::default();
        let pool = training_pool(&config, 6, None, &Device::Cpu).unwrap();
        let (mask, centres) = (pool.foreground, pool.centres);
        let data = DatasetConfig {
            seed: config.seed,
            ..Default::default()
        };
        for (i, s) in data.samples(Split::Train, 6).iter().enumerate() {
            let img = s.scene.render(64);
            let bg = s.scene.background.rgb();
            let want = img.pixels().filter(|p| p.0 != bg).count();
            let got = mask
                .get(i)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(got as usize, want);
            let (cy, cx) = centres[i];
            assert_ne!(
                img.get_pixel(cx as u32, cy as u32).0,
                bg,
                "sample {i}: centre off the shape"
            );
        }
    }
}
