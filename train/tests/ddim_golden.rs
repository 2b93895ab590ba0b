//! The teacher's DDIM sampler against diffusers: `tests/fixtures/ddim/gen.py` runs `DDIMScheduler`
//! ("leading" spacing, η = 0, `set_alpha_to_one`, no clipping) with classifier-free guidance on fixed ε
//! values; [`pixart_train::sample::ddim_guided`] must visit the same timesteps and end at the same latents
//! to 1e-5 (relative to max(1, max|reference|)).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use pixart_train::sample::{ddim_guided, ddim_timesteps};

const TOL: f64 = 1e-5;

fn fixture() -> HashMap<String, Tensor> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ddim/ddim.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu).expect("fixture (run gen.py)")
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.max(0))
        .and_then(|t| t.to_scalar::<f64>())
        .unwrap()
}

fn check_case(f: &HashMap<String, Tensor>, steps: usize) {
    let key = format!("s{steps}");
    let get = |name: &str| f[&format!("{key}_{name}")].clone();
    let expected_t: Vec<i64> = get("timesteps").to_vec1().unwrap();
    let ours_t: Vec<i64> = ddim_timesteps(steps).iter().map(|&t| t as i64).collect();
    assert_eq!(ours_t, expected_t, "{steps} steps: timesteps");
    let cfg = get("cfg").to_vec1::<f64>().unwrap()[0];
    let (eps_c, eps_u) = (get("eps_cond"), get("eps_uncond"));
    let mut calls = 0usize;
    let x = ddim_guided(&get("x_init"), steps, cfg, |x, t| {
        assert_eq!(t as i64, expected_t[calls], "call {calls}: timestep");
        assert_eq!(x.dims(), eps_c.get(calls)?.dims());
        let pair = (eps_c.get(calls)?, eps_u.get(calls)?);
        calls += 1;
        Ok(pair)
    })
    .unwrap();
    assert_eq!(calls, steps, "one ε pair per step");
    let reference = get("x_final");
    let diff = max_abs(&(x.to_dtype(DType::F64).unwrap() - &reference).unwrap());
    let err = diff / max_abs(&reference).max(1.0);
    println!("{steps} steps, cfg {cfg}: relative error {err:.2e}");
    assert!(err <= TOL, "{steps} steps: {err} > {TOL}");
}

#[test]
fn ddim_with_guidance_matches_diffusers_25_steps() {
    check_case(&fixture(), 25);
}

#[test]
fn ddim_without_guidance_matches_diffusers_7_steps() {
    check_case(&fixture(), 7);
}
