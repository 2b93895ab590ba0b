//! Everything that turns inputs into vectors before the blocks run: the patch embedding with its 2-D sin-cos
//! positional table, the timestep / micro-condition embedding (`AdaLayerNormSingle`) and the caption
//! projection. Key names mirror diffusers' module tree so checkpoints load without renaming.
//!
//! The sinusoids are computed on the host in the precision diffusers uses (f64 for the positional table, f32
//! for the timestep table) and only then cast to the model dtype: a half-precision `999 · f_0` is off by a
//! whole radian (spec §6.5).

use std::sync::Mutex;

use candle_core::{D, DType, Device, Module, Tensor};

use crate::config::TransformerConfig;
use crate::weights::{Mode, WeightPath};
use crate::{Error, Result};

/// A linear layer `y = x·Wᵀ + b` that stores `Wᵀ` as a contiguous `(in, out)` matrix.
///
/// Why not `candle_nn::Linear`: it multiplies by a transposed view of the `(out, in)` weight on every call;
/// gemm runs measurably faster (~5–10 % here) on a row-major `(in, out)` right-hand side, and keeping our own
/// type lets the attention fuse its q/k/v projections into one matmul ([`Dense::concat`]).
///
/// In [`Mode::Train`] ([`Dense::live`]) the layer keeps a transposed *view* of the source weight instead, so
/// it reads the live variable (an optimiser step changes what it computes) and gradients reach the variable.
#[derive(Debug, Clone)]
pub struct Dense {
    /// `(in, out)`; a transposed view instead when the source weight is not materialised (shape-only loads)
    /// or the layer is live.
    weight_t: Tensor,
    bias: Option<Tensor>,
    /// Holds views of the source tensors (training): never copied, concatenated or rescaled.
    live: bool,
}

impl Dense {
    /// From a PyTorch-layout weight `(out, in)` and optional bias `(out,)`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let weight_t = if weight.is_contiguous() {
            weight.t()?.contiguous()?
        } else {
            weight.t()?
        };
        Ok(Self {
            weight_t,
            bias,
            live: false,
        })
    }

    /// A layer over the source tensors themselves (a transposed view of `weight`, `bias` as given): what
    /// [`Mode::Train`] builds.
    pub fn live(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            weight_t: weight.t()?,
            bias,
            live: true,
        })
    }

    /// Whether this layer reads its source tensors directly ([`Dense::live`]).
    pub fn is_live(&self) -> bool {
        self.live
    }

    /// Whether the weight is held in memory as its own contiguous copy (false for the broadcast zeros of a
    /// shape-only load and for live layers).
    pub fn is_materialised(&self) -> bool {
        !self.live && self.weight_t.is_contiguous()
    }

    pub fn in_dim(&self) -> usize {
        self.weight_t.dims()[0]
    }

    pub fn out_dim(&self) -> usize {
        self.weight_t.dims()[1]
    }

    /// Stacks layers that read the same input along the output dim (one matmul instead of several), scaling
    /// the first one's output by `first_scale`. `None` unless every part is materialised and biases agree.
    pub fn concat(parts: &[&Dense], first_scale: f64) -> Result<Option<Dense>> {
        if parts.is_empty() || parts.iter().any(|p| !p.is_materialised()) {
            return Ok(None);
        }
        let has_bias = parts[0].bias.is_some();
        if parts.iter().any(|p| p.bias.is_some() != has_bias) {
            return Ok(None);
        }
        let mut ws = vec![(&parts[0].weight_t * first_scale)?];
        ws.extend(parts[1..].iter().map(|p| p.weight_t.clone()));
        let weight_t = Tensor::cat(&ws, 1)?.contiguous()?;
        let bias = if has_bias {
            let mut bs = vec![(parts[0].bias.as_ref().expect("checked") * first_scale)?];
            bs.extend(parts[1..].iter().map(|p| p.bias.clone().expect("checked")));
            Some(Tensor::cat(&bs, 0)?)
        } else {
            None
        };
        Ok(Some(Dense {
            weight_t,
            bias,
            live: false,
        }))
    }
}

