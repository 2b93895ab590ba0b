//! The pixfarm coordinator: the gRPC front door of the farm.
//!
//! It validates and enqueues jobs, and answers status, watch, cancel, results
//! and worker queries, all from Redis through [`pixfarm_core::Queue`]. It holds
//! no state of its own, so run as many replicas as you like behind a load
//! balancer. It also serves `grpc.health.v1` and server reflection, so
//! `grpcurl` works without the `.proto` file.
//!
//! The lifecycle seam follows mini-redis: [`serve`] takes a bound listener and
//! a shutdown future, so the binary passes SIGTERM/Ctrl-C and tests bind
//! `127.0.0.1:0` and pass a oneshot.
//!
//! ```no_run
//! use pixfarm_coordinator::{CoordinatorConfig, serve, shutdown_signal};
//!
//! # async fn demo() -> Result<(), pixfarm_coordinator::CoordinatorError> {
//! let config = CoordinatorConfig::new("redis://127.0.0.1:6379/", "file:///tmp/pixfarm");
//! let listener = tokio::net::TcpListener::bind(config.listen).await?;
//! serve(config, listener, shutdown_signal()).await?;
//! # Ok(()) }
//! ```
//!
//! Errors: every handler maps core errors to statuses in one place
//! ([`error::ApiError`]): invalid input → `INVALID_ARGUMENT` with
//! `google.rpc.BadRequest` field violations (`items[37].width`), unknown ids →
//! `NOT_FOUND`, Redis/S3 trouble → `UNAVAILABLE`.

pub mod auth;
pub mod config;
pub mod convert;
pub mod error;
pub mod metrics;
pub mod service;
pub mod tls;
pub mod web;

use std::future::Future;

pub use auth::{AuthContext, Authenticator};
pub use config::CoordinatorConfig;
pub use error::ApiError;
use pixfarm_core::{CoreError, Queue, Storage};
use pixfarm_proto::v1::farm_server::FarmServer;
pub use service::FarmService;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::ServerTlsConfig;
use tracing::{info, warn};

/// Why the coordinator could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("cannot reach the queue or the store: {0}")]
    Core(#[from] CoreError),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error("authentication: {0}")]
    Auth(String),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
}

/// How the gRPC port is exposed: message size limit, who may call, TLS.
#[derive(Clone)]
pub struct ServeOptions {
    /// Largest gRPC message decoded or encoded by the Farm service.
    pub max_message_bytes: usize,
    pub auth: Authenticator,
    /// `None`: plaintext.
    pub tls: Option<ServerTlsConfig>,
}

impl ServeOptions {
    /// No authentication, plaintext: `pixfarm dev` and tests.
    pub fn insecure(max_message_bytes: usize) -> Self {
        Self {
            max_message_bytes,
            auth: Authenticator::disabled(),
            tls: None,
        }
    }

    /// From the coordinator's flags (loads the tokens file and TLS files);
    /// `listen` is the address actually bound (no-auth is refused off loopback).
    pub fn from_config(
        config: &CoordinatorConfig,
        listen: std::net::SocketAddr,
    ) -> Result<Self, CoordinatorError> {
        Ok(Self {
            max_message_bytes: config.max_message_bytes,
            auth: Authenticator::from_args(&config.auth, listen).map_err(CoordinatorError::Auth)?,
            tls: config.tls.server_config()?,
        })
    }
}

/// Connects to Redis and the store named in `config`, then serves until
/// `shutdown` completes (with the web gallery on `config.web_addr` when set).
pub async fn serve(
    config: CoordinatorConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), CoordinatorError> {
    let web = match config.web_addr {
        Some(addr) => Some(TcpListener::bind(addr).await?),
        None => None,
    };
    serve_all(config, listener, web, shutdown).await
}

