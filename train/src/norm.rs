//! A GroupNorm with a fused CPU forward *and backward*.
//!
//! candle-nn's `GroupNorm` is built from generic tensor ops, so its backward pass is a chain of a dozen
//! broadcast/reduce gradients, each materialising a full activation: in the VAE stage it was the largest
//! cost after the convolutions. Here the normalisation `x̂ = (x − μ_g) / σ_g` is one custom op whose
//! backward is the closed form `dx = (g − mean_g(g) − x̂ · mean_g(g · x̂)) / σ_g`, one pass over the data;
//! the affine part (`x̂ · γ + β`) is [`crate::channel::affine`]. Forward values and gradients agree with
//! candle-nn's to float rounding (tested below).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::Result;
use crate::conv::{slice, with_values};

/// The normalisation of `(B, C, …)` over `groups` channel groups (all spatial positions of a group).
#[derive(Debug, Clone, Copy)]
struct Normalize {
    groups: usize,
    eps: f32,
}

impl Normalize {
    /// Per (batch, group): mean and 1/σ over the contiguous values `x`.
    fn stats(&self, x: &[f32], n_groups: usize) -> Vec<(f32, f32)> {
        let len = x.len() / n_groups;
        x.chunks_exact(len)
            .map(|g| {
                let mean = g.iter().map(|v| *v as f64).sum::<f64>() / len as f64;
                let var = g.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / len as f64;
                (mean as f32, 1.0 / (var as f32 + self.eps).sqrt())
            })
            .collect()
    }

    /// `dx = (g − mean_g(g) − x̂ · mean_g(g · x̂)) / σ_g` per (batch, group), from the input `x`, the
    /// forward's output `xhat` and the output gradient `g`.
    fn backward(&self, x: &[f32], xhat: &[f32], g: &[f32], n_groups: usize) -> Vec<f32> {
        let len = x.len() / n_groups;
        let stats = self.stats(x, n_groups);
        let mut dx = Vec::with_capacity(x.len());
        for ((gg, xh), (_, inv)) in g.chunks_exact(len).zip(xhat.chunks_exact(len)).zip(stats) {
            let mean_g = gg.iter().map(|v| *v as f64).sum::<f64>() / len as f64;
            let mean_gx = gg
                .iter()
                .zip(xh)
                .map(|(a, b)| (*a * *b) as f64)
                .sum::<f64>()
                / len as f64;
            let (mean_g, mean_gx) = (mean_g as f32, mean_gx as f32);
            dx.extend(
                gg.iter()
                    .zip(xh)
                    .map(|(a, b)| (a - mean_g - b * mean_gx) * inv),
            );
        }
        dx
    }
}

/// The op's name in errors.
const NORMALIZE: &str = "group normalize";

impl CustomOp1 for Normalize {
    fn name(&self) -> &'static str {
        "pixart-train-group-normalize"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(storage, layout, NORMALIZE)?;
        let dims = layout.dims();
        let n_groups = dims[0] * self.groups;
        let len = x.len() / n_groups;
        let stats = self.stats(x, n_groups);
        let mut out = Vec::with_capacity(x.len());
        for (g, (mean, inv)) in x.chunks_exact(len).zip(stats) {
            out.extend(g.iter().map(|v| (v - mean) * inv));
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let dims = arg.dims().to_vec();
        let n_groups = dims[0] * self.groups;
        let dx = with_values(arg, NORMALIZE, |x| {
            with_values(res, NORMALIZE, |xhat| {
                with_values(grad, NORMALIZE, |g| Ok(self.backward(x, xhat, g, n_groups)))
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, dims, arg.device())?))
    }
}

/// GroupNorm with learned per-channel scale and shift, under diffusers' names (`weight`, `bias`).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Reads `weight` and `bias` (`channels` each) from `vb`.
    pub fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(crate::Error::InvalidInput {
                field: "norm_num_groups",
                message: format!("{groups} groups do not divide {channels} channels"),
            });
        }
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            groups,
            eps,
        })
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.dtype() != DType::F32 || x.rank() < 2 {
            candle_core::bail!(
                "group norm: expected f32 (B, C, …), got {:?} {:?}",
                x.dtype(),
                x.dims()
            );
        }
        let xhat = x.contiguous()?.apply_op1(Normalize {
            groups: self.groups,
            eps: self.eps as f32,
        })?;
        crate::channel::affine(&xhat, &self.weight, &self.bias)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};
    use candle_nn::VarMap;

    use super::*;

    #[test]
    fn agrees_with_candle_nn_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let ours = GroupNorm::new(vb.pp("n"), 4, 8, 1e-6)?;
        let theirs = candle_nn::group_norm(4, 8, 1e-6, vb.pp("n"))?;
        for (name, var) in varmap.data().lock().expect("varmap lock").iter() {
            let v = Tensor::randn(0f32, 1.0, var.dims(), &dev)?;
            var.set(&v)?;
            assert!(name.starts_with("n."));
        }
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (3, 8, 5, 6), &dev)? + 0.7)?)?;
        let w = Tensor::randn(0f32, 1.0, (3, 8, 5, 6), &dev)?;
        let a = ours.forward(x.as_tensor())?;
        let b = theirs.forward(x.as_tensor())?;
        let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "forward differs by {diff}");
        let ga = (a * &w)?.sum_all()?.backward()?;
        let gb = (b * &w)?.sum_all()?.backward()?;
        let vars = varmap.all_vars();
        for t in vars.iter().map(|v| v.as_tensor()).chain([x.as_tensor()]) {
            let (da, db) = (ga.get(t).expect("grad"), gb.get(t).expect("grad"));
            let diff = (da - db)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = db.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff < 1e-4 * scale.max(1.0),
                "gradient differs by {diff} (scale {scale})"
            );
        }
        Ok(())
    }
}
