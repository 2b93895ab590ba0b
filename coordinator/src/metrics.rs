//! Prometheus metrics of the coordinator: `GET /metrics` on its own listener
//! (`--metrics-addr` / `PIXFARM_METRICS_ADDR`), separate from the gRPC port so
//! scrapers and autoscalers never compete with clients for it.
//!
//! Two sources feed it. [`Metered`] wraps the gRPC service and counts every
//! call by method and status code, with its latency, plus submitted jobs and
//! tasks. A poller reads the queue every few seconds (lane length, pending,
//! consumer-group lag, fair-share backlog, dead letters, registered workers)
//! into gauges, because those live in Redis and any coordinator replica can
//! report them. The lag gauge is the number KEDA's `redis-streams` trigger
//! reads; since the fair-share refill keeps each stream short, the backlog
//! gauge is what a Prometheus trigger must add to see the whole queue.
//!
//! Metric names are listed in `deploy/README.md`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use pixfarm_core::Queue;
use pixfarm_core::queue::{DEAD_KEY, GROUP};
use pixfarm_proto::v1 as pb;
use pixfarm_proto::v1::farm_server::Farm;
use redis::Value;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

/// Where the fair-share backlog counts live (see `core/src/fair.rs`).
const BACKLOG_KEY: &str = "pf:fair:backlog";

/// How often the queue gauges are refreshed. A Prometheus scrape every 15 s
/// sees values at most this old; each poll costs about 2 Redis commands per lane.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Latency buckets (seconds) shared by every `*_seconds` histogram: from a
/// fast Redis round trip up to a slow 1024 px batch.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Why the metrics endpoint could not start.
pub use pixfarm_core::metrics_http::{MetricsError, MetricsServer};

/// The recorder, with second-scale histogram buckets.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    pixfarm_core::metrics_http::install(
        || {
            Ok(PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .map_err(|e| e.to_string())?
                .build_recorder())
        },
        describe,
    )
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "pixfarm_jobs_submitted_total",
        "Jobs created (an idempotent resubmit of an existing job is not counted)"
    );
    describe_counter!(
        "pixfarm_tasks_submitted_total",
        "Tasks (images) enqueued by created jobs"
    );
    describe_counter!(
        "pixfarm_rpc_requests_total",
        "gRPC calls of the Farm service by method and status code"
    );
    describe_histogram!(
        "pixfarm_rpc_duration_seconds",
        metrics::Unit::Seconds,
        "gRPC call latency by method (a WatchJob counts until its stream is returned)"
    );
    describe_gauge!(
        "pixfarm_lane_length_tasks",
        "Entries in the lane stream: waiting plus delivered but unacknowledged"
    );
    describe_gauge!(
        "pixfarm_lane_pending_tasks",
        "Entries delivered to a worker and not yet acknowledged"
    );
    describe_gauge!(
        "pixfarm_lane_lag_tasks",
        "Consumer-group lag: entries not yet delivered to any worker (what KEDA scales on)"
    );
    describe_gauge!(
        "pixfarm_lane_backlog_tasks",
        "Tasks in the per-tenant fair-share backlogs, not yet moved into the lane stream"
    );
    describe_gauge!(
        "pixfarm_queue_depth_tasks",
        "Every task not yet finished: stream length plus backlog, over all lanes"
    );
    describe_gauge!(
        "pixfarm_dead_letters",
        "Entries in the capped dead-letter stream pf:dead"
    );
    describe_gauge!(
        "pixfarm_workers_registered",
        "Workers with a live registry entry"
    );
    describe_counter!(
        "pixfarm_queue_poll_errors_total",
        "Failed polls of the queue gauges (Redis unreachable)"
    );
}

/// Binds `addr` and serves `/metrics` (and `/healthz`) there, refreshing the
/// queue gauges from `queue` every [`POLL_INTERVAL`].
pub async fn start(addr: SocketAddr, queue: Queue) -> Result<MetricsServer, MetricsError> {
    start_on(pixfarm_core::metrics_http::bind(addr).await?, queue)
}

