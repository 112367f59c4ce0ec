//! The seams the rest of the code stands on: [`Store`] (blobs), [`ActionCache`] (results),
//! [`Grants`] (who may read which blob) and [`BlobIndex`] (presence, for stores whose bytes live
//! in a bucket), as async traits.
//!
//! Why: one machine is the default, but an operator who outgrows it runs the same code with
//! blobs in an S3-compatible bucket and the exact state (index, action cache, grants) in
//! PostgreSQL. Callers name these traits, never a backend, so a backend is chosen once, at the
//! composition root, and today's features (verification, completeness, the existence cache,
//! the fast/slow tiers, eviction) are layers that wrap an inner implementation.
//!
//! The traits are async because the scale-out backends are network services; the embedded
//! backends ([`BlobStore`], [`EmbeddedActionCache`], [`EmbeddedGrants`]) do their blocking work
//! on tokio's blocking pool behind them, so an async caller never blocks a runtime thread.
//!
//! Contracts every implementation keeps (the conformance tests in `cas/tests/seams.rs` run
//! against each backend):
//! - a blob becomes visible (to `find_missing` and `read`) only once its bytes are complete,
//!   verified against its digest and durable as the backend defines it;
//! - `find_missing` answers from an index, never one probe per digest of the slow tier;
//! - the empty blob is always present;
//! - errors name the digest, key or service that failed ([`CasError`]).

use std::fmt::Debug;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use rba_proto::reapi::ActionResult;

use crate::access::EmbeddedGrants;
use crate::action_cache::EmbeddedActionCache;
use crate::digest::Digest;
use crate::error::{CasError, Result};
use crate::store::{BlobStore, StoreStats};

/// A blob's bytes as they arrive: chunks in order, or the error that ended the read.
pub type ChunkStream = BoxStream<'static, Result<Bytes>>;

/// Size of the chunks the embedded store reads in (large: fewer wakeups, fewer messages).
pub const READ_CHUNK_BYTES: usize = 1 << 20;

/// Where blobs live. Cheap to share (`Arc<dyn Store>`).
#[async_trait]
pub trait Store: Send + Sync + Debug + 'static {
    /// A short name for errors, logs and metrics ("filesystem", "s3", "tiered", …).
    fn backend(&self) -> &'static str;

    /// The subset of `digests` that is absent, in the order given, without duplicates.
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>>;

    /// Marks present blobs as just used (eviction order); absent ones are ignored.
    async fn touch(&self, digests: &[Digest]) -> Result<()>;

    /// [`Store::find_missing`] that also marks the present blobs as just used (what a REAPI
    /// FindMissingBlobs does: a build is about to use them). A backend that can do both in one
    /// pass overrides it.
    async fn find_missing_and_touch(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let missing = self.find_missing(digests).await?;
        let absent: std::collections::HashSet<&Digest> = missing.iter().collect();
        let present: Vec<Digest> = digests
            .iter()
            .filter(|d| !absent.contains(d))
            .copied()
            .collect();
        if !present.is_empty() {
            self.touch(&present).await?;
        }
        Ok(missing)
    }

    /// `limit` bytes (0 = to the end) of a blob from `offset`. [`CasError::NotFound`] when
    /// absent, [`CasError::OffsetOutOfRange`] past its end.
    async fn read(&self, digest: &Digest, offset: u64, limit: u64) -> Result<ChunkStream>;

    /// Stores one blob from a stream of chunks; it becomes visible only once the bytes match
    /// `digest` (size and hash). A blob already present is not written again.
    async fn write(&self, digest: Digest, chunks: ChunkStream) -> Result<()>;

    /// Stores many small blobs as one durable batch (group commit); one result per blob, in
    /// order. Every blob's bytes are checked against its digest, a blob already present too: a
    /// success proves the caller sent the blob (what grants it the blob); a blob whose bytes
    /// do not match fails alone.
    async fn write_batch(&self, blobs: Vec<(Digest, Bytes)>) -> Vec<Result<()>>;

    /// Counters for metrics and `/cache/stats` (kept as they change: never a scan).
    fn stats(&self) -> StoreStats;

    /// The local filesystem tier, when this store has one: what hardlinks, seekable zips and
    /// the executor's materialisation need. Blobs must be made local first
    /// ([`Store::make_local`]).
    fn local(&self) -> Option<&BlobStore> {
        None
    }

    /// Makes `digests` readable from [`Store::local`] (a fast tier fetches them from the slow
    /// one). Fails with [`CasError::NotFound`] naming a blob present in no tier.
    async fn make_local(&self, digests: &[Digest]) -> Result<()> {
        match self.local() {
            Some(_) => match self.find_missing(digests).await?.first() {
                Some(missing) => Err(CasError::NotFound(*missing)),
                None => Ok(()),
            },
            None => Err(CasError::Unavailable(format!(
                "the {} store has no local tier",
                self.backend()
            ))),
        }
    }

    /// Makes blobs that were written straight into [`Store::local`] (a resumable upload, an
    /// action's outputs) stored in every tier, so other processes see them. A store whose
    /// local tier is the store itself has nothing to do.
    async fn publish_local(&self, digests: &[Digest]) -> Result<()> {
        let _ = digests;
        Ok(())
    }

    /// Whether one blob is present.
    async fn contains(&self, digest: &Digest) -> Result<bool> {
        Ok(self
            .find_missing(std::slice::from_ref(digest))
            .await?
            .is_empty())
    }

    /// A whole blob in memory, refusing blobs larger than `max_size` before reading them.
    async fn read_to_vec(&self, digest: &Digest, max_size: u64) -> Result<Vec<u8>> {
        if digest.size > max_size {
            return Err(CasError::QuotaExceeded(format!(
                "blob {digest:?} is larger than the {max_size} bytes allowed here"
            )));
        }
        let mut chunks = self.read(digest, 0, 0).await?;
        let mut buffer = Vec::with_capacity(digest.size as usize);
        while let Some(chunk) = chunks.next().await {
            buffer.extend_from_slice(&chunk?);
            if buffer.len() as u64 > digest.size {
                break;
            }
        }
        if buffer.len() as u64 != digest.size {
            return Err(CasError::SizeMismatch {
                expected: *digest,
                actual: buffer.len() as u64,
            });
        }
        Ok(buffer)
    }
}

