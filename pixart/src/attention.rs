//! Multi-head attention for the PixArt blocks: `attn1` (self) and `attn2` (cross, over the text tokens).
//!
//! Default path: plain matmul + softmax, with the softmax in f32 whatever the model dtype (spec §6.6) and the
//! text mask as an additive bias of −10000 on padded keys, exactly as diffusers' processor applies it.
//! Padded keys that every row ignores are trimmed away before attention ([`TextKeys::new`]): `exp(−10000)`
//! is exactly 0 in f32, so this changes no result and saves the key/value projections of the padding.
//!
//! With the `flash-attn` feature, on CUDA in f16/bf16, self-attention uses candle-flash-attn and
//! cross-attention packs only the valid text tokens of every row (variable-length flash attention), which is
//! what the bias approximates and what the original PixArt code does with xformers (spec §2.6, §6.16).

use candle_core::{D, DType, Module, Tensor};

use crate::embeddings::{Dense, linear};
use crate::weights::{Mode, WeightPath};
use crate::{Error, Result};

/// The projected text tokens as every cross-attention of one forward sees them. Built once per forward.
#[derive(Debug, Clone)]
pub enum TextKeys {
    /// `(B, L, D)`: every key is attended to.
    Dense(Tensor),
    /// `(B, L, D)` plus an f32 bias `(B, 1, 1, L)`: 0 for kept keys, −10000 for padding.
    Biased { tokens: Tensor, bias: Tensor },
    /// Valid tokens of all rows back to back `(total, D)` and cumulative lengths `(B+1,)` u32 (flash path).
    Packed {
        tokens: Tensor,
        cu_seqlens: Tensor,
        max_len: usize,
        lens: Vec<usize>,
    },
}

/// How the text mask selects keys, decided on the host from the mask values.
#[derive(Debug, Clone, PartialEq)]
pub enum MaskPlan {
    /// Use the first `len` tokens of every row, all of them valid: no bias.
    Prefix { len: usize },
    /// Use the first `len` tokens with the diffusers bias `(1 − mask)·(−10000)` over them.
    Bias { len: usize, bias: Vec<f32> },
    /// Binary mask: the valid token indices of each row (for packing).
    Rows { valid: Vec<Vec<usize>> },
}

impl MaskPlan {
    /// Plans the keys for a `(B, L)` mask (`None` = all valid). `packed` asks for [`MaskPlan::Rows`] when the
    /// mask is binary and no row is empty (flash attention cannot express anything else).
    pub fn new(mask: Option<&Tensor>, b: usize, l: usize, packed: bool) -> Result<Self> {
        let Some(mask) = mask else {
            return Ok(MaskPlan::Prefix { len: l });
        };
        if mask.dims() != [b, l] {
            return Err(Error::InvalidInput {
                field: "encoder_attention_mask",
                message: format!("expected shape ({b}, {l}), got {:?}", mask.dims()),
            });
        }
        let m = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let binary = m.iter().flatten().all(|v| *v == 0.0 || *v == 1.0);
        let any_empty = m.iter().any(|row| row.iter().all(|v| *v == 0.0));
        if packed && binary && !any_empty {
            let valid = m
                .iter()
                .map(|row| (0..l).filter(|&i| row[i] != 0.0).collect())
                .collect();
            return Ok(MaskPlan::Rows { valid });
        }
        // A fully masked row softmaxes over all its (equally penalised) keys in diffusers: keep them all.
        let len = if any_empty {
            l
        } else {
            m.iter()
                .map(|row| row.iter().rposition(|v| *v != 0.0).map_or(0, |p| p + 1))
                .max()
                .unwrap_or(0)
        };
        if m.iter().all(|row| row[..len].iter().all(|v| *v == 1.0)) {
            return Ok(MaskPlan::Prefix { len });
        }
        let bias = m
            .iter()
            .flat_map(|row| row[..len].iter().map(|v| (1.0 - v) * -10000.0))
            .collect();
        Ok(MaskPlan::Bias { len, bias })
    }
}

