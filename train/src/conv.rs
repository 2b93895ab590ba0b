//! A 2-D convolution whose backward pass is made of forward convolutions.
//!
//! candle 0.11 differentiates `conv2d` with respect to its input through `conv_transpose2d`, whose CPU
//! kernel is a direct loop: measured on the build machine at 8×16×64×64, 3×3, it takes ≈135 ms against
//! ≈12 ms for the forward convolution and for the same gradient written as a `conv2d` (im2col + gemm), and
//! it made the VAE's backward pass ≈7× its forward. This op computes the same values forward (it calls
//! `conv2d`) and, backward, the input gradient as a correlation of the zero-dilated output gradient with
//! the flipped kernel, the kernel gradient as candle does (also a `conv2d`). f32, CPU, groups 1,
//! dilation 1: what the VAE uses.

use candle_core::{CpuStorage, CustomOp2, D, Device, Layout, Shape, Tensor};

use crate::Result;

struct Conv2d {
    stride: usize,
    padding: usize,
}

fn tensor(storage: &CpuStorage, layout: &Layout) -> candle_core::Result<Tensor> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((a, b)) => Tensor::from_slice(&data[a..b], layout.shape(), &Device::Cpu),
        None => candle_core::bail!("conv2d (fast backward): non-contiguous input"),
    }
}

/// Inserts `s − 1` zeros between the entries of the last two dimensions.
fn dilate(g: &Tensor, s: usize) -> candle_core::Result<Tensor> {
    if s == 1 {
        return Ok(g.clone());
    }
    let (b, c, h, w) = g.dims4()?;
    let z = Tensor::zeros((b, c, h, w, s - 1), g.dtype(), g.device())?;
    let g = Tensor::cat(&[&g.unsqueeze(4)?, &z], 4)?
        .reshape((b, c, h, w * s))?
        .narrow(3, 0, (w - 1) * s + 1)?;
    let w2 = (w - 1) * s + 1;
    let z = Tensor::zeros((b, c, h, s - 1, w2), g.dtype(), g.device())?;
    Tensor::cat(&[&g.unsqueeze(3)?, &z], 3)?
        .reshape((b, c, h * s, w2))?
        .narrow(2, 0, (h - 1) * s + 1)
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "conv2d-forward-conv-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = tensor(s1, l1)?.conv2d(&tensor(s2, l2)?, self.padding, self.stride, 1, 1)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (s, p) = (self.stride, self.padding);
        let (_, _, h, wd) = x.dims4()?;
        let k = w.dim(2)?;
        // Input gradient: grad_x[r] = Σ_a G[r + p − a]·w[a], G the output gradient dilated by the
        // stride: a correlation of G, padded by k−1−p on the left (and up to the input size on the
        // right), with the flipped kernel (channels swapped).
        let g = dilate(grad, s)?;
        let q = k - 1 - p;
        let (gh, gw) = (g.dim(2)?, g.dim(3)?);
        let g = g
            .pad_with_zeros(D::Minus2, q, h + k - 1 - gh - q)?
            .pad_with_zeros(D::Minus1, q, wd + k - 1 - gw - q)?;
        let wf = w.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
        let grad_x = g.conv2d(&wf, 0, 1, 1, 1)?;
        // Kernel gradient as candle computes it (already a forward convolution).
        let grad_w = x
            .transpose(0, 1)?
            .conv2d(&grad.transpose(0, 1)?, p, 1, s, 1)?
            .transpose(0, 1)?;
        let grad_w = grad_w.narrow(2, 0, k)?.narrow(3, 0, k)?;
        Ok((Some(grad_x), Some(grad_w)))
    }
}

/// `x.conv2d(w, padding, stride, 1, 1)` with the fast backward pass; needs `padding < kernel size`.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let k = w.dim(2)?;
    if padding >= k || w.dim(3)? != k {
        return Err(crate::Error::InvalidInput {
            field: "padding",
            message: format!("conv2d: padding {padding} with a {:?} kernel", w.dims()),
        });
    }
    Ok(x.contiguous()?
        .apply_op2(&w.contiguous()?, Conv2d { stride, padding })?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Same values and gradients as candle's own `conv2d` for every shape the VAE uses: 3×3 stride 1
    /// padding 1, 1×1, and the downsampler's 3×3 stride 2 padding 0 on even and odd sizes (stride 2 with
    /// padding 1 only square: candle's own backward fails on non-square inputs there).
    #[test]
    fn matches_candle_conv2d_and_its_gradients() {
        let d = Device::Cpu;
        for (k, s, p, h, w) in [
            (3, 1, 1, 9, 7),
            (1, 1, 0, 6, 5),
            (3, 2, 0, 9, 9),
            (3, 2, 0, 8, 10),
            (3, 2, 1, 7, 7),
            (3, 2, 1, 8, 8),
        ] {
            let x = Var::randn(0f32, 1., (2, 3, h, w), &d).unwrap();
            let wt = Var::randn(0f32, 1., (4, 3, k, k), &d).unwrap();
            let ours = conv2d(x.as_tensor(), wt.as_tensor(), s, p).unwrap();
            let theirs = x.as_tensor().conv2d(wt.as_tensor(), p, s, 1, 1).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            assert!(max_diff(&ours, &theirs) < 1e-5);
            // A loss with a different weight on every output, so every gradient entry is exercised.
            let r = Tensor::randn(0f32, 1., ours.dims(), &d).unwrap();
            let ga = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (&theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &wt] {
                let (a, b) = (
                    ga.get(v.as_tensor()).unwrap(),
                    gb.get(v.as_tensor()).unwrap(),
                );
                assert_eq!(a.dims(), b.dims());
                let dd = max_diff(a, b);
                assert!(
                    dd < 1e-4,
                    "k {k} s {s} p {p} {h}×{w}: gradient differs by {dd}"
                );
            }
        }
    }
}
