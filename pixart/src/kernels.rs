//! Fused CPU kernels for the hot element-wise work of the transformer (tanh-GELU and softmax).
//!
//! Why: candle's CPU GELU and softmax call the scalar libm `tanhf` / `expf` per element; at 256 px a forward
//! evaluates ~33 M GELUs and ~30 M softmax exponentials, a sizeable share of the whole forward next to the
//! matmuls. These kernels use a branch-free `exp` (Cody–Waite range reduction + degree-7 Taylor polynomial,
//! relative error < 2e-7) that LLVM vectorises, and split the work across candle's thread count. Other
//! dtypes and devices fall back to candle's own ops, so results never depend on the path beyond f32 rounding.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};

use crate::Result;

/// `exp(x)` for f32 without branches (so loops over it vectorise). Inputs above 88 are clamped to 88; below
/// −87 the result is exactly 0.
///
/// Why 0 rather than the clamp's e⁻⁸⁷ ≈ 1.6e-38: a softmax over a row with masked keys (bias −10,000) would
/// otherwise give those keys that probability, and the products downstream (probabilities times values, and
/// their gradients) fall into the subnormal range, which the CPU handles slowly: a training step of the small
/// DiT took ~1.5× as long. For inputs far below −87 (a masked key's e⁻¹⁰⁰⁰⁰) 0 is also the closer value.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding and subtracting it rounds to the nearest integer
    let underflow = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let e = p * f32::from_bits(((n as i32 + 127) << 23) as u32);
    if underflow { 0.0 } else { e }
}

/// Runs `f` over `src`/`dst` chunks of `chunk` elements (rows) on candle's worker count.
fn par_rows(src: &[f32], dst: &mut [f32], row: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) {
    let rows = src.len() / row.max(1);
    let threads = candle_core::utils::get_num_threads().clamp(1, rows.max(1));
    if threads == 1 || src.len() < 32 * 1024 {
        for (s, d) in src.chunks(row).zip(dst.chunks_mut(row)) {
            f(s, d);
        }
        return;
    }
    let per = rows.div_ceil(threads) * row;
    std::thread::scope(|scope| {
        for (s, d) in src.chunks(per).zip(dst.chunks_mut(per)) {
            let f = &f;
            scope.spawn(move || {
                for (s, d) in s.chunks(row).zip(d.chunks_mut(row)) {
                    f(s, d);
                }
            });
        }
    });
}

pub(crate) fn contiguous_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: expected a contiguous f32 tensor"),
    }
}

struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "pixart-gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(s, l, self.name())?;
        let mut dst = vec![0f32; src.len()];
        // 0.5·x·(1 + tanh(z)) = x / (1 + exp(−2z)),  z = √(2/π)·(x + 0.044715·x³)
        const C: f32 = 0.797_884_6;
        par_rows(src, &mut dst, 4096, |s, d| {
            for (o, &x) in d.iter_mut().zip(s) {
                let z = C * (x + 0.044_715 * x * x * x);
                *o = x / (1.0 + fast_exp(-2.0 * z));
            }
        });
        Ok((CpuStorage::F32(dst), l.shape().clone()))
    }
}

/// GELU with the tanh approximation (PixArt's `gelu-approximate`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return Ok(x.contiguous()?.apply_op1_no_bwd(&GeluTanh)?);
    }
    Ok(x.gelu()?)
}

/// The same fused tanh-GELU with a backward pass, for training.
///
/// Why: candle's `gelu` backward is a dozen element-wise passes, two of them scalar libm `powf` and one
/// `tanhf`; in the teacher's training step they took about a third of the non-matmul time. This op
/// computes the derivative in one vectorised pass from the saved input.
struct GeluTanhDifferentiable;

impl CustomOp1 for GeluTanhDifferentiable {
    fn name(&self) -> &'static str {
        "pixart-gelu-tanh-differentiable"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        GeluTanh.cpu_fwd(s, l)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad_res.contiguous()?;
        Ok(Some(
            arg.contiguous()?.apply_op2_no_bwd(&grad, &GeluTanhGrad)?,
        ))
    }
}

/// `grad · gelu'(x)`. With s = σ(2z) = ½(1 + tanh z) and 1 − tanh² z = 4s(1 − s):
/// gelu'(x) = s + 2x·s(1 − s)·√(2/π)·(1 + 3·0.044715·x²).
struct GeluTanhGrad;

