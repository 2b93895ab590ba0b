//! Submit: validation, admission (quota and rate), the job record and its tasks into the
//! fair-share backlog, idempotent retries. Scripts: `stage.lua`, `submit.lua`.

use super::*;

impl Queue {
    /// Validates and enqueues a job: one task per image. Nothing is written for an invalid job.
    /// A submit is all or nothing as a user sees it: a job bigger than one chunk is staged chunk
    /// by chunk where nobody can see it and committed by one script with the last chunk, the
    /// idempotency key is set by that same script, and a submit that fails anywhere before the
    /// commit leaves no job and no key (staged chunks expire). With an idempotency key, a repeated
    /// submit of the same spec returns the first job (`created: false`); the same key with a
    /// different spec is a `Conflict`. A tenant over its `max_queued_tasks` quota or its submit
    /// rate gets `QuotaExceeded` (with a retry hint for the rate). Tasks go to the job's
    /// fair-share backlog and reach the lane streams through the refill (see [`crate::fair`]).
    #[instrument(skip_all, fields(tenant = %spec.tenant, items = spec.items.len()))]
    pub async fn submit(&self, mut spec: JobSpec) -> Result<Submitted> {
        validate_job(&spec, &self.config.limits).map_err(CoreError::Invalid)?;
        let digest = spec_digest(&spec);
        let job = JobId::new();
        let total = spec.total_images();
        let mut c = self.conn.clone();
        let idem = spec
            .idempotency_key
            .as_deref()
            .map(|key| (key.to_string(), idem_key(&spec.tenant, key)));

        // A retry of a committed submit needs no staging: answer from the key at once. The commit
        // script checks again, atomically, for a submit racing this one.
        if let Some((key, ik)) = &idem {
            let existing: Option<String> = c.get(ik).await?;
            if let Some(existing) = existing {
                return existing_job(key, &existing, &digest, total);
            }
        }

        assign_seeds(&mut spec);
        let tasks = expand(&job, &spec, &self.config.lease);
        let now = now_ms();
        let jk = job_key(&job);
        let labels =
            serde_json::to_string(&spec.labels).map_err(|e| CoreError::corrupt("labels", e))?;
        let fair = &self.config.fair;
        let chunk = self.config.enqueue_chunk.max(1);
        let parts: Vec<&[TaskSpec]> = if tasks.is_empty() {
            vec![&tasks[..0]]
        } else {
            tasks.chunks(chunk).collect()
        };
        let (last, staged_parts) = parts.split_last().expect("at least one part");

        // Every chunk but the last is staged (invisible until the commit adopts it).
        let stage_ttl = STAGE_TTL.as_secs();
        let mut staged: BTreeMap<String, u64> = BTreeMap::new();
        for part in staged_parts {
            let sections = backlog_sections(part, spec.priority, now)?;
            let mut inv = self.scripts.stage.prepare_invoke();
            inv.key(&jk).arg(job.as_str()).arg(stage_ttl);
            push_sections(&mut inv, &sections);
            let _: i64 = inv.invoke_async(&mut c).await?;
            for (lane, entries) in &sections {
                *staged.entry(lane.clone()).or_default() += entries.len() as u64;
            }
        }

        let quota = self.config.fair.quotas.for_tenant(&spec.tenant);
        let ev = event_json(&EventKind::Queued { total })?;
        let fields: Vec<(&str, String)> = vec![
            ("id", job.to_string()),
            ("tenant", spec.tenant.clone()),
            ("state", JobState::Queued.as_str().to_string()),
            ("priority", spec.priority.as_str().to_string()),
            ("prefix", spec.output_prefix.clone()),
            ("labels", labels),
            ("idem", spec.idempotency_key.clone().unwrap_or_default()),
            ("digest", digest.clone()),
            ("items", spec.items.len().to_string()),
            ("total", total.to_string()),
            ("succeeded", "0".into()),
            ("failed", "0".into()),
            ("canceled", "0".into()),
            ("created_ms", now.to_string()),
        ];
        let idem_value = idem
            .as_ref()
            .map(|_| format!("{job} {digest}"))
            .unwrap_or_default();
        let sections = backlog_sections(last, spec.priority, now)?;
        let mut inv = self.scripts.submit.prepare_invoke();
        inv.key(&jk)
            .key(controls_key(&job))
            .key(events_key(&job))
            .key(crate::fair::tenant_key(&spec.tenant))
            .key(crate::fair::rate_key(&spec.tenant))
            .key(JOBS_KEY)
            .key(tenant_jobs_key(&spec.tenant))
            .key(idem_key(
                &spec.tenant,
                spec.idempotency_key.as_deref().unwrap_or(""),
            ))
            .arg(job.as_str())
            .arg(&spec.tenant)
            .arg(now)
            .arg(self.config.events_maxlen)
            .arg(&ev)
            .arg(total)
            .arg(quota.max_queued_tasks.unwrap_or(0))
            .arg(quota.max_in_flight_tasks.unwrap_or(0))
            .arg(quota.submit_rate.unwrap_or(0.0))
            .arg(quota.submit_burst.unwrap_or(1))
            .arg(&idem_value)
            .arg(fair.stream_target)
            .arg(fair.quantum)
            .arg(self.config.idempotency_ttl.as_secs().max(1))
            .arg(staged.len());
        for (lane, n) in &staged {
            inv.arg(lane).arg(*n);
        }
        inv.arg(fields.len() * 2);
        for (k, v) in &fields {
            inv.arg(*k).arg(v);
        }
        let controls: Vec<(usize, &[u8])> = spec
            .items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| match &item.control {
                Some(crate::model::ControlSpec {
                    source: crate::model::ControlSource::Inline(b),
                    ..
                }) => Some((i, b.as_slice())),
                _ => None,
            })
            .collect();
        inv.arg(controls.len() * 2);
        for (i, b) in controls {
            inv.arg(i).arg(b);
        }
        push_sections(&mut inv, &sections);
        let reply: Vec<Value> = inv.invoke_async(&mut c).await?;
        let text = |i: usize| {
            reply
                .get(i)
                .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                .unwrap_or_default()
        };
        match text(0).as_str() {
            "exists" => {
                let (key, _) = idem.as_ref().expect("exists only with a key");
                return existing_job(key, &text(1), &digest, total);
            }
            "stage" => {
                return Err(CoreError::Unavailable(format!(
                    "a staged chunk of the submit (lane {}) was lost before the commit; nothing \
                     was created, submit again",
                    text(1)
                )));
            }
            _ => admit(&spec.tenant, total, &quota, &reply)?,
        }
        info!(job = %job, total, "job enqueued");
        Ok(Submitted {
            job,
            created: true,
            total,
        })
    }
}

