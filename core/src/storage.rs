//! Object storage for results: S3 (any S3-compatible server, through `aws-sdk-s3`) or a local
//! folder (`file://`, for `pixfarm dev` and one-machine use).
//!
//! Every write retries with exponential back-off for a bounded time ([`RetryPolicy`]), so an S3
//! outage of seconds to minutes delays work instead of losing it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use tracing::{debug, warn};

use crate::error::{CoreError, Result};

/// Back-off for storage calls: `initial`, doubling up to `max_delay`, giving up after `max_elapsed`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max_delay: Duration,
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            max_elapsed: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// Runs `op` until it succeeds, returns a permanent error, or `max_elapsed` has passed.
    /// Uses tokio time so paused-time tests can drive it.
    pub async fn run<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, OpError>>,
    {
        let start = tokio::time::Instant::now();
        let mut delay = self.initial;
        let mut attempt = 1u32;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(OpError::Permanent(m)) => {
                    return Err(CoreError::Storage(format!("{what}: {m}")));
                }
                Err(OpError::Transient(m)) => {
                    if start.elapsed() + delay > self.max_elapsed {
                        return Err(CoreError::Storage(format!(
                            "{what}: gave up after {attempt} attempts over {:.1}s: {m}",
                            start.elapsed().as_secs_f64()
                        )));
                    }
                    warn!(what, attempt, delay_ms = delay.as_millis() as u64, error = %m, "storage call failed, retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.max_delay);
                    attempt += 1;
                }
            }
        }
    }
}

/// A storage operation's failure, classified for [`RetryPolicy::run`].
/// What [`Storage::put_new`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutNew {
    /// The object was stored.
    Created,
    /// An object was already there; it was left as it was.
    Exists,
}

#[derive(Debug)]
pub enum OpError {
    Transient(String),
    Permanent(String),
}

/// How to reach S3. Built from the environment by [`StorageOptions::from_env`], or directly in
/// tests (so tests never mutate the process environment).
#[derive(Clone, Default)]
pub struct StorageOptions {
    /// Custom endpoint (`http://127.0.0.1:9000`); `None`: AWS.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`); defaults to on with a custom endpoint.
    pub force_path_style: Option<bool>,
    /// Static credentials; `None`: the standard AWS provider chain (env vars, profile, IMDS...).
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Create the bucket when it does not exist (dev/test convenience).
    pub create_bucket: bool,
    pub retry: RetryPolicy,
    /// Lifetime of presigned URLs.
    pub presign_expiry: Duration,
}

impl std::fmt::Debug for StorageOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageOptions")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("force_path_style", &self.force_path_style)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("create_bucket", &self.create_bucket)
            .field("retry", &self.retry)
            .field("presign_expiry", &self.presign_expiry)
            .finish()
    }
}

impl StorageOptions {
    /// Reads `PIXFARM_S3_ENDPOINT` (or `AWS_ENDPOINT_URL`), `AWS_REGION` (or
    /// `AWS_DEFAULT_REGION`), `PIXFARM_S3_PATH_STYLE` (`true`/`false`) and
    /// `PIXFARM_S3_CREATE_BUCKET`. Credentials come from the AWS chain at connect time.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let flag = |k: &str| {
            var(k).map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
        };
        Self {
            endpoint: var("PIXFARM_S3_ENDPOINT").or_else(|| var("AWS_ENDPOINT_URL")),
            region: var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")),
            force_path_style: flag("PIXFARM_S3_PATH_STYLE"),
            access_key_id: None,
            secret_access_key: None,
            create_bucket: flag("PIXFARM_S3_CREATE_BUCKET").unwrap_or(false),
            retry: RetryPolicy::default(),
            presign_expiry: Duration::from_secs(3600),
        }
    }
}

/// A parsed storage URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageUrl {
    /// `file:///abs/dir`.
    File(PathBuf),
    /// `s3://bucket/optional/prefix`.
    S3 { bucket: String, prefix: String },
}

