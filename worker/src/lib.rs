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
    ControlRef, CoreError, Failed, JobId, Queue, Recorded, Storage, Task, TaskResult, Timings,
    WorkerInfo, WorkerState,
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
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
}

/// Tasks this worker holds (pulled, not yet acknowledged): the heartbeat extends their leases.
#[derive(Default)]
struct Held {
    tasks: HashMap<String, Task>,
    /// Entry ids whose lease was lost to another worker: their results are not recorded.
    lost: HashSet<String>,
}

struct Shared {
    queue: Queue,
    storage: Storage,
    worker_id: String,
    held: Mutex<Held>,
    info: Mutex<WorkerInfo>,
    step_events: bool,
}

impl Shared {
    async fn hold(&self, tasks: &[Task]) {
        let mut h = self.held.lock().await;
        for t in tasks {
            h.tasks.insert(t.entry_id.clone(), t.clone());
        }
        metrics::tasks_in_flight(h.tasks.len());
    }

    async fn release(&self, tasks: &[Task]) {
        let mut h = self.held.lock().await;
        for t in tasks {
            h.tasks.remove(&t.entry_id);
            h.lost.remove(&t.entry_id);
        }
        metrics::tasks_in_flight(h.tasks.len());
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

    let shared = Arc::new(Shared {
        queue,
        storage,
        worker_id: worker_id.clone(),
        held: Mutex::new(Held::default()),
        info: Mutex::new(info),
        step_events: config.step_events,
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
    }

    shared.set_state(WorkerState::Draining, 0).await;
    while in_flight.join_next().await.is_some() {}
    heartbeat.abort();
    let _ = shared.queue.deregister_worker(&worker_id).await;
    let _ = shared
        .queue
        .remove_consumer(&worker_id, &config.lanes)
        .await;
    drop(engine);
    if engine_stopped {
        return Err(WorkerError::EngineStopped);
    }
    info!(worker = %worker_id, "worker stopped");
    Ok(())
}

/// Extends the leases of held tasks and refreshes the registry entry.
async fn heartbeat_loop(shared: Arc<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let tasks: Vec<Task> = shared.held.lock().await.tasks.values().cloned().collect();
        if !tasks.is_empty() {
            match shared.queue.extend_leases(&shared.worker_id, &tasks).await {
                Ok(flags) => {
                    let mut h = shared.held.lock().await;
                    for (t, ok) in tasks.iter().zip(flags) {
                        if !ok && h.tasks.remove(&t.entry_id).is_some() {
                            warn!(job = %t.spec.job, index = t.spec.index, "lease lost to another worker");
                            h.lost.insert(t.entry_id.clone());
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
    let result = engine.render(request, cancel, timed_tx).await;
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
/// stored ("no new images after a cancel").
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
    for ((task, out), edge) in group.into_iter().zip(outputs).zip(edges) {
        if cancelled.contains(&task.spec.job) {
            ack_quietly(shared, std::slice::from_ref(&task)).await;
            continue;
        }
        let shared = shared.clone();
        uploads.spawn(async move {
            let t_enc = Instant::now();
            let png = tokio::task::spawn_blocking(move || encode_png(&out.image)).await;
            let png = match png {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => return Err((task, format!("PNG encoding failed: {e}"))),
                Err(e) => return Err((task, format!("PNG encoding panicked: {e}"))),
            };
            let encode_ms = t_enc.elapsed().as_secs_f64() * 1e3;
            let sha = hex::encode(Sha256::digest(&png));
            let t_up = Instant::now();
            // The edge map goes first, so a recorded result never names a missing edge map.
            let control_key = match edge {
                Some(edge) => {
                    let key = edge_map_key(&task.spec.output_key);
                    let png = match tokio::task::spawn_blocking(move || encode_png(&edge)).await {
                        Ok(Ok(p)) => p,
                        Ok(Err(e)) => {
                            return Err((task, format!("edge map PNG encoding failed: {e}")));
                        }
                        Err(e) => {
                            return Err((task, format!("edge map PNG encoding panicked: {e}")));
                        }
                    };
                    if let Err(e) = shared.storage.put(&key, png, "image/png").await {
                        return Err((task, format!("edge map upload failed: {e}")));
                    }
                    Some(key)
                }
                None => None,
            };
            if let Err(e) = shared
                .storage
                .put(&task.spec.output_key, png, "image/png")
                .await
            {
                return Err((task, format!("upload failed: {e}")));
            }
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
        });
    }
    let mut done = Vec::new();
    while let Some(r) = uploads.join_next().await {
        match r {
            Ok(Ok(pair)) => done.push(pair),
            Ok(Err((task, msg))) => fail_task(shared, &task, &msg).await,
            Err(e) => error!(error = %e, "upload task panicked"),
        }
    }
    if done.is_empty() {
        return;
    }
    // Results of tasks whose lease was lost are still recorded: HSETNX keeps whichever came first,
    // and both images are the same (same seed, same model).
    let mut backoff = Duration::from_millis(100);
    let outcomes = loop {
        match shared.queue.complete_many(&done).await {
            Ok(o) => break o,
            Err(e) if e.is_transient() && backoff < Duration::from_secs(60) => {
                warn!(error = %e, "recording results failed, retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
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
    for ((task, _), outcome) in done.iter().zip(&outcomes) {
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
                // Cancelled after the check above: remove the image we just stored.
                let _ = shared.storage.delete(&task.spec.output_key).await;
            }
            Recorded::Duplicate => {
                // Recorded before (a lease race, or our own earlier try that lost its reply): if
                // that finished the job, its manifest may still be missing.
                if !finished.contains(&task.spec.job)
                    && let Ok(rec) = shared.queue.get_job(&task.spec.job).await
                    && rec.state.is_terminal()
                    && rec.manifest_key.is_none()
                {
                    finished.push(task.spec.job.clone());
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
    for job in finished {
        if let Err(e) = shared.queue.write_manifest(&job, &shared.storage).await {
            error!(job = %job, error = %e, "writing the manifest failed");
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
                    fail_task_with(shared, &t, &e.reason, e.retryable).await;
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
            Some(Err(e)) => fail_task_with(shared, &t, &e.reason, e.retryable).await,
            None => fail_task(shared, &t, "no edge map was made").await,
        }
    }
    (tasks, edges)
}

/// Reads and decodes a task's control image; the error says why it cannot be used. A read can fail
/// for a while (S3 or Redis trouble, an object not there yet) and is retried; bytes that do not
/// decode never will.
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
    let bytes = match &c.source {
        ControlRef::Inline { item } => shared.queue.control_image(&task.spec.job, *item).await,
        ControlRef::Uri(uri) => shared.storage.get_uri(uri).await,
    }
    .map_err(|e| ControlError::retryable(format!("cannot read the control image: {e}")))?;
    tokio::task::spawn_blocking(move || image::load_from_memory(&bytes))
        .await
        .map_err(|e| ControlError::permanent(format!("control image decoding panicked: {e}")))?
        .map_err(|e| ControlError::permanent(format!("undecodable control image: {e}")))
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
