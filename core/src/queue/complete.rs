//! Complete: a result recorded once, then the entry acknowledged and the tenant's counters
//! released. Scripts: `record.lua`, `ack.lua`.

use super::*;

impl Queue {
    /// Records a rendered image once, then acknowledges the entry. Call it only after the image is
    /// stored. A task another worker already recorded writes nothing (`Duplicate`), unless that
    /// record was a failure: a stored image replaces it (its worker stalled past the lease and the
    /// task was dead-lettered meanwhile). A task of a cancelled job writes nothing (`Canceled`).
    /// Either way the entry is acknowledged. A job that ends here is marked manifest-due in the
    /// same step, so its manifest is written even if the caller dies before
    /// [`Queue::write_manifest`] (see [`Queue::sweep_manifests`]).
    #[instrument(skip_all, fields(job = %task.spec.job, index = task.spec.index))]
    pub async fn complete(&self, task: &Task, result: &TaskResult) -> Result<Recorded> {
        let key = result.key.clone().unwrap_or_default();
        let ev = EventKind::ItemDone {
            index: task.spec.index,
            key,
            worker: result.worker.clone(),
        };
        let r = self.record(task, result, &ev, "ok", "").await?;
        self.ack(std::slice::from_ref(task)).await?;
        Ok(r)
    }

    /// [`Queue::complete`] for many tasks: records run concurrently (pipelined on the multiplexed
    /// connection) and entries are acknowledged with one script call per lane.
    pub async fn complete_many(&self, done: &[(Task, TaskResult)]) -> Result<Vec<Recorded>> {
        let recs = try_join_all(done.iter().map(|(task, result)| {
            let ev = EventKind::ItemDone {
                index: task.spec.index,
                key: result.key.clone().unwrap_or_default(),
                worker: result.worker.clone(),
            };
            async move { self.record(task, result, &ev, "ok", "").await }
        }))
        .await?;
        let tasks: Vec<Task> = done.iter().map(|(t, _)| t.clone()).collect();
        self.ack(&tasks).await?;
        Ok(recs)
    }

    pub(super) async fn record(
        &self,
        task: &Task,
        result: &TaskResult,
        ev: &EventKind,
        outcome: &str,
        error: &str,
    ) -> Result<Recorded> {
        let job = &task.spec.job;
        let json = serde_json::to_string(result).map_err(|e| CoreError::corrupt("result", e))?;
        let task_json = if outcome == "fail" {
            serde_json::to_string(&task.spec).map_err(|e| CoreError::corrupt("task", e))?
        } else {
            String::new()
        };
        let mut c = self.conn.clone();
        let (status, state): (String, String) = self
            .scripts
            .record
            .key(job_key(job))
            .key(results_key(job))
            .key(events_key(job))
            .key(MANIFEST_DUE_KEY)
            .key(DEAD_KEY)
            .arg(task.spec.index)
            .arg(json)
            .arg(now_ms())
            .arg(event_json(ev)?)
            .arg(self.config.events_maxlen)
            .arg(outcome)
            .arg(error)
            .arg(self.config.dead_maxlen)
            .arg(task.attempt)
            .arg(task_json)
            .arg(job.as_str())
            .invoke_async(&mut c)
            .await?;
        Ok(match status.as_str() {
            "recorded" => Recorded::Recorded,
            "finished" => {
                let st: JobState = state
                    .parse()
                    .map_err(|e: String| CoreError::corrupt("job state", e))?;
                info!(job = %job, state = %st, "job finished");
                Recorded::JobFinished(st)
            }
            "duplicate" => Recorded::Duplicate,
            "canceled" => Recorded::Canceled,
            _ => Recorded::Missing,
        })
    }

    /// Acknowledges and deletes the entries of `tasks` without recording anything (tasks of
    /// cancelled jobs, or already recorded ones).
    pub async fn ack(&self, tasks: &[Task]) -> Result<()> {
        let mut by_lane: BTreeMap<Lane, Vec<&str>> = BTreeMap::new();
        for t in tasks {
            by_lane.entry(t.lane).or_default().push(&t.entry_id);
        }
        let mut c = self.conn.clone();
        for (lane, ids) in by_lane {
            let mut inv = self.scripts.ack.key(lane.key());
            inv.arg(GROUP)
                .arg(lane.to_string())
                .arg(self.config.fair.stream_target)
                .arg(self.config.fair.quantum);
            for id in ids {
                inv.arg(id);
            }
            let _: i64 = inv.invoke_async(&mut c).await?;
        }
        Ok(())
    }
}
