//! Stage 2: the text side — a word-level T5 tokenizer for the caption grammar and a small, frozen T5
//! encoder whose attention is built to see word order.
//!
//! **Why frozen.** candle-transformers' T5 (what inference runs) has no backward pass (its softmax is a
//! fused kernel), and a jointly trained encoder would need a second T5 implementation to match it. What
//! the DiT needs from the text is which word stands next to which: "red" next to "circle" and "blue" next
//! to "background" must give different features. A T5 at its standard random initialisation does not
//! provide that: its relative-position bias starts near zero, so every token attends almost uniformly and
//! "red" and "blue" get the same context. Here the bias table (a real T5 parameter, bucketed as T5
//! buckets) is set so that each of the four heads reads one side: the previous word, the next word, and
//! decaying windows to the left and to the right. Everything else is T5's own initialisation
//! (`T5PreTrainedModel._init_weights`, drawn from the run's seed). The teacher then learns to read these
//! features through its caption projection; the prompt-accuracy figures measure whether that suffices.
//!
//! **Tokenizer.** A `tokenizers` Unigram model, as T5's: `▁word` pieces for every word of the grammar
//! (and the bare word, for the part after a hyphen), punctuation, and single letters and digits as a
//! fallback so that any prompt tokenizes; `</s>` appended by the post-processor. Written as
//! `tokenizer/tokenizer.json` + `tokenizer_config.json`, which both [`pixart::text_encoder::T5Tokenizer`]
//! and transformers' `T5TokenizerFast` read.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::attributes::{Attributes, Colour, Position, Shape, Size};
use crate::caption::{TEMPLATES, caption};
use crate::seed::{self, Stream};
use crate::{Error, Result};

/// The stage name.
pub const STAGE: &str = "text";

/// The encoder's shape. `d_model` is the transformer's `caption_channels`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextConfig {
    pub seed: u64,
    pub d_model: usize,
    pub d_kv: usize,
    pub num_heads: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    /// Bias (logit) of a head's preferred relative position over the others.
    pub locality: f64,
}

impl Default for TextConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            d_model: 64,
            d_kv: 16,
            num_heads: 4,
            d_ff: 128,
            num_layers: 2,
            locality: 4.0,
        }
    }
}

impl TextConfig {
    pub fn validate(&self) -> Result<()> {
        if self.d_model == 0 || self.d_kv == 0 || self.d_ff == 0 || self.num_layers == 0 {
            return Error::invalid(
                "d_model",
                "d_model, d_kv, d_ff and num_layers must be positive",
            );
        }
        if self.num_heads < 4 {
            return Error::invalid(
                "num_heads",
                "at least 4: one head each for the previous word, the next word, and the left and right windows",
            );
        }
        if !self.locality.is_finite() {
            return Error::invalid("locality", "must be finite");
        }
        Ok(())
    }
}

/// Buckets of T5's bidirectional relative-position scheme (32 buckets, max distance 128).
const NUM_BUCKETS: usize = 32;
const MAX_DISTANCE: usize = 128;

/// T5's `_relative_position_bucket(relative_position = key − query, bidirectional=True)`.
pub fn relative_bucket(relative: i64) -> usize {
    let half = NUM_BUCKETS / 2;
    let offset = if relative > 0 { half } else { 0 };
    let n = relative.unsigned_abs() as usize;
    let max_exact = half / 2;
    let b = if n < max_exact {
        n
    } else {
        let v = max_exact as f64
            + ((n as f64 / max_exact as f64).ln() / (MAX_DISTANCE as f64 / max_exact as f64).ln())
                * (half - max_exact) as f64;
        (v as usize).min(half - 1)
    };
    offset + b
}

/// The `(NUM_BUCKETS, heads)` bias table: head 0 the previous word, head 1 the next, head 2 a window to the
/// left (and itself), head 3 one to the right; further heads see everything evenly.
fn position_bias(config: &TextConfig) -> Vec<f32> {
    let heads = config.num_heads;
    let k = config.locality;
    let mut table = vec![0f32; NUM_BUCKETS * heads];
    for rel in -(MAX_DISTANCE as i64)..=(MAX_DISTANCE as i64) {
        let bucket = relative_bucket(rel);
        let d = rel.unsigned_abs() as f64;
        for h in 0..heads {
            let v = match h {
                0 if rel == -1 => k,
                1 if rel == 1 => k,
                2 if rel <= 0 => k - d,
                3 if rel >= 0 => k - d,
                0..=3 => -k,
                _ => 0.0,
            };
            table[bucket * heads + h] = v as f32;
        }
    }
    table
}