/// Like [`start`] on an already bound listener (tests bind `127.0.0.1:0`).
pub fn start_on(listener: TcpListener, queue: Queue) -> Result<MetricsServer, MetricsError> {
    let handle = install()?;
    let poll = tokio::spawn(poll_queue(queue, handle.clone()));
    MetricsServer::start(listener, handle, vec![poll])
}

/// Refreshes the queue gauges and runs the recorder's upkeep (histogram
/// maintenance), forever.
async fn poll_queue(queue: Queue, handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        handle.run_upkeep();
        if let Err(e) = refresh_queue_gauges(&queue).await {
            counter!("pixfarm_queue_poll_errors_total").increment(1);
            debug!(error = %e, "queue metrics poll failed");
        }
    }
}

/// One poll of the queue gauges. Public so a test can force a refresh.
pub async fn refresh_queue_gauges(queue: &Queue) -> Result<(), pixfarm_core::CoreError> {
    let stats = queue.lane_stats().await?;
    let mut conn = queue.connection();
    let mut depth = 0u64;
    // The fair-share backlog per lane: the hash `pf:fair:backlog` (lane → tasks) that
    // `Queue::backlog_stats` reads. Read directly so this gauge does not depend on that method
    // (an absent hash, i.e. a queue without backlogs, reads as zero for every lane).
    let backlog: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
        .arg(BACKLOG_KEY)
        .query_async(&mut conn)
        .await
        .map_err(pixfarm_core::CoreError::from)?;
    for s in &stats {
        let lane = s.lane.to_string();
        let n = backlog.get(&lane).copied().unwrap_or(0).max(0) as u64;
        depth += n;
        gauge!("pixfarm_lane_backlog_tasks", "lane" => lane).set(n as f64);
    }
    for s in &stats {
        let lane = s.lane.to_string();
        depth += s.length;
        gauge!("pixfarm_lane_length_tasks", "lane" => lane.clone()).set(s.length as f64);
        gauge!("pixfarm_lane_pending_tasks", "lane" => lane.clone()).set(s.pending as f64);
        // XINFO GROUPS reports `lag` (Redis ≥ 7); when Redis cannot compute
        // it, length − pending is the same quantity for these streams, which
        // delete entries only after acknowledging them.
        let lag = match redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(s.lane.key())
            .query_async::<Value>(&mut conn)
            .await
        {
            Ok(v) => group_lag(&v, GROUP),
            Err(e) => {
                debug!(lane = %lane, error = %e, "XINFO GROUPS failed");
                None
            }
        }
        .unwrap_or_else(|| s.length.saturating_sub(s.pending));
        gauge!("pixfarm_lane_lag_tasks", "lane" => lane).set(lag as f64);
    }
    gauge!("pixfarm_queue_depth_tasks").set(depth as f64);
    let dead: u64 = redis::cmd("XLEN")
        .arg(DEAD_KEY)
        .query_async(&mut conn)
        .await
        .map_err(pixfarm_core::CoreError::from)?;
    gauge!("pixfarm_dead_letters").set(dead as f64);
    let workers = queue.list_workers().await?;
    gauge!("pixfarm_workers_registered").set(workers.len() as f64);
    Ok(())
}

/// The `lag` field of consumer group `group` in an `XINFO GROUPS` reply
/// (RESP2 flat arrays or RESP3 maps); `None` when absent or nil.
fn group_lag(reply: &Value, group: &str) -> Option<u64> {
    let Value::Array(groups) = reply else {
        return None;
    };
    for g in groups {
        let fields: Vec<(String, &Value)> = match g {
            Value::Array(kv) => kv
                .chunks(2)
                .filter_map(|c| match c {
                    [k, v] => Some((redis::from_redis_value_ref::<String>(k).ok()?, v)),
                    _ => None,
                })
                .collect(),
            Value::Map(kv) => kv
                .iter()
                .filter_map(|(k, v)| Some((redis::from_redis_value_ref::<String>(k).ok()?, v)))
                .collect(),
            _ => continue,
        };
        let name = fields
            .iter()
            .find(|(k, _)| k == "name")
            .and_then(|(_, v)| redis::from_redis_value_ref::<String>(v).ok());
        if name.as_deref() != Some(group) {
            continue;
        }
        return fields
            .iter()
            .find(|(k, _)| k == "lag")
            .and_then(|(_, v)| redis::from_redis_value_ref::<u64>(v).ok());
    }
    None
}

