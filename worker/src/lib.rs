//! # pixfarm-worker
//!
//! A render worker: pulls task batches from the Redis queue, groups compatible tasks (size, steps,
//! control), renders each group as one batched PixArt-LCM call on the engine thread, encodes and
//! uploads the PNGs while the next group renders, records results (sha256, worker, timings) and
//! acknowledges. Heartbeats extend the leases of everything it holds; cancel is honoured before a
//! group starts and between denoising steps; a failing task fails with its reason (retried, then
//! dead-lettered) and never takes the worker down. The shutdown future starts a drain: stop
//! pulling, finish the batch, upload, acknowledge, return.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use pixfarm_worker::{WorkerConfig, run};
//! let config = WorkerConfig {
//!     redis_url: "redis://127.0.0.1:6379/".into(),
//!     storage_url: "file:///tmp/pixfarm/results".into(),
//!     ..WorkerConfig::default()
//! };
//! run(config, async { tokio::signal::ctrl_c().await.ok(); }).await?;
//! # Ok(()) }
//! ```

pub mod config;
pub mod engine;
pub mod grouping;
pub mod metrics;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pixart::pipeline::{
    ModelSource, PipelineOptions, RenderItem, RenderRequest, StepProgress, TimestepSpacing,
};
use pixfarm_core::{
    ControlRef, CoreError, Failed, JobId, PutNew, Queue, Recorded, Storage, Task, TaskResult,
    Timings, WorkerInfo, WorkerState,
};
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, error, info, info_span, warn};

pub use config::{ConfigError, WorkerConfig};
pub use engine::Engine;
pub use grouping::group_tasks;

/// Why the worker could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot load the model from {dir}: {source}")]
    Model { dir: String, source: pixart::Error },
    #[error("cannot open the device: {0}")]
    Device(String),
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("the engine thread stopped unexpectedly")]
    EngineStopped,
    #[error(
        "a render ran past its watchdog deadline (the device may be hung); its tasks were given back for a retry elsewhere"
    )]
    EngineHung,
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
}

/// Tasks this worker holds (pulled, not yet acknowledged): the heartbeat extends their leases,
/// but only until each one's watchdog deadline. A task still held past it (a hung device, an
/// upload task that died) is dropped from the heartbeat, so its lease runs out and another worker
/// takes it over, instead of being held forever.
#[derive(Default)]
struct Held {
    tasks: HashMap<String, (Task, Option<Instant>)>,
}

impl Held {
    /// Removes and returns the tasks whose deadline passed at `now`.
    fn take_overdue(&mut self, now: Instant) -> Vec<Task> {
        let overdue: Vec<String> = self
            .tasks
            .iter()
            .filter(|(_, (_, d))| d.is_some_and(|d| d <= now))
            .map(|(id, _)| id.clone())
            .collect();
        overdue
            .into_iter()
            .filter_map(|id| self.tasks.remove(&id).map(|(t, _)| t))
            .collect()
    }
}

struct Shared {
    queue: Queue,
    storage: Storage,
    worker_id: String,
    held: Mutex<Held>,
    info: Mutex<WorkerInfo>,
    step_events: bool,
    config: WorkerConfig,
    tenants: pixfarm_core::TenantQuotas,
    /// Set while uploads fail for storage reasons: the worker stops pulling until a probe of the
    /// store succeeds, so an outage delays work instead of cycling tasks through failures.
    storage_down: AtomicBool,
    /// Set when the watchdog gave up on a render: the worker exits so it can be restarted.
    engine_hung: AtomicBool,
}

impl Shared {
    async fn hold(&self, tasks: &[Task]) {
        let leases: Vec<u64> = tasks.iter().map(|t| t.spec.lease_ms).collect();
        let deadline = self
            .config
            .watchdog_deadline(&leases)
            .map(|d| Instant::now() + d);
        let mut h = self.held.lock().await;
        for t in tasks {
            h.tasks.insert(t.entry_id.clone(), (t.clone(), deadline));
        }
        metrics::tasks_in_flight(h.tasks.len());
    }

    async fn release(&self, tasks: &[Task]) {
        let mut h = self.held.lock().await;
        for t in tasks {
            h.tasks.remove(&t.entry_id);
        }
        metrics::tasks_in_flight(h.tasks.len());
    }

    /// Whether `task` is still held by this worker (not lost to another, not past its deadline).
    async fn holds(&self, task: &Task) -> bool {
        self.held.lock().await.tasks.contains_key(&task.entry_id)
    }