impl TextKeys {
    /// Applies `project` (the caption projection) to the text features `y` `(B, L, C)` restricted to the keys
    /// the mask plan keeps.
    pub fn new(
        y: &Tensor,
        plan: &MaskPlan,
        project: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Self> {
        let (b, l, _) = y.dims3()?;
        match plan {
            MaskPlan::Prefix { len } => {
                let y = if *len == l {
                    y.clone()
                } else {
                    y.narrow(1, 0, *len)?
                };
                Ok(TextKeys::Dense(project(&y)?))
            }
            MaskPlan::Bias { len, bias } => {
                let y = if *len == l {
                    y.clone()
                } else {
                    y.narrow(1, 0, *len)?
                };
                let bias = Tensor::from_slice(bias, (b, 1, 1, *len), y.device())?;
                Ok(TextKeys::Biased {
                    tokens: project(&y)?,
                    bias,
                })
            }
            MaskPlan::Rows { valid } => {
                let mut idx = Vec::new();
                let mut cu = vec![0u32];
                for (r, row) in valid.iter().enumerate() {
                    idx.extend(row.iter().map(|&i| (r * l + i) as u32));
                    cu.push(idx.len() as u32);
                }
                let lens: Vec<usize> = valid.iter().map(|r| r.len()).collect();
                let n = idx.len();
                let idx = Tensor::from_vec(idx, n, y.device())?;
                let flat = y.reshape((b * l, ()))?.index_select(&idx, 0)?;
                let cu_seqlens = Tensor::from_vec(cu, b + 1, y.device())?;
                let max_len = lens.iter().copied().max().unwrap_or(0);
                Ok(TextKeys::Packed {
                    tokens: project(&flat)?,
                    cu_seqlens,
                    max_len,
                    lens,
                })
            }
        }
    }
}

/// Whether the fused flash-attention kernels apply to tensors like `x`.
pub fn flash_available(x: &Tensor) -> bool {
    cfg!(feature = "flash-attn")
        && x.device().is_cuda()
        && matches!(x.dtype(), DType::F16 | DType::BF16)
}

/// How the q/k/v projections are stored.
enum Projections {
    /// Self-attention: `[q·scale | k | v]` stacked into one `(D, 3D)` matmul.
    Fused { qkv: Dense },
    /// Cross-attention: `q·scale` on the image tokens, `[k | v]` stacked on the text tokens.
    Cross { q: Dense, kv: Dense },
    /// Unfused (weights not materialised, e.g. a shape-only load); `q` is scaled at run time.
    Separate { q: Dense, k: Dense, v: Dense },
}

/// Multi-head attention with diffusers' `to_q`, `to_k`, `to_v`, `to_out.0` weights; `heads × head_dim` is the
/// query width. The softmax scale `1/√head_dim` is folded into the query projection at load time.
///
/// In [`Mode::Train`] nothing is fused or prescaled (the projections read the live variables) and the softmax
/// is candle's composed, differentiable one ([`attend_differentiable`]).
pub struct Attention {
    projections: Projections,
    pub to_out: Dense,
    pub heads: usize,
    pub head_dim: usize,
    mode: Mode,
}

/// Which attention a block position holds (decides how projections are fused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKind {
    SelfAttention,
    CrossAttention,
}

impl Attention {
    pub fn load(
        p: &WeightPath<'_>,
        kind: AttentionKind,
        query_dim: usize,
        kv_dim: usize,
        heads: usize,
        head_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let q = linear(p, "to_q", query_dim, inner, bias)?;
        let k = linear(p, "to_k", kv_dim, inner, bias)?;
        let v = linear(p, "to_v", kv_dim, inner, bias)?;
        // diffusers' `out_bias` defaults to True regardless of `attention_bias`.
        let to_out = linear(p, "to_out.0", inner, query_dim, true)?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let mode = p.mode();
        let projections = match kind {
            _ if mode == Mode::Train => Projections::Separate { q, k, v },
            AttentionKind::SelfAttention => match Dense::concat(&[&q, &k, &v], scale)? {
                Some(qkv) => Projections::Fused { qkv },
                None => Projections::Separate { q, k, v },
            },
            AttentionKind::CrossAttention => {
                match (Dense::concat(&[&q], scale)?, Dense::concat(&[&k, &v], 1.0)?) {
                    (Some(q), Some(kv)) => Projections::Cross { q, kv },
                    _ => Projections::Separate { q, k, v },
                }
            }
        };
        Ok(Self {
            projections,
            to_out,
            heads,
            head_dim,
            mode,
        })
    }

