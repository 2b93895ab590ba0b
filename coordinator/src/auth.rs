//! Authentication of `pixfarm.v1.Farm` calls: a tonic interceptor that turns the
//! `authorization: Bearer <token>` metadata into an [`AuthContext`] in the
//! request's extensions.
//!
//! Only the Farm service is wrapped, so `grpc.health.v1` and reflection stay
//! open (load balancers and `grpcurl list` need no token). The interceptor only
//! decides *who* is calling (missing or unknown token → `UNAUTHENTICATED`); the
//! handlers decide *what* they may do ([`AuthContext::require`] →
//! `PERMISSION_DENIED`) and *which jobs* they see ([`AuthContext::sees`]; another
//! tenant's job reads as `NOT_FOUND`, so job ids cannot be probed).
//!
//! The tokens file is re-read when its contents change (polled) and on SIGHUP;
//! a file that no longer parses is refused and the previous tokens stay in
//! force, with an error in the log (failing open would let a typo disable
//! authentication; failing closed would let a typo take the farm down).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use pixfarm_core::DEFAULT_TENANT;
use pixfarm_core::auth::{Action, AuthError, Principal, Role, TokenSet};
use sha2::{Digest, Sha256};
use tonic::{Request, Status};
use tracing::{error, info, warn};

/// Authentication flags of the coordinator.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuthArgs {
    /// Tokens file (TOML, or JSON if it ends in `.json`): `[[tokens]]` entries
    /// with `name`, `sha256` (hex SHA-256 of the token), `tenant` and `role`
    /// (`submit`, `read`, `admin`, `worker`). Re-read when it changes and on SIGHUP.
    #[arg(long, env = "PIXFARM_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,

    /// Serve without authentication: every caller is an admin of the `default`
    /// tenant. Only for `pixfarm dev` and tests; required to run without
    /// `--tokens-file` on a non-loopback address.
    #[arg(long, env = "PIXFARM_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,

    /// How often the tokens file is checked for changes, in seconds.
    #[arg(long, env = "PIXFARM_TOKENS_RELOAD_SECS", default_value_t = 5)]
    pub tokens_reload_secs: u64,
}

/// Who is calling, as the handlers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthContext {
    /// The token entry's name (`anonymous` without authentication).
    pub name: String,
    pub tenant: String,
    pub role: Role,
}

impl AuthContext {
    /// The caller in no-auth mode: an admin of the default tenant, so a submit
    /// may still name its tenant (tests of per-tenant behaviour rely on that).
    pub fn anonymous() -> Self {
        Self {
            name: "anonymous".into(),
            tenant: DEFAULT_TENANT.into(),
            role: Role::Admin,
        }
    }

    /// The context a handler runs under. Missing only if the service was
    /// served without [`Authenticator`]: refuse rather than guess.
    pub fn of<T>(request: &Request<T>) -> Result<&AuthContext, Status> {
        request
            .extensions()
            .get::<AuthContext>()
            .ok_or_else(|| Status::unauthenticated("the request was not authenticated"))
    }

    /// `PERMISSION_DENIED` unless the role allows `action`.
    pub fn require(&self, action: Action) -> Result<(), Status> {
        if self.role.allows(action) {
            Ok(())
        } else {
            warn!(token = %self.name, role = %self.role, action = action.as_str(), "permission denied");
            Err(Status::permission_denied(format!(
                "the token `{}` has the role `{}`, which may not {}",
                self.name,
                self.role,
                action.as_str()
            )))
        }
    }

    /// Whether jobs of `tenant` exist for this caller (admins see every tenant).
    pub fn sees(&self, tenant: &str) -> bool {
        self.role == Role::Admin || self.tenant == tenant
    }

    /// The tenant a submit runs as: the token's. A client may name it (or
    /// leave it empty); naming another is only for admins.
    pub fn submit_tenant(&self, requested: &str) -> Result<String, Status> {
        if requested.is_empty() || requested == self.tenant {
            Ok(self.tenant.clone())
        } else if self.role == Role::Admin {
            Ok(requested.to_string())
        } else {
            warn!(token = %self.name, tenant = %self.tenant, requested, "submit for another tenant denied");
            Err(Status::permission_denied(format!(
                "tenant: the token `{}` belongs to tenant `{}` and may not submit for `{requested}`",
                self.name, self.tenant
            )))
        }
    }
}

impl From<&Principal> for AuthContext {
    fn from(p: &Principal) -> Self {
        Self {
            name: p.name.clone(),
            tenant: p.tenant.clone(),
            role: p.role,
        }
    }
}

