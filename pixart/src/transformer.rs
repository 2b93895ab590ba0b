//! `PixArtTransformer2DModel`: the PixArt-α diffusion transformer, as diffusers computes it (spec §2).
//!
//! The forward is split into public pieces so the ControlNet-Transformer adapter (spec §5) can interleave its
//! own blocks without re-implementing anything: [`PixArtTransformer::prepare`] (patch embedding, timestep and
//! caption conditioning), the public [`PixArtTransformer::transformer_blocks`] (each a [`PixArtBlock`] taking
//! the shared [`Conditioning`]) and [`FinalLayer::forward`] (modulation, projection, unpatchify).
//!
//! Training ([`Mode::Train`], from [`PixArtTransformer::trainable`]): the same modules, built over a
//! `VarMap`'s live variables, with every forward-only fused kernel replaced by a differentiable one
//! ([`modulated_layer_norm_train`], [`crate::kernels::gelu_tanh_differentiable`] and
//! [`crate::kernels::softmax_last_dim_differentiable`]: fused kernels with their own backward on f32 CPU
//! tensors, composed tensor ops elsewhere). Both modes compute
//! the same function up to f32 rounding; `pixart-train`'s tests check the gradients and the agreement.

use std::path::Path;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Shape, Tensor};

use crate::attention::{Attention, AttentionKind, MaskPlan, TextKeys, flash_available};
use crate::config::{FeedForwardActivation, TransformerConfig};
use crate::embeddings::{AdaLayerNormSingle, CaptionProjection, Dense, PatchEmbed, linear};
use crate::kernels::contiguous_f32;
pub use crate::weights::Mode;
use crate::weights::{WeightPath, Weights};
use crate::{Error, Result};

/// Checkpoint entries that diffusers ignores and so do we: the learned null caption some converters kept
/// (spec §2.4) and the positional buffer (recomputed for every grid). Not parameters: a trainer leaves them
/// out of its `VarMap`.
pub const IGNORED_TENSORS: &[&str] = &["caption_projection.y_embedding", "pos_embed.pos_embed"];

/// Everything the blocks need besides the image tokens, computed once per forward.
pub struct Conditioning {
    /// `(B, 6, D)`: `adaln_single.linear(silu(emb))`, added to every block's `scale_shift_table`.
    pub t0: Tensor,
    /// `(B, D)`: `emb`, used by the final layer.
    pub embedded_timestep: Tensor,
    /// The projected caption as cross-attention keys (trimmed, biased or packed).
    pub text: TextKeys,
    /// Token grid `(h, w)` = latent size / patch size.
    pub grid: (usize, usize),
}

/// `LN(x)·(1 + scale) + shift` over the last dim, no affine weights, two-pass statistics.
///
/// One fused pass on the CPU (f32); other dtypes and devices fall back to the same arithmetic in f32 with
/// tensor ops. Two-pass (rather than `E[x²] − E[x]²`, which candle's fused layer norm uses) because DiT hidden
/// states can carry large means and the cancellation would cost digits.
pub fn modulated_layer_norm(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    fused_or_composed(x, scale, shift, eps, false)
}

/// The fused kernel on f32 CPU tensors (recording its backward when `backward`), the composed ops elsewhere.
fn fused_or_composed(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    eps: f64,
    backward: bool,
) -> Result<Tensor> {
    let (b, _n, d) = x.dims3()?;
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        let x = x.contiguous()?;
        let scale = scale.reshape((b, d))?.contiguous()?;
        let shift = shift.reshape((b, d))?.contiguous()?;
        let op = ModulatedLayerNorm { eps };
        return Ok(if backward {
            x.apply_op3(&scale, &shift, op)?
        } else {
            x.apply_op3_no_bwd(&scale, &shift, &op)?
        });
    }
    modulated_layer_norm_differentiable(x, scale, shift, eps)
}

/// [`modulated_layer_norm`] that gradients flow through: the fused kernel with its own backward (to `x`,
/// `scale` and `shift`) on f32 CPU tensors, [`modulated_layer_norm_differentiable`] elsewhere (f64 gradient
/// checks go that way).
///
/// Why: the composed form is about ten graph nodes, and candle's backward allocates a zeroed gradient for
/// each before adding into it; in a small DiT's training step, where tensors are small and the per-node cost
/// dominates, one node with a fused backward is the cheaper graph.
pub fn modulated_layer_norm_train(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    fused_or_composed(x, scale, shift, eps, true)
}

