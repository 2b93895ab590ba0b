//! The transformer's configuration, read from a diffusers `transformer/config.json`.
//!
//! Hub configs (PixArt-XL-2-1024-MS and its LCM student) were written by diffusers 0.22 under the class name
//! `Transformer2DModel` and omit `interpolation_scale` and `use_additional_conditions`; both are derived here
//! exactly as diffusers' `PixArtTransformer2DModel.__init__` derives them, because getting either wrong
//! silently degrades images (spec §1.2, §6.7, §6.12). Unknown keys are rejected so a config for a different
//! architecture fails loudly instead of loading half-right.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::{Error, Result};

/// Feed-forward activation (`activation_fn`). PixArt uses the tanh approximation everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FeedForwardActivation {
    /// `"gelu-approximate"`: GELU with the tanh approximation.
    #[serde(rename = "gelu-approximate")]
    GeluTanh,
    /// `"gelu"`: exact (erf) GELU.
    #[serde(rename = "gelu")]
    GeluErf,
}

/// Hyper-parameters of `PixArtTransformer2DModel`, with diffusers' key names.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransformerConfig {
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    /// Learned-sigma models predict twice the input channels (8 for PixArt).
    pub out_channels: usize,
    pub num_layers: usize,
    pub cross_attention_dim: usize,
    pub attention_bias: bool,
    /// Latent size the model was trained at (128 for the 1024 px models).
    pub sample_size: usize,
    pub patch_size: usize,
    pub activation_fn: FeedForwardActivation,
    pub norm_eps: f64,
    /// Width of the text features (4096 for T5-XXL).
    pub caption_channels: usize,
    /// Positional-table scale: `max(sample_size // 64, 1)` unless the config names it.
    pub interpolation_scale: f64,
    /// Resolution / aspect-ratio micro-conditions: `sample_size == 128` unless the config names it.
    pub use_additional_conditions: bool,
    pub num_embeds_ada_norm: usize,
    pub norm_type: String,
    pub norm_elementwise_affine: bool,
}

/// Keys diffusers may write for this model (its own and the old `Transformer2DModel` ones) that carry no
/// information we need; accepted when they hold the value PixArt uses.
const KNOWN_KEYS: &[&str] = &[
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "num_layers",
    "dropout",
    "norm_num_groups",
    "cross_attention_dim",
    "attention_bias",
    "sample_size",
    "num_vector_embeds",
    "patch_size",
    "activation_fn",
    "num_embeds_ada_norm",
    "use_linear_projection",
    "only_cross_attention",
    "double_self_attention",
    "upcast_attention",
    "norm_type",
    "norm_elementwise_affine",
    "norm_eps",
    "attention_type",
    "caption_channels",
    "interpolation_scale",
    "use_additional_conditions",
];

impl TransformerConfig {
    /// PixArt-XL-2-1024-MS / PixArt-LCM-XL-2-1024-MS (spec §1.2): 28 blocks, 16×72 heads, micro-conditions on.
    pub fn xl_2_1024_ms() -> Self {
        Self {
            num_attention_heads: 16,
            attention_head_dim: 72,
            in_channels: 4,
            out_channels: 8,
            num_layers: 28,
            cross_attention_dim: 1152,
            attention_bias: true,
            sample_size: 128,
            patch_size: 2,
            activation_fn: FeedForwardActivation::GeluTanh,
            norm_eps: 1e-6,
            caption_channels: 4096,
            interpolation_scale: 2.0,
            use_additional_conditions: true,
            num_embeds_ada_norm: 1000,
            norm_type: "ada_norm_single".to_string(),
            norm_elementwise_affine: false,
        }
    }

    /// PixArt-XL-2-512x512: same blocks, no micro-conditions, interpolation scale 1.
    pub fn xl_2_512() -> Self {
        Self {
            sample_size: 64,
            interpolation_scale: 1.0,
            use_additional_conditions: false,
            ..Self::xl_2_1024_ms()
        }
    }

    /// `num_attention_heads * attention_head_dim`: the width of every token.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Token-grid side the positional table is normalised to (`sample_size / patch_size`).
    pub fn base_size(&self) -> usize {
        self.sample_size / self.patch_size
    }

    /// Width of each micro-condition embedding (`inner_dim / 3`).
    pub fn size_emb_dim(&self) -> usize {
        self.inner_dim() / 3
    }

