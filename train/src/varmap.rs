//! Model parameters as candle variables: a checkpoint's tensors into a `VarMap` (what
//! [`pixart::transformer::PixArtTransformer::trainable`] builds on) and frozen copies back out.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;

use crate::{Error, Result};

/// Loads every tensor of a safetensors checkpoint as a variable of `dtype` on `device`, leaving out the
/// entries that are not parameters ([`pixart::transformer::IGNORED_TENSORS`]).
pub fn load_varmap(path: &Path, dtype: DType, device: &Device) -> Result<VarMap> {
    let tensors = candle_core::safetensors::load(path, device).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
    })?;
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().unwrap_or_else(|p| p.into_inner());
        for (name, t) in tensors {
            if pixart::transformer::IGNORED_TENSORS.contains(&name.as_str()) {
                continue;
            }
            if !t.dtype().is_float() {
                return Err(Error::Json {
                    path: path.to_path_buf(),
                    line: None,
                    message: format!(
                        "tensor `{name}` has dtype {:?}, expected a float type",
                        t.dtype()
                    ),
                });
            }
            data.insert(name, Var::from_tensor(&t.to_dtype(dtype)?)?);
        }
    }
    Ok(varmap)
}

/// Deep copies of the current values (detached from the variables: later optimiser steps do not change
/// them), by name.
pub fn snapshot(varmap: &VarMap) -> Result<HashMap<String, Tensor>> {
    let data = varmap.data().lock().unwrap_or_else(|p| p.into_inner());
    data.iter()
        .map(|(name, var)| Ok((name.clone(), var.as_tensor().detach().copy()?)))
        .collect()
}

/// The variables sorted by name (a stable order for reports and optimisers).
pub fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap_or_else(|p| p.into_inner());
    let mut v: Vec<(String, Var)> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
