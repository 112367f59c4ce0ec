//! The tonic router with every service, the listeners, and clean shutdown.
//!
//! Composition: [`Server::with_stores`] takes everything it serves (the [`Stores`]: a blob
//! store, the complete action cache over it and the read grants; and optionally an
//! [`Executor`]) and opens nothing, so the same services run over the embedded store or over
//! a front end's shared backends: the `cache-server` binary and `rba serve` get theirs from the
//! one composition root (the agent's `compose`). [`Server::new`] is a self-contained embedded
//! composition for tests and embedders: it opens the `Cas` under `data_dir`, starts the
//! executor on it and calls `with_stores`. [`Server::serve`] runs the gRPC and metrics listeners until a
//! shutdown future resolves, then drains in-flight requests and flushes the store.
//! [`Server::spawn`] does all that on ephemeral tasks and hands back a [`RunningServer`] (used
//! by tests, the bench and embedders). Every service sits behind the token
//! [`Authenticator`]. With `tls` configured gRPC is served over TLS (rustls, ring); bearer
//! tokens off loopback belong inside it.
//!
//! The standard gRPC health service (`grpc.health.v1.Health`) answers without a token (it
//! says only whether the server serves): `""` and each REAPI service are `SERVING` while the
//! server runs and `NOT_SERVING` from the moment shutdown starts, so a load balancer stops
//! sending work before the listener closes.
//!
//! The Execution service stores results in the executor's action cache
//! ([`Executor::stores`]: its embedded `Cas`'s, or a front end's shared one), so it is served
//! only over exactly those stores:
//! [`Server::with_stores`] and [`Server::with_executor`] refuse, with an error saying so, an
//! executor whose `Cas` is not the given stores (a front end over a shared store would
//! otherwise answer Execute from one action cache and GetActionResult from another).
//!
//! With `execution.enabled` (the default) [`Server::new`] starts an [`Executor`] on the same
//! store (one `Cas`, opened once), its data under `{data_dir}/executor`, and serves Execution,
//! Operations and live action output through ByteStream. If the executor cannot start (the
//! sandbox's prerequisites are missing) it logs why and serves cache-only; then, as with
//! `--no-execution`, Execution and Operations answer `UNIMPLEMENTED` and Capabilities says
//! `exec_enabled: false`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rba_cas::{Cas, Stores};
use rba_executor::runner::{Executor, ExecutorConfig};
use rba_proto::bytestream::byte_stream_server::ByteStreamServer;
use rba_proto::longrunning::operations_server::OperationsServer;
use rba_proto::reapi::action_cache_server::ActionCacheServer;
use rba_proto::reapi::capabilities_server::CapabilitiesServer;
use rba_proto::reapi::content_addressable_storage_server::ContentAddressableStorageServer;
use rba_proto::reapi::execution_server::ExecutionServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;

use crate::action_cache::ActionCacheService;
use crate::auth::Authenticator;
use crate::bytestream::{ByteStreamService, Uploads};
use crate::bytestream_route::ByteStreamCalls;
use crate::capabilities::CapabilitiesService;
use crate::cas::CasService;
use crate::cas_route::CasCalls;
use crate::config::Config;
use crate::hand_route::HandRoute;
use crate::metrics::Metrics;

/// What every service shares. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ServerState {
    /// The blob store, the complete action cache and the read grants served.
    pub stores: Stores,
    /// The configuration the server runs with.
    pub config: Arc<Config>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Token checks.
    pub auth: Authenticator,
    /// Resumable ByteStream uploads.
    pub uploads: Arc<Uploads>,
    /// Runs actions for the Execution service; `None` when serving cache-only.
    pub executor: Option<Executor>,
    /// The TLS identity gRPC is served with; `None`: plaintext.
    pub tls: Option<tonic::transport::Identity>,
    /// What the gRPC health service answers.
    pub health: tonic_health::server::HealthReporter,
}

impl ServerState {
    /// The batch limit advertised and enforced.
    pub fn max_batch_total_size_bytes(&self) -> usize {
        self.config.max_batch_total_size_bytes()
    }

    /// Whether the Execution service is served.
    pub fn execution_enabled(&self) -> bool {
        self.executor.is_some()
    }
}

/// The REAPI server: services built over their stores, not yet listening.
#[derive(Debug)]
pub struct Server {
    state: ServerState,
    /// The embedded `Cas` [`Server::new`] opened (`None` when given its stores), handed to
    /// [`RunningServer`] for the tests that look inside it; the services never use it.
    embedded: Option<Cas>,
}