/// The index of a store whose bytes live elsewhere (an S3-compatible bucket): which blobs are
/// present, their sizes and when they were last used. It is the truth of presence: a blob is
/// visible once indexed, and only verified, durable bytes are ever indexed, so `find_missing`
/// is one index query and never a probe of the bucket.
#[async_trait]
pub trait BlobIndex: Send + Sync + Debug + 'static {
    /// A short name for errors, logs and metrics ("embedded", "postgres", …).
    fn backend(&self) -> &'static str;

    /// The subset of `digests` that is not indexed, in the order given, without duplicates;
    /// one query whatever the count. The empty blob is always present.
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>>;

    /// Records blobs as present (their bytes are already durable and verified), as just used.
    async fn insert(&self, digests: &[Digest]) -> Result<()>;

    /// Marks indexed blobs as just used; others are ignored.
    async fn touch(&self, digests: &[Digest]) -> Result<()>;

    /// Forgets blobs (evicted, or found corrupt).
    async fn remove(&self, digests: &[Digest]) -> Result<()>;

    /// Up to `limit` indexed blobs, least recently used first (what eviction removes next).
    async fn least_recently_used(&self, limit: usize) -> Result<Vec<Digest>>;

    /// Blobs and bytes indexed (kept as they change or refreshed in the background: never a
    /// scan per call).
    fn stats(&self) -> StoreStats;
}

/// `(instance name, action digest) → ActionResult`. Instance names separate caches (and
/// executor-only namespaces); blobs are shared by all instances.
///
/// Implementations store and return entries as given: whether the blobs a result names are
/// still present (REAPI's completeness rule) is the completeness layer's decision, made once
/// over whichever store is configured.
#[async_trait]
pub trait ActionCache: Send + Sync + Debug + 'static {
    /// A short name for errors, logs and metrics ("embedded", "postgres", …).
    fn backend(&self) -> &'static str;

    /// The stored result, without checking the blobs it names.
    async fn get_unchecked(&self, instance: &str, action: &Digest) -> Result<Option<ActionResult>>;

    /// Stores (or replaces) a result. Every digest it names directly must be well-formed for
    /// the action's digest function.
    async fn put(&self, instance: &str, action: &Digest, result: &ActionResult) -> Result<()>;

    /// Removes an entry; returns whether there was one.
    async fn remove(&self, instance: &str, action: &Digest) -> Result<bool>;

    /// Every result stored under `instance`, for a namespace's owner to take stock of it.
    async fn results_in(&self, instance: &str) -> Result<Vec<ActionResult>>;

    /// Entries across all instances (a counter, not a scan).
    fn len(&self) -> u64;

    /// True when no entry is stored.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which tenant may read which blob (see [`crate::access`] for the rule and why).
