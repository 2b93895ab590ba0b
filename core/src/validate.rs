//! Job validation and expansion into tasks.
//!
//! Validation is pure (no Redis), returns every problem at once, and runs before anything is
//! written: a rejected job enqueues nothing.

use serde::{Deserialize, Serialize};

use crate::error::ValidationError;
use crate::model::{
    ControlKind, ControlRef, ControlSource, ControlSpec, ItemSpec, JobId, JobSpec, TaskControl,
    TaskSpec,
};

/// Limits on everything a client controls. The defaults suit PixArt-LCM (sizes up to 2048², T5's
/// 120-token window is far below the prompt byte limit, which only stops abuse).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Items per job.
    pub max_items: usize,
    /// Images (tasks) per job, after `images_per_prompt` expansion.
    pub max_images: u64,
    pub max_images_per_prompt: u32,
    /// Prompt length in UTF-8 bytes.
    pub max_prompt_bytes: usize,
    /// Prompt length in characters.
    pub max_prompt_chars: usize,
    pub min_size: u32,
    pub max_size: u32,
    /// Widths and heights must be multiples of this (VAE factor 8 × patch size 2).
    pub size_multiple: u32,
    pub max_steps: u32,
    /// Inline control image bytes.
    pub max_control_bytes: usize,
    /// Smallest control image side, in pixels (checked from the header at submit). The default
    /// equals the workers' own floor (`pixart::control::MIN_CONTROL_SIDE`), so an image accepted
    /// here is never refused by a worker for its size.
    pub min_control_side: u32,
    pub max_labels: usize,
    pub max_label_bytes: usize,
    pub max_prefix_bytes: usize,
    pub max_idempotency_key_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_items: 1_000_000,
            max_images: 10_000_000,
            max_images_per_prompt: 64,
            max_prompt_bytes: 8 * 1024,
            max_prompt_chars: 2_000,
            min_size: 16,
            max_size: 2048,
            size_multiple: 16,
            max_steps: 8,
            max_control_bytes: 8 * 1024 * 1024,
            min_control_side: 64,
            max_labels: 32,
            max_label_bytes: 256,
            max_prefix_bytes: 512,
            max_idempotency_key_bytes: 256,
        }
    }
}

/// Validates a whole job. `Err` lists every problem, job-level ones first, then per item in order.
/// At most `max_reported` item errors are collected so a 1M-item garbage upload cannot produce a
/// gigantic error message.
pub fn validate_job(spec: &JobSpec, limits: &Limits) -> Result<(), Vec<ValidationError>> {
    const MAX_REPORTED: usize = 1000;
    let mut errs = Vec::new();

    if spec.items.is_empty() {
        errs.push(ValidationError::job(
            "items",
            "a job needs at least one item",
        ));
    }
    if spec.items.len() > limits.max_items {
        errs.push(ValidationError::job(
            "items",
            format!(
                "{} items is over the limit of {} per job",
                spec.items.len(),
                limits.max_items
            ),
        ));
    }
    let total = spec.total_images();
    if total > limits.max_images {
        errs.push(ValidationError::job(
            "items",
            format!(
                "the job expands to {total} images, over the limit of {}",
                limits.max_images
            ),
        ));
    }
    if let Err(m) = check_name("tenant", &spec.tenant, 128) {
        errs.push(ValidationError::job("tenant", m));
    }
    if let Err(m) = check_prefix(&spec.output_prefix, limits.max_prefix_bytes) {
        errs.push(ValidationError::job("output_prefix", m));
    }
    if let Some(k) = &spec.idempotency_key {
        if k.is_empty() {
            errs.push(ValidationError::job(
                "idempotency_key",
                "must not be empty when given",
            ));
        } else if k.len() > limits.max_idempotency_key_bytes {
            errs.push(ValidationError::job(
                "idempotency_key",
                format!(
                    "{} bytes is over the limit of {}",
                    k.len(),
                    limits.max_idempotency_key_bytes
                ),
            ));
        } else if k.chars().any(|c| c.is_control()) {
            errs.push(ValidationError::job(
                "idempotency_key",
                "must not contain control characters",
            ));
        }
    }
    if spec.labels.len() > limits.max_labels {
        errs.push(ValidationError::job(
            "labels",
            format!(
                "{} labels is over the limit of {}",
                spec.labels.len(),
                limits.max_labels
            ),
        ));
    }
    for (k, v) in &spec.labels {
        if let Err(m) = check_name("label key", k, limits.max_label_bytes) {
            errs.push(ValidationError::job(format!("labels[{k:?}]"), m));
        }
        if v.len() > limits.max_label_bytes || v.chars().any(|c| c.is_control()) {
            errs.push(ValidationError::job(
                format!("labels[{k:?}]"),
                format!(
                    "value must be at most {} bytes without control characters",
                    limits.max_label_bytes
                ),
            ));
        }
    }

    for (i, item) in spec.items.iter().enumerate() {
        if errs.len() >= MAX_REPORTED {
            break;
        }
        validate_item(i, item, limits, &mut errs);
    }
    if errs.is_empty() { Ok(()) } else { Err(errs) }
}

