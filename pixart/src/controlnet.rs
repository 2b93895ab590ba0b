//! The PixArt-δ ControlNet-Transformer adapter (spec §5) and the converter from the original `.pth` layout.
//!
//! The adapter is N trainable copies of the first base blocks. The control latents go through the *base*
//! model's patch embedding; the first copy sees `x + before_proj(cc)` where `x` is the output of base block 0,
//! every copy's output goes through its own `after_proj` and is added to the base stream just before base block
//! `k + 1`. Only `num_layers` is stored in the adapter's `config.json` (diffusers-community layout): every other
//! size comes from the base transformer, so an adapter is only meaningful together with the base it was trained
//! on.
//!
//! `conditioning_scale` multiplies each `after_proj` output before the residual add (neither reference has a
//! scale; this is the natural extension, spec §5.3). It may differ per batch row so one batch can mix strengths
//! (and uncontrolled rows, at scale 0). A scale of exactly 0 adds `0·after_proj(h)`, which leaves the base
//! stream bit-for-bit unchanged; when every row is at 0 the adapter is skipped altogether.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};

use crate::config::TransformerConfig;
use crate::embeddings::{Dense, linear};
use crate::transformer::{PixArtBlock, PixArtTransformer};
use crate::weights::Weights;
use crate::{Error, Result};

/// File names of the diffusers-community adapter layout.
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";

/// The adapter's own configuration: `config.json` holds only `num_layers` (plus diffusers bookkeeping keys that
/// start with `_`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlNetConfig {
    /// Number of copied blocks (13 in the released checkpoints).
    pub num_layers: usize,
}

impl ControlNetConfig {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text, path)
    }

    pub fn from_json_str(text: &str, path: impl AsRef<Path>) -> Result<Self> {
        let err = |message: String| Error::Config {
            path: path.as_ref().to_path_buf(),
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let serde_json::Value::Object(map) = value else {
            return Err(err("expected a JSON object".into()));
        };
        // A full transformer config here means the user pointed at the base model instead of the adapter.
        if let Some(key) = map
            .keys()
            .find(|k| !k.starts_with('_') && *k != "num_layers")
        {
            return Err(err(format!(
                "unknown key `{key}` (a ControlNet adapter config holds only `num_layers`; is this a \
                 transformer directory?)"
            )));
        }
        let num_layers = match map.get("num_layers") {
            None => 13, // the diffusers-community class's default
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => n as usize,
                _ => {
                    return Err(err(format!(
                        "key `num_layers`: expected a positive integer, got {v}"
                    )));
                }
            },
        };
        Ok(Self { num_layers })
    }

    pub fn to_json_string(&self) -> String {
        serde_json::json!({
            "_class_name": "PixArtControlNetAdapterModel",
            "num_layers": self.num_layers,
        })
        .to_string()
    }
}

/// One adapter block: `before_proj` (block 0 only), a full PixArt block, `after_proj`.
pub struct ControlNetBlock {
    pub before_proj: Option<Dense>,
    pub transformer_block: PixArtBlock,
    pub after_proj: Dense,
}

/// The ControlNet-Transformer adapter (`PixArtControlNetAdapterModel`).
pub struct ControlNetAdapter {
    pub config: ControlNetConfig,
    pub controlnet_blocks: Vec<ControlNetBlock>,
    dtype: DType,
    device: Device,
    num_parameters: usize,
}

/// The control input of one forward.
#[derive(Debug, Clone, Copy)]
pub struct ControlCondition<'a> {
    /// `(B, C_in, H, W)`: control latents (VAE posterior mean × scaling factor), same shape as the noisy latents.
    pub latents: &'a Tensor,
    /// One value for the whole batch or one per row; each in `[0, 2]` is what the pipeline accepts, the model
    /// only requires finite values.
    pub scale: &'a [f32],
}

