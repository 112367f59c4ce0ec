//! The REAPI face's settings ([`Config`]): listeners, message limits, tokens, TLS, and what
//! the face says of its store and executor — and the pieces of the deployment's configuration
//! schema that belong to this face ([`AuthConfig`], [`TokenConfig`], [`TlsConfig`], the
//! `--token` syntax).
//!
//! Why no file format here: the configuration file is the one schema of `rba serve`, `rba
//! worker` and `cache-server` (the agent's `NodeConfig`, `[servers] reapi` and `[reapi]` for
//! this face), and the composition root there builds a [`Config`] from it. Tests and embedders
//! build one directly.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use rba_cas::StoreConfig;
use serde::{Deserialize, Serialize};

use crate::auth::Access;

/// Default gRPC address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Default metrics address.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:50052";

/// Everything the server needs to run.
#[derive(Clone, Debug)]
pub struct Config {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Where blobs, the index and the action cache live.
    pub data_dir: PathBuf,
    /// Prometheus metrics listen address; `None` disables it.
    pub metrics_listen: Option<SocketAddr>,
    /// Largest gRPC message the server sends, and what it assumes clients accept (4 MiB is every
    /// gRPC implementation's default). `max_batch_total_size_bytes` is derived from it.
    pub max_message_bytes: usize,
    /// Interrupted ByteStream uploads stay resumable for this long without activity.
    pub upload_idle_timeout_secs: u64,
    /// zstd level for compressed reads.
    pub zstd_level: i32,
    /// The blob store.
    pub store: StoreConfig,
    /// Who may read and write.
    pub auth: AuthConfig,
    /// The Execution service.
    pub execution: ExecutionConfig,
    /// Serve gRPC over TLS with this certificate and key (`None`: plaintext).
    pub tls: Option<TlsConfig>,
}

/// A server certificate and its key, both PEM files.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain (PEM).
    pub cert: PathBuf,
    /// The private key (PEM).
    pub key: PathBuf,
}

impl TlsConfig {
    /// The tonic server identity, read from the files.
    pub fn identity(&self) -> anyhow::Result<tonic::transport::Identity> {
        let cert = std::fs::read(&self.cert)
            .with_context(|| format!("reading TLS certificate {}", self.cert.display()))?;
        let key = std::fs::read(&self.key)
            .with_context(|| format!("reading TLS key {}", self.key.display()))?;
        Ok(tonic::transport::Identity::from_pem(cert, key))
    }

    /// From `--tls-cert` and `--tls-key`: both or neither.
    pub fn from_flags(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> anyhow::Result<Option<TlsConfig>> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(TlsConfig { cert, key })),
            (None, None) => Ok(None),
            _ => bail!("--tls-cert and --tls-key go together: give both, or neither"),
        }
    }
}

/// The REAPI Execution service: actions run by `rba-executor` in its sandbox, with its data
/// under `{data_dir}/executor`.
#[derive(Clone, Debug)]
pub struct ExecutionConfig {
    /// Serve Execute/WaitExecution and Operations. When the sandbox cannot be set up the server
    /// logs why and serves cache-only.
    pub enabled: bool,
    /// Actions running at once (default: the executor's, CPUs up to 4).
    pub workers: Option<usize>,
    /// On shutdown (SIGTERM), how long actions already taken may run to their end before they
    /// are cancelled; new Executes get `UNAVAILABLE` meanwhile. Default 30.
    pub shutdown_grace_secs: u64,
}

impl Default for ExecutionConfig {
    fn default() -> Self {
        ExecutionConfig {
            enabled: true,
            workers: None,
            shutdown_grace_secs: 30,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            data_dir: default_data_dir(),
            metrics_listen: Some(
                DEFAULT_METRICS_LISTEN
                    .parse()
                    .expect("valid default address"),
            ),
            max_message_bytes: 4 << 20,
            upload_idle_timeout_secs: 600,
            zstd_level: 1,
            store: StoreConfig::default(),
            auth: AuthConfig::default(),
            execution: ExecutionConfig::default(),
            tls: None,
        }
    }
}

/// Access control.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Bearer tokens (`authorization: Bearer <token>`).
    pub tokens: Vec<TokenConfig>,
    /// Access of requests without a token. Default: read-write when no token is configured
    /// (and the server listens on loopback only), none otherwise.
    pub anonymous: Option<Access>,
    /// Whether read-only clients may upload blobs (content-verified, so harmless) — never
    /// action results. Default true.
    #[serde(default = "yes")]
    pub read_only_may_write_cas: bool,
}

fn yes() -> bool {
    true
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            tokens: Vec::new(),
            anonymous: None,
            read_only_may_write_cas: true,
        }
    }
}

impl AuthConfig {
    /// The access of requests without a token: as configured, else read-write when no token
    /// is configured (the bind rule keeps that on loopback), none otherwise.
    pub fn anonymous_access(&self) -> Access {
        self.anonymous.unwrap_or(if self.tokens.is_empty() {
            Access::ReadWrite
        } else {
            Access::None
        })
    }