/// Every piece of the tokenizer's vocabulary after the specials: grammar words, punctuation, fallbacks.
pub fn vocabulary() -> Vec<String> {
    let mut words = BTreeSet::new();
    let mut inner = BTreeSet::new();
    for colour in Colour::ALL {
        for shape in Shape::ALL {
            for size in Size::ALL {
                for position in Position::ALL {
                    let a = Attributes {
                        colour,
                        shape,
                        size,
                        position,
                    };
                    for t in 0..TEMPLATES {
                        for w in caption(&a, Colour::ALL[(colour as usize + 1) % 8], t)
                            .split_whitespace()
                        {
                            let w = w.trim_end_matches([',', '.']);
                            let mut parts = w.split('-');
                            if let Some(first) = parts.next() {
                                words.insert(first.to_string());
                            }
                            inner.extend(parts.map(str::to_string));
                        }
                    }
                }
            }
        }
    }
    // Words a free-form prompt about these scenes may use.
    for w in [
        "an", "of", "and", "with", "center", "corner", "shape", "image", "picture",
    ] {
        words.insert(w.to_string());
    }
    let mut pieces: Vec<String> = words.iter().map(|w| format!("▁{w}")).collect();
    pieces.extend(inner);
    pieces.extend([",", ".", "-", "▁"].map(str::to_string));
    pieces.extend(('a'..='z').chain('0'..='9').map(|c| c.to_string()));
    let mut seen = BTreeSet::new();
    pieces.retain(|p| seen.insert(p.clone()));
    pieces
}

/// The `tokenizer.json` document: T5's pre-tokenizer, post-processor and decoder around a Unigram model.
pub fn tokenizer_json() -> Value {
    let mut vocab = vec![
        json!(["<pad>", 0.0]),
        json!(["</s>", 0.0]),
        json!(["<unk>", 0.0]),
    ];
    for p in vocabulary() {
        // Whole words win over any split into letters; single characters are the last resort.
        let score = if p.chars().count() == 1 && p != "," && p != "▁" {
            -12.0
        } else if p.starts_with('▁') {
            -2.0
        } else {
            -3.0
        };
        vocab.push(json!([p, score]));
    }
    let special = |id: usize, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<pad>"), special(1, "</s>"), special(2, "<unk>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "WhitespaceSplit"},
            {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true}]},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}},
        "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true},
        "model": {"type": "Unigram", "unk_id": 2, "vocab": vocab, "byte_fallback": false}
    })
}