/// Validates one item, appending its problems to `errs`.
pub fn validate_item(i: usize, item: &ItemSpec, limits: &Limits, errs: &mut Vec<ValidationError>) {
    let p = &item.prompt;
    if p.trim().is_empty() {
        errs.push(ValidationError::item(i, "prompt", "must not be empty"));
    } else if p.len() > limits.max_prompt_bytes {
        errs.push(ValidationError::item(
            i,
            "prompt",
            format!(
                "{} bytes is over the limit of {} bytes",
                p.len(),
                limits.max_prompt_bytes
            ),
        ));
    } else if p.chars().count() > limits.max_prompt_chars {
        errs.push(ValidationError::item(
            i,
            "prompt",
            format!(
                "{} characters is over the limit of {}",
                p.chars().count(),
                limits.max_prompt_chars
            ),
        ));
    } else if p.contains('\0') {
        errs.push(ValidationError::item(
            i,
            "prompt",
            "must not contain NUL characters",
        ));
    }
    for (field, v) in [("width", item.width), ("height", item.height)] {
        if v < limits.min_size || v > limits.max_size {
            errs.push(ValidationError::item(
                i,
                field,
                format!("{v} is outside {}..={}", limits.min_size, limits.max_size),
            ));
        } else if v % limits.size_multiple != 0 {
            errs.push(ValidationError::item(
                i,
                field,
                format!(
                    "must be a multiple of {} (the VAE factor 8 times the patch size 2), got {v}",
                    limits.size_multiple
                ),
            ));
        }
    }
    if item.steps == 0 || item.steps > limits.max_steps {
        errs.push(ValidationError::item(
            i,
            "steps",
            format!(
                "must be between 1 and {}, got {}",
                limits.max_steps, item.steps
            ),
        ));
    }
    if item.images_per_prompt == 0 || item.images_per_prompt > limits.max_images_per_prompt {
        errs.push(ValidationError::item(
            i,
            "images_per_prompt",
            format!(
                "must be between 1 and {}, got {}",
                limits.max_images_per_prompt, item.images_per_prompt
            ),
        ));
    }
    if let Some(c) = &item.control {
        if !(0.0..=2.0).contains(&c.scale) || c.scale.is_nan() {
            errs.push(ValidationError::item(
                i,
                "control.scale",
                format!("must be between 0 and 2, got {}", c.scale),
            ));
        }
        check_canny_thresholds(i, c, errs);
        match &c.source {
            ControlSource::Inline(bytes) => {
                if bytes.is_empty() {
                    errs.push(ValidationError::item(i, "control.image", "is empty"));
                } else if bytes.len() > limits.max_control_bytes {
                    errs.push(ValidationError::item(
                        i,
                        "control.image",
                        format!(
                            "{} bytes is over the limit of {} bytes",
                            bytes.len(),
                            limits.max_control_bytes
                        ),
                    ));
                } else {
                    match image_dimensions(bytes) {
                        Err(m) => errs.push(ValidationError::item(i, "control.image", m)),
                        Ok((w, h)) if w.min(h) < limits.min_control_side => {
                            errs.push(ValidationError::item(
                                i,
                                "control.image",
                                format!(
                                    "{w}x{h} is too small (at least {} pixels per side)",
                                    limits.min_control_side
                                ),
                            ))
                        }
                        Ok(_) => {}
                    }
                }
            }
            ControlSource::Uri(uri) => {
                if let Err(m) = crate::storage::parse_s3_uri(uri) {
                    errs.push(ValidationError::item(i, "control.uri", m));
                }
            }
        }
    }
}

