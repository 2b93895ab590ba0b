//! What the diffusion stages train on, prepared once per run: the dataset's images encoded by the trained
//! VAE (posterior means × `scaling_factor`, as the inference pipeline's latents are scaled) and their
//! captions encoded by the frozen text encoder.
//!
//! Both earlier stages are read from their exported diffusers directories (`vae/`, `tokenizer/`,
//! `text_encoder/`) through the inference code ([`pixart::vae::Vae`], [`pixart::text_encoder`]), so the
//! teacher learns exactly the latents and features the farm will feed it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use pixart::text_encoder::{T5Tokenizer, TextEncoder};
use pixart::vae::Vae;

use crate::dataset::{DatasetConfig, Sample};
use crate::vae::image_to_tensor;
use crate::{Error, Result};

/// The frozen text side: tokenizer + encoder, with every caption's features cached.
pub struct Text {
    tokenizer: T5Tokenizer,
    encoder: TextEncoder,
    cache: HashMap<String, Tensor>,
    /// The empty prompt's features (`[</s>]`): the unconditional input of caption dropout and guidance.
    null: Tensor,
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Text")
            .field("cached", &self.cache.len())
            .finish_non_exhaustive()
    }
}

fn model_error(dir: &Path, e: pixart::Error) -> Error {
    Error::ModelDir {
        path: dir.to_path_buf(),
        message: e.to_string(),
    }
}

impl Text {
    /// Loads `dir/tokenizer` and `dir/text_encoder` (the text stage's output, or a model directory).
    pub fn load(dir: &Path) -> Result<Self> {
        let tok_dir = dir.join("tokenizer");
        let tokenizer = T5Tokenizer::from_dir(&tok_dir).map_err(|e| model_error(&tok_dir, e))?;
        let enc_dir = dir.join("text_encoder");
        let mut encoder = TextEncoder::load(&enc_dir, DType::F32, &Device::Cpu)
            .map_err(|e| model_error(&enc_dir, e))?;
        let eos = tokenizer.eos_id();
        let (null, _) = encoder
            .encode_ids(&[vec![eos]], 1)
            .map_err(|e| model_error(&enc_dir, e))?;
        Ok(Self {
            tokenizer,
            encoder,
            cache: HashMap::new(),
            null: null.get(0)?,
        })
    }

    /// Width of the features (the transformer's `caption_channels`).
    pub fn channels(&self) -> usize {
        self.encoder.d_model()
    }

    /// `(L, d)` features of one prompt (cached).
    pub fn features(&mut self, prompt: &str) -> Result<Tensor> {
        if let Some(t) = self.cache.get(prompt) {
            return Ok(t.clone());
        }
        let ids = self
            .tokenizer
            .encode(prompt)
            .map_err(|e| Error::InvalidInput {
                field: "prompt",
                message: format!("{prompt:?}: {e}"),
            })?;
        let n = ids.len();
        let (y, _) = self
            .encoder
            .encode_ids(&[ids], n)
            .map_err(|e| Error::InvalidInput {
                field: "prompt",
                message: format!("{prompt:?}: {e}"),
            })?;
        let y = y.get(0)?;
        self.cache.insert(prompt.to_string(), y.clone());
        Ok(y)
    }

    /// A batch: `None` entries are the unconditional (empty) prompt. Returns `(y (B, L, d), mask (B, L))`
    /// zero-padded to the longest.
    pub fn batch(&mut self, prompts: &[Option<&str>]) -> Result<(Tensor, Tensor)> {
        let rows = prompts
            .iter()
            .map(|p| match p {
                Some(p) => self.features(p),
                None => Ok(self.null.clone()),
            })
            .collect::<Result<Vec<_>>>()?;
        pad(&rows)
    }
}

