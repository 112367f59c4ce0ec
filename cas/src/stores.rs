//! [`Stores`]: the store, the complete action cache and the grants a server is given, as one
//! cheap-to-clone value.
//!
//! Why: a service (the REAPI server, and later the other faces) serves whatever the
//! composition root chose (the embedded `Cas`, or a front end over a shared bucket and
//! database) and must not open or pick a backend itself. The bundle is that choice, made once:
//! the action cache always comes wrapped in the completeness layer over the same store, so no
//! caller can serve a hit whose outputs are gone.
//!
//! The bundle also remembers whether it *is* an embedded [`Cas`] (and which), so a caller
//! that also holds something bound to one `Cas` (the executor, whose results land in that
//! `Cas`'s action cache) can refuse to pair it with other stores instead of serving
//! silently diverging state ([`Stores::is_embedded_in`]).

use std::sync::Arc;

use crate::Cas;
use crate::error::{CasError, Result};
use crate::layers::complete::CompleteActionCache;
use crate::seams::{ActionCache, Grants, Store};

/// A store, its complete action cache and its read grants. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Stores {
    blobs: Arc<dyn Store>,
    actions: CompleteActionCache,
    grants: Arc<dyn Grants>,
    /// The blob store of the embedded `Cas` these are, if they are one: which `Cas` (its
    /// directory), and the one thing the seams do not cover, flushing its index at shutdown.
    embedded: Option<crate::BlobStore>,
}

impl Stores {
    /// Any backends: `actions` is served through the completeness layer over `blobs`.
    pub fn new(
        blobs: Arc<dyn Store>,
        actions: Arc<dyn ActionCache>,
        grants: Arc<dyn Grants>,
    ) -> Self {
        Stores {
            actions: CompleteActionCache::new(actions, blobs.clone()),
            blobs,
            grants,
            embedded: None,
        }
    }

    /// The embedded store, action cache and grants of `cas` (one sled database).
    pub fn embedded(cas: &Cas) -> Self {
        Stores {
            embedded: Some(cas.blobs.clone()),
            ..Stores::new(
                Arc::new(cas.blobs.clone()),
                Arc::new(cas.actions.clone()),
                Arc::new(cas.reads.clone()),
            )
        }
    }

    /// The blob store.
    pub fn blobs(&self) -> &Arc<dyn Store> {
        &self.blobs
    }

    /// The action cache, whose `get` serves complete results only.
    pub fn actions(&self) -> &CompleteActionCache {
        &self.actions
    }

    /// Who may read which blob.
    pub fn grants(&self) -> &Arc<dyn Grants> {
        &self.grants
    }

    /// Whether these are exactly the embedded store, action cache and grants of `cas`
    /// (built by [`Stores::embedded`] from it, or from another handle on the same directory).
    pub fn is_embedded_in(&self, cas: &Cas) -> bool {
        self.embedded
            .as_ref()
            .is_some_and(|blobs| blobs.root() == cas.blobs.root())
    }

    /// Whether `other` is these very backends (clones of one bundle, or bundles built over the
    /// same backend handles): what a server checks before serving an executor's results.
    pub fn is_same_as(&self, other: &Stores) -> bool {
        fn same<T: ?Sized>(a: &Arc<T>, b: &Arc<T>) -> bool {
            std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
        }
        let embedded_alike = match (&self.embedded, &other.embedded) {
            (Some(a), Some(b)) => a.root() == b.root(),
            (None, None) => true,
            _ => false,
        };
        embedded_alike
            && same(&self.blobs, &other.blobs)
            && same(self.actions.inner(), other.actions.inner())
    }

    /// Makes what the embedded backends hold in memory durable (their index), before a clean
    /// exit. Backends that are network services persist as they go: nothing to do.
    pub async fn flush(&self) -> Result<()> {
        let Some(store) = self.embedded.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || store.flush())
            .await
            .map_err(|e| CasError::Unavailable(format!("store task failed: {e}")))?
    }
}
