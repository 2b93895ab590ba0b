//! PixArt-α's training loss: ε-prediction MSE plus the variational bound for the learned σ (IDDPM's
//! `GaussianDiffusion.training_losses` with `learn_sigma=True`, `loss_type=MSE`, as PixArt builds it with
//! `IDDPM(learn_sigma=True, pred_sigma=True)`).
//!
//! The model's 2·C output channels are ε̂ and v. The variance is `exp(f·log β_t + (1 − f)·log β̃_t)` with
//! `f = (v + 1) / 2` (β̃ the posterior variance, clipped at t = 0 to β̃₁ as IDDPM does). The bound term
//! sees ε̂ *detached* (`frozen_out`), so it trains only v, and is the KL between the true posterior
//! q(x_{t−1} | x_t, x_0) and the model's, in bits per dimension; at t = 0 it is the discretised Gaussian
//! decoder NLL instead. Per sample both terms are means over the sample's elements; the loss is the
//! batch mean of their sum ([`MseWeighting::Pixart`]; [`MseWeighting::Velocity`] reweights the MSE for
//! short runs). Checked against the IDDPM formulas in PyTorch in `tests/teacher_golden.rs`.

use candle_core::{D, Tensor};

use crate::lcd::{NoiseSchedule, per_row};
use crate::{Error, Result};

/// How the ε MSE of each sample is weighted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MseWeighting {
    /// PixArt-α's: every timestep alike (in x0 terms, weight SNR(t): the high-noise steps, where the
    /// caption decides the layout, get almost no signal).
    #[default]
    Pixart,
    /// `1 / ᾱ_t`, which makes the term the v-prediction MSE (`|v − v̂|² = |ε − ε̂|² / ᾱ_t`) with the
    /// model still predicting ε: the high-noise steps weigh as much as the rest. For short toy-scale
    /// runs, where the plain loss leaves the layout unlearnt; in one 500-step trial it learnt
    /// the high-noise steps first and sampled worse than the plain loss did (BENCHMARKS.md).
    Velocity,
    /// Min-SNR-γ (Hang et al., 2023, γ = 5) for ε-prediction: `min(SNR_t, 5) / SNR_t`, SNR_t =
    /// ᾱ_t / (1 − ᾱ_t). The plain loss at the noisy half (SNR < 5, t ≳ 100 here) and less weight on
    /// the nearly clean steps, which the plain loss over-trains; milder than [`Self::Velocity`].
    MinSnr,
}

/// γ of [`MseWeighting::MinSnr`] (the paper's default).
pub const MIN_SNR_GAMMA: f64 = 5.0;

impl MseWeighting {
    pub fn is_pixart(&self) -> bool {
        *self == MseWeighting::Pixart
    }

    /// The factor on the ε MSE of a sample at a timestep with `alphas_cumprod` ᾱ.
    pub fn weight(&self, alpha_cumprod: f64) -> f64 {
        match self {
            MseWeighting::Pixart => 1.0,
            MseWeighting::Velocity => 1.0 / alpha_cumprod,
            MseWeighting::MinSnr => {
                let snr = alpha_cumprod / (1.0 - alpha_cumprod);
                snr.min(MIN_SNR_GAMMA) / snr
            }
        }
    }
}

/// The schedule's derived per-timestep constants (f64, as IDDPM keeps them).
#[derive(Debug, Clone)]
pub struct Posterior {
    pub alphas_cumprod: Vec<f64>,
    pub log_betas: Vec<f64>,
    pub log_variance_clipped: Vec<f64>,
    pub mean_coef1: Vec<f64>,
    pub mean_coef2: Vec<f64>,
}

impl Posterior {
    pub fn new(schedule: &NoiseSchedule) -> Self {
        let ac = &schedule.alphas_cumprod;
        let n = ac.len();
        let prev: Vec<f64> = (0..n)
            .map(|i| if i == 0 { 1.0 } else { ac[i - 1] })
            .collect();
        let betas: Vec<f64> = (0..n).map(|i| 1.0 - ac[i] / prev[i]).collect();
        let variance: Vec<f64> = (0..n)
            .map(|i| betas[i] * (1.0 - prev[i]) / (1.0 - ac[i]))
            .collect();
        let log_variance_clipped = (0..n)
            .map(|i| {
                if i == 0 {
                    variance[1.min(n - 1)].ln()
                } else {
                    variance[i].ln()
                }
            })
            .collect();
        Self {
            alphas_cumprod: ac.clone(),
            log_betas: betas.iter().map(|b| b.ln()).collect(),
            log_variance_clipped,
            mean_coef1: (0..n)
                .map(|i| betas[i] * prev[i].sqrt() / (1.0 - ac[i]))
                .collect(),
            mean_coef2: (0..n)
                .map(|i| (1.0 - prev[i]) * (1.0 - betas[i]).sqrt() / (1.0 - ac[i]))
                .collect(),
        }
    }

