//! The REAPI gRPC face of `rba serve`, served by `rba-cache-server` over the node's own CAS.
//!
//! Why a module: the node owns the store (one sled database per directory), so the REAPI
//! server must be built on the node's `Cas` rather than open its own; this is the one place
//! that knows how.

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
    tracing::warn!(%addr, "the REAPI gRPC server is not part of this build yet; not listening");
    Ok((None, None))
}