    async fn set_state(&self, state: WorkerState, batch: usize) {
        let mut i = self.info.lock().await;
        i.state = state;
        i.current_batch = batch as u32;
    }
}

/// Runs a worker until `shutdown` resolves, then drains and returns.
pub async fn run(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    config.validate()?;
    // A worker with a ControlNet adapter also serves the control lane of each priority it serves.
    let mut config = config;
    config.lanes = config.lanes_served();
    let worker_id = config.resolved_worker_id();
    let device_spec = config.parse_device()?;
    let device = device_spec
        .open()
        .map_err(|e| WorkerError::Device(format!("{}: {e}", device_spec.describe())))?;
    let dtype = config.parse_dtype()?.unwrap_or(if device.is_cpu() {
        candle_core::DType::F32
    } else {
        candle_core::DType::BF16
    });
    info!(worker = %worker_id, device = %device_spec.describe(), ?dtype, lanes = ?config.lanes, "starting worker");

    // Up before the model loads, so a slow load is visible as a live endpoint with no tasks.
    let _metrics = match config.metrics_addr {
        Some(addr) => Some(metrics::start(addr, &worker_id, device_spec).await?),
        None => None,
    };
    let queue = Queue::connect(&config.redis_url, config.queue_config()).await?;
    let storage = Storage::open(&config.storage_url).await?;
    let started = Instant::now();
    let engine = Engine::start(
        ModelSource::Dir(config.model_dir.clone()),
        PipelineOptions {
            device,
            dtype,
            offload_text_encoder: config.offload_text_encoder,
            timestep_spacing: TimestepSpacing::default(),
            controlnet: config.controlnet_dir.clone(),
        },
        config.hed_weights.clone(),
    )
    .await
    .map_err(|source| WorkerError::Model {
        dir: config.model_dir.display().to_string(),
        source,
    })?;

    let info = WorkerInfo {
        id: worker_id.clone(),
        host: config::hostname(),
        device: device_spec.describe(),
        model: config.model_dir.display().to_string(),
        state: WorkerState::Idle,
        lanes: config.lanes.clone(),
        current_batch: 0,
        images_per_sec: 0.0,
        images_done: 0,
        started_ms: pixfarm_core::now_ms(),
        last_heartbeat_ms: 0,
    };
    queue.register_worker(&info).await?;
    info!(worker = %worker_id, storage = %storage.describe(), ready_ms = started.elapsed().as_millis() as u64, "worker ready");

    let tenants = config.tenants()?;
    let shared = Arc::new(Shared {
        queue,
        storage,
        worker_id: worker_id.clone(),
        held: Mutex::new(Held::default()),
        info: Mutex::new(info),
        step_events: config.step_events,
        config: config.clone(),
        tenants,
        storage_down: AtomicBool::new(false),
        engine_hung: AtomicBool::new(false),
    });

    let draining = Arc::new(AtomicBool::new(false));
    {
        let draining = draining.clone();
        tokio::spawn(async move {
            shutdown.await;
            info!("shutdown requested: draining (finishing the current batch)");
            metrics::draining();
            draining.store(true, Ordering::SeqCst);
        });
    }
    let heartbeat = tokio::spawn(heartbeat_loop(
        shared.clone(),
        Duration::from_millis(config.heartbeat_ms),
    ));

    let uploads = Arc::new(Semaphore::new(config.upload_depth.max(1)));
    let mut in_flight: JoinSet<()> = JoinSet::new();
    let mut backoff = Duration::from_millis(100);
    let poll = Duration::from_millis(config.poll_ms);

    let mut engine_stopped = false;
    while !draining.load(Ordering::SeqCst) {
        while in_flight.try_join_next().is_some() {}
        if shared.storage_down.load(Ordering::SeqCst) {
            wait_for_storage(&shared, &draining).await;
            continue;
        }
        let tasks = match shared
            .queue
            .pull(&worker_id, &config.lanes, config.max_batch, poll)
            .await
        {
            Ok(t) => {
                backoff = Duration::from_millis(100);
                t
            }
            Err(e) => {
                metrics::pull_error();
                warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "pull failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if tasks.is_empty() {
            shared.set_state(WorkerState::Idle, 0).await;
            continue;
        }
        let picked_ms = pixfarm_core::now_ms();
        shared.hold(&tasks).await;
        shared.set_state(WorkerState::Busy, tasks.len()).await;
        let span = info_span!("batch", worker = %worker_id, tasks = tasks.len());
        async {
            for group in group_tasks(tasks, config.max_batch) {
                render_group(&shared, &engine, group, picked_ms, &uploads, &mut in_flight).await;
            }
        }
        .instrument(span)
        .await;
        if engine.is_stopped() {
            error!("the engine thread stopped; exiting so the worker can be restarted");
            engine_stopped = true;
            break;
        }
        if shared.engine_hung.load(Ordering::SeqCst) {
            error!("the render watchdog fired; exiting so the worker can be restarted");
            break;
        }
    }

    shared.set_state(WorkerState::Draining, 0).await;
    while in_flight.join_next().await.is_some() {}
    heartbeat.abort();
    let _ = shared.queue.deregister_worker(&worker_id).await;
    let _ = shared
        .queue
        .remove_consumer(&worker_id, &config.lanes)
        .await;
    if shared.engine_hung.load(Ordering::SeqCst) {
        // The engine thread may never return: do not wait for it.
        std::mem::forget(engine);
        return Err(WorkerError::EngineHung);
    }
    drop(engine);
    if engine_stopped {
        return Err(WorkerError::EngineStopped);
    }
    info!(worker = %worker_id, "worker stopped");
    Ok(())
}

/// Extends the leases of held tasks (until their watchdog deadline), refreshes the registry entry
/// and, every few beats, writes manifests that are due and were left behind (their finisher died,
/// or the write failed).
async fn heartbeat_loop(shared: Arc<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let sweep_every = (MANIFEST_SWEEP.as_millis() / every.as_millis().max(1)).max(1) as u64;
    let mut beat: u64 = 0;
    loop {
        tick.tick().await;
        beat += 1;
        let overdue = shared.held.lock().await.take_overdue(Instant::now());
        for t in &overdue {
            error!(job = %t.spec.job, index = t.spec.index, "task held past its watchdog deadline (hung render or a lost upload): no longer extending its lease, another worker will take it over");
        }
        if !overdue.is_empty() {
            metrics::tasks_in_flight(shared.held.lock().await.tasks.len());
        }
        let tasks: Vec<Task> = shared
            .held
            .lock()
            .await
            .tasks
            .values()
            .map(|(t, _)| t.clone())
            .collect();
        if !tasks.is_empty() {
            match shared.queue.extend_leases(&shared.worker_id, &tasks).await {
                Ok(flags) => {
                    let mut h = shared.held.lock().await;
                    for (t, ok) in tasks.iter().zip(flags) {
                        if !ok && h.tasks.remove(&t.entry_id).is_some() {
                            warn!(job = %t.spec.job, index = t.spec.index, "lease lost to another worker");
                        }
                    }
                }
                Err(e) => warn!(error = %e, "lease heartbeat failed"),
            }
        }
        let info = shared.info.lock().await.clone();
        if let Err(e) = shared.queue.heartbeat_worker(&info).await {
            warn!(error = %e, "registry heartbeat failed");
        }
        if beat.is_multiple_of(sweep_every) && !shared.storage_down.load(Ordering::SeqCst) {
            match shared
                .queue
                .sweep_manifests(&shared.storage, MANIFEST_GRACE, 16)
                .await
            {
                Ok(0) => {}
                Ok(n) => info!(manifests = n, "wrote manifests left due"),
                Err(e) => debug!(error = %e, "manifest sweep failed"),
            }
        }
    }
}

/// How often each worker looks for manifests left due.
const MANIFEST_SWEEP: Duration = Duration::from_secs(5);
/// How long a finisher has to write its own manifest before sweepers do.
const MANIFEST_GRACE: Duration = Duration::from_secs(10);

/// Waits (probing the store with back-off) until storage answers again, or a drain starts.
async fn wait_for_storage(shared: &Shared, draining: &AtomicBool) {
    let mut delay = Duration::from_millis(500);
    shared.set_state(WorkerState::Idle, 0).await;
    while !draining.load(Ordering::SeqCst) {
        match shared.storage.exists(".pixfarm-probe").await {
            Ok(_) => {
                info!("storage answers again: pulling resumes");
                shared.storage_down.store(false, Ordering::SeqCst);
                return;
            }
            Err(e) => {
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "storage still down: not pulling");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Renders one group, then hands the outputs to an upload task (bounded by `uploads`) so the next
/// group can render meanwhile.
async fn render_group(
    shared: &Arc<Shared>,
    engine: &Engine,
    group: Vec<Task>,
    picked_ms: u64,
    uploads: &Arc<Semaphore>,
    in_flight: &mut JoinSet<()>,
) {
    let q = &shared.queue;
    // Cancel honoured before the group starts.
    let jobs = unique_jobs(&group);
    let group = match q.is_cancelled(&jobs).await {
        Ok(c) if !c.is_empty() => {
            let (drop, keep): (Vec<Task>, Vec<Task>) =
                group.into_iter().partition(|t| c.contains(&t.spec.job));
            ack_quietly(shared, &drop).await;
            keep
        }
        _ => group,
    };
    if group.is_empty() {
        return;
    }

    // Controlled tasks: fetch and decode each control image and make its edge map; an image that
    // cannot guide a render fails its own task with the reason, and the rest of the group renders.
    let (group, edges) = prepare_controls(shared, engine, group).await;
    if group.is_empty() {
        return;
    }

    let spec0 = &group[0].spec;
    let request = RenderRequest {
        width: spec0.width,
        height: spec0.height,
        steps: spec0.steps as usize,
        items: group
            .iter()
            .zip(&edges)
            .map(|(t, edge)| RenderItem {
                prompt: t.spec.prompt.clone(),
                seed: t.spec.seed,
                control: edge.as_ref().zip(t.spec.control.as_ref()).map(|(e, c)| {
                    pixart::pipeline::ControlInput {
                        edge_map: e.clone(),
                        scale: c.scale,
                    }
                }),
            })
            .collect(),
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let (ptx, prx) = mpsc::unbounded_channel::<StepProgress>();
    let watcher = tokio::spawn(watch_steps(
        shared.clone(),
        group.clone(),
        prx,
        cancel.clone(),
    ));
    let (timed_tx, timed_rx) = mpsc::unbounded_channel::<StepProgress>();
    tokio::spawn(metrics::time_steps(timed_rx, ptx));
    let leases: Vec<u64> = group.iter().map(|t| t.spec.lease_ms).collect();
    let result = match shared.config.watchdog_deadline(&leases) {
        None => engine.render(request, cancel.clone(), timed_tx).await,
        Some(deadline) => {
            match tokio::time::timeout(deadline, engine.render(request, cancel.clone(), timed_tx))
                .await
            {
                Ok(r) => r,
                Err(_) => {
                    cancel.store(true, Ordering::Relaxed);
                    watcher.abort();
                    let msg = format!(
                        "the render ran past its watchdog deadline of {} ms (device hung?)",
                        deadline.as_millis()
                    );
                    error!(tasks = group.len(), "{msg}");
                    for t in &group {
                        fail_task(shared, t, &msg).await;
                    }
                    shared.engine_hung.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
    };
    let _ = watcher.await;

    match result {
        Ok(rendered) => {
            metrics::batch_rendered(group.len(), rendered.render_ms);
            if rendered.outputs.len() != group.len() {
                let msg = format!(
                    "pipeline returned {} images for {} prompts",
                    rendered.outputs.len(),
                    group.len()
                );
                for t in &group {
                    fail_task(shared, t, &msg).await;
                }
                return;
            }
            let permit = uploads
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            let shared = shared.clone();
            let per_image_ms = rendered.render_ms / group.len() as f64;
            let batch = group.len() as u32;
            let span = info_span!("upload", tasks = group.len());
            in_flight.spawn(
                async move {
                    upload_and_record(
                        &shared,
                        group,
                        edges,
                        rendered.outputs,
                        per_image_ms,
                        batch,
                        picked_ms,
                    )
                    .await;
                    drop(permit);
                }
                .instrument(span),
            );
        }
        Err(pixart::Error::Cancelled) => {
            info!(tasks = group.len(), "batch cancelled between steps");
            ack_quietly(shared, &group).await;
        }
        Err(e) => {
            let msg = format!("render failed: {e}");
            for t in &group {
                fail_task(shared, t, &msg).await;
            }
        }
    }
}

/// Forwards step progress as events and sets `cancel` once every job of the group is cancelled.
async fn watch_steps(
    shared: Arc<Shared>,
    group: Vec<Task>,
    mut rx: mpsc::UnboundedReceiver<StepProgress>,
    cancel: Arc<AtomicBool>,
) {
    let jobs = unique_jobs(&group);
    while let Some(p) = rx.recv().await {
        // Only the newest progress matters when steps outrun Redis.
        let mut p = p;
        while let Ok(newer) = rx.try_recv() {
            p = newer;
        }
        match shared.queue.is_cancelled(&jobs).await {
            Ok(c) if c.len() == jobs.len() => {
                cancel.store(true, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => debug!(error = %e, "cancel check failed"),
        }
        if shared.step_events {
            for job in &jobs {
                let indices: Vec<u64> = group
                    .iter()
                    .filter(|t| &t.spec.job == job)
                    .map(|t| t.spec.index)
                    .collect();
                if let Err(e) = shared
                    .queue
                    .progress(
                        job,
                        &indices,
                        p.step as u32,
                        p.total as u32,
                        &shared.worker_id,
                    )
                    .await
                {
                    debug!(error = %e, "progress event failed");
                }
            }
        }
    }
}

/// Encodes, uploads and records one rendered group. Images of jobs cancelled meanwhile are not
/// stored ("no new images after a cancel"). Every image is stored with [`Storage::put_new`]: when
/// a copy is already there (an earlier delivery of the same task got as far as the upload) that
/// copy is kept and recorded, so the stored bytes always match the recorded sha256. A storage
/// outage keeps the tasks leased and retrying for up to `storage_outage_hold_ms`, then gives them
/// back without counting an attempt.
async fn upload_and_record(
    shared: &Arc<Shared>,
    group: Vec<Task>,
    edges: Vec<Option<image::RgbImage>>,
    outputs: Vec<pixart::pipeline::RenderOutput>,
    per_image_ms: f64,
    batch: u32,
    picked_ms: u64,
) {
    let cancelled = shared
        .queue
        .is_cancelled(&unique_jobs(&group))
        .await
        .unwrap_or_default();
    let mut uploads = JoinSet::new();
    let mut spawned: HashMap<tokio::task::Id, Task> = HashMap::new();
    for ((task, out), edge) in group.into_iter().zip(outputs).zip(edges) {
        if cancelled.contains(&task.spec.job) {
            ack_quietly(shared, std::slice::from_ref(&task)).await;
            continue;
        }
        let shared2 = shared.clone();
        let t2 = task.clone();
        let handle = uploads.spawn(async move {
            store_one(&shared2, t2, out, edge, per_image_ms, batch, picked_ms).await
        });
        spawned.insert(handle.id(), task);
    }
    let mut done = Vec::new();
    let mut outage = Vec::new();
    while let Some(r) = uploads.join_next_with_id().await {
        match r {
            Ok((id, Ok(pair))) => {
                spawned.remove(&id);
                done.push(pair);
            }
            Ok((id, Err(Stored::Failed(task, msg)))) => {
                spawned.remove(&id);
                fail_task(shared, &task, &msg).await
            }
            Ok((id, Err(Stored::Outage(task, msg)))) => {
                spawned.remove(&id);
                outage.push((task, msg));
            }
            Err(e) => {
                // The upload task panicked: fail its task rather than hold it forever.
                error!(error = %e, "upload task panicked");
                if let Some(task) = spawned.remove(&e.id()) {
                    fail_task(shared, &task, &format!("the upload panicked: {e}")).await;
                }
            }
        }
    }
    for (task, msg) in outage {
        defer_task(shared, &task, &msg).await;
    }
    if done.is_empty() {
        return;
    }
    // Results of tasks whose lease was lost are still recorded: the first record of an index
    // wins, and the stored object is the first one stored, whoever recorded it.
    let hold = Duration::from_millis(shared.config.storage_outage_hold_ms);
    let started = Instant::now();
    let mut backoff = Duration::from_millis(100);
    let outcomes = loop {
        match shared.queue.complete_many(&done).await {
            Ok(o) => break o,
            Err(e) if e.is_transient() && started.elapsed() < hold => {
                warn!(error = %e, "recording results failed, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                error!(error = %e, "recording results failed; the tasks will be redelivered after their lease");
                let tasks: Vec<Task> = done.into_iter().map(|(t, _)| t).collect();
                shared.release(&tasks).await;
                return;
            }
        }
    };
    let mut finished: Vec<JobId> = Vec::new();
    for ((task, result), outcome) in done.iter().zip(&outcomes) {
        match outcome {
            Recorded::Recorded | Recorded::JobFinished(_) => {
                metrics::completed(pixfarm_core::now_ms().saturating_sub(task.spec.submitted_ms))
            }
            Recorded::Duplicate => metrics::duplicate(),
            _ => {}
        }
        match outcome {
            Recorded::JobFinished(_) => finished.push(task.spec.job.clone()),
            Recorded::Canceled => {
                // Cancelled after the check above: remove the image and its edge map.
                let _ = shared.storage.delete(&task.spec.output_key).await;
                if let Some(k) = &result.parameters.control_key {
                    let _ = shared.storage.delete(k).await;
                }
            }
            _ => {}
        }
    }
    let recorded = outcomes
        .iter()
        .filter(|o| matches!(o, Recorded::Recorded | Recorded::JobFinished(_)))
        .count();
    {
        let mut i = shared.info.lock().await;
        i.images_done += recorded as u64;
        let rate = if per_image_ms > 0.0 {
            1000.0 / per_image_ms
        } else {
            0.0
        };
        i.images_per_sec = if i.images_per_sec == 0.0 {
            rate
        } else {
            0.8 * i.images_per_sec + 0.2 * rate
        };
    }
    let tasks: Vec<Task> = done.into_iter().map(|(t, _)| t).collect();
    shared.release(&tasks).await;
    // A manifest that fails here stays due and a sweep writes it (see `Queue::sweep_manifests`).
    for job in finished {
        if let Err(e) = shared.queue.write_manifest(&job, &shared.storage).await {
            error!(job = %job, error = %e, "writing the manifest failed; it stays due and is retried");
        }
    }
}

/// Why one image was not stored.
enum Stored {
    /// The task's own failure (encoding): counts as an attempt.
    Failed(Task, String),
    /// Storage stayed down for the whole outage hold: give the task back, attempt not counted.
    Outage(Task, String),
}

/// Encodes and stores one image (and its edge map first, so a recorded result never names a
/// missing edge map), keeping whatever copy was stored first.
async fn store_one(
    shared: &Arc<Shared>,
    task: Task,
    out: pixart::pipeline::RenderOutput,
    edge: Option<image::RgbImage>,
    per_image_ms: f64,
    batch: u32,
    picked_ms: u64,
) -> Result<(Task, TaskResult), Stored> {
    let t_enc = Instant::now();
    let png = match tokio::task::spawn_blocking(move || encode_png(&out.image)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return Err(Stored::Failed(task, format!("PNG encoding failed: {e}"))),
        Err(e) => return Err(Stored::Failed(task, format!("PNG encoding panicked: {e}"))),
    };
    let encode_ms = t_enc.elapsed().as_secs_f64() * 1e3;
    let t_up = Instant::now();
    let control_key = match edge {
        Some(edge) => {
            let key = edge_map_key(&task.spec.output_key);
            let png = match tokio::task::spawn_blocking(move || encode_png(&edge)).await {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    return Err(Stored::Failed(
                        task,
                        format!("edge map PNG encoding failed: {e}"),
                    ));
                }
                Err(e) => {
                    return Err(Stored::Failed(
                        task,
                        format!("edge map PNG encoding panicked: {e}"),
                    ));
                }
            };
            if let Err(msg) = put_first(shared, &task, &key, png).await {
                return Err(Stored::Outage(task, format!("edge map upload: {msg}")));
            }
            Some(key)
        }
        None => None,
    };
    let sha = match put_first(shared, &task, &task.spec.output_key, png).await {
        Ok(sha) => sha,
        Err(msg) => return Err(Stored::Outage(task, format!("upload: {msg}"))),
    };
    metrics::image_stored(encode_ms, t_up.elapsed().as_secs_f64() * 1e3);
    let timings = Timings {
        queue_ms: picked_ms.saturating_sub(task.spec.submitted_ms) as f64,
        render_ms: per_image_ms,
        encode_ms,
        upload_ms: t_up.elapsed().as_secs_f64() * 1e3,
        batch_size: batch,
    };
    let mut result = TaskResult::succeeded(
        &task,
        task.spec.output_key.clone(),
        sha,
        &shared.worker_id,
        timings,
    );
    result.parameters.control_key = control_key;
    Ok((task, result))
}

/// Stores `png` at `key` unless a copy is there already, and returns the sha256 of the bytes that
/// are stored now. Storage errors are retried (the task stays leased) for up to the outage hold;
/// while they last the worker stops pulling. The error is the last storage error.
async fn put_first(shared: &Shared, task: &Task, key: &str, png: Bytes) -> Result<String, String> {
    let hold = Duration::from_millis(shared.config.storage_outage_hold_ms);
    let started = Instant::now();
    let mut delay = Duration::from_millis(500);
    loop {
        let attempt = async {
            match shared
                .storage
                .put_new(key, png.clone(), "image/png")
                .await?
            {
                PutNew::Created => Ok(hex::encode(Sha256::digest(&png))),
                PutNew::Exists => {
                    let stored = shared.storage.get(key).await?;
                    debug!(key, "an earlier copy is stored: keeping and recording it");
                    Ok::<_, CoreError>(hex::encode(Sha256::digest(&stored)))
                }
            }
        };
        match attempt.await {
            Ok(sha) => {
                shared.storage_down.store(false, Ordering::SeqCst);
                return Ok(sha);
            }
            Err(e) if e.is_transient() && started.elapsed() < hold && shared.holds(task).await => {
                shared.storage_down.store(true, Ordering::SeqCst);
                warn!(key, error = %e, retry_in_ms = delay.as_millis() as u64, "storage unavailable: holding the task and retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn encode_png(img: &image::RgbImage) -> Result<Bytes, image::ImageError> {
    let mut buf = Vec::with_capacity((img.width() * img.height()) as usize);
    img.write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png)?;
    Ok(Bytes::from(buf))
}

/// The edge map's key beside its image: `…/000042.png` → `…/000042.control.png` (the layout of
/// [`pixfarm_core::control_key`]).
fn edge_map_key(output_key: &str) -> String {
    let stem = output_key.strip_suffix(".png").unwrap_or(output_key);
    format!("{stem}.control.png")
}

/// Splits off the tasks whose control image cannot be used (failing each with its reason) and
/// returns the rest with their edge maps (`None` for tasks without control), in order.
async fn prepare_controls(
    shared: &Arc<Shared>,
    engine: &Engine,
    group: Vec<Task>,
) -> (Vec<Task>, Vec<Option<image::RgbImage>>) {
    if group.iter().all(|t| t.spec.control.is_none()) {
        let n = group.len();
        return (group, vec![None; n]);
    }
    let mut decoded = Vec::with_capacity(group.len());
    for t in group {
        let img = match &t.spec.control {
            None => None,
            Some(_) => match load_control(shared, &t).await {
                Ok(img) => Some(img),
                Err(e) => {
                    control_failed(shared, &t, &e).await;
                    continue;
                }
            },
        };
        decoded.push((t, img));
    }
    let jobs: Vec<engine::EdgeJob> = decoded
        .iter_mut()
        .filter_map(|(t, img)| {
            let c = t.spec.control.as_ref()?;
            Some(engine::EdgeJob {
                image: img.take()?,
                kind: c.kind,
                low_threshold: c.low_threshold,
                high_threshold: c.high_threshold,
                width: t.spec.width,
                height: t.spec.height,
            })
        })
        .collect();
    let mut maps = engine.edge_maps(jobs).await.into_iter();
    let mut tasks = Vec::with_capacity(decoded.len());
    let mut edges = Vec::with_capacity(decoded.len());
    for (t, _) in decoded {
        if t.spec.control.is_none() {
            tasks.push(t);
            edges.push(None);
            continue;
        }
        match maps.next() {
            Some(Ok(edge)) => {
                tasks.push(t);
                edges.push(Some(edge));
            }
            Some(Err(e)) => control_failed(shared, &t, &e).await,
            None => fail_task(shared, &t, "no edge map was made").await,
        }
    }
    (tasks, edges)
}

/// Reads and decodes a task's control image; the error says why it cannot be used. A URI outside
/// what the task's tenant may read is refused for good (see `pixfarm_core::control_access`). A
/// store or Redis that cannot be reached is the infrastructure's failure (the task is given back
/// without counting an attempt); an object that is not there (yet) is retried as an attempt;
/// bytes that do not decode never will.
async fn load_control(
    shared: &Shared,
    task: &Task,
) -> Result<image::DynamicImage, engine::ControlError> {
    use engine::ControlError;
    let c = task
        .spec
        .control
        .as_ref()
        .ok_or_else(|| ControlError::permanent("no control image"))?;
    let read = match &c.source {
        ControlRef::Inline { item } => shared.queue.control_image(&task.spec.job, *item).await,
        ControlRef::Uri(uri) => {
            let allowed = shared
                .tenants
                .for_tenant(&task.spec.tenant)
                .allowed_input_prefixes
                .unwrap_or_default();
            let own = shared.storage.tenant_root(&task.spec.tenant);
            pixfarm_core::control_access::check_uri(uri, own.as_deref(), &allowed)
                .map_err(|m| ControlError::permanent(format!("control image refused: {m}")))?;
            shared.storage.get_uri(uri).await
        }
    };
    let bytes = read.map_err(|e| match e {
        CoreError::NotFound { .. } => {
            ControlError::retryable(format!("cannot read the control image: {e}"))
        }
        e if e.is_transient() => {
            ControlError::infrastructure(format!("cannot read the control image: {e}"))
        }
        e => ControlError::retryable(format!("cannot read the control image: {e}")),
    })?;
    tokio::task::spawn_blocking(move || image::load_from_memory(&bytes))
        .await
        .map_err(|e| ControlError::permanent(format!("control image decoding panicked: {e}")))?
        .map_err(|e| ControlError::permanent(format!("undecodable control image: {e}")))
}

/// A control image that cannot guide its render: deferred when the infrastructure failed,
/// otherwise a failed attempt (or a dead letter when no attempt can help).
async fn control_failed(shared: &Arc<Shared>, task: &Task, e: &engine::ControlError) {
    if e.infrastructure {
        defer_task(shared, task, &e.reason).await
    } else {
        fail_task_with(shared, task, &e.reason, e.retryable).await
    }
}

/// Gives a task back to the queue without counting an attempt (the failure was the
/// infrastructure's, see [`Queue::defer`]).
async fn defer_task(shared: &Arc<Shared>, task: &Task, reason: &str) {
    metrics::deferred();
    match shared.queue.defer(&shared.worker_id, task, reason).await {
        Ok(_) => {}
        Err(e) => {
            warn!(error = %e, "giving a task back failed; it will be redelivered after its lease")
        }
    }
    shared.release(std::slice::from_ref(task)).await;
}

/// Reports a failed attempt (retried or dead-lettered by the queue); writes the manifest when that
/// finished the job.
async fn fail_task(shared: &Arc<Shared>, task: &Task, reason: &str) {
    fail_task_with(shared, task, reason, true).await
}

/// [`fail_task`], saying whether another attempt can help (`false` dead-letters at once).
async fn fail_task_with(shared: &Arc<Shared>, task: &Task, reason: &str, retryable: bool) {
    match shared
        .queue
        .fail(&shared.worker_id, task, reason, retryable)
        .await
    {
        Ok(Failed::Retrying { .. }) => metrics::retried(),
        Ok(Failed::DeadLettered(Recorded::JobFinished(_))) => {
            metrics::failed();
            if let Err(e) = shared
                .queue
                .write_manifest(&task.spec.job, &shared.storage)
                .await
            {
                error!(job = %task.spec.job, error = %e, "writing the manifest failed");
            }
        }
        Ok(Failed::DeadLettered(_)) => metrics::failed(),
        Ok(Failed::NotOwner) => {}
        Err(e) => {
            error!(error = %e, "reporting a failure failed; the task will be redelivered after its lease")
        }
    }
    shared.release(std::slice::from_ref(task)).await;
}

async fn ack_quietly(shared: &Shared, tasks: &[Task]) {
    if tasks.is_empty() {
        return;
    }
    // Only tasks of cancelled jobs are acknowledged without a result.
    metrics::canceled(tasks.len());
    if let Err(e) = shared.queue.ack(tasks).await {
        warn!(error = %e, "ack failed");
    }
    shared.release(tasks).await;
}

fn unique_jobs(tasks: &[Task]) -> Vec<JobId> {
    let mut seen = HashSet::new();
    tasks
        .iter()
        .filter(|t| seen.insert(t.spec.job.clone()))
        .map(|t| t.spec.job.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(index: u64) -> Task {
        crate::grouping::tests::task(index, 64, 64, 1, None)
    }

    /// Hole 6: a task held past its watchdog deadline (its upload task died, its render hung)
    /// leaves the heartbeat, so its lease runs out; tasks without a deadline (watchdog off) and
    /// tasks still within theirs stay.
    #[test]
    fn tasks_past_their_deadline_leave_the_heartbeat() {
        let now = Instant::now();
        let mut held = Held::default();
        held.tasks.insert(
            "0-0".into(),
            (task(0), Some(now - Duration::from_millis(1))),
        );
        held.tasks
            .insert("1-0".into(), (task(1), Some(now + Duration::from_secs(60))));
        held.tasks.insert("2-0".into(), (task(2), None));
        let gone: Vec<u64> = held
            .take_overdue(now)
            .iter()
            .map(|t| t.spec.index)
            .collect();
        assert_eq!(gone, vec![0]);
        let mut left: Vec<&String> = held.tasks.keys().collect();
        left.sort();
        assert_eq!(left, ["1-0", "2-0"]);
        assert!(held.take_overdue(now).is_empty());
    }
}
