//! Completeness for the action cache: a stored result is a hit only while every blob it names
//! is present, and serving it marks those blobs as just used.
//!
//! Why: REAPI promises a client told "hit" that it can fetch every output of the result
//! without asking again. An entry outlives its blobs (eviction, a disk cleaned behind the
//! store's back, a slow tier that lost an object), so the entry alone proves nothing. The rule,
//! in one place for every backend and every caller:
//!
//! - the blobs a result depends on are its output files, each output directory's `Tree` blob
//!   and every file inside that tree, and its stdout and stderr
//!   ([`CompleteActionCache::referenced_blobs`]); a tree blob that is missing, or larger than
//!   [`MAX_TREE_BYTES`], makes the result incomplete (missing) or unusable (refused);
//! - presence is asked of the store, and where the store has a local filesystem tier of the
//!   local files themselves (an index entry whose file vanished is dropped and counts as
//!   missing, a file whose index entry a crash lost is adopted): a hit is a promise the client
//!   acts on, so it is checked harder than FindMissingBlobs;
//! - a complete result's blobs are touched before it is returned, so eviction cannot break the
//!   hit just served.
//!
//! [`CompleteActionCache`] applies the rule over the async seams ([`ActionCache`], [`Store`]);
//! the synchronous [`crate::EmbeddedActionCache::get`] (the executor's path) runs the very same
//! code over its own blob store: the rule is written once, as an async function over
//! `BlobSource`, and the synchronous source never suspends, so it is driven to completion
//! inline without any runtime.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use rba_proto::Message;
use rba_proto::reapi::{ActionResult, Tree};

use crate::digest::{Digest, DigestFunction};
use crate::error::{CasError, Result};
use crate::seams::{ActionCache, Store};
use crate::store::BlobStore;

/// Trees larger than this are not decoded for the completeness check (the result is refused).
pub const MAX_TREE_BYTES: u64 = 64 << 20;

/// What the completeness rule asks of a store. Implemented over any [`Store`] and, without
/// suspending, over the embedded [`BlobStore`] for synchronous callers.
#[async_trait]
pub(crate) trait BlobSource: Send + Sync {
    /// A whole blob, refused past `max_size`; [`CasError::NotFound`] when absent.
    async fn read_whole(&self, digest: &Digest, max_size: u64) -> Result<Vec<u8>>;
    /// Of `digests`, those not present, checked against the local files where there are some.
    async fn missing(&self, digests: &[Digest]) -> Result<Vec<Digest>>;
    /// Marks present blobs as just used.
    async fn touch(&self, digests: &[Digest]) -> Result<()>;
}

/// The embedded store, answered synchronously (its futures are always ready).
pub(crate) struct Inline<'a>(pub(crate) &'a BlobStore);

#[async_trait]
impl BlobSource for Inline<'_> {
    async fn read_whole(&self, digest: &Digest, max_size: u64) -> Result<Vec<u8>> {
        self.0.read_to_vec(digest, max_size)
    }

    async fn missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.0.find_missing_on_disk(digests)
    }

    async fn touch(&self, digests: &[Digest]) -> Result<()> {
        self.0.touch(digests)
    }
}

/// Any store through its seam.
pub(crate) struct Seam<'a>(pub(crate) &'a dyn Store);

#[async_trait]
impl BlobSource for Seam<'_> {
    async fn read_whole(&self, digest: &Digest, max_size: u64) -> Result<Vec<u8>> {
        self.0.read_to_vec(digest, max_size).await
    }

    async fn missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let Some(local) = self.0.local() else {
            return self.0.find_missing(digests).await;
        };
        // The local files first (they are what a hit hands out when the store has them);
        // what they lack may still be in a slower tier.
        let (local, asked) = (local.clone(), digests.to_vec());
        let missing_locally =
            tokio::task::spawn_blocking(move || local.find_missing_on_disk(&asked))
                .await
                .map_err(|e| CasError::Unavailable(format!("store task failed: {e}")))??;
        if missing_locally.is_empty() {
            return Ok(missing_locally);
        }
        self.0.find_missing(&missing_locally).await
    }

    async fn touch(&self, digests: &[Digest]) -> Result<()> {
        self.0.touch(digests).await
    }
}

