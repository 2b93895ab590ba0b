//! TLS for the coordinator's gRPC port, optionally mutual (client certificates
//! checked against a CA).
//!
//! Files are PEM. Without `--tls-cert` the coordinator speaks plaintext HTTP/2
//! and says so at start-up: fine on loopback (`pixfarm dev`, tests) or behind a
//! TLS-terminating proxy, not on an open network (tokens would travel in clear).

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// TLS flags of the coordinator.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// Server certificate chain (PEM). Turns TLS on; needs --tls-key.
    #[arg(long, env = "PIXFARM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key of --tls-cert (PEM).
    #[arg(long, env = "PIXFARM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// CA (PEM) that client certificates must chain to: mutual TLS, a client
    /// without a valid certificate fails the handshake. Needs --tls-cert.
    #[arg(long, env = "PIXFARM_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

/// A TLS file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the {what} {path} is not PEM (expected a `-----BEGIN …-----` block)")]
    NotPem { what: &'static str, path: PathBuf },
    #[error("{0}")]
    Incomplete(&'static str),
}

impl TlsArgs {
    /// The server TLS config, or `None` for plaintext.
    pub fn server_config(&self) -> Result<Option<ServerTlsConfig>, TlsError> {
        let (cert, key) = match (&self.tls_cert, &self.tls_key) {
            (None, None) if self.tls_client_ca.is_some() => {
                return Err(TlsError::Incomplete(
                    "--tls-client-ca needs --tls-cert and --tls-key",
                ));
            }
            (None, None) => return Ok(None),
            (Some(c), Some(k)) => (c, k),
            _ => {
                return Err(TlsError::Incomplete(
                    "--tls-cert and --tls-key must be given together",
                ));
            }
        };
        install_crypto_provider();
        let identity = Identity::from_pem(
            read_pem("TLS certificate", cert)?,
            read_pem("TLS key", key)?,
        );
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.tls_client_ca {
            config = config.client_ca_root(Certificate::from_pem(read_pem("client CA", ca)?));
        }
        Ok(Some(config))
    }

    /// How the port is secured, for the start-up log.
    pub fn describe(&self) -> &'static str {
        match (&self.tls_cert, &self.tls_client_ca) {
            (None, _) => "PLAINTEXT gRPC (no TLS: tokens and prompts travel unencrypted)",
            (Some(_), None) => "TLS",
            (Some(_), Some(_)) => "mutual TLS (client certificates required)",
        }
    }
}

/// rustls needs one process-wide crypto provider; the dependency tree enables
/// both ring and aws-lc-rs, so it cannot pick one by itself. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Reads a PEM file; the error names what it is and where.
pub fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(TlsError::NotPem {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incomplete_and_unreadable_configs_are_named() {
        assert!(TlsArgs::default().server_config().unwrap().is_none());
        let e = TlsArgs {
            tls_cert: Some("/nonexistent/c.pem".into()),
            ..TlsArgs::default()
        }
        .server_config()
        .unwrap_err();
        assert!(e.to_string().contains("--tls-key"), "{e}");
        let e = TlsArgs {
            tls_cert: Some("/nonexistent/c.pem".into()),
            tls_key: Some("/nonexistent/k.pem".into()),
            tls_client_ca: None,
        }
        .server_config()
        .unwrap_err();
        assert!(
            e.to_string().contains("TLS certificate /nonexistent/c.pem"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.pem");
        std::fs::write(&f, "not a certificate").unwrap();
        let e = read_pem("TLS certificate", &f).unwrap_err();
        assert!(e.to_string().contains("is not PEM"), "{e}");
    }
}
