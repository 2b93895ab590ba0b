//! Helpers shared by the golden tests: where the fixtures are and the contract's error measure.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Tensor;

/// A fixture folder under `tests/fixtures/` (each holds the script that generated it).
pub fn fixtures(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The bundled tiny checkpoint (`models/make_tiny.py`).
pub fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-pixart-lcm")
}

/// The conformance contract's measure: max|ours − ref| / max(1, max|ref|).
pub fn rel_err(ours: &Tensor, reference: &Tensor) -> Result<f32> {
    assert_eq!(ours.dims(), reference.dims(), "shape");
    let diff = (ours - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
    Ok(diff / scale)
}
