//! Prometheus metrics of one worker: `GET /metrics` on `--metrics-addr` /
//! `PIXFARM_METRICS_ADDR`.
//!
//! The render loop reports through the small functions below, so `lib.rs`
//! says *what* happened and this module owns the names, labels and units.
//! Every series carries the worker id as the `worker` label, so a dashboard
//! can tell workers apart even when they share a host (one per GPU).
//!
//! GPU memory comes from `nvidia-smi` (polled, device-wide, only for `cuda`
//! devices): it needs no CUDA-specific code in this crate, works the same for
//! every build, and on CPU workers the series is simply absent.
//!
//! Metric names are listed in `deploy/README.md`.

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::debug;

use crate::config::DeviceSpec;

/// Latency buckets (seconds) for every `*_seconds` histogram: a 64 px tiny
/// render on a CPU up to a large batch at 1024 px.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];
/// Batch sizes are small integers; one bucket per power of two up to the 256 cap.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// How often GPU memory is sampled and histogram upkeep runs.
const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Why the metrics endpoint could not start.
pub use pixfarm_core::metrics_http::{MetricsError, MetricsServer};

/// The recorder: global label `worker`, second-scale and batch-size buckets.
fn install(worker_id: &str) -> Result<PrometheusHandle, MetricsError> {
    pixfarm_core::metrics_http::install(
        || {
            Ok(PrometheusBuilder::new()
                .add_global_label("worker", worker_id)
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("pixfarm_worker_batch_size".into()),
                        BATCH_BUCKETS,
                    )
                })
                .map_err(|e| e.to_string())?
                .build_recorder())
        },
        describe,
    )
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "pixfarm_worker_tasks_completed_total",
        "Tasks whose image was stored and whose result this worker recorded first"
    );
    describe_counter!(
        "pixfarm_worker_tasks_duplicate_total",
        "Tasks already recorded by another attempt (lease race); not counted as completed"
    );
    describe_counter!(
        "pixfarm_worker_tasks_retried_total",
        "Failed attempts handed back to the queue for another try"
    );
    describe_counter!(
        "pixfarm_worker_tasks_deferred_total",
        "Tasks given back without counting an attempt because storage or Redis was unreachable"
    );
    describe_counter!(
        "pixfarm_worker_tasks_failed_total",
        "Tasks that failed for good (moved to the dead-letter stream)"
    );
    describe_counter!(
        "pixfarm_worker_tasks_canceled_total",
        "Tasks dropped because their job was cancelled"
    );
    describe_counter!(
        "pixfarm_worker_pull_errors_total",
        "Failed pulls from Redis (retried with back-off)"
    );
    describe_gauge!(
        "pixfarm_worker_tasks_in_flight",
        "Tasks pulled and not yet acknowledged (leases this worker extends)"
    );
    describe_gauge!(
        "pixfarm_worker_draining",
        "1 once shutdown was requested and the worker finishes its batch"
    );
    describe_histogram!(
        "pixfarm_worker_batch_size",
        "Images rendered together in one batched model call"
    );
    describe_histogram!(
        "pixfarm_worker_render_duration_seconds",
        Unit::Seconds,
        "Wall time of one batched render (text encoding, denoising, VAE decode)"
    );
    describe_histogram!(
        "pixfarm_worker_image_duration_seconds",
        Unit::Seconds,
        "Render time per image: batch render time divided by the batch size"
    );
    describe_histogram!(
        "pixfarm_worker_step_duration_seconds",
        Unit::Seconds,
        "Time between consecutive denoising steps of a batch (the first step is excluded: it includes text encoding)"
    );
    describe_histogram!(
        "pixfarm_worker_encode_duration_seconds",
        Unit::Seconds,
        "PNG encoding time per image"
    );
    describe_histogram!(
        "pixfarm_worker_upload_duration_seconds",
        Unit::Seconds,
        "Storage PUT time per image, retries included"
    );
    describe_histogram!(
        "pixfarm_worker_task_latency_seconds",
        Unit::Seconds,
        "Submit to recorded result, per completed task"
    );
    describe_gauge!(
        "pixfarm_gpu_memory_used_bytes",
        Unit::Bytes,
        "Device memory in use on the worker's GPU (nvidia-smi, whole device)"
    );
    describe_gauge!(
        "pixfarm_gpu_memory_total_bytes",
        Unit::Bytes,
        "Device memory of the worker's GPU (nvidia-smi)"
    );
}

/// Installs the recorder (labelled with `worker_id`) and serves `/metrics`
/// and `/healthz` on `addr`.
pub async fn start(
    addr: SocketAddr,
    worker_id: &str,
    device: DeviceSpec,
) -> Result<MetricsServer, MetricsError> {
    let handle = install(worker_id)?;
    let listener = pixfarm_core::metrics_http::bind(addr).await?;
    let poll = tokio::spawn(poll(handle.clone(), device));
    MetricsServer::start(listener, handle, vec![poll])
}