impl Module for Dense {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        let k = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / k.max(1);
        let x2 = x.reshape((rows, k))?;
        let y = x2.matmul(&self.weight_t)?;
        let y = match &self.bias {
            // A live layer is being trained: the gradient of a broadcast bias is candle's strided reduce
            // over the rows, one element at a time on one thread (about a tenth of a teacher step). As a
            // rank-1 product `ones · bias` the same sum is a matrix product. The forward is exact (1·b = b).
            Some(b) if self.live => {
                let ones = Tensor::ones((rows, 1), b.dtype(), b.device())?;
                (y + ones.matmul(&b.unsqueeze(0)?)?)?
            }
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = self.out_dim();
        }
        y.reshape(out_dims)
    }
}

/// Loads `name.weight` (out, in) and, when `bias`, `name.bias` (out) as a [`Dense`] layer ([`Dense::live`]
/// in [`Mode::Train`]).
pub fn linear(
    p: &WeightPath<'_>,
    name: &str,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
) -> Result<Dense> {
    let p = p.pp(name);
    let w = p.get("weight", (out_dim, in_dim))?;
    let b = if bias {
        Some(p.get("bias", out_dim)?)
    } else {
        None
    };
    match p.mode() {
        Mode::Inference => Dense::new(w, b),
        Mode::Train => Dense::live(w, b),
    }
}

/// The 2-D sin-cos positional table for a `grid_h × grid_w` token grid, row-major tokens, `embed_dim` wide.
///
/// Matches diffusers' `get_2d_sincos_pos_embed(embed_dim, (grid_h, grid_w), base_size, interpolation_scale)`:
/// positions are `i / (grid / base_size) / interpolation_scale` (so every grid is stretched onto the base
/// grid rather than cropped), the first half of each vector encodes the column coordinate and the second half
/// the row coordinate, each as `[sin(pos·ω), cos(pos·ω)]` with `ω_k = 10000^(-k / (embed_dim/4))`.
pub fn sincos_2d_table(
    embed_dim: usize,
    grid_h: usize,
    grid_w: usize,
    base_size: usize,
    interpolation_scale: f64,
) -> Vec<f32> {
    assert!(
        embed_dim.is_multiple_of(4),
        "embed_dim must be divisible by 4"
    );
    let half = embed_dim / 2; // per axis
    let quarter = half / 2; // sin or cos block
    // diffusers builds positions in f32 (arange / python float / python float), frequencies in f64.
    let positions = |n: usize| -> Vec<f64> {
        let step = (n as f64 / base_size as f64) as f32;
        let scale = interpolation_scale as f32;
        (0..n).map(|i| ((i as f32 / step) / scale) as f64).collect()
    };
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
        .collect();
    let emb_1d = |pos: f64, out: &mut [f32]| {
        for (k, w) in omega.iter().enumerate() {
            let a = pos * w;
            out[k] = a.sin() as f32;
            out[quarter + k] = a.cos() as f32;
        }
    };
    let rows = positions(grid_h);
    let cols = positions(grid_w);
    let mut table = vec![0f32; grid_h * grid_w * embed_dim];
    for (i, &ph) in rows.iter().enumerate() {
        for (j, &pw) in cols.iter().enumerate() {
            let v = &mut table[(i * grid_w + j) * embed_dim..(i * grid_w + j + 1) * embed_dim];
            let (col_half, row_half) = v.split_at_mut(half);
            emb_1d(pw, col_half);
            emb_1d(ph, row_half);
        }
    }
    table
}