/// How long staged chunks of a big submit live without their commit.
const STAGE_TTL: Duration = Duration::from_secs(24 * 3600);

/// The answer for a submit whose idempotency key already names a job.
fn existing_job(key: &str, existing: &str, digest: &str, total: u64) -> Result<Submitted> {
    let (id, d) = existing.split_once(' ').unwrap_or((existing, ""));
    if d != digest {
        return Err(CoreError::Conflict(format!(
            "idempotency key `{key}` was used for a different job ({id})"
        )));
    }
    let id = JobId(id.to_string());
    info!(job = %id, "idempotent resubmit, returning the existing job");
    Ok(Submitted {
        job: id,
        created: false,
        total,
    })
}

/// Backlog entries of one submit chunk, grouped by lane in index order: `(lane name, entries)`,
/// each entry `"<lease_ms> <task JSON>"` (the lease travels separately into the stream entry).
fn backlog_sections(
    part: &[TaskSpec],
    priority: Priority,
    now: u64,
) -> Result<Vec<(String, Vec<String>)>> {
    let mut by_lane: BTreeMap<Lane, Vec<String>> = BTreeMap::new();
    for t in part {
        let mut t = t.clone();
        t.submitted_ms = now;
        let json = serde_json::to_string(&t).map_err(|e| CoreError::corrupt("task", e))?;
        by_lane
            .entry(Lane::new(priority, t.variant()))
            .or_default()
            .push(format!("{} {json}", t.lease_ms));
    }
    Ok(by_lane
        .into_iter()
        .map(|(lane, v)| (lane.to_string(), v))
        .collect())
}

fn push_sections(inv: &mut redis::ScriptInvocation<'_>, sections: &[(String, Vec<String>)]) {
    inv.arg(sections.len());
    for (lane, entries) in sections {
        inv.arg(lane).arg(entries.len());
        for e in entries {
            inv.arg(e);
        }
    }
}

/// Turns the submit script's admission verdict into `Ok` or a `QuotaExceeded` naming the quota
/// and the numbers.
fn admit(tenant: &str, total: u64, quota: &TenantQuota, reply: &[Value]) -> Result<()> {
    let text = |i: usize| {
        reply
            .get(i)
            .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
            .unwrap_or_default()
    };
    let num = |i: usize| {
        reply
            .get(i)
            .and_then(|v| redis::from_redis_value_ref::<i64>(v).ok())
            .unwrap_or(0)
            .max(0) as u64
    };
    match text(0).as_str() {
        "ok" => Ok(()),
        "queued" => {
            let (queued, limit) = (num(1), num(2));
            Err(CoreError::QuotaExceeded(Box::new(QuotaExceeded {
                tenant: tenant.to_string(),
                quota: QuotaKind::MaxQueuedTasks,
                message: format!(
                    "tenant `{tenant}` has {queued} tasks queued; {total} more would exceed its \
                     max_queued_tasks quota of {limit} (wait for tasks to finish, or cancel some)"
                ),
                retry_after: None,
            })))
        }
        "rate" => {
            let wait = Duration::from_millis(num(1).max(1));
            let rate = quota.submit_rate.unwrap_or(0.0);
            let burst = quota.submit_burst.unwrap_or(1);
            Err(CoreError::QuotaExceeded(Box::new(QuotaExceeded {
                tenant: tenant.to_string(),
                quota: QuotaKind::SubmitRate,
                message: format!(
                    "tenant `{tenant}` is over its submit_rate quota of {rate} jobs/s \
                     (burst {burst}); retry after {} ms",
                    wait.as_millis()
                ),
                retry_after: Some(wait),
            })))
        }
        other => Err(CoreError::corrupt("submit script reply", other)),
    }
}

/// Digest of a spec as submitted (before random seeds are assigned), to tell an idempotent retry
/// from a key reused for another job.
fn spec_digest(spec: &JobSpec) -> String {
    let mut h = Sha256::new();
    // serde_json of a derive-Serialize struct with BTreeMap labels is deterministic.
    h.update(serde_json::to_vec(spec).unwrap_or_default());
    hex::encode(&h.finalize()[..16])
}
