//! Bearer tokens: who may call the coordinator, for which tenant, in which role.
//!
//! The tokens file holds only SHA-256 digests, so a leaked file (or a backup of it) does not leak
//! credentials, and tokens can be rotated by editing the file while the coordinator runs. It is TOML
//! (or JSON when the file name ends in `.json`):
//!
//! ```toml
//! [[tokens]]
//! name = "ci-team-a"            # shown in logs; never the token itself
//! sha256 = "9f86d081884c7d65…"   # hex SHA-256 of the token (`printf %s "$TOKEN" | sha256sum`)
//! tenant = "team-a"
//! role = "submit"               # submit | read | admin | worker
//! ```
//!
//! Tokens are compared digest to digest with a constant-time comparison against *every* entry, so
//! the time a lookup takes does not depend on which entry (if any) matched or how many leading
//! bytes agree.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a token may do. Deliberately coarse: each role is a fixed set of [`Action`]s, so an
/// operator can tell from the file alone what a token can reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Submit and cancel jobs of its tenant, and read them.
    Submit,
    /// Read the jobs, events and results of its tenant.
    Read,
    /// Everything, for every tenant, including the worker list.
    Admin,
    /// Workers talk to Redis and S3 directly (with their own credentials); towards the
    /// coordinator they only need the worker list (e.g. a fleet health check).
    Worker,
}

impl Role {
    /// Whether this role may perform `action` (tenant scoping is checked separately).
    pub fn allows(self, action: Action) -> bool {
        match self {
            Role::Admin => true,
            Role::Submit => matches!(action, Action::Submit | Action::Cancel | Action::Read),
            Role::Read => matches!(action, Action::Read),
            Role::Worker => matches!(action, Action::ListWorkers),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Submit => "submit",
            Role::Read => "read",
            Role::Admin => "admin",
            Role::Worker => "worker",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a request wants to do, as the role table sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `SubmitJob`, `SubmitJobStream`.
    Submit,
    /// `GetJob`, `ListJobs`, `WatchJob`, `ListResults`.
    Read,
    /// `CancelJob`.
    Cancel,
    /// `ListWorkers`.
    ListWorkers,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Submit => "submit jobs",
            Action::Read => "read jobs",
            Action::Cancel => "cancel jobs",
            Action::ListWorkers => "list workers",
        }
    }
}

/// The identity a valid token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The entry's name (for logs and audit).
    pub name: String,
    pub tenant: String,
    pub role: Role,
}

/// Why a tokens file was refused. Each message names the file and, for a bad entry, the entry and
/// its field (`tokens[2].sha256`).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the tokens file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the tokens file {path} is not valid {format}: {message}")]
    Parse {
        path: PathBuf,
        format: &'static str,
        message: String,
    },
    #[error("the tokens file {path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        /// `tokens[3].sha256`, `tokens`.
        field: String,
        message: String,
    },
}

/// One entry of the tokens file, as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    pub name: String,
    /// Hex SHA-256 of the token, 64 digits (either case).
    pub sha256: String,
    pub tenant: String,
    pub role: Role,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    #[serde(default)]
    tokens: Vec<TokenEntry>,
}

/// A parsed, validated set of tokens. Immutable: a reload builds a new one and swaps it in.
#[derive(Debug, Clone, Default)]
pub struct TokenSet {
    entries: Vec<([u8; 32], Principal)>,
}