/// The interceptor. Cheap to clone; clones share the token set, so a reload
/// is seen by every connection at once.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

enum Inner {
    Disabled,
    Tokens {
        path: PathBuf,
        reload_every: Duration,
        set: RwLock<Arc<TokenSet>>,
        /// SHA-256 of the file contents last loaded (or last refused), so an
        /// unchanged file is not re-parsed and a bad one is logged once.
        seen: Mutex<[u8; 32]>,
    },
}

impl Authenticator {
    /// No authentication: every caller is [`AuthContext::anonymous`].
    pub fn disabled() -> Self {
        Self {
            inner: Arc::new(Inner::Disabled),
        }
    }

    /// Loads the tokens file; an unreadable or invalid file is an error (the
    /// coordinator does not start).
    pub fn from_file(path: &Path, reload_every: Duration) -> Result<Self, AuthError> {
        let (set, digest) = load(path)?;
        info!(path = %path.display(), tokens = set.len(), "authentication on: tokens file loaded");
        Ok(Self {
            inner: Arc::new(Inner::Tokens {
                path: path.to_path_buf(),
                reload_every,
                set: RwLock::new(Arc::new(set)),
                seen: Mutex::new(digest),
            }),
        })
    }

    /// From flags: a tokens file, or no auth when explicitly asked for or when
    /// listening on loopback only (where only local users can connect).
    pub fn from_args(args: &AuthArgs, listen: std::net::SocketAddr) -> Result<Self, String> {
        match &args.tokens_file {
            Some(path) => {
                Self::from_file(path, Duration::from_secs(args.tokens_reload_secs.max(1)))
                    .map_err(|e| e.to_string())
            }
            None if args.insecure_no_auth || listen.ip().is_loopback() => Ok(Self::disabled()),
            None => Err(format!(
                "refusing to serve {listen} without authentication: pass --tokens-file \
                 (PIXFARM_TOKENS_FILE), or --insecure-no-auth if something in front of the \
                 coordinator authenticates callers"
            )),
        }
    }

    pub fn is_enabled(&self) -> bool {
        matches!(*self.inner, Inner::Tokens { .. })
    }

    /// Re-reads the tokens file if its contents changed. `Ok(true)` when a new
    /// set was swapped in; on error the previous set stays in force.
    pub fn reload(&self) -> Result<bool, AuthError> {
        let Inner::Tokens {
            path, set, seen, ..
        } = &*self.inner
        else {
            return Ok(false);
        };
        let bytes = std::fs::read(path).map_err(|source| AuthError::Io {
            path: path.clone(),
            source,
        })?;
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == digest {
            return Ok(false);
        }
        // Remember refused contents too, so a broken file is reported once, not every poll.
        *seen = digest;
        let text = String::from_utf8_lossy(&bytes);
        let json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        let new = TokenSet::parse(&text, json, path)?;
        info!(path = %path.display(), tokens = new.len(), "tokens file reloaded");
        *set.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        Ok(true)
    }

    /// Watches the tokens file (poll) and SIGHUP; the task ends when the
    /// returned handle is aborted. `None` without a tokens file.
    pub fn spawn_reloader(&self) -> Option<tokio::task::JoinHandle<()>> {
        let Inner::Tokens { reload_every, .. } = &*self.inner else {
            return None;
        };
        let every = *reload_every;
        let this = self.clone();
        Some(tokio::spawn(async move {
            #[cfg(unix)]
            let mut hup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                #[cfg(unix)]
                {
                    let hangup = async {
                        match hup.as_mut() {
                            Some(s) => {
                                s.recv().await;
                            }
                            None => std::future::pending::<()>().await,
                        }
                    };
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = hangup => info!("SIGHUP: re-reading the tokens file"),
                    }
                }
                #[cfg(not(unix))]
                tick.tick().await;
                let t = this.clone();
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || t.reload()).await {
                    error!(error = %e, "tokens file NOT reloaded; the previous tokens stay in force");
                }
            }
        }))
    }

    /// Who sent `metadata`, or `UNAUTHENTICATED`.
    pub fn authenticate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<AuthContext, Status> {
        let Inner::Tokens { .. } = &*self.inner else {
            return Ok(AuthContext::anonymous());
        };
        let Some(value) = metadata.get("authorization") else {
            return Err(Status::unauthenticated(
                "missing credentials: send the metadata `authorization: Bearer <token>` \
                 (pixfarm reads the token from PIXFARM_TOKEN or ~/.config/pixfarm/config.toml)",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, rest) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Status::unauthenticated("the authorization metadata must be `Bearer <token>`")
            })?;
        self.authenticate_token(token)
            .ok_or_else(|| Status::unauthenticated("invalid or revoked token"))
    }

    /// Who holds the bearer `token` (the web gallery's cookie or header), `None` if it is
    /// unknown. Without authentication every caller is [`AuthContext::anonymous`].
    pub fn authenticate_token(&self, token: &str) -> Option<AuthContext> {
        let Inner::Tokens { set, .. } = &*self.inner else {
            return Some(AuthContext::anonymous());
        };
        let set = set.read().unwrap_or_else(|p| p.into_inner()).clone();
        set.authenticate(token).map(AuthContext::from)
    }
}

