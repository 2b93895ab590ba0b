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
                .arg(now_ms())
                .arg(event_json(&ev)?)
                .arg(self.config.events_maxlen)
                .arg(error)
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

    /// Re-enqueues `task` with `prior_attempts` set, if `worker` still owns it.
    pub(super) async fn requeue(&self, worker: &str, task: &Task, prior_attempts: u32) -> Result<bool> {
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

    /// Records a final failure, appends to `pf:dead`, acknowledges the entry.
    pub(super) async fn dead_letter(&self, worker: &str, task: &Task, error: &str) -> Result<Recorded> {
        let result = TaskResult::failed(task, error.to_string(), worker);
        let ev = EventKind::ItemFailed {
            index: task.spec.index,
            error: error.to_string(),
            attempt: task.attempt,
            will_retry: false,
            worker: worker.to_string(),
        };
        let r = self.record(task, &result, &ev, "fail", error).await?;
        if r != Recorded::Duplicate && r != Recorded::Canceled {
            let json =
                serde_json::to_string(&task.spec).map_err(|e| CoreError::corrupt("task", e))?;
            let mut c = self.conn.clone();
            let _: String = redis::cmd("XADD")
                .arg(DEAD_KEY)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.config.dead_maxlen)
                .arg("*")
                .arg("job")
                .arg(task.spec.job.as_str())
                .arg("index")
                .arg(task.spec.index)
                .arg("error")
                .arg(error)
                .arg("attempts")
                .arg(task.attempt)
                .arg("t")
                .arg(json)
                .query_async(&mut c)
                .await?;
        }
        self.ack(std::slice::from_ref(task)).await?;
        Ok(r)
    }
}
