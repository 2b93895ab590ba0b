//! Chaos suite: worker processes render jobs of two tenants (tenant-a under an in-flight quota)
//! while a driver on a fixed seed injects faults at random moments: `kill -9` of a random worker
//! (restarted under a new id), a Redis machine crash that loses its last writes (see below), an
//! S3 outage (the in-process
//! `s3s-fs` stopped for a while, then served again on the same port and data) and the cancel of
//! one job mid-run. At the end every job must be terminal with consistent counts, every done image
//! stored once with the recorded sha256, no failed image stored, the manifest complete, and every
//! counter, lane and backlog back to zero.
//!
//! Faults land at random moments measured in images done (between 2 % and 75 % of the work), so
//! they hit running jobs at any render speed: the tiny checkpoint renders 64×64 images at tens per
//! second here, so a few dozen tasks per job would be over before the first fault.
//!
//! Run with `--nocapture` for the figures. Environment (defaults small, for CI on 2 cores):
//! `PIXFARM_CHAOS_SEED` (the driver's seed), `PIXFARM_CHAOS_WORKERS` (3), `PIXFARM_CHAOS_JOBS` (4),
//! `PIXFARM_CHAOS_TASKS` (tasks per job, 100), `PIXFARM_CHAOS_STEPS` (denoising steps, 4),
//! `PIXFARM_CHAOS_KILLS` (3), `PIXFARM_CHAOS_REDIS_RESTARTS` (3), `PIXFARM_CHAOS_S3_OUTAGES` (1),
//! `PIXFARM_CHAOS_S3_OUTAGE_S` (outage length range in seconds, `lo-hi`, 20-40).
//!
//! A Redis fault is a machine crash under `appendfsync everysec`: the AOF is copied, Redis runs on
//! for 0.3-1.5 s, then it is killed and restarted from the copy, so those last writes are lost
//! (`RedisServer::crash_losing_last`). The driver does nothing else meanwhile, so only the
//! workers' writes fall in that window, never a submit or the cancel.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use pixfarm_core::EventKind;
use pixfarm_e2e::{Farm, FarmOptions, items};
use pixfarm_proto::v1 as pb;
use sha2::{Digest, Sha256};

const DEFAULT_SEED: u64 = 0x5eed_c4a0_2026;
const TENANTS: [&str; 2] = ["tenant-a", "tenant-b"];
/// The end state (all jobs terminal, manifests written, counters at zero) must be reached within
/// this after the last fault.
const END_TIMEOUT: Duration = Duration::from_secs(240);

/// xorshift64*: small, deterministic, good enough to pick moments and victims.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[(self.next() % v.len() as u64) as usize]
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("{name}={v} is not a number"))
        }
        _ => default,
    }
}

/// `lo-hi` seconds.
fn env_range(name: &str, default: (u64, u64)) -> (u64, u64) {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => {
            let (a, b) = v.trim().split_once('-').unwrap_or((v.trim(), v.trim()));
            let lo: u64 = a
                .parse()
                .unwrap_or_else(|_| panic!("{name}={v}: want lo-hi"));
            let hi: u64 = b
                .parse()
                .unwrap_or_else(|_| panic!("{name}={v}: want lo-hi"));
            (lo.min(hi), lo.max(hi))
        }
        _ => default,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillWorker,
    RestartRedis,
    S3Outage,
    CancelJob,
}

