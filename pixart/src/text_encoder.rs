//! Prompt encoding: the T5 tokenizer (via the `tokenizers` crate) and the T5-v1.1 encoder (via
//! candle-transformers' `models::t5`).
//!
//! # Tokenizer
//! The tokenizer is read from `tokenizer/tokenizer.json`. The hub checkpoint ships only the
//! sentencepiece `spiece.model`; convert it once, in place, with Python `transformers`
//! (`pip install transformers sentencepiece protobuf`):
//!
//! ```text
//! python3 -c "import sys; from transformers import T5TokenizerFast as T; T.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[1])" MODEL/tokenizer
//! ```
//!
//! Prompts are pre-processed like diffusers with `clean_caption=False`: lower-cased and trimmed.
//! The EOS token is appended; prompts longer than 120 tokens are truncated (119 tokens + EOS, a
//! `tracing` warning says so); an empty prompt is an error.
//!
//! # Encoder and padding
//! candle's T5 has no attention mask. Masked pads are invisible to the valid tokens and T5's
//! relative position bias depends only on offsets, so encoding the *valid tokens alone* gives
//! exactly the embeddings diffusers gets for them with padding + mask. Each distinct prompt is
//! encoded on its own (so its features never depend on the rest of the batch); outputs are zero-padded to the sequence length and a mask
//! (1 = token, 0 = pad) is returned for the transformer's cross-attention. T5 never runs in f16
//! (its feed-forward activations overflow): f16 requests become bf16.
//!
//! ```no_run
//! # fn main() -> pixart::Result<()> {
//! use pixart::text_encoder::{T5Tokenizer, TextEncoder};
//! let dev = candle_core::Device::Cpu;
//! let tok = T5Tokenizer::from_dir(std::path::Path::new("model/tokenizer"))?;
//! let mut t5 = TextEncoder::load(std::path::Path::new("model/text_encoder"), candle_core::DType::F32, &dev)?;
//! let ids = vec![tok.encode("A red fox in the snow")?];
//! let (y, mask) = t5.encode_ids(&ids, 120)?; // (1, 120, 4096), (1, 120)
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::t5;
use serde_json::Value;

use crate::loading::{find_weights, mmap_var_builder, read_json_object, weights_error};
use crate::{Error, Result};

/// PixArt's caption length (diffusers `max_sequence_length`, the original `model_max_length`).
pub const MAX_SEQUENCE_LENGTH: usize = 120;

/// The one-line command that writes `tokenizer.json` next to `spiece.model`.
pub fn conversion_command(tokenizer_dir: &Path) -> String {
    format!(
        "python3 -c \"import sys; from transformers import T5TokenizerFast as T; T.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[1])\" '{}'",
        tokenizer_dir.display()
    )
}

/// diffusers' prompt pre-processing without `clean_caption`: lower-case, then trim.
pub fn preprocess_prompt(prompt: &str) -> String {
    prompt.to_lowercase().trim().to_string()
}

/// The T5 sentencepiece tokenizer loaded from `tokenizer.json`.
#[derive(Clone)]
pub struct T5Tokenizer {
    tokenizer: tokenizers::Tokenizer,
    eos_id: u32,
    max_length: usize,
    path: PathBuf,
}

impl std::fmt::Debug for T5Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5Tokenizer")
            .field("path", &self.path)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

impl T5Tokenizer {
    /// Loads `dir/tokenizer.json`. If only `spiece.model` is there, the error carries the
    /// conversion command.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            let message = if dir.join("spiece.model").is_file() {
                format!(
                    "not found; this checkpoint only has the sentencepiece model spiece.model. Convert it once with: {}",
                    conversion_command(dir)
                )
            } else {
                "not found (neither is spiece.model)".to_string()
            };
            return Err(Error::Tokenizer { path, message });
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let eos_id = tokenizer
            .token_to_id("</s>")
            .ok_or_else(|| Error::Tokenizer {
                path: path.clone(),
                message: "no `</s>` (EOS) token in the vocabulary".into(),
            })?;
        Ok(Self {
            tokenizer,
            eos_id,
            max_length: MAX_SEQUENCE_LENGTH,
            path,
        })
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Token ids of one prompt (pre-processed, EOS appended, at most 120 ids, no padding).
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let text = preprocess_prompt(prompt);
        if text.is_empty() {
            return Err(Error::InvalidInput {
                field: "prompt",
                message: "is empty".into(),
            });
        }
        let enc = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                message: e.to_string(),
            })?;
        let mut ids = enc.get_ids().to_vec();
        if ids.last() == Some(&self.eos_id) {
            ids.pop();
        }
        let keep = self.max_length - 1;
        if ids.len() > keep {
            tracing::warn!(
                tokens = ids.len() + 1,
                max = self.max_length,
                "prompt is longer than {} tokens and was truncated: {:?}",
                self.max_length,
                &text
            );
            ids.truncate(keep);
        }
        ids.push(self.eos_id);
        Ok(ids)
    }
}

