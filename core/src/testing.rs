//! Test harness: a real `redis-server` child process and a real S3 server (the `s3s-fs` library,
//! served on a TCP port inside the test process, SigV4 checked) on free ports, each with its own
//! temporary directory, stopped on drop. Enabled by the `testing` feature so the e2e suite reuses
//! it. No fakes: these are the real servers the farm runs against, and nothing to install but
//! `redis-server`.
//!
//! ```no_run
//! # async fn t() -> std::io::Result<()> {
//! use pixfarm_core::testing::{RedisServer, S3Server};
//! let redis = RedisServer::start().await?;          // redis://127.0.0.1:<port>/
//! let s3 = S3Server::from_env_or_start().await?;    // PIXFARM_TEST_S3_ENDPOINT or in-process s3s-fs
//! let storage_url = s3.storage_url("results");      // s3://results
//! let options = s3.storage_options();               // endpoint, credentials, create_bucket
//! # Ok(()) }
//! ```

use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::storage::StorageOptions;

/// A free TCP port on 127.0.0.1 (bound and released; a tiny race with other processes remains).
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn wait_for_port(port: u16, child: &mut Child, what: &str) -> io::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            return Err(io::Error::other(format!(
                "{what} exited during start-up: {status}"
            )));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "{what} did not listen on port {port} within 20 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Options of a [`RedisServer`].
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// Append-only file on (`appendfsync always`, unless started with
    /// [`RedisServer::start_with_fsync`]), so a restart keeps every acknowledged write.
    pub aof: bool,
}

/// When an AOF server fsyncs its append-only file (`appendfsync`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AppendFsync {
    /// After every write: a restart keeps every acknowledged write.
    #[default]
    Always,
    /// Once a second (the production default): a machine crash may lose the last second.
    EverySec,
}

/// A `redis-server` child process.
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    options: RedisOptions,
    fsync: AppendFsync,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one without persistence.
    pub async fn start() -> io::Result<Self> {
        Self::start_with(RedisOptions::default()).await
    }

    pub async fn start_with(options: RedisOptions) -> io::Result<Self> {
        Self::start_with_fsync(options, AppendFsync::Always).await
    }

    /// Like [`start_with`](Self::start_with), with the AOF's fsync policy (when `options.aof`).
    pub async fn start_with_fsync(options: RedisOptions, fsync: AppendFsync) -> io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let mut s = Self {
            port,
            dir,
            options,
            fsync,
            child: None,
        };
        s.spawn().await?;
        Ok(s)
    }

    fn binary() -> PathBuf {
        std::env::var_os("PIXFARM_REDIS_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("redis-server"))
    }

    async fn spawn(&mut self) -> io::Result<()> {
        let mut cmd = Command::new(Self::binary());
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--save")
            .arg("")
            .arg("--daemonize")
            .arg("no")
            .arg("--loglevel")
            .arg("warning")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.options.aof {
            cmd.arg("--appendonly")
                .arg("yes")
                .arg("--appendfsync")
                .arg(match self.fsync {
                    AppendFsync::Always => "always",
                    AppendFsync::EverySec => "everysec",
                })
                // No background rewrite: `crash_losing_last` copies the AOF files as they are.
                .arg("--auto-aof-rewrite-percentage")
                .arg("0");
        } else {
            cmd.arg("--appendonly").arg("no");
        }
        let mut child = cmd.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot start redis-server (apt install redis-server): {e}"),
            )
        })?;
        wait_for_port(self.port, &mut child, "redis-server").await?;
        self.child = Some(child);
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Kills the server (SIGKILL: like a crash; with AOF every write is already on disk).
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    /// Starts it again on the same port and directory (data survives with AOF).
    pub async fn start_again(&mut self) -> io::Result<()> {
        if self.child.is_none() {
            self.spawn().await?;
        }
        Ok(())
    }

    /// A machine crash of an AOF server: the writes of the last `window` are lost, as with
    /// `appendfsync everysec` when the host (not just the process) dies. The AOF directory is
    /// copied, the server runs on for `window`, then it is killed, the copy put back, and it starts
    /// again from the copy (a command cut off mid-copy is dropped: `aof-load-truncated`).
    pub async fn crash_losing_last(&mut self, window: Duration) -> io::Result<()> {
        let aof = self.dir.path().join("appendonlydir");
        let saved = self.dir.path().join("appendonlydir.saved");
        let _ = std::fs::remove_dir_all(&saved);
        copy_dir(&aof, &saved)?;
        tokio::time::sleep(window).await;
        self.stop();
        std::fs::remove_dir_all(&aof)?;
        std::fs::rename(&saved, &aof)?;
        self.start_again().await
    }

    /// Kill, then start again.
    pub async fn restart(&mut self) -> io::Result<()> {
        self.stop();
        self.start_again().await
    }
}

