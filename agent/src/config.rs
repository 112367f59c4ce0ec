//! The operator node's configuration: one TOML file, overridden by environment variables and
//! flags (in that order of precedence, flags last), read by `rba serve` (a node, or a
//! scale-out front end), `rba worker`, `rba tangle run`, `cache-server` (over its own
//! defaults, [`NodeConfig::reapi_server`]) and the embedded node of `rba build`
//! (`crate::local::embedded_config`) alike.
//!
//! Its sections are the parts of a deployment: `[servers]` (the faces: libp2p, HTTP, REAPI),
//! `[workers]` (slots, sandbox, per-job `[workers.limits]`, toolchains), `[store]` (capacity,
//! durability, and scaled out the bucket), `[database]` and `[scheduler]` (scale-out: the
//! shared index, action cache and job queue), `[auth]`, `[execute]`, `[tangle]`.
//!
//! Why a module of its own: `rba serve`, the tests and the bench all start nodes, and each must
//! get the same defaults (data under one directory, loopback listeners, long idle timeouts) and
//! the same validation (trusted peers are real PeerIds, addresses parse, the gRPC bind rule)
//! before anything binds.
//!
//! Tokens are `rba-cache-server`'s, given the same way (`--token NAME:TOKEN:ACCESS`,
//! `RBA_TOKENS`, `[[auth.tokens]]` in the file, with an optional `tenants = [...]` list of
//! other tenants a token may see, `"*"` for all): they guard the REAPI gRPC face and the HTTP
//! views of builds. Example:
//! ```toml
//! public_read = false            # true: anyone may read /builds… over HTTP (demo nodes)
//! http_cors_origins = []         # web apps elsewhere that may call the read API ("*": any)
//! sharing_peers = ["12D3KooW…"]  # operators' nodes that may read every blob and result here
//! [servers]
//! reapi = "0.0.0.0:50051"
//! [servers.tls]
//! cert = "/etc/rba/server.pem"
//! key = "/etc/rba/server.key"
//! [workers]
//! slots = 4
//! [workers.limits]
//! memory = "8G"
//! [[auth.tokens]]
//! name = "ops"
//! token = "…"
//! access = "read-write"
//! tenants = ["*"]                # an operator: sees every tenant's builds
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use libp2p::{Multiaddr, PeerId};
use rba_cache_server::config::{AuthConfig, TlsConfig, TokenConfig, parse_token};
use serde::{Deserialize, Serialize};

/// A peer operator whose blobs and signed action results this node accepts.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TrustedPeer {
    /// The peer's libp2p identity (base58).
    pub peer_id: String,
    /// Where to reach it (without the `/p2p/…` suffix, or with the same PeerId).
    pub addresses: Vec<String>,
}

