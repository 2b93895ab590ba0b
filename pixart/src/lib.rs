//! PixArt-LCM text-to-image on candle (placeholder overview; the model helpers complete it).

pub mod attention;
pub mod config;
pub mod embeddings;
pub mod error;
pub mod image_ops;
pub mod kernels;
pub mod loading;
pub mod pipeline;
pub mod scheduler;
pub mod text_encoder;
pub mod transformer;
pub mod vae;
pub mod weights;

pub use error::{Error, Result};
