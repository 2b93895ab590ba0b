//! Golden tests: our transformer against diffusers' `PixArtTransformer2DModel` on tiny random checkpoints.
//! Fixtures and the script that made them: `tests/fixtures/transformer/` (`gen.py`).
//! Tolerance (docs/conformance.md): max|ours − ref| / max(1, max|ref|) ≤ 1e-3.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use pixart::transformer::{PixArtTransformer, conformance};

mod common;
use common::{fixtures, rel_err};

const TOL: f32 = 1e-3;

fn load(path: PathBuf) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(&path, &Device::Cpu).with_context(|| path.display().to_string())
}

fn check_case(model: &str, case: &str) -> Result<f32> {
    let m = PixArtTransformer::load(
        fixtures("transformer").join(model),
        DType::F32,
        &Device::Cpu,
    )?;
    let inputs = load(fixtures("transformer").join(format!("{case}.inputs.safetensors")))?;
    let expected = load(fixtures("transformer").join(format!("{case}.expected.safetensors")))?;
    let ours = conformance::forward_named(&m, &inputs)?;
    let err = rel_err(&ours, &expected["sample"])?;
    println!("{case}: relative max error {err:.3e}");
    assert!(err <= TOL, "{case}: relative error {err} > {TOL}");
    Ok(err)
}

#[test]
fn micro_conditions_batch2_different_timesteps_padded_masks() -> Result<()> {
    check_case("micro", "micro_b2_padded")?;
    Ok(())
}

#[test]
fn micro_conditions_non_square_i64_mask() -> Result<()> {
    check_case("micro", "micro_nonsquare")?;
    Ok(())
}

#[test]
fn no_micro_conditions_non_square_batch2_mask_with_hole() -> Result<()> {
    check_case("plain", "plain_b2_nonsquare")?;
    Ok(())
}

#[test]
fn derived_config_and_extra_y_embedding() -> Result<()> {
    let m = PixArtTransformer::load(
        fixtures("transformer").join("micro"),
        DType::F32,
        &Device::Cpu,
    )?;
    assert!(
        m.config.use_additional_conditions,
        "sample_size 128 derives micro-conditions"
    );
    assert_eq!(m.config.interpolation_scale, 2.0);
    let p = PixArtTransformer::load(
        fixtures("transformer").join("plain"),
        DType::F32,
        &Device::Cpu,
    )?;
    assert!(!p.config.use_additional_conditions);
    assert_eq!(p.config.interpolation_scale, 1.0);
    Ok(())
}

/// A row computed alone equals the same row inside a batch (no leakage through masks, trimming or
/// per-row timesteps).
#[test]
fn batch_rows_are_independent() -> Result<()> {
    let m = PixArtTransformer::load(
        fixtures("transformer").join("micro"),
        DType::F32,
        &Device::Cpu,
    )?;
    let inputs = load(fixtures("transformer").join("micro_b2_padded.inputs.safetensors"))?;
    let expected = load(fixtures("transformer").join("micro_b2_padded.expected.safetensors"))?;
    let row: HashMap<String, Tensor> = inputs
        .iter()
        .map(|(k, v)| (k.clone(), v.i(1..2).unwrap()))
        .collect();
    let ours = conformance::forward_named(&m, &row)?;
    let err = rel_err(&ours, &expected["sample"].i(1..2)?)?;
    assert!(err <= TOL, "row 1 alone: {err}");
    Ok(())
}

/// The harness path end to end: files in, `sample` file out, compared with the reference.
#[test]
fn conformance_harness_files() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("out.safetensors");
    conformance::run_files(
        &fixtures("transformer").join("plain"),
        &fixtures("transformer").join("plain_b2_nonsquare.inputs.safetensors"),
        &out,
    )?;
    let ours = load(out.clone())?;
    let expected = load(fixtures("transformer").join("plain_b2_nonsquare.expected.safetensors"))?;
    let err = rel_err(&ours["sample"], &expected["sample"])?;
    assert!(err <= TOL, "{err}");
    // A missing input is named.
    let bad = dir.path().join("bad.safetensors");
    let mut inputs = load(fixtures("transformer").join("plain_b2_nonsquare.inputs.safetensors"))?;
    inputs.remove("timestep");
    candle_core::safetensors::save(&inputs, &bad)?;
    let e = conformance::run_files(&fixtures("transformer").join("plain"), &bad, &out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("timestep"), "{e}");
    Ok(())
}

/// Micro-condition models require resolution and aspect ratio.
#[test]
fn micro_conditions_are_required() -> Result<()> {
    let m = PixArtTransformer::load(
        fixtures("transformer").join("micro"),
        DType::F32,
        &Device::Cpu,
    )?;
    let inputs = load(fixtures("transformer").join("micro_nonsquare.inputs.safetensors"))?;
    let e = m
        .forward(
            &inputs["hidden_states"],
            &inputs["timestep"],
            &inputs["encoder_hidden_states"],
            None,
            None,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("resolution"), "{e}");
    Ok(())
}

/// The half-precision paths (used on GPUs) — f32 softmax, the tensor-op LayerNorm fallback, candle's GELU —
/// run on the CPU too: bf16 and f16 stay within their precision of the f64 reference.
#[test]
fn half_precision_paths_stay_close() -> Result<()> {
    let inputs = load(fixtures("transformer").join("micro_b2_padded.inputs.safetensors"))?;
    let expected = load(fixtures("transformer").join("micro_b2_padded.expected.safetensors"))?;
    for (dtype, tol) in [(DType::BF16, 3e-2), (DType::F16, 5e-3)] {
        let m =
            PixArtTransformer::load(fixtures("transformer").join("micro"), dtype, &Device::Cpu)?;
        let ours = conformance::forward_named(&m, &inputs)?;
        assert_eq!(ours.dtype(), dtype);
        let err = rel_err(&ours.to_dtype(DType::F32)?, &expected["sample"])?;
        println!("{dtype:?}: relative max error {err:.3e}");
        assert!(err <= tol, "{dtype:?}: {err}");
    }
    Ok(())
}