/// Largest useful Canny threshold: the L1 Sobel magnitude of 8-bit input never exceeds 4 × 255 × 2.
pub const MAX_CANNY_THRESHOLD: f32 = 2040.0;

fn check_canny_thresholds(i: usize, c: &ControlSpec, errs: &mut Vec<ValidationError>) {
    let given = [
        ("control.low_threshold", c.low_threshold),
        ("control.high_threshold", c.high_threshold),
    ];
    if c.kind != ControlKind::Canny {
        for (field, v) in given {
            if v.is_some() {
                errs.push(ValidationError::item(
                    i,
                    field,
                    format!(
                        "only applies to control kind `canny`, not `{}`",
                        c.kind.as_str()
                    ),
                ));
            }
        }
        return;
    }
    let mut ok = true;
    for (field, v) in given {
        if let Some(v) = v
            && (v.is_nan() || !(0.0..=MAX_CANNY_THRESHOLD).contains(&v))
        {
            ok = false;
            errs.push(ValidationError::item(
                i,
                field,
                format!("must be between 0 and {MAX_CANNY_THRESHOLD}, got {v}"),
            ));
        }
    }
    if ok
        && let (Some(lo), Some(hi)) = (c.low_threshold, c.high_threshold)
        && lo > hi
    {
        errs.push(ValidationError::item(
            i,
            "control.low_threshold",
            format!("{lo} is above control.high_threshold {hi}"),
        ));
    }
}

/// Reads only the image header: cheap at submit, catches garbage and wrong formats early. A
/// truncated body is only found by the worker, which then fails the task with its reason.
fn image_dimensions(bytes: &[u8]) -> Result<(u32, u32), String> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read the image: {e}"))?;
    if reader.format().is_none() {
        return Err("is not a PNG or JPEG image".to_string());
    }
    reader
        .into_dimensions()
        .map_err(|e| format!("cannot decode the image header: {e}"))
}

/// Tenants and label keys: short, printable, no separators that could alias keys.
pub(crate) fn check_name(what: &str, s: &str, max: usize) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if s.len() > max {
        return Err(format!(
            "{what} is {} bytes, over the limit of {max}",
            s.len()
        ));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "{what} `{s}` may only contain ASCII letters, digits, `-`, `_` and `.`"
        ));
    }
    Ok(())
}