    /// `softmax(q·kᵀ + bias)·v` by the mode's path.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        match self.mode {
            Mode::Inference => attend(q, k, v, bias),
            Mode::Train => attend_differentiable(q, k, v, bias),
        }
    }

    fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    /// `(B, T, H·hd)` to `(B, H, T, hd)`, contiguous.
    fn split_heads(&self, t: &Tensor) -> Result<Tensor> {
        let (b, n, _) = t.dims3()?;
        Ok(t.reshape((b, n, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// Scaled queries `(…, H·hd)`.
    fn queries(&self, x: &Tensor) -> Result<Tensor> {
        let inner = self.heads * self.head_dim;
        Ok(match &self.projections {
            Projections::Fused { qkv } => qkv.forward(x)?.narrow(D::Minus1, 0, inner)?,
            Projections::Cross { q, .. } => q.forward(x)?,
            Projections::Separate { q, .. } => (q.forward(x)? * self.scale())?,
        })
    }

    /// Keys and values `(…, H·hd)` of the context tokens.
    fn keys_values(&self, ctx: &Tensor) -> Result<(Tensor, Tensor)> {
        let inner = self.heads * self.head_dim;
        Ok(match &self.projections {
            Projections::Fused { qkv } => {
                let y = qkv.forward(ctx)?;
                (
                    y.narrow(D::Minus1, inner, inner)?,
                    y.narrow(D::Minus1, 2 * inner, inner)?,
                )
            }
            Projections::Cross { kv, .. } => {
                let y = kv.forward(ctx)?;
                (
                    y.narrow(D::Minus1, 0, inner)?,
                    y.narrow(D::Minus1, inner, inner)?,
                )
            }
            Projections::Separate { k, v, .. } => (k.forward(ctx)?, v.forward(ctx)?),
        })
    }

    /// Self-attention over the image tokens `x` `(B, N, D)`.
    pub fn self_attention(&self, x: &Tensor) -> Result<Tensor> {
        let _span = tracing::trace_span!("attn1").entered();
        let (b, n, _) = x.dims3()?;
        let (h, hd) = (self.heads, self.head_dim);
        let (q, k, v) = match &self.projections {
            Projections::Fused { qkv } => {
                // One matmul, then one copy into (3, B, H, N, hd).
                let y = qkv.forward(x)?.reshape((b, n, 3, h, hd))?;
                if flash_available(x) {
                    let part = |i| y.narrow(2, i, 1)?.squeeze(2)?.contiguous();
                    return self.self_attention_flash(&part(0)?, &part(1)?, &part(2)?, b, n);
                }
                let y = y.permute((2, 0, 3, 1, 4))?.contiguous()?;
                (y.get(0)?, y.get(1)?, y.get(2)?)
            }
            _ => {
                let q = self.queries(x)?;
                let (k, v) = self.keys_values(x)?;
                if flash_available(x) {
                    let shape = (b, n, h, hd);
                    return self.self_attention_flash(
                        &q.reshape(shape)?,
                        &k.reshape(shape)?,
                        &v.reshape(shape)?,
                        b,
                        n,
                    );
                }
                (
                    self.split_heads(&q)?,
                    self.split_heads(&k)?,
                    self.split_heads(&v)?,
                )
            }
        };
        let o = self.attend(&q, &k, &v, None)?;
        let o = o.transpose(1, 2)?.reshape((b, n, ()))?;
        Ok(self.to_out.forward(&o)?)
    }

    /// Cross-attention from the image tokens `x` `(B, N, D)` to the text keys.
    pub fn cross_attention(&self, x: &Tensor, text: &TextKeys) -> Result<Tensor> {
        let _span = tracing::trace_span!("attn2").entered();
        let (b, n, _) = x.dims3()?;
        let (tokens, bias) = match text {
            TextKeys::Dense(t) => (t, None),
            TextKeys::Biased { tokens, bias } => (tokens, Some(bias)),
            TextKeys::Packed {
                tokens,
                cu_seqlens,
                max_len,
                lens,
            } => {
                return self.cross_attention_packed(x, tokens, cu_seqlens, *max_len, lens);
            }
        };
        let q = self.split_heads(&self.queries(x)?)?;
        let (k, v) = self.keys_values(tokens)?;
        let o = self.attend(&q, &self.split_heads(&k)?, &self.split_heads(&v)?, bias)?;
        let o = o.transpose(1, 2)?.reshape((b, n, ()))?;
        Ok(self.to_out.forward(&o)?)
    }

    /// `q`, `k`, `v` `(B, N, H, hd)` with `q` already scaled.
    #[cfg(feature = "flash-attn")]
    fn self_attention_flash(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        b: usize,
        n: usize,
    ) -> Result<Tensor> {
        let o = candle_flash_attn::flash_attn(q, k, v, 1.0, false)?;
        Ok(self.to_out.forward(&o.reshape((b, n, ()))?)?)
    }

    #[cfg(not(feature = "flash-attn"))]
    fn self_attention_flash(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: usize,
        _: usize,
    ) -> Result<Tensor> {
        unreachable!("flash_available() is false without the flash-attn feature")
    }

    /// Packed keys: flash attention over each row's valid tokens; without the kernel (CPU, f32) the rows are
    /// attended one by one, which is the same computation.
    fn cross_attention_packed(
        &self,
        x: &Tensor,
        tokens: &Tensor,
        cu_seqlens: &Tensor,
        max_len: usize,
        lens: &[usize],
    ) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let q = self.queries(x)?;
        let (k, v) = self.keys_values(tokens)?;
        if flash_available(x) {
            return self.cross_attention_varlen(&q, &k, &v, cu_seqlens, max_len, b, n);
        }
        let q = self.split_heads(&q)?;
        let mut outs = Vec::with_capacity(b);
        let mut start = 0;
        for (r, &len) in lens.iter().enumerate() {
            let kr = self.split_heads(&k.narrow(0, start, len)?.unsqueeze(0)?)?;
            let vr = self.split_heads(&v.narrow(0, start, len)?.unsqueeze(0)?)?;
            outs.push(self.attend(&q.narrow(0, r, 1)?, &kr, &vr, None)?);
            start += len;
        }
        let o = Tensor::cat(&outs, 0)?
            .transpose(1, 2)?
            .reshape((b, n, ()))?;
        Ok(self.to_out.forward(&o)?)
    }

    /// `q` `(B, N, H·hd)` scaled; `k`, `v` `(total, H·hd)` packed valid text tokens.
    #[cfg(feature = "flash-attn")]
    #[allow(clippy::too_many_arguments)]
    fn cross_attention_varlen(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cu_seqlens_k: &Tensor,
        max_len: usize,
        b: usize,
        n: usize,
    ) -> Result<Tensor> {
        let (h, hd) = (self.heads, self.head_dim);
        let q = q.reshape((b * n, h, hd))?;
        let total = k.dim(0)?;
        let k = k.contiguous()?.reshape((total, h, hd))?;
        let v = v.contiguous()?.reshape((total, h, hd))?;
        let cu_q: Vec<u32> = (0..=b).map(|i| (i * n) as u32).collect();
        let cu_q = Tensor::from_vec(cu_q, b + 1, q.device())?;
        let o = candle_flash_attn::flash_attn_varlen(
            &q,
            &k,
            &v,
            &cu_q,
            cu_seqlens_k,
            n,
            max_len,
            1.0,
            false,
        )?;
        Ok(self.to_out.forward(&o.reshape((b, n, ()))?)?)
    }

    #[cfg(not(feature = "flash-attn"))]
    #[allow(clippy::too_many_arguments)]
    fn cross_attention_varlen(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<Tensor> {
        unreachable!("flash_available() is false without the flash-attn feature")
    }
}

/// `softmax(q·kᵀ + bias)·v` over `(B, H, T, hd)` tensors, `q` already scaled; softmax in f32.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (b, h, nq, _) = q.dims4()?;
    let nk = k.dim(2)?;
    // Large score matrices (1 GB at 1024 px) are computed a block of queries at a time on the CPU, which
    // bounds memory (64 MB per block) at no cost in speed; GPUs take the whole matrix at once.
    let chunk = if q.device().is_cpu() && b * h * nq * nk > (1 << 22) {
        attention_chunk()
    } else {
        0
    };
    attend_chunked(q, k, v, bias, chunk)
}

/// [`attend`] over blocks of `chunk` query rows (0 = all at once). Rows are independent, so this is the
/// same computation.
pub fn attend_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    chunk: usize,
) -> Result<Tensor> {
    let nq = q.dim(2)?;
    if chunk == 0 || nq <= chunk {
        return attend_block(q, k, v, bias);
    }
    let mut outs = Vec::with_capacity(nq.div_ceil(chunk));
    let mut start = 0;
    while start < nq {
        let len = chunk.min(nq - start);
        outs.push(attend_block(&q.narrow(2, start, len)?, k, v, bias)?);
        start += len;
    }
    Ok(Tensor::cat(&outs, 2)?)
}

/// Query rows per block in [`attend`] on the CPU (`PIXART_ATTN_CHUNK`, 0 = never chunk; default 1024).
fn attention_chunk() -> usize {
    static CHUNK: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CHUNK.get_or_init(|| {
        std::env::var("PIXART_ATTN_CHUNK")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1024)
    })
}