/// Drives a future whose every await is already ready (those of [`Inline`]) on this thread.
pub(crate) fn run_inline<T>(future: impl std::future::Future<Output = T>) -> T {
    futures::executor::block_on(future)
}

/// The digests a result names directly (not those inside its trees). Fails when one is
/// malformed for `function`: such a result is never stored.
pub(crate) fn direct_references(
    function: DigestFunction,
    result: &ActionResult,
) -> Result<Vec<Digest>> {
    let mut digests = Vec::new();
    for file in &result.output_files {
        digests.push(Digest::from_reapi_field(
            function,
            file.digest.as_ref(),
            "OutputFile.digest",
        )?);
    }
    for directory in &result.output_directories {
        digests.push(tree_digest(function, directory)?);
    }
    for digest in [&result.stdout_digest, &result.stderr_digest]
        .into_iter()
        .flatten()
    {
        digests.push(Digest::from_reapi(function, digest)?);
    }
    Ok(digests)
}

fn tree_digest(
    function: DigestFunction,
    directory: &rba_proto::reapi::OutputDirectory,
) -> Result<Digest> {
    Ok(Digest::from_reapi_field(
        function,
        directory.tree_digest.as_ref(),
        "OutputDirectory.tree_digest",
    )?)
}

/// Every blob a result depends on: what it names directly and every file inside its output
/// trees. Fails with [`CasError::NotFound`] naming a tree blob that is missing, and with
/// [`CasError::Invalid`] / [`CasError::QuotaExceeded`] for a tree that cannot be used.
pub(crate) async fn referenced_blobs(
    source: &dyn BlobSource,
    function: DigestFunction,
    result: &ActionResult,
) -> Result<Vec<Digest>> {
    let mut digests = direct_references(function, result)?;
    // Each distinct tree read once (several output directories may share one).
    let mut trees: HashMap<Digest, Tree> = HashMap::new();
    for directory in &result.output_directories {
        let digest = tree_digest(function, directory)?;
        let tree = match trees.entry(digest) {
            std::collections::hash_map::Entry::Occupied(tree) => tree.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                let bytes = source.read_whole(&digest, MAX_TREE_BYTES).await?;
                let tree = Tree::decode(bytes.as_slice())
                    .map_err(|e| CasError::invalid(format!("Tree {digest:?}"), e.to_string()))?;
                slot.insert(tree)
            }
        };
        for dir in tree.root.iter().chain(tree.children.iter()) {
            for file in &dir.files {
                digests.push(Digest::from_reapi_field(
                    function,
                    file.digest.as_ref(),
                    "FileNode.digest",
                )?);
            }
        }
    }
    Ok(digests)
}

