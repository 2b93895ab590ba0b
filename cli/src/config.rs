//! Where the CLI finds the coordinator and its credentials.
//!
//! The token never comes from a command-line flag (those show in `ps` and in
//! shell history): it comes from `PIXFARM_TOKEN`, or from the config file
//! (`$PIXFARM_CONFIG`, else `$XDG_CONFIG_HOME/pixfarm/config.toml`, else
//! `~/.config/pixfarm/config.toml`):
//!
//! ```toml
//! coordinator = "https://farm.example.com:50051"
//! token = "pf_…"                 # keep the file mode 0600
//! ca = "/etc/pixfarm/ca.pem"     # CA that signed the coordinator's certificate
//! cert = "/etc/pixfarm/me.pem"   # client certificate, for mutual TLS
//! key = "/etc/pixfarm/me.key"
//! domain = "farm.example.com"    # name to verify, if not the URL's host
//! ```
//!
//! Flags and `PIXFARM_*` variables win over the file; relative paths in the
//! file are relative to the file.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

/// The config file, as written.
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub coordinator: Option<String>,
    pub token: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub domain: Option<String>,
}

/// Connection flags (everything but the token).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConnectArgs {
    /// Coordinator address (`host:port`, `http://host:port` or `https://host:port`)
    /// [default: the config file's, else 127.0.0.1:50051].
    #[arg(long, global = true, env = "PIXFARM_COORDINATOR")]
    pub coordinator: Option<String>,
    /// CA certificate (PEM) to verify the coordinator with; implies TLS.
    #[arg(long, global = true, env = "PIXFARM_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs --client-key.
    #[arg(long, global = true, env = "PIXFARM_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,
    /// Private key of --client-cert (PEM).
    #[arg(long, global = true, env = "PIXFARM_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,
    /// Config file [default: $XDG_CONFIG_HOME/pixfarm/config.toml or ~/.config/pixfarm/config.toml].
    #[arg(long, global = true, env = "PIXFARM_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Everything needed to open a channel to the coordinator.
#[derive(Clone, Default, PartialEq)]
pub struct ClientConfig {
    pub address: String,
    pub token: Option<String>,
    pub ca: Option<PathBuf>,
    pub identity: Option<(PathBuf, PathBuf)>,
    pub domain: Option<String>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca", &self.ca)
            .field("identity", &self.identity)
            .field("domain", &self.domain)
            .finish()
    }
}

impl ClientConfig {
    /// Plaintext, no token (tests, `pixfarm dev`).
    pub fn plain(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            ..Self::default()
        }
    }
}

pub const DEFAULT_COORDINATOR: &str = "127.0.0.1:50051";

/// The default config file path, if a home directory is known.
pub fn default_path() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(x) = env("XDG_CONFIG_HOME") {
        return Some(PathBuf::from(x).join("pixfarm/config.toml"));
    }
    env("HOME").map(|h| PathBuf::from(h).join(".config/pixfarm/config.toml"))
}

/// Reads a config file; relative paths in it are resolved against its folder.
pub fn load_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    let mut cfg: FileConfig = toml::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "the config file {} is not valid: {}",
            path.display(),
            e.message()
        )
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    for p in [&mut cfg.ca, &mut cfg.cert, &mut cfg.key]
        .into_iter()
        .flatten()
    {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    if cfg.token.is_some() {
        warn_if_readable_by_others(path);
    }
    Ok(cfg)
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o077 != 0
    {
        eprintln!(
            "warning: {} holds a token but other users may read it; run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &Path) {}

/// Flags and environment over the config file over defaults. `env_token` is
/// `PIXFARM_TOKEN` (passed in so tests need not mutate the environment).
pub fn resolve(args: &ConnectArgs, env_token: Option<String>) -> anyhow::Result<ClientConfig> {
    let file = match &args.config {
        // An explicitly named file must exist.
        Some(p) => load_file(p)?,
        None => match default_path() {
            Some(p) if p.exists() => load_file(&p)?,
            _ => FileConfig::default(),
        },
    };
    merge(args, env_token, file)
}

/// The precedence rules, without any file system access.
pub fn merge(
    args: &ConnectArgs,
    env_token: Option<String>,
    file: FileConfig,
) -> anyhow::Result<ClientConfig> {
    let token = env_token
        .filter(|t| !t.trim().is_empty())
        .or(file.token)
        .map(|t| t.trim().to_string());
    if let Some(t) = &token
        && t.chars().any(|c| !c.is_ascii_graphic())
    {
        bail!(
            "the token (PIXFARM_TOKEN or the config file's `token`) must be printable ASCII without spaces"
        );
    }
    let cert = args.client_cert.clone().or(file.cert);
    let key = args.client_key.clone().or(file.key);
    let identity = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => bail!(
            "a client certificate needs both --client-cert and --client-key (or `cert` and `key` in the config file)"
        ),
    };
    Ok(ClientConfig {
        address: args
            .coordinator
            .clone()
            .or(file.coordinator)
            .unwrap_or_else(|| DEFAULT_COORDINATOR.to_string()),
        token,
        ca: args.ca_file.clone().or(file.ca),
        identity,
        domain: file.domain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_env_and_flags_over_file() {
        let file = FileConfig {
            coordinator: Some("https://farm:1".into()),
            token: Some("from-file".into()),
            ca: Some("/f/ca.pem".into()),
            ..FileConfig::default()
        };
        let c = merge(&ConnectArgs::default(), None, file.clone()).unwrap();
        assert_eq!(c.address, "https://farm:1");
        assert_eq!(c.token.as_deref(), Some("from-file"));
        assert_eq!(c.ca.as_deref(), Some(Path::new("/f/ca.pem")));

        let args = ConnectArgs {
            coordinator: Some("h:2".into()),
            ca_file: Some("/x/ca.pem".into()),
            ..ConnectArgs::default()
        };
        let c = merge(&args, Some("from-env".into()), file).unwrap();
        assert_eq!(c.address, "h:2");
        assert_eq!(c.token.as_deref(), Some("from-env"));
        assert_eq!(c.ca.as_deref(), Some(Path::new("/x/ca.pem")));
        assert!(
            !format!("{c:?}").contains("from-env"),
            "Debug hides the token"
        );

        let c = merge(&ConnectArgs::default(), None, FileConfig::default()).unwrap();
        assert_eq!(c.address, DEFAULT_COORDINATOR);
        assert!(c.token.is_none());
    }

    #[test]
    fn file_paths_are_relative_to_the_file_and_errors_name_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.toml");
        std::fs::write(&p, "coordinator = \"https://f:1\"\nca = \"ca.pem\"\n").unwrap();
        let f = load_file(&p).unwrap();
        assert_eq!(f.ca, Some(dir.path().join("ca.pem")));
        std::fs::write(&p, "tokn = \"x\"\n").unwrap();
        let e = load_file(&p).unwrap_err().to_string();
        assert!(e.contains("config.toml") && e.contains("tokn"), "{e}");
        let half = ConnectArgs {
            client_cert: Some("/c.pem".into()),
            ..ConnectArgs::default()
        };
        assert!(merge(&half, None, FileConfig::default()).is_err());
        assert!(
            merge(
                &ConnectArgs::default(),
                Some("a b".into()),
                FileConfig::default()
            )
            .is_err()
        );
    }
}
