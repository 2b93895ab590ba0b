//! Sampling for evaluation: the teacher with DDIM and classifier-free guidance (diffusers'
//! `DDIMScheduler` with PixArt's schedule, `timestep_spacing="leading"`, η = 0, `set_alpha_to_one`), and
//! the student with the farm's own LCM sampler ([`pixart::pipeline::sample_lcm`]), so that what is
//! measured for the student is exactly what the farm renders.

use candle_core::{DType, Tensor};
use image::RgbImage;
use pixart::pipeline::{Control, TimestepSpacing, sample_lcm};
use pixart::scheduler::{LcmScheduler, LcmSchedulerConfig, SeededNoise};
use pixart::transformer::PixArtTransformer;
use pixart::vae::Vae;

use crate::Result;
use crate::lcd::{NoiseSchedule, TRAIN_TIMESTEPS};

/// ε̂ of a learned-σ model (the first half of its channels) at one timestep for the whole batch.
pub fn epsilon(
    model: &PixArtTransformer,
    x: &Tensor,
    t: f32,
    y: &Tensor,
    mask: &Tensor,
) -> Result<Tensor> {
    epsilon_rows(model, x, &vec![t; x.dim(0)?], y, mask)
}

/// [`epsilon`] with a timestep per row.
pub fn epsilon_rows(
    model: &PixArtTransformer,
    x: &Tensor,
    t: &[f32],
    y: &Tensor,
    mask: &Tensor,
) -> Result<Tensor> {
    let ts = Tensor::from_vec(t.to_vec(), t.len(), x.device())?;
    let out = model
        .forward(x, &ts, y, Some(mask), None)?
        .to_dtype(DType::F32)?;
    let c = x.dim(1)?;
    Ok(if out.dim(1)? == 2 * c {
        out.narrow(1, 0, c)?
    } else {
        out
    })
}

/// DDIM's "leading" timesteps for `steps` steps: `960, 920, …, 0` for 25.
pub fn ddim_timesteps(steps: usize) -> Vec<usize> {
    let ratio = TRAIN_TIMESTEPS / steps.max(1);
    (0..steps).rev().map(|i| i * ratio).collect()
}

/// Teacher sampling: DDIM, `steps` steps, guidance `cfg` in the usual form `u + cfg·(c − u)` (two model
/// evaluations per step, batched). `cond`/`uncond` are `(y, mask)` pairs of the same batch size as `x`.
pub fn ddim_cfg(
    model: &PixArtTransformer,
    x: &Tensor,
    cond: (&Tensor, &Tensor),
    uncond: (&Tensor, &Tensor),
    steps: usize,
    cfg: f64,
) -> Result<Tensor> {
    let b = x.dim(0)?;
    // Both halves in one batch: pad the text to one length.
    let l = cond.0.dim(1)?.max(uncond.0.dim(1)?);
    let padl = |y: &Tensor, m: &Tensor| -> Result<(Tensor, Tensor)> {
        let n = y.dim(1)?;
        if n == l {
            return Ok((y.clone(), m.clone()));
        }
        Ok((
            y.pad_with_zeros(1, 0, l - n)?,
            m.pad_with_zeros(1, 0, l - n)?,
        ))
    };
    let (yc, mc) = padl(cond.0, cond.1)?;
    let (yu, mu) = padl(uncond.0, uncond.1)?;
    let y = Tensor::cat(&[&yc, &yu], 0)?;
    let m = Tensor::cat(&[&mc, &mu], 0)?;
    ddim_guided(x, steps, cfg, |x, t| {
        let eps2 = epsilon(model, &Tensor::cat(&[x, x], 0)?, t as f32, &y, &m)?;
        Ok((eps2.narrow(0, 0, b)?, eps2.narrow(0, b, b)?))
    })
}

/// The DDIM arithmetic of [`ddim_cfg`] with the model abstracted to `eps(x_t, t) → (ε_cond, ε_uncond)`:
/// separate so that it can be checked against diffusers' `DDIMScheduler` on fixed ε values
/// (`tests/ddim_golden.rs`).
pub fn ddim_guided(
    x: &Tensor,
    steps: usize,
    cfg: f64,
    mut eps: impl FnMut(&Tensor, usize) -> Result<(Tensor, Tensor)>,
) -> Result<Tensor> {
    let ac = NoiseSchedule::pixart().alphas_cumprod;
    let ratio = TRAIN_TIMESTEPS / steps.max(1);
    let mut x = x.clone();
    for t in ddim_timesteps(steps) {
        let (ec, eu) = eps(&x, t)?;
        let eps = (&eu + ((&ec - &eu)? * cfg)?)?;
        let a = ac[t];
        let a_prev = if t >= ratio { ac[t - ratio] } else { 1.0 };
        let x0 = ((&x - (&eps * (1.0 - a).sqrt())?)? / a.sqrt())?;
        x = ((x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?)?;
    }
    Ok(x)
}

/// Student sampling with the farm's LCM sampler: `steps` steps, no guidance (it was distilled in),
/// the noise between steps drawn from `noise_seed`.
pub fn lcm(
    model: &PixArtTransformer,
    x: &Tensor,
    y: &Tensor,
    mask: &Tensor,
    steps: usize,
    noise_seed: u64,
) -> Result<Tensor> {
    let sched = LcmScheduler::new(
        &LcmSchedulerConfig::pixart_lcm(),
        steps,
        TimestepSpacing::Diffusers,
    )?;
    let mut rng = SeededNoise::new(noise_seed);
    let shape = x.dims().to_vec();
    let dev = x.device().clone();
    let mut noise = |_: usize| rng.next_tensor(&shape, &dev);
    Ok(sample_lcm(
        model,
        &sched,
        x,
        y,
        mask,
        None,
        &mut noise,
        &mut |_| Control::Continue,
    )?)
}

/// Decodes latents to 8-bit images.
pub fn decode(vae: &Vae, latents: &Tensor) -> Result<Vec<RgbImage>> {
    let images = vae.decode(latents)?;
    Ok(pixart::image_ops::tensor_to_images(&images)?)
}