/// The rule: `result` (stored for `action`) is served only when every blob it depends on is
/// present, and then those blobs are touched. `None`: incomplete (a miss).
pub(crate) async fn complete(
    source: &dyn BlobSource,
    action: &Digest,
    result: ActionResult,
) -> Result<Option<ActionResult>> {
    let referenced = match referenced_blobs(source, action.function, &result).await {
        Ok(referenced) => referenced,
        Err(CasError::NotFound(missing)) => {
            tracing::debug!(?action, ?missing, "action result incomplete: tree missing");
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let missing = source.missing(&referenced).await?;
    if !missing.is_empty() {
        tracing::debug!(?action, missing = missing.len(), "action result incomplete");
        return Ok(None);
    }
    source.touch(&referenced).await?;
    Ok(Some(result))
}

/// An action cache whose hits are complete over a store: the completeness layer.
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct CompleteActionCache {
    cache: Arc<dyn ActionCache>,
    store: Arc<dyn Store>,
}

impl CompleteActionCache {
    /// `cache`'s entries, served only while their blobs are in `store`.
    pub fn new(cache: Arc<dyn ActionCache>, store: Arc<dyn Store>) -> Self {
        CompleteActionCache { cache, store }
    }

    /// The action cache underneath (entries as stored, unchecked).
    pub fn inner(&self) -> &Arc<dyn ActionCache> {
        &self.cache
    }

    /// The store whose blobs decide completeness.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The stored result, only if every blob it depends on is present (then touched).
    pub async fn get(&self, instance: &str, action: &Digest) -> Result<Option<ActionResult>> {
        let Some(result) = self.cache.get_unchecked(instance, action).await? else {
            return Ok(None);
        };
        complete(&Seam(self.store.as_ref()), action, result).await
    }

    /// Every blob `result` depends on, including the files inside its output trees
    /// ([`CasError::NotFound`] when a tree blob itself is missing).
    pub async fn referenced_blobs(
        &self,
        function: DigestFunction,
        result: &ActionResult,
    ) -> Result<Vec<Digest>> {
        referenced_blobs(&Seam(self.store.as_ref()), function, result).await
    }
}

/// The layer is itself an action cache: writes and listings pass through unchanged.
#[async_trait]
impl ActionCache for CompleteActionCache {
    fn backend(&self) -> &'static str {
        self.cache.backend()
    }

    async fn get_unchecked(&self, instance: &str, action: &Digest) -> Result<Option<ActionResult>> {
        self.cache.get_unchecked(instance, action).await
    }

    async fn put(&self, instance: &str, action: &Digest, result: &ActionResult) -> Result<()> {
        self.cache.put(instance, action, result).await
    }

    async fn remove(&self, instance: &str, action: &Digest) -> Result<bool> {
        self.cache.remove(instance, action).await
    }

    async fn results_in(&self, instance: &str) -> Result<Vec<ActionResult>> {
        self.cache.results_in(instance).await
    }

    fn len(&self) -> u64 {
        self.cache.len()
    }
}

#[cfg(test)]
mod tests {
    use rba_proto::reapi::{Directory, FileNode, OutputDirectory, OutputFile};

    use super::*;
    use crate::Cas;

    fn tree_with(file: &Digest) -> Tree {
        Tree {
            root: Some(Directory {
                files: vec![FileNode {
                    name: "x".into(),
                    digest: Some(file.to_reapi()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            children: vec![],
        }
    }

    /// The layer over the seams and the embedded synchronous path answer alike, step by step.
    #[tokio::test]
    async fn the_layer_and_the_embedded_get_share_one_rule() {
        let (_dir, cas) = Cas::scratch().unwrap();
        let f = DigestFunction::Blake3;
        let layer =
            CompleteActionCache::new(Arc::new(cas.actions.clone()), Arc::new(cas.blobs.clone()));
        let out = cas.blobs.put_bytes(f, b"binary").unwrap();
        let inner = f.digest_of(b"inside a tree");
        let tree_bytes = tree_with(&inner).encode_to_vec();
        let tree = f.digest_of(&tree_bytes);
        let action = f.digest_of(b"action");
        let result = ActionResult {
            output_files: vec![OutputFile {
                path: "out".into(),
                digest: Some(out.to_reapi()),
                ..Default::default()
            }],
            output_directories: vec![
                OutputDirectory {
                    path: "a".into(),
                    tree_digest: Some(tree.to_reapi()),
                    ..Default::default()
                },
                OutputDirectory {
                    path: "b".into(),
                    tree_digest: Some(tree.to_reapi()),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        layer.put("i", &action, &result).await.unwrap();
        let both = |cas: Cas, layer: CompleteActionCache| async move {
            let synchronous =
                tokio::task::spawn_blocking(move || cas.actions.get("i", &action).unwrap())
                    .await
                    .unwrap();
            let layered = layer.get("i", &action).await.unwrap();
            assert_eq!(synchronous, layered);
            layered
        };
        assert_eq!(both(cas.clone(), layer.clone()).await, None, "tree missing");
        cas.blobs.put_bytes(f, &tree_bytes).unwrap();
        assert_eq!(
            both(cas.clone(), layer.clone()).await,
            None,
            "file in tree missing"
        );
        cas.blobs.put_bytes(f, b"inside a tree").unwrap();
        assert_eq!(both(cas.clone(), layer.clone()).await, Some(result.clone()));
        assert_eq!(
            layer.referenced_blobs(f, &result).await.unwrap(),
            vec![out, tree, tree, inner, inner]
        );
        // A file removed behind the store's back: a miss, although the index still lists it.
        std::fs::remove_file(cas.blobs.blob_path(&out)).unwrap();
        assert_eq!(
            both(cas.clone(), layer.clone()).await,
            None,
            "output vanished"
        );
        assert!(layer.get_unchecked("i", &action).await.unwrap().is_some());
    }
}