/// [`attend`] with only differentiable ops: the fused softmax with its own backward
/// ([`crate::kernels::softmax_last_dim_differentiable`]; candle's composed one off f32 CPU) instead of candle's
/// `softmax_last_dim` (which has none), no query chunking; the softmax in f32 for half-precision models and in
/// the model's dtype otherwise. For training.
pub fn attend_differentiable(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let scores = q.contiguous()?.matmul(&k.t()?)?;
    let dtype = scores.dtype();
    let work = crate::transformer::working_dtype(dtype);
    let scores = scores.to_dtype(work)?;
    let scores = match bias {
        Some(bias) => scores.broadcast_add(&bias.to_dtype(work)?)?,
        None => scores,
    };
    let probs = crate::kernels::softmax_last_dim_differentiable(&scores)?.to_dtype(dtype)?;
    Ok(probs.matmul(v)?)
}

fn attend_block(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let q = q.contiguous()?;
    let scores = q.matmul(&k.t()?)?;
    let scores = if scores.dtype() == DType::F32 {
        scores
    } else {
        scores.to_dtype(DType::F32)?
    };
    let scores = match bias {
        Some(bias) => scores.broadcast_add(bias)?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let probs = if probs.dtype() == v.dtype() {
        probs
    } else {
        probs.to_dtype(v.dtype())?
    };
    Ok(probs.matmul(v)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .unwrap()
    }

    #[test]
    fn mask_plans() {
        let dev = Device::Cpu;
        let m = Tensor::new(&[[1f32, 1., 0., 0.], [1., 0., 0., 0.]], &dev).unwrap();
        match MaskPlan::new(Some(&m), 2, 4, false).unwrap() {
            MaskPlan::Bias { len, bias } => {
                assert_eq!(len, 2);
                assert_eq!(bias, vec![0.0, 0.0, 0.0, -10000.0]);
            }
            p => panic!("{p:?}"),
        }
        let m = Tensor::new(&[[1i64, 1, 1, 0]], &dev).unwrap();
        assert_eq!(
            MaskPlan::new(Some(&m), 1, 4, false).unwrap(),
            MaskPlan::Prefix { len: 3 }
        );
        let m = Tensor::new(&[[1f32, 0., 1., 0.], [0., 0., 0., 0.]], &dev).unwrap();
        match MaskPlan::new(Some(&m), 2, 4, true).unwrap() {
            MaskPlan::Bias { len, .. } => assert_eq!(len, 4, "an empty row keeps every key"),
            p => panic!("{p:?}"),
        }
        let m = Tensor::new(&[[1f32, 0., 1., 0.], [1., 1., 0., 0.]], &dev).unwrap();
        assert_eq!(
            MaskPlan::new(Some(&m), 2, 4, true).unwrap(),
            MaskPlan::Rows {
                valid: vec![vec![0, 2], vec![0, 1]]
            }
        );
        assert!(MaskPlan::new(Some(&m), 2, 5, false).is_err());
    }

    /// The packed (flash-style) key layout computes the same attention as the diffusers bias.
    #[test]
    fn packed_rows_match_bias() {
        use crate::weights::Weights;
        use std::collections::HashMap;
        let dev = Device::Cpu;
        let d = 16;
        let mut map = HashMap::new();
        for n in ["to_q", "to_k", "to_v", "to_out.0"] {
            map.insert(
                format!("a.{n}.weight"),
                Tensor::randn(0f32, 0.5, (d, d), &dev).unwrap(),
            );
            map.insert(
                format!("a.{n}.bias"),
                Tensor::randn(0f32, 0.1, d, &dev).unwrap(),
            );
        }
        let w = Weights::from_tensors(map, DType::F32, &dev);
        let attn =
            Attention::load(&w.pp("a"), AttentionKind::CrossAttention, d, d, 2, 8, true).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 5, d), &dev).unwrap();
        let y = Tensor::randn(0f32, 1.0, (2, 6, d), &dev).unwrap();
        let mask = Tensor::new(
            &[[1f32, 0., 1., 1., 0., 0.], [1., 1., 0., 0., 0., 0.]],
            &dev,
        )
        .unwrap();
        let id = |t: &Tensor| Ok(t.clone());
        let biased =
            TextKeys::new(&y, &MaskPlan::new(Some(&mask), 2, 6, false).unwrap(), id).unwrap();
        let packed =
            TextKeys::new(&y, &MaskPlan::new(Some(&mask), 2, 6, true).unwrap(), id).unwrap();
        assert!(matches!(biased, TextKeys::Biased { .. }));
        assert!(matches!(packed, TextKeys::Packed { .. }));
        let a = attn.cross_attention(&x, &biased).unwrap();
        let b = attn.cross_attention(&x, &packed).unwrap();
        let diff = max_abs_diff(&a, &b);
        assert!(diff < 1e-5, "{diff}");
    }

    /// The unfused path (taken when weights are not materialised) computes what the fused one does.
    #[test]
    fn separate_and_fused_projections_agree() {
        use crate::weights::Weights;
        use std::collections::HashMap;
        let dev = Device::Cpu;
        let d = 16;
        // Broadcast weights (every row equal, stride 0) are not materialised: Attention keeps them unfused.
        let mut lazy = HashMap::new();
        let mut dense = HashMap::new();
        for n in ["to_q", "to_k", "to_v", "to_out.0"] {
            let w = Tensor::randn(0f32, 0.5, (1, d), &dev)
                .unwrap()
                .broadcast_as((d, d))
                .unwrap();
            let b = Tensor::randn(0f32, 0.1, d, &dev).unwrap();
            dense.insert(format!("a.{n}.weight"), w.contiguous().unwrap());
            lazy.insert(format!("a.{n}.weight"), w);
            dense.insert(format!("a.{n}.bias"), b.clone());
            lazy.insert(format!("a.{n}.bias"), b);
        }
        let lazy = Weights::from_tensors(lazy, DType::F32, &dev);
        let dense = Weights::from_tensors(dense, DType::F32, &dev);
        let x = Tensor::randn(0f32, 1.0, (2, 5, d), &dev).unwrap();
        let y = Tensor::randn(0f32, 1.0, (2, 3, d), &dev).unwrap();
        let text = TextKeys::Dense(y);
        for kind in [AttentionKind::SelfAttention, AttentionKind::CrossAttention] {
            let a = Attention::load(&lazy.pp("a"), kind, d, d, 2, 8, true).unwrap();
            let b = Attention::load(&dense.pp("a"), kind, d, d, 2, 8, true).unwrap();
            assert!(matches!(a.projections, Projections::Separate { .. }));
            assert!(!matches!(b.projections, Projections::Separate { .. }));
            let (oa, ob) = match kind {
                AttentionKind::SelfAttention => {
                    (a.self_attention(&x).unwrap(), b.self_attention(&x).unwrap())
                }
                AttentionKind::CrossAttention => (
                    a.cross_attention(&x, &text).unwrap(),
                    b.cross_attention(&x, &text).unwrap(),
                ),
            };
            // Every row of a broadcast weight is the same, so outputs reach ~40 and the two gemm
            // paths' rounding differs by up to ~2e-5 (300 random draws); a wrong projection is O(1).
            let diff = max_abs_diff(&oa, &ob);
            assert!(diff < 1e-4, "{kind:?}: {diff}");
        }
    }

    #[test]
    fn chunked_attention_is_exact() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 2, 37, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 2, 11, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 2, 11, 8), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, (2, 1, 1, 11), &dev).unwrap();
        let whole = attend_chunked(&q, &k, &v, Some(&bias), 0).unwrap();
        let blocks = attend_chunked(&q, &k, &v, Some(&bias), 5).unwrap();
        // Same math; only gemm's blocking may round differently.
        assert!(max_abs_diff(&whole, &blocks) < 1e-5);
    }
}