/// [`serve`] with the web gallery's listener already bound (`pixfarm dev` binds port 0 and
/// prints the URL); `None`: no gallery.
pub async fn serve_all(
    config: CoordinatorConfig,
    listener: TcpListener,
    web_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), CoordinatorError> {
    // Credentials and certificates first: a typo there should not wait for Redis.
    let options = ServeOptions::from_config(&config, listener.local_addr()?)?;
    let queue = Queue::connect(&config.redis_url, config.queue_config()).await?;
    queue.ensure_groups().await?;
    let storage = Storage::open_with(&config.storage_url, config.storage_options()).await?;
    // Held until the gRPC server stops; dropping it stops /metrics too.
    let _metrics = match config.metrics_addr {
        Some(addr) => Some(metrics::start(addr, queue.clone()).await?),
        None => None,
    };
    // The gallery stops with the gRPC server.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let _web = match web_listener {
        Some(l) => {
            let addr = l.local_addr()?;
            if !options.auth.is_enabled()
                && !addr.ip().is_loopback()
                && !config.auth.insecure_no_auth
            {
                return Err(CoordinatorError::Auth(format!(
                    "refusing to serve the web gallery on {addr} without authentication: pass \
                     --tokens-file, or --insecure-no-auth"
                )));
            }
            let state =
                web::WebState::new(queue.clone(), storage.clone(), options.auth.clone()).await;
            let mut rx = stop_rx.clone();
            Some(web::start(l, state, async move {
                let _ = rx.wait_for(|s| *s).await;
            })?)
        }
        None => None,
    };
    let sweeper = tokio::spawn(sweep_manifests(queue.clone(), storage.clone()));
    let service = FarmService::new(queue, storage, config.default_size);
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let served = serve_with_options(service, options, listener, shutdown).await;
    sweeper.abort();
    served
}

/// Writes manifests left due (their finisher died, or the write failed), as the workers also do,
/// so a farm whose workers are all gone still completes them.
async fn sweep_manifests(queue: Queue, storage: Storage) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match queue
            .sweep_manifests(&storage, std::time::Duration::from_secs(10), 64)
            .await
        {
            Ok(0) => {}
            Ok(n) => info!(manifests = n, "wrote manifests left due"),
            Err(e) => tracing::debug!(error = %e, "manifest sweep failed"),
        }
    }
}

/// Serves an already built service without authentication or TLS (tests use
/// this to inject a queue with short leases; see [`serve_with_options`]).
pub async fn serve_with(
    service: FarmService,
    max_message_bytes: usize,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), CoordinatorError> {
    serve_with_options(
        service,
        ServeOptions::insecure(max_message_bytes),
        listener,
        shutdown,
    )
    .await
}

/// Serves an already built service. Every Farm RPC goes through
/// `options.auth`; health and reflection do not. Graceful: on `shutdown` the
/// health status turns NOT_SERVING, open watch streams end, in-flight unary
/// calls finish, then it returns.
pub async fn serve_with_options(
    service: FarmService,
    options: ServeOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), CoordinatorError> {
    let ServeOptions {
        max_message_bytes,
        auth,
        tls,
    } = options;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<FarmServer<FarmService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pixfarm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let farm = FarmServer::new(metrics::Metered::new(service.clone()))
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    let farm = InterceptedService::new(farm, auth.clone());
    let addr = listener.local_addr()?;
    if !auth.is_enabled() {
        warn!(
            %addr,
            "AUTHENTICATION IS OFF: every caller is an admin of every tenant (dev/test mode)"
        );
    }
    let mut server = tonic::transport::Server::builder();
    match tls {
        Some(tls) => {
            server = server.tls_config(tls)?;
            info!(%addr, auth = auth.is_enabled(), "coordinator listening (gRPC over TLS)");
        }
        None => {
            warn!(%addr, auth = auth.is_enabled(), "coordinator listening on PLAINTEXT gRPC (no TLS)");
        }
    }
    let reloader = auth.spawn_reloader();
    let signal = async move {
        shutdown.await;
        info!("shutting down: draining in-flight requests");
        health.set_not_serving::<FarmServer<FarmService>>().await;
        service.close_streams();
    };
    let served = server
        .trace_fn(|req| tracing::info_span!("rpc", path = %req.uri().path()))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(farm)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal)
        .await;
    if let Some(r) = reloader {
        r.abort();
    }
    served?;
    info!("coordinator stopped");
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM (what Kubernetes and systemd send). The
/// handlers are installed when this is called, not when the future is first
/// polled, so a SIGTERM that arrives during start-up is not lost. Call it
/// inside a Tokio runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let (term, int) = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::terminate()).ok(),
            signal(SignalKind::interrupt()).ok(),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = wait(term) => {},
                _ = wait(int) => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
