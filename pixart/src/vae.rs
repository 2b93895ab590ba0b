//! The Stable-Diffusion VAE (`AutoencoderKL`) that PixArt uses, via candle-transformers.
//!
//! Always f32: the config says `force_upcast: true` because the SD VAE overflows in f16 (black or
//! NaN frames); the VAE is a small share of the render time, so nothing is gained by going lower.
//!
//! * [`Vae::decode`] takes latents *as the sampler produced them* and divides by `scaling_factor`
//!   itself, so callers cannot forget it.
//! * [`Vae::encode_mean`] returns the posterior **mean** × `scaling_factor`: deterministic, which is
//!   what control-image encoding and the conformance harness need. candle's `AutoEncoderKL::encode`
//!   only exposes a *sampled* posterior, so the encoder path is rebuilt here from candle's public
//!   blocks (same weights, same keys) and loaded lazily on first use.
//!
//! ```no_run
//! # fn main() -> pixart::Result<()> {
//! let vae = pixart::vae::Vae::load(std::path::Path::new("model/vae"), &candle_core::Device::Cpu)?;
//! let latents = candle_core::Tensor::zeros((1, 4, 8, 8), candle_core::DType::F32, &candle_core::Device::Cpu)?;
//! let image = vae.decode(&latents)?; // (1, 3, 64, 64), ≈[-1, 1]
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    DownEncoderBlock2D, DownEncoderBlock2DConfig, UNetMidBlock2D, UNetMidBlock2DConfig,
};
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use serde_json::Value;

use crate::loading::{mmap_var_builder, read_json_object};
use crate::{Error, Result};

/// The parts of `vae/config.json` that shape the network, checked against what candle implements.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
}

/// Keys diffusers writes that do not change the SD-VAE computation here.
const VAE_IGNORED_KEYS: &[&str] = &[
    "sample_size",
    "force_upcast",
    "latents_mean",
    "latents_std",
    "shift_factor",
];

impl VaeConfig {
    /// Reads `config.json` from a VAE directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let map = read_json_object(&path)?;
        Self::from_map(&map, &path)
    }

    fn from_map(map: &serde_json::Map<String, Value>, path: &Path) -> Result<Self> {
        let err = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        let get = |k: &str| map.get(k).ok_or_else(|| err(format!("missing key `{k}`")));
        let uint = |k: &str| -> Result<usize> {
            get(k)?
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| err(format!("key `{k}` must be a non-negative integer")))
        };
        let opt_bool = |k: &str, default: bool| -> Result<bool> {
            match map.get(k) {
                None => Ok(default),
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| err(format!("key `{k}` must be true or false"))),
            }
        };
        for key in map.keys() {
            let known = [
                "in_channels",
                "out_channels",
                "latent_channels",
                "block_out_channels",
                "layers_per_block",
                "norm_num_groups",
                "scaling_factor",
                "use_quant_conv",
                "use_post_quant_conv",
                "down_block_types",
                "up_block_types",
                "act_fn",
                "mid_block_add_attention",
            ];
            if !(key.starts_with('_')
                || known.contains(&key.as_str())
                || VAE_IGNORED_KEYS.contains(&key.as_str()))
            {
                return Err(err(format!("unknown key `{key}` for an AutoencoderKL")));
            }
        }
        let block_out_channels: Vec<usize> = get("block_out_channels")?
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|v| v.as_u64().map(|n| n as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                err("key `block_out_channels` must be a non-empty list of integers".into())
            })?;
        let check_types = |k: &str, want: &str| -> Result<()> {
            if let Some(v) = map.get(k) {
                let ok = v.as_array().is_some_and(|a| {
                    a.len() == block_out_channels.len()
                        && a.iter().all(|x| x.as_str() == Some(want))
                });
                if !ok {
                    return Err(err(format!(
                        "key `{k}`: only {} × \"{want}\" is supported, got {v}",
                        block_out_channels.len()
                    )));
                }
            }
            Ok(())
        };
        check_types("down_block_types", "DownEncoderBlock2D")?;
        check_types("up_block_types", "UpDecoderBlock2D")?;
        if let Some(v) = map.get("act_fn")
            && v.as_str() != Some("silu")
        {
            return Err(err(format!(
                "key `act_fn`: only \"silu\" is supported, got {v}"
            )));
        }
        if !opt_bool("mid_block_add_attention", true)? {
            return Err(err(
                "key `mid_block_add_attention`: false is not supported".into()
            ));
        }
        let norm_num_groups = uint("norm_num_groups")?;
        if norm_num_groups == 0 || block_out_channels.iter().any(|c| c % norm_num_groups != 0) {
            return Err(err(format!(
                "key `norm_num_groups` ({norm_num_groups}) must divide every `block_out_channels` entry"
            )));
        }
        let scaling_factor = get("scaling_factor")?
            .as_f64()
            .filter(|s| *s > 0.0)
            .ok_or_else(|| err("key `scaling_factor` must be a positive number".into()))?;
        Ok(Self {
            in_channels: uint("in_channels")?,
            out_channels: uint("out_channels")?,
            latent_channels: uint("latent_channels")?,
            layers_per_block: uint("layers_per_block")?,
            block_out_channels,
            norm_num_groups,
            scaling_factor,
            use_quant_conv: opt_bool("use_quant_conv", true)?,
            use_post_quant_conv: opt_bool("use_post_quant_conv", true)?,
        })
    }

    /// Pixels per latent pixel: `2^(levels − 1)` (8 for the SD VAE).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    fn candle(&self) -> AutoEncoderKLConfig {
        AutoEncoderKLConfig {
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: self.layers_per_block,
            latent_channels: self.latent_channels,
            norm_num_groups: self.norm_num_groups,
            use_quant_conv: self.use_quant_conv,
            use_post_quant_conv: self.use_post_quant_conv,
        }
    }
}

