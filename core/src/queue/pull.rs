//! Pull and reclaim: refill from the backlogs, expired leases taken over, new entries read,
//! cancelled jobs' tasks dropped, leases extended. Scripts: `refill.lua`, `reclaim.lua`,
//! `extend.lua`, `mark_started.lua`.

use super::*;

impl Queue {
    /// Tops up the streams of `lanes` from the tenants' backlogs in deficit-round-robin order
    /// (one script call; a no-op for full streams). Submit and acknowledgement refill their own
    /// lanes; `pull` calls this too so a lane never waits on a backlog. Returns the tasks moved.
    pub async fn refill(&self, lanes: &[Lane]) -> Result<u64> {
        if lanes.is_empty() {
            return Ok(0);
        }
        let mut c = self.conn.clone();
        let mut inv = self.scripts.refill.prepare_invoke();
        inv.arg(self.config.fair.stream_target)
            .arg(self.config.fair.quantum);
        for lane in lanes {
            inv.arg(lane.to_string());
        }
        let moved: i64 = inv.invoke_async(&mut c).await?;
        Ok(moved.max(0) as u64)
    }

    /// Pulls up to `max_batch` tasks for `worker` from `lanes` (given highest priority first):
    /// first expired leases (when a reclaim is due), then new entries lane by lane, and when there
    /// are none, blocks up to `block` on all lanes at once. Tasks of cancelled jobs are
    /// acknowledged and dropped here; tasks out of attempts are dead-lettered here. Jobs of the
    /// returned tasks are marked `RUNNING`.
    #[instrument(skip(self, lanes), fields(worker = %worker))]
    pub async fn pull(
        &self,
        worker: &str,
        lanes: &[Lane],
        max_batch: usize,
        block: Duration,
    ) -> Result<Vec<Task>> {
        let max_batch = max_batch.max(1);
        let mut tasks = Vec::new();
        // Once an entry has been delivered to this worker (read or claimed), a Redis error in a
        // later step must not lose the delivery: the tasks read so far are returned, and the
        // follow-up steps (refill, the cancel check, marking jobs started) are best effort.
        // Otherwise a Redis blip would leave delivered entries to expire and cost each task an
        // attempt.
        if self.reclaim_due() {
            match self.reclaim(worker, lanes, max_batch).await {
                Ok(t) => tasks.extend(t),
                Err(e) => {
                    warn!(error = %e, "reclaiming expired leases failed; trying again next pull")
                }
            }
        }
        if let Err(e) = self.refill(lanes).await {
            if tasks.is_empty() {
                return Err(e);
            }
            warn!(error = %e, "refill failed");
        }
        let mut c = self.conn.clone();
        for lane in lanes {
            if tasks.len() >= max_batch {
                break;
            }
            match self
                .read_group(&mut c, worker, &[*lane], max_batch - tasks.len(), None)
                .await
            {
                Ok(reply) => tasks.extend(reply),
                Err(e) if tasks.is_empty() => return Err(e),
                Err(e) => {
                    warn!(error = %e, "reading more tasks failed; going on with those read");
                    break;
                }
            }
        }
        if tasks.is_empty() && !block.is_zero() {
            let mut guard = self.blocking.lock().await;
            if guard.is_none() {
                *guard = Some(
                    ConnectionManager::new_with_config(
                        self.client.clone(),
                        Self::manager_config(&self.config, true),
                    )
                    .await?,
                );
            }
            let bc = guard.as_mut().expect("set above");
            tasks = self
                .read_group(bc, worker, lanes, max_batch, Some(block))
                .await?;
            // XREADGROUP over several streams returns up to COUNT from *each*; keep priority order.
            tasks.sort_by_key(|t| {
                lanes
                    .iter()
                    .position(|l| *l == t.lane)
                    .unwrap_or(usize::MAX)
            });
            if tasks.len() > max_batch {
                // Put the surplus back at once by re-enqueueing it (keeps the batch bounded). A
                // surplus entry whose requeue fails stays in the batch rather than expiring.
                let surplus = tasks.split_off(max_batch);
                for t in surplus {
                    match self.requeue(worker, &t, t.spec.prior_attempts).await {
                        Ok(_) => {}
                        Err(e) => {
                            warn!(error = %e, "returning a surplus task failed; keeping it");
                            tasks.push(t);
                        }
                    }
                }
            }
        }
        if tasks.is_empty() {
            return Ok(tasks);
        }
        Ok(self.drop_finished(worker, tasks).await)
    }

