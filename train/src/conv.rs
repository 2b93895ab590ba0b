//! A 2-D convolution as im2col + matrix products, forward and backward.
//!
//! candle 0.11's CPU `conv2d` is a direct tiled loop (`conv2d_tiled`), and it differentiates the input
//! through `conv_transpose2d`, another direct loop: at the VAE's few channels these were ≈45 % and more of a
//! training step. Here the forward is `W · im2col(x)` (one multi-threaded gemm per image), the kernel
//! gradient `Σ dY · im2col(x)ᵀ` and the input gradient `col2im(Wᵀ · dY)`, the textbook lowering. f32,
//! CPU, groups 1, dilation 1: what the VAE uses. Tested against candle's own `conv2d` and its gradients.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Device, Layout, Shape, Tensor};

use crate::Result;

/// The op's name in errors.
const CONV: &str = "conv2d (im2col)";

struct Conv2d {
    stride: usize,
    padding: usize,
}

/// The geometry of one convolution.
#[derive(Clone, Copy)]
struct Geom {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    s: usize,
    p: usize,
    ho: usize,
    wo: usize,
}

impl Geom {
    fn new(x: &[usize], k: usize, s: usize, p: usize) -> candle_core::Result<Self> {
        let [b, c, h, w] = x else {
            candle_core::bail!("conv2d: expected (B, C, H, W), got {x:?}")
        };
        let (b, c, h, w) = (*b, *c, *h, *w);
        if h + 2 * p < k || w + 2 * p < k {
            candle_core::bail!(
                "conv2d: kernel {k} larger than the padded input {h}×{w} (padding {p})"
            )
        }
        Ok(Self {
            b,
            c,
            h,
            w,
            k,
            s,
            p,
            ho: (h + 2 * p - k) / s + 1,
            wo: (w + 2 * p - k) / s + 1,
        })
    }

    /// Rows of the column matrix: `c·k·k`.
    fn rows(&self) -> usize {
        self.c * self.k * self.k
    }

    fn cols(&self) -> usize {
        self.ho * self.wo
    }

    /// For column-matrix row (ci, a, bb) and output row `oi`: the input row, if inside.
    fn src(&self, o: usize, a: usize, len: usize) -> Option<usize> {
        (o * self.s + a).checked_sub(self.p).filter(|i| *i < len)
    }
}

/// The output columns `oj` whose input column `oj·s + bb − p` lies inside `0..w`: `lo..hi`.
fn valid(g: Geom, bb: usize, w: usize, o: usize) -> (usize, usize) {
    let lo = g.p.saturating_sub(bb).div_ceil(g.s);
    let hi = if w + g.p > bb {
        ((w + g.p - bb - 1) / g.s + 1).min(o)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// Runs `f(n, chunk)` over the per-image chunks of `out` on two threads (the machines this trains on
/// have two cores; candle's own ops are multi-threaded the same way).
fn per_image(out: &mut [f32], chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let images: Vec<(usize, &mut [f32])> = out.chunks_exact_mut(chunk).enumerate().collect();
    let half = images.len().div_ceil(2);
    let mut images = images;
    let second = images.split_off(half);
    std::thread::scope(|scope| {
        scope.spawn(|| second.into_iter().for_each(|(n, c)| f(n, c)));
        images.into_iter().for_each(|(n, c)| f(n, c));
    });
}

/// `(B, C·k·k, Ho·Wo)` column matrix of `x` (zeros where the window leaves the input).
fn im2col(x: &[f32], g: Geom) -> Vec<f32> {
    let mut out = vec![0f32; g.b * g.rows() * g.cols()];
    per_image(&mut out, g.rows() * g.cols(), |n, chunk| {
        for ci in 0..g.c {
            let plane = &x[(n * g.c + ci) * g.h * g.w..][..g.h * g.w];
            for a in 0..g.k {
                for bb in 0..g.k {
                    let (lo, hi) = valid(g, bb, g.w, g.wo);
                    let row = &mut chunk[((ci * g.k + a) * g.k + bb) * g.cols()..][..g.cols()];
                    for oi in 0..g.ho {
                        let Some(ii) = g.src(oi, a, g.h) else {
                            continue;
                        };
                        let src = &plane[ii * g.w..][..g.w];
                        let dst = &mut row[oi * g.wo..][..g.wo];
                        if g.s == 1 {
                            let j0 = lo + bb - g.p;
                            dst[lo..hi].copy_from_slice(&src[j0..j0 + hi - lo]);
                        } else {
                            for (oj, d) in dst.iter_mut().enumerate().take(hi).skip(lo) {
                                *d = src[oj * g.s + bb - g.p];
                            }
                        }
                    }
                }
            }
        }
    });
    out
}

/// The adjoint of [`im2col`]: sums every column entry back onto the input pixel it was read from.
fn col2im(cols: &[f32], g: Geom) -> Vec<f32> {
    let mut x = vec![0f32; g.b * g.c * g.h * g.w];
    per_image(&mut x, g.c * g.h * g.w, |n, image| {
        let chunk = &cols[n * g.rows() * g.cols()..][..g.rows() * g.cols()];
        for ci in 0..g.c {
            let plane = &mut image[ci * g.h * g.w..][..g.h * g.w];
            for a in 0..g.k {
                for bb in 0..g.k {
                    let (lo, hi) = valid(g, bb, g.w, g.wo);
                    let row = &chunk[((ci * g.k + a) * g.k + bb) * g.cols()..][..g.cols()];
                    for oi in 0..g.ho {
                        let Some(ii) = g.src(oi, a, g.h) else {
                            continue;
                        };
                        let dst = &mut plane[ii * g.w..][..g.w];
                        let src = &row[oi * g.wo..][..g.wo];
                        for oj in lo..hi {
                            dst[oj * g.s + bb - g.p] += src[oj];
                        }
                    }
                }
            }
        }
    });
    x
}

/// Runs `f` on a tensor's values, flattened: a custom op's backward receives tensors, not storage, and
/// this reads them where they lie when they are contiguous (as the ops' own arguments are) rather than
/// copying them out, which at the VAE's activation sizes was ≈ 25 % of a training step's main thread
/// (BENCHMARKS.md, "Step speed"). The counterpart of [`slice`] there; `op` names the op in the error.
pub(crate) fn with_values<R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = t.detach().contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => f(slice(cpu, layout, op)?),
        _ => candle_core::bail!("{op}: CPU tensors only"),
    }
}

