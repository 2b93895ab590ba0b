//! VAE decode / encode (posterior mean) vs diffusers' `AutoencoderKL` on the tiny checkpoint's VAE.

use anyhow::Result;
use candle_core::{Device, Tensor};
use pixart::pipeline::conformance;
use pixart::vae::Vae;

mod common;
use common::{fixtures, model_dir, rel_err};

#[test]
fn decode_matches_diffusers() -> Result<()> {
    let t =
        candle_core::safetensors::load(fixtures("pipeline").join("vae.safetensors"), &Device::Cpu)?;
    let vae = Vae::load(&model_dir().join("vae"), &Device::Cpu)?;
    let inputs = [("latents".to_string(), t["decode_latents"].clone())].into();
    let out = conformance::vae_decode(&vae, &inputs)?;
    let err = rel_err(&out["sample"], &t["decode_sample"])?;
    println!("vae decode {:?}: rel err {err:e}", out["sample"].dims());
    assert!(err <= 1e-3, "decode relative error {err}");
    Ok(())
}

#[test]
fn encode_mean_matches_diffusers() -> Result<()> {
    let t =
        candle_core::safetensors::load(fixtures("pipeline").join("vae.safetensors"), &Device::Cpu)?;
    let vae = Vae::load(&model_dir().join("vae"), &Device::Cpu)?;
    let inputs = [("image".to_string(), t["encode_image"].clone())].into();
    let out = conformance::vae_encode(&vae, &inputs)?;
    let err = rel_err(&out["latents"], &t["encode_latents"])?;
    println!("vae encode {:?}: rel err {err:e}", out["latents"].dims());
    assert!(err <= 1e-3, "encode relative error {err}");
    // Deterministic: the mean, not a sample.
    let again = conformance::vae_encode(&vae, &inputs)?;
    assert_eq!(rel_err(&again["latents"], &out["latents"])?, 0.0);
    Ok(())
}

#[test]
fn bad_inputs_are_named() -> Result<()> {
    let vae = Vae::load(&model_dir().join("vae"), &Device::Cpu)?;
    let e = conformance::vae_decode(&vae, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("latents"), "{e}");
    let wrong = Tensor::zeros((1, 3, 4, 4), candle_core::DType::F32, &Device::Cpu)?;
    let e = vae.decode(&wrong).unwrap_err().to_string();
    assert!(e.contains("latents"), "{e}");
    let e = vae
        .encode_mean(&Tensor::zeros(
            (1, 3, 12, 16),
            candle_core::DType::F32,
            &Device::Cpu,
        )?)
        .unwrap_err()
        .to_string();
    assert!(e.contains("image"), "{e}");
    let e = Vae::load(&fixtures("pipeline"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json"), "{e}");
    Ok(())
}
