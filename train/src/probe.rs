//! What a diffusion transformer has learnt, per noise level: its ε error on training latents with their
//! captions and with the empty prompt, and the x0 error that ε error implies.
//!
//! Why: the loss curve averages over timesteps, and the average is dominated by the steps a sampler
//! needs least. The caption decides the layout at high noise; if the captioned error there is no lower
//! than the uncaptioned one, the model ignores the text and every sample is a guess, whatever the mean
//! loss says. The x0 error is in units of the latents' variance (1 after `scaling_factor`): 1 is no
//! better than predicting the mean.

use candle_core::Tensor;
use pixart::transformer::PixArtTransformer;
use serde::Serialize;

use crate::Result;
use crate::lcd::{NoiseSchedule, add_noise};
use crate::prep::{LatentPool, Text};
use crate::sample::epsilon;
use crate::seed::{self, Stream};

/// The timesteps probed: nearly clean to nearly pure noise.
pub const TIMESTEPS: [usize; 6] = [50, 200, 350, 500, 700, 900];

/// One noise level's figures (means over the probe batch's elements).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct NoiseLevel {
    pub t: usize,
    pub eps_mse: f32,
    /// With the empty prompt instead of the captions.
    pub eps_mse_uncond: f32,
    /// `|x0 − x̂0|²` from the captioned ε̂.
    pub x0_mse: f32,
}

/// Probes `model` on the first `count` samples of `pool` (noise drawn from `seed`).
pub fn probe(
    model: &PixArtTransformer,
    pool: &LatentPool,
    text: &mut Text,
    count: usize,
    seed: u64,
) -> Result<Vec<NoiseLevel>> {
    let device = model.device().clone();
    let n = count.min(pool.samples.len());
    let x0 = pool.latents.narrow(0, 0, n)?;
    let noise = seed::randn(&mut seed::rng(seed, 0, Stream::Noise), x0.dims(), &device)?;
    let captions: Vec<Option<&str>> = pool.samples[..n]
        .iter()
        .map(|s| Some(s.caption.as_str()))
        .collect();
    let (y, mask) = text.batch(&captions)?;
    let (y0, mask0) = text.batch(&vec![None; n])?;
    let ac = NoiseSchedule::pixart().alphas_cumprod;
    let mut out = Vec::with_capacity(TIMESTEPS.len());
    for &t in &TIMESTEPS {
        let a = vec![ac[t]; n];
        let x_t = add_noise(&x0, &noise, &a)?;
        let mse = |y: &Tensor, m: &Tensor| -> Result<f32> {
            let e = epsilon(model, &x_t, t as f32, y, m)?;
            Ok((e - &noise)?.sqr()?.mean_all()?.to_scalar::<f32>()?)
        };
        let eps_mse = mse(&y, &mask)?;
        out.push(NoiseLevel {
            t,
            eps_mse,
            eps_mse_uncond: mse(&y0, &mask0)?,
            x0_mse: (eps_mse as f64 * (1.0 - ac[t]) / ac[t]) as f32,
        });
    }
    Ok(out)
}

impl std::fmt::Display for NoiseLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "t {:>3}: ε mse {:.4} (empty prompt {:.4}) · x0 mse {:.3}",
            self.t, self.eps_mse, self.eps_mse_uncond, self.x0_mse
        )
    }
}
