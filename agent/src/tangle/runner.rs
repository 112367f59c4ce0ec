//! `rba tangle run`: the operator node as a Tangle Blueprint service, the way the Blueprint
//! Manager starts it.
//!
//! The manager starts a blueprint binary as `BINARY run [--test-mode] [--pretty] [-v…]
//! [--dry-run]` with the environment `BLUEPRINT_ID`, `SERVICE_ID`, `KEYSTORE_URI`,
//! `DATA_DIR`, `HTTP_RPC_URL`, `WS_RPC_URL`, `PROTOCOL`, `CHAIN`, `TANGLE_CONTRACT`,
//! `BRIDGE_SOCKET_PATH`, … (operators point it at a two-line wrapper, `exec rba tangle "$@"`).
//! Here that environment is loaded with `BlueprintEnvironment::load_with_config` (not `load()`,
//! which would parse `rba`'s own command line), the node starts (libp2p, HTTP + WebSocket,
//! REAPI, executor) and stays up as a background service of the `BlueprintRunner`, whose
//! `TangleProducer` turns `JobSubmitted` events into job calls for [`super::jobs::router`] and
//! whose `TangleConsumer` posts the results.
//!
//! Ctrl-C or SIGTERM drains: the producer takes no new call from chain, the calls already taken
//! run to their end (the executor's `shutdown_grace_secs`, then they are cancelled and answered
//! with an error result) and their results are posted while the runner still runs; only then
//! does the runner stop and the node shut down. A call taken from chain and dropped at a
//! restart would stay pending on chain with the customer's payment.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::Context as _;
use blueprint_sdk::contexts::tangle::TangleClientContext;
use blueprint_sdk::qos::heartbeat::{
    HeartbeatConfig, HeartbeatConsumer, HeartbeatService, HeartbeatStatus,
};
use blueprint_sdk::runner::config::{BlueprintEnvironment, ContextConfig};
use blueprint_sdk::runner::error::RunnerError;
use blueprint_sdk::runner::tangle::config::TangleConfig as RunnerTangleConfig;
use blueprint_sdk::runner::{BackgroundService, BlueprintRunner};
use blueprint_sdk::tangle::{TangleConsumer, TangleProducer};
use blueprint_sdk::{JobCall, JobResult};
use clap::{Args, Parser, Subcommand};
use futures::{Sink, Stream};
use tokio::sync::{oneshot, watch};

use super::{TangleConfig, TangleContext};
use crate::config::NodeArgs;
use crate::node::Node;

/// `rba tangle …`
#[derive(Debug, Subcommand)]
pub enum TangleCommand {
    /// Run the node as a Tangle Blueprint (what the Blueprint Manager starts): jobs 0 compile,
    /// 1 test, 2 lint, 3 audit, 4 check from chain, results posted back, the node's libp2p,
    /// HTTP/WebSocket and REAPI faces alongside; job 5 runs code (as `POST /execute`).
    Run(RunArgs),
}