/// Sinusoidal embedding of float scalars (timesteps, pixel sizes, aspect ratios): `[cos(t·f_k), sin(t·f_k)]`
/// with `f_k = exp(-ln(10000)·k / (dim/2))` — diffusers' `Timesteps(dim, flip_sin_to_cos=True,
/// downscale_freq_shift=0)`. Always computed in f32; returns f32 `(n, dim)`.
pub fn timestep_sinusoid(t: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let t = t.flatten_all()?.to_dtype(DType::F32)?;
    let ln = -(10000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|k| ((ln * k as f32) / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let emb = Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)?;
    if dim % 2 == 1 {
        return Ok(emb.pad_with_zeros(D::Minus1, 0, 1)?);
    }
    Ok(emb)
}

/// `Conv2d(in, D, kernel=p, stride=p)` patchify plus the fixed positional table (`pos_embed.*`).
///
/// The convolution is done as a reshape and one matmul (the kernel never overlaps), which is exact and much
/// cheaper than candle's im2col convolution.
pub struct PatchEmbed {
    weight: Tensor, // (D, C·p·p)
    bias: Tensor,   // (D,)
    patch_size: usize,
    in_channels: usize,
    embed_dim: usize,
    base_size: usize,
    interpolation_scale: f64,
    /// Last grid's table: every step of a render uses the same grid.
    cache: Mutex<Option<(usize, usize, Tensor)>>,
}

impl PatchEmbed {
    pub fn load(p: &WeightPath<'_>, cfg: &TransformerConfig) -> Result<Self> {
        let (d, c, ps) = (cfg.inner_dim(), cfg.in_channels, cfg.patch_size);
        let p = p.pp("proj");
        let weight = p.get("weight", (d, c, ps, ps))?.reshape((d, c * ps * ps))?;
        let bias = p.get("bias", d)?;
        Ok(Self {
            weight,
            bias,
            patch_size: ps,
            in_channels: c,
            embed_dim: d,
            base_size: cfg.base_size(),
            interpolation_scale: cfg.interpolation_scale,
            cache: Mutex::new(None),
        })
    }

    /// The positional table `(1, h·w, D)` for a token grid, in `dtype` on `device`.
    pub fn positional_table(
        &self,
        h: usize,
        w: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((ch, cw, t)) = cache.as_ref()
            && *ch == h
            && *cw == w
            && t.dtype() == dtype
            && t.device().same_device(device)
        {
            return Ok(t.clone());
        }
        let table = sincos_2d_table(
            self.embed_dim,
            h,
            w,
            self.base_size,
            self.interpolation_scale,
        );
        let t = Tensor::from_vec(table, (1, h * w, self.embed_dim), device)?.to_dtype(dtype)?;
        *cache = Some((h, w, t.clone()));
        Ok(t)
    }

    /// Latents `(B, C, H, W)` to tokens `(B, (H/p)·(W/p), D)` with the positional table added.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, hh, ww) = x.dims4()?;
        let p = self.patch_size;
        if c != self.in_channels
            || !hh.is_multiple_of(p)
            || !ww.is_multiple_of(p)
            || hh == 0
            || ww == 0
        {
            return Err(Error::InvalidInput {
                field: "hidden_states",
                message: format!(
                    "expected (B, {}, H, W) with H and W positive multiples of {p}, got {:?}",
                    self.in_channels,
                    x.dims()
                ),
            });
        }
        let (h, w) = (hh / p, ww / p);
        let patches = x
            .reshape((b, c, h, p, w, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * h * w, c * p * p))?;
        let tokens = patches
            .matmul(&self.weight.t()?)?
            .broadcast_add(&self.bias)?
            .reshape((b, h * w, ()))?;
        let pe = self.positional_table(h, w, x.dtype(), x.device())?;
        Ok(tokens.broadcast_add(&pe)?)
    }
}

/// `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`.
pub struct TimestepEmbedding {
    pub linear_1: Dense,
    pub linear_2: Dense,
}

impl TimestepEmbedding {
    pub fn load(p: &WeightPath<'_>, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: linear(p, "linear_1", in_dim, out_dim, true)?,
            linear_2: linear(p, "linear_2", out_dim, out_dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)?)
    }
}

/// Width of every sinusoid fed to the timestep and size embedders.
pub const SINUSOID_DIM: usize = 256;

