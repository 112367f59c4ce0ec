//! `cache-server`: the REAPI v2 server alone — no libp2p, no HTTP views — for Bazel, Buck2 and
//! other REAPI clients. See `cache-server --help`.
//!
//! Why it lives in the agent package: it reads the one configuration schema
//! ([`rba_agent::config::NodeConfig`], the file `rba serve` and `rba worker` read) and is wired
//! by the one composition root ([`rba_agent::compose::reapi_server`]), so it runs embedded by
//! default and as a scale-out front end with `RBA_STORE_URL` and `RBA_DATABASE_URL`, exactly as
//! `rba serve` does. Its flags (and their `RBA_CACHE_*` variables) are shorthands for keys of
//! that schema; its defaults differ only in what it serves (REAPI on 127.0.0.1:50051, its
//! metrics on 127.0.0.1:50052, nothing else) and where it keeps its data.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use rba_agent::config::{NodeConfig, parse_optional_addr};
use rba_cache_server::auth::Access;
use rba_cache_server::config::{TlsConfig, TokenConfig, parse_size, parse_token};

/// Command line of `cache-server`. Every flag can also be given by environment.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "cache-server",
    version,
    about = "REAPI v2 remote cache and remote execution over gRPC (Bazel, Buck2, Pants, …) on the rba content-addressed store",
    long_about = "REAPI v2 remote cache and remote execution over gRPC (Bazel, Buck2, Pants, …) on the rba content-addressed store.\n\n\
With no arguments it serves gRPC on 127.0.0.1:50051, Prometheus metrics on 127.0.0.1:50052/metrics, \
and keeps its data under $XDG_CACHE_HOME/rba-cache-server (or ~/.cache/rba-cache-server). \
Actions sent to Execute run in the rba sandbox (unprivileged, no network, read-only /usr) when its \
prerequisites are present (.ci/setup.d/sandbox.sh); otherwise, or with --no-execution, it serves cache-only.\n\n\
Its configuration file is the node's (`rba serve`, `rba worker`): [servers] reapi, [reapi], \
[store], [workers], [auth] apply. With RBA_STORE_URL=s3://BUCKET and \
RBA_DATABASE_URL=postgres://… (or [store] url and [database] url) it is a scale-out front end: \
blobs in the bucket, index, action cache and job queue in PostgreSQL, actions run by `rba worker`s.\n\n\
Settings come from built-in defaults, then the TOML file given by --config, then environment \
variables, then flags. Use --print-config to see the result.",
    after_help = "Examples:\n  \
cache-server\n  \
cache-server --listen 0.0.0.0:50051 --token ci:$CI_TOKEN:read-write --token dev:$DEV_TOKEN:read-only\n  \
bazel build //... --remote_cache=grpc://127.0.0.1:50051\n  \
bazel build //... --remote_executor=grpc://127.0.0.1:50051"
)]
struct Cli {
    /// TOML configuration file, the node's schema (--print-config shows every key).
    #[arg(long, short = 'c', env = "RBA_CACHE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// gRPC listen address ([servers] reapi) [default: 127.0.0.1:50051].
    #[arg(long, env = "RBA_CACHE_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,

    /// Data directory (blobs, index, action cache, executor) [default:
    /// ~/.cache/rba-cache-server].
    #[arg(long, env = "RBA_CACHE_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,

    /// Prometheus metrics address ([reapi] metrics), or "off" [default: 127.0.0.1:50052].
    #[arg(long, env = "RBA_CACHE_METRICS_LISTEN", value_name = "ADDR|off")]
    metrics_listen: Option<String>,

    /// Store capacity ([store] max_bytes); least-recently-used blobs are evicted above it
    /// (e.g. 50GiB).
    #[arg(long, env = "RBA_CACHE_MAX_STORE_BYTES", value_name = "SIZE", value_parser = parse_size)]
    max_store_bytes: Option<u64>,

    /// fsync each blob before it becomes visible ([store] fsync).
    #[arg(long, env = "RBA_CACHE_FSYNC", value_name = "BOOL")]
    fsync: Option<bool>,

    /// gRPC message limit the advertised batch limit is derived from ([reapi]
    /// max_message_bytes, e.g. 4MiB).
    #[arg(long, env = "RBA_CACHE_MAX_MESSAGE_BYTES", value_name = "SIZE", value_parser = parse_size)]
    max_message_bytes: Option<u64>,