/// A server running on background tasks.
#[derive(Debug)]
pub struct RunningServer {
    /// The gRPC address actually bound.
    pub addr: SocketAddr,
    /// The metrics address actually bound, if enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// The shared state (store, metrics) of the running server.
    pub state: ServerState,
    /// The embedded `Cas` [`Server::new`] opened, if it did (tests read its action cache).
    pub embedded: Option<Cas>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningServer {
    /// The `grpc://` URL of the server.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops listening, drains requests, flushes the store and waits for all of it.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        self.task.await.context("server task panicked")?
    }
}

impl Server {
    /// A self-contained embedded composition (tests, embedders; the binaries compose through
    /// the agent's `compose`): opens (creating) the data directory and its `Cas`, starts the
    /// executor on it when execution is enabled, and serves both through
    /// [`Server::with_stores`].
    pub fn new(config: Config) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
        let cas = Cas::open(&config.data_dir, config.store.clone())
            .with_context(|| format!("opening the store under {}", config.data_dir.display()))?;
        let executor = if config.execution.enabled {
            start_executor(&cas, &config)
        } else {
            tracing::info!("execution disabled by configuration: serving cache-only");
            None
        };
        let mut server = Server::with_stores(config, Stores::embedded(&cas), executor)?;
        server.embedded = Some(cas);
        Ok(server)
    }

    /// Serves `stores` (and Execution with `executor`, if given), opening nothing: the
    /// composition root chose the backends. `config` supplies the listeners, limits, tokens
    /// and TLS; its `data_dir` and `store` sections describe the store only as far as the
    /// advertised capacity goes.
    ///
    /// Fails when `executor` does not run on exactly these stores (see the module docs): the
    /// executor's results land in its own `Cas`, so serving Execution beside other stores
    /// would answer from two action caches.
    pub fn with_stores(
        config: Config,
        stores: Stores,
        executor: Option<Executor>,
    ) -> anyhow::Result<Self> {
        if let Some(executor) = &executor {
            check_executor(&stores, executor)?;
        }
        let uploads = Arc::new(Uploads::new(Duration::from_secs(
            config.upload_idle_timeout_secs,
        )));
        let metrics = Arc::new(Metrics::new(
            stores.clone(),
            config.store.max_bytes,
            uploads.session_counter(),
        ));
        let auth = Authenticator::new(&config);
        let tls = match &config.tls {
            Some(tls) => {
                let identity = tls.identity()?;
                install_crypto_provider();
                // Parse now, so a bad certificate or key fails the start, not the first client.
                tonic::transport::Server::builder()
                    .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity.clone()))
                    .with_context(|| {
                        format!(
                            "TLS certificate {} / key {}",
                            tls.cert.display(),
                            tls.key.display()
                        )
                    })?;
                Some(identity)
            }
            None => None,
        };
        Ok(Server {
            state: ServerState {
                stores,
                config: Arc::new(config),
                metrics,
                auth,
                uploads,
                executor,
                tls,
                health: tonic_health::server::HealthReporter::new(),
            },
            embedded: None,
        })
    }

    /// Serves Execution with this executor (e.g. the node's, shared with its other faces)
    /// instead of the one `new` started. It must run on this server's stores (refused
    /// otherwise, as in [`Server::with_stores`]).
    pub fn with_executor(mut self, executor: Executor) -> anyhow::Result<Self> {
        check_executor(&self.state.stores, &executor)?;
        self.state.executor = Some(executor);
        Ok(self)
    }

    /// Serves cache-only, stopping nothing (jobs already submitted finish).
    pub fn without_executor(mut self) -> Self {
        self.state.executor = None;
        self
    }

    /// The shared state.
    pub fn state(&self) -> &ServerState {
        &self.state
    }

    /// The gRPC router with every service, each behind the token interceptor (over TLS when
    /// configured).
    pub fn router(&self) -> anyhow::Result<tonic::transport::server::Router> {
        let state = &self.state;
        let auth = state.auth.clone();
        let decode = state.config.max_decoding_message_bytes();
        let encode = state.config.max_message_bytes;
        let capabilities = CapabilitiesServer::new(CapabilitiesService::new(state.clone()))
            .max_decoding_message_size(decode)
            .max_encoding_message_size(encode);
        let cas_service = CasService::new(state.clone());
        let cas = HandRoute::new(
            CasCalls::new(cas_service.clone(), auth.clone(), decode, encode),
            InterceptedService::new(
                ContentAddressableStorageServer::new(cas_service)
                    .max_decoding_message_size(decode)
                    .max_encoding_message_size(encode),
                auth.clone(),
            ),
        );
        let action_cache = ActionCacheServer::new(ActionCacheService::new(state.clone()))
            .max_decoding_message_size(decode)
            .max_encoding_message_size(encode);
        let executing = state
            .executor
            .as_ref()
            .map(|executor| crate::execution::services(state.clone(), executor.clone()));
        let mut bytestream_service = ByteStreamService::new(state.clone());
        if let Some(services) = &executing {
            bytestream_service =
                bytestream_service.with_read_source(Arc::new(services.live_output.clone()));
        }
        let bytestream = HandRoute::new(
            ByteStreamCalls::new(bytestream_service.clone(), auth.clone(), decode, encode),
            InterceptedService::new(
                ByteStreamServer::new(bytestream_service)
                    .max_decoding_message_size(decode)
                    .max_encoding_message_size(encode),
                auth.clone(),
            ),
        );
        let (execution, operations) = match executing {
            Some(services) => (
                Some(InterceptedService::new(
                    ExecutionServer::new(services.execution)
                        .max_decoding_message_size(decode)
                        .max_encoding_message_size(encode),
                    auth.clone(),
                )),
                Some(InterceptedService::new(
                    OperationsServer::new(services.operations)
                        .max_decoding_message_size(decode)
                        .max_encoding_message_size(encode),
                    auth.clone(),
                )),
            ),
            None => (None, None),
        };
        let mut builder = tonic::transport::Server::builder();
        if let Some(identity) = &state.tls {
            builder = builder
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity.clone()))
                .context("TLS configuration")?;
        }
        let health = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(state.health.clone()),
        );
        Ok(builder
            // Loopback streaming of multi-GiB blobs needs windows larger than HTTP/2's 64 KiB.
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .max_frame_size(Some((1 << 20) - 1))
            .tcp_nodelay(true)
            .add_service(InterceptedService::new(capabilities, auth.clone()))
            .add_service(cas)
            .add_service(InterceptedService::new(action_cache, auth.clone()))
            .add_service(bytestream)
            .add_optional_service(execution)
            .add_optional_service(operations)
            .add_service(health))
    }

    /// The names the health service reports, with the overall `""`.
    fn health_names(&self) -> Vec<&'static str> {
        use tonic::server::NamedService;
        let mut names = vec![
            "",
            <CapabilitiesServer<CapabilitiesService> as NamedService>::NAME,
            <ContentAddressableStorageServer<CasService> as NamedService>::NAME,
            <ActionCacheServer<ActionCacheService> as NamedService>::NAME,
            <ByteStreamServer<ByteStreamService> as NamedService>::NAME,
        ];
        if self.state.execution_enabled() {
            names.push(<ExecutionServer<crate::execution::ExecutionService> as NamedService>::NAME);
        }
        names
    }

    /// Serves on the given listeners until `shutdown` resolves, then drains and flushes.
    pub async fn serve(
        self,
        listener: TcpListener,
        metrics_listener: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (health, names) = (self.state.health.clone(), self.health_names());
        for name in &names {
            health
                .set_service_status(name, tonic_health::ServingStatus::Serving)
                .await;
        }
        tokio::spawn(async move {
            shutdown.await;
            // Probes see the drain before the listener closes.
            for name in &names {
                health
                    .set_service_status(name, tonic_health::ServingStatus::NotServing)
                    .await;
            }
            let _ = stop_tx.send(true);
        });
        let wait = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };

        let reaper = tokio::spawn(self.state.uploads.clone().reap_forever());
        // On shutdown the executor drains first: no new action, those taken get the grace
        // period to finish, then are cancelled (their sandboxes killed), so their Execute
        // streams end before the gRPC drain below gives up on them.
        let grace = Duration::from_secs(self.state.config.execution.shutdown_grace_secs);
        let cancel_task = self.state.executor.clone().map(|executor| {
            let signal = wait(stop_rx.clone());
            tokio::spawn(async move {
                signal.await;
                executor.drain(grace).await;
            })
        });
        let metrics_task = metrics_listener.map(|listener| {
            let app = crate::metrics::router(self.state.metrics.clone());
            let signal = wait(stop_rx.clone());
            tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(signal)
                    .await
            })
        });

        tracing::info!(
            addr = %listener.local_addr()?,
            data_dir = %self.state.config.data_dir.display(),
            max_batch_total_size_bytes = self.state.max_batch_total_size_bytes(),
            execution = self.state.execution_enabled(),
            tls = self.state.tls.is_some(),
            "serving REAPI"
        );
        // The builder's `tcp_nodelay` applies only to listeners it binds itself: without
        // TCP_NODELAY on the accepted sockets, a request larger than one segment waits for a
        // delayed ACK (a fixed ~40 ms on every FindMissing of 1,000 digests).
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let grpc = self
            .router()?
            .serve_with_incoming_shutdown(incoming, wait(stop_rx.clone()));
        let mut drain_rx = stop_rx.clone();
        // Draining waits for in-flight requests (Execute streams end with their actions, see
        // above); a client that never finishes gets 10 s more.
        let result = tokio::select! {
            result = grpc => result.context("gRPC server"),
            _ = async {
                let _ = drain_rx.wait_for(|stop| *stop).await;
                tokio::time::sleep(grace + Duration::from_secs(10)).await;
            } => {
                tracing::warn!("requests still running after the shutdown grace; closing anyway");
                Ok(())
            }
        };
        reaper.abort();
        if let Some(task) = cancel_task {
            let _ = tokio::time::timeout(grace + Duration::from_secs(10), task).await;
        }
        if let Some(task) = metrics_task {
            match tokio::time::timeout(Duration::from_secs(5), task).await {
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "metrics server"),
                Ok(Err(e)) => tracing::warn!(error = %e, "metrics task"),
                _ => {}
            }
        }
        self.state
            .stores
            .flush()
            .await
            .context("flushing the store")?;
        tracing::info!("shut down cleanly");
        result
    }

    /// Binds the configured addresses and serves on a background task.
    pub async fn spawn(config: Config) -> anyhow::Result<RunningServer> {
        let server = Server::new(config)?;
        server.spawn_server().await
    }

    /// Binds this server's configured addresses and serves on a background task.
    pub async fn spawn_server(self) -> anyhow::Result<RunningServer> {
        let config = self.state.config.clone();
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding metrics {addr}"))?,
            ),
            None => None,
        };
        let addr = listener.local_addr()?;
        let metrics_addr = metrics_listener
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()?;
        let server = self;
        let state = server.state.clone();
        let embedded = server.embedded.clone();
        let (shutdown, mut rx) = watch::channel(false);
        let task = tokio::spawn(server.serve(listener, metrics_listener, async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }));
        Ok(RunningServer {
            addr,
            metrics_addr,
            state,
            embedded,
            shutdown,
            task,
        })
    }
}