/// The Farm service with a call counter and latency histogram around every
/// method. Wrapping (instead of a tower layer) sees the typed replies, so it
/// can count the tasks a submit created.
#[derive(Clone)]
pub struct Metered<S> {
    inner: S,
}

impl<S> Metered<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

fn record<T>(method: &'static str, started: Instant, r: &Result<T, Status>) {
    let code = match r {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    let code = format!("{code:?}");
    counter!("pixfarm_rpc_requests_total", "method" => method, "code" => code).increment(1);
    histogram!("pixfarm_rpc_duration_seconds", "method" => method)
        .record(started.elapsed().as_secs_f64());
}

fn count_submit(r: &Result<Response<pb::SubmitJobResponse>, Status>) {
    if let Ok(resp) = r {
        let resp = resp.get_ref();
        if resp.created {
            counter!("pixfarm_jobs_submitted_total").increment(1);
            counter!("pixfarm_tasks_submitted_total").increment(resp.task_count);
        }
    }
}

#[tonic::async_trait]
impl<S: Farm> Farm for Metered<S> {
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let t = Instant::now();
        let r = self.inner.submit_job(request).await;
        record("SubmitJob", t, &r);
        count_submit(&r);
        r
    }

    async fn submit_job_stream(
        &self,
        request: Request<Streaming<pb::SubmitJobChunk>>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let t = Instant::now();
        let r = self.inner.submit_job_stream(request).await;
        record("SubmitJobStream", t, &r);
        count_submit(&r);
        r
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let t = Instant::now();
        let r = self.inner.get_job(request).await;
        record("GetJob", t, &r);
        r
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let t = Instant::now();
        let r = self.inner.list_jobs(request).await;
        record("ListJobs", t, &r);
        r
    }

    type WatchJobStream = S::WatchJobStream;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let t = Instant::now();
        let r = self.inner.watch_job(request).await;
        record("WatchJob", t, &r);
        r
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let t = Instant::now();
        let r = self.inner.cancel_job(request).await;
        record("CancelJob", t, &r);
        r
    }

    async fn list_results(
        &self,
        request: Request<pb::ListResultsRequest>,
    ) -> Result<Response<pb::ListResultsResponse>, Status> {
        let t = Instant::now();
        let r = self.inner.list_results(request).await;
        record("ListResults", t, &r);
        r
    }

    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let t = Instant::now();
        let r = self.inner.list_workers(request).await;
        record("ListWorkers", t, &r);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn lag_is_read_from_the_named_group_in_resp2_and_resp3_replies() {
        let resp2 = Value::Array(vec![
            Value::Array(vec![
                bulk("name"),
                bulk("other"),
                bulk("lag"),
                Value::Int(9),
            ]),
            Value::Array(vec![
                bulk("name"),
                bulk("workers"),
                bulk("pending"),
                Value::Int(2),
                bulk("lag"),
                Value::Int(5),
            ]),
        ]);
        assert_eq!(group_lag(&resp2, "workers"), Some(5));
        let resp3 = Value::Array(vec![Value::Map(vec![
            (bulk("name"), bulk("workers")),
            (bulk("lag"), Value::Nil),
        ])]);
        assert_eq!(group_lag(&resp3, "workers"), None);
        assert_eq!(group_lag(&Value::Array(vec![]), "workers"), None);
    }
}