    /// Reads and validates `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text, path)
    }

    /// Parses a config from JSON text; `path` only names the file in errors.
    pub fn from_json_str(text: &str, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let err = |message: String| Error::Config {
            path: path.clone(),
            message,
        };
        let value: Value =
            serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(err("expected a JSON object".to_string()));
        };
        let p = Parser {
            map: &map,
            path: &path,
        };
        for key in map.keys() {
            // `_class_name`, `_diffusers_version`, `_name_or_path`, ...: bookkeeping, not architecture.
            if !key.starts_with('_') && !KNOWN_KEYS.contains(&key.as_str()) {
                return Err(err(format!("unknown key `{key}`")));
            }
        }

        let num_attention_heads: usize = p.required("num_attention_heads")?;
        let attention_head_dim: usize = p.required("attention_head_dim")?;
        let in_channels: usize = p.required("in_channels")?;
        let num_layers: usize = p.required("num_layers")?;
        let sample_size: usize = p.required("sample_size")?;
        let patch_size: usize = p.required("patch_size")?;
        let caption_channels: usize = p.required("caption_channels")?;
        let out_channels = p.optional::<usize>("out_channels")?.unwrap_or(in_channels);
        let inner_dim = num_attention_heads * attention_head_dim;
        let cross_attention_dim = p.optional::<usize>("cross_attention_dim")?.unwrap_or(1152);
        let attention_bias = p.optional::<bool>("attention_bias")?.unwrap_or(true);
        let activation_fn = match p.optional::<String>("activation_fn")?.as_deref() {
            None | Some("gelu-approximate") => FeedForwardActivation::GeluTanh,
            Some("gelu") => FeedForwardActivation::GeluErf,
            Some(other) => {
                return Err(err(format!(
                    "key `activation_fn`: unsupported value {other:?}"
                )));
            }
        };
        let norm_eps = p.optional::<f64>("norm_eps")?.unwrap_or(1e-6);
        let num_embeds_ada_norm = p.optional::<usize>("num_embeds_ada_norm")?.unwrap_or(1000);
        let norm_type = p
            .optional::<String>("norm_type")?
            .unwrap_or_else(|| "ada_norm_single".to_string());
        let norm_elementwise_affine = p
            .optional::<bool>("norm_elementwise_affine")?
            .unwrap_or(false);
        let interpolation_scale = p
            .optional::<f64>("interpolation_scale")?
            .unwrap_or_else(|| ((sample_size / 64).max(1)) as f64);
        let use_additional_conditions = p
            .optional::<bool>("use_additional_conditions")?
            .unwrap_or(sample_size == 128);

        // Values that would change the architecture into something this port does not implement.
        if norm_type != "ada_norm_single" {
            return Err(err(format!(
                "key `norm_type`: only \"ada_norm_single\" is supported, got {norm_type:?}"
            )));
        }
        if norm_elementwise_affine {
            return Err(err(
                "key `norm_elementwise_affine`: PixArt's norms have no affine weights".into(),
            ));
        }
        if let Some(t) = p.optional::<String>("attention_type")?
            && t != "default"
        {
            return Err(err(format!(
                "key `attention_type`: only \"default\" is supported, got {t:?}"
            )));
        }
        for key in ["only_cross_attention", "double_self_attention"] {
            if p.optional::<bool>(key)? == Some(true) {
                return Err(err(format!("key `{key}`: must be false for PixArt")));
            }
        }
        if p.map.get("num_vector_embeds").is_some_and(|v| !v.is_null()) {
            return Err(err(
                "key `num_vector_embeds`: discrete inputs are not supported".into(),
            ));
        }
        // Read for their type only: dropout is inactive at inference, norm_num_groups is unused by this model,
        // and softmax always runs in f32 here (what `upcast_attention` asks for).
        let _: Option<f64> = p.optional("dropout")?;
        let _: Option<usize> = p.optional("norm_num_groups")?;
        let _: Option<bool> = p.optional("upcast_attention")?;
        let _: Option<bool> = p.optional("use_linear_projection")?;

        let positive = [
            ("num_attention_heads", num_attention_heads),
            ("attention_head_dim", attention_head_dim),
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("sample_size", sample_size),
            ("patch_size", patch_size),
            ("caption_channels", caption_channels),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(err(format!("key `{key}`: must be positive")));
            }
        }
        if cross_attention_dim != inner_dim {
            return Err(err(format!(
                "key `cross_attention_dim`: {cross_attention_dim} must equal num_attention_heads × \
                 attention_head_dim = {inner_dim} (the caption projection outputs inner_dim)"
            )));
        }
        if use_additional_conditions && !inner_dim.is_multiple_of(3) {
            return Err(err(format!(
                "key `use_additional_conditions`: micro-conditions need an inner_dim divisible by 3, got {inner_dim}"
            )));
        }
        if interpolation_scale.is_nan() || interpolation_scale <= 0.0 {
            return Err(err("key `interpolation_scale`: must be positive".into()));
        }
        if norm_eps.is_nan() || norm_eps <= 0.0 {
            return Err(err("key `norm_eps`: must be positive".into()));
        }
        Ok(Self {
            num_attention_heads,
            attention_head_dim,
            in_channels,
            out_channels,
            num_layers,
            cross_attention_dim,
            attention_bias,
            sample_size,
            patch_size,
            activation_fn,
            norm_eps,
            caption_channels,
            interpolation_scale,
            use_additional_conditions,
            num_embeds_ada_norm,
            norm_type,
            norm_elementwise_affine,
        })
    }

    /// The config as diffusers writes it (what `gen.py` and the benchmark feed back to Python).
    pub fn to_json_string(&self) -> String {
        let mut v = serde_json::to_value(self).expect("config serialises");
        if let Value::Object(m) = &mut v {
            m.insert(
                "_class_name".into(),
                Value::String("PixArtTransformer2DModel".into()),
            );
        }
        serde_json::to_string_pretty(&v).expect("config serialises")
    }
}