/// Output prefixes become object-key prefixes and local paths: no traversal, no absolute paths, no
/// odd characters (issue 6 scopes them under a tenant prefix; this keeps them safe already).
pub fn check_prefix(prefix: &str, max: usize) -> Result<(), String> {
    if prefix.is_empty() {
        return Ok(());
    }
    if prefix.len() > max {
        return Err(format!("{} bytes is over the limit of {max}", prefix.len()));
    }
    if prefix.starts_with('/') {
        return Err("must be relative (no leading `/`)".to_string());
    }
    // Named explicitly because each is a known way out of a prefix: Windows separators, control
    // characters (log/terminal injection, NUL truncation) and look-alike Unicode (fullwidth
    // solidus, one-dot leaders that render as `..`, bidi overrides) that some tools normalise.
    if prefix.contains('\\') {
        return Err("must not contain `\\` (use `/` between segments)".to_string());
    }
    if let Some(c) = prefix.chars().find(|c| c.is_control()) {
        return Err(format!("must not contain control characters (found {c:?})"));
    }
    if let Some(c) = prefix.chars().find(|c| !c.is_ascii()) {
        return Err(format!(
            "must be ASCII (found {c:?}, U+{:04X}); non-ASCII characters can look like `/` or `.`",
            u32::from(c)
        ));
    }
    for seg in prefix.trim_end_matches('/').split('/') {
        if seg.is_empty() {
            return Err("must not contain empty path segments (`//`)".to_string());
        }
        if seg == "." || seg == ".." {
            return Err(format!("must not contain `{seg}` segments"));
        }
    }
    if let Some(c) = prefix
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | '=' | '+')))
    {
        return Err(format!(
            "contains the character {c:?}; use ASCII letters, digits and `-_./=+`"
        ));
    }
    Ok(())
}

/// How long a delivery may go without a heartbeat: a base plus a share proportional to the work
/// (steps × megapixels), so big renders are not stolen while a slow heartbeat is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LeasePolicy {
    pub base_ms: u64,
    pub per_step_megapixel_ms: u64,
}

impl Default for LeasePolicy {
    fn default() -> Self {
        Self {
            base_ms: 30_000,
            per_step_megapixel_ms: 2_000,
        }
    }
}

impl LeasePolicy {
    pub fn lease_ms(&self, width: u32, height: u32, steps: u32) -> u64 {
        let work = u64::from(steps) * u64::from(width) * u64::from(height);
        self.base_ms + work * self.per_step_megapixel_ms / 1_000_000
    }
}

/// Where a job's objects live: `{tenant}/{output_prefix}`. The tenant is always the first key
/// segment, so one tenant's objects can never land under (or be presigned from) another's, and
/// an S3 bucket policy or IAM condition can be written per tenant on `{tenant}/*`. Both parts are
/// validated at submit (tenant: `[A-Za-z0-9._-]`; prefix: relative, no `.`/`..` segments).
pub fn object_prefix(tenant: &str, output_prefix: &str) -> String {
    // No trailing slash, also for an empty output prefix: callers append `/{job}/…`.
    join_key(tenant, output_prefix)
        .trim_end_matches('/')
        .to_string()
}

/// The object key of image `index`: `{prefix}/{job}/{index:06}.png`.
pub fn image_key(prefix: &str, job: &JobId, index: u64) -> String {
    join_key(prefix, &format!("{job}/{index:06}.png"))
}

/// The object key of the job's manifest: `{prefix}/{job}/manifest.jsonl`.
pub fn manifest_key(prefix: &str, job: &JobId) -> String {
    join_key(prefix, &format!("{job}/manifest.jsonl"))
}

/// The object key of the edge map that guided image `index`: `{prefix}/{job}/{index:06}.control.png`.
pub fn control_key(prefix: &str, job: &JobId, index: u64) -> String {
    join_key(prefix, &format!("{job}/{index:06}.control.png"))
}

fn join_key(prefix: &str, rest: &str) -> String {
    let p = prefix.trim_end_matches('/');
    if p.is_empty() {
        rest.to_string()
    } else {
        format!("{p}/{rest}")
    }
}

/// Resolves the seeds of `spec` in place: items without a seed get a random one, so that results and
/// resubmits are reproducible from what is recorded.
pub fn assign_seeds(spec: &mut JobSpec) {
    for item in &mut spec.items {
        if item.seed.is_none() {
            // 32-bit seeds stay exact in JSON consumers that use doubles (JavaScript, jq).
            item.seed = Some(u64::from(rand::random::<u32>()));
        }
    }
}

