//! The ONE mapping from core errors to gRPC statuses.
//!
//! Every handler returns `Result<_, ApiError>` and converts at the edge, so a
//! given failure reads the same from every RPC: invalid input is
//! `INVALID_ARGUMENT` with a `google.rpc.BadRequest` detail naming each field
//! (`items[37].width`) and a text message naming them too, unknown ids are
//! `NOT_FOUND`, and infrastructure trouble is `UNAVAILABLE` (retry later).

use pixfarm_core::{CoreError, ValidationError};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// An error of a coordinator handler: a core error, or one the API layer found
/// itself (malformed requests are phrased as core validation errors so they
/// share the mapping below).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ApiError(#[from] pub CoreError);

impl ApiError {
    /// Invalid input found while decoding a request (before core validation).
    pub fn invalid(errors: Vec<ValidationError>) -> Self {
        ApiError(CoreError::Invalid(errors))
    }

    /// One invalid job-level field.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::invalid(vec![ValidationError::job(field, message)])
    }
}

impl From<ApiError> for Status {
    fn from(ApiError(e): ApiError) -> Status {
        let message = e.to_string();
        #[allow(unreachable_patterns)]
        let code = match &e {
            CoreError::Invalid(errors) => {
                let violations: Vec<FieldViolation> = errors
                    .iter()
                    .map(|v| FieldViolation::new(v.path(), v.message.clone()))
                    .collect();
                return Status::with_error_details(
                    Code::InvalidArgument,
                    message,
                    ErrorDetails::with_bad_request(violations),
                );
            }
            CoreError::NotFound { .. } => Code::NotFound,
            // An idempotency key reused for another job, or cancelling a finished job.
            CoreError::Conflict(_) => Code::FailedPrecondition,
            CoreError::LeaseLost { .. } => Code::Aborted,
            e @ (CoreError::Redis(_) | CoreError::Io(_)) if e.is_transient() => Code::Unavailable,
            CoreError::Storage(_) => Code::Unavailable,
            CoreError::Corrupt { .. } => Code::DataLoss,
            CoreError::Redis(_) | CoreError::Io(_) | CoreError::Config(_) => Code::Internal,
            _ => Code::Internal,
        };
        if code == Code::Internal || code == Code::DataLoss {
            tracing::error!(error = %e, "request failed");
        }
        Status::new(code, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_names_every_field_in_details_and_message() {
        let e = ApiError::invalid(vec![
            ValidationError::item(37, "width", "must be a multiple of 16, got 17"),
            ValidationError::job("items", "a job needs at least one item"),
        ]);
        let s = Status::from(e);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(
            s.message()
                .contains("items[37].width: must be a multiple of 16"),
            "{}",
            s.message()
        );
        let br = s.get_details_bad_request().expect("bad request details");
        let fields: Vec<_> = br
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, ["items[37].width", "items"]);
    }

    #[test]
    fn not_found_and_conflict() {
        let s = Status::from(ApiError(CoreError::not_found("job", "abc")));
        assert_eq!(s.code(), Code::NotFound);
        assert!(s.message().contains("abc"));
        let s = Status::from(ApiError(CoreError::Conflict("job finished".into())));
        assert_eq!(s.code(), Code::FailedPrecondition);
        let s = Status::from(ApiError(CoreError::Storage("s3 down".into())));
        assert_eq!(s.code(), Code::Unavailable);
    }
}