#[async_trait]
pub trait Grants: Send + Sync + Debug + 'static {
    /// A short name for errors, logs and metrics.
    fn backend(&self) -> &'static str;

    /// Lets `tenant` read `digests` from now on.
    async fn grant(&self, tenant: &str, digests: &[Digest]) -> Result<()>;

    /// The subset of `digests` (in order, without duplicates) that none of `tenants` may read.
    /// The empty blob is readable by everyone. An invalid tenant name is an error.
    async fn not_readable_by_any(
        &self,
        tenants: &[&str],
        digests: &[Digest],
    ) -> Result<Vec<Digest>>;

    /// Grants recorded (all tenants; a counter, not a scan).
    fn len(&self) -> u64;

    /// True when nothing was granted.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `tenant` may read `digest`.
    async fn may_read(&self, tenant: &str, digest: &Digest) -> Result<bool> {
        Ok(self
            .not_readable_by_any(&[tenant], std::slice::from_ref(digest))
            .await?
            .is_empty())
    }
}

/// Runs blocking store work on tokio's blocking pool (every embedded backend's one way).
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| CasError::Unavailable(format!("store task failed: {e}")))?
}

/// A FindMissing of the filesystem store (touching the present blobs with `touch`): the
/// existence cache looked up once, on the calling thread; its answer when it has one, else the
/// index's on the blocking pool, from what the cache already said.
async fn find_missing_through_cache(
    store: &BlobStore,
    digests: &[Digest],
    touch: bool,
) -> Result<Vec<Digest>> {
    let known = store.known_presence(digests);
    if let Some(missing) = store.answer_from_memory(digests, &known, touch) {
        return Ok(missing);
    }
    let (store, digests) = (store.clone(), digests.to_vec());
    let touch_at = touch.then(crate::store::now_millis);
    blocking(move || store.answer_from_index(&digests, known, touch_at)).await
}

#[async_trait]
impl Store for BlobStore {
    fn backend(&self) -> &'static str {
        "filesystem"
    }

    /// From the existence cache on the calling thread when it knows every digest (memory
    /// only), else one hop to the blocking pool for the whole call (index reads).
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        find_missing_through_cache(self, digests, false).await
    }

    async fn touch(&self, digests: &[Digest]) -> Result<()> {
        let store = self.clone();
        let digests = digests.to_vec();
        blocking(move || BlobStore::touch(&store, &digests)).await
    }

    /// One pass over the existence cache and the index: on the calling thread when the cache
    /// knows every digest and no LRU position is due for an update (memory only, however many
    /// digests), else one hop to the blocking pool for the whole call.
    async fn find_missing_and_touch(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        find_missing_through_cache(self, digests, true).await
    }

    async fn read(&self, digest: &Digest, offset: u64, limit: u64) -> Result<ChunkStream> {
        let store = self.clone();
        let digest = *digest;
        let reader = blocking(move || store.reader(&digest, offset, limit)).await?;
        Ok(read_in_chunks(reader, digest))
    }

    async fn write(&self, digest: Digest, mut chunks: ChunkStream) -> Result<()> {
        let store = self.clone();
        // `Some(chunk)`, then `None` once the stream ended cleanly: only that commits. A
        // channel closed without it (the stream failed, or this future was dropped) drops the
        // writer uncommitted, which discards it: an aborted stream stores nothing.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<Bytes>>(4);
        let sink = tokio::task::spawn_blocking(move || -> Result<()> {
            let mut writer = store.writer(digest)?;
            while let Some(message) = rx.blocking_recv() {
                match message {
                    Some(chunk) => writer.write_chunk(&chunk)?,
                    None => return writer.commit().map(|_| ()),
                }
            }
            Err(CasError::Unavailable(format!(
                "the write of {digest:?} was abandoned"
            )))
        });
        let mut sent = Ok(());
        while let Some(chunk) = chunks.next().await {
            match chunk {
                Ok(chunk) => {
                    if tx.send(Some(chunk)).await.is_err() {
                        break; // the writer failed; its error is the one to report
                    }
                }
                Err(e) => {
                    sent = Err(e);
                    break;
                }
            }
        }
        if sent.is_ok() {
            let _ = tx.send(None).await;
        }
        drop(tx);
        let written = sink
            .await
            .map_err(|e| CasError::Unavailable(format!("store task failed: {e}")))?;
        sent.and(written)
    }

    async fn write_batch(&self, blobs: Vec<(Digest, Bytes)>) -> Vec<Result<()>> {
        let count = blobs.len();
        let store = self.clone();
        let outcome = blocking(move || Ok(store.put_batch(blobs))).await;
        match outcome {
            Ok(results) => results,
            Err(e) => {
                let message = e.to_string();
                (0..count)
                    .map(|_| Err(CasError::Unavailable(message.clone())))
                    .collect()
            }
        }
    }

    fn stats(&self) -> StoreStats {
        BlobStore::stats(self)
    }

    fn local(&self) -> Option<&BlobStore> {
        Some(self)
    }
}