impl tonic::service::Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        match self.authenticate(request.metadata()) {
            Ok(ctx) => {
                request.extensions_mut().insert(ctx);
                Ok(request)
            }
            Err(status) => {
                // Never log the token; the peer address helps find a misconfigured client.
                warn!(peer = ?request.remote_addr(), reason = status.message(), "unauthenticated call refused");
                Err(status)
            }
        }
    }
}

fn load(path: &Path) -> Result<(TokenSet, [u8; 32]), AuthError> {
    let bytes = std::fs::read(path).map_err(|source| AuthError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let set = TokenSet::parse(&String::from_utf8_lossy(&bytes), json, path)?;
    Ok((set, Sha256::digest(&bytes).into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pixfarm_core::auth::hash_token;
    use tonic::metadata::MetadataMap;

    fn md(v: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", v.parse().unwrap());
        m
    }

    #[test]
    fn bearer_parsing_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let write = |entries: &[(&str, &str, &str)]| {
            let mut s = String::new();
            for (name, token, role) in entries {
                s.push_str(&format!(
                    "[[tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\ntenant = \"t1\"\nrole = \"{role}\"\n",
                    hash_token(token)
                ));
            }
            std::fs::write(&path, s).unwrap();
        };
        write(&[("a", "tok-a", "submit"), ("b", "tok-b", "read")]);
        let auth = Authenticator::from_file(&path, Duration::from_secs(60)).unwrap();
        assert_eq!(
            auth.authenticate(&md("Bearer tok-a")).unwrap().role,
            Role::Submit
        );
        assert_eq!(
            auth.authenticate(&md("bearer  tok-b ")).unwrap().role,
            Role::Read
        );
        for bad in ["tok-a", "Basic tok-a", "Bearer ", "Bearer tok-c"] {
            let s = auth.authenticate(&md(bad)).unwrap_err();
            assert_eq!(s.code(), tonic::Code::Unauthenticated, "{bad}");
        }
        let s = auth.authenticate(&MetadataMap::new()).unwrap_err();
        assert_eq!(s.code(), tonic::Code::Unauthenticated);

        assert!(!auth.reload().unwrap(), "unchanged file is not reloaded");
        write(&[("b", "tok-b", "read")]);
        assert!(auth.reload().unwrap());
        assert!(auth.authenticate(&md("Bearer tok-a")).is_err());
        // A broken file is refused and the previous tokens stay.
        std::fs::write(&path, "[[tokens]]\nname = 1\n").unwrap();
        assert!(auth.reload().is_err());
        assert!(auth.authenticate(&md("Bearer tok-b")).is_ok());
    }

    #[test]
    fn no_file_needs_loopback_or_the_insecure_flag() {
        let args = AuthArgs::default();
        assert!(
            !Authenticator::from_args(&args, "127.0.0.1:1".parse().unwrap())
                .unwrap()
                .is_enabled()
        );
        let e = Authenticator::from_args(&args, "0.0.0.0:1".parse().unwrap())
            .err()
            .unwrap();
        assert!(e.contains("--tokens-file"), "{e}");
        let args = AuthArgs {
            insecure_no_auth: true,
            ..AuthArgs::default()
        };
        assert!(Authenticator::from_args(&args, "0.0.0.0:1".parse().unwrap()).is_ok());
    }

    #[test]
    fn tenant_rules() {
        let ctx = AuthContext {
            name: "a".into(),
            tenant: "t1".into(),
            role: Role::Submit,
        };
        assert_eq!(ctx.submit_tenant("").unwrap(), "t1");
        assert_eq!(ctx.submit_tenant("t1").unwrap(), "t1");
        assert_eq!(
            ctx.submit_tenant("t2").unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert!(ctx.sees("t1") && !ctx.sees("t2"));
        let admin = AuthContext::anonymous();
        assert_eq!(admin.submit_tenant("t2").unwrap(), "t2");
        assert!(admin.sees("anything"));
    }
}
