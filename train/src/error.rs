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
    #[error(transparent)]
    Model(#[from] pixart::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
