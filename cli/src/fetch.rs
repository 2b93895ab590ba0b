//! `pixfarm fetch`: download every image of a job, verify, resume.
//!
//! Images land as `DIR/{index:06}.png`. A file that already exists with the
//! recorded sha256 is skipped, so an interrupted fetch resumes where it
//! stopped; a partial or corrupt file is downloaded again. Downloads go to a
//! temporary name and are renamed only after the checksum matched, so a file
//! with the final name is always complete.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use pixfarm_proto::v1 as pb;
use sha2::{Digest, Sha256};

/// What a fetch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FetchSummary {
    pub downloaded: usize,
    pub skipped: usize,
    /// Results that failed to render (nothing to download).
    pub not_rendered: usize,
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Where image `index` goes.
pub fn image_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("{index:06}.png"))
}

/// Reads a URL: `file://` from disk, `http(s)://` with a small blocking client.
pub fn read_url(url: &str) -> anyhow::Result<Vec<u8>> {
    if let Some(path) = url.strip_prefix("file://") {
        return std::fs::read(path).with_context(|| format!("cannot read {path}"));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        let resp = ureq::get(url)
            .timeout(std::time::Duration::from_secs(120))
            .call()
            .map_err(|e| match e {
                ureq::Error::Status(code, _) => anyhow!("the server answered HTTP {code}"),
                other => anyhow!("{other}"),
            })?;
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut resp.into_reader(), &mut buf)?;
        return Ok(buf);
    }
    bail!("unsupported URL scheme in `{url}` (expected file://, http:// or https://)")
}

fn fetch_one(dir: &Path, r: &pb::Result) -> anyhow::Result<bool> {
    let path = image_path(dir, r.index);
    if let Ok(existing) = std::fs::read(&path)
        && sha256_hex(&existing) == r.sha256
    {
        return Ok(false);
    }
    let data = read_url(&r.url).with_context(|| format!("cannot download image {}", r.index))?;
    let got = sha256_hex(&data);
    if got != r.sha256 {
        bail!(
            "image {} is corrupt: its sha256 is {got}, the farm recorded {}",
            r.index,
            r.sha256
        );
    }
    let tmp = path.with_extension("png.part");
    std::fs::write(&tmp, &data).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(true)
}

/// Downloads every rendered result into `dir` (created if needed), `parallel`
/// at a time, and writes `dir/results.jsonl` with one line per result.
pub async fn fetch_all(
    results: Vec<pb::Result>,
    dir: &Path,
    parallel: usize,
    show_progress: bool,
) -> anyhow::Result<FetchSummary> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let rendered: Vec<pb::Result> = results.iter().filter(|r| r.succeeded).cloned().collect();
    let mut summary = FetchSummary {
        not_rendered: results.len() - rendered.len(),
        ..Default::default()
    };
    let bar = if show_progress {
        ProgressBar::new(rendered.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "[{elapsed_precise}] {bar:40} {pos}/{len} images  {per_sec}  ETA {eta}",
        )
        .expect("valid template"),
    );
    let mut tasks = futures::stream::iter(rendered.into_iter().map(|r| {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || fetch_one(&dir, &r))
    }))
    .buffer_unordered(parallel.max(1));
    let mut first_error = None;
    while let Some(res) = tasks.next().await {
        match res.context("a download task panicked")? {
            Ok(true) => summary.downloaded += 1,
            Ok(false) => summary.skipped += 1,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    write_results_jsonl(dir, &results)?;
    if let Some(e) = first_error {
        return Err(
            e.context("some images could not be fetched; run the same command again to resume")
        );
    }
    Ok(summary)
}

fn write_results_jsonl(dir: &Path, results: &[pb::Result]) -> anyhow::Result<()> {
    let mut out = String::new();
    for r in results {
        let t = r.timings.unwrap_or_default();
        let line = serde_json::json!({
            "index": r.index,
            "file": if r.succeeded { format!("{:06}.png", r.index) } else { String::new() },
            "prompt": r.prompt,
            "seed": r.seed,
            "width": r.width,
            "height": r.height,
            "steps": r.steps,
            "control_kind": r.control_kind,
            "control_scale": r.control_scale,
            "key": r.key,
            "sha256": r.sha256,
            "worker": r.worker,
            "succeeded": r.succeeded,
            "error": r.error,
            "timings": {"queue_ms": t.queue_ms, "render_ms": t.render_ms, "encode_ms": t.encode_ms, "upload_ms": t.upload_ms, "batch_size": t.batch_size},
        });
        out.push_str(&line.to_string());
        out.push('\n');
    }
    let path = dir.join("results.jsonl");
    std::fs::write(&path, out).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fetch_verifies_and_resumes_from_file_urls() {
        let src = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let mut results = Vec::new();
        for i in 0..3u64 {
            let data = format!("png bytes {i}").into_bytes();
            let p = src.path().join(format!("{i}.png"));
            std::fs::write(&p, &data).unwrap();
            results.push(pb::Result {
                index: i,
                succeeded: true,
                sha256: sha256_hex(&data),
                url: format!("file://{}", p.display()),
                ..Default::default()
            });
        }
        results.push(pb::Result {
            index: 3,
            succeeded: false,
            error: "boom".into(),
            ..Default::default()
        });
        let s = fetch_all(results.clone(), out.path(), 2, false)
            .await
            .unwrap();
        assert_eq!(
            s,
            FetchSummary {
                downloaded: 3,
                skipped: 0,
                not_rendered: 1
            }
        );
        // Corrupt one local copy: only that one is fetched again.
        std::fs::write(image_path(out.path(), 1), b"truncated").unwrap();
        let s = fetch_all(results.clone(), out.path(), 2, false)
            .await
            .unwrap();
        assert_eq!(
            s,
            FetchSummary {
                downloaded: 1,
                skipped: 2,
                not_rendered: 1
            }
        );
        let lines = std::fs::read_to_string(out.path().join("results.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 4);
        // A source that does not match its recorded checksum is refused and not kept.
        std::fs::write(src.path().join("2.png"), b"tampered").unwrap();
        std::fs::remove_file(image_path(out.path(), 2)).unwrap();
        let e = fetch_all(results, out.path(), 2, false).await.unwrap_err();
        assert!(format!("{e:#}").contains("image 2 is corrupt"), "{e:#}");
        assert!(!image_path(out.path(), 2).exists());
    }
}
