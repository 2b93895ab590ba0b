//! Named weights with shape checks that name the tensor at fault.
//!
//! Why not `candle_nn::VarBuilder`: its memory-mapped loader is `unsafe` (denied in this workspace), reading the
//! whole file first doubles peak memory for a 2.4 GB checkpoint, and its errors do not map onto [`Error`].
//! [`Weights`] reads a safetensors header once and then each tensor on demand with a positioned read, converts
//! it to the model dtype and device, and records which names were used so the loader can report leftovers.
//! A shape-only source lets tests build the real 611 M-parameter model without allocating its weights.
//!
//! [`Mode`] travels with the weights: [`Weights::from_varmap`] builds a model for training, whose layers
//! read the live variables (no cached transposed or fused copies) and use only ops with a backward pass.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};

use crate::{Error, Result};

enum Source {
    /// A safetensors file: header parsed, data read per tensor.
    File {
        path: PathBuf,
        file: Mutex<File>,
        data_start: u64,
        entries: HashMap<String, Entry>,
    },
    /// Tensors already in memory.
    Tensors(HashMap<String, Tensor>),
    /// Shapes only: every tensor is a broadcast zero (no allocation). For load tests at the real size.
    Shapes(HashMap<String, Vec<usize>>),
}

struct Entry {
    dtype: DType,
    shape: Vec<usize>,
    start: u64,
    end: u64,
}

/// How a model built from [`Weights`] computes its forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// The fast path: weights transposed and fused into cached copies at load time, fused CPU kernels
    /// (tanh-GELU, modulated LayerNorm) and candle's fused softmax. These have no backward pass and the
    /// copies do not follow later changes of the source tensors.
    #[default]
    Inference,
    /// Differentiable and live: layers hold the source tensors themselves (views, never copies), so a
    /// model built from a `VarMap`'s variables sees every optimiser step, and every op has a backward
    /// pass (composed softmax, tensor-op LayerNorm, candle's tanh-GELU). Same arithmetic as inference up
    /// to f32 rounding.
    Train,
}

/// A set of named tensors to build a model from.
pub struct Weights {
    source: Source,
    dtype: DType,
    device: Device,
    mode: Mode,
    used: Mutex<BTreeMap<String, usize>>,
}