/// The f32 values of a contiguous custom-op argument; `op` names the op in the error.
pub(crate) fn slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: non-contiguous argument {:?}", layout.dims()),
    }
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "conv2d-im2col"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (cout, k) = (l2.dims()[0], l2.dims()[2]);
        let g = Geom::new(l1.dims(), k, self.stride, self.padding)?;
        if !l2.is_contiguous() {
            candle_core::bail!("{CONV}: non-contiguous kernel {:?}", l2.dims())
        }
        let cols = CpuStorage::F32(im2col(slice(s1, l1, CONV)?, g));
        // `W · cols_n` for every image, on the storages themselves: the product lands in the op's
        // output without a copy (the same gemm calls `broadcast_matmul` makes).
        let w = Layout::contiguous_with_offset((1, cout, g.rows()), l2.start_offset())
            .broadcast_as((g.b, cout, g.rows()))?;
        let cols_layout = Layout::contiguous((g.b, g.rows(), g.cols()));
        let y = s2.matmul(&cols, (g.b, cout, g.cols(), g.rows()), &w, &cols_layout)?;
        Ok((y, Shape::from((g.b, cout, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (cout, k) = (w.dim(0)?, w.dim(2)?);
        let g = Geom::new(x.dims(), k, self.stride, self.padding)?;
        let cols = with_values(x, CONV, |xs| Ok(im2col(xs, g)))?;
        let cols = Tensor::from_vec(cols, (g.b, g.rows(), g.cols()), &Device::Cpu)?;
        let gy = grad.detach().contiguous()?.reshape((g.b, cout, g.cols()))?;
        // dW = Σ_n dY_n · cols_nᵀ; dcols = Wᵀ · dY, folded back onto the input.
        let grad_w = gy
            .matmul(&cols.transpose(1, 2)?)?
            .sum(0)?
            .reshape(w.dims())?;
        let wt = w
            .detach()
            .reshape((cout, g.rows()))?
            .t()?
            .contiguous()?
            .unsqueeze(0)?;
        let dcols = wt.broadcast_matmul(&gy)?;
        let grad_x = with_values(&dcols, CONV, |d| Ok(col2im(d, g)))?;
        let grad_x = Tensor::from_vec(grad_x, x.dims(), &Device::Cpu)?;
        Ok((Some(grad_x), Some(grad_w)))
    }
}

/// `x.conv2d(w, padding, stride, 1, 1)` through im2col + matrix products, forward and backward;
/// needs `padding < kernel size`.
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
