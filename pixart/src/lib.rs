//! PixArt-LCM text-to-image on candle: the model, no networking.
//!
//! A Rust port of diffusers' `PixArtAlphaPipeline` with the `LCMScheduler` (PixArt-δ's 4-step
//! latent-consistency sampling of the PixArt-α diffusion transformer), numerically checked against
//! diffusers/transformers with golden tensors (`tests/`, generators next to the fixtures).
//!
//! | module | what |
//! |---|---|
//! | [`pipeline`] | [`pipeline::Pipeline`]: load, validate, batched `render` with per-item seeds, progress and cancel; the conformance entry points |
//! | [`transformer`], [`attention`], [`embeddings`], [`config`], [`weights`], [`kernels`] | the PixArt-α DiT (`PixArtTransformer2DModel`) and its weight loading |
//! | [`control`] | control images: resize + centre crop to the bin, Canny (OpenCV-exact), the HED edge network |
//! | [`controlnet`] | the PixArt-δ ControlNet-Transformer adapter (diffusers-community layout) and the `.pth` converter |
//! | [`scheduler`] | the LCM sampler (diffusers ≥ 0.24 or original timesteps) and the seeded noise streams |
//! | [`text_encoder`] | T5 tokenizer (`tokenizer.json`) and the T5-v1.1 encoder with exact padding handling |
//! | [`vae`] | the SD VAE: decode, and encode to the deterministic posterior mean |
//! | [`image_ops`] | aspect-ratio binning, resize + centre crop, tensor → RGB, PNG |
//! | [`loading`] | diffusers-layout directories and the Hugging Face hub cache |
//! | [`threads`] | the CPU thread count, settled once at start-up instead of on every matrix product |
//!
//! Devices: CPU (f32) by default; CUDA with the `cuda` feature (transformer in f16/bf16, T5 in bf16,
//! VAE in f32). The hub checkpoint ships only `spiece.model`: see [`text_encoder`] for the one-line
//! conversion to `tokenizer.json`.
//!
//! ```no_run
//! use pixart::pipeline::{Control, ModelSource, Pipeline, PipelineOptions, RenderItem, RenderRequest};
//! # fn main() -> pixart::Result<()> {
//! let source = ModelSource::Hub { model_id: "PixArt-alpha/PixArt-LCM-XL-2-1024-MS".into(), revision: None };
//! let mut pipe = Pipeline::load(&source, PipelineOptions::default())?;
//! let request = RenderRequest {
//!     width: 1024,
//!     height: 768,
//!     steps: 4,
//!     items: vec![RenderItem { prompt: "a lighthouse in a storm".into(), seed: 7, control: None }],
//! };
//! let images = pipe.render(&request, &mut |p| {
//!     eprintln!("step {}/{}", p.step, p.total);
//!     Control::Continue
//! })?;
//! std::fs::write("out.png", pixart::image_ops::encode_png(&images[0].image)?).expect("write");
//! # Ok(()) }
//! ```

pub mod attention;
pub mod config;
pub mod control;
pub mod controlnet;
pub mod cuda;
pub mod embeddings;
pub mod error;
pub mod image_ops;
pub mod kernels;
pub mod loading;
pub mod pipeline;
pub mod scheduler;
pub mod text_encoder;
pub mod threads;
pub mod transformer;
pub mod vae;
pub mod weights;

pub use control::{
    DEFAULT_CANNY_HIGH, DEFAULT_CANNY_LOW, Hed, canny, check_control_image_size, resize_center_crop,
};
pub use error::{Error, Result};
