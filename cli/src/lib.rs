//! The `pixfarm` command line, as a library so that tests can drive the same
//! input parsing, submit and fetch code the binary runs.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use pixfarm::{client, input};
//! let parsed = input::read_items(std::path::Path::new("examples/prompts.jsonl"))?;
//! let mut c = client::connect("127.0.0.1:50051").await?;
//! let job = client::submit(&mut c, Default::default(), &parsed).await?;
//! let done = client::wait(&mut c, &job.job_id, false).await?;
//! println!("{} images", done.done);
//! # Ok(()) }
//! ```
//!
//! Modules: [`input`] (JSONL/plain-text files, errors naming file and line),
//! [`client`] (connect, submit unary or streamed, wait with progress, status
//! → sentence), [`fetch`] (download, verify sha256, resume), [`generate`]
//! (local rendering), [`dev`] (the whole farm in one process), [`sheet`] (a job's images and prompts
//! in one PNG, drawn with the built-in [`font`]), [`commands`].

pub mod client;
pub mod commands;
pub mod config;
pub mod convert;
pub mod dev;
pub mod fetch;
pub mod font;
pub mod generate;
pub mod input;
pub mod sheet;