impl TrustedPeer {
    /// The parsed PeerId and addresses.
    pub fn parse(&self) -> anyhow::Result<(PeerId, Vec<Multiaddr>)> {
        let peer: PeerId = self
            .peer_id
            .parse()
            .with_context(|| format!("trusted peer {:?} is not a PeerId", self.peer_id))?;
        let addresses = self
            .addresses
            .iter()
            .map(|a| {
                a.parse::<Multiaddr>()
                    .with_context(|| format!("trusted peer address {a:?} is not a multiaddr"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok((peer, addresses))
    }
}

/// Everything `rba serve`, `rba worker` and `rba tangle run` need: one schema, whose
/// sections are the parts of a deployment.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Everything the node keeps: `cas/`, `executor/`, `identity.key`.
    pub data_dir: PathBuf,
    /// `[servers]`: the faces this node serves (libp2p, HTTP, REAPI) and their bounds.
    pub servers: ServersSection,
    /// `[workers]`: how jobs run here — slots, sandbox, per-job limits, toolchains.
    pub workers: WorkersSection,
    /// Peer operators whose blobs and signed action results this node accepts. They may also
    /// read every blob and result of this node.
    pub trusted_peers: Vec<TrustedPeer>,
    /// PeerIds (operators' nodes that list this one as a trusted peer) that may read every
    /// blob and signed result of this node without being trusted by it.
    pub sharing_peers: Vec<String>,
    /// Bearer tokens (REAPI gRPC and the HTTP views of builds), as for `cache-server`.
    pub auth: AuthConfig,
    /// Anyone may read the HTTP views of builds (`/builds`, logs, events) without a token: for
    /// a single-user or demo node only.
    pub public_read: bool,
    /// Origins (`https://ci.example.com`, or `"*"`) whose pages may call the HTTP read API
    /// from a browser (CORS, `GET` with a bearer token; never the dashboard's cookie). Empty
    /// (the default): no cross-origin reads.
    pub http_cors_origins: Vec<String>,
    /// When set, only these PeerIds may upload and submit (everyone else gets `forbidden`).
    pub allowed_clients: Option<Vec<String>>,
    /// `[tangle]`: settings of `rba tangle run`.
    pub tangle: TangleNodeConfig,
    /// `[execute]`: `POST /execute` (code execution) bounds.
    pub execute: crate::execute::ExecuteConfig,
    /// `[reapi]`: the REAPI gRPC face's protocol settings (its address is `[servers] reapi`).
    pub reapi: ReapiSection,
    /// `[store]`: the blob store — its capacity and durability here, and scaled out its
    /// S3-compatible bucket (`RBA_STORE_URL`). See [`crate::compose`].
    pub store: crate::compose::StoreSection,
    /// `[database]`: blob index, action cache and job queue in PostgreSQL
    /// (`RBA_DATABASE_URL`); unset: embedded. Set with `[store] url`, or neither.
    pub database: crate::compose::DatabaseSection,
    /// `[scheduler]`: the job queue's timing (leases, heartbeats, deadlines), scale-out only.
    pub scheduler: rba_executor::scheduler::QueueConfig,
}

/// `[servers]`: where the node's faces listen, and what they accept.
///
/// ```toml
/// [servers]
/// libp2p = ["/ip4/0.0.0.0/tcp/7420", "/ip4/0.0.0.0/udp/7420/quic-v1"]
/// http = "127.0.0.1:7421"          # views, WebSocket gateway, dashboard, /metrics; "off"
/// reapi = "127.0.0.1:7422"         # REAPI v2 gRPC (Bazel, Buck2); off unless set
/// [servers.tls]                    # the REAPI face over TLS
/// cert = "/etc/rba/server.pem"
/// key = "/etc/rba/server.key"
/// ```
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServersSection {
    /// libp2p listen addresses (TCP and QUIC).
    pub libp2p: Vec<String>,
    /// HTTP (read-only queries, WebSocket, dashboard, metrics) listen address; `"off"`
    /// disables it.
    #[serde(with = "optional_addr")]
    pub http: Option<SocketAddr>,
    /// REAPI gRPC listen address; `"off"` (the default of `rba serve`) disables it. See the
    /// `grpc` module and `[reapi]`.
    #[serde(with = "optional_addr")]
    pub reapi: Option<SocketAddr>,
    /// Serve the REAPI gRPC face over TLS with this certificate and key.
    pub tls: Option<TlsConfig>,
    /// Idle timeout of libp2p connections, in seconds (long: a build may print nothing for a
    /// while, and a client may stay attached for hours).
    pub idle_timeout_secs: u64,
    /// Largest frame accepted on the libp2p protocols.
    pub max_frame_bytes: usize,
    /// Largest blob a client may upload (bytes); larger uploads are refused.
    pub max_upload_bytes: u64,
}

impl Default for ServersSection {
    fn default() -> Self {
        ServersSection {
            libp2p: vec![
                "/ip4/127.0.0.1/tcp/7420".to_string(),
                "/ip4/127.0.0.1/udp/7420/quic-v1".to_string(),
            ],
            http: Some(([127, 0, 0, 1], 7421).into()),
            reapi: None,
            tls: None,
            idle_timeout_secs: 6 * 3600,
            max_frame_bytes: crate::p2p::frame::DEFAULT_MAX_FRAME,
            max_upload_bytes: 2 << 30,
        }
    }
}

/// `[workers]`: how jobs run — on this node, or on an `rba worker` reading the same file.
///
/// ```toml
/// [workers]
/// slots = 2                        # jobs at once
/// shutdown_grace_secs = 30         # SIGTERM: running jobs may finish this long
/// isolation = "namespaces"         # or "bubblewrap" (the host's bwrap)
/// [workers.limits]                 # the most one job gets; a client can only ask less
/// timeout_secs = 3600
/// memory = "8G"
/// ```
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkersSection {
    /// Jobs running at once.
    pub slots: usize,
    /// On shutdown (SIGTERM), how long jobs already taken may run to their end before they
    /// are cancelled (a worker: given back to the queue); new submissions are refused
    /// (`unavailable`) meanwhile. Default 30.
    pub shutdown_grace_secs: u64,
    /// `namespaces` (hakoniwa, in-process; the default) or `bubblewrap` (the host's `bwrap`):
    /// which isolation provider starts the jobs (see `rba_executor::isolation`).
    pub isolation: rba_executor::isolation::Isolation,
    /// `[workers.limits]`: the most any one job gets; a client's limits can only lower them.
    pub limits: LimitsConfig,
    /// Hosts a job's dependency fetch may reach (`host`, `host:port`, `*.domain`): registry
    /// mirrors, git hosts. Default crates.io; loopback and private addresses never.
    pub fetch_allowed_hosts: Vec<String>,
    /// Share compiled registry dependencies across workspaces and tenants: a new workspace's
    /// first build starts with the units built for others (see
    /// `rba_executor::shared_units`). Default on.
    pub shared_units: bool,
    /// rustup's home, whose toolchains a workspace's `rust-toolchain.toml` chooses from
    /// (default `$RUSTUP_HOME`, else `~/.rustup`).
    pub rustup_home: Option<PathBuf>,
    /// More toolchains (sysroots, each named by its directory name) a workspace may choose.
    pub toolchain_roots: Vec<PathBuf>,
    /// The RustSec advisory database audit jobs check against (a checkout the operator keeps
    /// current; jobs never fetch it). Unset: no audit jobs.
    pub advisory_db: Option<PathBuf>,
    /// The `cargo-audit` binary of audit jobs (default: found in `PATH` or `~/.cargo/bin`).
    pub cargo_audit: Option<PathBuf>,
}

impl Default for WorkersSection {
    fn default() -> Self {
        WorkersSection {
            slots: 2,
            shutdown_grace_secs: 30,
            isolation: Default::default(),
            limits: LimitsConfig::default(),
            fetch_allowed_hosts: rba_executor::egress::default_fetch_allowed_hosts(),
            shared_units: true,
            rustup_home: None,
            toolchain_roots: Vec::new(),
            advisory_db: None,
            cargo_audit: None,
        }
    }
}

/// `[reapi]`: the REAPI v2 gRPC face (Bazel, Buck2), served by `rba serve` when `[servers]
/// reapi` is set and by `cache-server` always.
///
/// ```toml
/// [reapi]
/// execution = true                 # serve Execute (false: cache-only)
/// metrics = "127.0.0.1:50052"      # its own Prometheus endpoint ("off": none)
/// max_message_bytes = 4194304      # gRPC message limit the batch limit is derived from
/// upload_idle_timeout_secs = 600   # interrupted uploads stay resumable this long
/// zstd_level = 1
/// ```
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReapiSection {
    /// Serve the Execution and Operations services (actions run by this node's workers, or
    /// scaled out by `rba worker`s); `false`: cache-only.
    pub execution: bool,
    /// The REAPI face's own Prometheus metrics listener (`cache-server`'s default
    /// 127.0.0.1:50052); `"off"`: none (a node's `/metrics` is on its HTTP face).
    #[serde(with = "optional_addr")]
    pub metrics: Option<SocketAddr>,
    /// Largest gRPC message sent, and what clients are assumed to accept (4 MiB is every
    /// implementation's default); the advertised batch limit is derived from it.
    pub max_message_bytes: usize,
    /// Interrupted ByteStream uploads stay resumable this long without activity.
    pub upload_idle_timeout_secs: u64,
    /// zstd level of compressed reads.
    pub zstd_level: i32,
}

impl Default for ReapiSection {
    fn default() -> Self {
        let face = rba_cache_server::Config::default();
        ReapiSection {
            execution: true,
            metrics: None,
            max_message_bytes: face.max_message_bytes,
            upload_idle_timeout_secs: face.upload_idle_timeout_secs,
            zstd_level: face.zstd_level,
        }
    }
}

/// `Option<SocketAddr>` as `"host:port"`, or `"off"` for none (a file can turn a face off).
mod optional_addr {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(addr: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match addr {
            Some(addr) => s.serialize_str(&addr.to_string()),
            None => s.serialize_str("off"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_optional_addr(&text, "address").map_err(serde::de::Error::custom)
    }
}

/// The `[tangle]` section of the node config.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TangleNodeConfig {
    /// All callers of one service build as one tenant in one target dir (and are served each
    /// other's results built there). Off: each caller is a tenant of its own.
    pub share_target_dir_per_service: bool,
}

/// `[workers.limits]`: the most any one job gets on this node. Unset keys keep the
/// executor's defaults (1 h wall clock, 8 GiB memory, 1024 processes, no disk limit).
///
/// ```toml
/// [workers.limits]
/// timeout_secs = 3600
/// memory = "8G"        # all processes of a job together (cgroup)
/// processes = 1024     # processes and threads of a job together (cgroup)
/// disk = "20G"         # each slot's target-dir volume (loop-mounted ext4; needs root)
/// disk_inodes = 1000000
/// ```
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Wall-clock seconds of each sandboxed run.
    pub timeout_secs: Option<u64>,
    /// Memory of a job's processes together (`8G`, `512M`, bytes).
    pub memory: Option<String>,
    /// Processes and threads of a job together.
    pub processes: Option<u64>,
    /// Size of each slot's target-dir volume; unset: target dirs have no disk limit.
    pub disk: Option<String>,
    /// Inodes of each slot's volume (default 1M, with `disk`).
    pub disk_inodes: Option<u64>,
}

impl LimitsConfig {
    /// Sets the executor's limits (the node's maxima) from this section.
    pub fn apply(&self, executor: &mut rba_executor::runner::ExecutorConfig) -> anyhow::Result<()> {
        use rba_executor::runner::parse_size;
        let size = |value: &str, key: &str| {
            parse_size(value).map_err(|e| anyhow::anyhow!("[workers.limits] {key}: {e}"))
        };
        if let Some(secs) = self.timeout_secs {
            anyhow::ensure!(secs > 0, "[workers.limits] timeout_secs must be at least 1");
            executor.limits.wall_time = Some(std::time::Duration::from_secs(secs));
        }
        if let Some(memory) = &self.memory {
            executor.limits.memory_bytes = Some(size(memory, "memory")?);
        }
        if let Some(processes) = self.processes {
            anyhow::ensure!(
                processes > 0,
                "[workers.limits] processes must be at least 1"
            );
            executor.limits.max_processes = Some(processes);
        }
        match &self.disk {
            Some(disk) => {
                let mut quota = rba_executor::quota::DiskQuota {
                    bytes: size(disk, "disk")?,
                    ..Default::default()
                };
                if let Some(inodes) = self.disk_inodes {
                    quota.inodes = inodes;
                }
                executor.slot_disk = Some(quota);
            }
            None => anyhow::ensure!(
                self.disk_inodes.is_none(),
                "[workers.limits] disk_inodes needs [workers.limits] disk"
            ),
        }
        Ok(())
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            data_dir: default_data_dir().join("node"),
            servers: ServersSection::default(),
            workers: WorkersSection::default(),
            trusted_peers: Vec::new(),
            sharing_peers: Vec::new(),
            auth: AuthConfig::default(),
            public_read: false,
            http_cors_origins: Vec::new(),
            allowed_clients: None,
            tangle: TangleNodeConfig::default(),
            execute: crate::execute::ExecuteConfig::default(),
            reapi: ReapiSection::default(),
            store: Default::default(),
            database: Default::default(),
            scheduler: Default::default(),
        }
    }
}

impl NodeConfig {
    /// Defaults with everything under `data_dir` and every listener on loopback port 0.
    pub fn ephemeral(data_dir: impl Into<PathBuf>) -> Self {
        let mut config = NodeConfig {
            data_dir: data_dir.into(),
            servers: ServersSection {
                libp2p: vec![
                    "/ip4/127.0.0.1/tcp/0".to_string(),
                    "/ip4/127.0.0.1/udp/0/quic-v1".to_string(),
                ],
                http: Some(([127, 0, 0, 1], 0).into()),
                reapi: None,
                ..ServersSection::default()
            },
            ..NodeConfig::default()
        };
        config.store.fsync = false;
        // A throw-away node does not keep its stopper waiting for long builds.
        config.workers.shutdown_grace_secs = 5;
        config
    }

    /// The defaults of `cache-server`: the REAPI face alone on 127.0.0.1:50051 with its metrics
    /// on 127.0.0.1:50052, its data under `~/.cache/rba-cache-server`, as many slots as CPUs
    /// (at most 4).
    pub fn reapi_server() -> Self {
        let mut config = NodeConfig {
            data_dir: rba_cache_server::config::default_data_dir(),
            ..NodeConfig::default()
        };
        config.servers.libp2p = Vec::new();
        config.servers.http = None;
        config.servers.reapi = rba_cache_server::config::DEFAULT_LISTEN.parse().ok();
        config.reapi.metrics = rba_cache_server::config::DEFAULT_METRICS_LISTEN
            .parse()
            .ok();
        config.workers.slots = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
        config
    }

    /// The configuration as TOML with every token masked (`--print-config`): what a file
    /// holding these settings would say.
    pub fn to_masked_toml(&self) -> String {
        let mut masked = self.clone();
        for token in &mut masked.auth.tokens {
            token.token = "********".into();
        }
        if let Some(url) = &mut masked.database.url {
            *url = crate::compose::mask_url(url);
        }
        toml::to_string_pretty(&masked).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// Reads a TOML file over the defaults (unknown keys are errors).
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        NodeConfig::from_file_over(NodeConfig::default(), path)
    }

    /// Reads a TOML file over `base` (a binary's own defaults): what the file says replaces
    /// `base`'s key by key, sections merged. Unknown keys are errors.
    pub fn from_file_over(base: NodeConfig, path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let file: toml::Table =
            toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))?;
        let mut merged = toml::Table::try_from(&base).context("rendering the defaults")?;
        merge_tables(&mut merged, file);
        merged
            .try_into()
            .with_context(|| format!("parsing config {}", path.display()))
    }