/// Makes rustls's ring provider the process default (the TLS builders use the default, and a
/// process that links both ring and aws-lc-rs has none). Harmless when one is installed.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Refuses to serve Execution with an executor whose `Cas` is not `stores`.
fn check_executor(stores: &Stores, executor: &Executor) -> anyhow::Result<()> {
    if stores.is_embedded_in(executor.cas()) || stores.is_same_as(executor.stores()) {
        return Ok(());
    }
    anyhow::bail!(
        "the executor runs on the embedded store under {}, but the server was given other \
         stores ({} blobs, {} action cache): Execution would store results where \
         GetActionResult does not look. Serve these stores cache-only (no executor), or give \
         the executor's own stores (Executor::stores)",
        executor.cas().blobs.root().display(),
        stores.blobs().backend(),
        rba_cas::ActionCache::backend(stores.actions()),
    )
}

/// Starts the executor on the server's store, or explains why the server runs cache-only.
fn start_executor(cas: &Cas, config: &Config) -> Option<Executor> {
    let dir = config.data_dir.join("executor");
    let started = ExecutorConfig::new(&dir).and_then(|mut executor_config| {
        if let Some(workers) = config.execution.workers {
            executor_config.workers = workers;
        }
        let workers = executor_config.workers;
        Executor::new(cas.clone(), executor_config).map(|executor| (executor, workers))
    });
    match started {
        Ok((executor, workers)) => {
            tracing::info!(workers, dir = %dir.display(), "remote execution enabled");
            Some(executor)
        }
        Err(error) => {
            tracing::warn!(
                %error,
                "remote execution is DISABLED: the sandbox cannot be set up (run \
                 .ci/setup.d/sandbox.sh, or pass --no-execution to silence this); serving cache-only"
            );
            None
        }
    }
}
