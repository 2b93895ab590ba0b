//! Training PixArt-LCM at toy scale on candle (issue 10): the world the model learns and the instruments
//! that measure it.
//!
//! The farm's bundled checkpoint has random weights, so nothing could show that an image matches its
//! prompt. This crate supplies a procedural world the model can learn on a CPU — coloured shapes at five
//! positions on coloured backgrounds, captioned from a small grammar — and deterministic instruments that
//! score what a model renders: an image analyser that reads the shape back, prompt accuracy per attribute,
//! and edge F1 for ControlNet. It depends on `pixart` (never the other way round) and drives the model's
//! training mode ([`pixart::weights::Mode::Train`]), which the tests here check for real gradients.
//!
//! | module | what |
//! |---|---|
//! | [`attributes`] | the vocabulary: [`attributes::Colour`] (8-colour palette), [`attributes::Shape`], [`attributes::Size`], [`attributes::Position`] |
//! | [`caption`] | captions from a grammar with paraphrases, and the parser that reads them back |
//! | [`scene`] | one picture: exact, antialiasing-free rasterisation and its outline |
//! | [`edges`] | binary edge maps |
//! | [`dataset`] | seeded samples, the held-out (colour, shape) combinations, export to PNG + JSONL, the checking reader |
//! | [`analyse`] | the rule-based image analyser (no learned weights) and the perturbations it is tested under |
//! | [`metrics`] | prompt accuracy and edge F1 with a pixel tolerance |
//! | [`lcd`] | Latent Consistency Distillation numerics: noise schedule, DDIM solver, boundary scalings, guidance, Huber loss, EMA |
//! | [`seed`] | seeded draws as a function of (seed, step, stream): reproducible runs and exact resumes |
//! | [`optim`] | AdamW with saveable moments, global-norm gradient clipping |
//! | [`checkpoint`] | resumable checkpoints (params, moments, JSON state); stage and config checked on resume |
//! | [`progress`] | the progress bar: loss and steps/s |
//! | [`conv`] | a `conv2d` whose backward pass is forward convolutions (candle's CPU `conv_transpose2d` is ≈10× slower) |
//! | [`channel`] | Per-channel bias and scale with a one-pass backward (candle's broadcast reduce was ≈ 11 % of a VAE step) |
//! | [`norm`] | GroupNorm with a fused CPU backward (candle-nn's composed one dominated the VAE's backward) |
//! | [`vae`] | stage 1: a small SD-architecture AutoencoderKL, trained and exported as a diffusers `vae/` |
//! | [`text`] | stage 2: the word-level T5 tokenizer and the frozen, order-aware T5 encoder |
//! | [`dit`] | a PixArt transformer from scratch: diffusers names and shapes, PixArt's initialisation, export |
//! | [`diffusion`] | PixArt-α's loss: ε MSE + the learned-σ variational bound (IDDPM) |
//! | [`prep`] | latents from the trained VAE and features from the frozen text encoder, prepared once per run |
//! | [`probe`] | a transformer's ε and x0 error per noise level, with and without captions |
//! | [`stage`] | the loop the diffusion stages share: preflight, steps, saves, NaN stop, interruption |
//! | [`shard`] | data-parallel steps: one shard of the batch per core, single-threaded, gradients summed |
//! | [`teacher`] | stage 3: the PixArt-α teacher (ε + learned σ, caption dropout) |
//! | [`distill`] | stage 4: Latent Consistency Distillation into the 4-step student (Algorithm 1) |
//! | [`adapter`] | stage 5: the ControlNet-Transformer adapter on edge maps (base frozen, zero-init projections) |
//! | [`sample`] | evaluation sampling: teacher DDIM + CFG, student with the farm's LCM sampler |
//! | [`eval`] | prompt accuracy of a model on unseen prompts, timed |
//! | [`sheet`] | contact sheets: a PNG grid and its prompt legend |
//! | [`package`] | the trained parts as one diffusers model directory |
//! | [`varmap`] | checkpoints as `VarMap`s for the transformer's training mode, and frozen snapshots |
//! | [`error`] | [`Error`]: every variant names the file (and line) or field at fault |
//!
//! ```
//! use pixart_train::analyse::analyse;
//! use pixart_train::dataset::{DatasetConfig, Split};
//! use pixart_train::metrics::PromptAccuracy;
//!
//! let config = DatasetConfig { seed: 7, ..Default::default() }; // 64×64, the default held-out list
//! let mut accuracy = PromptAccuracy::default();
//! for sample in config.samples(Split::Train, 20) {
//!     let image = sample.scene.render(config.image_size); // what a perfect model would draw
//!     let read = analyse(&image).map(|a| a.attributes);
//!     accuracy.add(&sample.scene.attributes, read.as_ref());
//! }
//! assert_eq!(accuracy.all, 20, "{accuracy}");
//!
//! // Export for a training run; the reader validates every line and names the file at fault.
//! let dir = std::env::temp_dir().join(format!("pixart-train-doc-{}", std::process::id()));
//! pixart_train::dataset::export(&dir, &config, Split::Train, 4)?;
//! let dataset = pixart_train::dataset::Dataset::open(&dir)?;
//! let (image, edges) = dataset.load(0)?;
//! assert_eq!(image.dimensions(), (64, 64));
//! assert!(edges.count() > 0);
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), pixart_train::Error>(())
//! ```

pub mod adapter;
pub mod analyse;
pub mod attributes;
pub mod caption;
pub mod channel;
pub mod checkpoint;
pub mod confusion;
pub mod conv;
pub mod dataset;
pub mod diffusion;
pub mod distill;
pub mod dit;
pub mod edges;
pub mod error;
pub mod eval;
pub mod inputs;
pub mod lcd;
pub mod metrics;
pub mod norm;
pub mod optim;
pub mod package;
pub mod prep;
pub mod probe;
pub mod progress;
pub mod sample;
pub mod scene;
pub mod seed;
pub mod shard;
pub mod sheet;
pub mod stage;
pub mod teacher;
pub mod text;
pub mod vae;
pub mod varmap;

pub use error::{Error, Result};
