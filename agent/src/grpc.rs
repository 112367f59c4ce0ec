//! The REAPI gRPC face of `rba serve`: `rba-cache-server`'s services over the node's own store
//! and executor.
//!
//! Why a module: the node owns one store (one embedded database per directory, locked by its
//! process) and one executor; the REAPI server must serve exactly those, not open a second
//! store or start a second executor. So when gRPC is enabled the store is opened *by* the
//! cache server ([`open`]), the node takes its `Cas` from it, and the node's executor is handed
//! back ([`spawn`]) — Bazel actions, libp2p submissions and `rba` jobs then share the CAS, the
//! action cache and the job queue.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use rba_cache_server::config::{AuthConfig, TlsConfig};
use rba_cache_server::{Config, Server};
use rba_cas::{Cas, StoreConfig, Stores};
use rba_executor::runner::Executor;
use tokio::sync::watch;

/// Opens the store under `cas_dir` through the REAPI server (execution is attached later),
/// with the node's tokens (the bind rule is checked by `NodeConfig::validate`) and TLS.
pub fn open(
    cas_dir: &Path,
    store: StoreConfig,
    addr: SocketAddr,
    auth: AuthConfig,
    tls: Option<TlsConfig>,
) -> anyhow::Result<(Server, Cas)> {
    let mut config = Config {
        listen: addr,
        data_dir: cas_dir.to_path_buf(),
        metrics_listen: None,
        store,
        auth,
        tls,
        ..Config::default()
    };
    config.execution.enabled = false;
    let server = Server::new(config).context("setting up the REAPI server")?;
    let cas = server
        .embedded()
        .expect("Server::new opens an embedded store")
        .clone();
    Ok((server, cas))
}

/// The REAPI server of a scale-out front end: it serves `stores` (the shared bucket and
/// database, with the node's `Cas` under `cas_dir` as their local tier), execution attached
/// later by [`spawn`] with the node's executor over the very same stores.
pub fn over_stores(
    cas_dir: &Path,
    stores: Stores,
    addr: SocketAddr,
    auth: AuthConfig,
    tls: Option<TlsConfig>,
) -> anyhow::Result<Server> {
    let mut config = Config {
        listen: addr,
        data_dir: cas_dir.to_path_buf(),
        metrics_listen: None,
        auth,
        tls,
        ..Config::default()
    };
    config.execution.enabled = false;
    Server::with_stores(config, stores, None).context("setting up the REAPI server")
}

/// Serves `server` with the node's `executor` on `addr` until `stop`; returns the bound
/// address and the task.
pub async fn spawn(
    server: Server,
    executor: Executor,
    addr: SocketAddr,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding REAPI gRPC on {addr}"))?;
    let bound = listener.local_addr()?;
    let server = server.with_executor(executor)?;
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = server.serve(listener, None, shutdown).await {
            tracing::error!(error = %format!("{e:#}"), "REAPI server");
        }
    });
    Ok((bound, task))
}
