//! Fail: a retry (re-enqueued, owner-checked) or a dead letter recorded as the task's final
//! failure. Scripts: `note_error.lua`, `requeue.lua` (and `record.lua`).

use super::*;

impl Queue {
    /// Reports a failed attempt. A `retryable` failure with attempts left re-enqueues the task
    /// (`Retrying`); otherwise the task goes to the dead-letter stream and is recorded as failed
    /// with `error`, which may finish the job.
    #[instrument(skip_all, fields(job = %task.spec.job, index = task.spec.index, attempt = task.attempt))]
    pub async fn fail(
        &self,
        worker: &str,
        task: &Task,
        error: &str,
        retryable: bool,
    ) -> Result<Failed> {
        let will_retry = retryable && task.attempt < self.config.max_attempts;
        if will_retry {
            let ev = EventKind::ItemFailed {
                index: task.spec.index,
                error: error.to_string(),
                attempt: task.attempt,
                will_retry: true,
                worker: worker.to_string(),
            };
            let mut c = self.conn.clone();
            let _: i64 = self
                .scripts
                .note_error
                .key(job_key(&task.spec.job))
                .key(events_key(&task.spec.job))
                .key(results_key(&task.spec.job))
                .arg(now_ms())
                .arg(event_json(&ev)?)
                .arg(self.config.events_maxlen)
                .arg(error)
                .arg(task.spec.index)
                .invoke_async(&mut c)
                .await?;
            warn!(error, "task failed, retrying");
            return Ok(if self.requeue(worker, task, task.attempt).await? {
                Failed::Retrying {
                    attempt: task.attempt + 1,
                }
            } else {
                Failed::NotOwner
            });
        }
        warn!(error, "task failed for good, dead-lettering");
        Ok(Failed::DeadLettered(
            self.dead_letter(worker, task, error).await?,
        ))
    }

    /// Gives a task back without counting the attempt: the failure was the infrastructure's (the
    /// object store or Redis was down), not the task's, so it must delay the work and never
    /// dead-letter it. The task is re-enqueued (owner-checked) with the attempts it had before
    /// this delivery. Returns `false` when the caller no longer owned it.
    #[instrument(skip_all, fields(job = %task.spec.job, index = task.spec.index))]
    pub async fn defer(&self, worker: &str, task: &Task, reason: &str) -> Result<bool> {
        warn!(
            reason,
            "infrastructure failure: task deferred, attempt not counted"
        );
        self.requeue(worker, task, task.attempt.saturating_sub(1))
            .await
    }

    /// Re-enqueues `task` with `prior_attempts` set, if `worker` still owns it.
    pub(super) async fn requeue(
        &self,
        worker: &str,
        task: &Task,
        prior_attempts: u32,
    ) -> Result<bool> {
        let mut spec = task.spec.clone();
        spec.prior_attempts = prior_attempts;
        let json = serde_json::to_string(&spec).map_err(|e| CoreError::corrupt("task", e))?;
        let mut c = self.conn.clone();
        let id: Option<String> = self
            .scripts
            .requeue
            .key(task.lane.key())
            .arg(GROUP)
            .arg(worker)
            .arg(&task.entry_id)
            .arg(json)
            .arg(spec.lease_ms)
            .invoke_async(&mut c)
            .await?;
        Ok(id.is_some())
    }

    /// Records a final failure with its `pf:dead` entry, acknowledges the entry.
    pub(super) async fn dead_letter(
        &self,
        worker: &str,
        task: &Task,
        error: &str,
    ) -> Result<Recorded> {
        let result = TaskResult::failed(task, error.to_string(), worker);
        let ev = EventKind::ItemFailed {
            index: task.spec.index,
            error: error.to_string(),
            attempt: task.attempt,
            will_retry: false,
            worker: worker.to_string(),
        };
        // The dead letter is appended by the record script itself (one step: never a failure
        // recorded without its dead letter, nor a dead letter twice).
        let r = self.record(task, &result, &ev, "fail", error).await?;
        self.ack(std::slice::from_ref(task)).await?;
        Ok(r)
    }
}
