//! The job manifest: one JSON line per recorded image, written when the job ends.

use super::*;

impl Queue {
    /// Writes `{prefix}/{job}/manifest.jsonl` (one JSON line per recorded image, in index order)
    /// and notes its key in the job record. Idempotent: whoever finishes the job calls it, and a
    /// second call rewrites the same content. Returns the key.
    #[instrument(skip(self, storage), fields(job = %job))]
    pub async fn write_manifest(&self, job: &JobId, storage: &Storage) -> Result<String> {
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
        let mut c = self.conn.clone();
        let _: () = c.hset(job_key(job), "manifest_key", &key).await?;
        info!(key, lines = results.len(), "manifest written");
        Ok(key)
    }
}