    /// Applies `RBA_*` environment variables: `RBA_LISTEN` (comma-separated; `[servers]
    /// libp2p`), `RBA_HTTP_LISTEN` (`[servers] http`), `RBA_GRPC_LISTEN` (`[servers] reapi`;
    /// `off` disables), `RBA_WORKERS` (`[workers] slots`), `RBA_TRUSTED_PEERS`
    /// (comma-separated `MULTIADDR/p2p/PEERID`), `RBA_TOKENS` (comma-separated
    /// `NAME:TOKEN:ACCESS`, added to the file's), `RBA_PUBLIC_READ` (`true`/`false`),
    /// `RBA_HTTP_CORS_ORIGINS` (comma-separated origins), `RBA_TLS_CERT` and `RBA_TLS_KEY`,
    /// `RBA_STORE_URL` and `RBA_DATABASE_URL` (scale-out: [`crate::compose`]).
    pub fn apply_env(&mut self) -> anyhow::Result<()> {
        self.apply_vars(|name| std::env::var(name).ok())
    }

    fn apply_vars(&mut self, var: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
        if let Some(url) = var(crate::compose::STORE_URL_VAR) {
            self.store.url = Some(url);
        }
        if let Some(url) = var(crate::compose::DATABASE_URL_VAR) {
            self.database.url = Some(url);
        }
        if let Some(listen) = var("RBA_LISTEN") {
            self.servers.libp2p = split_list(&listen);
        }
        if let Some(http) = var("RBA_HTTP_LISTEN") {
            self.servers.http = parse_optional_addr(&http, "RBA_HTTP_LISTEN")?;
        }
        if let Some(grpc) = var("RBA_GRPC_LISTEN") {
            self.servers.reapi = parse_optional_addr(&grpc, "RBA_GRPC_LISTEN")?;
        }
        if let Some(workers) = var("RBA_WORKERS") {
            self.workers.slots = workers
                .parse()
                .with_context(|| format!("RBA_WORKERS={workers:?} is not a number"))?;
        }
        if let Some(peers) = var("RBA_TRUSTED_PEERS") {
            for address in split_list(&peers) {
                self.trusted_peers
                    .push(trusted_peer_from_multiaddr(&address)?);
            }
        }
        if let Some(tokens) = var("RBA_TOKENS") {
            for token in split_list(&tokens) {
                self.auth
                    .tokens
                    .push(parse_token(&token).map_err(|e| anyhow::anyhow!("RBA_TOKENS: {e}"))?);
            }
        }
        if let Some(public) = var("RBA_PUBLIC_READ") {
            self.public_read = public
                .trim()
                .parse()
                .with_context(|| format!("RBA_PUBLIC_READ={public:?} is not true or false"))?;
        }
        if let Some(origins) = var("RBA_HTTP_CORS_ORIGINS") {
            self.http_cors_origins = split_list(&origins);
        }
        if let Some(tls) = TlsConfig::from_flags(
            var("RBA_TLS_CERT").map(PathBuf::from),
            var("RBA_TLS_KEY").map(PathBuf::from),
        )
        .context("RBA_TLS_CERT and RBA_TLS_KEY")?
        {
            self.servers.tls = Some(tls);
        }
        Ok(())
    }