/// `rba tangle run` options. The blueprint environment comes from the variables the Blueprint
/// Manager sets; every one of them can also be given as a flag.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The blueprint's data directory (the node keeps its data under `DIR/rba` unless
    /// `--data-dir` says otherwise).
    #[arg(long, env = "DATA_DIR", value_name = "DIR")]
    pub blueprint_data_dir: Option<PathBuf>,
    /// The operator's keystore (ECDSA key used to post results).
    #[arg(long, short = 'k', env = "KEYSTORE_URI")]
    pub keystore_uri: Option<String>,
    /// The keystore's password.
    #[arg(long, env = "KEYSTORE_PASSWORD", hide_env_values = true)]
    pub keystore_password: Option<String>,
    /// Tangle EVM HTTP RPC endpoint.
    #[arg(long, env = "HTTP_RPC_URL")]
    pub http_rpc_url: Option<String>,
    /// Tangle EVM WebSocket RPC endpoint.
    #[arg(long, env = "WS_RPC_URL")]
    pub ws_rpc_url: Option<String>,
    /// `local_testnet`, `testnet`, `mainnet`, … (blueprint-sdk's `SupportedChains`).
    #[arg(long, env = "CHAIN")]
    pub chain: Option<String>,
    /// The Blueprint Manager bridge socket.
    #[arg(long, env = "BRIDGE_SOCKET_PATH")]
    pub bridge_socket_path: Option<PathBuf>,
    /// Test mode (no bridge connection).
    #[arg(long, short = 't')]
    pub test_mode: bool,
    /// Run jobs but post no results and register nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Pretty logs (accepted for the Blueprint Manager; `RBA_LOG` sets the filter).
    #[arg(long)]
    pub pretty: bool,
    /// Verbosity (accepted for the Blueprint Manager; `RBA_LOG` sets the filter).
    #[arg(short = 'v', action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// The node's own flags, as for `rba serve`.
    #[command(flatten)]
    pub node: NodeArgs,

    /// Accept `file://` zip URIs for files under this directory.
    #[arg(long, env = "RBA_TANGLE_FILE_ROOT")]
    pub file_root: Option<PathBuf>,
    /// IPFS gateway for `ipfs://CID` (fetched as `GATEWAY/ipfs/CID`), e.g. https://ipfs.io.
    #[arg(long, env = "RBA_TANGLE_IPFS_GATEWAY")]
    pub ipfs_gateway: Option<String>,
    /// Largest zip accepted, in bytes.
    #[arg(long, env = "RBA_TANGLE_MAX_ZIP_BYTES")]
    pub max_zip_bytes: Option<u64>,
    /// Longest a zip download may take, in seconds.
    #[arg(long, env = "RBA_TANGLE_FETCH_TIMEOUT_SECS")]
    pub fetch_timeout_secs: Option<u64>,
    /// Also accept plain `http://` zip URIs (private deployments only).
    #[arg(long)]
    pub allow_http: bool,
    /// Also fetch from loopback and private addresses (private deployments only).
    #[arg(long)]
    pub allow_private_hosts: bool,
    /// The address customers reach this node at (its HTTP face, for the session WebSocket),
    /// registered on chain with the operator in registration mode.
    #[arg(long, env = "RBA_TANGLE_RPC_ADDRESS", value_name = "URL")]
    pub rpc_address: Option<String>,
    /// How often the node sends a QoS heartbeat to the operator status registry, in seconds
    /// (0: none). Tangle marks an operator that misses heartbeats offline.
    #[arg(long, env = "RBA_TANGLE_HEARTBEAT_SECS", default_value_t = 300)]
    pub heartbeat_secs: u64,
    /// How often the chain is polled for new job calls, in milliseconds.
    #[arg(long, env = "RBA_TANGLE_POLL_INTERVAL_MS", default_value_t = 2000)]
    pub poll_interval_ms: u64,

    /// Arguments this version does not know, ignored with a warning rather than fatal: the
    /// Blueprint Manager of a newer SDK may pass flags this one does not have. Everything from
    /// the first unknown argument on is ignored (clap cannot tell an unknown flag's value from
    /// the next flag); the manager's own flags come first and every setting also has its
    /// environment variable.
    #[arg(
        value_name = "IGNORED",
        hide = true,
        num_args = 0..,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub ignored: Vec<String>,
}

