//! One PixArt-α teacher loss against PyTorch: IDDPM's ε MSE + learned-σ bound on fixed tensors
//! (`tests/fixtures/teacher/gen.py`), timesteps 0 (the decoder NLL branch), 1, 500 and 999; the loss,
//! its parts per sample, and the gradient with respect to the model output (which shows that the bound
//! trains only the σ channels, ε being frozen in it).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use pixart_train::diffusion::{MseWeighting, Posterior, teacher_loss};
use pixart_train::lcd::NoiseSchedule;

fn fixture() -> std::collections::HashMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/teacher/teacher_loss.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu).expect("fixture loads")
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    diff / scale.max(1e-6)
}

#[test]
fn teacher_loss_matches_iddpm() {
    let f = fixture();
    let t: Vec<usize> = f["timesteps"]
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&v| v as usize)
        .collect();
    assert_eq!(t, [0, 1, 500, 999]);
    let post = Posterior::new(&NoiseSchedule::pixart());
    let x_t = pixart_train::lcd::add_noise(
        &f["x0"],
        &f["noise"],
        &t.iter()
            .map(|&i| post.alphas_cumprod[i])
            .collect::<Vec<_>>(),
    )
    .unwrap();
    assert!(max_rel(&x_t, &f["x_t"]) < 1e-5, "x_t");
    let out = Var::from_tensor(&f["model_output"]).unwrap();
    let loss = teacher_loss(
        &post,
        &f["x0"],
        &x_t,
        &f["noise"],
        out.as_tensor(),
        &t,
        MseWeighting::Pixart,
    )
    .unwrap();
    let want_mse = f["mse"].mean_all().unwrap();
    let want_vb = f["vb"].mean_all().unwrap();
    assert!(
        max_rel(&loss.mse, &want_mse) < 1e-5,
        "mse {} vs {}",
        loss.mse,
        want_mse
    );
    assert!(
        max_rel(&loss.vb, &want_vb) < 1e-5,
        "vb {} vs {}",
        loss.vb,
        want_vb
    );
    assert!(max_rel(&loss.total, &f["loss"].reshape(()).unwrap()) < 1e-5);
    let grads = loss.total.backward().unwrap();
    let g = grads
        .get(out.as_tensor())
        .expect("gradient of the model output");
    let rel = max_rel(g, &f["grad"]);
    assert!(rel < 1e-4, "gradient differs by {rel} (relative)");

    // The v weighting scales each sample's MSE by 1/ᾱ_t and leaves the bound alone.
    let v = teacher_loss(
        &post,
        &f["x0"],
        &x_t,
        &f["noise"],
        out.as_tensor(),
        &t,
        MseWeighting::Velocity,
    )
    .unwrap();
    let w: Vec<f32> = t
        .iter()
        .map(|&i| (1.0 / post.alphas_cumprod[i]) as f32)
        .collect();
    let want = (&f["mse"] * Tensor::new(w.as_slice(), &Device::Cpu).unwrap())
        .unwrap()
        .mean_all()
        .unwrap();
    assert!(
        max_rel(&v.mse, &want) < 1e-5,
        "weighted mse {} vs {}",
        v.mse,
        want
    );
    assert!(max_rel(&v.vb, &want_vb) < 1e-5);
}