async fn poll(handle: PrometheusHandle, device: DeviceSpec) {
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gpu_ok = true;
    loop {
        tick.tick().await;
        handle.run_upkeep();
        if let (DeviceSpec::Cuda(index), true) = (device, gpu_ok) {
            match gpu_memory(index).await {
                Some((used, total)) => {
                    gauge!("pixfarm_gpu_memory_used_bytes", "gpu" => index.to_string())
                        .set(used as f64);
                    gauge!("pixfarm_gpu_memory_total_bytes", "gpu" => index.to_string())
                        .set(total as f64);
                }
                None => {
                    // No nvidia-smi in the image: stop asking.
                    debug!("nvidia-smi gave no memory figures; GPU memory is not exported");
                    gpu_ok = false;
                }
            }
        }
    }
}

/// Used and total memory of CUDA device `index`, in bytes. The index is the
/// process's own (after `CUDA_VISIBLE_DEVICES` remapping), and so is
/// `nvidia-smi -i` when it inherits the same environment.
async fn gpu_memory(index: usize) -> Option<(u64, u64)> {
    let out = tokio::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=memory.used,memory.total",
            "--format=csv,noheader,nounits",
            "-i",
            &index.to_string(),
        ])
        .output()
        .await
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout))
}

/// Parses `used, total` in MiB (one line) into bytes.
fn parse_nvidia_smi(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().next()?;
    let (used, total) = line.split_once(',')?;
    let mib = |s: &str| s.trim().parse::<u64>().ok().map(|m| m * 1024 * 1024);
    Some((mib(used)?, mib(total)?))
}

// --- what the render loop reports ------------------------------------------------------------

pub(crate) fn tasks_in_flight(n: usize) {
    gauge!("pixfarm_worker_tasks_in_flight").set(n as f64);
}

pub(crate) fn draining() {
    gauge!("pixfarm_worker_draining").set(1.0);
}

pub(crate) fn pull_error() {
    counter!("pixfarm_worker_pull_errors_total").increment(1);
}

pub(crate) fn batch_rendered(batch: usize, render_ms: f64) {
    histogram!("pixfarm_worker_batch_size").record(batch as f64);
    histogram!("pixfarm_worker_render_duration_seconds").record(render_ms / 1e3);
    if batch > 0 {
        let per_image = render_ms / 1e3 / batch as f64;
        for _ in 0..batch {
            histogram!("pixfarm_worker_image_duration_seconds").record(per_image);
        }
    }
}

pub(crate) fn step(seconds: f64) {
    histogram!("pixfarm_worker_step_duration_seconds").record(seconds);
}

/// Forwards step progress from the engine to `out`, timing consecutive steps on arrival (this
/// hop does no I/O, so the times are not skewed by the Redis calls the consumer makes per step).
pub(crate) async fn time_steps(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<pixart::pipeline::StepProgress>,
    out: tokio::sync::mpsc::UnboundedSender<pixart::pipeline::StepProgress>,
) {
    let mut last: Option<std::time::Instant> = None;
    while let Some(p) = rx.recv().await {
        let now = std::time::Instant::now();
        if let Some(prev) = last {
            step(now.duration_since(prev).as_secs_f64());
        }
        last = Some(now);
        let _ = out.send(p);
    }
}

pub(crate) fn image_stored(encode_ms: f64, upload_ms: f64) {
    histogram!("pixfarm_worker_encode_duration_seconds").record(encode_ms / 1e3);
    histogram!("pixfarm_worker_upload_duration_seconds").record(upload_ms / 1e3);
}

pub(crate) fn completed(latency_ms: u64) {
    counter!("pixfarm_worker_tasks_completed_total").increment(1);
    histogram!("pixfarm_worker_task_latency_seconds").record(latency_ms as f64 / 1e3);
}

pub(crate) fn duplicate() {
    counter!("pixfarm_worker_tasks_duplicate_total").increment(1);
}

pub(crate) fn retried() {
    counter!("pixfarm_worker_tasks_retried_total").increment(1);
}

pub(crate) fn deferred() {
    counter!("pixfarm_worker_tasks_deferred_total").increment(1);
}

pub(crate) fn failed() {
    counter!("pixfarm_worker_tasks_failed_total").increment(1);
}

pub(crate) fn canceled(n: usize) {
    counter!("pixfarm_worker_tasks_canceled_total").increment(n as u64);
}

#[cfg(test)]
mod tests {
    use super::parse_nvidia_smi;

    #[test]
    fn nvidia_smi_memory_line_is_mib() {
        assert_eq!(
            parse_nvidia_smi("1234, 81559\n"),
            Some((1234 * 1048576, 81559 * 1048576))
        );
        assert_eq!(parse_nvidia_smi("[N/A], 81559"), None);
        assert_eq!(parse_nvidia_smi(""), None);
    }
}