    /// Bearer token, as TOKEN:ACCESS or NAME:TOKEN:ACCESS with ACCESS read-only|read-write.
    /// Repeatable; the variable takes a comma-separated list.
    #[arg(long = "token", env = "RBA_CACHE_TOKENS", value_name = "[NAME:]TOKEN:ACCESS",
          value_parser = parse_token, value_delimiter = ',', hide_env_values = true)]
    tokens: Vec<TokenConfig>,

    /// Access of requests without a token ([auth] anonymous) [default: read-write without
    /// tokens, else none].
    #[arg(long, env = "RBA_CACHE_ANONYMOUS", value_enum, value_name = "ACCESS")]
    anonymous: Option<Access>,

    /// Serve gRPC over TLS with this PEM certificate chain (with --tls-key). Bearer tokens off
    /// loopback need it.
    #[arg(long, env = "RBA_CACHE_TLS_CERT", value_name = "PEM")]
    tls_cert: Option<PathBuf>,

    /// The PEM private key of --tls-cert.
    #[arg(long, env = "RBA_CACHE_TLS_KEY", value_name = "PEM")]
    tls_key: Option<PathBuf>,

    /// Actions the Execution service runs at once ([workers] slots) [default: CPUs, at most
    /// 4].
    #[arg(long, env = "RBA_CACHE_EXECUTOR_WORKERS", value_name = "N")]
    executor_workers: Option<usize>,

    /// Serve cache-only: no Execution service (Execute answers UNIMPLEMENTED; [reapi]
    /// execution = false).
    #[arg(long, env = "RBA_CACHE_NO_EXECUTION")]
    no_execution: bool,

    /// Log filter (tracing-subscriber syntax).
    #[arg(long, env = "RBA_LOG", default_value = "info", value_name = "FILTER")]
    log: String,

    /// Log line format: `text`, or `json` (one object per line, for log collectors).
    #[arg(long, env = "RBA_LOG_FORMAT", value_enum, default_value_t)]
    log_format: rba_cache_server::logging::LogFormat,

    /// Print the effective configuration as TOML and exit (tokens and passwords are masked).
    #[arg(long)]
    print_config: bool,
}

impl Cli {
    /// Defaults (a REAPI server's), then the file, then `RBA_*` environment, then flags.
    fn node_config(&self) -> anyhow::Result<NodeConfig> {
        let mut config = match &self.config {
            Some(path) => NodeConfig::from_file_over(NodeConfig::reapi_server(), path)?,
            None => NodeConfig::reapi_server(),
        };
        config.apply_env()?;
        if let Some(listen) = self.listen {
            config.servers.reapi = Some(listen);
        }
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(metrics) = &self.metrics_listen {
            config.reapi.metrics = parse_optional_addr(metrics, "--metrics-listen")?;
        }
        if let Some(bytes) = self.max_store_bytes {
            config.store.max_bytes = bytes;
        }
        if let Some(fsync) = self.fsync {
            config.store.fsync = fsync;
        }
        if let Some(bytes) = self.max_message_bytes {
            config.reapi.max_message_bytes =
                usize::try_from(bytes).context("--max-message-bytes")?;
        }
        if let Some(slots) = self.executor_workers {
            config.workers.slots = slots;
        }
        if self.no_execution {
            config.reapi.execution = false;
        }
        config.auth.tokens.extend(self.tokens.iter().cloned());
        if let Some(anonymous) = self.anonymous {
            config.auth.anonymous = Some(anonymous);
        }
        if let Some(tls) = TlsConfig::from_flags(self.tls_cert.clone(), self.tls_key.clone())? {
            config.servers.tls = Some(tls);
        }
        anyhow::ensure!(
            config.servers.reapi.is_some(),
            "no REAPI address: give --listen ADDR (or [servers] reapi in the file)"
        );
        config.validate()?;
        Ok(config)
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    rba_cache_server::logging::init(
        tracing_subscriber::EnvFilter::try_new(&cli.log).context("invalid --log filter")?,
        cli.log_format,
    );
    let config = cli.node_config()?;
    if cli.print_config {
        print!("{}", config.to_masked_toml());
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let addr = config.servers.reapi.expect("checked by node_config");
        let server = rba_agent::compose::reapi_server(&config).await?;
        let (listener, metrics) = rba_agent::grpc::listeners(&server, addr).await?;
        // Listen for signals before the server says it is serving: a SIGTERM sent the moment
        // "serving REAPI" is logged must already shut down cleanly.
        let shutdown = shutdown_signal()?;
        server.serve(listener, metrics, shutdown).await
    })
}

/// Registers for SIGINT and SIGTERM now; the returned future resolves on the first of them.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        }
    })
}