/// [`modulated_layer_norm`] with tensor ops only (two-pass statistics in f32, or f64 for an f64 model): has a
/// backward pass, and is
/// the path for devices and dtypes the fused kernel does not cover.
pub fn modulated_layer_norm_differentiable(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let (b, _n, d) = x.dims3()?;
    let scale = scale.reshape((b, d))?;
    let shift = shift.reshape((b, d))?;
    let dtype = x.dtype();
    let work = working_dtype(dtype);
    let xf = x.to_dtype(work)?;
    let mean = xf.mean_keepdim(2)?;
    let xc = xf.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(2)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    let scale = (scale.to_dtype(work)?.unsqueeze(1)? + 1.0)?;
    let shift = shift.to_dtype(work)?.unsqueeze(1)?;
    Ok(xn
        .broadcast_mul(&scale)?
        .broadcast_add(&shift)?
        .to_dtype(dtype)?)
}

/// A row's mean and 1/√(σ² + ε), two-pass: the forward and its backward must normalise alike.
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let d = row.len() as f32;
    let mean = row.iter().sum::<f32>() / d;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d;
    (mean, 1.0 / (var + eps).sqrt())
}

struct ModulatedLayerNorm {
    eps: f64,
}

impl CustomOp3 for ModulatedLayerNorm {
    fn name(&self) -> &'static str {
        "modulated-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let scale = contiguous_f32(s2, l2, self.name())?;
        let shift = contiguous_f32(s3, l3, self.name())?;
        let (b, n, d) = l1.shape().dims3()?;
        let mut out = vec![0f32; x.len()];
        let eps = self.eps as f32;
        for bi in 0..b {
            let sc = &scale[bi * d..(bi + 1) * d];
            let sh = &shift[bi * d..(bi + 1) * d];
            let rows = bi * n * d..(bi + 1) * n * d;
            for (src, dst) in x[rows.clone()]
                .chunks_exact(d)
                .zip(out[rows].chunks_exact_mut(d))
            {
                let (mean, rstd) = row_stats(src, eps);
                for i in 0..d {
                    dst[i] = (src[i] - mean) * rstd * (1.0 + sc[i]) + sh[i];
                }
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        _shift: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, n, d) = x.dims3()?;
        let packed = x.contiguous()?.apply_op3_no_bwd(
            &scale.contiguous()?,
            &grad.contiguous()?,
            &ModulatedLayerNormGrad { eps: self.eps },
        )?;
        // One flat buffer, three contiguous views: dx, then dscale, then dshift.
        let dx = packed.narrow(0, 0, b * n * d)?.reshape((b, n, d))?;
        let dscale = packed.narrow(0, b * n * d, b * d)?.reshape((b, d))?;
        let dshift = packed
            .narrow(0, b * n * d + b * d, b * d)?
            .reshape((b, d))?;
        Ok((Some(dx), Some(dscale), Some(dshift)))
    }
}

/// The modulated layer norm's vector-Jacobian product from `(x, scale, g)`, packed flat as
/// `[dx (B·N·D), dscale (B·D), dshift (B·D)]`. With x̂ = (x − μ)·r, r = 1/√(σ² + ε) and ĝ = g·(1 + scale):
/// dx = r·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)), dscale = Σₙ g·x̂, dshift = Σₙ g.
struct ModulatedLayerNormGrad {
    eps: f64,
}

