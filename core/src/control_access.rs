//! Which objects a tenant may name as a control image.
//!
//! Workers read `s3://` control images with their own credentials and store an edge map of them
//! beside the tenant's results, where a presigned URL hands it out. Left unchecked that is a
//! confused deputy: tenant A could name tenant B's render and receive a copy of it. So a control
//! URI must lie under a prefix the *submitting* tenant may read: its own results
//! (`s3://<results bucket>/<store prefix>/<tenant>/`) or one of the `allowed_input_prefixes` of
//! its entry in the tenants file. The coordinator checks at submit (`PERMISSION_DENIED` naming
//! `items[i].control.uri`) and the worker checks again before it reads, so a task that reaches
//! Redis some other way is refused too. Paths are compared as text after refusing every spelling
//! that could mean something else to the store: `.` and `..` segments, empty segments, `%`
//! escapes and backslashes.

use crate::error::{CoreError, Result};
use crate::fair::TenantQuotas;
use crate::model::{ControlSource, JobSpec};
use crate::storage::parse_s3_uri;

/// Whether `uri` is readable for a tenant whose own results live under `own_root` (`None` for a
/// file store, whose results are no S3 objects) and who may also read `allowed`. The error says
/// why not, for the client.
pub fn check_uri(uri: &str, own_root: Option<&str>, allowed: &[String]) -> Result<(), String> {
    if uri.contains('%') || uri.contains('\\') {
        return Err(format!(
            "`{uri}` contains `%` or `\\`; name the object by its plain key"
        ));
    }
    let (bucket, key) = parse_s3_uri(uri)?;
    if key
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(format!(
            "`{uri}` has an empty, `.` or `..` path segment; name the object by its plain key"
        ));
    }
    let full = format!("s3://{bucket}/{key}");
    let mut roots = own_root.into_iter().map(str::to_string).collect::<Vec<_>>();
    roots.extend(allowed.iter().map(|p| with_slash(p)));
    if roots.iter().any(|r| full.starts_with(r.as_str())) {
        return Ok(());
    }
    let mut msg = format!("`{uri}` is outside what this tenant may read");
    if roots.is_empty() {
        msg.push_str(" (no S3 input prefixes are allowed for it: ask an operator to add `allowed_input_prefixes` to its tenants-file entry, or send the image inline)");
    } else {
        msg.push_str(&format!(" (allowed: {})", roots.join(", ")));
    }
    Err(msg)
}

/// Every control URI of `spec` checked for its tenant; the first refusal names its field. A URI
/// that is not an `s3://` URI at all is left to [`crate::validate_job`], which reports it as
/// invalid with every other problem of the job.
pub fn check_job(spec: &JobSpec, own_root: Option<&str>, quotas: &TenantQuotas) -> Result<()> {
    let allowed = quotas
        .for_tenant(&spec.tenant)
        .allowed_input_prefixes
        .unwrap_or_default();
    for (i, item) in spec.items.iter().enumerate() {
        if let Some(ControlSource::Uri(uri)) = item.control.as_ref().map(|c| &c.source) {
            if parse_s3_uri(uri).is_err() {
                continue;
            }
            check_uri(uri, own_root, &allowed).map_err(|message| CoreError::PermissionDenied {
                field: format!("items[{i}].control.uri"),
                message,
            })?;
        }
    }
    Ok(())
}

/// A valid `allowed_input_prefixes` entry: `s3://bucket/` or `s3://bucket/some/prefix/`.
pub(crate) fn check_prefix(p: &str) -> Result<(), String> {
    let rest = p
        .strip_prefix("s3://")
        .ok_or_else(|| format!("`{p}` must start with s3://"))?;
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(format!("`{p}` names no bucket"));
    }
    if p.contains('%') || p.contains('\\') || key.split('/').any(|s| s == "." || s == "..") {
        return Err(format!("`{p}` contains `%`, `\\`, `.` or `..`"));
    }
    Ok(())
}

fn with_slash(p: &str) -> String {
    if p.ends_with('/') {
        p.to_string()
    } else {
        format!("{p}/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: Option<&str> = Some("s3://renders/team-a/");

    #[test]
    fn own_results_and_allowed_prefixes_only() {
        let allowed = vec!["s3://inputs/team-a".to_string()];
        assert!(check_uri("s3://renders/team-a/job/000000.png", OWN, &allowed).is_ok());
        assert!(check_uri("s3://inputs/team-a/edges/1.png", OWN, &allowed).is_ok());
        for bad in [
            "s3://renders/team-b/job/000000.png",
            "s3://renders/team-ab/x.png",
            "s3://inputs/team-b/1.png",
            "s3://other-bucket/team-a/x.png",
            "s3://renders/team-a/../team-b/x.png",
            "s3://renders/team-a/./x.png",
            "s3://renders/team-a//x.png",
            "s3://renders/team-a/%2e%2e/team-b/x.png",
            "s3://renders/team-a\\..\\team-b/x.png",
        ] {
            assert!(check_uri(bad, OWN, &allowed).is_err(), "{bad} was allowed");
        }
        // A file store has no S3 results of its own: only the listed prefixes.
        assert!(check_uri("s3://renders/team-a/x.png", None, &[]).is_err());
    }

    #[test]
    fn prefixes_in_the_tenants_file_are_checked() {
        assert!(check_prefix("s3://inputs/").is_ok());
        assert!(check_prefix("s3://inputs/a/b/").is_ok());
        assert!(check_prefix("inputs/a").is_err());
        assert!(check_prefix("s3:///a").is_err());
        assert!(check_prefix("s3://inputs/../x/").is_err());
    }
}