/// Runs a `rba tangle` command; returns the process exit code.
pub async fn main(data_dir: Option<PathBuf>, command: TangleCommand) -> anyhow::Result<u8> {
    match command {
        TangleCommand::Run(args) => run(data_dir, args).await,
    }
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn keystore_path(uri: &str) -> &Path {
    Path::new(uri.strip_prefix("file://").unwrap_or(uri))
}

/// Everything missing from the blueprint environment, in one sentence (empty when complete).
pub fn missing_environment(args: &RunArgs) -> Vec<String> {
    let mut missing = Vec::new();
    match var("BLUEPRINT_ID") {
        None => missing.push("BLUEPRINT_ID is not set".to_string()),
        Some(id) if id.parse::<u64>().is_err() => {
            missing.push(format!("BLUEPRINT_ID={id:?} is not a number"))
        }
        Some(_) => {}
    }
    let registration = var("REGISTRATION_MODE_ON")
        .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"));
    match var("SERVICE_ID") {
        None if !registration => missing.push("SERVICE_ID is not set".to_string()),
        Some(id) if id.parse::<u64>().is_err() => {
            missing.push(format!("SERVICE_ID={id:?} is not a number"))
        }
        _ => {}
    }
    match &args.keystore_uri {
        None => missing.push("KEYSTORE_URI is not set (no keystore)".to_string()),
        Some(uri) if !keystore_path(uri).is_dir() => {
            missing.push(format!("no keystore at {uri:?}"))
        }
        Some(_) => {}
    }
    if args.blueprint_data_dir.is_none() {
        missing.push("DATA_DIR is not set".to_string());
    }
    missing
}

/// The argument vector blueprint-sdk's own parser reads (`run --flag value …`).
fn blueprint_argv(args: &RunArgs, data_dir: &Path, keystore: &str) -> Vec<String> {
    let mut argv = vec![
        "rba-tangle".to_string(),
        "run".to_string(),
        "--data-dir".to_string(),
        data_dir.display().to_string(),
        "--keystore-uri".to_string(),
        keystore.to_string(),
        "--protocol".to_string(),
        "tangle".to_string(),
    ];
    let mut flag = |name: &str, value: &Option<String>| {
        if let Some(value) = value {
            argv.push(name.to_string());
            argv.push(value.clone());
        }
    };
    flag("--http-rpc-url", &args.http_rpc_url);
    flag("--ws-rpc-url", &args.ws_rpc_url);
    flag("--chain", &args.chain);
    flag("--keystore-password", &args.keystore_password);
    flag(
        "--bridge-socket-path",
        &args
            .bridge_socket_path
            .as_ref()
            .map(|p| p.display().to_string()),
    );
    if args.test_mode {
        argv.push("--test-mode".to_string());
    }
    if args.dry_run {
        argv.push("--dry-run".to_string());
    }
    argv
}

/// How many calls were taken from chain and how many results reached the chain, for the drain.
#[derive(Debug, Default)]
struct Drain {
    draining: AtomicBool,
    taken: AtomicU64,
    settled: AtomicU64,
}

impl Drain {
    fn in_flight(&self) -> u64 {
        let settled = self.settled.load(Ordering::SeqCst);
        self.taken.load(Ordering::SeqCst).saturating_sub(settled)
    }
}

/// The producer, stopped from taking calls once draining (it then stays pending: ending the
/// stream would stop the runner with an error before the results are posted).
struct DrainingProducer<P> {
    inner: P,
    drain: Arc<Drain>,
}

impl<P, E> Stream for DrainingProducer<P>
where
    P: Stream<Item = Result<JobCall, E>> + Unpin,
{
    type Item = Result<JobCall, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        if self.drain.draining.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        let next = Pin::new(&mut self.inner).poll_next(cx);
        if let Poll::Ready(Some(Ok(_))) = &next {
            self.drain.taken.fetch_add(1, Ordering::SeqCst);
        }
        next
    }
}