    fn rows(&self, values: &[f64], t: &[usize], like: &Tensor) -> Result<Tensor> {
        per_row(&t.iter().map(|&i| values[i]).collect::<Vec<_>>(), like)
    }
}

/// The loss and its parts, each a scalar tensor.
#[derive(Debug, Clone)]
pub struct TeacherLoss {
    pub total: Tensor,
    pub mse: Tensor,
    pub vb: Tensor,
}

/// Mean over every dimension but the first: `(B,)`.
fn mean_flat(x: &Tensor) -> Result<Tensor> {
    Ok(x.flatten_from(1)?.mean(D::Minus1)?)
}

/// `KL(N(m1, e^lv1) ‖ N(m2, e^lv2))` elementwise, nats.
fn normal_kl(m1: &Tensor, lv1: &Tensor, m2: &Tensor, lv2: &Tensor) -> Result<Tensor> {
    let t = ((((lv2 - lv1)? + (lv1 - lv2)?.exp()?)?
        + ((m1 - m2)?.sqr()? * lv2.neg()?.exp()?)?)?
        - 1.0)?;
    Ok(t.affine(0.5, 0.0)?)
}

/// IDDPM's `approx_standard_normal_cdf`.
fn approx_cdf(x: &Tensor) -> Result<Tensor> {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let cube = (x.sqr()? * x)?;
    let inner = ((x + (cube * 0.044715)?)? * c)?;
    Ok((inner.tanh()? + 1.0)?.affine(0.5, 0.0)?)
}

/// IDDPM's `discretized_gaussian_log_likelihood` for data in [−1, 1] with 255 bins, elementwise (nats).
fn discretized_log_likelihood(x: &Tensor, means: &Tensor, log_scales: &Tensor) -> Result<Tensor> {
    let centered = (x - means)?;
    let inv_stdv = log_scales.neg()?.exp()?;
    let cdf_plus = approx_cdf(&((&centered + 1.0 / 255.0)? * &inv_stdv)?)?;
    let cdf_min = approx_cdf(&((&centered - 1.0 / 255.0)? * &inv_stdv)?)?;
    let log_cdf_plus = cdf_plus.clamp(1e-12, f64::MAX)?.log()?;
    let log_one_minus_cdf_min = cdf_min.affine(-1.0, 1.0)?.clamp(1e-12, f64::MAX)?.log()?;
    let cdf_delta = (&cdf_plus - &cdf_min)?;
    let log_delta = cdf_delta.clamp(1e-12, f64::MAX)?.log()?;
    // where(x < −0.999, log_cdf_plus, where(x > 0.999, log_one_minus_cdf_min, log(cdf_delta)))
    let low = x.lt(-0.999)?;
    let high = x.gt(0.999)?;
    let mid = high.where_cond(&log_one_minus_cdf_min, &log_delta)?;
    Ok(low.where_cond(&log_cdf_plus, &mid)?)
}

