//! [`Tiered`]: this machine's filesystem store ([`BlobStore`], the fast tier) in front of a
//! store shared by every process (the slow tier: a bucket, [`crate::backends::s3::BucketStore`]).
//!
//! Why: blobs in a bucket are shared by all front ends and workers, but hardlinks, seekable zips
//! and the executor's materialisation need local files ([`Store::local`]), and a blob read
//! twice should cross the network once.
//!
//! Decisions:
//! - **The slow tier is the truth of presence.** `find_missing` answers from it alone: a blob
//!   that only this machine's fast tier holds is not stored for the other processes (it may have
//!   been written while the slow tier refused, or fetched before the slow tier evicted it), so
//!   saying "present" for it would let a client skip an upload another process then cannot
//!   read. Writes go through to the slow tier, so for blobs written through this layer the fast
//!   tier holds a subset of the slow one, and nothing is lost by not asking it. `stats` are the
//!   slow tier's too.
//! - **Write-through, fast tier first.** `write` stores into the fast tier (which verifies size
//!   and hash as it always does), then sends the slow tier the local file, streamed (never the
//!   whole blob in memory), unless the slow tier already has it; `write_batch` is the fast
//!   tier's group commit then one slow `write_batch` of the blobs that passed. A blob the slow
//!   tier refuses is reported failed even though it stays in the fast tier (as a cache).
//! - **Blobs written into the fast tier directly** (a resumable ByteStream upload, an action's
//!   outputs) reach the slow tier through [`Store::publish_local`].
//! - **Read-through.** `read` serves the fast tier when it has the blob; otherwise it fetches
//!   the whole blob from the slow tier into the fast one (verified by the fast tier's writer:
//!   bytes from the shared store are not trusted either) and serves the range from there.
//!   [`Store::make_local`] fetches what the fast tier lacks, [`Tiered::fetch_concurrency`] at
//!   a time.
//! - **Damaged local files.** The fast tier handles them as it always does: a reader detects a
//!   file shorter than its digest says; a consumer that hashes what it read and finds a
//!   mismatch calls [`BlobStore::remove_if_corrupt`] on [`Store::local`]. This layer adds one
//!   thing the slow copy makes possible: a read of the fast tier that fails mid-stream has the
//!   blob re-hashed and, if damaged, removed locally, so the next read fetches it again.
//! - The fast tier evicts by its own LRU (its `max_bytes`): eviction there loses nothing. It
//!   must be able to hold the largest blob written or read through it (a blob above its
//!   capacity is refused, as by the fast store alone).

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::digest::Digest;
use crate::error::{CasError, Result};
use crate::seams::{ChunkStream, Store};
use crate::store::{BlobStore, StoreStats};

/// A local filesystem tier in front of a shared slow store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Tiered {
    fast: BlobStore,
    slow: Arc<dyn Store>,
    fetch_concurrency: usize,
}

impl Tiered {
    /// `fast` in front of `slow`.
    pub fn new(fast: BlobStore, slow: Arc<dyn Store>) -> Self {
        Tiered {
            fast,
            slow,
            fetch_concurrency: 8,
        }
    }

    /// Blobs fetched from the slow tier at once by [`Store::make_local`] (default 8).
    pub fn fetch_concurrency(mut self, concurrency: usize) -> Self {
        self.fetch_concurrency = concurrency.max(1);
        self
    }

    /// The shared slow tier.
    pub fn slow(&self) -> &Arc<dyn Store> {
        &self.slow
    }

    /// Copies a whole blob from the slow tier into the fast one (which verifies it).
    async fn fetch(&self, digest: &Digest) -> Result<()> {
        let chunks = self.slow.read(digest, 0, 0).await?;
        Store::write(&self.fast, *digest, chunks).await
    }

    /// A read of the fast tier; one that fails mid-stream has the local file checked.
    async fn read_fast(&self, digest: &Digest, offset: u64, limit: u64) -> Result<ChunkStream> {
        let chunks = Store::read(&self.fast, digest, offset, limit).await?;
        let (fast, digest) = (self.fast.clone(), *digest);
        Ok(chunks
            .inspect_err(move |error| {
                let fast = fast.clone();
                tracing::warn!(?digest, %error, "reading the fast tier failed: checking the file");
                tokio::task::spawn_blocking(move || match fast.remove_if_corrupt(&digest) {
                    Ok(true) => tracing::warn!(?digest, "damaged local copy removed"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(?digest, error = %e, "checking the local copy"),
                });
            })
            .boxed())
    }
}

#[async_trait]
impl Store for Tiered {
    fn backend(&self) -> &'static str {
        "tiered"
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.slow.find_missing(digests).await
    }

    async fn touch(&self, digests: &[Digest]) -> Result<()> {
        Store::touch(&self.fast, digests).await?;
        self.slow.touch(digests).await
    }

    async fn read(&self, digest: &Digest, offset: u64, limit: u64) -> Result<ChunkStream> {
        if offset > digest.size {
            return Err(CasError::OffsetOutOfRange {
                digest: *digest,
                offset,
            });
        }
        if Store::contains(&self.fast, digest).await? {
            match self.read_fast(digest, offset, limit).await {
                // (the file vanished behind the fast store's back: it forgot it, fetch again)
                Err(CasError::NotFound(_)) => {}
                other => return other,
            }
        }
        self.fetch(digest).await?;
        match self.read_fast(digest, offset, limit).await {
            // (evicted from the fast tier between the fetch and the read: serve the slow one)
            Err(CasError::NotFound(_)) => self.slow.read(digest, offset, limit).await,
            other => other,
        }
    }

    async fn write(&self, digest: Digest, chunks: ChunkStream) -> Result<()> {
        Store::write(&self.fast, digest, chunks).await?;
        if self.slow.contains(&digest).await? {
            return Ok(());
        }
        let local = Store::read(&self.fast, &digest, 0, 0).await?;
        self.slow.write(digest, local).await
    }

    async fn write_batch(&self, blobs: Vec<(Digest, Bytes)>) -> Vec<Result<()>> {
        let mut results = Store::write_batch(&self.fast, blobs.clone()).await;
        let (positions, passed): (Vec<usize>, Vec<(Digest, Bytes)>) = blobs
            .into_iter()
            .enumerate()
            .filter(|(i, _)| results[*i].is_ok())
            .unzip();
        if passed.is_empty() {
            return results;
        }
        let slow = self.slow.write_batch(passed).await;
        for (position, outcome) in positions.into_iter().zip(slow) {
            results[position] = outcome;
        }
        results
    }

    fn stats(&self) -> StoreStats {
        self.slow.stats()
    }

    fn local(&self) -> Option<&BlobStore> {
        Some(&self.fast)
    }

    /// Sends the slow tier what was written straight into the fast one (a resumable upload,
    /// an action's outputs), streamed from the local files, [`Tiered::fetch_concurrency`] at a
    /// time; what the slow tier already has is skipped. A blob the fast tier lacks is
    /// [`CasError::NotFound`].
    async fn publish_local(&self, digests: &[Digest]) -> Result<()> {
        let missing = self.slow.find_missing(digests).await?;
        futures::stream::iter(missing)
            .map(|digest| async move {
                let local = Store::read(&self.fast, &digest, 0, 0).await?;
                self.slow.write(digest, local).await
            })
            .buffer_unordered(self.fetch_concurrency)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
    }

    async fn make_local(&self, digests: &[Digest]) -> Result<()> {
        let missing = Store::find_missing(&self.fast, digests).await?;
        futures::stream::iter(missing)
            .map(|digest| async move { self.fetch(&digest).await })
            .buffer_unordered(self.fetch_concurrency)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
    }
}