/// Expands a validated job (seeds assigned) into one task per image, in index order: item 0's
/// images first with seeds `seed, seed+1, …`, then item 1's, and so on.
pub fn expand(job: &JobId, spec: &JobSpec, lease: &LeasePolicy) -> Vec<TaskSpec> {
    let mut out = Vec::with_capacity(spec.total_images() as usize);
    let mut index = 0u64;
    for (i, item) in spec.items.iter().enumerate() {
        let seed = item.seed.unwrap_or(0);
        let control = item.control.as_ref().map(|c| TaskControl {
            source: match &c.source {
                ControlSource::Inline(_) => ControlRef::Inline { item: i as u32 },
                ControlSource::Uri(u) => ControlRef::Uri(u.clone()),
            },
            kind: c.kind,
            scale: c.scale,
            low_threshold: c.low_threshold,
            high_threshold: c.high_threshold,
        });
        for k in 0..item.images_per_prompt {
            out.push(TaskSpec {
                job: job.clone(),
                tenant: spec.tenant.clone(),
                index,
                item: i as u32,
                prompt: item.prompt.clone(),
                seed: seed.wrapping_add(u64::from(k)),
                width: item.width,
                height: item.height,
                steps: item.steps,
                control: control.clone(),
                output_key: image_key(
                    &object_prefix(&spec.tenant, &spec.output_prefix),
                    job,
                    index,
                ),
                lease_ms: lease.lease_ms(item.width, item.height, item.steps),
                prior_attempts: 0,
                submitted_ms: 0,
            });
            index += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_item() -> ItemSpec {
        ItemSpec::new("a cat", 64, 64)
    }

    #[test]
    fn valid_job_passes() {
        let spec = JobSpec::new(vec![ok_item(), ok_item().with_seed(3).with_images(2)])
            .with_prefix("runs/a");
        validate_job(&spec, &Limits::default()).unwrap();
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let mut items = vec![ok_item(); 5];
        items[3].width = 17;
        items[1].prompt = "   ".into();
        items[2].steps = 0;
        items[4].steps = 100;
        items[4].prompt = "x".repeat(1 << 20);
        let spec = JobSpec::new(items);
        let errs = validate_job(&spec, &Limits::default()).unwrap_err();
        let paths: Vec<String> = errs.iter().map(|e| e.path()).collect();
        assert_eq!(
            paths,
            [
                "items[1].prompt",
                "items[2].steps",
                "items[3].width",
                "items[4].prompt",
                "items[4].steps"
            ]
        );
        assert!(
            errs[2]
                .to_string()
                .starts_with("items[3].width: must be a multiple of 16"),
            "{}",
            errs[2]
        );
        assert!(errs[3].message.contains("1048576 bytes"), "{}", errs[3]);
    }

    #[test]
    fn no_items_and_bad_prefix() {
        let spec = JobSpec::new(vec![]).with_prefix("../etc");
        let errs = validate_job(&spec, &Limits::default()).unwrap_err();
        assert_eq!(errs.len(), 2);
        assert_eq!(errs[0].path(), "items");
        assert_eq!(errs[1].path(), "output_prefix");
        for bad in [
            "/abs",
            "a//b",
            "a/./b",
            "a\\b",
            "a b",
            "é",
            "..",
            "a/..",
            "a/../..",
            "a\0b",
            "a\u{1b}[2J",
            "\u{ff0f}etc",
            "\u{2024}\u{2024}/x",
            "a\u{202e}b",
        ] {
            assert!(check_prefix(bad, 100).is_err(), "{bad}");
        }
        assert!(check_prefix("a\\b", 100).unwrap_err().contains("`\\`"));
        assert!(
            check_prefix("a\u{7}b", 100)
                .unwrap_err()
                .contains("control")
        );
        assert!(
            check_prefix("\u{ff0f}x", 100)
                .unwrap_err()
                .contains("U+FF0F")
        );
        assert!(
            check_prefix(&"a".repeat(101), 100)
                .unwrap_err()
                .contains("limit of 100")
        );
        for good in ["a", "a/b/", "team-1/run_2.x=3"] {
            check_prefix(good, 100).unwrap();
        }
    }

    #[test]
    fn control_checks() {
        let bad = ok_item().with_control(ControlSpec {
            source: ControlSource::Inline(b"not an image".to_vec()),
            kind: ControlKind::Canny,
            scale: 2.5,
            low_threshold: None,
            high_threshold: None,
        });
        let uri = ok_item().with_control(ControlSpec {
            source: ControlSource::Uri("http://x/y".into()),
            kind: ControlKind::Edge,
            scale: 1.0,
            low_threshold: None,
            high_threshold: None,
        });
        let errs = validate_job(&JobSpec::new(vec![bad, uri]), &Limits::default()).unwrap_err();
        let paths: Vec<String> = errs.iter().map(|e| e.path()).collect();
        assert_eq!(
            paths,
            [
                "items[0].control.scale",
                "items[0].control.image",
                "items[1].control.uri"
            ]
        );

        let mut png = Vec::new();
        image::RgbImage::new(64, 64)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let good = ok_item().with_control(ControlSpec {
            source: ControlSource::Inline(png),
            kind: ControlKind::Edge,
            scale: 0.5,
            low_threshold: None,
            high_threshold: None,
        });
        validate_job(&JobSpec::new(vec![good]), &Limits::default()).unwrap();
    }

    #[test]
    fn canny_thresholds() {
        let with = |kind, lo: Option<f32>, hi: Option<f32>| {
            ok_item().with_control(ControlSpec {
                source: ControlSource::Uri("s3://bucket/k.png".into()),
                kind,
                scale: 1.0,
                low_threshold: lo,
                high_threshold: hi,
            })
        };
        let items = vec![
            with(ControlKind::Canny, Some(50.0), Some(150.0)),
            with(ControlKind::Canny, Some(200.0), Some(100.0)),
            with(ControlKind::Canny, Some(-1.0), Some(f32::NAN)),
            with(ControlKind::Hed, Some(10.0), None),
        ];
        let errs = validate_job(&JobSpec::new(items), &Limits::default()).unwrap_err();
        let paths: Vec<String> = errs.iter().map(|e| e.path()).collect();
        assert_eq!(
            paths,
            [
                "items[1].control.low_threshold",
                "items[2].control.low_threshold",
                "items[2].control.high_threshold",
                "items[3].control.low_threshold"
            ]
        );
        assert!(
            errs[3]
                .message
                .contains("only applies to control kind `canny`")
        );
    }

    #[test]
    fn expansion_indexes_and_seeds() {
        let mut spec = JobSpec::new(vec![
            ok_item().with_seed(10).with_images(3),
            ok_item().with_images(2),
        ])
        .with_prefix("out/");
        assign_seeds(&mut spec);
        let job = JobId::new();
        let tasks = expand(&job, &spec, &LeasePolicy::default());
        assert_eq!(tasks.len(), 5);
        assert_eq!(
            tasks.iter().map(|t| t.index).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        assert_eq!(
            tasks.iter().map(|t| t.seed).take(3).collect::<Vec<_>>(),
            [10, 11, 12]
        );
        let s2 = spec.items[1].seed.unwrap();
        assert_eq!(tasks[3].seed, s2);
        assert_eq!(tasks[4].seed, s2 + 1);
        assert_eq!(tasks[4].item, 1);
        assert_eq!(tasks[2].output_key, format!("default/out/{job}/000002.png"));
        assert_eq!(
            LeasePolicy {
                base_ms: 1000,
                per_step_megapixel_ms: 1000
            }
            .lease_ms(1000, 1000, 4),
            5000
        );
    }
}