impl Weights {
    /// Opens a safetensors file; tensors are read when requested.
    pub fn from_safetensors(path: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let bad = |message: String| Error::Io {
            path: path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, message),
        };
        let mut file = File::open(&path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(io)?;
        let header_len = u64::from_le_bytes(len);
        if header_len > 100_000_000 || 8 + header_len > file_len {
            return Err(bad(format!(
                "not a safetensors file (header length {header_len})"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(io)?;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| bad(format!("safetensors header: {e}")))?;
        let data_start = 8 + header_len;
        let mut entries = HashMap::new();
        for (name, info) in header {
            if name == "__metadata__" {
                continue;
            }
            let entry = parse_entry(&name, &info).map_err(bad)?;
            if data_start + entry.end > file_len {
                return Err(bad(format!(
                    "tensor `{name}` lies beyond the end of the file (truncated download?)"
                )));
            }
            entries.insert(name, entry);
        }
        Ok(Self::new(
            Source::File {
                path,
                file: Mutex::new(file),
                data_start,
                entries,
            },
            dtype,
            device,
        ))
    }

    /// Wraps tensors already in memory.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Self {
        Self::new(Source::Tensors(tensors), dtype, device)
    }

    /// The variables of `varmap` for a [`Mode::Train`] model: `get` returns the variables themselves
    /// (sharing their storage), so the model follows `Var::set` and optimiser steps, and gradients reach
    /// the variables. The dtype and device are those of the variables (all must agree).
    pub fn from_varmap(varmap: &candle_nn::VarMap) -> Result<Self> {
        let vars = varmap.data().lock().unwrap_or_else(|p| p.into_inner());
        let mut tensors = HashMap::with_capacity(vars.len());
        let mut kind: Option<(DType, Device)> = None;
        for (name, var) in vars.iter() {
            let t = var.as_tensor();
            match &kind {
                None => kind = Some((t.dtype(), t.device().clone())),
                Some((dtype, device)) if *dtype != t.dtype() || !device.same_device(t.device()) => {
                    return Err(Error::Tensor {
                        name: name.clone(),
                        message: format!(
                            "variable is {:?} on {:?}, the others are {dtype:?} on {device:?}",
                            t.dtype(),
                            t.device()
                        ),
                    });
                }
                Some(_) => {}
            }
            tensors.insert(name.clone(), t.clone());
        }
        let (dtype, device) = kind.unwrap_or((DType::F32, Device::Cpu));
        Ok(Self::new(Source::Tensors(tensors), dtype, &device).with_mode(Mode::Train))
    }

    /// The same weights for a model that computes in `mode`.
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// A shape-only source: `get` returns zero tensors broadcast to the stored shape, allocating nothing.
    pub fn from_shapes(shapes: HashMap<String, Vec<usize>>, dtype: DType, device: &Device) -> Self {
        Self::new(Source::Shapes(shapes), dtype, device)
    }

    fn new(source: Source, dtype: DType, device: &Device) -> Self {
        Self {
            source,
            dtype,
            device: device.clone(),
            mode: Mode::Inference,
            used: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A view whose names are prefixed with `prefix.` (mirrors the checkpoint's module tree).
    pub fn pp(&self, prefix: impl AsRef<str>) -> WeightPath<'_> {
        WeightPath {
            weights: self,
            prefix: prefix.as_ref().to_string(),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.source {
            Source::File { entries, .. } => entries.contains_key(name),
            Source::Tensors(t) => t.contains_key(name),
            Source::Shapes(s) => s.contains_key(name),
        }
    }

    /// All names in the source, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = match &self.source {
            Source::File { entries, .. } => entries.keys().cloned().collect(),
            Source::Tensors(t) => t.keys().cloned().collect(),
            Source::Shapes(s) => s.keys().cloned().collect(),
        };
        v.sort();
        v
    }

    fn stored_shape(&self, name: &str) -> Option<Vec<usize>> {
        match &self.source {
            Source::File { entries, .. } => entries.get(name).map(|e| e.shape.clone()),
            Source::Tensors(t) => t.get(name).map(|t| t.dims().to_vec()),
            Source::Shapes(s) => s.get(name).cloned(),
        }
    }

    /// Fetches `name`, checking it exists, is floating point and has exactly `shape`; converts it to the
    /// model dtype and device.
    pub fn get(&self, name: &str, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape: Shape = shape.into();
        let terr = |message: String| Error::Tensor {
            name: name.to_string(),
            message,
        };
        let Some(stored) = self.stored_shape(name) else {
            return Err(terr(format!(
                "missing from the checkpoint (expected shape {:?})",
                shape.dims()
            )));
        };
        if stored != shape.dims() {
            return Err(terr(format!(
                "has shape {stored:?}, expected {:?}",
                shape.dims()
            )));
        }
        let t = match &self.source {
            Source::File {
                path,
                file,
                data_start,
                entries,
            } => {
                let e = &entries[name];
                if !e.dtype.is_float() {
                    return Err(terr(format!(
                        "has dtype {:?}, expected a float type",
                        e.dtype
                    )));
                }
                let mut buf = vec![0u8; (e.end - e.start) as usize];
                {
                    let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
                    f.seek(SeekFrom::Start(data_start + e.start))
                        .and_then(|_| f.read_exact(&mut buf))
                        .map_err(|source| Error::Io {
                            path: path.clone(),
                            source,
                        })?;
                }
                Tensor::from_raw_buffer(&buf, e.dtype, &e.shape, &Device::Cpu)?
            }
            Source::Tensors(map) => {
                let t = map[name].clone();
                if !t.dtype().is_float() {
                    return Err(terr(format!(
                        "has dtype {:?}, expected a float type",
                        t.dtype()
                    )));
                }
                t
            }
            Source::Shapes(_) => {
                let z = Tensor::zeros((), self.dtype, &self.device)?;
                self.record(name, shape.elem_count());
                return Ok(z.broadcast_as(shape)?);
            }
        };
        self.record(name, shape.elem_count());
        // Convert on the host before moving: halves the bytes sent to a GPU.
        let t = if t.dtype() == self.dtype {
            t
        } else {
            t.to_dtype(self.dtype)?
        };
        Ok(t.to_device(&self.device)?)
    }

    fn record(&self, name: &str, count: usize) {
        self.used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), count);
    }

    /// Number of parameters fetched so far (each name counted once).
    pub fn used_parameter_count(&self) -> usize {
        self.used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .sum()
    }

    /// Names in the source that no `get` asked for, sorted.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let used: BTreeSet<&String> = used.keys().collect();
        self.names()
            .into_iter()
            .filter(|n| !used.contains(n))
            .collect()
    }
}

fn parse_entry(name: &str, info: &serde_json::Value) -> std::result::Result<Entry, String> {
    let dtype = match info.get("dtype").and_then(|v| v.as_str()) {
        Some("F32") => DType::F32,
        Some("F16") => DType::F16,
        Some("BF16") => DType::BF16,
        Some("F64") => DType::F64,
        Some("I64") => DType::I64,
        Some("I32") => DType::I32,
        Some("U8") => DType::U8,
        Some("U32") => DType::U32,
        other => return Err(format!("tensor `{name}`: unsupported dtype {other:?}")),
    };
    let shape: Vec<usize> = info
        .get("shape")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .ok_or_else(|| format!("tensor `{name}`: bad shape in header"))?;
    let offsets: [u64; 2] = info
        .get("data_offsets")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .ok_or_else(|| format!("tensor `{name}`: bad data_offsets in header"))?;
    let want = shape.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64;
    if offsets[1] < offsets[0] || offsets[1] - offsets[0] != want {
        return Err(format!(
            "tensor `{name}`: data_offsets {offsets:?} do not match shape {shape:?}"
        ));
    }
    Ok(Entry {
        dtype,
        shape,
        start: offsets[0],
        end: offsets[1],
    })
}

/// A prefixed view of [`Weights`], like `VarBuilder::pp`.
#[derive(Clone)]
pub struct WeightPath<'a> {
    weights: &'a Weights,
    prefix: String,
}

impl<'a> WeightPath<'a> {
    pub fn pp(&self, name: impl AsRef<str>) -> WeightPath<'a> {
        WeightPath {
            weights: self.weights,
            prefix: self.name(name.as_ref()),
        }
    }

    fn name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    pub fn get(&self, name: &str, shape: impl Into<Shape>) -> Result<Tensor> {
        self.weights.get(&self.name(name), shape)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.weights.contains(&self.name(name))
    }

    pub fn weights(&self) -> &'a Weights {
        self.weights
    }

    pub fn dtype(&self) -> DType {
        self.weights.dtype
    }

    pub fn device(&self) -> &Device {
        &self.weights.device
    }

    pub fn mode(&self) -> Mode {
        self.weights.mode
    }
}