/// `adaln_single`: timestep (+ resolution and aspect-ratio micro-conditions) to the block modulation.
pub struct AdaLayerNormSingle {
    pub timestep_embedder: TimestepEmbedding,
    /// `(resolution_embedder, aspect_ratio_embedder)` when the config uses micro-conditions.
    pub size_embedders: Option<(TimestepEmbedding, TimestepEmbedding)>,
    pub linear: Dense,
}

/// What `adaln_single` returns for a batch.
pub struct TimestepConditioning {
    /// `linear(silu(emb))` reshaped to `(B, 6, D)`: the six modulation rows every block adds to its table.
    pub t0: Tensor,
    /// `emb` `(B, D)`, used without SiLU by the final layer.
    pub embedded_timestep: Tensor,
}

impl AdaLayerNormSingle {
    pub fn load(p: &WeightPath<'_>, cfg: &TransformerConfig) -> Result<Self> {
        let d = cfg.inner_dim();
        let emb = p.pp("emb");
        let timestep_embedder =
            TimestepEmbedding::load(&emb.pp("timestep_embedder"), SINUSOID_DIM, d)?;
        let size_embedders = if cfg.use_additional_conditions {
            let s = cfg.size_emb_dim();
            Some((
                TimestepEmbedding::load(&emb.pp("resolution_embedder"), SINUSOID_DIM, s)?,
                TimestepEmbedding::load(&emb.pp("aspect_ratio_embedder"), SINUSOID_DIM, s)?,
            ))
        } else {
            None
        };
        let linear = linear(p, "linear", d, 6 * d, true)?;
        Ok(Self {
            timestep_embedder,
            size_embedders,
            linear,
        })
    }

    /// `timestep` `(B,)` float; `res_ar` = (`resolution` `(B, 2)` [height, width] px, `aspect_ratio` `(B, 1)`),
    /// required exactly when the model uses micro-conditions (ignored otherwise, as diffusers does).
    pub fn forward(
        &self,
        timestep: &Tensor,
        res_ar: Option<(&Tensor, &Tensor)>,
        dtype: DType,
    ) -> Result<TimestepConditioning> {
        let b = timestep.elem_count();
        let t_emb = self
            .timestep_embedder
            .forward(&timestep_sinusoid(timestep, SINUSOID_DIM)?.to_dtype(dtype)?)?;
        let emb = match &self.size_embedders {
            None => t_emb,
            Some((res_embedder, ar_embedder)) => {
                let Some((res, ar)) = res_ar else {
                    return Err(Error::InvalidInput {
                        field: "resolution",
                        message: "this model uses micro-conditions: `resolution` and `aspect_ratio` are required"
                            .into(),
                    });
                };
                if res.elem_count() != 2 * b {
                    return Err(Error::InvalidInput {
                        field: "resolution",
                        message: format!("expected shape ({b}, 2), got {:?}", res.dims()),
                    });
                }
                if ar.elem_count() != b {
                    return Err(Error::InvalidInput {
                        field: "aspect_ratio",
                        message: format!("expected shape ({b}, 1), got {:?}", ar.dims()),
                    });
                }
                let r = res_embedder
                    .forward(&timestep_sinusoid(res, SINUSOID_DIM)?.to_dtype(dtype)?)?
                    .reshape((b, ()))?;
                let a = ar_embedder
                    .forward(&timestep_sinusoid(ar, SINUSOID_DIM)?.to_dtype(dtype)?)?
                    .reshape((b, ()))?;
                (t_emb + Tensor::cat(&[r, a], 1)?)?
            }
        };
        let d = emb.dim(1)?;
        let t0 = self.linear.forward(&emb.silu()?)?.reshape((b, 6, d))?;
        Ok(TimestepConditioning {
            t0,
            embedded_timestep: emb,
        })
    }
}