impl StorageUrl {
    pub fn parse(url: &str) -> Result<Self> {
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(CoreError::Config(format!(
                    "storage URL `{url}`: a file URL needs an absolute path, like file:///var/pixfarm"
                )));
            }
            return Ok(StorageUrl::File(PathBuf::from(path)));
        }
        if url.starts_with("s3://") {
            let (bucket, prefix) = parse_s3_uri(url)
                .map_err(|m| CoreError::Config(format!("storage URL `{url}`: {m}")))?;
            return Ok(StorageUrl::S3 {
                bucket,
                prefix: prefix.trim_end_matches('/').to_string(),
            });
        }
        Err(CoreError::Config(format!(
            "storage URL `{url}` is neither file:///absolute/dir nor s3://bucket/prefix"
        )))
    }
}

/// Splits `s3://bucket/key` into bucket and key (the key may be empty for a storage URL).
pub fn parse_s3_uri(uri: &str) -> std::result::Result<(String, String), String> {
    let rest = uri
        .strip_prefix("s3://")
        .ok_or_else(|| format!("`{uri}` must start with s3://"))?;
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if !valid_bucket {
        return Err(format!("`{bucket}` is not a valid bucket name"));
    }
    Ok((bucket.to_string(), key.to_string()))
}

/// Where results go. Cheap to clone (the S3 client is reference-counted).
#[derive(Debug, Clone)]
pub enum Storage {
    File(FileStore),
    S3(S3Store),
}

impl Storage {
    /// Opens the store named by `url`, with S3 options from the environment.
    pub async fn open(url: &str) -> Result<Self> {
        Self::open_with(url, StorageOptions::from_env()).await
    }

    /// Opens the store named by `url` with explicit options.
    pub async fn open_with(url: &str, options: StorageOptions) -> Result<Self> {
        match StorageUrl::parse(url)? {
            StorageUrl::File(root) => Ok(Storage::File(FileStore::new(root, options.retry).await?)),
            StorageUrl::S3 { bucket, prefix } => Ok(Storage::S3(
                S3Store::connect(bucket, prefix, options).await?,
            )),
        }
    }

    /// Stores `data` under `key`, retrying transient failures.
    pub async fn put(&self, key: &str, data: Bytes, content_type: &str) -> Result<()> {
        match self {
            Storage::File(s) => s.put(key, data).await,
            Storage::S3(s) => s.put(key, data, content_type).await,
        }
    }

    /// Stores `data` at `key` only if nothing is there yet (S3 `If-None-Match: *`; a hard link on
    /// a file store), so the first stored copy of an object is never replaced. A rendered image is
    /// written this way: a second render of the same task (a redelivery, a lease race, a CPU and a
    /// GPU worker whose PNGs differ) finds the first one and records *its* bytes, so the stored
    /// object always matches its recorded sha256. Retries like [`Storage::put`].
    pub async fn put_new(&self, key: &str, data: Bytes, content_type: &str) -> Result<PutNew> {
        match self {
            Storage::File(s) => s.put_new(key, data).await,
            Storage::S3(s) => s.put_new(key, data, content_type).await,
        }
    }

    /// Reads the object at `key`; `NotFound` when absent.
    pub async fn get(&self, key: &str) -> Result<Bytes> {
        match self {
            Storage::File(s) => s.get(key).await,
            Storage::S3(s) => s.get(key).await,
        }
    }

    /// Whether an object exists at `key`.
    pub async fn exists(&self, key: &str) -> Result<bool> {
        match self {
            Storage::File(s) => Ok(tokio::fs::try_exists(s.path(key)?).await?),
            Storage::S3(s) => s.exists(key).await,
        }
    }

    /// Removes the object at `key` (absent is fine).
    pub async fn delete(&self, key: &str) -> Result<()> {
        match self {
            Storage::File(s) => match tokio::fs::remove_file(s.path(key)?).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e.into()),
            },
            Storage::S3(s) => s.delete(key).await,
        }
    }

    /// A URL a client can GET the object from: presigned for S3, `file://` for local stores.
    pub async fn presign_get(&self, key: &str) -> Result<String> {
        match self {
            Storage::File(s) => Ok(format!("file://{}", s.path(key)?.display())),
            Storage::S3(s) => s.presign_get(key, s.presign_expiry).await,
        }
    }

    /// Reads an `s3://bucket/key` URI (control images). Only S3 stores can.
    pub async fn get_uri(&self, uri: &str) -> Result<Bytes> {
        let (bucket, key) = parse_s3_uri(uri).map_err(CoreError::Storage)?;
        match self {
            Storage::S3(s) => s.get_from(&bucket, &key).await,
            Storage::File(_) => Err(CoreError::Storage(format!(
                "cannot read {uri}: this farm stores to a local folder, not S3"
            ))),
        }
    }

    /// Where `tenant`'s results live as an `s3://` prefix (what its control images may name, see
    /// [`crate::control_access`]); `None` for a file store.
    pub fn tenant_root(&self, tenant: &str) -> Option<String> {
        match self {
            Storage::File(_) => None,
            Storage::S3(s) => Some(format!("s3://{}/{}/", s.bucket, s.full_key(tenant))),
        }
    }

    /// The location, for logs and `pixfarm dev` ("images are in ...").
    pub fn describe(&self) -> String {
        match self {
            Storage::File(s) => format!("file://{}", s.root.display()),
            Storage::S3(s) if s.prefix.is_empty() => format!("s3://{}", s.bucket),
            Storage::S3(s) => format!("s3://{}/{}", s.bucket, s.prefix),
        }
    }
}

