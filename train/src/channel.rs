//! Per-channel bias and scale of `(B, C, …)` activations with a backward that reduces in one pass.
//!
//! Written as broadcasts (`x.broadcast_add(&b.reshape((1, C, 1, 1)))`), candle's backward sums the
//! gradient over the batch and spatial axes with its generic strided reduce (`sum_keepdim`), on one
//! thread while the other waits: in a profile of the VAE stage that reduce was ≈ 11 % of a step, nearly
//! all of it the convolutions' biases and the GroupNorms' affine parts. Here each sum is a contiguous
//! loop over the `(image, channel)` planes, and the scale's gradient is formed in the same pass.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use crate::conv::{slice, with_values};

/// `(channels, plane size)` of a contiguous `(B, C, …)` input with a `C`-element per-channel argument.
/// The plane size is at least 1 (an empty input has no planes to visit, and `chunks_exact(0)` panics).
fn planes(x: &Layout, per_channel: &Layout, op: &str) -> candle_core::Result<(usize, usize)> {
    let dims = x.dims();
    if dims.len() < 2 || per_channel.shape().elem_count() != dims[1] {
        candle_core::bail!(
            "{op}: expected (B, C, …) and C values, got {dims:?} and {:?}",
            per_channel.dims()
        );
    }
    let c = dims[1];
    Ok((c, dims[2..].iter().product::<usize>().max(1)))
}

/// `f(channel, value)` over every value of the `(image, channel)` planes of `s` values each.
fn map_planes(x: &[f32], c: usize, s: usize, f: impl Fn(usize, f32) -> f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for (p, plane) in x.chunks_exact(s).enumerate() {
        out.extend(plane.iter().map(|v| f(p % c, *v)));
    }
    out
}

/// Σ over every `(image, channel)` plane of `f(plane index within the channel's planes, value)`,
/// per channel, accumulated in f64.
fn channel_sums(g: &[f32], c: usize, s: usize, mut f: impl FnMut(usize, f32) -> f64) -> Vec<f32> {
    let mut sums = vec![0f64; c];
    for (p, plane) in g.chunks_exact(s).enumerate() {
        let base = p * s;
        sums[p % c] += plane
            .iter()
            .enumerate()
            .map(|(i, v)| f(base + i, *v))
            .sum::<f64>();
    }
    sums.into_iter().map(|v| v as f32).collect()
}

/// The ops' names in errors.
const BIAS: &str = "channel bias";
const AFFINE: &str = "channel affine";

struct Bias;

impl CustomOp2 for Bias {
    fn name(&self) -> &'static str {
        "pixart-train-channel-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (c, s) = planes(l1, l2, BIAS)?;
        let (x, b) = (slice(s1, l1, BIAS)?, slice(s2, l2, BIAS)?);
        let out = map_planes(x, c, s, |ch, v| v + b[ch]);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (c, s) = planes(x.layout(), b.layout(), BIAS)?;
        let db = with_values(grad, BIAS, |g| Ok(channel_sums(g, c, s, |_, v| v as f64)))?;
        Ok((
            Some(grad.clone()),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}

struct Affine;

impl CustomOp3 for Affine {
    fn name(&self) -> &'static str {
        "pixart-train-channel-affine"
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
        let (c, s) = planes(l1, l2, AFFINE)?;
        planes(l1, l3, AFFINE)?;
        let (x, w, b) = (
            slice(s1, l1, AFFINE)?,
            slice(s2, l2, AFFINE)?,
            slice(s3, l3, AFFINE)?,
        );
        let out = map_planes(x, c, s, |ch, v| v * w[ch] + b[ch]);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (c, s) = planes(x.layout(), w.layout(), AFFINE)?;
        let (dx, dw, db) = with_values(grad, AFFINE, |g| {
            with_values(x, AFFINE, |xs| {
                with_values(w, AFFINE, |ws| {
                    Ok((
                        map_planes(g, c, s, |ch, v| v * ws[ch]),
                        channel_sums(g, c, s, |i, v| v as f64 * xs[i] as f64),
                        channel_sums(g, c, s, |_, v| v as f64),
                    ))
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}

/// `x + bias[c]` for `x` of shape `(B, C, …)` and `C` biases (any shape).
pub fn add_bias(x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(&bias.contiguous()?, Bias)
}

/// `x · scale[c] + bias[c]` for `x` of shape `(B, C, …)` and `C` scales and biases (any shape).
pub fn affine(x: &Tensor, scale: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op3(&scale.contiguous()?, &bias.contiguous()?, Affine)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .unwrap()
    }

    /// Values and gradients of every argument agree with the broadcast form candle differentiates itself,
    /// for 4-d activations, 3-d ones and `(B, C)` (planes of one value).
    #[test]
    fn agree_with_broadcast_ops_forward_and_backward() {
        let d = Device::Cpu;
        for dims in [vec![3, 8, 5, 6], vec![2, 4, 7], vec![5, 6]] {
            let c = dims[1];
            let mut shape = vec![1usize; dims.len()];
            shape[1] = c;
            let x = Var::randn(0f32, 1., dims.as_slice(), &d).unwrap();
            let w = Var::randn(0f32, 1., c, &d).unwrap();
            let b = Var::randn(0f32, 1., c, &d).unwrap();
            let r = Tensor::randn(0f32, 1., dims.as_slice(), &d).unwrap();
            let (xt, wr, br) = (
                x.as_tensor(),
                w.as_tensor().reshape(shape.as_slice()).unwrap(),
                b.as_tensor().reshape(shape.as_slice()).unwrap(),
            );
            let cases = [
                (
                    add_bias(xt, b.as_tensor()).unwrap(),
                    xt.broadcast_add(&br).unwrap(),
                    vec![&x, &b],
                ),
                (
                    affine(xt, w.as_tensor(), &br).unwrap(),
                    xt.broadcast_mul(&wr).unwrap().broadcast_add(&br).unwrap(),
                    vec![&x, &w, &b],
                ),
            ];
            for (ours, theirs, vars) in cases {
                assert_eq!(ours.dims(), theirs.dims());
                assert!(max_diff(&ours, &theirs) < 1e-6, "{dims:?}: forward");
                let ga = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let gb = (&theirs * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                for v in vars {
                    let (a, b) = (
                        ga.get(v.as_tensor()).expect("our gradient"),
                        gb.get(v.as_tensor()).expect("candle's gradient"),
                    );
                    assert_eq!(a.dims(), b.dims());
                    let dd = max_diff(a, b);
                    assert!(dd < 1e-4, "{dims:?}: gradient differs by {dd}");
                }
            }
        }
    }

    #[test]
    fn refuses_a_per_channel_argument_of_the_wrong_length() {
        let d = Device::Cpu;
        let x = Tensor::zeros((2, 4, 3, 3), candle_core::DType::F32, &d).unwrap();
        let b = Tensor::zeros(3, candle_core::DType::F32, &d).unwrap();
        let err = add_bias(&x, &b).unwrap_err().to_string();
        assert!(err.contains("channel bias") && err.contains("[3]"), "{err}");
        assert!(affine(&x, &b, &b).is_err());
    }
}
