//! Cancel: the job becomes `CANCELED` at once and its backlogs are dropped. Script: `cancel.lua`.

use super::*;

impl Queue {
    /// Cancels a job: its state becomes `CANCELED` at once, tasks still in its backlog are deleted
    /// (freeing the tenant's queued quota), tasks already in a lane stream are dropped by workers
    /// when pulled, running ones stop between denoising steps, and nothing is recorded afterwards.
    /// Cancelling a finished job is a `Conflict`.
    #[instrument(skip(self), fields(job = %job))]
    pub async fn cancel_job(&self, job: &JobId) -> Result<JobRecord> {
        let mut c = self.conn.clone();
        let (code, state): (i64, String) = self
            .scripts
            .cancel
            .key(job_key(job))
            .key(events_key(job))
            .key(MANIFEST_DUE_KEY)
            .arg(now_ms())
            .arg(self.config.events_maxlen)
            .arg(job.as_str())
            .arg(Variant::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>())
            .invoke_async(&mut c)
            .await?;
        match code {
            -1 => Err(CoreError::not_found("job", job.as_str())),
            0 => Err(CoreError::Conflict(format!(
                "job {job} already finished ({state})"
            ))),
            _ => self.get_job(job).await,
        }
    }
}