impl CustomOp3 for ModulatedLayerNormGrad {
    fn name(&self) -> &'static str {
        "modulated-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, n, d) = l1.shape().dims3()?;
        let x = contiguous_f32(s1, l1, self.name())?;
        let scale = contiguous_f32(s2, l2, self.name())?;
        let g = contiguous_f32(s3, l3, self.name())?;
        if g.len() != x.len() || scale.len() != b * d {
            candle_core::bail!(
                "modulated-layer-norm-grad: input, scale and gradient disagree in size"
            );
        }
        let mut out = vec![0f32; b * n * d + 2 * b * d];
        let (dx, rest) = out.split_at_mut(b * n * d);
        let (dscale, dshift) = rest.split_at_mut(b * d);
        let eps = self.eps as f32;
        let mut xn = vec![0f32; d];
        let mut gh = vec![0f32; d];
        for bi in 0..b {
            let sc = &scale[bi * d..(bi + 1) * d];
            let ds = &mut dscale[bi * d..(bi + 1) * d];
            let dh = &mut dshift[bi * d..(bi + 1) * d];
            for row in bi * n..(bi + 1) * n {
                let src = &x[row * d..(row + 1) * d];
                let gr = &g[row * d..(row + 1) * d];
                let (mean, rstd) = row_stats(src, eps);
                let (mut m1, mut m2) = (0f32, 0f32);
                for i in 0..d {
                    xn[i] = (src[i] - mean) * rstd;
                    gh[i] = gr[i] * (1.0 + sc[i]);
                    m1 += gh[i];
                    m2 += gh[i] * xn[i];
                    ds[i] += gr[i] * xn[i];
                    dh[i] += gr[i];
                }
                let (m1, m2) = (m1 / d as f32, m2 / d as f32);
                for (i, o) in dx[row * d..(row + 1) * d].iter_mut().enumerate() {
                    *o = rstd * (gh[i] - m1 - xn[i] * m2);
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(b * n * d + 2 * b * d)))
    }
}

/// Statistics and softmax precision: f32 for the half types, the model's own dtype otherwise (so an f64 model
/// stays f64 end to end, which finite-difference checks of the gradients rely on).
pub(crate) fn working_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// `LN(x)·(1 + scale) + shift` by the mode's path.
fn modulated_norm(
    mode: Mode,
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    match mode {
        Mode::Inference => modulated_layer_norm(x, scale, shift, eps),
        Mode::Train => modulated_layer_norm_train(x, scale, shift, eps),
    }
}

/// `ff`: `net.2(gelu_tanh(net.0.proj(x)))`, hidden width 4·D.
pub struct FeedForward {
    pub proj_in: Dense,
    pub proj_out: Dense,
    pub activation: FeedForwardActivation,
    /// [`Mode::Train`]: the fused tanh-GELU with a backward pass instead of the forward-only kernel.
    pub mode: Mode,
}