/// The training loss at integer timesteps `t` (one per row) for clean latents `x0`, the noise `noise`
/// that made `x_t`, and the model output `out` `(B, 2C, H, W)` at `x_t`.
pub fn teacher_loss(
    post: &Posterior,
    x0: &Tensor,
    x_t: &Tensor,
    noise: &Tensor,
    out: &Tensor,
    t: &[usize],
    weighting: MseWeighting,
) -> Result<TeacherLoss> {
    let c = x0.dim(1)?;
    if out.dim(1)? != 2 * c {
        return Err(Error::InvalidInput {
            field: "out_channels",
            message: format!(
                "the teacher must predict ε and σ ({} channels for {c}-channel latents), got {}",
                2 * c,
                out.dim(1)?
            ),
        });
    }
    let eps = out.narrow(1, 0, c)?;
    let v = out.narrow(1, c, c)?;
    let mse_rows = mean_flat(&(&eps - noise)?.sqr()?)?;
    let mse_rows = if weighting.is_pixart() {
        mse_rows
    } else {
        let w: Vec<f32> = t
            .iter()
            .map(|&i| weighting.weight(post.alphas_cumprod[i]) as f32)
            .collect();
        (mse_rows * Tensor::from_vec(w, t.len(), x0.device())?)?
    };

    // The bound, with ε̂ frozen.
    let eps_frozen = eps.detach();
    let min_log = post.rows(&post.log_variance_clipped, t, x0)?;
    let max_log = post.rows(&post.log_betas, t, x0)?;
    let frac = (&v + 1.0)?.affine(0.5, 0.0)?;
    let model_log_var =
        (frac.broadcast_mul(&max_log)? + frac.affine(-1.0, 1.0)?.broadcast_mul(&min_log)?)?;
    let ac: Vec<f64> = t.iter().map(|&i| post.alphas_cumprod[i]).collect();
    let recip = per_row(&ac.iter().map(|a| (1.0 / a).sqrt()).collect::<Vec<_>>(), x0)?;
    let recipm1 = per_row(
        &ac.iter()
            .map(|a| (1.0 / a - 1.0).sqrt())
            .collect::<Vec<_>>(),
        x0,
    )?;
    let pred_x0 = (x_t.broadcast_mul(&recip)? - eps_frozen.broadcast_mul(&recipm1)?)?;
    let coef1 = post.rows(&post.mean_coef1, t, x0)?;
    let coef2 = post.rows(&post.mean_coef2, t, x0)?;
    let model_mean = (pred_x0.broadcast_mul(&coef1)? + x_t.broadcast_mul(&coef2)?)?;
    let true_mean = (x0.broadcast_mul(&coef1)? + x_t.broadcast_mul(&coef2)?)?;
    let true_log_var = min_log.broadcast_as(x0.shape())?;
    let ln2 = std::f64::consts::LN_2;
    let kl = (mean_flat(&normal_kl(
        &true_mean,
        &true_log_var,
        &model_mean,
        &model_log_var,
    )?)? / ln2)?;
    let nll = (mean_flat(&discretized_log_likelihood(
        x0,
        &model_mean,
        &model_log_var.affine(0.5, 0.0)?,
    )?)? * (-1.0 / ln2))?;
    let at_zero: Vec<u8> = t.iter().map(|&i| (i == 0) as u8).collect();
    let at_zero = Tensor::from_vec(at_zero, t.len(), x0.device())?;
    let vb_rows = at_zero.where_cond(&nll, &kl)?;
    let mse = mse_rows.mean_all()?;
    let vb = vb_rows.mean_all()?;
    let total = (&mse + &vb)?;
    Ok(TeacherLoss { total, mse, vb })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Min-SNR-5 on PixArt's schedule: the plain loss where SNR ≤ 5, 5 / SNR where the sample is
    /// nearly clean; v-weighting grows without bound as the noise does.
    #[test]
    fn weightings_on_the_pixart_schedule() {
        let ac = NoiseSchedule::pixart().alphas_cumprod;
        let w = |m: MseWeighting, t: usize| m.weight(ac[t]);
        for t in [0, 999] {
            assert_eq!(w(MseWeighting::Pixart, t), 1.0);
        }
        let snr0 = ac[0] / (1.0 - ac[0]);
        assert!((w(MseWeighting::MinSnr, 0) - 5.0 / snr0).abs() < 1e-12);
        assert!(w(MseWeighting::MinSnr, 0) < 1e-3);
        let noisy = (0..1000).find(|&t| ac[t] / (1.0 - ac[t]) <= 5.0).unwrap();
        assert!((100..200).contains(&noisy), "SNR reaches 5 at t = {noisy}");
        for t in noisy..1000 {
            assert_eq!(w(MseWeighting::MinSnr, t), 1.0);
        }
        assert!(w(MseWeighting::MinSnr, noisy - 1) < 1.0);
        assert!((w(MseWeighting::Velocity, 999) - 1.0 / ac[999]).abs() < 1e-9);
    }
}