/// Reads a T5 `config.json`, tolerating transformers-5 files (extra keys, `tie_word_embeddings`,
/// keys candle requires but newer writers omit get T5's defaults).
pub fn load_t5_config(path: &Path) -> Result<t5::Config> {
    let mut map = read_json_object(path)?;
    for key in [
        "d_model",
        "d_kv",
        "d_ff",
        "num_layers",
        "num_heads",
        "vocab_size",
    ] {
        if !map.contains_key(key) {
            return Err(Error::Config {
                path: path.to_path_buf(),
                message: format!("missing key `{key}`"),
            });
        }
    }
    let defaults = [
        ("relative_attention_num_buckets", Value::from(32)),
        ("relative_attention_max_distance", Value::from(128)),
        ("dropout_rate", Value::from(0.1)),
        ("layer_norm_epsilon", Value::from(1e-6)),
        ("initializer_factor", Value::from(1.0)),
        ("feed_forward_proj", Value::from("relu")),
        ("is_encoder_decoder", Value::from(true)),
        ("pad_token_id", Value::from(0)),
        ("eos_token_id", Value::from(1)),
    ];
    for (k, v) in defaults {
        match map.get(k) {
            None | Some(Value::Null) => {
                map.insert(k.to_string(), v);
            }
            _ => {}
        }
    }
    // The encoder never uses the decoder/cache flags; drop anything candle might choke on.
    map.insert("use_cache".into(), Value::from(false));
    map.insert("is_decoder".into(), Value::from(false));
    if let Some(Value::Array(a)) = map.get("eos_token_id").cloned() {
        map.insert(
            "eos_token_id".into(),
            a.first().cloned().unwrap_or(Value::from(1)),
        );
    }
    if !matches!(map.get("decoder_start_token_id"), Some(Value::Number(_))) {
        map.remove("decoder_start_token_id");
    }
    if !matches!(map.get("num_decoder_layers"), Some(Value::Number(_))) {
        map.remove("num_decoder_layers");
    }
    serde_json::from_value(Value::Object(map)).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The T5 encoder used as PixArt's text encoder.
pub struct TextEncoder {
    model: t5::T5EncoderModel,
    config: t5::Config,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for TextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextEncoder")
            .field("d_model", &self.config.d_model)
            .field("dtype", &self.dtype)
            .finish()
    }
}

/// T5's safe compute dtype for a requested one: never f16.
pub fn safe_t5_dtype(requested: DType, device: &Device) -> DType {
    match (requested, device.is_cpu()) {
        (_, true) => DType::F32,
        (DType::F16, false) => DType::BF16,
        (d, false) => d,
    }
}