struct PlannedJob {
    tenant: &'static str,
    prefix: String,
    tasks: usize,
    id: Option<String>,
    /// The one job that the driver cancels.
    cancel_target: bool,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// GetJob, retried through outages (Redis restarts make single calls fail).
async fn get_retrying(farm: &Farm, job: &str, deadline: Instant) -> Result<pb::Job> {
    loop {
        match farm.get(job).await {
            Ok(j) => return Ok(j),
            Err(e) if Instant::now() > deadline => return Err(e.context(format!("GetJob {job}"))),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn submit(farm: &Farm, job: &mut PlannedJob, job_no: usize, steps: u32) -> Result<String> {
    let mut its = items(job.tasks, 64);
    for (i, it) in its.iter_mut().enumerate() {
        it.steps = Some(steps);
        // Distinct prompts per job so no two jobs render the same bytes by accident.
        it.prompt =
            format!("chaos job {job_no} image {i}: a small red square on a blue background");
    }
    let id = farm
        .submit(
            its,
            pb::JobSpec {
                tenant: job.tenant.into(),
                output_prefix: job.prefix.clone(),
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("submit job {job_no}"))?;
    job.id = Some(id.clone());
    Ok(id)
}

/// Whether some submitted job still has pending tasks.
async fn any_pending(farm: &Farm, plan: &[PlannedJob]) -> bool {
    for j in plan {
        if let Some(id) = &j.id
            && let Ok(job) = farm.get(id).await
            && job.pending > 0
        {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_faults_leave_every_job_consistent() -> Result<()> {
    let seed = env_u64("PIXFARM_CHAOS_SEED", DEFAULT_SEED);
    let n_workers = env_u64("PIXFARM_CHAOS_WORKERS", 3).max(1) as usize;
    let n_jobs = env_u64("PIXFARM_CHAOS_JOBS", 4).max(2) as usize;
    let tasks = env_u64("PIXFARM_CHAOS_TASKS", 100).max(1) as usize;
    let steps = env_u64("PIXFARM_CHAOS_STEPS", 4).max(1) as u32;
    let kills = env_u64("PIXFARM_CHAOS_KILLS", 3);
    let redis_restarts = env_u64("PIXFARM_CHAOS_REDIS_RESTARTS", 3);
    let s3_outages = env_u64("PIXFARM_CHAOS_S3_OUTAGES", 1);
    // 20–40 s. Uploads in flight retry through it (the workers' storage retry budget is longer);
    // the workers stop pulling meanwhile. The whole run stays well under a minute or two here.
    let (s3_lo, s3_hi) = env_range("PIXFARM_CHAOS_S3_OUTAGE_S", (20, 40));
    println!(
        "chaos: seed {seed:#x} (PIXFARM_CHAOS_SEED to replay), {n_workers} workers, {n_jobs} jobs × \
         {tasks} tasks, {steps} steps, faults: {kills} kills, {redis_restarts} Redis restarts, \
         {s3_outages} S3 outages of {s3_lo}–{s3_hi} s, 1 cancel"
    );
    let mut rng = Rng::new(seed);
    let t0 = Instant::now();

    let mut farm = Farm::start(FarmOptions {
        own_s3: true,
        redis_aof: true,
        redis_fsync_everysec: true,
        lease_base_ms: 4_000,
        max_attempts: 3,
        max_batch: 4,
        heartbeat_ms: 500,
        // tenant-a runs under an in-flight quota (half of what the workers could hold), so the
        // counters the quota reads are exercised by every fault too.
        tenants_toml: Some(format!(
            "[tenants.tenant-a]\nmax_in_flight_tasks = {}\n",
            (n_workers * 4 / 2).max(1)
        )),
        ..Default::default()
    })
    .await?;
    let mut next_worker = 0usize;
    let mut live: Vec<usize> = Vec::new();
    for _ in 0..n_workers {
        farm.spawn_worker(&format!("w{next_worker}"))?;
        next_worker += 1;
        live.push(farm.workers.len() - 1);
    }

    // The plan: jobs alternate between the tenants, all submitted at the start; one of them is
    // canceled mid-run.
    let cancel_at = rng.range(0, n_jobs as u64 - 1) as usize;
    let mut plan: Vec<PlannedJob> = (0..n_jobs)
        .map(|i| PlannedJob {
            tenant: TENANTS[i % 2],
            prefix: format!("chaos{i}"),
            tasks,
            id: None,
            cancel_target: i == cancel_at,
        })
        .collect();
    let mut faults: Vec<Fault> = std::iter::repeat_n(Fault::KillWorker, kills as usize)
        .chain(std::iter::repeat_n(
            Fault::RestartRedis,
            redis_restarts as usize,
        ))
        .chain(std::iter::repeat_n(Fault::S3Outage, s3_outages as usize))
        .collect();
    for i in (1..faults.len()).rev() {
        let j = rng.range(0, i as u64) as usize;
        faults.swap(i, j);
    }
    // The moments, in images done over all jobs (so they land mid-run at any render speed):
    // uniform between 2 % and 75 % of the work of the jobs that are not canceled.
    let work = (tasks * (n_jobs - 1)) as u64;
    let mut moments: Vec<u64> = faults
        .iter()
        .map(|_| rng.range((work / 50).max(1), (work * 3 / 4).max(1)))
        .collect();
    moments.sort();
    // The cancel comes on its own moment (between 2 % and 40 %), or when its job is half done,
    // whichever is first, in between the other faults.
    let cancel_moment = rng.range((work / 50).max(1), (work * 2 / 5).max(1));
    println!(
        "chaos: faults {faults:?} at images done {moments:?}; cancel at {cancel_moment} or half-way"
    );
    for (i, pj) in plan.iter_mut().enumerate() {
        let id = submit(&farm, pj, i, steps).await?;
        println!(
            "chaos: submitted job {i} {id} ({}, {} tasks{})",
            pj.tenant,
            pj.tasks,
            if pj.cancel_target {
                ", to be canceled"
            } else {
                ""
            }
        );
    }
    let ids: Vec<String> = plan.iter().map(|j| j.id.clone().unwrap()).collect();
    let target = &ids[cancel_at];

    let mut injected: BTreeMap<Fault, u32> = BTreeMap::new();
    let mut mid_work = 0u32;
    let mut canceled_job: Option<(String, pb::Job)> = None;
    let mut s3_down_total = Duration::ZERO;
    // One connection for the fast polling (the coordinator stays up; only Redis and S3 go down).
    let mut poll = farm.client().await?;
    for k in 0..=faults.len() {
        // Slot `faults.len()`: no fault left, only the cancel if it has not happened yet.
        let slot = faults.get(k).copied().zip(moments.get(k).copied());
        if slot.is_none() && canceled_job.is_some() {
            break;
        }
        // Wait for the moment: `moment` images done over all jobs.
        let mut last = (0u64, Instant::now());
        loop {
            let (mut done, mut pending, mut target_done, mut target_pending) = (0, 0, 0, 0);
            let mut ok = true;
            for id in &ids {
                let got = poll
                    .get_job(pb::GetJobRequest { job_id: id.clone() })
                    .await
                    .map(|r| r.into_inner());
                match got {
                    Ok(j) => {
                        done += j.done;
                        pending += j.pending;
                        if id == target {
                            (target_done, target_pending) = (j.done, j.pending);
                        }
                    }
                    Err(_) => ok = false,
                }
            }
            if ok {
                if canceled_job.is_none()
                    && target_done >= 1
                    && (done >= cancel_moment || target_done >= tasks as u64 / 2)
                {
                    ensure!(
                        target_pending > 0,
                        "the job to cancel finished first (seed {seed:#x})"
                    );
                    let at = t0.elapsed().as_secs_f64();
                    let mut c = farm.client().await?;
                    let r = c
                        .cancel_job(pb::CancelJobRequest {
                            job_id: target.clone(),
                        })
                        .await
                        .context("cancel")?
                        .into_inner()
                        .job
                        .context("cancel returned no job")?;
                    println!(
                        "chaos: [{at:6.1} s] cancel job {cancel_at} {target} ({}) at {} done of {}",
                        plan[cancel_at].tenant, r.done, r.task_count
                    );
                    ensure!(
                        r.state() == pb::JobState::Canceled,
                        "cancel of {target} left it {:?} (seed {seed:#x})",
                        r.state()
                    );
                    canceled_job = Some((target.clone(), r));
                    *injected.entry(Fault::CancelJob).or_default() += 1;
                    mid_work += 1;
                }
                let due = match slot {
                    Some((_, moment)) => done >= moment || pending == 0,
                    None => canceled_job.is_some(),
                };
                if due {
                    break;
                }
                if done > last.0 {
                    last = (done, Instant::now());
                }
            }
            ensure!(
                last.1.elapsed() < Duration::from_secs(120),
                "no image recorded for 120 s before fault {k} ({slot:?}; seed {seed:#x})\n{}",
                farm.worker_logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let Some((fault, _)) = slot else { break };
        let busy = any_pending(&farm, &plan).await;
        let at = t0.elapsed().as_secs_f64();
        match fault {
            Fault::KillWorker => {
                // A worker that holds tasks, if one does within a few seconds.
                let deadline = Instant::now() + Duration::from_secs(5);
                let holders = loop {
                    let mut h = Vec::new();
                    for &i in &live {
                        if farm.held_by(&farm.workers[i].id).await.unwrap_or(0) > 0 {
                            h.push(i);
                        }
                    }
                    if !h.is_empty() || Instant::now() > deadline {
                        break h;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                };
                let victim = if holders.is_empty() {
                    rng.pick(&live)
                } else {
                    rng.pick(&holders)
                };
                let held = farm.held_by(&farm.workers[victim].id).await.unwrap_or(0);
                farm.workers[victim].kill9()?;
                live.retain(|&i| i != victim);
                let id = format!("w{next_worker}");
                next_worker += 1;
                println!(
                    "chaos: [{at:6.1} s] fault {k}: kill -9 {} (holding {held}), restarted as {id}",
                    farm.workers[victim].id
                );
                farm.spawn_worker(&id)?;
                live.push(farm.workers.len() - 1);
            }
            Fault::RestartRedis => {
                // A machine crash under `appendfsync everysec`: what Redis did in the last
                // 0.3-1.5 s is gone (deliveries, records, acknowledgements, counter updates).
                let lost = rng.ms(300, 1_500);
                farm.redis
                    .crash_losing_last(lost)
                    .await
                    .context("crash and restart Redis")?;
                println!(
                    "chaos: [{at:6.1} s] fault {k}: Redis crashed, its last {:.1} s of writes lost, started again (AOF everysec)",
                    lost.as_secs_f64()
                );
            }
            Fault::S3Outage => {
                let down = Duration::from_secs(rng.range(s3_lo, s3_hi));
                farm.s3.stop();
                println!(
                    "chaos: [{at:6.1} s] fault {k}: S3 stopped for {} s",
                    down.as_secs()
                );
                // Kills can land during the outage too (a worker dying while it cannot store).
                let mid = rng.ms(0, down.as_millis() as u64);
                tokio::time::sleep(mid).await;
                if rng.range(0, 1) == 0 {
                    let victim = rng.pick(&live);
                    let held = farm.held_by(&farm.workers[victim].id).await.unwrap_or(0);
                    farm.workers[victim].kill9()?;
                    live.retain(|&i| i != victim);
                    let id = format!("w{next_worker}");
                    next_worker += 1;
                    println!(
                        "chaos: [{:6.1} s]   during the outage: kill -9 {} (holding {held}), restarted as {id}",
                        t0.elapsed().as_secs_f64(),
                        farm.workers[victim].id
                    );
                    farm.spawn_worker(&id)?;
                    live.push(farm.workers.len() - 1);
                    *injected.entry(Fault::KillWorker).or_default() += 1;
                }
                tokio::time::sleep(down - mid).await;
                farm.s3.start_again().await.context("serve S3 again")?;
                s3_down_total += down;
                println!(
                    "chaos: [{:6.1} s]   S3 served again",
                    t0.elapsed().as_secs_f64()
                );
            }
            Fault::CancelJob => unreachable!("the cancel is not in the fault list"),
        }
        *injected.entry(fault).or_default() += 1;
        if busy {
            mid_work += 1;
        }
    }
    let t_faults = t0.elapsed();

    // End state 1: every job terminal, its manifest written.
    let deadline = Instant::now() + END_TIMEOUT;
    let mut jobs: Vec<pb::Job> = Vec::new();
    for pj in &plan {
        let id = pj.id.clone().context("a job was never submitted")?;
        let j = loop {
            let j = get_retrying(&farm, &id, deadline).await?;
            if pixfarm::client::is_terminal(j.state) && !j.manifest_pending {
                break j;
            }
            if Instant::now() > deadline {
                bail!(
                    "job {id} ({}) not settled after {END_TIMEOUT:?}: state {}, done {} failed {} \
                     canceled {} of {}, manifest_pending {}\n{}",
                    pj.tenant,
                    pixfarm::client::state_name(j.state),
                    j.done,
                    j.failed,
                    j.canceled,
                    j.task_count,
                    j.manifest_pending,
                    farm.worker_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        jobs.push(j);
    }
    let t_settled = t0.elapsed();

    // End state 2: counters, lanes and backlogs at zero (canceled tasks still in a stream are
    // dropped when a worker pulls them, so give them a moment).
    let mut redis_conn = redis::Client::open(farm.redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    let zero_deadline = Instant::now() + Duration::from_secs(60);
    let counters = loop {
        let mut report = Vec::new();
        let mut clean = true;
        for t in TENANTS {
            let u = farm.queue.tenant_usage(t).await?;
            // Raw values too: tenant_usage clamps negative counters to zero.
            let (q, f): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
                .arg(format!("pf:tenant:{t}"))
                .arg("queued")
                .arg("in_flight")
                .query_async(&mut redis_conn)
                .await?;
            clean &=
                u.queued == 0 && u.in_flight == 0 && q.unwrap_or(0) == 0 && f.unwrap_or(0) == 0;
            report.push(format!(
                "{t}: queued {} in_flight {} (raw {q:?}/{f:?})",
                u.queued, u.in_flight
            ));
        }
        for s in farm.queue.lane_stats().await? {
            clean &= s.pending == 0 && s.length == 0;
            if s.pending != 0 || s.length != 0 {
                report.push(format!(
                    "lane {}: length {} pending {}",
                    s.lane, s.length, s.pending
                ));
            }
        }
        for (lane, n) in farm.queue.backlog_stats().await? {
            clean &= n == 0;
            if n != 0 {
                report.push(format!("backlog {lane}: {n}"));
            }
        }
        let raw_backlog: BTreeMap<String, i64> = redis::cmd("HGETALL")
            .arg(pixfarm_core::fair::BACKLOG_KEY)
            .query_async(&mut redis_conn)
            .await?;
        if raw_backlog.values().any(|&v| v != 0) {
            clean = false;
            report.push(format!("raw backlog hash {raw_backlog:?}"));
        }
        if clean {
            break report;
        }
        if Instant::now() > zero_deadline {
            bail!(
                "counters not back to zero 60 s after every job settled (seed {seed:#x}): {}\n{}",
                report.join("; "),
                farm.worker_logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    // End state 3: per job, counts, stored objects and their hashes, the manifest.
    let mut total_tasks = 0u64;
    let mut by_state: BTreeMap<String, u32> = BTreeMap::new();
    let (mut retries_events, mut redelivered, mut extra_attempts) = (0u64, 0u64, 0u64);
    let (mut done_all, mut failed_all, mut canceled_all) = (0u64, 0u64, 0u64);
    for (pj, j) in plan.iter().zip(&jobs) {
        let id = &j.id;
        let ctx = format!(
            "job {id} ({}, prefix {}, seed {seed:#x})",
            pj.tenant, pj.prefix
        );
        total_tasks += j.task_count;
        *by_state
            .entry(pixfarm::client::state_name(j.state).to_string())
            .or_default() += 1;
        ensure!(
            j.task_count == pj.tasks as u64,
            "{ctx}: task_count {} != {} submitted",
            j.task_count,
            pj.tasks
        );
        ensure!(
            j.done + j.failed + j.canceled == j.task_count,
            "{ctx}: done {} + failed {} + canceled {} != tasks {}",
            j.done,
            j.failed,
            j.canceled,
            j.task_count
        );
        ensure!(j.pending == 0, "{ctx}: {} pending at the end", j.pending);
        if pj.cancel_target {
            ensure!(
                j.state() == pb::JobState::Canceled,
                "{ctx}: the canceled job ended {:?}",
                j.state()
            );
            let (_, at_cancel) = canceled_job.as_ref().context("cancel never happened")?;
            ensure!(
                j.done >= at_cancel.done,
                "{ctx}: done fell from {} at the cancel to {}",
                at_cancel.done,
                j.done
            );
        } else {
            ensure!(
                j.canceled == 0,
                "{ctx}: {} tasks canceled in a job nobody canceled",
                j.canceled
            );
        }
        done_all += j.done;
        failed_all += j.failed;
        canceled_all += j.canceled;

        let results = farm.results(id).await.with_context(|| ctx.clone())?;
        let mut seen = BTreeSet::new();
        for r in &results {
            ensure!(
                seen.insert(r.index),
                "{ctx}: index {} has two results",
                r.index
            );
            ensure!(
                r.index < j.task_count,
                "{ctx}: result for index {} of {}",
                r.index,
                j.task_count
            );
        }
        let done: Vec<&pb::Result> = results.iter().filter(|r| r.succeeded).collect();
        let failed: Vec<&pb::Result> = results.iter().filter(|r| !r.succeeded).collect();
        ensure!(
            done.len() as u64 == j.done,
            "{ctx}: {} done results, job says {}",
            done.len(),
            j.done
        );
        ensure!(
            failed.len() as u64 == j.failed,
            "{ctx}: {} failed results, job says {}",
            failed.len(),
            j.failed
        );
        for r in &results {
            if r.attempts > 1 {
                redelivered += 1;
                extra_attempts += u64::from(r.attempts - 1);
            }
        }

        // Stored objects: exactly the done images, each with its recorded sha256.
        let prefix = pixfarm_core::object_prefix(pj.tenant, &pj.prefix);
        let dir = format!("{prefix}/{id}/");
        let keys = farm.s3_keys(&dir).await.with_context(|| ctx.clone())?;
        let pngs: BTreeSet<String> = keys
            .iter()
            .filter(|k| k.ends_with(".png") && !k.ends_with(".control.png"))
            .cloned()
            .collect();
        let expected: BTreeSet<String> = done
            .iter()
            .map(|r| format!("{dir}{:06}.png", r.index))
            .collect();
        for r in &failed {
            let k = format!("{dir}{:06}.png", r.index);
            ensure!(
                !pngs.contains(&k),
                "{ctx}: image {} is reported failed ({}) but {k} is stored",
                r.index,
                r.error
            );
        }
        let missing: Vec<_> = expected.difference(&pngs).collect();
        let extra: Vec<_> = pngs.difference(&expected).collect();
        ensure!(
            missing.is_empty() && extra.is_empty(),
            "{ctx}: stored images differ from the done results: missing {missing:?}, not recorded \
             {extra:?} ({} stored, {} done)",
            pngs.len(),
            done.len()
        );
        for r in &done {
            ensure!(
                r.key == format!("{dir}{:06}.png", r.index),
                "{ctx}: image {} recorded at {}",
                r.index,
                r.key
            );
            let bytes = farm
                .storage
                .get(&r.key)
                .await
                .with_context(|| format!("{ctx}: get {}", r.key))?;
            let got = hex(&Sha256::digest(&bytes));
            ensure!(
                got == r.sha256,
                "{ctx}: {} stored with sha256 {got}, recorded {} (worker {}, attempts {})",
                r.key,
                r.sha256,
                r.worker,
                r.attempts
            );
        }

        // The manifest: one line per recorded result, same index set, same hashes.
        ensure!(
            !j.manifest_key.is_empty(),
            "{ctx}: no manifest key although manifest_pending is false"
        );
        ensure!(
            j.manifest_key == format!("{dir}manifest.jsonl"),
            "{ctx}: manifest at {}",
            j.manifest_key
        );
        let text = String::from_utf8(farm.storage.get(&j.manifest_key).await?.to_vec())?;
        let by_index: BTreeMap<u64, &pb::Result> = results.iter().map(|r| (r.index, r)).collect();
        let mut lines = BTreeSet::new();
        let mut n_lines = 0usize;
        for l in text.lines() {
            n_lines += 1;
            let v: serde_json::Value = serde_json::from_str(l).with_context(|| ctx.clone())?;
            let i = v["index"].as_u64().context("manifest line without index")?;
            ensure!(lines.insert(i), "{ctx}: the manifest has index {i} twice");
            let r = by_index
                .get(&i)
                .with_context(|| format!("{ctx}: manifest line for index {i} without a result"))?;
            if r.succeeded {
                ensure!(
                    v["sha256"].as_str() == Some(r.sha256.as_str()),
                    "{ctx}: manifest sha256 of {i} is {}, recorded {}",
                    v["sha256"],
                    r.sha256
                );
            }
        }
        ensure!(
            n_lines == results.len(),
            "{ctx}: manifest has {n_lines} lines, {} results recorded",
            results.len()
        );

        // The harness's own exactly-once check (ItemDone at most once per index, …).
        farm.check_exactly_once(j)
            .await
            .with_context(|| ctx.clone())?;

        for e in farm.events(id).await? {
            if let EventKind::ItemFailed {
                will_retry: true, ..
            } = e.kind
            {
                retries_events += 1;
            }
        }
        println!(
            "chaos: job {id} ({}, {}): {} — done {} failed {} canceled {} of {}, {} objects, \
             manifest {} lines",
            pj.tenant,
            pj.prefix,
            pixfarm::client::state_name(j.state),
            j.done,
            j.failed,
            j.canceled,
            j.task_count,
            pngs.len(),
            n_lines
        );
    }

    let mut deferred = 0usize;
    for w in &farm.workers {
        let log = std::fs::read_to_string(&w.log).unwrap_or_default();
        deferred += log.matches("task deferred").count();
    }
    let wall = t0.elapsed();
    println!(
        "chaos: seed {seed:#x}; faults injected {injected:?} ({mid_work} of {} with work pending), \
         S3 down {:.0} s in all; {} workers started; {} jobs {by_state:?}; {total_tasks} tasks: \
         {done_all} done, {failed_all} failed, {canceled_all} canceled; retries: {retries_events} \
         item_failed will_retry events, {redelivered} results with attempts > 1 ({extra_attempts} \
         extra attempts), {deferred} deferrals logged; faults over at {:.1} s, jobs settled at \
         {:.1} s, wall {:.1} s; end counters {}",
        injected.values().sum::<u32>(),
        s3_down_total.as_secs_f64(),
        next_worker,
        jobs.len(),
        t_faults.as_secs_f64(),
        t_settled.as_secs_f64(),
        wall.as_secs_f64(),
        counters.join("; ")
    );
    drop(farm.workers.drain(..));
    farm.shutdown().await.context("coordinator shutdown")
}