/// The consumer, handing results to the SDK's one at a time, counting those it has flushed
/// (posted, or dropped as not postable), and posting a result again when the chain refused it
/// for a nonce another transaction of the operator's key took meanwhile.
///
/// Why the retry: the QoS heartbeat sends its own transactions from the same key, and each
/// side asks the chain for the next nonce on its own; when a heartbeat and a result go out
/// together, one of them is refused ("nonce too low"). The SDK's consumer then fails, the
/// runner stops and the node goes down with the call still pending on chain (seen in CI). A
/// result refused that way is sent again, with a fresh nonce, up to [`POST_ATTEMPTS`] times.
struct SettlingConsumer<C> {
    inner: C,
    drain: Arc<Drain>,
    /// Results taken and not yet flushed; the front one is with `inner` when `posting`.
    queue: std::collections::VecDeque<JobResult>,
    posting: bool,
    attempts: u32,
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// How many times one result is sent before a nonce refusal stops the runner.
const POST_ATTEMPTS: u32 = 4;

impl<C> SettlingConsumer<C> {
    fn new(inner: C, drain: Arc<Drain>) -> Self {
        SettlingConsumer {
            inner,
            drain,
            queue: Default::default(),
            posting: false,
            attempts: 0,
            backoff: None,
        }
    }
}

/// Whether a refused transaction may pass when sent again: the nonce it was given was taken.
fn nonce_taken(error: &str) -> bool {
    let error = error.to_ascii_lowercase();
    [
        "nonce too low",
        "replacement transaction underpriced",
        "already known",
    ]
    .iter()
    .any(|refusal| error.contains(refusal))
}

impl<C> Sink<JobResult> for SettlingConsumer<C>
where
    C: Sink<JobResult> + Unpin,
    C::Error: std::fmt::Display,
{
    type Error = C::Error;

    fn poll_ready(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Result<(), C::Error>> {
        Pin::new(&mut self.inner).poll_ready(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, item: JobResult) -> Result<(), C::Error> {
        self.queue.push_back(item);
        Ok(())
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Result<(), C::Error>> {
        let this = &mut *self;
        loop {
            if let Some(backoff) = this.backoff.as_mut() {
                std::task::ready!(backoff.as_mut().poll(cx));
                this.backoff = None;
            }
            if !this.posting {
                let Some(front) = this.queue.front() else {
                    return Poll::Ready(Ok(()));
                };
                std::task::ready!(Pin::new(&mut this.inner).poll_ready(cx))?;
                Pin::new(&mut this.inner).start_send(front.clone())?;
                this.posting = true;
                this.attempts += 1;
            }
            match std::task::ready!(Pin::new(&mut this.inner).poll_flush(cx)) {
                Ok(()) => {
                    this.queue.pop_front();
                    this.posting = false;
                    this.attempts = 0;
                    this.drain.settled.fetch_add(1, Ordering::SeqCst);
                }
                Err(error) if this.attempts < POST_ATTEMPTS && nonce_taken(&error.to_string()) => {
                    tracing::warn!(
                        attempt = this.attempts,
                        %error,
                        "a job result was refused for its nonce; sending it again"
                    );
                    this.posting = false;
                    this.backoff = Some(Box::pin(tokio::time::sleep(
                        Duration::from_millis(250) * this.attempts,
                    )));
                }
                Err(error) => {
                    this.queue.pop_front();
                    this.posting = false;
                    this.attempts = 0;
                    return Poll::Ready(Err(error));
                }
            }
        }
    }

    fn poll_close(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Result<(), C::Error>> {
        std::task::ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// The heartbeat's own hook: the QoS service submits each heartbeat to the status registry
/// itself; this only logs it.
struct LoggedHeartbeat;

impl HeartbeatConsumer for LoggedHeartbeat {
    fn send_heartbeat(
        &self,
        status: &HeartbeatStatus,
    ) -> Pin<
        Box<
            dyn std::future::Future<Output = Result<(), blueprint_sdk::qos::error::Error>>
                + Send
                + 'static,
        >,
    > {
        tracing::debug!(
            service_id = status.service_id,
            status_code = status.status_code,
            "QoS heartbeat"
        );
        Box::pin(async { Ok(()) })
    }
}

/// The QoS heartbeat as a background service that lasts as long as the node (the SDK's own
/// `heartbeat_service` adapter drops its end of the channel at once, which the runner takes for
/// a failed service, and stops).
struct Heartbeat {
    service: HeartbeatService<LoggedHeartbeat>,
    stopped: watch::Receiver<bool>,
}

impl BackgroundService for Heartbeat {
    async fn start(&self) -> Result<oneshot::Receiver<Result<(), RunnerError>>, RunnerError> {
        self.service
            .start_heartbeat()
            .await
            .map_err(|e| RunnerError::Other(Box::new(e)))?;
        let (tx, rx) = oneshot::channel();
        let mut stopped = self.stopped.clone();
        tokio::spawn(async move {
            let _ = stopped.wait_for(|s| *s).await;
            let _ = tx.send(Ok(()));
        });
        Ok(rx)
    }
}

/// After the grace period, how long results of cancelled jobs may take to reach the chain.
const POST_MARGIN: Duration = Duration::from_secs(30);

/// The node's lifetime as a `BlueprintRunner` background service: it reports an end when the
/// node stops.
struct NodeService {
    stopped: watch::Receiver<bool>,
}

impl BackgroundService for NodeService {
    async fn start(&self) -> Result<oneshot::Receiver<Result<(), RunnerError>>, RunnerError> {
        let (tx, rx) = oneshot::channel();
        let mut stopped = self.stopped.clone();
        tokio::spawn(async move {
            let _ = stopped.wait_for(|s| *s).await;
            let _ = tx.send(Ok(()));
        });
        Ok(rx)
    }
}

/// Registration mode (`REGISTRATION_MODE_ON`, how the Blueprint Manager starts a binary before
/// the operator runs it): no node, no listener. The blueprint takes no registration inputs (the
/// manager's `onRegister` ignores them), so the payload is an ABI-encoded empty `bytes`, written
/// where the manager reads it; unless only capture was asked for (or a dry run), the operator
/// is then registered for the blueprint.
async fn register(env: &BlueprintEnvironment, rpc_address: String) -> anyhow::Result<u8> {
    use alloy_sol_types::SolValue as _;
    use blueprint_sdk::runner::BlueprintConfig as _;
    let payload = blueprint_sdk::alloy::primitives::Bytes::new().abi_encode();
    let path = blueprint_sdk::registration::write_registration_inputs(env, &payload)
        .await
        .context("writing the registration inputs")?;
    eprintln!(
        "rba: registration mode: inputs written to {} (no node started)",
        path.display()
    );
    if env.registration_capture_only() || env.dry_run {
        return Ok(0);
    }
    let config = RunnerTangleConfig::new(rpc_address);
    if config
        .requires_registration(env)
        .await
        .context("checking the operator's registration")?
    {
        config
            .update_registration_inputs(payload)
            .context("registration inputs")?;
        config
            .register(env)
            .await
            .context("registering the operator")?;
        eprintln!("rba: operator registered");
    }
    Ok(0)
}

async fn run(rba_data_dir: Option<PathBuf>, args: RunArgs) -> anyhow::Result<u8> {
    if !args.ignored.is_empty() {
        eprintln!(
            "rba: warning: ignoring arguments this version does not know: {}",
            args.ignored.join(" ")
        );
    }
    let missing = missing_environment(&args);
    if !missing.is_empty() {
        anyhow::bail!(
            "the blueprint environment is incomplete: {} (`rba tangle run` is started by the Blueprint Manager, which sets them; see README \"Tangle Blueprint\")",
            missing.join("; ")
        );
    }
    let blueprint_dir = args.blueprint_data_dir.clone().unwrap_or_default();
    let keystore = args.keystore_uri.clone().unwrap_or_default();
    let context_config =
        ContextConfig::try_parse_from(blueprint_argv(&args, &blueprint_dir, &keystore))
            .map_err(|e| anyhow::anyhow!("{}", e.to_string().lines().next().unwrap_or_default()))
            .context("reading the blueprint settings")?;
    let env = BlueprintEnvironment::load_with_config(context_config)
        .context("loading the blueprint environment")?;
    if env.registration_mode() {
        return register(&env, args.rpc_address.clone().unwrap_or_default()).await;
    }
    let settings = env
        .protocol_settings
        .tangle()
        .context("loading the blueprint environment")?
        .clone();
    let client = env
        .tangle_client()
        .await
        .with_context(|| format!("connecting to Tangle at {}", env.http_rpc_endpoint))?;

    let mut node_config = args.node.node_config()?;
    node_config.data_dir = rba_data_dir.unwrap_or_else(|| blueprint_dir.join("rba"));
    let mut tangle_config = TangleConfig::new(&node_config.data_dir);
    tangle_config.file_root = args.file_root.clone();
    tangle_config.ipfs_gateway = args.ipfs_gateway.clone();
    tangle_config.allow_http = args.allow_http;
    tangle_config.allow_private_hosts = args.allow_private_hosts;
    tangle_config.share_target_dir_per_service = node_config.tangle.share_target_dir_per_service;
    if let Some(max) = args.max_zip_bytes {
        tangle_config.max_zip_bytes = max;
    }
    if let Some(secs) = args.fetch_timeout_secs {
        tangle_config.fetch_timeout = Duration::from_secs(secs);
    }

    let node = Node::start(node_config).await?;
    eprintln!(
        "rba: tangle blueprint {} service {} as node {}",
        settings.blueprint_id,
        settings
            .service_id
            .map(|s| s.to_string())
            .unwrap_or_else(|| "(registration)".into()),
        node.peer_id()
    );
    if let Some(http) = node.http_addr() {
        eprintln!("rba: http on http://{http}");
    }
    let ctx = TangleContext::new(Arc::clone(node.shared()), tangle_config)?;
    let (stopped_tx, stopped) = watch::channel(false);
    let service_id = settings.service_id.unwrap_or_default();
    let drain = Arc::new(Drain::default());
    let producer = DrainingProducer {
        inner: TangleProducer::new(client.clone(), service_id)
            .with_poll_interval(Duration::from_millis(args.poll_interval_ms.max(50))),
        drain: Arc::clone(&drain),
    };
    let consumer = SettlingConsumer::new(TangleConsumer::new(client), Arc::clone(&drain));
    let heartbeat = (args.heartbeat_secs > 0 && !env.dry_run)
        .then(|| {
            let config = HeartbeatConfig {
                interval_secs: args.heartbeat_secs,
                service_id,
                blueprint_id: settings.blueprint_id,
                status_registry_address: settings.status_registry_contract,
                ..HeartbeatConfig::default()
            };
            HeartbeatService::new(
                config,
                Arc::new(LoggedHeartbeat),
                env.http_rpc_endpoint.to_string(),
                env.keystore_uri.clone(),
                settings.status_registry_contract,
                env.dry_run,
                service_id,
                settings.blueprint_id,
            )
        })
        .transpose()
        .context("starting the QoS heartbeat")?;
    let mut builder = BlueprintRunner::builder(RunnerTangleConfig::default(), env)
        .router(super::jobs::router(ctx))
        .producer(producer)
        .consumer(consumer)
        .background_service(NodeService {
            stopped: stopped.clone(),
        });
    if let Some(service) = heartbeat {
        builder = builder.background_service(Heartbeat { service, stopped });
    }
    let runner = builder.run();
    tokio::pin!(runner);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let ended = tokio::select! {
        result = &mut runner => Some(result),
        _ = tokio::signal::ctrl_c() => None,
        _ = terminate.recv() => None,
    };
    let result = match ended {
        Some(result) => result.context("the blueprint runner stopped"),
        None => {
            drain.draining.store(true, Ordering::SeqCst);
            let grace = Duration::from_secs(node.shared().config.workers.shutdown_grace_secs);
            eprintln!(
                "rba: draining: {} call(s) in flight, up to {grace:?} to finish",
                drain.in_flight()
            );
            let shared = Arc::clone(node.shared());
            let executor = tokio::spawn(async move { shared.executor.drain(grace).await });
            let deadline = tokio::time::Instant::now() + grace + POST_MARGIN;
            let result = loop {
                if drain.in_flight() == 0 {
                    break Ok(());
                }
                if tokio::time::Instant::now() >= deadline {
                    eprintln!(
                        "rba: {} result(s) not posted before the deadline",
                        drain.in_flight()
                    );
                    break Ok(());
                }
                tokio::select! {
                    result = &mut runner => break result.context("the blueprint runner stopped"),
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            };
            let _ = executor.await;
            result
        }
    };
    eprintln!("rba: shutting down");
    let _ = stopped_tx.send(true);
    node.shutdown().await?;
    result.map(|()| 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A consumer that refuses the sends its script names, with the error given, and records
    /// the bodies it accepted.
    struct ScriptedConsumer {
        refusals: std::collections::VecDeque<Option<&'static str>>,
        sending: Option<JobResult>,
        posted: Vec<bytes::Bytes>,
    }

    impl Sink<JobResult> for ScriptedConsumer {
        type Error = String;

        fn poll_ready(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<Result<(), String>> {
            Poll::Ready(Ok(()))
        }

        fn start_send(mut self: Pin<&mut Self>, item: JobResult) -> Result<(), String> {
            assert!(self.sending.is_none(), "one result at a time");
            self.sending = Some(item);
            Ok(())
        }

        fn poll_flush(
            mut self: Pin<&mut Self>,
            _: &mut TaskContext<'_>,
        ) -> Poll<Result<(), String>> {
            let Some(item) = self.sending.take() else {
                return Poll::Ready(Ok(()));
            };
            if let Some(error) = self.refusals.pop_front().flatten() {
                return Poll::Ready(Err(error.to_string()));
            }
            self.posted.push(item.body().unwrap().clone());
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<Result<(), String>> {
            Poll::Ready(Ok(()))
        }
    }

    fn settling(refusals: &[Option<&'static str>]) -> SettlingConsumer<ScriptedConsumer> {
        SettlingConsumer::new(
            ScriptedConsumer {
                refusals: refusals.iter().copied().collect(),
                sending: None,
                posted: Vec::new(),
            },
            Arc::new(Drain::default()),
        )
    }

    #[tokio::test]
    async fn a_result_refused_for_its_nonce_is_posted_again_and_others_are_not() {
        use futures::SinkExt;
        let nonce = "Transaction error: Failed to submit result: server returned an error response: error code -32003: nonce too low";
        // Refused twice for its nonce, then posted; the next result goes through at once.
        let mut consumer = settling(&[Some(nonce), Some(nonce), None, None]);
        let results = ["first", "second"].map(|body| Ok(JobResult::new(bytes::Bytes::from(body))));
        consumer
            .send_all(&mut futures::stream::iter(results))
            .await
            .unwrap();
        assert_eq!(consumer.inner.posted, ["first", "second"]);
        assert_eq!(consumer.drain.settled.load(Ordering::SeqCst), 2);

        // A refusal that sending again cannot cure stops, naming it, and is not retried.
        let reverted = "Transaction error: Transaction reverted for service 1 call 2";
        let mut consumer = settling(&[Some(reverted), None]);
        let error = consumer
            .send(JobResult::new(bytes::Bytes::from("third")))
            .await
            .unwrap_err();
        assert_eq!(error, reverted);
        assert!(consumer.inner.posted.is_empty());
        assert_eq!(consumer.inner.refusals.len(), 1, "sent once");
        assert_eq!(consumer.drain.settled.load(Ordering::SeqCst), 0);

        // Nonce refusals past the attempts allowed stop too.
        let mut consumer = settling(&[Some(nonce); POST_ATTEMPTS as usize]);
        let error = consumer
            .send(JobResult::new(bytes::Bytes::from("fourth")))
            .await
            .unwrap_err();
        assert!(error.contains("nonce too low"), "{error}");
        assert!(
            consumer.inner.refusals.is_empty(),
            "sent {POST_ATTEMPTS} times"
        );
    }

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: TangleCommand,
    }

    #[test]
    fn blueprint_manager_arguments_parse() {
        let cli = Cli::try_parse_from([
            "rba-tangle",
            "run",
            "--test-mode",
            "--pretty",
            "-vvv",
            "--dry-run",
        ])
        .unwrap();
        let TangleCommand::Run(args) = cli.command;
        assert!(args.test_mode && args.pretty && args.dry_run);
        assert_eq!(args.verbose, 3);
        let argv = blueprint_argv(&args, Path::new("/data"), "/keys");
        let parsed = ContextConfig::try_parse_from(&argv).unwrap();
        let blueprint_sdk::runner::config::BlueprintCliCoreSettings::Run(settings) =
            parsed.blueprint_core_settings;
        assert_eq!(settings.data_dir, Path::new("/data"));
        assert_eq!(settings.keystore_uri, "/keys");
        assert!(settings.test_mode && settings.dry_run);
    }
}