impl TextEncoder {
    /// Loads `config.json` + `model.safetensors` (or the sharded index) from `dir`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let _span = tracing::info_span!("t5_load", dir = %dir.display()).entered();
        let config = load_t5_config(&dir.join("config.json"))?;
        let dtype = safe_t5_dtype(dtype, device);
        let files = find_weights(dir, "model")?;
        let vb = mmap_var_builder(&files, dtype, device)?;
        let model = t5::T5EncoderModel::load(vb, &config).map_err(|e| weights_error(&files, e))?;
        Ok(Self {
            model,
            config,
            dtype,
            device: device.clone(),
        })
    }

    pub fn d_model(&self) -> usize {
        self.config.d_model
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Encodes unpadded id lists (each at most `seq_len` long, non-empty) into
    /// `(hidden (B, seq_len, d) f32, mask (B, seq_len) f32)`; pad rows are zero.
    pub fn encode_ids(&mut self, ids: &[Vec<u32>], seq_len: usize) -> Result<(Tensor, Tensor)> {
        let _span = tracing::info_span!("t5_encode", batch = ids.len(), seq_len).entered();
        let d = self.config.d_model;
        // One forward per *distinct* prompt, batch 1: a prompt's features are then bit-identical
        // whatever else is in the batch (batched matmuls may round differently with the batch
        // size), and repeated prompts (one prompt, many seeds) are encoded once.
        let mut cache: HashMap<&[u32], Tensor> = HashMap::new();
        let mut rows: Vec<Tensor> = Vec::with_capacity(ids.len());
        for (i, v) in ids.iter().enumerate() {
            if v.is_empty() || v.len() > seq_len {
                return Err(Error::InvalidInput {
                    field: "input_ids",
                    message: format!(
                        "item {i} has {} valid tokens; expected 1..={seq_len}",
                        v.len()
                    ),
                });
            }
            if let Some(row) = cache.get(v.as_slice()) {
                rows.push(row.clone());
                continue;
            }
            let input = Tensor::from_vec(v.clone(), (1, v.len()), &self.device)?;
            let row = self.model.forward(&input)?.to_dtype(DType::F32)?.get(0)?;
            let row = if v.len() < seq_len {
                Tensor::cat(
                    &[
                        &row,
                        &Tensor::zeros((seq_len - v.len(), d), DType::F32, &self.device)?,
                    ],
                    0,
                )?
            } else {
                row
            };
            cache.insert(v.as_slice(), row.clone());
            rows.push(row);
        }
        let hidden = Tensor::stack(&rows, 0)?;
        let mask: Vec<f32> = ids
            .iter()
            .flat_map(|v| (0..seq_len).map(move |j| if j < v.len() { 1.0 } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (ids.len(), seq_len), &self.device)?;
        Ok((hidden, mask))
    }

    /// Encodes padded `input_ids` (B, L) with an `attention_mask` (B, L) as transformers does,
    /// for any contiguous run of ones per row (right or left padding). Masked positions of the
    /// output are zero (transformers leaves values there that nothing may use).
    pub fn encode_masked(&mut self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        if attention_mask.dims() != [b, l] {
            return Err(Error::Tensor {
                name: "attention_mask".into(),
                message: format!("expected shape ({b}, {l}), got {:?}", attention_mask.dims()),
            });
        }
        let ids = input_ids
            .to_dtype(DType::I64)?
            .to_device(&Device::Cpu)?
            .to_vec2::<i64>()?;
        let mask = attention_mask
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .to_vec2::<f32>()?;
        let mut spans = Vec::with_capacity(b);
        let mut valid = Vec::with_capacity(b);
        for (r, m) in mask.iter().enumerate() {
            let on: Vec<usize> = (0..l).filter(|&j| m[j] > 0.5).collect();
            let (Some(&s), Some(&e)) = (on.first(), on.last()) else {
                return Err(Error::Tensor {
                    name: "attention_mask".into(),
                    message: format!("row {r} has no valid token"),
                });
            };
            if e - s + 1 != on.len() {
                return Err(Error::Tensor {
                    name: "attention_mask".into(),
                    message: format!("row {r}: the ones must be contiguous"),
                });
            }
            let row: Vec<u32> = ids[r][s..=e]
                .iter()
                .map(|&x| {
                    u32::try_from(x)
                        .ok()
                        .filter(|&x| (x as usize) < self.config.vocab_size)
                })
                .collect::<Option<_>>()
                .ok_or_else(|| Error::Tensor {
                    name: "input_ids".into(),
                    message: format!("row {r} has an id outside 0..{}", self.config.vocab_size),
                })?;
            spans.push(s);
            valid.push(row);
        }
        let (hidden, _) = self.encode_ids(&valid, l)?;
        // Move left-padded rows back into place.
        let rows = (0..b)
            .map(|r| {
                let row = hidden.get(r)?;
                let s = spans[r];
                if s == 0 {
                    return Ok(row);
                }
                let n = valid[r].len();
                let d = row.dim(1)?;
                let mut parts = vec![
                    Tensor::zeros((s, d), DType::F32, &self.device)?,
                    row.narrow(0, 0, n)?,
                ];
                if l > s + n {
                    parts.push(Tensor::zeros((l - s - n, d), DType::F32, &self.device)?);
                }
                Ok(Tensor::cat(&parts, 0)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocessing_and_command() {
        assert_eq!(preprocess_prompt("  A Red FOX \n"), "a red fox");
        let c = conversion_command(Path::new("/m/tokenizer"));
        assert!(
            c.contains("T5TokenizerFast") && c.contains("/m/tokenizer"),
            "{c}"
        );
    }

    #[test]
    fn transformers5_style_config_loads() {
        let tmp = std::env::temp_dir().join(format!("pixart-t5cfg-{}.json", std::process::id()));
        std::fs::write(
            &tmp,
            r#"{"d_model":32,"d_kv":8,"d_ff":64,"num_layers":2,"num_heads":4,"vocab_size":100,
                "feed_forward_proj":"gated-gelu","tie_word_embeddings":true,"dense_act_fn":"gelu_new",
                "is_gated_act":true,"some_new_key":{"x":1},"eos_token_id":1,"pad_token_id":0}"#,
        )
        .unwrap();
        let c = load_t5_config(&tmp).unwrap();
        assert_eq!(c.d_model, 32);
        assert!(c.feed_forward_proj.gated);
        std::fs::write(&tmp, r#"{"d_kv":8}"#).unwrap();
        assert!(
            load_t5_config(&tmp)
                .unwrap_err()
                .to_string()
                .contains("d_model")
        );
        std::fs::remove_file(&tmp).unwrap();
    }
}
