//! The per-job event stream: reading, watching (resumable by event id), step progress.

use super::*;

impl Queue {
    /// Events of a job after `after` (a previous event id; `None`: from the start), at most
    /// `count`. With `block`, waits up to that long for the first new event.
    pub async fn events(
        &self,
        job: &JobId,
        after: Option<&str>,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<Event>> {
        let after = after.unwrap_or("0-0");
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(count.max(1));
        if let Some(b) = block {
            cmd.arg("BLOCK").arg(b.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS").arg(events_key(job)).arg(after);
        let reply: Option<StreamReadReply> = match block {
            // Each blocking read gets its own connection so many watchers never queue behind each
            // other on the shared multiplexed one.
            Some(_) => {
                let mut conn = self.client.get_multiplexed_async_connection().await?;
                cmd.query_async(&mut conn).await?
            }
            None => {
                let mut c = self.conn.clone();
                cmd.query_async(&mut c).await?
            }
        };
        let mut out = Vec::new();
        for k in reply.map(|r| r.keys).unwrap_or_default() {
            for e in k.ids {
                let at: u64 = e.get("at").unwrap_or(0);
                let raw: String = e.get("e").unwrap_or_default();
                let kind: EventKind = serde_json::from_str(&raw)
                    .map_err(|err| CoreError::corrupt(format!("event {}", e.id), err))?;
                out.push(Event {
                    id: e.id.clone(),
                    at_ms: at,
                    kind,
                });
            }
        }
        Ok(out)
    }

    /// A stream of the job's events from `after`, ending after the `JobFinished` event. Resume a
    /// broken watch by passing the last event id seen.
    pub fn watch(
        &self,
        job: JobId,
        after: Option<String>,
    ) -> impl Stream<Item = Result<Event>> + Send + 'static {
        let q = self.clone();
        futures::stream::unfold(
            (after, false, std::collections::VecDeque::<Event>::new()),
            move |(mut after, mut done, mut buf)| {
                let q = q.clone();
                let job = job.clone();
                async move {
                    loop {
                        if let Some(e) = buf.pop_front() {
                            if matches!(e.kind, EventKind::JobFinished { .. }) {
                                done = true;
                            }
                            after = Some(e.id.clone());
                            return Some((Ok(e), (after, done, buf)));
                        }
                        if done {
                            return None;
                        }
                        match q
                            .events(&job, after.as_deref(), 256, Some(Duration::from_secs(5)))
                            .await
                        {
                            Ok(evs) if evs.is_empty() => {
                                // Nothing new: make sure the job still exists (and has not finished
                                // with its final event trimmed away).
                                match q.get_job(&job).await {
                                    Ok(rec) if rec.state.is_terminal() => {
                                        let e = Event {
                                            id: after.clone().unwrap_or_else(|| "0-0".into()),
                                            at_ms: rec.finished_ms.unwrap_or_else(now_ms),
                                            kind: EventKind::JobFinished {
                                                state: rec.state,
                                                counts: rec.counts,
                                            },
                                        };
                                        return Some((Ok(e), (after, true, buf)));
                                    }
                                    Ok(_) => continue,
                                    Err(e) => return Some((Err(e), (after, true, buf))),
                                }
                            }
                            Ok(evs) => buf.extend(evs),
                            Err(e) => return Some((Err(e), (after, true, buf))),
                        }
                    }
                }
            },
        )
    }

    /// Appends a step-progress event for a job's tasks in the running batch.
    pub async fn progress(
        &self,
        job: &JobId,
        indices: &[u64],
        step: u32,
        total: u32,
        worker: &str,
    ) -> Result<()> {
        let ev = event_json(&EventKind::Step {
            indices: indices.to_vec(),
            step,
            total,
            worker: worker.to_string(),
        })?;
        let mut c = self.conn.clone();
        let _: String = redis::cmd("XADD")
            .arg(events_key(job))
            .arg("MAXLEN")
            .arg("~")
            .arg(self.config.events_maxlen)
            .arg("*")
            .arg("at")
            .arg(now_ms())
            .arg("e")
            .arg(ev)
            .query_async(&mut c)
            .await?;
        Ok(())
    }
}