    /// Refuses tokens that are too short or whose names collide (a name is a tenant).
    pub fn validate(&self) -> anyhow::Result<()> {
        let mut names = std::collections::HashSet::new();
        for token in &self.tokens {
            if token.token.len() < 8 {
                bail!("token {:?} is shorter than 8 characters", token.name);
            }
            if token.name.contains(':') {
                bail!("token name {:?} may not contain ':'", token.name);
            }
            if !names.insert(crate::auth::token_name(token)) {
                bail!("two tokens are named {:?}: a name is a tenant", token.name);
            }
        }
        Ok(())
    }

    /// The bind rule: without tokens (and without an explicit anonymous access) only a
    /// loopback address may be served. `fix` tells the operator how to give tokens.
    pub fn check_bind(&self, listen: SocketAddr, fix: &str) -> anyhow::Result<()> {
        if self.anonymous.is_none() && self.tokens.is_empty() && !listen.ip().is_loopback() {
            bail!("listening on {listen} (not loopback) without tokens: {fix}");
        }
        Ok(())
    }
}

/// One bearer token.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// A label for logs and metrics (never the token itself); the token's tenant is
    /// `token:NAME`.
    #[serde(default)]
    pub name: String,
    /// The secret.
    pub token: String,
    /// What it grants.
    pub access: Access,
    /// Other tenants whose operations and builds it may see (`token:dev`, `peer:12D3…`,
    /// `local`), or `"*"` for every tenant (an operator's token). Its own tenant always.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<String>,
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("access", &self.access)
            .field("tenants", &self.tenants)
            .finish()
    }
}

/// `$XDG_CACHE_HOME/rba-cache-server`, else `~/.cache/rba-cache-server`, else `./rba-cache-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("rba-cache-server");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".cache").join("rba-cache-server");
    }
    PathBuf::from("rba-cache-data")
}

impl Config {
    /// The batch limit advertised in Capabilities: the message limit minus room for the
    /// per-blob framing (digests, statuses), so a batch that honours it really fits.
    pub fn max_batch_total_size_bytes(&self) -> usize {
        self.max_message_bytes - self.max_message_bytes / 8
    }

    /// Largest message the server decodes: a little above `max_message_bytes`, so requests
    /// built to the advertised batch limit are never refused for their framing.
    pub fn max_decoding_message_bytes(&self) -> usize {
        self.max_message_bytes.saturating_mul(2)
    }

    /// The access of requests without a token.
    pub fn anonymous_access(&self) -> Access {
        self.auth.anonymous_access()
    }

    /// Refuses configurations that are unsafe or inconsistent.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.execution.workers == Some(0) {
            bail!("execution.workers must be at least 1");
        }
        if self.max_message_bytes < 64 << 10 {
            bail!("max_message_bytes must be at least 64 KiB");
        }
        if !(0.0..=1.0).contains(&self.store.low_watermark) {
            bail!("store.low_watermark must be within 0..=1");
        }
        self.auth.validate()?;
        // Open by default only on loopback: an open server on the network needs tokens, or an
        // explicit `anonymous = "read-write"` (--anonymous).
        self.auth.check_bind(
            self.listen,
            "give tokens (--token NAME:TOKEN:read-write, or [[auth.tokens]] in the config \
             file), set auth.anonymous (--anonymous) explicitly to open the server to the \
             network, or listen on 127.0.0.1",
        )?;
        warn_plaintext_tokens(&self.auth, self.listen, self.tls.is_some());
        Ok(())
    }
}

/// Bearer tokens in plaintext off loopback can be read by anyone on the path: say so loudly.
pub fn warn_plaintext_tokens(auth: &AuthConfig, listen: SocketAddr, tls: bool) {
    if !auth.tokens.is_empty() && !tls && !listen.ip().is_loopback() {
        tracing::warn!(
            %listen,
            "bearer tokens over plaintext gRPC off loopback: anyone on the path can read them; \
             serve TLS (--tls-cert PEM --tls-key PEM) or put a TLS proxy in front"
        );
    }
}

/// Parses sizes such as `4194304`, `4MiB`, `50G`, `512k` (binary multiples).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("invalid size {text:?}"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(format!("unknown size unit {other:?} (use K, M, G, T)")),
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

/// Parses `TOKEN:ACCESS` or `NAME:TOKEN:ACCESS` (the `--token` syntax of every rba server).
pub fn parse_token(text: &str) -> Result<TokenConfig, String> {
    let (rest, access) = text.rsplit_once(':').ok_or("expected TOKEN:ACCESS")?;
    let access = match access {
        "read-only" | "ro" => Access::ReadOnly,
        "read-write" | "rw" => Access::ReadWrite,
        other => {
            return Err(format!(
                "unknown access {other:?} (read-only or read-write)"
            ));
        }
    };
    let (name, token) = match rest.split_once(':') {
        Some((name, token)) => (name.to_string(), token.to_string()),
        None => (String::new(), rest.to_string()),
    };
    Ok(TokenConfig {
        name,
        token,
        access,
        tenants: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4194304"), Ok(4 << 20));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("50G"), Ok(50 << 30));
        assert!(parse_size("4 parsecs").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn open_server_off_loopback_is_refused() {
        let config = Config {
            listen: "0.0.0.0:1".parse().unwrap(),
            ..Config::default()
        };
        assert!(config.validate().is_err());
        let mut open = config.clone();
        open.auth.anonymous = Some(Access::ReadWrite);
        assert!(open.validate().is_ok());
        assert!(Config::default().validate().is_ok());
        assert_eq!(Config::default().anonymous_access(), Access::ReadWrite);
    }
}
