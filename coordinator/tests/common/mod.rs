//! Helpers shared by the coordinator's integration tests.

use tonic_types::StatusExt;

/// The fields named by a status's `google.rpc.BadRequest` detail, in order.
pub fn violations(s: &tonic::Status) -> Vec<String> {
    s.get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}