/// Zero-pads `(L_i, d)` rows to `(B, max L, d)` with a 1/0 mask.
pub fn pad(rows: &[Tensor]) -> Result<(Tensor, Tensor)> {
    let l = rows
        .iter()
        .map(|r| r.dim(0))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let max = l.iter().copied().max().unwrap_or(1);
    let d = rows.first().map_or(Ok(1), |r| r.dim(1))?;
    let mut padded = Vec::with_capacity(rows.len());
    let mut mask = Vec::with_capacity(rows.len() * max);
    for (r, &n) in rows.iter().zip(&l) {
        padded.push(if n < max {
            Tensor::cat(
                &[r, &Tensor::zeros((max - n, d), DType::F32, r.device())?],
                0,
            )?
        } else {
            r.clone()
        });
        mask.extend((0..max).map(|j| if j < n { 1f32 } else { 0.0 }));
    }
    let dev = rows.first().map_or(Device::Cpu, |r| r.device().clone());
    Ok((
        Tensor::stack(&padded, 0)?,
        Tensor::from_vec(mask, (rows.len(), max), &dev)?,
    ))
}

/// The dataset's first `count` training samples with their latents.
#[derive(Debug)]
pub struct LatentPool {
    pub samples: Vec<Sample>,
    /// `(count, latent_channels, h, w)`, scaled.
    pub latents: Tensor,
}

/// Loads `dir/vae` (the VAE stage's output or a model directory).
pub fn load_vae(dir: &Path) -> Result<(Vae, PathBuf)> {
    let vae_dir = dir.join("vae");
    let vae = Vae::load(&vae_dir, &Device::Cpu).map_err(|e| model_error(&vae_dir, e))?;
    Ok((vae, vae_dir))
}

impl LatentPool {
    /// Encodes the pictures of `set` (a [`crate::dataset::training_set`]), 64 at a time.
    pub fn encode(vae: &Vae, vae_dir: &Path, set: Vec<(Sample, RgbImage)>) -> Result<Self> {
        let mut chunks = Vec::new();
        for chunk in set.chunks(64) {
            let images = chunk
                .iter()
                .map(|(_, image)| image_to_tensor(image, &Device::Cpu))
                .collect::<Result<Vec<_>>>()?;
            let z = vae
                .encode_mean(&Tensor::stack(&images, 0)?)
                .map_err(|e| model_error(vae_dir, e))?;
            chunks.push(z);
        }
        Ok(Self {
            samples: set.into_iter().map(|(s, _)| s).collect(),
            latents: Tensor::cat(&chunks, 0)?,
        })
    }
}

/// Everything a diffusion stage reads from the earlier stages, loaded and encoded.
#[derive(Debug)]
pub struct Prepared {
    pub vae: Vae,
    pub text: Text,
    pub pool: LatentPool,
    /// Wall seconds the preparation took.
    pub seconds: f64,
}

impl Prepared {
    /// Loads `vae_dir/vae` and `text_dir/{tokenizer,text_encoder}`, encodes training samples `0..count` —
    /// of the procedural dataset at `seed` and `image_size`, or of the exported dataset at `dataset` — and
    /// caches their captions' features.
    pub fn load(
        vae_dir: &Path,
        text_dir: &Path,
        image_size: u32,
        seed: u64,
        count: u64,
        dataset: Option<&Path>,
    ) -> Result<Self> {
        let t0 = std::time::Instant::now();
        let data = DatasetConfig {
            image_size,
            seed,
            ..Default::default()
        };
        let set = crate::dataset::training_set(dataset, &data, count)?;
        let (vae, vae_path) = load_vae(vae_dir)?;
        let mut text = Text::load(text_dir)?;
        let pool = LatentPool::encode(&vae, &vae_path, set)?;
        for s in &pool.samples {
            text.features(&s.caption)?;
        }
        Ok(Self {
            vae,
            text,
            pool,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }

    /// `(C, h, w)` of one latent.
    pub fn latent_shape(&self) -> Vec<usize> {
        self.pool.latents.dims()[1..].to_vec()
    }
}