struct Parser<'a> {
    map: &'a Map<String, Value>,
    path: &'a PathBuf,
}

impl Parser<'_> {
    fn optional<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| Error::Config {
                    path: self.path.clone(),
                    message: format!("key `{key}`: {e}"),
                }),
        }
    }

    fn required<T: DeserializeOwned>(&self, key: &str) -> Result<T> {
        self.optional(key)?.ok_or_else(|| Error::Config {
            path: self.path.clone(),
            message: format!("missing required key `{key}`"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HUB_1024: &str = r#"{
      "_class_name": "Transformer2DModel", "_diffusers_version": "0.22.0.dev0",
      "activation_fn": "gelu-approximate", "attention_bias": true, "attention_head_dim": 72,
      "attention_type": "default", "caption_channels": 4096, "cross_attention_dim": 1152,
      "double_self_attention": false, "dropout": 0.0, "in_channels": 4, "norm_elementwise_affine": false,
      "norm_eps": 1e-06, "norm_num_groups": 32, "norm_type": "ada_norm_single", "num_attention_heads": 16,
      "num_embeds_ada_norm": 1000, "num_layers": 28, "num_vector_embeds": null, "only_cross_attention": false,
      "out_channels": 8, "patch_size": 2, "sample_size": 128, "upcast_attention": false,
      "use_linear_projection": false
    }"#;

    #[test]
    fn hub_config_derives_scale_and_micro_conditions() {
        let cfg = TransformerConfig::from_json_str(HUB_1024, "config.json").unwrap();
        assert_eq!(cfg, TransformerConfig::xl_2_1024_ms());
        assert_eq!(cfg.inner_dim(), 1152);
        assert_eq!(cfg.base_size(), 64);
        let c512 = HUB_1024.replace("\"sample_size\": 128", "\"sample_size\": 64");
        let cfg = TransformerConfig::from_json_str(&c512, "config.json").unwrap();
        assert_eq!(cfg, TransformerConfig::xl_2_512());
        assert_eq!(cfg.interpolation_scale, 1.0);
        assert!(!cfg.use_additional_conditions);
    }

    #[test]
    fn explicit_keys_override_derivation() {
        let c = HUB_1024.replace(
            "\"use_linear_projection\": false",
            "\"interpolation_scale\": 0.5, \"use_additional_conditions\": false",
        );
        let cfg = TransformerConfig::from_json_str(&c, "config.json").unwrap();
        assert_eq!(cfg.interpolation_scale, 0.5);
        assert!(!cfg.use_additional_conditions);
    }

    #[test]
    fn unknown_and_missing_keys_are_named() {
        let c = HUB_1024.replace("\"dropout\"", "\"droppout\"");
        let e = TransformerConfig::from_json_str(&c, "/m/transformer/config.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/m/transformer/config.json") && e.contains("unknown key `droppout`"),
            "{e}"
        );
        let c = HUB_1024.replace("\"num_layers\": 28,", "");
        let e = TransformerConfig::from_json_str(&c, "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cfg.json") && e.contains("missing required key `num_layers`"),
            "{e}"
        );
        let c = HUB_1024.replace("\"num_layers\": 28", "\"num_layers\": \"many\"");
        let e = TransformerConfig::from_json_str(&c, "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `num_layers`"), "{e}");
    }

    #[test]
    fn roundtrip_through_json() {
        let cfg = TransformerConfig::xl_2_1024_ms();
        let back = TransformerConfig::from_json_str(&cfg.to_json_string(), "x").unwrap();
        assert_eq!(cfg, back);
    }
}
