//! One LCD step against PyTorch: `tests/fixtures/lcd/gen.py` computes it as PixArt-alpha's
//! `train_pixart_lcm.py` does (and cross-checks the scalings and schedule against diffusers); the Rust
//! functions of `pixart_train::lcd` must match to 1e-5 (relative to max(1, max|reference|)).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use pixart_train::lcd::{
    self, DdimSolver, EMA_RATE, GUIDANCE, HUBER_C, NoiseSchedule, boundary_scalings,
};

const TOL: f64 = 1e-5;

fn fixture() -> HashMap<String, Tensor> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lcd/lcd_step.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu).expect("fixture (run gen.py)")
}

fn rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.dims(), reference.dims());
    let o = ours.to_dtype(DType::F64).unwrap();
    let r = reference.to_dtype(DType::F64).unwrap();
    let diff = (o - &r)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let scale = r
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .max(1.0);
    diff / scale
}

fn check(name: &str, ours: &Tensor, reference: &Tensor) -> f64 {
    let e = rel_err(ours, reference);
    println!("{name:>26}: relative error {e:.2e}");
    assert!(e <= TOL, "{name}: {e} > {TOL}");
    e
}

#[test]
fn one_lcd_step_matches_pytorch() {
    let f = fixture();
    let solver = DdimSolver::new(&NoiseSchedule::pixart(), lcd::DDIM_TIMESTEPS).unwrap();
    let ts: Vec<i64> = f["ddim_timesteps"].to_vec1().unwrap();
    assert_eq!(
        ts,
        solver
            .timesteps
            .iter()
            .map(|&t| t as i64)
            .collect::<Vec<_>>()
    );
    let f64s = |v: &[f64]| lcd::to_tensor(v, DType::F64).unwrap();
    check(
        "ddim alphas_cumprod",
        &f64s(&solver.alphas_cumprod),
        &f["ddim_alphas_cumprod"],
    );
    check(
        "ddim alphas_cumprod_prev",
        &f64s(&solver.alphas_cumprod_prev),
        &f["ddim_alphas_cumprod_prev"],
    );
    let (skip, out): (Vec<f64>, Vec<f64>) = solver
        .timesteps
        .iter()
        .map(|&t| boundary_scalings(t as f64))
        .unzip();
    check("c_skip (50 timesteps)", &f64s(&skip), &f["c_skip_all"]);
    check("c_out (50 timesteps)", &f64s(&out), &f["c_out_all"]);

    let index: Vec<usize> = f["index"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|i| i as usize)
        .collect();
    let (starts, ends): (Vec<usize>, Vec<usize>) =
        index.iter().map(|&i| solver.start_end(i)).unzip();
    let want_ends: Vec<i64> = f["end_timesteps"].to_vec1().unwrap();
    assert_eq!(
        ends.iter().map(|&t| t as i64).collect::<Vec<_>>(),
        want_ends
    );
    let ac = NoiseSchedule::pixart().alphas_cumprod;
    let ac_start: Vec<f64> = starts.iter().map(|&t| ac[t]).collect();
    let ac_end: Vec<f64> = ends.iter().map(|&t| ac[t]).collect();

    // Student at (x, t_start).
    let noisy = lcd::add_noise(&f["latents"], &f["noise"], &ac_start).unwrap();
    check("noisy latents", &noisy, &f["noisy"]);
    let x0 = lcd::predict_x0(&noisy, &f["student_eps"], &ac_start).unwrap();
    let pred = lcd::consistency_output(&noisy, &x0, &starts).unwrap();
    check("student prediction", &pred, &f["model_pred"]);

    // Teacher with and without the caption, LCM-form guidance, one DDIM step.
    let cond_x0 = lcd::predict_x0(&noisy, &f["teacher_cond_eps"], &ac_start).unwrap();
    let uncond_x0 = lcd::predict_x0(&noisy, &f["teacher_uncond_eps"], &ac_start).unwrap();
    let x0_w = lcd::lcm_guidance(&cond_x0, &uncond_x0, GUIDANCE).unwrap();
    let eps_w =
        lcd::lcm_guidance(&f["teacher_cond_eps"], &f["teacher_uncond_eps"], GUIDANCE).unwrap();
    check("guided x0", &x0_w, &f["guided_x0"]);
    check("guided eps", &eps_w, &f["guided_eps"]);
    let x_prev = solver.step(&x0_w, &eps_w, &index).unwrap();
    check("DDIM solver step", &x_prev, &f["x_prev"]);

    // EMA target at (x_prev, t_end), then the Huber loss.
    let target_x0 = lcd::predict_x0(&x_prev, &f["target_eps"], &ac_end).unwrap();
    let target = lcd::consistency_output(&x_prev, &target_x0, &ends).unwrap();
    check("target", &target, &f["target"]);
    let loss = lcd::huber_loss(&pred, &target, HUBER_C).unwrap();
    check("huber loss", &loss.reshape(1).unwrap(), &f["loss"]);

    // EMA update of the target network's variables.
    let t = Var::from_tensor(&f["ema_target"]).unwrap();
    let s = Var::from_tensor(&f["ema_source"]).unwrap();
    lcd::ema_update(std::slice::from_ref(&t), std::slice::from_ref(&s), EMA_RATE).unwrap();
    check("ema update", t.as_tensor(), &f["ema"]);
}

#[test]
fn huber_loss_limits() {
    let a = Tensor::new(&[0f64, 1.0, -3.0], &Device::Cpu).unwrap();
    let z = a.zeros_like().unwrap();
    // Identical inputs: zero loss; large differences: ≈ mean |a − b| − c.
    assert_eq!(
        lcd::huber_loss(&a, &a, HUBER_C)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        0.0
    );
    let l = lcd::huber_loss(&a, &z, HUBER_C)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!((l - (4.0 / 3.0 - 2.0 * HUBER_C / 3.0)).abs() < 1e-6, "{l}");
}

#[test]
fn ema_rejects_mismatched_variables() {
    let a = Var::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    let b = Var::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(
        lcd::ema_update(std::slice::from_ref(&a), &[b], EMA_RATE)
            .unwrap_err()
            .to_string()
            .contains("shape")
    );
    assert!(
        lcd::ema_update(&[a], &[], EMA_RATE)
            .unwrap_err()
            .to_string()
            .contains("ema")
    );
}
