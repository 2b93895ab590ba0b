//! The numerics of Latent Consistency Distillation (PixArt-δ's Algorithm 1, as the original
//! `train_scripts/train_pixart_lcm.py` computes it), as small functions a training loop composes:
//!
//! * [`NoiseSchedule`]: linear betas 1e-4 … 0.02 over 1000 steps, ᾱ in f64 (as the original IDDPM does);
//! * [`DdimSolver`]: the 50 DDIM timesteps 19, 39, …, 999 (skip k = 20), ᾱ at each and at the previous
//!   one, and the solver step `x_prev = √ᾱ_prev·x0 + √(1 − ᾱ_prev)·ε`;
//! * [`boundary_scalings`]: `c_skip`, `c_out` with σ_data = 0.5 and timestep scaling 10;
//! * [`lcm_guidance`]: the LCM form of classifier-free guidance, `cond + w·(cond − uncond)`;
//! * [`huber_loss`]: `mean(√((a − b)² + c²) − c)`;
//! * [`ema_update`]: `target ← rate·target + (1 − rate)·source` over variables.
//!
//! Checked against PyTorch in `tests/lcd_golden.rs` (fixtures and their generator in
//! `tests/fixtures/lcd/`).

use candle_core::{DType, Device, Tensor, Var};

use crate::{Error, Result};

/// Training timesteps of the PixArt noise schedule.
pub const TRAIN_TIMESTEPS: usize = 1000;
/// DDIM timesteps the LCD solver uses (`num_ddim_timesteps`).
pub const DDIM_TIMESTEPS: usize = 50;
/// σ_data of the consistency boundary condition.
pub const SIGMA_DATA: f64 = 0.5;
/// Timestep scaling of the boundary condition (the original divides the timestep by 0.1).
pub const TIMESTEP_SCALING: f64 = 10.0;
/// Huber constant of the LCD loss (`huber_c`).
pub const HUBER_C: f64 = 0.001;
/// EMA rate of the target network (`ema_decay`).
pub const EMA_RATE: f64 = 0.95;
/// Guidance scale `w` of the LCM-form guidance (`cfg_scale`; 5.5 in the usual CFG form).
pub const GUIDANCE: f64 = 4.5;

/// ᾱ_t of the linear-beta schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    pub alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    /// Betas `linspace(beta_start, beta_end, steps)` in f64, ᾱ = cumprod(1 − β) (IDDPM's `linear`).
    pub fn linear(steps: usize, beta_start: f64, beta_end: f64) -> Self {
        let mut acc = 1f64;
        let alphas_cumprod = (0..steps)
            .map(|i| {
                let beta = if steps == 1 {
                    beta_start
                } else {
                    beta_start + (beta_end - beta_start) * i as f64 / (steps - 1) as f64
                };
                acc *= 1.0 - beta;
                acc
            })
            .collect();
        Self { alphas_cumprod }
    }

    /// PixArt's: 1000 steps, 1e-4 … 0.02.
    pub fn pixart() -> Self {
        Self::linear(TRAIN_TIMESTEPS, 1e-4, 0.02)
    }
}

/// The DDIM solver of LCD: a subset of the training timesteps and ᾱ at each and at its predecessor.
#[derive(Debug, Clone, PartialEq)]
pub struct DdimSolver {
    /// `(1..=n)·(T / n) − 1`: 19, 39, …, 999 for T = 1000, n = 50.
    pub timesteps: Vec<usize>,
    pub alphas_cumprod: Vec<f64>,
    /// ᾱ at the previous DDIM timestep; ᾱ[0] for the first.
    pub alphas_cumprod_prev: Vec<f64>,
}

