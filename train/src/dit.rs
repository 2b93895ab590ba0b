//! A PixArt transformer from scratch: diffusers' parameter names and shapes for a config, PixArt's own
//! initialisation, and export as a diffusers `transformer/` directory.
//!
//! The names are those [`pixart::transformer::PixArtTransformer`] reads (and diffusers'
//! `PixArtTransformer2DModel` writes): tested against the bundled tiny checkpoint, which diffusers made.
//! The initialisation follows PixArt-α's `initialize_weights`: Xavier-uniform linear layers with zero
//! biases, N(0, 0.02) for the timestep embedder, the timestep modulation and the caption projection, the
//! scale-shift tables `randn / √D`, and zeros for the cross-attention output projections and the final
//! projection (so a fresh model predicts 0 and the text path starts neutral).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use pixart::config::TransformerConfig;

use crate::seed::{self, Stream};
use crate::varmap::sorted_vars;
use crate::{Error, Result};

/// Every parameter of a PixArt transformer with `config` (no micro-conditions), by diffusers name.
pub fn parameter_shapes(config: &TransformerConfig) -> Result<BTreeMap<String, Vec<usize>>> {
    if config.use_additional_conditions {
        return Err(Error::InvalidInput {
            field: "use_additional_conditions",
            message: "micro-conditions are not trained here (sample_size 128 turns them on)".into(),
        });
    }
    let d = config.inner_dim();
    let p = config.patch_size;
    let mut s = BTreeMap::new();
    let mut linear = |name: &str, out: usize, inp: usize, bias: bool| {
        s.insert(format!("{name}.weight"), vec![out, inp]);
        if bias {
            s.insert(format!("{name}.bias"), vec![out]);
        }
    };
    linear("adaln_single.emb.timestep_embedder.linear_1", d, 256, true);
    linear("adaln_single.emb.timestep_embedder.linear_2", d, d, true);
    linear("adaln_single.linear", 6 * d, d, true);
    linear(
        "caption_projection.linear_1",
        d,
        config.caption_channels,
        true,
    );
    linear("caption_projection.linear_2", d, d, true);
    for i in 0..config.num_layers {
        let b = format!("transformer_blocks.{i}");
        for attn in ["attn1", "attn2"] {
            let kv_in = if attn == "attn1" {
                d
            } else {
                config.cross_attention_dim
            };
            linear(&format!("{b}.{attn}.to_q"), d, d, config.attention_bias);
            linear(&format!("{b}.{attn}.to_k"), d, kv_in, config.attention_bias);
            linear(&format!("{b}.{attn}.to_v"), d, kv_in, config.attention_bias);
            linear(&format!("{b}.{attn}.to_out.0"), d, d, true);
        }
        linear(&format!("{b}.ff.net.0.proj"), 4 * d, d, true);
        linear(&format!("{b}.ff.net.2"), d, 4 * d, true);
    }
    linear("proj_out", p * p * config.out_channels, d, true);
    s.insert(
        "pos_embed.proj.weight".into(),
        vec![d, config.in_channels, p, p],
    );
    s.insert("pos_embed.proj.bias".into(), vec![d]);
    for i in 0..config.num_layers {
        s.insert(
            format!("transformer_blocks.{i}.scale_shift_table"),
            vec![6, d],
        );
    }
    s.insert("scale_shift_table".into(), vec![2, d]);
    Ok(s)
}

/// How PixArt initialises the parameter `name` of shape `dims`.
enum Init {
    Zeros,
    Normal(f64),
    XavierUniform,
}

fn init_rule(name: &str) -> Init {
    if name.ends_with(".bias") {
        Init::Zeros
    } else if name.ends_with("scale_shift_table") {
        Init::Normal(-1.0) // randn / √D, resolved with the shape
    } else if name.starts_with("adaln_single.") || name.starts_with("caption_projection.") {
        Init::Normal(0.02)
    } else if name.contains(".attn2.to_out.") || name.starts_with("proj_out.") {
        Init::Zeros
    } else {
        Init::XavierUniform
    }
}

/// A freshly initialised transformer as variables (seeded by `seed`).
pub fn init_varmap(config: &TransformerConfig, seed: u64, device: &Device) -> Result<VarMap> {
    let shapes = parameter_shapes(config)?;
    let varmap = VarMap::new();
    let mut rng = seed::rng(seed, 0, Stream::Init);
    {
        let mut data = varmap.data().lock().unwrap_or_else(|p| p.into_inner());
        for (name, dims) in &shapes {
            let t = match init_rule(name) {
                Init::Zeros => Tensor::zeros(dims.as_slice(), DType::F32, device)?,
                Init::Normal(std) => {
                    let std = if std < 0.0 {
                        (dims[1] as f64).powf(-0.5)
                    } else {
                        std
                    };
                    seed::randn(&mut rng, dims, device)?.affine(std, 0.0)?
                }
                Init::XavierUniform => {
                    let receptive: usize = dims[2..].iter().product();
                    let (fan_out, fan_in) = (dims[0] * receptive, dims[1] * receptive);
                    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
                    seed::uniform(&mut rng, dims, bound as f32, device)?
                }
            };
            data.insert(name.clone(), Var::from_tensor(&t)?);
        }
    }
    Ok(varmap)
}

/// Writes `dir/config.json` and `dir/diffusion_pytorch_model.safetensors` from the variables.
pub fn export(varmap: &VarMap, config: &TransformerConfig, dir: &Path) -> Result<()> {
    save_tensors(varmap, dir, "diffusion_pytorch_model.safetensors")?;
    let path = dir.join("config.json");
    std::fs::write(&path, config.to_json_string()).map_err(|source| Error::Io { path, source })
}

/// Saves every variable (detached values) as `dir/file`, creating `dir`.
pub fn save_tensors(varmap: &VarMap, dir: &Path, file: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let tensors: std::collections::HashMap<String, Tensor> = sorted_vars(varmap)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().detach()))
        .collect();
    let path = dir.join(file);
    candle_core::safetensors::save(&tensors, &path).map_err(|e| Error::Io {
        path: path.clone(),
        source: std::io::Error::other(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names and shapes diffusers wrote for the bundled tiny model.
    #[test]
    fn shapes_match_the_diffusers_tiny_checkpoint() {
        let dir =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-pixart-lcm/transformer");
        let config = TransformerConfig::from_file(dir.join("config.json")).unwrap();
        let stored = candle_core::safetensors::load(
            dir.join("diffusion_pytorch_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let stored: BTreeMap<String, Vec<usize>> = stored
            .into_iter()
            .filter(|(n, _)| !pixart::transformer::IGNORED_TENSORS.contains(&n.as_str()))
            .map(|(n, t)| (n, t.dims().to_vec()))
            .collect();
        assert_eq!(parameter_shapes(&config).unwrap(), stored);
    }

    #[test]
    fn a_fresh_model_builds_and_predicts_zero() {
        let dir =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-pixart-lcm/transformer");
        let config = TransformerConfig::from_file(dir.join("config.json")).unwrap();
        let dev = Device::Cpu;
        let varmap = init_varmap(&config, 3, &dev).unwrap();
        let model =
            pixart::transformer::PixArtTransformer::trainable(config.clone(), &varmap).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &dev).unwrap();
        let y = Tensor::randn(0f32, 1.0, (2, 5, config.caption_channels), &dev).unwrap();
        let t = Tensor::new(&[10f32, 500.0], &dev).unwrap();
        let out = model.forward(&x, &t, &y, None, None).unwrap();
        assert_eq!(out.dims(), &[2, 8, 8, 8]);
        assert_eq!(
            out.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }
}