fn copy_dir(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// Access key of the in-process S3 servers.
pub const TEST_ACCESS_KEY: &str = "pixfarm-test";
/// Secret key of the in-process S3 servers.
pub const TEST_SECRET_KEY: &str = "pixfarm-test-secret";

/// A running in-process `s3s-fs`: its own thread and tokio runtime (so a test that blocks its own
/// runtime, or a worker child process, still reaches it), stopped by a shutdown signal.
struct Served {
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Served {
    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            // The runtime is dropped on that thread: every open connection is closed, like a crash.
            let _ = t.join();
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves the `s3s-fs` library (a real S3 implementation over a directory, SigV4 signatures
/// checked against one access/secret key pair) on `listener` until the returned handle is stopped.
fn serve_s3s_fs(
    listener: TcpListener,
    root: &Path,
    access_key: &str,
    secret_key: &str,
) -> io::Result<Served> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder as ConnBuilder;

    let fs = s3s_fs::FileSystem::new(root)
        .map_err(|e| io::Error::other(format!("s3s-fs on {}: {e:?}", root.display())))?;
    let service = {
        let mut b = s3s::service::S3ServiceBuilder::new(fs);
        b.set_auth(s3s::auth::SimpleAuth::from_single(
            access_key.to_owned(),
            secret_key.to_owned(),
        ));
        b.build()
    };
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("test-s3")
        .enable_all()
        .build()?;
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("test-s3".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("test S3 server: {e}");
                        return;
                    }
                };
                let http = ConnBuilder::new(TokioExecutor::new());
                loop {
                    tokio::select! {
                        _ = &mut rx => break,
                        accepted = listener.accept() => {
                            let Ok((socket, _)) = accepted else { continue };
                            let conn = http
                                .serve_connection(TokioIo::new(socket), service.clone())
                                .into_owned();
                            tokio::spawn(async move {
                                let _ = conn.await;
                            });
                        }
                    }
                }
            });
            // Dropping the runtime here cancels the connection tasks and closes their sockets.
            drop(runtime);
        })?;
    Ok(Served {
        shutdown: Some(tx),
        thread: Some(thread),
    })
}

/// An S3-compatible server: the `s3s-fs` library served on a real TCP port inside the test
/// process (it verifies SigV4 signatures; nothing to install), or the external one named by
/// `PIXFARM_TEST_S3_ENDPOINT` (with `PIXFARM_TEST_S3_ACCESS_KEY`/`_SECRET_KEY`, defaulting to the
/// test keys), which `.ci/run` starts once for the whole run.
pub struct S3Server {
    endpoint: String,
    port: u16,
    access_key: String,
    secret_key: String,
    dir: Option<tempfile::TempDir>,
    served: Option<Served>,
}

