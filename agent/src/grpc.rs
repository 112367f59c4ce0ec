//! The REAPI gRPC face of `rba serve`.
//!
//! Why a module: the node owns the store (one sled database per directory, locked by its
//! process), so the REAPI server must be built on the node's own `Cas` and `Executor` rather
//! than open a second store; this is the one place that will know how.
//!
//! Not wired yet: `rba_cache_server::Server` can only be built by opening its own store
//! (`Server::new(config)`), which would fight the node for the sled lock and split the cache.
//! Once it can be built on an existing `Cas` (e.g. `Server::with_cas(cas, config)` +
//! `with_executor`), [`spawn`] binds `addr` and serves it until the node stops. Until then a
//! configured `grpc_listen` is reported and skipped; run the `cache-server` binary on its own
//! data directory for REAPI clients.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;

use crate::node::NodeShared;

/// Starts the REAPI server on `addr`; returns the bound address and its task.
pub async fn spawn(
    _node: Arc<NodeShared>,
    addr: SocketAddr,
    _stop: watch::Receiver<bool>,
) -> anyhow::Result<(Option<SocketAddr>, Option<tokio::task::JoinHandle<()>>)> {
    tracing::warn!(
        %addr,
        "REAPI gRPC inside rba serve needs rba-cache-server to serve an existing Cas; not listening"
    );
    eprintln!(
        "rba: REAPI gRPC on {addr} is not available inside rba serve yet (use the cache-server binary)"
    );
    Ok((None, None))
}