impl DdimSolver {
    pub fn new(schedule: &NoiseSchedule, ddim_timesteps: usize) -> Result<Self> {
        let t = schedule.alphas_cumprod.len();
        if ddim_timesteps == 0 || ddim_timesteps > t {
            return Err(Error::InvalidInput {
                field: "num_ddim_timesteps",
                message: format!("{ddim_timesteps}: must be in 1..={t}"),
            });
        }
        let ratio = t / ddim_timesteps;
        let timesteps: Vec<usize> = (1..=ddim_timesteps).map(|i| i * ratio - 1).collect();
        let ac = &schedule.alphas_cumprod;
        let alphas_cumprod: Vec<f64> = timesteps.iter().map(|&s| ac[s]).collect();
        let alphas_cumprod_prev = std::iter::once(ac[0])
            .chain(timesteps[..ddim_timesteps - 1].iter().map(|&s| ac[s]))
            .collect();
        Ok(Self {
            timesteps,
            alphas_cumprod,
            alphas_cumprod_prev,
        })
    }

    /// The skip `k = T / n` between a start timestep and its end timestep (20).
    pub fn skip(&self) -> usize {
        self.timesteps[0] + 1
    }

    /// `(t_start, t_end)` for DDIM index `i`: `t_end = max(t_start − k, 0)`.
    pub fn start_end(&self, index: usize) -> (usize, usize) {
        let s = self.timesteps[index];
        (s, s.saturating_sub(self.skip()))
    }

    /// One solver step from `x0`, `eps` `(B, …)` to `x_prev`, each row at its own DDIM index.
    pub fn step(&self, x0: &Tensor, eps: &Tensor, indices: &[usize]) -> Result<Tensor> {
        let prev: Vec<f64> = indices
            .iter()
            .map(|&i| self.alphas_cumprod_prev[i])
            .collect();
        let a = per_row(&prev.iter().map(|v| v.sqrt()).collect::<Vec<_>>(), x0)?;
        let b = per_row(
            &prev.iter().map(|v| (1.0 - v).sqrt()).collect::<Vec<_>>(),
            x0,
        )?;
        Ok((x0.broadcast_mul(&a)? + eps.broadcast_mul(&b)?)?)
    }
}

/// A `(B, 1, 1, …)` tensor of per-row values in `like`'s dtype and device, for broadcasting over rows.
pub fn per_row(values: &[f64], like: &Tensor) -> Result<Tensor> {
    let mut shape = vec![1usize; like.rank()];
    if shape.is_empty() || like.dim(0)? != values.len() {
        return Err(Error::InvalidInput {
            field: "batch",
            message: format!(
                "{} values for a tensor of shape {:?}",
                values.len(),
                like.dims()
            ),
        });
    }
    shape[0] = values.len();
    Ok(Tensor::from_vec(values.to_vec(), shape, &Device::Cpu)?
        .to_dtype(like.dtype())?
        .to_device(like.device())?)
}

/// `(c_skip, c_out)` of the consistency boundary condition at timestep `t`: with `s = 10·t`,
/// `c_skip = σ²/(s² + σ²)`, `c_out = s/√(s² + σ²)`, σ = 0.5. At t = 0, exactly (1, 0).
pub fn boundary_scalings(t: f64) -> (f64, f64) {
    let s = t * TIMESTEP_SCALING;
    let sd2 = SIGMA_DATA * SIGMA_DATA;
    (sd2 / (s * s + sd2), s / (s * s + sd2).sqrt())
}

/// `x_t = √ᾱ·x0 + √(1 − ᾱ)·ε`, one ᾱ per row.
pub fn add_noise(x0: &Tensor, noise: &Tensor, alphas_cumprod: &[f64]) -> Result<Tensor> {
    let a = per_row(
        &alphas_cumprod.iter().map(|v| v.sqrt()).collect::<Vec<_>>(),
        x0,
    )?;
    let b = per_row(
        &alphas_cumprod
            .iter()
            .map(|v| (1.0 - v).sqrt())
            .collect::<Vec<_>>(),
        x0,
    )?;
    Ok((x0.broadcast_mul(&a)? + noise.broadcast_mul(&b)?)?)
}