/// diffusers' `Encoder` + `quant_conv`, rebuilt from candle's public blocks so the posterior mean
/// is reachable.
struct MeanEncoder {
    conv_in: candle_nn::Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: candle_nn::GroupNorm,
    conv_out: candle_nn::Conv2d,
    quant_conv: Option<candle_nn::Conv2d>,
    latent_channels: usize,
}

impl MeanEncoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> candle_core::Result<Self> {
        let venc = vb.pp("encoder");
        let pad1 = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let ch = &cfg.block_out_channels;
        let conv_in = candle_nn::conv2d(cfg.in_channels, ch[0], 3, pad1, venc.pp("conv_in"))?;
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
        let conv_out =
            candle_nn::conv2d(last, 2 * cfg.latent_channels, 3, pad1, venc.pp("conv_out"))?;
        let quant_conv = if cfg.use_quant_conv {
            Some(candle_nn::conv2d(
                2 * cfg.latent_channels,
                2 * cfg.latent_channels,
                1,
                Default::default(),
                vb.pp("quant_conv"),
            )?)
        } else {
            None
        };
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block,
            conv_norm_out,
            conv_out,
            quant_conv,
            latent_channels: cfg.latent_channels,
        })
    }

    fn mean(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = xs.apply(&self.conv_in)?;
        for block in &self.down_blocks {
            xs = xs.apply(block)?;
        }
        let xs = self
            .mid_block
            .forward(&xs, None)?
            .apply(&self.conv_norm_out)?;
        let xs = candle_nn::ops::silu(&xs)?.apply(&self.conv_out)?;
        let params = match &self.quant_conv {
            Some(q) => q.forward(&xs)?,
            None => xs,
        };
        params.narrow(1, 0, self.latent_channels)
    }
}

/// The loaded VAE (f32).
pub struct Vae {
    config: VaeConfig,
    model: AutoEncoderKL,
    weights: Vec<PathBuf>,
    device: Device,
    encoder: OnceLock<MeanEncoder>,
}

impl std::fmt::Debug for Vae {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vae")
            .field("config", &self.config)
            .field("weights", &self.weights)
            .finish_non_exhaustive()
    }
}