    /// Checks everything that can be checked before binding.
    pub fn validate(&self) -> anyhow::Result<()> {
        for address in &self.servers.libp2p {
            address
                .parse::<Multiaddr>()
                .with_context(|| format!("listen address {address:?} is not a multiaddr"))?;
        }
        for peer in &self.trusted_peers {
            peer.parse()?;
        }
        for client in self.allowed_clients.iter().flatten() {
            client
                .parse::<PeerId>()
                .with_context(|| format!("allowed client {client:?} is not a PeerId"))?;
        }
        rba_executor::egress::EgressPolicy::new(&self.workers.fetch_allowed_hosts)?;
        for peer in &self.sharing_peers {
            peer.parse::<PeerId>()
                .with_context(|| format!("sharing peer {peer:?} is not a PeerId"))?;
        }
        self.auth.validate()?;
        if let Some(grpc) = self.servers.reapi {
            // The REAPI runs actions and reads the store: open only on loopback.
            self.auth.check_bind(
                grpc,
                "give tokens (--token NAME:TOKEN:read-write, RBA_TOKENS, or [[auth.tokens]] \
                 in the config file), set [auth] anonymous explicitly to open it to the \
                 network, or serve REAPI on 127.0.0.1 ([servers] reapi: --grpc for rba serve, \
                 --listen for cache-server)",
            )?;
            rba_cache_server::config::warn_plaintext_tokens(
                &self.auth,
                grpc,
                self.servers.tls.is_some(),
            );
        } else if self.servers.tls.is_some() {
            anyhow::bail!(
                "TLS is for the REAPI gRPC face: give --grpc ADDR too, or drop --tls-cert/--tls-key"
            );
        }
        for origin in &self.http_cors_origins {
            crate::http::cors_origin(origin)?;
        }
        anyhow::ensure!(self.workers.slots > 0, "[workers] slots must be at least 1");
        anyhow::ensure!(
            self.reapi.max_message_bytes >= 64 << 10,
            "[reapi] max_message_bytes must be at least 64 KiB"
        );
        crate::compose::scale_out_urls(self)?;
        self.scheduler.check().map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            self.servers.max_frame_bytes >= 64 << 10,
            "[servers] max_frame_bytes must be at least 64 KiB"
        );
        Ok(())
    }
}