impl CustomOp2 for GeluTanhGrad {
    fn name(&self) -> &'static str {
        "pixart-gelu-tanh-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let g = contiguous_f32(s2, l2, self.name())?;
        if x.len() != g.len() {
            candle_core::bail!("{}: input and gradient differ in size", self.name());
        }
        const C: f32 = 0.797_884_6;
        let mut dst = vec![0f32; x.len()];
        let kernel = |x: &[f32], g: &[f32], d: &mut [f32]| {
            for ((o, &x), &g) in d.iter_mut().zip(x).zip(g) {
                let x2 = x * x;
                let s = 1.0 / (1.0 + fast_exp(-2.0 * C * (x + 0.044_715 * x2 * x)));
                *o = g * (s + 2.0 * x * s * (1.0 - s) * C * (1.0 + 0.134_145 * x2));
            }
        };
        let threads = candle_core::utils::get_num_threads().max(1);
        if threads == 1 || x.len() < 32 * 1024 {
            kernel(x, g, &mut dst);
        } else {
            let per = x.len().div_ceil(threads);
            std::thread::scope(|scope| {
                for ((x, g), d) in x.chunks(per).zip(g.chunks(per)).zip(dst.chunks_mut(per)) {
                    let kernel = &kernel;
                    scope.spawn(move || kernel(x, g, d));
                }
            });
        }
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }
}

/// Tanh-GELU that gradients flow through: the fused kernel on f32 CPU tensors, candle's op elsewhere.
pub fn gelu_tanh_differentiable(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return Ok(x.contiguous()?.apply_op1(GeluTanhDifferentiable)?);
    }
    Ok(x.gelu()?)
}

struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "pixart-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(s, l, self.name())?;
        let n = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut dst = vec![0f32; src.len()];
        par_rows(src, &mut dst, n, |s, d| {
            let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (o, &v) in d.iter_mut().zip(s) {
                *o = fast_exp(v - max);
                sum += *o;
            }
            let inv = 1.0 / sum;
            for o in d.iter_mut() {
                *o *= inv;
            }
        });
        Ok((CpuStorage::F32(dst), l.shape().clone()))
    }
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return Ok(x.contiguous()?.apply_op1_no_bwd(&SoftmaxLastDim)?);
    }
    Ok(candle_nn::ops::softmax_last_dim(x)?)
}

/// Softmax over the last dimension that gradients flow through: the fused kernel with its own backward on
/// f32 CPU tensors, candle's composed `softmax` elsewhere (f64 gradient checks go that way).
///
/// Why: the composed softmax is five graph nodes (max, subtract, exp, sum, divide), and candle's backward
/// allocates a zeroed gradient for every node before adding into it; in a small DiT's training step, where
/// tensors are small and the per-node cost dominates, one node with a fused backward is the cheaper graph.
pub fn softmax_last_dim_differentiable(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return Ok(x.contiguous()?.apply_op1(SoftmaxLastDimDifferentiable)?);
    }
    Ok(candle_nn::ops::softmax(x, candle_core::D::Minus1)?)
}

struct SoftmaxLastDimDifferentiable;

impl CustomOp1 for SoftmaxLastDimDifferentiable {
    fn name(&self) -> &'static str {
        "pixart-softmax-last-dim-differentiable"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        SoftmaxLastDim.cpu_fwd(s, l)
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad_res.contiguous()?;
        Ok(Some(
            res.contiguous()?.apply_op2_no_bwd(&grad, &SoftmaxGrad)?,
        ))
    }
}

