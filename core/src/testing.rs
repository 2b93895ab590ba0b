//! Test harness: real `redis-server` and `s3s-fs` child processes on free ports, each with its own
//! temporary directory, killed by PID on drop. Enabled by the `testing` feature so the e2e suite
//! reuses it. No fakes: these are the real servers the farm runs against.
//!
//! ```no_run
//! # async fn t() -> std::io::Result<()> {
//! use pixfarm_core::testing::{RedisServer, S3Server};
//! let redis = RedisServer::start().await?;          // redis://127.0.0.1:<port>/
//! let s3 = S3Server::from_env_or_start().await?;    // PIXFARM_TEST_S3_ENDPOINT or a child s3s-fs
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
    /// Append-only file on (`appendfsync always`), so a restart keeps every acknowledged write.
    pub aof: bool,
}

/// A `redis-server` child process.
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    options: RedisOptions,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one without persistence.
    pub async fn start() -> io::Result<Self> {
        Self::start_with(RedisOptions::default()).await
    }

    pub async fn start_with(options: RedisOptions) -> io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let mut s = Self {
            port,
            dir,
            options,
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
                .arg("always");
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

    /// Kill, then start again.
    pub async fn restart(&mut self) -> io::Result<()> {
        self.stop();
        self.start_again().await
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// Access key of child s3s-fs servers.
pub const TEST_ACCESS_KEY: &str = "pixfarm-test";
/// Secret key of child s3s-fs servers.
pub const TEST_SECRET_KEY: &str = "pixfarm-test-secret";

/// An S3-compatible server: an `s3s-fs` child (which verifies SigV4 signatures) or the external one
/// named by `PIXFARM_TEST_S3_ENDPOINT` (with `PIXFARM_TEST_S3_ACCESS_KEY`/`_SECRET_KEY`, defaulting
/// to the test keys).
pub struct S3Server {
    endpoint: String,
    port: u16,
    access_key: String,
    secret_key: String,
    dir: Option<tempfile::TempDir>,
    child: Option<Child>,
}

impl S3Server {
    /// Uses `PIXFARM_TEST_S3_ENDPOINT` when set, else starts a child `s3s-fs`.
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
                    child: None,
                })
            }
            _ => Self::start().await,
        }
    }

    /// Starts a child `s3s-fs` on a free port with a fresh temporary root.
    pub async fn start() -> io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let mut s = Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            access_key: TEST_ACCESS_KEY.to_string(),
            secret_key: TEST_SECRET_KEY.to_string(),
            dir: Some(dir),
            child: None,
        };
        s.spawn().await?;
        Ok(s)
    }

    /// `s3s-fs` from `PIXFARM_S3S_FS`, `PATH` or `~/.cargo/bin`.
    fn binary() -> PathBuf {
        if let Some(p) = std::env::var_os("PIXFARM_S3S_FS") {
            return PathBuf::from(p);
        }
        if let Some(path) = std::env::var_os("PATH") {
            for d in std::env::split_paths(&path) {
                let c = d.join("s3s-fs");
                if c.is_file() {
                    return c;
                }
            }
        }
        if let Some(home) = std::env::var_os("HOME") {
            let c = Path::new(&home).join(".cargo/bin/s3s-fs");
            if c.is_file() {
                return c;
            }
        }
        PathBuf::from("s3s-fs")
    }

    async fn spawn(&mut self) -> io::Result<()> {
        let root = self
            .dir
            .as_ref()
            .ok_or_else(|| io::Error::other("external S3 server cannot be (re)started"))?;
        let mut child = Command::new(Self::binary())
            .arg("--host")
            .arg("127.0.0.1")
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--access-key")
            .arg(&self.access_key)
            .arg("--secret-key")
            .arg(&self.secret_key)
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot start s3s-fs (cargo install s3s-fs@0.14.1 --features binary --locked): {e}"),
                )
            })?;
        wait_for_port(self.port, &mut child, "s3s-fs").await?;
        self.child = Some(child);
        Ok(())
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The data directory of a child server (buckets are folders in it).
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

    /// Kills a child server (an outage).
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    /// Starts a stopped child server again, same port and data.
    pub async fn start_again(&mut self) -> io::Result<()> {
        if self.child.is_none() {
            self.spawn().await?;
        }
        Ok(())
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        kill(&mut self.child);
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
