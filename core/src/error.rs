//! One error type for the core library. The coordinator maps it to gRPC status codes in one place
//! (`NotFound` → NOT_FOUND, `Invalid` → INVALID_ARGUMENT with field violations, `Conflict` →
//! ALREADY_EXISTS/ABORTED, `Redis`/`Storage` → UNAVAILABLE, `Internal` → INTERNAL).

use std::fmt;

use serde::{Deserialize, Serialize};

/// One problem with a submitted job. Validation collects all of them, so a client fixes its input
/// in one round trip instead of one error at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidationError {
    /// Item index for per-item problems, `None` for job-level ones.
    pub index: Option<usize>,
    /// Field name (`width`, `prompt`, `control.scale`, `items`, `output_prefix`, ...).
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn job(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            index: None,
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn item(index: usize, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            index: Some(index),
            field: field.into(),
            message: message.into(),
        }
    }

    /// The field path as clients name it: `items[3].width` or `output_prefix`.
    pub fn path(&self) -> String {
        match self.index {
            Some(i) => format!("items[{i}].{}", self.field),
            None => self.field.clone(),
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path(), self.message)
    }
}

/// Joins validation errors into one readable sentence list.
fn join(errors: &[ValidationError]) -> String {
    const SHOWN: usize = 10;
    let mut s = errors
        .iter()
        .take(SHOWN)
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    if errors.len() > SHOWN {
        s.push_str(&format!("; and {} more", errors.len() - SHOWN));
    }
    s
}

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// An unknown job, worker or object.
    #[error("{what} `{id}` not found")]
    NotFound { what: &'static str, id: String },
    /// The request is invalid; every problem is listed.
    #[error("invalid job: {}", join(.0))]
    Invalid(Vec<ValidationError>),
    /// The request conflicts with existing state (e.g. an idempotency key reused for a different
    /// job spec, or an operation on a job in a terminal state).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A worker acted on a task it no longer owns (its lease expired and another worker took it).
    #[error("lease lost on task {entry_id} of lane {lane}")]
    LeaseLost { lane: String, entry_id: String },
    /// Redis failed (connection lost, script error, ...). Usually transient: retry.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Object storage failed after its retries.
    #[error("storage: {0}")]
    Storage(String),
    /// Bad configuration (storage URL, queue options).
    #[error("configuration: {0}")]
    Config(String),
    /// Stored data could not be decoded (a bug or a foreign writer).
    #[error("corrupt {what}: {message}")]
    Corrupt { what: String, message: String },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A tenant quota or the submit rate limit refused the request; nothing was written. Boxed:
    /// it is rare and keeps `Result<_, CoreError>` small.
    #[error("{}", .0.message)]
    QuotaExceeded(Box<crate::fair::QuotaExceeded>),
    /// The request names something its tenant may not read (a control image outside the tenant's
    /// prefixes); `field` is the path of the offending field (`items[2].control.uri`).
    #[error("permission denied: {field}: {message}")]
    PermissionDenied { field: String, message: String },
    /// A transient condition that is not a Redis or storage error (a staged submit lost before
    /// its commit); nothing was written, the same call may succeed.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl CoreError {
    pub fn not_found(what: &'static str, id: impl Into<String>) -> Self {
        CoreError::NotFound {
            what,
            id: id.into(),
        }
    }

    pub fn corrupt(what: impl Into<String>, message: impl fmt::Display) -> Self {
        CoreError::Corrupt {
            what: what.into(),
            message: message.to_string(),
        }
    }

    /// Whether retrying the same call later may succeed (connection problems, storage outages).
    pub fn is_transient(&self) -> bool {
        match self {
            CoreError::Redis(e) => {
                e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_timeout()
                    || e.is_connection_refusal()
            }
            CoreError::Storage(_) | CoreError::Io(_) | CoreError::Unavailable(_) => true,
            _ => false,
        }
    }
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;
