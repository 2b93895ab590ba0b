//! The text-to-image pipeline: prompts in, images out.
//!
//! API CONTRACT (fixed early so the worker can build against it; the model helpers fill in the body).

use std::path::PathBuf;

use crate::Result;

/// Which LCM timestep selection to use (see `scheduler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimestepSpacing {
    /// diffusers >= 0.24 (`floor(linspace(0, 50, n, endpoint=false))` over the reversed 50-step grid).
    #[default]
    Diffusers,
    /// The original PixArt repository (every `50 / n`-th entry of the reversed grid).
    Original,
}

/// Where the weights come from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A local directory in the diffusers layout (`model_index.json`, `transformer/`, ...).
    Dir(PathBuf),
    /// A Hugging Face hub model id, resolved through the local hub cache (and the network when there is one).
    Hub { model_id: String, revision: Option<String> },
}

/// How the pipeline is placed and run.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub device: candle_core::Device,
    /// Dtype of the transformer (f32 on CPU; f16/bf16 on GPU). T5 and the VAE choose their own safe dtypes.
    pub dtype: candle_core::DType,
    /// Drop the T5 encoder from device memory after each encode (re-loaded on demand).
    pub offload_text_encoder: bool,
    pub timestep_spacing: TimestepSpacing,
}

/// One image to render: a prompt and the seed that fixes its noise.
#[derive(Debug, Clone)]
pub struct RenderItem {
    pub prompt: String,
    pub seed: u64,
}

/// A batch of images that share size and step count, rendered as one batched forward per step.
#[derive(Debug, Clone)]
pub struct RenderRequest {
    pub width: u32,
    pub height: u32,
    /// LCM steps, 1..=8.
    pub steps: usize,
    pub items: Vec<RenderItem>,
}

/// Reported after every denoising step.
#[derive(Debug, Clone, Copy)]
pub struct StepProgress {
    pub step: usize,
    pub total: usize,
}

/// What the caller wants after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Stop the batch: `render` returns `Error::Cancelled`.
    Cancel,
}

/// One rendered image, in request order, at exactly the requested width and height.
#[derive(Debug, Clone)]
pub struct RenderOutput {
    pub image: image::RgbImage,
}