/// `caption_projection` (PixArtAlphaTextProjection): `linear_2(gelu_tanh(linear_1(y)))`, T5 width to `D`.
pub struct CaptionProjection {
    pub linear_1: Dense,
    pub linear_2: Dense,
}

impl CaptionProjection {
    pub fn load(p: &WeightPath<'_>, cfg: &TransformerConfig) -> Result<Self> {
        let d = cfg.inner_dim();
        Ok(Self {
            linear_1: linear(p, "linear_1", cfg.caption_channels, d, true)?,
            linear_2: linear(p, "linear_2", d, d, true)?,
        })
    }

    pub fn forward(&self, y: &Tensor) -> Result<Tensor> {
        Ok(self.linear_2.forward(&self.linear_1.forward(y)?.gelu()?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pe_table_halves_and_values_at_64() {
        let d = 1152;
        let t = sincos_2d_table(d, 64, 64, 64, 2.0);
        assert_eq!(t.len(), 64 * 64 * d);
        // Token 0: position 0 on both axes -> sin 0, cos 1 in both halves.
        assert!(t[..288].iter().all(|v| *v == 0.0));
        assert!(t[288..576].iter().all(|v| *v == 1.0));
        assert!(t[576..864].iter().all(|v| *v == 0.0));
        assert!(t[864..1152].iter().all(|v| *v == 1.0));
        // Last token (63, 63) sits at position 31.5 on both axes (stretched onto base 64, scale 2).
        let last = &t[(64 * 64 - 1) * d..];
        assert!((last[0] - 31.5f64.sin() as f32).abs() < 1e-6);
        assert!((last[288] - 31.5f64.cos() as f32).abs() < 1e-6);
        let w1 = 1.0 / 10000f64.powf(1.0 / 288.0);
        assert!((last[1] - (31.5 * w1).sin() as f32).abs() < 1e-6);
        // Token (0, 5): column position 2.5 is in the FIRST half, the row half stays at position 0.
        let tok = &t[5 * d..6 * d];
        assert!((tok[0] - 2.5f64.sin() as f32).abs() < 1e-6);
        assert!((tok[288] - 2.5f64.cos() as f32).abs() < 1e-6);
        assert_eq!(tok[576], 0.0);
        assert_eq!(tok[864], 1.0);
        // Token (5, 0): the row coordinate lives in the SECOND half.
        let tok = &t[5 * 64 * d..(5 * 64 + 1) * d];
        assert_eq!(tok[0], 0.0);
        assert!((tok[576] - 2.5f64.sin() as f32).abs() < 1e-6);
    }

    #[test]
    fn pe_table_stretches_non_square_grids() {
        // 32 rows x 64 cols on base 64, scale 2: rows step 1.0, columns step 0.5; both span [0, 32).
        let d = 16;
        let t = sincos_2d_table(d, 32, 64, 64, 2.0);
        let tok = |i: usize, j: usize| &t[(i * 64 + j) * d..(i * 64 + j + 1) * d];
        assert!((tok(0, 63)[0] - 31.5f64.sin() as f32).abs() < 1e-6);
        assert!((tok(31, 0)[8] - 31.0f64.sin() as f32).abs() < 1e-6);
    }

    #[test]
    fn timestep_sinusoid_is_cos_first() {
        let t = Tensor::new(&[0f32, 999.0], &Device::Cpu).unwrap();
        let e = timestep_sinusoid(&t, 256)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(e.len(), 2);
        assert!(e[0][..128].iter().all(|v| *v == 1.0), "cos block first");
        assert!(e[0][128..].iter().all(|v| *v == 0.0), "sin block second");
        // f_0 = 1: cos(999), sin(999); f_1 = exp(-ln(1e4)/128).
        assert!((e[1][0] - 999f32.cos()).abs() < 1e-4);
        assert!((e[1][128] - 999f32.sin()).abs() < 1e-4);
        let f1 = (-(10000f64.ln()) / 128.0).exp();
        assert!((e[1][1] as f64 - (999.0 * f1).cos()).abs() < 1e-3);
    }
}
