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
            // A tenant quota or the submit rate limit: the quota and the numbers in the message,
            // `QuotaFailure` naming the quota, and for the rate limit a `RetryInfo` detail plus a
            // `retry-after` header (whole seconds, rounded up, as in HTTP).
            CoreError::QuotaExceeded(q) => {
                let mut details = ErrorDetails::with_quota_failure_violation(
                    format!("tenant:{}", q.tenant),
                    q.quota.as_str(),
                );
                let mut metadata = tonic::metadata::MetadataMap::new();
                if let Some(wait) = q.retry_after {
                    details.set_retry_info(Some(wait));
                    let secs = wait.as_millis().div_ceil(1000).max(1);
                    if let Ok(v) = secs.to_string().parse() {
                        metadata.insert("retry-after", v);
                    }
                }
                return Status::with_error_details_and_metadata(
                    Code::ResourceExhausted,
                    message,
                    details,
                    metadata,
                );
            }
            CoreError::NotFound { .. } => Code::NotFound,
            // An idempotency key reused for another job, or cancelling a finished job.
            CoreError::Conflict(_) => Code::FailedPrecondition,
            CoreError::LeaseLost { .. } => Code::Aborted,
            e @ (CoreError::Redis(_) | CoreError::Io(_)) if e.is_transient() => Code::Unavailable,
            CoreError::Storage(_) | CoreError::Unavailable(_) => Code::Unavailable,
            // A control image the tenant may not read: the field in a BadRequest detail.
            CoreError::PermissionDenied {
                field,
                message: why,
            } => {
                return Status::with_error_details(
                    Code::PermissionDenied,
                    message,
                    ErrorDetails::with_bad_request(vec![FieldViolation::new(
                        field.clone(),
                        why.clone(),
                    )]),
                );
            }
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
    fn quota_exceeded_is_resource_exhausted_with_a_retry_hint() {
        let e = CoreError::QuotaExceeded(Box::new(pixfarm_core::QuotaExceeded {
            tenant: "a".into(),
            quota: pixfarm_core::QuotaKind::SubmitRate,
            message: "tenant `a` is over its submit_rate quota; retry after 1200 ms".into(),
            retry_after: Some(std::time::Duration::from_millis(1200)),
        }));
        let s = Status::from(ApiError(e));
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(
            s.message().contains("retry after 1200 ms"),
            "{}",
            s.message()
        );
        assert_eq!(
            s.metadata()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("2")
        );
        let retry = s.get_details_retry_info().expect("retry info");
        assert_eq!(
            retry.retry_delay,
            Some(std::time::Duration::from_millis(1200))
        );
        let qf = s.get_details_quota_failure().expect("quota failure");
        assert_eq!(qf.violations[0].subject, "tenant:a");
        assert_eq!(qf.violations[0].description, "submit_rate");
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