/// The node flags `rba serve` and `rba tangle run` share: a config file, then the environment,
/// then these flags.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct NodeArgs {
    /// Node TOML configuration file.
    #[arg(long, env = "RBA_CONFIG")]
    pub config: Option<PathBuf>,
    /// libp2p listen multiaddr (repeatable), e.g. /ip4/127.0.0.1/tcp/7420.
    #[arg(long)]
    pub listen: Vec<String>,
    /// HTTP + WebSocket listen address (`off` disables).
    #[arg(long)]
    pub http: Option<String>,
    /// REAPI gRPC listen address (`off` disables).
    #[arg(long)]
    pub grpc: Option<String>,
    /// Concurrent jobs.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Bearer token for the REAPI gRPC face and the HTTP views of builds, as NAME:TOKEN:ACCESS
    /// (ACCESS read-only|read-write), as for cache-server. Repeatable. Its tenant is
    /// `token:NAME`; a `tenants = [...]` list (config file) lets it see others.
    #[arg(long = "token", value_name = "NAME:TOKEN:ACCESS", value_parser = parse_token)]
    pub tokens: Vec<TokenConfig>,
    /// Anyone may read /builds, /builds/{id}, logs and session events without a token
    /// (single-user or demo nodes).
    #[arg(long)]
    pub public_read: bool,
    /// Serve REAPI gRPC over TLS with this PEM certificate chain (with --tls-key). Bearer
    /// tokens off loopback need it.
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
}

