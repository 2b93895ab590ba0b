//! Read-only views: job records and listings, results, dead letters, lane and backlog depth,
//! tenant counters.

use super::*;

impl Queue {
    /// The job record; `NotFound` for unknown ids.
    pub async fn get_job(&self, job: &JobId) -> Result<JobRecord> {
        let mut c = self.conn.clone();
        let (h, due): (HashMap<String, String>, Option<f64>) = redis::pipe()
            .hgetall(job_key(job))
            .zscore(MANIFEST_DUE_KEY, job.as_str())
            .query_async(&mut c)
            .await?;
        if h.is_empty() {
            return Err(CoreError::not_found("job", job.as_str()));
        }
        parse_job(job, &h, due.is_some())
    }

    /// Jobs, newest first, filtered; `page.token` continues a previous listing.
    pub async fn list_jobs(
        &self,
        filter: &JobFilter,
        page: &PageRequest,
    ) -> Result<Page<JobRecord>> {
        let size = page.size.clamp(1, 1000);
        let key = match &filter.tenant {
            Some(t) => tenant_jobs_key(t),
            None => JOBS_KEY.to_string(),
        };
        let mut c = self.conn.clone();
        let mut start = match &page.token {
            Some(t) => format!("({t}"),
            None => "+".to_string(),
        };
        let mut out = Vec::new();
        let scan = (size * 2).max(64);
        loop {
            let ids: Vec<String> = redis::cmd("ZREVRANGEBYLEX")
                .arg(&key)
                .arg(&start)
                .arg("-")
                .arg("LIMIT")
                .arg(0)
                .arg(scan)
                .query_async(&mut c)
                .await?;
            let exhausted = ids.len() < scan;
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.hgetall(job_key(&JobId(id.clone())))
                    .zscore(MANIFEST_DUE_KEY, id);
            }
            let flat: Vec<Value> = if ids.is_empty() {
                Vec::new()
            } else {
                pipe.query_async(&mut c).await?
            };
            let mut rows = Vec::with_capacity(ids.len());
            for pair in flat.chunks(2) {
                let h: HashMap<String, String> = redis::from_redis_value_ref(&pair[0])
                    .map_err(|e| CoreError::corrupt("job record", e))?;
                let due: Option<f64> = match pair.get(1) {
                    Some(v) => redis::from_redis_value_ref(v)
                        .map_err(|e| CoreError::corrupt("manifest marker", e))?,
                    None => None,
                };
                rows.push((h, due));
            }
            for (id, (h, due)) in ids.iter().zip(rows) {
                start = format!("({id}");
                if h.is_empty() {
                    continue;
                }
                let rec = parse_job(&JobId(id.clone()), &h, due.is_some())?;
                let state_ok = filter.states.is_empty() || filter.states.contains(&rec.state);
                let labels_ok = filter
                    .labels
                    .iter()
                    .all(|(k, v)| rec.labels.get(k) == Some(v));
                if state_ok && labels_ok {
                    out.push(rec);
                    if out.len() == size {
                        return Ok(Page {
                            items: out,
                            next_token: Some(id.clone()),
                        });
                    }
                }
            }
            if exhausted {
                return Ok(Page {
                    items: out,
                    next_token: None,
                });
            }
        }
    }

    /// Results (succeeded and finally failed images) in index order; `page.token` is the next
    /// index to look at.
    pub async fn list_results(&self, job: &JobId, page: &PageRequest) -> Result<Page<TaskResult>> {
        let size = page.size.clamp(1, 10_000);
        let mut c = self.conn.clone();
        let total: Option<u64> = c.hget(job_key(job), "total").await?;
        let total = total.ok_or_else(|| CoreError::not_found("job", job.as_str()))?;
        let mut next: u64 = match &page.token {
            Some(t) => t.parse().map_err(|_| {
                CoreError::Invalid(vec![crate::error::ValidationError::job(
                    "page_token",
                    "is not a valid token",
                )])
            })?,
            None => 0,
        };
        let mut out = Vec::new();
        let chunk = (size as u64 * 2).max(256);
        while next < total && out.len() < size {
            let end = (next + chunk).min(total);
            let fields: Vec<u64> = (next..end).collect();
            let vals: Vec<Option<String>> = redis::cmd("HMGET")
                .arg(results_key(job))
                .arg(&fields)
                .query_async(&mut c)
                .await?;
            for (idx, v) in fields.iter().zip(vals) {
                next = idx + 1;
                if let Some(v) = v {
                    out.push(
                        serde_json::from_str(&v)
                            .map_err(|e| CoreError::corrupt(format!("result {idx}"), e))?,
                    );
                    if out.len() == size {
                        break;
                    }
                }
            }
        }
        Ok(Page {
            items: out,
            next_token: (next < total).then(|| next.to_string()),
        })
    }

    /// Every recorded result of a job, in index order.
    pub async fn all_results(&self, job: &JobId) -> Result<Vec<TaskResult>> {
        let mut c = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut out = Vec::new();
        loop {
            let (next, kv): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
                .arg(results_key(job))
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await?;
            for (k, v) in kv {
                out.push(
                    serde_json::from_str::<TaskResult>(&v)
                        .map_err(|e| CoreError::corrupt(format!("result {k}"), e))?,
                );
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        out.sort_by_key(|r| r.index);
        out.dedup_by_key(|r| r.index);
        Ok(out)
    }

    /// Live workers (entries that expired are pruned from the registry set).
    pub async fn list_workers(&self) -> Result<Vec<WorkerInfo>> {
        let mut c = self.conn.clone();
        let ids: Vec<String> = c.smembers(WORKERS_KEY).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|i| worker_key(i)).collect();
        let vals: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(&mut c).await?;
        let mut out = Vec::new();
        let mut stale = Vec::new();
        for (id, v) in ids.into_iter().zip(vals) {
            match v.and_then(|v| serde_json::from_str::<WorkerInfo>(&v).ok()) {
                Some(w) => out.push(w),
                None => stale.push(id),
            }
        }
        if !stale.is_empty() {
            let _: () = c.srem(WORKERS_KEY, &stale).await?;
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// The most recent dead letters, newest first.
    pub async fn dead_letters(&self, count: usize) -> Result<Vec<DeadLetter>> {
        let mut c = self.conn.clone();
        let v: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
            .arg(DEAD_KEY)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(&mut c)
            .await?;
        let mut out = Vec::new();
        for (id, fields) in v {
            let f: HashMap<String, String> = fields.into_iter().collect();
            let task: TaskSpec =
                serde_json::from_str(f.get("t").map(String::as_str).unwrap_or("null"))
                    .map_err(|e| CoreError::corrupt(format!("dead letter {id}"), e))?;
            out.push(DeadLetter {
                id,
                job: task.job.clone(),
                index: task.index,
                error: f.get("error").cloned().unwrap_or_default(),
                attempts: f.get("attempts").and_then(|a| a.parse().ok()).unwrap_or(0),
                task,
            });
        }
        Ok(out)
    }

    /// Length and pending count of every lane.
    pub async fn lane_stats(&self) -> Result<Vec<LaneStats>> {
        let mut c = self.conn.clone();
        let mut out = Vec::new();
        for lane in Lane::all() {
            let length: u64 = c.xlen(lane.key()).await?;
            let summary: Value = redis::cmd("XPENDING")
                .arg(lane.key())
                .arg(GROUP)
                .query_async(&mut c)
                .await?;
            let pending = match summary {
                Value::Array(v) => v
                    .first()
                    .and_then(|x| redis::from_redis_value_ref::<u64>(x).ok())
                    .unwrap_or(0),
                _ => 0,
            };
            out.push(LaneStats {
                lane,
                length,
                pending,
            });
        }
        Ok(out)
    }

    /// Tasks waiting in the fair-share backlogs of every lane (not yet in the lane stream), for
    /// autoscaling: the stream's consumer-group lag only shows the short window refill keeps there.
    pub async fn backlog_stats(&self) -> Result<Vec<(Lane, u64)>> {
        let mut c = self.conn.clone();
        let h: HashMap<String, i64> = c.hgetall(BACKLOG_KEY).await?;
        Ok(Lane::all()
            .into_iter()
            .map(|lane| {
                let n = h.get(&lane.to_string()).copied().unwrap_or(0).max(0) as u64;
                (lane, n)
            })
            .collect())
    }

    /// A tenant's live counters (what the quotas are checked against).
    pub async fn tenant_usage(&self, tenant: &str) -> Result<TenantUsage> {
        let mut c = self.conn.clone();
        let (queued, in_flight): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
            .arg(crate::fair::tenant_key(tenant))
            .arg("queued")
            .arg("in_flight")
            .query_async(&mut c)
            .await?;
        Ok(TenantUsage {
            queued: queued.unwrap_or(0).max(0) as u64,
            in_flight: in_flight.unwrap_or(0).max(0) as u64,
        })
    }
}