/// A local folder. Writes go to a temporary file and are renamed into place, so readers never see
/// a half-written PNG and a retried put is idempotent.
#[derive(Debug, Clone)]
pub struct FileStore {
    root: PathBuf,
    retry: RetryPolicy,
}

impl FileStore {
    pub async fn new(root: PathBuf, retry: RetryPolicy) -> Result<Self> {
        tokio::fs::create_dir_all(&root).await.map_err(|e| {
            CoreError::Config(format!(
                "cannot create the storage folder {}: {e}",
                root.display()
            ))
        })?;
        Ok(Self { root, retry })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of `key`, refusing keys that would escape the root.
    pub fn path(&self, key: &str) -> Result<PathBuf> {
        if key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == "..")
        {
            return Err(CoreError::Storage(format!("invalid object key `{key}`")));
        }
        Ok(self.root.join(key))
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let path = self.path(key)?;
        self.retry
            .run(&format!("write {}", path.display()), || {
                let path = path.clone();
                let data = data.clone();
                async move {
                    let tmp = write_beside(&path, &data).await?;
                    tokio::fs::rename(&tmp, &path).await.map_err(classify_io)
                }
            })
            .await
    }

    async fn put_new(&self, key: &str, data: Bytes) -> Result<PutNew> {
        let path = self.path(key)?;
        self.retry
            .run(&format!("write {}", path.display()), || {
                let path = path.clone();
                let data = data.clone();
                async move {
                    let tmp = write_beside(&path, &data).await?;
                    // link(2) fails if the name exists: the whole file appears at once, or not.
                    let linked = tokio::fs::hard_link(&tmp, &path).await;
                    let _ = tokio::fs::remove_file(&tmp).await;
                    match linked {
                        Ok(()) => Ok(PutNew::Created),
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                            Ok(PutNew::Exists)
                        }
                        Err(e) => Err(classify_io(e)),
                    }
                }
            })
            .await
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        let path = self.path(key)?;
        match tokio::fs::read(&path).await {
            Ok(b) => Ok(Bytes::from(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(CoreError::not_found("object", key))
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// An S3 bucket (with an optional key prefix inside it).
#[derive(Debug, Clone)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    /// Prepended to every key (`s3://bucket/prefix`).
    prefix: String,
    retry: RetryPolicy,
    presign_expiry: Duration,
}

impl S3Store {
    /// Builds the client (and creates the bucket when `options.create_bucket`).
    pub async fn connect(bucket: String, prefix: String, options: StorageOptions) -> Result<Self> {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let (Some(ak), Some(sk)) = (&options.access_key_id, &options.secret_access_key) {
            loader = loader.credentials_provider(aws_credential_types::Credentials::new(
                ak.clone(),
                sk.clone(),
                None,
                None,
                "pixfarm-static",
            ));
        }
        let region = options
            .region
            .clone()
            .unwrap_or_else(|| "us-east-1".to_string());
        loader = loader.region(aws_config::Region::new(region));
        if let Some(ep) = &options.endpoint {
            loader = loader.endpoint_url(ep.clone());
        }
        let shared = loader.load().await;
        let path_style = options
            .force_path_style
            .unwrap_or(options.endpoint.is_some());
        let conf = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(path_style)
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(60))
                    .build(),
            )
            // Our own back-off (RetryPolicy) spans outages; the SDK retries only quick blips.
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(2))
            .build();
        let store = Self {
            client: aws_sdk_s3::Client::from_conf(conf),
            bucket,
            prefix,
            retry: options.retry,
            presign_expiry: options.presign_expiry,
        };
        if options.create_bucket {
            store.ensure_bucket().await?;
        }
        Ok(store)
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    /// Creates the bucket unless it exists.
    pub async fn ensure_bucket(&self) -> Result<()> {
        let bucket = self.bucket.clone();
        self.retry
            .run(&format!("create bucket {bucket}"), || async {
                match self.client.head_bucket().bucket(&bucket).send().await {
                    Ok(_) => return Ok(()),
                    Err(e) => {
                        let not_found = e
                            .as_service_error()
                            .map(|s| s.is_not_found())
                            .unwrap_or(false);
                        if !not_found {
                            return Err(classify(&e));
                        }
                    }
                }
                match self.client.create_bucket().bucket(&bucket).send().await {
                    Ok(_) => Ok(()),
                    Err(e) => {
                        let code = e.code().unwrap_or_default();
                        if code == "BucketAlreadyOwnedByYou" || code == "BucketAlreadyExists" {
                            Ok(())
                        } else {
                            Err(classify(&e))
                        }
                    }
                }
            })
            .await
    }

    async fn put(&self, key: &str, data: Bytes, content_type: &str) -> Result<()> {
        let full = self.full_key(key);
        self.retry
            .run(&format!("put s3://{}/{full}", self.bucket), || {
                let body = ByteStream::from(data.clone());
                let full = full.clone();
                async move {
                    self.client
                        .put_object()
                        .bucket(&self.bucket)
                        .key(full)
                        .content_type(content_type)
                        .body(body)
                        .send()
                        .await
                        .map(|_| ())
                        .map_err(|e| classify(&e))
                }
            })
            .await?;
        debug!(key = %full, bytes = data.len(), "stored");
        Ok(())
    }

    async fn put_new(&self, key: &str, data: Bytes, content_type: &str) -> Result<PutNew> {
        let full = self.full_key(key);
        let made = self
            .retry
            .run(
                &format!("put s3://{}/{full} (if absent)", self.bucket),
                || {
                    let body = ByteStream::from(data.clone());
                    let full = full.clone();
                    async move {
                        let r = self
                            .client
                            .put_object()
                            .bucket(&self.bucket)
                            .key(full)
                            .content_type(content_type)
                            .if_none_match("*")
                            .body(body)
                            .send()
                            .await;
                        match r {
                            Ok(_) => Ok(PutNew::Created),
                            Err(e) if precondition_failed(&e) => Ok(PutNew::Exists),
                            Err(e) => Err(classify(&e)),
                        }
                    }
                },
            )
            .await?;
        debug!(key = %full, bytes = data.len(), ?made, "stored if absent");
        Ok(made)
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        let full = self.full_key(key);
        let bucket = self.bucket.clone();
        self.get_from(&bucket, &full).await
    }

    /// Reads `bucket/key` (the key is taken as is, without this store's prefix).
    pub async fn get_from(&self, bucket: &str, key: &str) -> Result<Bytes> {
        let what = format!("get s3://{bucket}/{key}");
        let res = self
            .retry
            .run(&what, || async {
                match self
                    .client
                    .get_object()
                    .bucket(bucket)
                    .key(key)
                    .send()
                    .await
                {
                    Ok(out) => out
                        .body
                        .collect()
                        .await
                        .map(|b| Some(b.into_bytes()))
                        .map_err(|e| OpError::Transient(e.to_string())),
                    Err(e) => {
                        if e.as_service_error()
                            .map(|s| s.is_no_such_key())
                            .unwrap_or(false)
                        {
                            Ok(None)
                        } else {
                            Err(classify(&e))
                        }
                    }
                }
            })
            .await?;
        res.ok_or_else(|| CoreError::not_found("object", format!("s3://{bucket}/{key}")))
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        let full = self.full_key(key);
        self.retry
            .run(&format!("head s3://{}/{full}", self.bucket), || async {
                match self
                    .client
                    .head_object()
                    .bucket(&self.bucket)
                    .key(&full)
                    .send()
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(e) => {
                        if e.as_service_error()
                            .map(|s| s.is_not_found())
                            .unwrap_or(false)
                        {
                            Ok(false)
                        } else {
                            Err(classify(&e))
                        }
                    }
                }
            })
            .await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let full = self.full_key(key);
        self.retry
            .run(&format!("delete s3://{}/{full}", self.bucket), || async {
                self.client
                    .delete_object()
                    .bucket(&self.bucket)
                    .key(&full)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| classify(&e))
            })
            .await
    }

    /// A presigned GET URL valid for `expires`.
    pub async fn presign_get(&self, key: &str, expires: Duration) -> Result<String> {
        let conf =
            PresigningConfig::expires_in(expires).map_err(|e| CoreError::Config(e.to_string()))?;
        let req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .presigned(conf)
            .await
            .map_err(|e| {
                CoreError::Storage(format!("presign {key}: {}", DisplayErrorContext(&e)))
            })?;
        Ok(req.uri().to_string())
    }
}

