//! The job manifest: one JSON line per recorded image, written when the job ends.
//!
//! Whoever ends a job (the worker whose result or failure was the last, or a cancel) marks it in
//! the manifest-due set in the same script that makes it terminal. The finisher writes the manifest
//! at once; if it dies first, or the write fails, the marker stays and [`Queue::sweep_manifests`]
//! (run by every worker and the coordinator) writes it later. `GetJob` reports a job whose marker
//! is still there as `manifest_pending`. Script: `manifest_done.lua`.

use super::*;

impl Queue {
    /// Writes `{prefix}/{job}/manifest.jsonl` (one JSON line per recorded image, in index order),
    /// notes its key in the job record and clears the manifest-due marker. Idempotent: a second
    /// call rewrites the same content. Returns the key.
    #[instrument(skip(self, storage), fields(job = %job))]
    pub async fn write_manifest(&self, job: &JobId, storage: &Storage) -> Result<String> {
        let mut c = self.conn.clone();
        // Read the marker before the results: a re-mark after this point keeps the marker.
        let marked: Option<String> = c.zscore(MANIFEST_DUE_KEY, job.as_str()).await?;
        let rec = self.get_job(job).await?;
        let results = self.all_results(job).await?;
        let mut body = Vec::with_capacity(results.len() * 256);
        for r in &results {
            serde_json::to_writer(&mut body, r).map_err(|e| CoreError::corrupt("result", e))?;
            body.push(b'\n');
        }
        let key = manifest_key(
            &crate::validate::object_prefix(&rec.tenant, &rec.output_prefix),
            job,
        );
        storage
            .put(&key, Bytes::from(body), "application/x-ndjson")
            .await?;
        let _: i64 = self
            .scripts
            .manifest_done
            .key(job_key(job))
            .key(MANIFEST_DUE_KEY)
            .arg(job.as_str())
            .arg(&key)
            .arg(marked.unwrap_or_default())
            .invoke_async(&mut c)
            .await?;
        info!(key, lines = results.len(), "manifest written");
        Ok(key)
    }

    /// Writes the manifests that are due and were marked at least `grace` ago (the finisher
    /// normally writes its own within that time), at most `max` of them. Returns how many were
    /// written; a failed write leaves its marker for the next sweep. A marker of a job that no
    /// longer exists is dropped.
    #[instrument(skip(self, storage))]
    pub async fn sweep_manifests(
        &self,
        storage: &Storage,
        grace: Duration,
        max: usize,
    ) -> Result<usize> {
        let mut c = self.conn.clone();
        let upto = now_ms().saturating_sub(grace.as_millis() as u64);
        let due: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(MANIFEST_DUE_KEY)
            .arg("-inf")
            .arg(upto)
            .arg("LIMIT")
            .arg(0)
            .arg(max.max(1))
            .query_async(&mut c)
            .await?;
        let mut written = 0;
        for id in due {
            let job = JobId(id.clone());
            match self.write_manifest(&job, storage).await {
                Ok(_) => written += 1,
                Err(CoreError::NotFound { .. }) => {
                    let _: i64 = c.zrem(MANIFEST_DUE_KEY, &id).await?;
                }
                Err(e) => warn!(job = %job, error = %e, "manifest still due: writing it failed"),
            }
        }
        Ok(written)
    }

    /// Whether `job`'s manifest is still to be written.
    pub async fn manifest_pending(&self, job: &JobId) -> Result<bool> {
        let mut c = self.conn.clone();
        let s: Option<f64> = c.zscore(MANIFEST_DUE_KEY, job.as_str()).await?;
        Ok(s.is_some())
    }
}