impl S3Server {
    /// Uses `PIXFARM_TEST_S3_ENDPOINT` when set, else serves one in this process.
    pub async fn from_env_or_start() -> io::Result<Self> {
        match std::env::var("PIXFARM_TEST_S3_ENDPOINT") {
            Ok(ep) if !ep.is_empty() => {
                let port = ep
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.trim_end_matches('/').parse().ok())
                    .unwrap_or(0);
                Ok(Self {
                    endpoint: ep.trim_end_matches('/').to_string(),
                    port,
                    access_key: std::env::var("PIXFARM_TEST_S3_ACCESS_KEY")
                        .unwrap_or_else(|_| TEST_ACCESS_KEY.to_string()),
                    secret_key: std::env::var("PIXFARM_TEST_S3_SECRET_KEY")
                        .unwrap_or_else(|_| TEST_SECRET_KEY.to_string()),
                    dir: None,
                    served: None,
                })
            }
            _ => Self::start().await,
        }
    }

    /// Serves a private `s3s-fs` on a free port of 127.0.0.1 with a fresh temporary root.
    pub async fn start() -> io::Result<Self> {
        Self::start_at(tempfile::tempdir()?, 0, TEST_ACCESS_KEY, TEST_SECRET_KEY)
    }

    /// Serves `root` on `127.0.0.1:port` (0: a free one) with the given keys, keeping `root`.
    pub fn serve_dir(
        root: &Path,
        port: u16,
        access_key: &str,
        secret_key: &str,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        let port = listener.local_addr()?.port();
        let served = serve_s3s_fs(listener, root, access_key, secret_key)?;
        Ok(Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            access_key: access_key.to_string(),
            secret_key: secret_key.to_string(),
            dir: None,
            served: Some(served),
        })
    }

    fn start_at(dir: tempfile::TempDir, port: u16, ak: &str, sk: &str) -> io::Result<Self> {
        let mut s = Self::serve_dir(dir.path(), port, ak, sk)?;
        s.dir = Some(dir);
        Ok(s)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory of a private server (buckets are folders in it).
    pub fn root(&self) -> Option<&Path> {
        self.dir.as_ref().map(|d| d.path())
    }

    /// `s3://{bucket}`.
    pub fn storage_url(&self, bucket: &str) -> String {
        format!("s3://{bucket}")
    }

    /// Options that reach this server: endpoint, static credentials, path style, bucket creation,
    /// and a retry budget that outlasts a 10 s outage.
    pub fn storage_options(&self) -> StorageOptions {
        StorageOptions {
            endpoint: Some(self.endpoint.clone()),
            region: Some("us-east-1".to_string()),
            force_path_style: Some(true),
            access_key_id: Some(self.access_key.clone()),
            secret_access_key: Some(self.secret_key.clone()),
            create_bucket: true,
            retry: crate::storage::RetryPolicy {
                initial: Duration::from_millis(50),
                max_delay: Duration::from_secs(1),
                max_elapsed: Duration::from_secs(120),
            },
            presign_expiry: Duration::from_secs(600),
        }
    }

    /// Environment for child processes (workers, coordinator) so they reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("PIXFARM_S3_ENDPOINT".into(), self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID".into(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key.clone()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("PIXFARM_S3_CREATE_BUCKET".into(), "true".into()),
        ]
    }

    /// Stops a private server (an outage): the port closes and open connections are dropped.
    pub fn stop(&mut self) {
        if let Some(mut s) = self.served.take() {
            s.stop();
        }
    }

    /// Serves a stopped private server again, same port and data.
    pub async fn start_again(&mut self) -> io::Result<()> {
        if self.served.is_some() {
            return Ok(());
        }
        let root = self
            .dir
            .as_ref()
            .ok_or_else(|| io::Error::other("external S3 server cannot be (re)started"))?;
        let listener = TcpListener::bind(("127.0.0.1", self.port))?;
        self.served = Some(serve_s3s_fs(
            listener,
            root.path(),
            &self.access_key,
            &self.secret_key,
        )?);
        Ok(())
    }
}

/// A minimal HTTP/1.1 GET (for checking presigned URLs against the local server without an HTTP
/// client dependency). Returns the status code and body.
pub async fn http_get(url: &str) -> io::Result<(u16, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| io::Error::other(format!("only http:// URLs are supported: {url}")))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut s = tokio::net::TcpStream::connect(host).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| io::Error::other("malformed HTTP response"))?;
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other("malformed HTTP status line"))?;
    let mut body = buf[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Ok((status, body))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..i]).trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        let start = i + 2;
        out.extend_from_slice(&b[start..(start + n).min(b.len())]);
        b = &b[(start + n + 2).min(b.len())..];
    }
    out
}