impl TokenSet {
    /// Reads and validates a tokens file (JSON if the name ends in `.json`, TOML otherwise).
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        Self::parse(&text, json, path)
    }

    /// Parses tokens file text; `path` is only used in error messages.
    pub fn parse(text: &str, json: bool, path: &Path) -> Result<Self, AuthError> {
        let parse_err = |format: &'static str, message: String| AuthError::Parse {
            path: path.to_path_buf(),
            format,
            message,
        };
        let file: TokenFile = if json {
            serde_json::from_str(text).map_err(|e| parse_err("JSON", e.to_string()))?
        } else {
            toml::from_str(text).map_err(|e| parse_err("TOML", e.message().to_string()))?
        };
        Self::from_entries(&file.tokens, path)
    }

    /// Validates entries: names unique and printable, digests 64 hex digits and unique, tenants
    /// the same shape job tenants must have (they become the first segment of object keys).
    pub fn from_entries(entries: &[TokenEntry], path: &Path) -> Result<Self, AuthError> {
        let invalid = |i: usize, field: &str, message: String| AuthError::Invalid {
            path: path.to_path_buf(),
            field: format!("tokens[{i}].{field}"),
            message,
        };
        let mut out: Vec<([u8; 32], Principal)> = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            if e.name.is_empty() || e.name.len() > 128 || e.name.chars().any(|c| c.is_control()) {
                return Err(invalid(
                    i,
                    "name",
                    "must be 1 to 128 bytes without control characters".into(),
                ));
            }
            if let Some(j) = out.iter().position(|(_, p)| p.name == e.name) {
                return Err(invalid(
                    i,
                    "name",
                    format!("`{}` is already used by tokens[{j}]", e.name),
                ));
            }
            let digest = parse_digest(&e.sha256).map_err(|m| invalid(i, "sha256", m))?;
            if let Some(j) = out.iter().position(|(d, _)| *d == digest) {
                return Err(invalid(
                    i,
                    "sha256",
                    format!("the same token as tokens[{j}] (`{}`)", out[j].1.name),
                ));
            }
            crate::validate::check_name("tenant", &e.tenant, 128)
                .map_err(|m| invalid(i, "tenant", m))?;
            out.push((
                digest,
                Principal {
                    name: e.name.clone(),
                    tenant: e.tenant.clone(),
                    role: e.role,
                },
            ));
        }
        Ok(Self { entries: out })
    }

    /// The principal `token` stands for, if any. Compares against every entry in constant time.
    pub fn authenticate(&self, token: &str) -> Option<&Principal> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found: Option<&Principal> = None;
        for (digest, principal) in &self.entries {
            // No early exit: every entry is compared, whatever matched before.
            if bool::from(digest[..].ct_eq(&presented[..])) {
                found = Some(principal);
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Hex SHA-256 of a token: the value to put in the tokens file.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A fresh random token (256 bits, hex, with a `pf_` prefix so secret scanners can spot it).
pub fn generate_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("pf_{}", hex::encode(bytes))
}

fn parse_digest(s: &str) -> Result<[u8; 32], String> {
    let s = s.trim();
    if s.len() != 64 {
        return Err(format!(
            "must be 64 hex digits (a SHA-256 of the token), got {} characters",
            s.len()
        ));
    }
    let bytes = hex::decode(s).map_err(|_| "must be 64 hex digits (0-9, a-f)".to_string())?;
    let mut out = [0u8; 32];
    out.copy_from_slice(&bytes);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, token: &str, tenant: &str, role: Role) -> TokenEntry {
        TokenEntry {
            name: name.into(),
            sha256: hash_token(token),
            tenant: tenant.into(),
            role,
        }
    }

    #[test]
    fn sha256_of_known_input() {
        // FIPS 180-2 test vector for "abc".
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn toml_and_json_files_authenticate() {
        let toml = format!(
            "[[tokens]]\nname = \"a\"\nsha256 = \"{}\"\ntenant = \"team-a\"\nrole = \"submit\"\n\n\
             [[tokens]]\nname = \"root\"\nsha256 = \"{}\"\ntenant = \"ops\"\nrole = \"admin\"\n",
            hash_token("tok-a"),
            hash_token("tok-root").to_uppercase()
        );
        let set = TokenSet::parse(&toml, false, Path::new("t.toml")).unwrap();
        assert_eq!(set.len(), 2);
        let p = set.authenticate("tok-a").unwrap();
        assert_eq!((p.name.as_str(), p.tenant.as_str()), ("a", "team-a"));
        assert_eq!(p.role, Role::Submit);
        assert_eq!(set.authenticate("tok-root").unwrap().role, Role::Admin);
        assert!(set.authenticate("tok-b").is_none());
        assert!(set.authenticate("").is_none());

        let json = format!(
            r#"{{"tokens":[{{"name":"r","sha256":"{}","tenant":"t","role":"read"}}]}}"#,
            hash_token("x")
        );
        let set = TokenSet::parse(&json, true, Path::new("t.json")).unwrap();
        assert_eq!(set.authenticate("x").unwrap().role, Role::Read);
    }

    #[test]
    fn bad_files_name_the_entry_and_field() {
        let p = Path::new("/etc/pf/tokens.toml");
        let short = TokenEntry {
            sha256: "abcd".into(),
            ..entry("a", "x", "t", Role::Read)
        };
        let e = TokenSet::from_entries(&[entry("ok", "y", "t", Role::Read), short], p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tokens[1].sha256"), "{e}");
        assert!(e.contains("/etc/pf/tokens.toml"), "{e}");

        let e = TokenSet::from_entries(
            &[
                entry("a", "x", "t", Role::Read),
                entry("a", "y", "t", Role::Read),
            ],
            p,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("tokens[1].name") && e.contains("tokens[0]"),
            "{e}"
        );

        let e = TokenSet::from_entries(
            &[
                entry("a", "x", "t", Role::Read),
                entry("b", "x", "t", Role::Read),
            ],
            p,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("tokens[1].sha256"), "{e}");

        let e = TokenSet::from_entries(&[entry("a", "x", "../t", Role::Read)], p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tokens[0].tenant"), "{e}");

        let e = TokenSet::parse(
            "[[tokens]]\nname=\"a\"\nsha256=\"00\"\ntenant=\"t\"\nrole=\"root\"\n",
            false,
            p,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not valid TOML") && e.contains("root"), "{e}");
    }

    #[test]
    fn role_table() {
        use Action::*;
        assert!(Role::Submit.allows(Submit) && Role::Submit.allows(Cancel));
        assert!(!Role::Submit.allows(ListWorkers));
        assert!(
            Role::Read.allows(Read) && !Role::Read.allows(Submit) && !Role::Read.allows(Cancel)
        );
        assert!(Role::Worker.allows(ListWorkers) && !Role::Worker.allows(Read));
        for a in [Submit, Read, Cancel, ListWorkers] {
            assert!(Role::Admin.allows(a));
        }
    }

    #[test]
    fn generated_tokens_are_distinct_and_hashable() {
        let (a, b) = (generate_token(), generate_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 3 + 64);
        assert_eq!(hash_token(&a).len(), 64);
    }
}