fn write(path: &Path, text: String) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    std::fs::write(path, text).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `out/tokenizer/` and `out/text_encoder/` (diffusers/transformers layout). Returns the vocabulary
/// size.
pub fn build(config: &TextConfig, out: &Path) -> Result<usize> {
    config.validate()?;
    let tok = tokenizer_json();
    let vocab_size = tok["model"]["vocab"].as_array().map_or(0, Vec::len);
    let pretty = |v: &Value| serde_json::to_string_pretty(v).expect("JSON values serialise") + "\n";
    write(&out.join("tokenizer/tokenizer.json"), pretty(&tok))?;
    let tok_config = json!({
        "tokenizer_class": "T5Tokenizer",
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "extra_ids": 0, "additional_special_tokens": [],
        "model_max_length": 120, "legacy": false, "clean_up_tokenization_spaces": false
    });
    write(
        &out.join("tokenizer/tokenizer_config.json"),
        pretty(&tok_config),
    )?;
    write(
        &out.join("tokenizer/special_tokens_map.json"),
        pretty(&json!({"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"})),
    )?;

    let c = config;
    let t5 = json!({
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "d_model": c.d_model, "d_kv": c.d_kv, "d_ff": c.d_ff, "num_heads": c.num_heads,
        "num_layers": c.num_layers, "num_decoder_layers": c.num_layers,
        "vocab_size": vocab_size,
        "relative_attention_num_buckets": NUM_BUCKETS, "relative_attention_max_distance": MAX_DISTANCE,
        "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": true,
        "layer_norm_epsilon": 1e-6, "initializer_factor": 1.0, "dropout_rate": 0.0,
        "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
        "is_encoder_decoder": false, "use_cache": false, "tie_word_embeddings": false,
        "torch_dtype": "float32"
    });
    write(&out.join("text_encoder/config.json"), pretty(&t5))?;
    let tensors = weights(config, vocab_size)?;
    let path = out.join("text_encoder/model.safetensors");
    candle_core::safetensors::save(&tensors, &path).map_err(|e| Error::Io {
        path: path.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(vocab_size)
}

/// T5's initialisation (`initializer_factor` 1), seeded, with the positional bias of [`position_bias`].
fn weights(c: &TextConfig, vocab_size: usize) -> Result<HashMap<String, Tensor>> {
    let dev = Device::Cpu;
    let mut rng = seed::rng(c.seed, 0, Stream::Init);
    let mut normal = |shape: &[usize], std: f64| -> Result<Tensor> {
        Ok(seed::randn(&mut rng, shape, &dev)?.affine(std, 0.0)?)
    };
    let (d, kv, h, ff) = (c.d_model, c.d_kv, c.num_heads, c.d_ff);
    let inner = h * kv;
    let mut t = HashMap::new();
    t.insert("shared.weight".to_string(), normal(&[vocab_size, d], 1.0)?);
    for i in 0..c.num_layers {
        let p = format!("encoder.block.{i}.layer");
        t.insert(
            format!("{p}.0.SelfAttention.q.weight"),
            normal(&[inner, d], ((d * kv) as f64).powf(-0.5))?,
        );
        t.insert(
            format!("{p}.0.SelfAttention.k.weight"),
            normal(&[inner, d], (d as f64).powf(-0.5))?,
        );
        t.insert(
            format!("{p}.0.SelfAttention.v.weight"),
            normal(&[inner, d], (d as f64).powf(-0.5))?,
        );
        t.insert(
            format!("{p}.0.SelfAttention.o.weight"),
            normal(&[d, inner], (inner as f64).powf(-0.5))?,
        );
        t.insert(
            format!("{p}.0.layer_norm.weight"),
            Tensor::ones(d, DType::F32, &dev)?,
        );
        t.insert(
            format!("{p}.1.DenseReluDense.wi_0.weight"),
            normal(&[ff, d], (d as f64).powf(-0.5))?,
        );
        t.insert(
            format!("{p}.1.DenseReluDense.wi_1.weight"),
            normal(&[ff, d], (d as f64).powf(-0.5))?,
        );
        t.insert(
            format!("{p}.1.DenseReluDense.wo.weight"),
            normal(&[d, ff], (ff as f64).powf(-0.5))?,
        );
        t.insert(
            format!("{p}.1.layer_norm.weight"),
            Tensor::ones(d, DType::F32, &dev)?,
        );
    }
    t.insert(
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight".to_string(),
        Tensor::from_vec(position_bias(c), (NUM_BUCKETS, h), &dev)?,
    );
    t.insert(
        "encoder.final_layer_norm.weight".to_string(),
        Tensor::ones(d, DType::F32, &dev)?,
    );
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_t5() {
        // Values from transformers' T5Attention._relative_position_bucket (bidirectional, 32, 128).
        let cases = [
            (0, 0),
            (-1, 1),
            (-7, 7),
            (-8, 8),
            (-20, 10),
            (-127, 15),
            (1, 17),
            (7, 23),
            (8, 24),
            (200, 31),
        ];
        for (rel, bucket) in cases {
            assert_eq!(relative_bucket(rel), bucket, "relative position {rel}");
        }
    }

    #[test]
    fn every_caption_word_is_one_piece() {
        let vocab: BTreeSet<String> = vocabulary().into_iter().collect();
        for w in ["▁red", "▁circle", "▁backdrop", "left", "▁top", "▁little"] {
            assert!(vocab.contains(w), "{w} missing");
        }
    }
}
