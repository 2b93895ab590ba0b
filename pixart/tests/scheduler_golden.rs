//! LCM scheduler vs diffusers' `LCMScheduler` (fixtures: `fixtures/pipeline/gen.py`).
//!
//! The model output of every step and the injected noise are recorded tensors, so this isolates
//! the scheduler: timesteps, ᾱ (f32 like torch), boundary scalings, the ε→x0 step and noise
//! injection, for 1, 2, 3, 4 and 8 steps and both timestep spacings.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use pixart::pipeline::TimestepSpacing;
use pixart::scheduler::{LcmScheduler, LcmSchedulerConfig};

mod common;
use common::{fixtures, model_dir, rel_err};

#[test]
fn alphas_cumprod_match_torch_f32() -> Result<()> {
    let t = candle_core::safetensors::load(
        fixtures("pipeline").join("scheduler.safetensors"),
        &Device::Cpu,
    )?;
    let cfg = LcmSchedulerConfig::from_path(&model_dir().join("scheduler"))?;
    assert_eq!(cfg, LcmSchedulerConfig::pixart_lcm());
    let ours = cfg.alphas_cumprod();
    let reference = t["alphas_cumprod"].to_vec1::<f32>()?;
    let worst = ours
        .iter()
        .zip(&reference)
        .map(|(a, b)| ((a - b) / b).abs())
        .fold(0f32, f32::max);
    println!("alphas_cumprod max relative error {worst:e}");
    assert_eq!(
        ours, reference,
        "alphas_cumprod must be bit-identical to torch's f32 values"
    );
    Ok(())
}

#[test]
fn lcm_loops_match_diffusers() -> Result<()> {
    let t = candle_core::safetensors::load(
        fixtures("pipeline").join("scheduler.safetensors"),
        &Device::Cpu,
    )?;
    let cfg = LcmSchedulerConfig::from_path(&model_dir().join("scheduler"))?;
    for n in [1usize, 2, 3, 4, 8] {
        let eps = &t[&format!("n{n}_eps")];
        let noise = &t[&format!("n{n}_noise")];
        for (name, spacing) in [
            ("diffusers", TimestepSpacing::Diffusers),
            ("original", TimestepSpacing::Original),
        ] {
            let key = format!("n{n}_{name}");
            let sched = LcmScheduler::new(&cfg, n, spacing)?;
            let want_ts: Vec<usize> = t[&format!("{key}_timesteps")]
                .to_vec1::<f32>()?
                .into_iter()
                .map(|x| x as usize)
                .collect();
            assert_eq!(sched.timesteps(), want_ts.as_slice(), "{key} timesteps");
            let mut x = t["sample"].clone();
            for i in 0..n {
                let z = if i + 1 < n { Some(noise.get(i)?) } else { None };
                x = sched.step(i, &eps.get(i)?, &x, z.as_ref())?.prev_sample;
            }
            let err = rel_err(&x, &t[&format!("{key}_latents")]).context(key.clone())?;
            println!(
                "{key}: timesteps {:?}, final latents rel err {err:e}",
                sched.timesteps()
            );
            assert!(err <= 1e-3, "{key}: relative error {err}");
        }
    }
    Ok(())
}

#[test]
fn missing_noise_is_an_error_naming_it() -> Result<()> {
    let sched = LcmScheduler::new(
        &LcmSchedulerConfig::pixart_lcm(),
        2,
        TimestepSpacing::Diffusers,
    )?;
    let x = Tensor::zeros((1, 4, 2, 2), candle_core::DType::F32, &Device::Cpu)?;
    let e = sched.step(0, &x, &x, None).unwrap_err().to_string();
    assert!(e.contains("noise"), "{e}");
    Ok(())
}