/// Classifies an SDK error: client mistakes (access denied, bad request) are permanent; dispatch
/// failures, timeouts, throttling and 5xx are transient.
/// Permission problems will not go away; anything else on a local disk may.
fn classify_io(e: std::io::Error) -> OpError {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::InvalidInput => {
            OpError::Permanent(e.to_string())
        }
        _ => OpError::Transient(e.to_string()),
    }
}

/// Writes `data` to a fresh temporary file beside `path` (creating the folder), so it can be moved
/// or linked into place whole.
async fn write_beside(path: &Path, data: &[u8]) -> std::result::Result<PathBuf, OpError> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(classify_io)?;
    }
    let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
    tokio::fs::write(&tmp, data).await.map_err(classify_io)?;
    Ok(tmp)
}

/// S3's answer to `If-None-Match: *` when the object exists (HTTP 412).
fn precondition_failed<E, R>(e: &aws_sdk_s3::error::SdkError<E, R>) -> bool
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match e {
        aws_sdk_s3::error::SdkError::ServiceError(s) => {
            s.err().code() == Some("PreconditionFailed")
        }
        _ => false,
    }
}

fn classify<E, R>(e: &aws_sdk_s3::error::SdkError<E, R>) -> OpError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_s3::error::SdkError;
    let msg = DisplayErrorContext(e).to_string();
    match e {
        SdkError::ServiceError(s) => {
            let code = s.err().code().unwrap_or_default();
            let permanent = matches!(
                code,
                "AccessDenied"
                    | "InvalidAccessKeyId"
                    | "SignatureDoesNotMatch"
                    | "NoSuchBucket"
                    | "InvalidBucketName"
                    | "InvalidArgument"
                    | "InvalidRequest"
                    | "EntityTooLarge"
            );
            if permanent {
                OpError::Permanent(msg)
            } else {
                OpError::Transient(msg)
            }
        }
        SdkError::ConstructionFailure(_) => OpError::Permanent(msg),
        _ => OpError::Transient(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(
            StorageUrl::parse("file:///tmp/x").unwrap(),
            StorageUrl::File("/tmp/x".into())
        );
        assert_eq!(
            StorageUrl::parse("s3://my-bucket/a/b/").unwrap(),
            StorageUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            StorageUrl::parse("s3://my-bucket").unwrap(),
            StorageUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: String::new()
            }
        );
        assert!(StorageUrl::parse("file://relative").is_err());
        assert!(StorageUrl::parse("http://x").is_err());
        assert!(StorageUrl::parse("s3://A_B").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn retry_backs_off_then_succeeds_or_gives_up() {
        let p = RetryPolicy {
            initial: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            max_elapsed: Duration::from_secs(10),
        };
        let start = tokio::time::Instant::now();
        let mut n = 0;
        let v = p
            .run("x", || {
                n += 1;
                let k = n;
                async move {
                    if k < 5 {
                        Err(OpError::Transient("down".into()))
                    } else {
                        Ok(k)
                    }
                }
            })
            .await
            .unwrap();
        assert_eq!(v, 5);
        // 100 + 200 + 400 + 800 ms of back-off.
        assert_eq!(start.elapsed(), Duration::from_millis(1500));

        let start = tokio::time::Instant::now();
        let err = p
            .run("y", || async {
                Err::<(), _>(OpError::Transient("down".into()))
            })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("gave up"), "{err}");
        assert!(start.elapsed() <= Duration::from_secs(10));
        assert!(start.elapsed() >= Duration::from_secs(9));

        let err = p
            .run("z", || async {
                Err::<(), _>(OpError::Permanent("denied".into()))
            })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("denied"));
    }
}