/// `p ⊙ (g − Σⱼ pⱼ gⱼ)` per row: the softmax's vector-Jacobian product from its output `p`.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "pixart-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let p = contiguous_f32(s1, l1, self.name())?;
        let g = contiguous_f32(s2, l2, self.name())?;
        if p.len() != g.len() {
            candle_core::bail!("{}: output and gradient differ in size", self.name());
        }
        let n = l1.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut dst = vec![0f32; p.len()];
        for ((p, g), d) in p.chunks(n).zip(g.chunks(n)).zip(dst.chunks_mut(n)) {
            let dot: f32 = p.iter().zip(g).map(|(p, g)| p * g).sum();
            for ((o, &p), &g) in d.iter_mut().zip(p).zip(g) {
                *o = p * (g - dot);
            }
        }
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let r = (x as f64).exp();
            worst = worst.max(((fast_exp(x) as f64 - r) / r).abs());
            x += 0.013;
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(fast_exp(0.0), 1.0);
        assert_eq!(fast_exp(-1000.0), 0.0);
        assert_eq!(fast_exp(-87.5), 0.0);
    }

    #[test]
    fn gelu_and_softmax_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 3.0, (7, 33, 300), &dev)? * 1.0)?;
        let ours = gelu_tanh(&x)?;
        let reference = x.to_dtype(DType::F64)?.gelu()?.to_dtype(DType::F32)?;
        let err = (ours - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 2e-6, "gelu {err}");
        let big = (Tensor::randn(0f32, 1.0, (2, 40_000), &dev)? * 10.0)?; // the threaded path
        let err = (gelu_tanh(&big)? - big.to_dtype(DType::F64)?.gelu()?.to_dtype(DType::F32)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(err < 1e-5, "gelu threaded {err}");
        let s = (Tensor::randn(0f32, 4.0, (3, 50, 129), &dev)? * 1.0)?;
        let ours = softmax_last_dim(&s)?;
        let reference =
            candle_nn::ops::softmax_last_dim(&s.to_dtype(DType::F64)?)?.to_dtype(DType::F32)?;
        let err = (ours - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        // fast_exp's relative error (< 5e-7) enters both the numerator and the row sum, so a
        // probability near 1 may be off by ~1e-6 plus rounding; the input is unseeded, so keep
        // headroom (a 1.01e-6 draw made a 1e-6 bound flaky).
        assert!(err < 3e-6, "softmax {err}");
        Ok(())
    }

    /// The fused backward against candle's own `gelu` autograd in f64 (the reference formula).
    #[test]
    fn differentiable_gelu_matches_candles_gradient() -> Result<()> {
        let dev = Device::Cpu;
        for (shape, scale) in [(vec![5, 37, 64], 3.0), (vec![2, 40_000], 10.0)] {
            let shape = Shape::from(shape);
            let x =
                candle_core::Var::from_tensor(&(Tensor::randn(0f32, 1.0, &shape, &dev)? * scale)?)?;
            let w = Tensor::randn(0f32, 1.0, &shape, &dev)?; // a non-uniform upstream gradient
            let y = gelu_tanh_differentiable(x.as_tensor())?;
            let grads = (&y * &w)?.sum_all()?.backward()?;
            let ours = grads
                .get(x.as_tensor())
                .expect("a gradient reaches x")
                .clone();

            let x64 = candle_core::Var::from_tensor(&x.as_tensor().to_dtype(DType::F64)?)?;
            let y64 = x64.as_tensor().gelu()?;
            let grads64 = (&y64 * w.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
            let reference = grads64
                .get(x64.as_tensor())
                .expect("a gradient")
                .to_dtype(DType::F32)?;
            let err = (ours - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-5, "gelu gradient {shape:?}: {err}");
            let err = (y - y64.to_dtype(DType::F32)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(err < 1e-5, "gelu forward {shape:?}: {err}");
        }
        Ok(())
    }

    /// The fused softmax's backward against candle's composed softmax autograd in f64.
    #[test]
    fn differentiable_softmax_matches_candles_gradient() -> Result<()> {
        let dev = Device::Cpu;
        for (shape, scale) in [(vec![4, 3, 16, 16], 3.0), (vec![2, 77, 129], 8.0)] {
            let shape = Shape::from(shape);
            let x =
                candle_core::Var::from_tensor(&(Tensor::randn(0f32, 1.0, &shape, &dev)? * scale)?)?;
            let w = Tensor::randn(0f32, 1.0, &shape, &dev)?;
            let y = softmax_last_dim_differentiable(x.as_tensor())?;
            let grads = (&y * &w)?.sum_all()?.backward()?;
            let ours = grads
                .get(x.as_tensor())
                .expect("a gradient reaches x")
                .clone();

            let x64 = candle_core::Var::from_tensor(&x.as_tensor().to_dtype(DType::F64)?)?;
            let y64 = candle_nn::ops::softmax(x64.as_tensor(), candle_core::D::Minus1)?;
            let grads64 = (&y64 * w.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
            let reference = grads64
                .get(x64.as_tensor())
                .expect("a gradient")
                .to_dtype(DType::F32)?;
            let err = (ours - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-5, "softmax gradient {shape:?}: {err}");
            let err = (y - y64.to_dtype(DType::F32)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(err < 3e-6, "softmax forward {shape:?}: {err}");
        }
        Ok(())
    }
}
