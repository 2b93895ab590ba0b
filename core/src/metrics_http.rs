//! The Prometheus `/metrics` endpoint that the coordinator and every worker serve (feature
//! `metrics-http`). Each binary chooses its own metric names, buckets and labels; what is shared
//! is the plumbing: installing the one process-wide recorder, the HTTP listener (`/metrics`,
//! `/healthz`) and a handle that stops it on drop.

use std::net::SocketAddr;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusHandle, PrometheusRecorder};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for /metrics on {addr} (PIXFARM_METRICS_ADDR): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot build the Prometheus recorder: {0}")]
    Build(String),
    #[error(
        "another metrics recorder is already installed in this process, so /metrics cannot be served"
    )]
    AlreadyInstalled,
}

/// The process's recorder, installed at most once (the `metrics` facade has one global recorder).
static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
const ALREADY: &str = "already installed";

/// Installs the recorder that `build` makes (first call only; later calls return the same
/// handle) and runs `describe` once it is in place.
pub fn install(
    build: impl FnOnce() -> Result<PrometheusRecorder, String>,
    describe: fn(),
) -> Result<PrometheusHandle, MetricsError> {
    let r = HANDLE.get_or_init(|| {
        let recorder = build()?;
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).map_err(|_| ALREADY.to_string())?;
        describe();
        Ok(handle)
    });
    match r {
        Ok(h) => Ok(h.clone()),
        Err(e) if e == ALREADY => Err(MetricsError::AlreadyInstalled),
        Err(e) => Err(MetricsError::Build(e.clone())),
    }
}

/// Binds `addr` (port 0: any free port).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// A running `/metrics` server and its background tasks; dropping it stops them.
pub struct MetricsServer {
    addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl MetricsServer {
    /// Serves `handle` on `listener` and owns `background` (e.g. a gauge poller) alongside.
    pub fn start(
        listener: TcpListener,
        handle: PrometheusHandle,
        background: Vec<JoinHandle<()>>,
    ) -> Result<Self, MetricsError> {
        let addr = listener.local_addr().map_err(|source| MetricsError::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        info!(%addr, "serving Prometheus metrics on /metrics");
        let mut tasks = vec![tokio::spawn(serve_http(listener, handle))];
        tasks.extend(background);
        Ok(Self { addr, tasks })
    }

    /// The address `/metrics` is served on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn serve_http(listener: TcpListener, handle: PrometheusHandle) {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let h = handle.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        h.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    if let Err(e) = axum::serve(listener, app).await {
        warn!(error = %e, "the /metrics server stopped");
    }
}