/// `x0 = (x_t − √(1 − ᾱ)·ε) / √ᾱ`, one ᾱ per row.
pub fn predict_x0(x_t: &Tensor, eps: &Tensor, alphas_cumprod: &[f64]) -> Result<Tensor> {
    let b = per_row(
        &alphas_cumprod
            .iter()
            .map(|v| (1.0 - v).sqrt())
            .collect::<Vec<_>>(),
        x_t,
    )?;
    let a = per_row(
        &alphas_cumprod
            .iter()
            .map(|v| 1.0 / v.sqrt())
            .collect::<Vec<_>>(),
        x_t,
    )?;
    Ok((x_t - eps.broadcast_mul(&b)?)?.broadcast_mul(&a)?)
}

/// The consistency function's output `c_skip(t)·x_t + c_out(t)·x0`, one timestep per row.
pub fn consistency_output(x_t: &Tensor, x0: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
    let (skip, out): (Vec<f64>, Vec<f64>) = timesteps
        .iter()
        .map(|&t| boundary_scalings(t as f64))
        .unzip();
    Ok((x_t.broadcast_mul(&per_row(&skip, x_t)?)? + x0.broadcast_mul(&per_row(&out, x0)?)?)?)
}

/// LCM-form guidance: `cond + w·(cond − uncond)`.
pub fn lcm_guidance(cond: &Tensor, uncond: &Tensor, w: f64) -> Result<Tensor> {
    Ok((cond + ((cond - uncond)? * w)?)?)
}

/// Pseudo-Huber loss `mean(√((a − b)² + c²) − c)` over all elements (a scalar tensor).
pub fn huber_loss(a: &Tensor, b: &Tensor, c: f64) -> Result<Tensor> {
    let d2 = (a - b)?.sqr()?;
    Ok(((d2 + c * c)?.sqrt()? - c)?.mean_all()?)
}

/// `target ← rate·target + (1 − rate)·source`, variable by variable (pairs matched by position; shapes
/// must agree). Reads the values only: no gradient is recorded.
pub fn ema_update(target: &[Var], source: &[Var], rate: f64) -> Result<()> {
    if target.len() != source.len() {
        return Err(Error::InvalidInput {
            field: "ema",
            message: format!(
                "{} target variables but {} source variables",
                target.len(),
                source.len()
            ),
        });
    }
    for (t, s) in target.iter().zip(source) {
        let (tv, sv) = (t.as_tensor().detach(), s.as_tensor().detach());
        if tv.dims() != sv.dims() {
            return Err(Error::InvalidInput {
                field: "ema",
                message: format!("shape {:?} against {:?}", tv.dims(), sv.dims()),
            });
        }
        let next = ((tv * rate)? + (sv * (1.0 - rate))?)?;
        t.set(&next)?;
    }
    Ok(())
}

/// `alphas_cumprod` as an f32/f64 tensor (for reports and fixtures).
pub fn to_tensor(values: &[f64], dtype: DType) -> Result<Tensor> {
    Ok(Tensor::from_vec(values.to_vec(), values.len(), &Device::Cpu)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solver_timesteps_and_skip() {
        let s = DdimSolver::new(&NoiseSchedule::pixart(), DDIM_TIMESTEPS).unwrap();
        assert_eq!(s.timesteps.len(), 50);
        assert_eq!(
            (s.timesteps[0], s.timesteps[1], s.timesteps[49]),
            (19, 39, 999)
        );
        assert_eq!(s.skip(), 20);
        assert_eq!(s.start_end(0), (19, 0));
        assert_eq!(s.start_end(10), (219, 199));
        assert_eq!(
            s.alphas_cumprod_prev[0],
            NoiseSchedule::pixart().alphas_cumprod[0]
        );
        assert_eq!(s.alphas_cumprod_prev[1], s.alphas_cumprod[0]);
        assert!(DdimSolver::new(&NoiseSchedule::pixart(), 0).is_err());
    }

    #[test]
    fn boundary_condition_at_zero_is_identity() {
        assert_eq!(boundary_scalings(0.0), (1.0, 0.0));
        let (skip, out) = boundary_scalings(999.0);
        assert!(skip < 1e-7 && (out - 1.0).abs() < 1e-7);
    }
}