    /// Reads new entries from `lanes` for `worker`; recreates groups lost with a Redis restart.
    async fn read_group(
        &self,
        conn: &mut ConnectionManager,
        worker: &str,
        lanes: &[Lane],
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<Task>> {
        if lanes.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(worker)
            .arg("COUNT")
            .arg(count);
        if let Some(b) = block {
            cmd.arg("BLOCK").arg(b.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS");
        for l in lanes {
            cmd.arg(l.key());
        }
        for _ in lanes {
            cmd.arg(">");
        }
        let reply: Option<StreamReadReply> = match cmd.query_async(conn).await {
            Ok(r) => r,
            Err(e) if e.code() == Some("NOGROUP") => {
                warn!("consumer group missing (Redis lost its data?): recreating");
                self.ensure_groups().await?;
                cmd.query_async(conn).await?
            }
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for k in reply.map(|r| r.keys).unwrap_or_default() {
            let lane =
                Lane::from_key(&k.key).ok_or_else(|| CoreError::corrupt("lane key", &k.key))?;
            for e in k.ids {
                let raw: String = e.get("t").unwrap_or_default();
                let spec: TaskSpec = serde_json::from_str(&raw)
                    .map_err(|err| CoreError::corrupt(format!("task {}", e.id), err))?;
                let attempt = spec.prior_attempts + 1;
                out.push(Task {
                    spec,
                    lane,
                    entry_id: e.id,
                    attempt,
                });
            }
        }
        Ok(out)
    }

    fn reclaim_due(&self) -> bool {
        let mut last = self.last_reclaim.lock().expect("poisoned");
        let now = tokio::time::Instant::now();
        match *last {
            Some(t) if now.duration_since(t) < self.config.reclaim_interval => false,
            _ => {
                *last = Some(now);
                true
            }
        }
    }

    /// Takes over up to `max` tasks whose lease expired (their worker died or stalled), in lane
    /// order. Tasks that have used up their attempts are dead-lettered instead of returned.
    #[instrument(skip(self, lanes), fields(worker = %worker))]
    pub async fn reclaim(&self, worker: &str, lanes: &[Lane], max: usize) -> Result<Vec<Task>> {
        let mut c = self.conn.clone();
        let mut out = Vec::new();
        for lane in lanes {
            if out.len() >= max {
                break;
            }
            let rows: Vec<(String, u32, Vec<String>)> = self
                .scripts
                .reclaim
                .key(lane.key())
                .arg(GROUP)
                .arg(worker)
                .arg(self.config.lease.base_ms)
                .arg(((max - out.len()) * 4).max(64))
                .arg(max - out.len())
                .invoke_async(&mut c)
                .await?;
            for (id, deliveries, fields) in rows {
                let raw = fields
                    .chunks(2)
                    .find(|kv| kv[0] == "t")
                    .and_then(|kv| kv.get(1))
                    .cloned()
                    .unwrap_or_default();
                let spec: TaskSpec = serde_json::from_str(&raw)
                    .map_err(|err| CoreError::corrupt(format!("task {id}"), err))?;
                let attempt = spec.prior_attempts + deliveries;
                let task = Task {
                    spec,
                    lane: *lane,
                    entry_id: id,
                    attempt,
                };
                warn!(job = %task.spec.job, index = task.spec.index, attempt, "lease expired, task reclaimed");
                if attempt > self.config.max_attempts {
                    let err = format!(
                        "gave up after {} attempts: the worker holding the task stopped (lease expired)",
                        attempt - 1
                    );
                    self.dead_letter(worker, &task, &err).await?;
                } else {
                    out.push(task);
                }
            }
        }
        Ok(out)
    }

    /// Drops (acks) tasks that need no render: those of cancelled or deleted jobs, and those
    /// whose image is already recorded (a redelivery after a lost acknowledgement, or a lease race
    /// the other worker won), so a stored image is never rendered and written again. Marks the jobs
    /// of the rest `RUNNING`. Best effort: on a Redis error the tasks are kept (the worker checks
    /// cancel again before rendering, and a duplicate result is never recorded).
    async fn drop_finished(&self, worker: &str, tasks: Vec<Task>) -> Vec<Task> {
        let jobs: Vec<JobId> = {
            let mut seen = HashSet::new();
            tasks
                .iter()
                .filter(|t| seen.insert(t.spec.job.clone()))
                .map(|t| t.spec.job.clone())
                .collect()
        };
        let cancelled = match self.is_cancelled(&jobs).await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cancel check after pull failed; keeping the tasks");
                return tasks;
            }
        };
        let recorded = match self.recorded(&tasks).await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "result check after pull failed; keeping the tasks");
                vec![false; tasks.len()]
            }
        };
        type Flagged = Vec<(Task, bool)>;
        let (keep, drop): (Flagged, Flagged) = tasks
            .into_iter()
            .zip(recorded)
            .partition(|(t, rec)| !cancelled.contains(&t.spec.job) && !rec);
        let keep: Vec<Task> = keep.into_iter().map(|(t, _)| t).collect();
        if !drop.is_empty() {
            let drop: Vec<Task> = drop.into_iter().map(|(t, _)| t).collect();
            debug!(
                n = drop.len(),
                "dropping tasks of cancelled jobs and recorded images"
            );
            if let Err(e) = self.ack(&drop).await {
                warn!(error = %e, "acknowledging dropped tasks failed; they come back after their lease");
            }
        }
        let live: Vec<&JobId> = jobs.iter().filter(|j| !cancelled.contains(*j)).collect();
        let Ok(ev) = event_json(&EventKind::Started {
            worker: worker.to_string(),
        }) else {
            return keep;
        };
        let now = now_ms();
        let marked = try_join_all(live.into_iter().map(|j| {
            let mut c = self.conn.clone();
            let ev = ev.clone();
            async move {
                let _: i64 = self
                    .scripts
                    .mark_started
                    .key(job_key(j))
                    .key(events_key(j))
                    .arg(now)
                    .arg(ev)
                    .arg(self.config.events_maxlen)
                    .invoke_async(&mut c)
                    .await?;
                Ok::<_, CoreError>(())
            }
        }))
        .await;
        if let Err(e) = marked {
            warn!(error = %e, "marking jobs started failed (the first result marks them)");
        }
        keep
    }

    /// Whether each task's image is already recorded (one pipelined round trip). Only tasks
    /// delivered before (`attempt > 1`: reclaimed or retried) are looked up; a first delivery
    /// cannot have been recorded, short of Redis losing writes, and then the first stored copy
    /// and the first record still win (so the common path costs no extra command).
    pub async fn recorded(&self, tasks: &[Task]) -> Result<Vec<bool>> {
        let again: Vec<usize> = (0..tasks.len()).filter(|&i| tasks[i].attempt > 1).collect();
        let mut out = vec![false; tasks.len()];
        if again.is_empty() {
            return Ok(out);
        }
        let mut c = self.conn.clone();
        let mut pipe = redis::pipe();
        for &i in &again {
            pipe.hexists(results_key(&tasks[i].spec.job), tasks[i].spec.index);
        }
        let found: Vec<bool> = pipe.query_async(&mut c).await?;
        for (i, f) in again.into_iter().zip(found) {
            out[i] = f;
        }
        Ok(out)
    }

    /// Owner-checked lease extension: resets the lease clock of each task this worker still owns.
    /// Returns one flag per task, `false` where the lease was lost (another worker took it over;
    /// the caller should stop working on it — its result would be discarded as a duplicate anyway).
    pub async fn extend_leases(&self, worker: &str, tasks: &[Task]) -> Result<Vec<bool>> {
        let mut by_lane: BTreeMap<Lane, Vec<usize>> = BTreeMap::new();
        for (i, t) in tasks.iter().enumerate() {
            by_lane.entry(t.lane).or_default().push(i);
        }
        let mut out = vec![false; tasks.len()];
        let mut c = self.conn.clone();
        for (lane, idx) in by_lane {
            let mut inv = self.scripts.extend.key(lane.key());
            inv.arg(GROUP).arg(worker);
            for &i in &idx {
                inv.arg(&tasks[i].entry_id);
            }
            let flags: Vec<i64> = inv.invoke_async(&mut c).await?;
            for (&i, f) in idx.iter().zip(flags) {
                out[i] = f == 1;
            }
        }
        Ok(out)
    }

    /// Which of `jobs` are cancelled (or gone). One round trip; cheap enough to call between
    /// denoising steps.
    pub async fn is_cancelled(&self, jobs: &[JobId]) -> Result<HashSet<JobId>> {
        if jobs.is_empty() {
            return Ok(HashSet::new());
        }
        let mut c = self.conn.clone();
        let mut pipe = redis::pipe();
        for j in jobs {
            pipe.hget(job_key(j), "state");
        }
        let states: Vec<Option<String>> = pipe.query_async(&mut c).await?;
        Ok(jobs
            .iter()
            .zip(states)
            .filter(|(_, s)| {
                s.as_deref()
                    .is_none_or(|s| s == JobState::Canceled.as_str())
            })
            .map(|(j, _)| j.clone())
            .collect())
    }

    /// The inline control image of `item` of `job`.
    pub async fn control_image(&self, job: &JobId, item: u32) -> Result<Bytes> {
        let mut c = self.conn.clone();
        let v: Option<Vec<u8>> = c.hget(controls_key(job), item).await?;
        v.map(Bytes::from)
            .ok_or_else(|| CoreError::not_found("control image", format!("{job} item {item}")))
    }
}
