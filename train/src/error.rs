//! One error type for the training crate: every variant names the file (and line), field or stage at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON or JSONL file that does not parse or holds a wrong value; `line` is 1-based.
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Json {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    /// A directory that is not a dataset of this crate, or whose files disagree with each other.
    #[error("{path}: {message}")]
    Dataset { path: PathBuf, message: String },
    /// An image file that is missing, does not decode, or has the wrong size.
    #[error("{path}: {message}")]
    Image { path: PathBuf, message: String },
    #[error("invalid `{field}`: {message}")]
    InvalidInput {
        field: &'static str,
        message: String,
    },
    /// A checkpoint this run cannot resume from: another stage's, a different run config, or files that
    /// disagree with each other. `field` is the dotted name of the entry at fault (`stage`, `config.lr`, …).
    #[error("{}: `{field}` {message}", path.display())]
    Checkpoint {
        path: PathBuf,
        field: String,
        message: String,
    },
    /// The loss became NaN or infinite: training cannot recover from it, so the run stops at once instead of
    /// writing poisoned weights over the last good checkpoint.
    #[error(
        "stage `{stage}`, step {step}: the loss is {value}; lower the learning rate or check the data"
    )]
    NonFiniteLoss {
        stage: String,
        step: u64,
        value: f32,
    },
    /// A variable in the optimiser that the loss does not reach: the graph is cut somewhere (a custom op
    /// without a backward pass, a detached copy), so it would silently never train.
    #[error("variable `{name}` received no gradient: the autograd graph does not reach it")]
    NoGradient { name: String },
    /// An earlier stage's exported directory (`vae/`, `text_encoder/`, …) that does not load.
    #[error("{}: {message}", path.display())]
    ModelDir { path: PathBuf, message: String },
    #[error(transparent)]
    Model(#[from] pixart::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A refused setting as an early return of a config's `validate`: `return Error::invalid(..)`.
    pub fn invalid<T>(field: &'static str, message: impl Into<String>) -> Result<T> {
        Err(Error::InvalidInput {
            field,
            message: message.into(),
        })
    }
}