impl NodeArgs {
    /// The configuration these flags describe: the file (or the defaults), the `RBA_*`
    /// environment over it, the flags over both.
    pub fn node_config(&self) -> anyhow::Result<NodeConfig> {
        let mut config = match &self.config {
            Some(path) => NodeConfig::from_file(path)?,
            None => NodeConfig::default(),
        };
        config.apply_env()?;
        if !self.listen.is_empty() {
            config.servers.libp2p = self.listen.clone();
        }
        if let Some(http) = &self.http {
            config.servers.http = parse_optional_addr(http, "--http")?;
        }
        if let Some(grpc) = &self.grpc {
            config.servers.reapi = parse_optional_addr(grpc, "--grpc")?;
        }
        if let Some(workers) = self.workers {
            config.workers.slots = workers;
        }
        config.auth.tokens.extend(self.tokens.iter().cloned());
        if self.public_read {
            config.public_read = true;
        }
        if let Some(tls) = TlsConfig::from_flags(self.tls_cert.clone(), self.tls_key.clone())? {
            config.servers.tls = Some(tls);
        }
        Ok(config)
    }
}

/// `off`/`none`/empty → `None`, else a socket address.
pub fn parse_optional_addr(text: &str, what: &str) -> anyhow::Result<Option<SocketAddr>> {
    match text.trim() {
        "" | "off" | "none" => Ok(None),
        addr => Ok(Some(addr.parse().with_context(|| {
            format!("{what}={addr:?} is not an address like 127.0.0.1:7421")
        })?)),
    }
}