impl Vae {
    /// Loads `config.json` + `diffusion_pytorch_model.safetensors` from a VAE directory.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config = VaeConfig::from_dir(dir)?;
        let weights = crate::loading::find_weights(dir, "diffusion_pytorch_model")?;
        let vb = mmap_var_builder(&weights, DType::F32, device)?;
        let model =
            AutoEncoderKL::new(vb, config.in_channels, config.out_channels, config.candle())
                .map_err(|e| crate::loading::weights_error(&weights, e))?;
        Ok(Self {
            config,
            model,
            weights,
            device: device.clone(),
            encoder: OnceLock::new(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Decodes sampler latents (B, latent_channels, h, w) to images (B, 3, 8h, 8w) in ≈[−1, 1]
    /// (not clamped). Divides by `scaling_factor` first.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let _span = tracing::info_span!("vae_decode", shape = ?latents.dims()).entered();
        self.check_channels(latents, self.config.latent_channels, "latents")?;
        let z =
            (latents.to_dtype(DType::F32)?.to_device(&self.device)? / self.config.scaling_factor)?;
        // Item by item: candle 0.11's `AutoEncoderKL::decode` disagrees with diffusers for
        // batch > 1 (7e-2 relative error on the tiny VAE, 1.5e-6 item by item — see
        // tests/vae_golden.rs), and one item at a time also bounds 1024 px decode memory.
        let mut out = Vec::with_capacity(z.dim(0)?);
        for i in 0..z.dim(0)? {
            out.push(self.model.decode(&z.narrow(0, i, 1)?)?);
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// Encodes images (B, 3, H, W) in [−1, 1] to the posterior mean × `scaling_factor`
    /// (B, latent_channels, H/8, W/8).
    pub fn encode_mean(&self, images: &Tensor) -> Result<Tensor> {
        let _span = tracing::info_span!("vae_encode", shape = ?images.dims()).entered();
        self.check_channels(images, self.config.in_channels, "image")?;
        let f = self.config.scale_factor();
        let (_, _, h, w) = images.dims4()?;
        if h % f != 0 || w % f != 0 {
            return Err(Error::Tensor {
                name: "image".into(),
                message: format!("height and width must be multiples of {f}, got {h}×{w}"),
            });
        }
        let encoder = match self.encoder.get() {
            Some(e) => e,
            None => {
                let vb = mmap_var_builder(&self.weights, DType::F32, &self.device)?;
                let enc = MeanEncoder::new(vb, &self.config)
                    .map_err(|e| crate::loading::weights_error(&self.weights, e))?;
                self.encoder.get_or_init(|| enc)
            }
        };
        let x = images.to_dtype(DType::F32)?.to_device(&self.device)?;
        let mut means = Vec::with_capacity(x.dim(0)?);
        for i in 0..x.dim(0)? {
            means.push(encoder.mean(&x.narrow(0, i, 1)?)?);
        }
        let mean = Tensor::cat(&means, 0)?;
        Ok((mean * self.config.scaling_factor)?)
    }

    fn check_channels(&self, t: &Tensor, want: usize, name: &str) -> Result<()> {
        let dims = t.dims();
        if dims.len() != 4 || dims[1] != want {
            return Err(Error::Tensor {
                name: name.into(),
                message: format!("expected shape (B, {want}, H, W), got {dims:?}"),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_name_the_key() {
        let p = Path::new("vae/config.json");
        let base = serde_json::json!({
            "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [8, 8],
            "layers_per_block": 1, "norm_num_groups": 4, "scaling_factor": 0.18215
        });
        let ok = VaeConfig::from_map(base.as_object().unwrap(), p).unwrap();
        assert_eq!(ok.scale_factor(), 2);
        for (key, val, needle) in [
            ("scaling_factor", Value::Null, "scaling_factor"),
            ("norm_num_groups", serde_json::json!(3), "norm_num_groups"),
            ("frobnicate", serde_json::json!(1), "frobnicate"),
            (
                "down_block_types",
                serde_json::json!(["DownBlock2D", "DownBlock2D"]),
                "down_block_types",
            ),
        ] {
            let mut m = base.as_object().unwrap().clone();
            m.insert(key.into(), val);
            let e = VaeConfig::from_map(&m, p).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        let mut m = base.as_object().unwrap().clone();
        m.remove("latent_channels");
        assert!(
            VaeConfig::from_map(&m, p)
                .unwrap_err()
                .to_string()
                .contains("latent_channels")
        );
    }
}
