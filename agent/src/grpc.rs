//! The REAPI gRPC face of `rba serve`: `rba-cache-server`'s services over the node's own store
//! and executor.
//!
//! Why a module: the node owns one store (one embedded database per directory, locked by its
//! process) and one executor; the REAPI server must serve exactly those, not open a second
//! store or start a second executor. The composition root (`compose`) opens them; [`server`]
//! serves them with the face's settings from the one schema ([`face_config`]) — Bazel
//! actions, libp2p submissions and `rba` jobs then share the CAS, the action cache and the job
//! queue. `cache-server` is this face alone, composed the same way
//! (`compose::reapi_server`).

use std::net::SocketAddr;

use anyhow::Context;
use rba_cache_server::{Config, Server};
use rba_cas::Stores;
use rba_executor::runner::Executor;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::NodeConfig;

/// The REAPI face's settings from the one schema: `[servers] reapi` and `tls`, `[reapi]`,
/// `[auth]`, `[store]`'s capacity, `[workers]`' slots and grace. `rba serve` and
/// `cache-server` both serve with these.
pub fn face_config(config: &NodeConfig) -> Config {
    let defaults = Config::default();
    Config {
        listen: config.servers.reapi.unwrap_or(defaults.listen),
        data_dir: crate::workspace::cas_dir(&config.data_dir),
        metrics_listen: config.reapi.metrics,
        max_message_bytes: config.reapi.max_message_bytes,
        upload_idle_timeout_secs: config.reapi.upload_idle_timeout_secs,
        zstd_level: config.reapi.zstd_level,
        store: config.store.local(),
        auth: config.auth.clone(),
        execution: rba_cache_server::config::ExecutionConfig {
            enabled: config.reapi.execution,
            workers: Some(config.workers.slots),
            shutdown_grace_secs: config.workers.shutdown_grace_secs,
        },
        tls: config.servers.tls.clone(),
    }
}

/// The REAPI server over `stores` (the node's embedded store, or a front end's shared ones),
/// with `executor` when `[reapi] execution` is on: it opens nothing (see `compose`).
pub fn server(
    config: &NodeConfig,
    stores: Stores,
    executor: Option<Executor>,
) -> anyhow::Result<Server> {
    let executor = executor.filter(|_| config.reapi.execution);
    Server::with_stores(face_config(config), stores, executor)
        .context("setting up the REAPI server")
}

/// Binds `server`'s listeners: gRPC on `addr`, and its `[reapi] metrics` endpoint if any.
pub async fn listeners(
    server: &Server,
    addr: SocketAddr,
) -> anyhow::Result<(TcpListener, Option<TcpListener>)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding REAPI gRPC on {addr}"))?;
    let metrics = match server.state().config.metrics_listen {
        Some(addr) => {
            let metrics = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the REAPI metrics on {addr}"))?;
            let bound = metrics.local_addr()?;
            tracing::info!(addr = %bound, "metrics on http://{bound}/metrics");
            Some(metrics)
        }
        None => None,
    };
    Ok((listener, metrics))
}

/// Serves `server` on [`listeners`] until `stop`; returns the bound address and the task.
pub async fn spawn(
    server: Server,
    addr: SocketAddr,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let (listener, metrics) = listeners(&server, addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = server.serve(listener, metrics, shutdown).await {
            tracing::error!(error = %format!("{e:#}"), "REAPI server");
        }
    });
    Ok((bound, task))
}