/// `over`'s keys into `base`, recursively for tables (arrays and values are replaced).
fn merge_tables(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(inner)), toml::Value::Table(value)) => {
                merge_tables(inner, value)
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn split_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// A trusted peer from `MULTIADDR/p2p/PEERID`.
pub fn trusted_peer_from_multiaddr(text: &str) -> anyhow::Result<TrustedPeer> {
    let (address, peer) = crate::p2p::split_peer_multiaddr(text)?;
    Ok(TrustedPeer {
        peer_id: peer.to_string(),
        addresses: vec![address.to_string()],
    })
}

/// `$XDG_DATA_HOME/rba`, else `~/.local/share/rba`.
pub fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("rba")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tangle_callers_share_a_target_dir_only_when_configured() {
        assert!(!NodeConfig::default().tangle.share_target_dir_per_service);
        let config: NodeConfig =
            toml::from_str("[tangle]\nshare_target_dir_per_service = true\n").unwrap();
        assert!(config.tangle.share_target_dir_per_service);
        assert!(toml::from_str::<NodeConfig>("[tangle]\nshare = true\n").is_err());
    }

    #[test]
    fn sandbox_section_names_a_provider_and_refuses_unknown_ones() {
        let config: NodeConfig = toml::from_str("[workers]\nisolation = \"bubblewrap\"").unwrap();
        assert_eq!(
            config.workers.isolation,
            rba_executor::isolation::Isolation::Bubblewrap
        );
        let default: NodeConfig = toml::from_str("").unwrap();
        assert_eq!(
            default.workers.isolation,
            rba_executor::isolation::Isolation::Namespaces
        );
        let err = toml::from_str::<NodeConfig>("[workers]\nisolation = \"docker\"").unwrap_err();
        assert!(err.to_string().contains("docker"), "{err}");
    }

    #[test]
    fn limits_section_sets_the_node_maxima_and_refuses_nonsense() {
        let text = r#"
            [workers.limits]
            timeout_secs = 600
            memory = "2G"
            processes = 300
            disk = "10G"
            disk_inodes = 50000
        "#;
        let config: NodeConfig = toml::from_str(text).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut executor = rba_executor::runner::ExecutorConfig::new(dir.path()).unwrap();
        config.workers.limits.apply(&mut executor).unwrap();
        assert_eq!(
            executor.limits.wall_time,
            Some(std::time::Duration::from_secs(600))
        );
        assert_eq!(executor.limits.memory_bytes, Some(2 << 30));
        assert_eq!(executor.limits.max_processes, Some(300));
        assert_eq!(
            executor.slot_disk,
            Some(rba_executor::quota::DiskQuota {
                bytes: 10 << 30,
                inodes: 50000
            })
        );
        for bad in [
            "[workers.limits]\nmemory = \"lots\"",
            "[workers.limits]\nprocesses = 0",
            "[workers.limits]\ntimeout_secs = 0",
            "[workers.limits]\ndisk_inodes = 5",
            "[workers.limits]\ndisk = \"-1G\"",
        ] {
            let config: NodeConfig = toml::from_str(bad).unwrap();
            let err = config.workers.limits.apply(&mut executor).unwrap_err();
            assert!(err.to_string().contains("[workers.limits]"), "{bad}: {err}");
        }
        assert!(toml::from_str::<NodeConfig>("[workers.limits]\nmemroy = \"1G\"").is_err());
    }

    #[test]
    fn toml_env_and_validation() {
        let text = r#"
            data_dir = "/tmp/x"
            [servers]
            libp2p = ["/ip4/127.0.0.1/tcp/0"]
            http = "127.0.0.1:0"
            [workers]
            slots = 3
            [[trusted_peers]]
            peer_id = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
            addresses = ["/ip4/127.0.0.1/tcp/9"]
        "#;
        let mut config: NodeConfig = toml::from_str(text).unwrap();
        assert_eq!(config.workers.slots, 3);
        assert_eq!(config.servers.reapi, NodeConfig::default().servers.reapi);
        config.validate().unwrap();
        config
            .apply_vars(|name| match name {
                "RBA_GRPC_LISTEN" => Some("off".into()),
                "RBA_WORKERS" => Some("5".into()),
                _ => None,
            })
            .unwrap();
        assert_eq!(config.servers.reapi, None);
        assert_eq!(config.workers.slots, 5);
        assert!(toml::from_str::<NodeConfig>("bogus = 1").is_err());
        // An unknown key (a flat key of an earlier version) is refused, naming the sections.
        let moved = toml::from_str::<NodeConfig>("grpc_listen = \"127.0.0.1:1\"").unwrap_err();
        assert!(moved.to_string().contains("servers"), "{moved}");
        config.trusted_peers[0].peer_id = "nope".into();
        assert!(config.validate().is_err());
    }

    #[test]
    fn cors_origins_are_origins_or_the_node_does_not_start() {
        let mut config = NodeConfig::ephemeral("/tmp/x");
        assert!(
            config.http_cors_origins.is_empty(),
            "CORS is off by default"
        );
        config
            .apply_vars(|name| {
                (name == "RBA_HTTP_CORS_ORIGINS")
                    .then(|| "https://ci.example.com, http://127.0.0.1:8080".into())
            })
            .unwrap();
        assert_eq!(
            config.http_cors_origins,
            ["https://ci.example.com", "http://127.0.0.1:8080"]
        );
        config.validate().unwrap();
        for bad in [
            "ci.example.com",
            "https://ci.example.com/",
            "https://ci.example.com/path",
            "javascript:alert(1)",
            "https://",
            "https://a b",
        ] {
            config.http_cors_origins = vec![bad.to_string()];
            let error = config.validate().unwrap_err().to_string();
            assert!(error.contains("http_cors_origins"), "{bad}: {error}");
        }
        config.http_cors_origins = vec!["*".to_string()];
        config.validate().unwrap();
    }

    #[test]
    fn grpc_off_loopback_needs_tokens_given_any_way() {
        let mut config = NodeConfig::ephemeral("/tmp/x");
        config.servers.reapi = Some(([0, 0, 0, 0], 0).into());
        let error = format!("{:#}", config.validate().unwrap_err());
        assert!(
            error.contains("without tokens") && error.contains("--token"),
            "{error}"
        );
        config
            .apply_vars(|name| (name == "RBA_TOKENS").then(|| "ci:0123456789:read-write".into()))
            .unwrap();
        config.validate().unwrap();
        assert_eq!(config.auth.tokens[0].name, "ci");

        let file: NodeConfig = toml::from_str(
            r#"
            public_read = true
            [servers]
            reapi = "0.0.0.0:50051"
            [servers.tls]
            cert = "/c.pem"
            key = "/k.pem"
            [[auth.tokens]]
            name = "ops"
            token = "0123456789"
            access = "read-write"
            tenants = ["*"]
        "#,
        )
        .unwrap();
        file.validate().unwrap();
        assert!(file.public_read && file.servers.tls.is_some());
        assert_eq!(file.auth.tokens[0].tenants, ["*"]);
        let mut short = file.clone();
        short.auth.tokens[0].token = "short".into();
        assert!(short.validate().is_err());
        let mut no_grpc = file;
        no_grpc.servers.reapi = None;
        assert!(no_grpc.validate().is_err(), "TLS without gRPC is a mistake");
    }
}