impl FeedForward {
    pub fn load(p: &WeightPath<'_>, dim: usize, activation: FeedForwardActivation) -> Result<Self> {
        let net = p.pp("net");
        Ok(Self {
            proj_in: linear(&net.pp("0"), "proj", dim, 4 * dim, true)?,
            proj_out: linear(&net, "2", 4 * dim, dim, true)?,
            activation,
            mode: p.mode(),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _span = tracing::trace_span!("ff").entered();
        let h = self.proj_in.forward(x)?;
        let h = match (self.activation, self.mode) {
            (FeedForwardActivation::GeluTanh, Mode::Inference) => crate::kernels::gelu_tanh(&h)?,
            (FeedForwardActivation::GeluTanh, Mode::Train) => {
                crate::kernels::gelu_tanh_differentiable(&h)?
            }
            (FeedForwardActivation::GeluErf, _) => h.gelu_erf()?,
        };
        Ok(self.proj_out.forward(&h)?)
    }
}

/// One `BasicTransformerBlock` with `norm_type = "ada_norm_single"` (spec §2.5).
pub struct PixArtBlock {
    /// `(6, D)`: shift/scale/gate for attention, then for the feed-forward.
    pub scale_shift_table: Tensor,
    pub attn1: Attention,
    pub attn2: Attention,
    pub ff: FeedForward,
    pub eps: f64,
    pub mode: Mode,
}

impl PixArtBlock {
    pub fn load(p: &WeightPath<'_>, cfg: &TransformerConfig) -> Result<Self> {
        let d = cfg.inner_dim();
        let (h, hd) = (cfg.num_attention_heads, cfg.attention_head_dim);
        Ok(Self {
            scale_shift_table: p.get("scale_shift_table", (6, d))?,
            attn1: Attention::load(
                &p.pp("attn1"),
                AttentionKind::SelfAttention,
                d,
                d,
                h,
                hd,
                cfg.attention_bias,
            )?,
            attn2: Attention::load(
                &p.pp("attn2"),
                AttentionKind::CrossAttention,
                d,
                cfg.cross_attention_dim,
                h,
                hd,
                cfg.attention_bias,
            )?,
            ff: FeedForward::load(&p.pp("ff"), d, cfg.activation_fn)?,
            eps: cfg.norm_eps,
            mode: p.mode(),
        })
    }

    /// `x` `(B, N, D)` → `(B, N, D)`.
    pub fn forward(&self, x: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        let m = cond
            .t0
            .broadcast_add(&self.scale_shift_table.unsqueeze(0)?)?; // (B, 6, D)
        let chunk = |i: usize| m.narrow(1, i, 1);
        let (shift_msa, scale_msa, gate_msa) = (chunk(0)?, chunk(1)?, chunk(2)?);
        let (shift_mlp, scale_mlp, gate_mlp) = (chunk(3)?, chunk(4)?, chunk(5)?);

        let h = {
            let _s = tracing::trace_span!("norm").entered();
            modulated_norm(self.mode, x, &scale_msa, &shift_msa, self.eps)?
        };
        let a = self.attn1.self_attention(&h)?;
        let x = (x + a.broadcast_mul(&gate_msa)?)?;

        // Cross-attention: no norm, no modulation, no gate.
        let x = (&x + self.attn2.cross_attention(&x, &cond.text)?)?;

        let h = {
            let _s = tracing::trace_span!("norm").entered();
            modulated_norm(self.mode, &x, &scale_mlp, &shift_mlp, self.eps)?
        };
        let f = self.ff.forward(&h)?;
        Ok((x + f.broadcast_mul(&gate_mlp)?)?)
    }
}

/// `norm_out` + `scale_shift_table` + `proj_out` + unpatchify (spec §2.7).
pub struct FinalLayer {
    /// `(2, D)`: shift, scale.
    pub scale_shift_table: Tensor,
    pub proj_out: Dense,
    pub patch_size: usize,
    pub out_channels: usize,
    pub mode: Mode,
}

impl FinalLayer {
    /// Tokens `(B, N, D)` → output `(B, out_channels, h·p, w·p)`.
    pub fn forward(&self, x: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        let _span = tracing::trace_span!("final").entered();
        let (b, _, _) = x.dims3()?;
        let (h, w) = cond.grid;
        let (p, c) = (self.patch_size, self.out_channels);
        let m = cond
            .embedded_timestep
            .unsqueeze(1)?
            .broadcast_add(&self.scale_shift_table.unsqueeze(0)?)?;
        let (shift, scale) = (m.narrow(1, 0, 1)?, m.narrow(1, 1, 1)?);
        // diffusers' norm_out has a hard-coded eps of 1e-6, independent of `norm_eps`.
        let x = modulated_norm(self.mode, x, &scale, &shift, 1e-6)?;
        let x = self.proj_out.forward(&x)?;
        Ok(x.reshape((b, h, w, p, p, c))?
            .permute((0, 5, 1, 3, 2, 4))?
            .reshape((b, c, h * p, w * p))?)
    }
}

/// The PixArt-α transformer. All parts are public so adapters can reuse them.
pub struct PixArtTransformer {
    pub config: TransformerConfig,
    pub pos_embed: PatchEmbed,
    pub adaln_single: AdaLayerNormSingle,
    pub caption_projection: CaptionProjection,
    pub transformer_blocks: Vec<PixArtBlock>,
    pub final_layer: FinalLayer,
    dtype: DType,
    device: candle_core::Device,
    num_parameters: usize,
}

impl PixArtTransformer {
    /// Loads a diffusers `transformer/` directory (`config.json` + `diffusion_pytorch_model.safetensors`).
    pub fn load(dir: impl AsRef<Path>, dtype: DType, device: &candle_core::Device) -> Result<Self> {
        let dir = dir.as_ref();
        let _span = tracing::info_span!("transformer.load", dir = %dir.display()).entered();
        let config = TransformerConfig::from_file(dir.join("config.json"))?;
        let weights = Weights::from_safetensors(
            dir.join("diffusion_pytorch_model.safetensors"),
            dtype,
            device,
        )?;
        Self::new(config, &weights)
    }

    /// Builds the model from named weights; every expected tensor must be present with its exact shape, and
    /// every tensor in the source must be used (apart from [`IGNORED_TENSORS`]).
    pub fn new(config: TransformerConfig, weights: &Weights) -> Result<Self> {
        let root = weights.pp("");
        let d = config.inner_dim();
        let pos_embed = PatchEmbed::load(&root.pp("pos_embed"), &config)?;
        let adaln_single = AdaLayerNormSingle::load(&root.pp("adaln_single"), &config)?;
        let caption_projection = CaptionProjection::load(&root.pp("caption_projection"), &config)?;
        let transformer_blocks = (0..config.num_layers)
            .map(|i| PixArtBlock::load(&root.pp(format!("transformer_blocks.{i}")), &config))
            .collect::<Result<Vec<_>>>()?;
        let p = config.patch_size;
        let final_layer = FinalLayer {
            scale_shift_table: root.get("scale_shift_table", (2, d))?,
            proj_out: linear(&root, "proj_out", d, p * p * config.out_channels, true)?,
            patch_size: p,
            out_channels: config.out_channels,
            mode: weights.mode(),
        };
        let unused: Vec<String> = weights
            .unused()
            .into_iter()
            .filter(|n| !IGNORED_TENSORS.contains(&n.as_str()))
            .collect();
        if let Some(name) = unused.first() {
            let hint = if name.contains("resolution_embedder")
                || name.contains("aspect_ratio_embedder")
            {
                " (the config disables micro-conditions but the checkpoint has them: check `sample_size` / \
                 `use_additional_conditions`)"
            } else {
                ""
            };
            return Err(Error::Tensor {
                name: name.clone(),
                message: format!(
                    "unexpected tensor in the checkpoint{hint}; {} unexpected tensor(s) in all",
                    unused.len()
                ),
            });
        }
        Ok(Self {
            config,
            pos_embed,
            adaln_single,
            caption_projection,
            transformer_blocks,
            final_layer,
            dtype: weights.dtype(),
            device: weights.device().clone(),
            num_parameters: weights.used_parameter_count(),
        })
    }

    /// A [`Mode::Train`] model over the variables of `varmap`, which must hold exactly the model's
    /// parameters with their diffusers names and shapes (errors name a missing, misshapen or unexpected
    /// variable). The model reads the live variables: after an optimiser step its forward uses the new
    /// values, and `loss.backward()` reaches every variable.
    pub fn trainable(config: TransformerConfig, varmap: &candle_nn::VarMap) -> Result<Self> {
        let weights = Weights::from_varmap(varmap)?;
        if let Some(name) = IGNORED_TENSORS.iter().find(|n| weights.contains(n)) {
            return Err(Error::Tensor {
                name: name.to_string(),
                message:
                    "is not a parameter of the model (the forward never reads it): leave it out of \
                          the VarMap"
                        .into(),
            });
        }
        Self::new(config, &weights)
    }

    /// Which path the forward takes.
    pub fn mode(&self) -> Mode {
        self.final_layer.mode
    }

    /// Parameters loaded from the checkpoint (611,349,152 for PixArt-XL-2-1024-MS).
    pub fn num_parameters(&self) -> usize {
        self.num_parameters
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &candle_core::Device {
        &self.device
    }

    /// Embeds the latents and builds the shared conditioning (spec §2.1 steps 1–3).
    ///
    /// * `x` `(B, in_channels, H, W)`, H and W multiples of the patch size (any aspect ratio);
    /// * `timestep` `(B,)` float (a single value is broadcast to the batch);
    /// * `y` `(B, L, caption_channels)` text features; `mask` `(B, L)` 1 keep / 0 pad, any dtype;
    /// * `res_ar` = `(resolution (B, 2) [H, W] px, aspect_ratio (B, 1))`, required by micro-condition models.
    ///
    /// Returns the image tokens `(B, N, D)` (in the model dtype) and the conditioning.
    pub fn prepare(
        &self,
        x: &Tensor,
        timestep: &Tensor,
        y: &Tensor,
        mask: Option<&Tensor>,
        res_ar: Option<(&Tensor, &Tensor)>,
    ) -> Result<(Tensor, Conditioning)> {
        let _span = tracing::trace_span!("embed").entered();
        let cfg = &self.config;
        let dims = x.dims();
        if dims.len() != 4 {
            return Err(Error::InvalidInput {
                field: "hidden_states",
                message: format!("expected (B, {}, H, W), got {dims:?}", cfg.in_channels),
            });
        }
        let b = dims[0];
        let grid = (dims[2] / cfg.patch_size, dims[3] / cfg.patch_size);
        let x = x.to_device(&self.device)?.to_dtype(self.dtype)?;
        let tokens = self.pos_embed.forward(&x)?;

        let timestep = match timestep.elem_count() {
            n if n == b => timestep.flatten_all()?,
            1 => timestep.flatten_all()?.broadcast_as(b)?,
            _ => {
                return Err(Error::InvalidInput {
                    field: "timestep",
                    message: format!(
                        "expected ({b},) or a single value, got {:?}",
                        timestep.dims()
                    ),
                });
            }
        };
        let timestep = timestep.to_device(&self.device)?;
        let res_ar = match res_ar {
            Some((r, a)) => Some((r.to_device(&self.device)?, a.to_device(&self.device)?)),
            None => None,
        };
        let tc = self.adaln_single.forward(
            &timestep,
            res_ar.as_ref().map(|(r, a)| (r, a)),
            self.dtype,
        )?;

        let y_dims = y.dims();
        if y_dims.len() != 3 || y_dims[0] != b || y_dims[2] != cfg.caption_channels {
            return Err(Error::InvalidInput {
                field: "encoder_hidden_states",
                message: format!(
                    "expected ({b}, L, {}), got {y_dims:?}",
                    cfg.caption_channels
                ),
            });
        }
        let l = y_dims[1];
        let y = y.to_device(&self.device)?.to_dtype(self.dtype)?;
        let plan = MaskPlan::new(mask, b, l, flash_available(&y))?;
        let text = TextKeys::new(&y, &plan, |t| self.caption_projection.forward(t))?;
        Ok((
            tokens,
            Conditioning {
                t0: tc.t0,
                embedded_timestep: tc.embedded_timestep,
                text,
                grid,
            },
        ))
    }

    /// The full forward: `(B, out_channels, H, W)` in the model dtype (learned-sigma channels included).
    pub fn forward(
        &self,
        x: &Tensor,
        timestep: &Tensor,
        y: &Tensor,
        mask: Option<&Tensor>,
        res_ar: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let (b, _, hh, ww) = x.dims4().map_err(|_| Error::InvalidInput {
            field: "hidden_states",
            message: format!("expected (B, C, H, W), got {:?}", x.dims()),
        })?;
        let _span = tracing::debug_span!("transformer.forward", batch = b, height = hh, width = ww)
            .entered();
        let (mut h, cond) = self.prepare(x, timestep, y, mask, res_ar)?;
        for (i, block) in self.transformer_blocks.iter().enumerate() {
            let _s = tracing::trace_span!("block", index = i).entered();
            h = block.forward(&h, &cond)?;
        }
        self.final_layer.forward(&h, &cond)
    }
}

/// The conformance harness's `transformer` mode (docs/conformance.md) as a library call, so tests run exactly
/// what the command line runs.
pub mod conformance {
    use std::collections::HashMap;
    use std::path::Path;

    use candle_core::{DType, Device, Tensor};

    use super::PixArtTransformer;
    use crate::{Error, Result};

    /// A named input of the contract, or an error naming the missing tensor (shared by every mode).
    pub(crate) fn input<'a>(inputs: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a Tensor> {
        inputs.get(name).ok_or_else(|| Error::Tensor {
            name: name.into(),
            message: "missing from the inputs".into(),
        })
    }

    /// The base forward's inputs, as the `transformer` mode names them (also the controlled mode's).
    pub(crate) struct BaseInputs<'a> {
        pub x: &'a Tensor,
        pub t: &'a Tensor,
        pub y: &'a Tensor,
        pub mask: &'a Tensor,
        pub res_ar: Option<(&'a Tensor, &'a Tensor)>,
    }

    pub(crate) fn base_inputs<'a>(
        model: &PixArtTransformer,
        inputs: &'a HashMap<String, Tensor>,
    ) -> Result<BaseInputs<'a>> {
        Ok(BaseInputs {
            x: input(inputs, "hidden_states")?,
            t: input(inputs, "timestep")?,
            y: input(inputs, "encoder_hidden_states")?,
            mask: input(inputs, "encoder_attention_mask")?,
            res_ar: if model.config.use_additional_conditions {
                Some((input(inputs, "resolution")?, input(inputs, "aspect_ratio")?))
            } else {
                None
            },
        })
    }

    /// Runs one forward on tensors named as in the contract: `hidden_states`, `timestep`,
    /// `encoder_hidden_states`, `encoder_attention_mask` (f32 or i64), and `resolution` / `aspect_ratio` when the
    /// model uses micro-conditions. Returns `sample`.
    pub fn forward_named(
        model: &PixArtTransformer,
        inputs: &HashMap<String, Tensor>,
    ) -> Result<Tensor> {
        let b = base_inputs(model, inputs)?;
        model.forward(b.x, b.t, b.y, Some(b.mask), b.res_ar)
    }

    /// Loads the model from `model_dir` (f32, CPU), reads `inputs`, writes `sample` to `out`.
    pub fn run_files(model_dir: &Path, inputs: &Path, out: &Path) -> Result<()> {
        let model = PixArtTransformer::load(model_dir, DType::F32, &Device::Cpu)?;
        let tensors =
            candle_core::safetensors::load(inputs, &Device::Cpu).map_err(|e| Error::Io {
                path: inputs.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
            })?;
        let sample = forward_named(&model, &tensors)?
            .to_dtype(DType::F32)?
            .contiguous()?;
        let outputs = HashMap::from([("sample".to_string(), sample)]);
        candle_core::safetensors::save(&outputs, out).map_err(|e| Error::Io {
            path: out.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device, Var};

    /// The fused norm's forward and its backward (to x, scale and shift) against the composed form's autograd
    /// in f64, with inputs carrying a large mean (the case two-pass statistics are for).
    #[test]
    fn fused_norm_backward_matches_the_composed_form() -> Result<()> {
        let dev = Device::Cpu;
        for (b, n, d) in [(3, 16, 128), (2, 5, 7)] {
            let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (b, n, d), &dev)? + 3.0)?)?;
            let scale = Var::from_tensor(&Tensor::randn(0f32, 0.5, (b, 1, d), &dev)?)?;
            let shift = Var::from_tensor(&Tensor::randn(0f32, 0.5, (b, 1, d), &dev)?)?;
            let w = Tensor::randn(0f32, 1.0, (b, n, d), &dev)?;
            let y = modulated_layer_norm_train(&x, &scale, &shift, 1e-6)?;
            let grads = (&y * &w)?.sum_all()?.backward()?;

            let to64 =
                |t: &Tensor| -> Result<Var> { Ok(Var::from_tensor(&t.to_dtype(DType::F64)?)?) };
            let (x64, scale64, shift64) = (to64(&x)?, to64(&scale)?, to64(&shift)?);
            let y64 = modulated_layer_norm_differentiable(&x64, &scale64, &shift64, 1e-6)?;
            let grads64 = (&y64 * w.to_dtype(DType::F64)?)?.sum_all()?.backward()?;

            let err = |a: &Tensor, r: &Tensor| -> Result<f32> {
                let r = r.to_dtype(DType::F32)?;
                let scale = r.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
                Ok((a - r)?
                    .abs()?
                    .flatten_all()?
                    .max(D::Minus1)?
                    .to_scalar::<f32>()?
                    / scale)
            };
            assert!(err(&y, &y64)? < 1e-5, "forward ({b},{n},{d})");
            for (name, ours, reference) in [
                ("x", x.as_tensor(), x64.as_tensor()),
                ("scale", scale.as_tensor(), scale64.as_tensor()),
                ("shift", shift.as_tensor(), shift64.as_tensor()),
            ] {
                let ours = grads.get(ours).expect("a gradient reaches every input");
                let reference = grads64.get(reference).expect("a reference gradient");
                assert_eq!(ours.dims(), reference.dims(), "{name}");
                let e = err(ours, reference)?;
                assert!(e < 1e-5, "d{name} ({b},{n},{d}): {e}");
            }
        }
        Ok(())
    }
}