/// Streams a blob reader in [`READ_CHUNK_BYTES`] chunks from a blocking thread.
fn read_in_chunks(mut reader: crate::store::BlobReader, digest: Digest) -> ChunkStream {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes>>(2);
    tokio::task::spawn_blocking(move || {
        while reader.remaining() > 0 {
            let chunk = match reader.read_chunk(READ_CHUNK_BYTES) {
                Ok(chunk) => chunk,
                Err(e) => {
                    // A stored file shorter than its digest is lost data, not an outage: callers
                    // must not retry it as one (REAPI's DATA_LOSS).
                    let error = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        CasError::SizeMismatch {
                            expected: digest,
                            actual: digest.size - reader.remaining(),
                        }
                    } else {
                        CasError::Unavailable(format!("reading blob {digest:?}: {e}"))
                    };
                    let _ = tx.blocking_send(Err(error));
                    return;
                }
            };
            if tx.blocking_send(Ok(chunk)).is_err() {
                return; // the reader went away
            }
        }
    });
    tokio_stream_from(rx)
}

fn tokio_stream_from(mut rx: tokio::sync::mpsc::Receiver<Result<Bytes>>) -> ChunkStream {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

#[async_trait]
impl ActionCache for EmbeddedActionCache {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn get_unchecked(&self, instance: &str, action: &Digest) -> Result<Option<ActionResult>> {
        let cache = self.clone();
        let (instance, action) = (instance.to_string(), *action);
        blocking(move || cache.get_unchecked(&instance, &action)).await
    }

    async fn put(&self, instance: &str, action: &Digest, result: &ActionResult) -> Result<()> {
        let cache = self.clone();
        let (instance, action, result) = (instance.to_string(), *action, result.clone());
        blocking(move || EmbeddedActionCache::put(&cache, &instance, &action, &result)).await
    }

    async fn remove(&self, instance: &str, action: &Digest) -> Result<bool> {
        let cache = self.clone();
        let (instance, action) = (instance.to_string(), *action);
        blocking(move || EmbeddedActionCache::remove(&cache, &instance, &action)).await
    }

    async fn results_in(&self, instance: &str) -> Result<Vec<ActionResult>> {
        let cache = self.clone();
        let instance = instance.to_string();
        blocking(move || cache.results_in(&instance)).await
    }

    fn len(&self) -> u64 {
        EmbeddedActionCache::len(self) as u64
    }
}

#[async_trait]
impl Grants for EmbeddedGrants {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn grant(&self, tenant: &str, digests: &[Digest]) -> Result<()> {
        let grants = self.clone();
        let (tenant, digests) = (tenant.to_string(), digests.to_vec());
        blocking(move || EmbeddedGrants::grant(&grants, &tenant, &digests)).await
    }

    /// On the calling thread when every digest is remembered granted (memory only), else one
    /// hop to the blocking pool for the whole call (tree reads).
    async fn not_readable_by_any(
        &self,
        tenants: &[&str],
        digests: &[Digest],
    ) -> Result<Vec<Digest>> {
        let remembered = self.remembered(tenants, digests)?;
        if remembered.iter().all(|r| *r) {
            return Ok(Vec::new());
        }
        let grants = self.clone();
        let tenants: Vec<String> = tenants.iter().map(|t| t.to_string()).collect();
        let digests = digests.to_vec();
        blocking(move || {
            let tenants: Vec<&str> = tenants.iter().map(String::as_str).collect();
            grants.not_readable_beyond(&tenants, &digests, &remembered)
        })
        .await
    }

    fn len(&self) -> u64 {
        EmbeddedGrants::len(self) as u64
    }
}