impl ControlNetAdapter {
    /// Loads a diffusers-community adapter directory (`config.json` + `diffusion_pytorch_model.safetensors`);
    /// `base` is the configuration of the transformer it will run with.
    pub fn load(
        dir: impl AsRef<Path>,
        base: &TransformerConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let _span = tracing::info_span!("controlnet.load", dir = %dir.display()).entered();
        let config = ControlNetConfig::from_file(dir.join(CONFIG_FILE))?;
        let weights = Weights::from_safetensors(dir.join(WEIGHTS_FILE), dtype, device)?;
        Self::new(config, base, &weights).map_err(|e| match e {
            // Name the file: the same tensor names exist in the base checkpoint.
            Error::Tensor { name, message } => Error::Weights {
                path: dir.join(WEIGHTS_FILE),
                message: format!("tensor `{name}`: {message}"),
            },
            Error::Config { message, .. } => Error::Config {
                path: dir.join(CONFIG_FILE),
                message,
            },
            other => other,
        })
    }

    /// Builds the adapter from named weights: every expected tensor must be present with its exact shape and
    /// every tensor in the source must be used.
    pub fn new(
        config: ControlNetConfig,
        base: &TransformerConfig,
        weights: &Weights,
    ) -> Result<Self> {
        if config.num_layers >= base.num_layers {
            return Err(Error::Config {
                path: PathBuf::from(CONFIG_FILE),
                message: format!(
                    "`num_layers` is {} but the base transformer has {} blocks; adapter block k feeds base \
                     block k + 1, so at most {} adapter blocks fit",
                    config.num_layers,
                    base.num_layers,
                    base.num_layers - 1
                ),
            });
        }
        let d = base.inner_dim();
        let root = weights.pp("controlnet_blocks");
        let controlnet_blocks = (0..config.num_layers)
            .map(|k| {
                let p = root.pp(k.to_string());
                Ok(ControlNetBlock {
                    before_proj: if k == 0 {
                        Some(linear(&p, "before_proj", d, d, true)?)
                    } else {
                        None
                    },
                    transformer_block: PixArtBlock::load(&p.pp("transformer_block"), base)?,
                    after_proj: linear(&p, "after_proj", d, d, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let unused = weights.unused();
        if let Some(name) = unused.first() {
            let hint = match name
                .strip_prefix("controlnet_blocks.")
                .and_then(|r| r.split('.').next())
                .and_then(|k| k.parse::<usize>().ok())
            {
                Some(k) if k >= config.num_layers => format!(
                    " (the config says `num_layers` = {}, the checkpoint has block {k})",
                    config.num_layers
                ),
                _ => String::new(),
            };
            return Err(Error::Tensor {
                name: name.clone(),
                message: format!(
                    "unexpected tensor in the adapter checkpoint{hint}; {} unexpected tensor(s) in all",
                    unused.len()
                ),
            });
        }
        Ok(Self {
            config,
            controlnet_blocks,
            dtype: weights.dtype(),
            device: weights.device().clone(),
            num_parameters: weights.used_parameter_count(),
        })
    }

    /// Parameters loaded (294,917,760 for the released 13-block adapter).
    pub fn num_parameters(&self) -> usize {
        self.num_parameters
    }

    pub fn num_layers(&self) -> usize {
        self.config.num_layers
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The base forward with the adapter interleaved (spec §5.3): `(B, out_channels, H, W)`.
    ///
    /// Arguments as [`PixArtTransformer::forward`], plus the control latents and scale.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        base: &PixArtTransformer,
        x: &Tensor,
        timestep: &Tensor,
        y: &Tensor,
        mask: Option<&Tensor>,
        res_ar: Option<(&Tensor, &Tensor)>,
        control: &ControlCondition<'_>,
    ) -> Result<Tensor> {
        let xd = x.dims().to_vec();
        if control.latents.dims() != xd.as_slice() {
            return Err(Error::InvalidInput {
                field: "controlnet_cond",
                message: format!(
                    "expected the shape of the latents {xd:?}, got {:?}",
                    control.latents.dims()
                ),
            });
        }
        let b = xd.first().copied().unwrap_or(0);
        let scale = scale_vector(control.scale, b)?;
        if base.dtype() != self.dtype || !base.device().same_device(&self.device) {
            return Err(Error::InvalidInput {
                field: "controlnet",
                message: format!(
                    "the adapter is {:?} on {:?} but the transformer is {:?} on {:?}",
                    self.dtype,
                    self.device,
                    base.dtype(),
                    base.device()
                ),
            });
        }
        if scale.iter().all(|&s| s == 0.0) {
            // Exactly the base model, and no adapter cost.
            return base.forward(x, timestep, y, mask, res_ar);
        }
        let _span = tracing::debug_span!(
            "controlnet.forward",
            batch = b,
            height = xd.get(2).copied().unwrap_or(0),
            width = xd.get(3).copied().unwrap_or(0),
            blocks = self.controlnet_blocks.len()
        )
        .entered();
        let (mut h, cond) = base.prepare(x, timestep, y, mask, res_ar)?;
        let cc = {
            let _s = tracing::trace_span!("control_embed").entered();
            let z = control
                .latents
                .to_device(base.device())?
                .to_dtype(base.dtype())?;
            base.pos_embed.forward(&z)?
        };
        let scale = if scale.iter().all(|&s| s == 1.0) {
            None
        } else {
            Some(Tensor::from_vec(scale, (b, 1, 1), base.device())?.to_dtype(base.dtype())?)
        };
        let blocks = &base.transformer_blocks;
        h = blocks[0].forward(&h, &cond)?;
        let mut c: Option<Tensor> = None;
        for (k, adapter) in self.controlnet_blocks.iter().enumerate() {
            let _s = tracing::trace_span!("control_block", index = k).entered();
            let input = match (&adapter.before_proj, c.take()) {
                (Some(before), None) => (&h + before.forward(&cc)?)?,
                (None, Some(prev)) => prev,
                // Only reachable for a hand-assembled adapter (`new` builds exactly this shape).
                _ => {
                    return Err(Error::InvalidInput {
                        field: "controlnet",
                        message: format!(
                            "adapter block {k}: only block 0 may (and must) have `before_proj`"
                        ),
                    });
                }
            };
            let out = adapter.transformer_block.forward(&input, &cond)?;
            let add = adapter.after_proj.forward(&out)?;
            let add = match &scale {
                Some(s) => add.broadcast_mul(s)?,
                None => add,
            };
            h = (h + add)?;
            c = Some(out);
            let _b = tracing::trace_span!("block", index = k + 1).entered();
            h = blocks[k + 1].forward(&h, &cond)?;
        }
        for (i, block) in blocks
            .iter()
            .enumerate()
            .skip(self.controlnet_blocks.len() + 1)
        {
            let _s = tracing::trace_span!("block", index = i).entered();
            h = block.forward(&h, &cond)?;
        }
        base.final_layer.forward(&h, &cond)
    }
}

/// Expands a per-batch or per-row scale to one finite value per row.
fn scale_vector(scale: &[f32], b: usize) -> Result<Vec<f32>> {
    let v = match scale.len() {
        1 => vec![scale[0]; b],
        n if n == b => scale.to_vec(),
        n => {
            return Err(Error::InvalidInput {
                field: "conditioning_scale",
                message: format!("expected 1 or {b} values (one per batch row), got {n}"),
            });
        }
    };
    if let Some((i, s)) = v.iter().enumerate().find(|(_, s)| !s.is_finite()) {
        return Err(Error::InvalidInput {
            field: "conditioning_scale",
            message: format!("row {i}: {s} is not a finite number"),
        });
    }
    Ok(v)
}

/// The conformance harness's `transformer --controlnet` mode (docs/conformance.md) as a library call.
pub mod conformance {
    use std::collections::HashMap;
    use std::path::Path;

    use candle_core::{DType, Device, Tensor};

    use super::{ControlCondition, ControlNetAdapter};
    use crate::transformer::PixArtTransformer;
    use crate::transformer::conformance::{base_inputs, input};
    use crate::{Error, Result};

    /// The optional `conditioning_scale` input (default 1.0): one value, or one per batch row.
    pub fn conditioning_scale(inputs: &HashMap<String, Tensor>) -> Result<Vec<f32>> {
        match inputs.get("conditioning_scale") {
            None => Ok(vec![1.0]),
            Some(t) => {
                let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                if v.is_empty() {
                    return Err(Error::Tensor {
                        name: "conditioning_scale".into(),
                        message: "is empty; expected shape (1,)".into(),
                    });
                }
                Ok(v)
            }
        }
    }

    /// Runs one controlled forward on tensors named as in the contract (the `transformer` inputs plus
    /// `controlnet_cond` and optional `conditioning_scale`). Returns `sample`.
    pub fn forward_named(
        model: &PixArtTransformer,
        adapter: &ControlNetAdapter,
        inputs: &HashMap<String, Tensor>,
    ) -> Result<Tensor> {
        let b = base_inputs(model, inputs)?;
        let cz = input(inputs, "controlnet_cond")?;
        let scale = conditioning_scale(inputs)?;
        adapter.forward(
            model,
            b.x,
            b.t,
            b.y,
            Some(b.mask),
            b.res_ar,
            &ControlCondition {
                latents: cz,
                scale: &scale,
            },
        )
    }

    /// Loads base and adapter (f32, CPU), reads `inputs`, writes `sample` to `out`.
    pub fn run_files(
        model_dir: &Path,
        adapter_dir: &Path,
        inputs: &Path,
        out: &Path,
    ) -> Result<()> {
        let model = PixArtTransformer::load(model_dir, DType::F32, &Device::Cpu)?;
        let adapter =
            ControlNetAdapter::load(adapter_dir, &model.config, DType::F32, &Device::Cpu)?;
        let tensors = crate::pipeline::conformance::load_tensors(inputs)?;
        let sample = forward_named(&model, &adapter, &tensors)?;
        crate::pipeline::conformance::save_tensors(
            &HashMap::from([("sample".to_string(), sample)]),
            out,
        )
    }
}

// -------------------------------------------------------------------------------------------------------------
// Converter: original PixArt-δ `.pth` → diffusers-community layout
// -------------------------------------------------------------------------------------------------------------

/// What [`convert_controlnet_pth`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertReport {
    /// Adapter blocks found (`controlnet.{k}`).
    pub num_layers: usize,
    /// Tensors written to the safetensors file.
    pub tensors_written: usize,
    /// Parameters written.
    pub parameters: usize,
    /// `base_model.*` tensors skipped (the frozen base: load it from the diffusers base checkpoint instead).
    pub base_model_tensors_ignored: usize,
    /// Other tensors skipped (reported so nothing is dropped silently), sorted.
    pub other_ignored: Vec<String>,
    pub config_path: PathBuf,
    pub weights_path: PathBuf,
}

/// How one original block tensor becomes diffusers tensors.
enum Rule {
    Rename(&'static str),
    /// Split along dim 0 into equal parts, one per name.
    Split(&'static [&'static str]),
}

/// Spec §2.9, block rows: original block key suffix (before `.weight`/`.bias`) → diffusers.
const BLOCK_RULES: &[(&str, Rule)] = &[
    (
        "attn.qkv",
        Rule::Split(&["attn1.to_q", "attn1.to_k", "attn1.to_v"]),
    ),
    ("attn.proj", Rule::Rename("attn1.to_out.0")),
    ("cross_attn.q_linear", Rule::Rename("attn2.to_q")),
    (
        "cross_attn.kv_linear",
        Rule::Split(&["attn2.to_k", "attn2.to_v"]),
    ),
    ("cross_attn.proj", Rule::Rename("attn2.to_out.0")),
    ("mlp.fc1", Rule::Rename("ff.net.0.proj")),
    ("mlp.fc2", Rule::Rename("ff.net.2")),
];

/// Every original key an adapter block `k` must have (without the `controlnet.{k}.` prefix).
fn required_block_keys(k: usize) -> Vec<String> {
    let mut v = vec!["copied_block.scale_shift_table".to_string()];
    for (orig, _) in BLOCK_RULES {
        for p in ["weight", "bias"] {
            v.push(format!("copied_block.{orig}.{p}"));
        }
    }
    for p in ["weight", "bias"] {
        v.push(format!("after_proj.{p}"));
        if k == 0 {
            v.push(format!("before_proj.{p}"));
        }
    }
    v
}

/// Maps one key of `controlnet.{k}.` (the part after that prefix) to its diffusers name(s) with the split rule.
fn map_block_key(rest: &str) -> Option<(Vec<String>, bool)> {
    if rest == "copied_block.scale_shift_table" {
        return Some((vec!["transformer_block.scale_shift_table".into()], false));
    }
    for proj in ["before_proj", "after_proj"] {
        for p in ["weight", "bias"] {
            if rest == format!("{proj}.{p}") {
                return Some((vec![rest.to_string()], false));
            }
        }
    }
    let inner = rest.strip_prefix("copied_block.")?;
    let (stem, param) = inner.rsplit_once('.')?;
    if param != "weight" && param != "bias" {
        return None;
    }
    BLOCK_RULES
        .iter()
        .find(|(orig, _)| *orig == stem)
        .map(|(_, rule)| match rule {
            Rule::Rename(to) => (vec![format!("transformer_block.{to}.{param}")], false),
            Rule::Split(parts) => (
                parts
                    .iter()
                    .map(|to| format!("transformer_block.{to}.{param}"))
                    .collect(),
                true,
            ),
        })
}

/// Converts the original `PixArt-XL-2-1024-ControlNet.pth` (a torch zip pickle `{"state_dict": {...}}` holding
/// `base_model.*` and `controlnet.{k}.*`) into a diffusers-community adapter directory `out_dir`
/// (`config.json` with `num_layers` + `diffusion_pytorch_model.safetensors`).
///
/// Fused `attn.qkv` is split in three and `cross_attn.kv_linear` in two along dim 0; the base model is not
/// written (pair the adapter with the diffusers base checkpoint). Tensors keep their stored dtype. Only the
/// adapter tensors are read, so converting the 3.65 GB file needs about the adapter's size (1.2 GB) in memory.
pub fn convert_controlnet_pth(input: &Path, out_dir: &Path) -> Result<ConvertReport> {
    let _span = tracing::info_span!("convert_controlnet", input = %input.display()).entered();
    let bad = |message: String| Error::Weights {
        path: input.to_path_buf(),
        message,
    };
    if !input.is_file() {
        return Err(Error::Io {
            path: input.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    // The released file is `{"state_dict": ...}`; a bare state dict is accepted too.
    let pth = match candle_core::pickle::PthTensors::new(input, Some("state_dict")) {
        Ok(p) => p,
        Err(e) if e.to_string().contains("not found") => {
            candle_core::pickle::PthTensors::new(input, None)
                .map_err(|e| bad(format!("cannot read as a torch checkpoint: {e}")))?
        }
        Err(e) => return Err(bad(format!("cannot read as a torch checkpoint: {e}"))),
    };
    let names: BTreeSet<String> = pth.tensor_infos().keys().cloned().collect();
    if names.is_empty() {
        return Err(bad(
            "no tensors found (expected a state dict, optionally under `state_dict`)".into(),
        ));
    }

    let mut blocks: BTreeMap<usize, Vec<(String, String)>> = BTreeMap::new();
    let mut base_ignored = 0usize;
    let mut other_ignored = Vec::new();
    for name in &names {
        if name.starts_with("base_model.") {
            base_ignored += 1;
            continue;
        }
        let Some(rest) = name.strip_prefix("controlnet.") else {
            other_ignored.push(name.clone());
            continue;
        };
        let (k, rest) = rest
            .split_once('.')
            .and_then(|(k, r)| k.parse::<usize>().ok().map(|k| (k, r)))
            .ok_or_else(|| {
                bad(format!(
                    "tensor `{name}`: expected `controlnet.<block>.<...>`"
                ))
            })?;
        blocks
            .entry(k)
            .or_default()
            .push((name.clone(), rest.to_string()));
    }
    let num_layers = blocks.len();
    if num_layers == 0 {
        return Err(bad(format!(
            "no `controlnet.*` tensors found among {} tensors: not a PixArt ControlNet checkpoint",
            names.len()
        )));
    }
    if let Some((i, k)) = blocks.keys().enumerate().find(|(i, k)| *i != **k) {
        return Err(bad(format!(
            "adapter blocks are not numbered 0..{num_layers}: block {i} is missing (next is {k})"
        )));
    }

    let mut out: HashMap<String, Tensor> = HashMap::new();
    for (&k, entries) in &blocks {
        let present: BTreeSet<&str> = entries.iter().map(|(_, r)| r.as_str()).collect();
        if let Some(missing) = required_block_keys(k)
            .into_iter()
            .find(|r| !present.contains(r.as_str()))
        {
            return Err(bad(format!(
                "tensor `controlnet.{k}.{missing}` is missing from the checkpoint"
            )));
        }
        for (name, rest) in entries {
            let (targets, split) = match map_block_key(rest) {
                Some(m) if !(k > 0 && rest.starts_with("before_proj")) => m,
                _ => {
                    return Err(bad(format!(
                        "tensor `{name}`: unexpected key (not part of a PixArt ControlNet block)"
                    )));
                }
            };
            let t = pth
                .get(name)
                .map_err(|e| bad(format!("tensor `{name}`: {e}")))?
                .ok_or_else(|| bad(format!("tensor `{name}`: listed but not readable")))?;
            let targets: Vec<String> = targets
                .into_iter()
                .map(|t| format!("controlnet_blocks.{k}.{t}"))
                .collect();
            if split {
                let n = targets.len();
                let rows = t.dim(0)?;
                if rows % n != 0 {
                    return Err(bad(format!(
                        "tensor `{name}` has shape {:?}: dim 0 is not divisible by {n} for the split",
                        t.dims()
                    )));
                }
                for (i, target) in targets.into_iter().enumerate() {
                    out.insert(target, t.narrow(0, i * rows / n, rows / n)?.contiguous()?);
                }
            } else {
                out.insert(targets[0].clone(), t.contiguous()?);
            }
        }
    }

    std::fs::create_dir_all(out_dir).map_err(|source| Error::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let config_path = out_dir.join(CONFIG_FILE);
    let weights_path = out_dir.join(WEIGHTS_FILE);
    let parameters = out.values().map(|t| t.elem_count()).sum();
    let tensors_written = out.len();
    candle_core::safetensors::save(&out, &weights_path).map_err(|e| Error::Io {
        path: weights_path.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    std::fs::write(
        &config_path,
        ControlNetConfig { num_layers }.to_json_string() + "\n",
    )
    .map_err(|source| Error::Io {
        path: config_path.clone(),
        source,
    })?;
    tracing::info!(num_layers, tensors_written, parameters, "adapter written");
    Ok(ConvertReport {
        num_layers,
        tensors_written,
        parameters,
        base_model_tensors_ignored: base_ignored,
        other_ignored,
        config_path,
        weights_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_accepts_bookkeeping_and_rejects_transformer_configs() {
        let c = ControlNetConfig::from_json_str(
            r#"{"_class_name": "PixArtControlNetAdapterModel", "_diffusers_version": "0.29.0", "num_layers": 13}"#,
            "c.json",
        )
        .unwrap();
        assert_eq!(c.num_layers, 13);
        let e = ControlNetConfig::from_json_str(r#"{"num_layers": 28, "patch_size": 2}"#, "c.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("patch_size"), "{e}");
        let e = ControlNetConfig::from_json_str(r#"{"num_layers": 0}"#, "c.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_layers"), "{e}");
        let back = ControlNetConfig::from_json_str(&c.to_json_string(), "c.json").unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn block_key_map_follows_the_official_converter() {
        let (t, split) = map_block_key("copied_block.attn.qkv.weight").unwrap();
        assert!(split);
        assert_eq!(
            t,
            [
                "transformer_block.attn1.to_q.weight",
                "transformer_block.attn1.to_k.weight",
                "transformer_block.attn1.to_v.weight"
            ]
        );
        let (t, split) = map_block_key("copied_block.cross_attn.kv_linear.bias").unwrap();
        assert!(split);
        assert_eq!(
            t,
            [
                "transformer_block.attn2.to_k.bias",
                "transformer_block.attn2.to_v.bias"
            ]
        );
        assert_eq!(
            map_block_key("copied_block.mlp.fc2.weight").unwrap().0,
            ["transformer_block.ff.net.2.weight"]
        );
        assert_eq!(
            map_block_key("after_proj.bias").unwrap().0,
            ["after_proj.bias"]
        );
        assert!(map_block_key("copied_block.attn.qkv.running_mean").is_none());
        assert!(map_block_key("copied_block.norm1.weight").is_none());
    }

    #[test]
    fn scale_vector_checks_length_and_finiteness() {
        assert_eq!(scale_vector(&[0.5], 3).unwrap(), vec![0.5; 3]);
        assert_eq!(scale_vector(&[0.5, 1.0], 2).unwrap(), vec![0.5, 1.0]);
        let e = scale_vector(&[0.5, 1.0], 3).unwrap_err().to_string();
        assert!(e.contains("conditioning_scale"), "{e}");
        let e = scale_vector(&[f32::NAN], 1).unwrap_err().to_string();
        assert!(e.contains("finite"), "{e}");
    }
}
