//! [`EmbeddedBlobIndex`]: a [`BlobIndex`] in a sled database of its own directory, for a
//! bucket store ([`super::s3::BucketStore`]) run without PostgreSQL.
//!
//! Why: the index is the truth of presence of a bucket store (`find_missing` is one index query,
//! never a probe of the bucket), and a single machine that keeps its blobs in a bucket (or the
//! tests of the bucket store) should not need a database server for it. Processes that share a
//! bucket must share its index, so several processes (a front end and workers) need the
//! PostgreSQL index; this one is for one process per directory (sled locks it).
//!
//! Layout, one key encoding with the filesystem store ([`crate::store`]):
//! ```text
//! tree blob_index      function byte + hash → size, last access (big-endian u64s)
//! tree blob_index_lru  last access + function byte + hash → ()   (eviction order)
//! tree blob_index_meta "totals" → blob count, bytes              (running totals)
//! ```
//! Every change updates the three trees in one sled transaction, so the totals
//! ([`BlobIndex::stats`]) are read at open and kept in memory, never counted by a scan. Accesses
//! closer together than a minute do not rewrite the eviction order (as the filesystem store).
//! sled flushes in the background: a crash may lose the last entries, and those blobs are then
//! reported missing and uploaded again (their bytes in the bucket are simply overwritten with
//! the same bytes): never the other way round.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use parking_lot::Mutex;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::digest::Digest;
use crate::error::{CasError, Result};
use crate::seams::BlobIndex;
use crate::seams::blocking;
use crate::store::{
    ACCESS_GRANULARITY_MS, StoreStats, blob_key, digest_from_key, index_value, lru_key, now_millis,
    open_sled, parse_index_value,
};

const TOTALS_KEY: &[u8] = b"totals";

/// A blob index in a sled database (one process per directory). Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedBlobIndex {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    _db: sled::Db,
    blobs: sled::Tree,
    lru: sled::Tree,
    meta: sled::Tree,
    blob_count: AtomicU64,
    total_bytes: AtomicU64,
    removed: AtomicU64,
    removed_bytes: AtomicU64,
    /// Serialises changes, so the in-memory totals follow the committed ones in order.
    write: Mutex<()>,
}

impl std::fmt::Debug for EmbeddedBlobIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBlobIndex")
            .field("dir", &self.inner.dir)
            .field("blob_count", &self.inner.blob_count.load(Ordering::Relaxed))
            .finish()
    }
}

fn totals_value(count: u64, bytes: u64) -> [u8; 16] {
    index_value(count, bytes)
}

impl EmbeddedBlobIndex {
    /// Opens (creating if needed) the index in `dir`. Fails if another owner still has it open
    /// after a few seconds (a previous owner in this process may take a moment to let go).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| CasError::io("creating", &dir, e))?;
        let unavailable =
            |e: sled::Error| CasError::Unavailable(format!("blob index {}: {e}", dir.display()));
        let db = open_sled(&dir).map_err(unavailable)?;
        let blobs = db.open_tree("blob_index").map_err(unavailable)?;
        let lru = db.open_tree("blob_index_lru").map_err(unavailable)?;
        let meta = db.open_tree("blob_index_meta").map_err(unavailable)?;
        let (count, bytes) = meta
            .get(TOTALS_KEY)
            .map_err(unavailable)?
            .as_deref()
            .and_then(parse_index_value)
            .unwrap_or((0, 0));
        Ok(EmbeddedBlobIndex {
            inner: Arc::new(Inner {
                dir,
                _db: db,
                blobs,
                lru,
                meta,
                blob_count: AtomicU64::new(count),
                total_bytes: AtomicU64::new(bytes),
                removed: AtomicU64::new(0),
                removed_bytes: AtomicU64::new(0),
                write: Mutex::new(()),
            }),
        })
    }

    /// The directory of the database.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn find_missing_now(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let mut seen = HashSet::new();
        let mut missing = Vec::new();
        for digest in digests {
            if digest.is_empty_blob() || !seen.insert(*digest) {
                continue;
            }
            let entry = self.inner.blobs.get(blob_key(digest))?;
            let present = entry
                .as_deref()
                .and_then(parse_index_value)
                .is_some_and(|(size, _)| size == digest.size);
            if !present {
                missing.push(*digest);
            }
        }
        Ok(missing)
    }

    /// Applies `change` to each distinct non-empty digest in one transaction over the three
    /// trees, with the running totals; publishes the new totals once committed.
    fn change(&self, digests: &[Digest], change: Change) -> Result<()> {
        let mut seen = HashSet::new();
        let digests: Vec<Digest> = digests
            .iter()
            .filter(|d| !d.is_empty_blob() && seen.insert(**d))
            .copied()
            .collect();
        if digests.is_empty() {
            return Ok(());
        }
        let inner = &self.inner;
        let _write = inner.write.lock();
        let now = now_millis();
        let before = (
            inner.blob_count.load(Ordering::SeqCst),
            inner.total_bytes.load(Ordering::SeqCst),
        );
        let outcome = (&inner.blobs, &inner.lru, &inner.meta).transaction(|(blobs, lru, meta)| {
            let (mut count, mut bytes) = before;
            let (mut removed, mut removed_bytes) = (0u64, 0u64);
            for digest in &digests {
                let key = blob_key(digest);
                let entry = blobs.get(key)?.as_deref().and_then(parse_index_value);
                match (change, entry) {
                    (Change::Insert, None) => {
                        blobs.insert(&key[..], &index_value(digest.size, now)[..])?;
                        lru.insert(&lru_key(now, &key)[..], &[][..])?;
                        count += 1;
                        bytes += digest.size;
                    }
                    (Change::Insert | Change::Touch, Some((size, access))) => {
                        if change == Change::Touch
                            && (size != digest.size
                                || now.saturating_sub(access) < ACCESS_GRANULARITY_MS)
                        {
                            continue;
                        }
                        // (an insert of another size under the same hash replaces the entry:
                        // only verified bytes are inserted, so the new one is right)
                        blobs.insert(&key[..], &index_value(digest.size, now)[..])?;
                        lru.remove(&lru_key(access, &key)[..])?;
                        lru.insert(&lru_key(now, &key)[..], &[][..])?;
                        bytes = bytes.saturating_sub(size) + digest.size;
                    }
                    (Change::Touch | Change::Remove, None) => {}
                    (Change::Remove, Some((size, access))) => {
                        blobs.remove(&key[..])?;
                        lru.remove(&lru_key(access, &key)[..])?;
                        count = count.saturating_sub(1);
                        bytes = bytes.saturating_sub(size);
                        removed += 1;
                        removed_bytes += size;
                    }
                }
            }
            meta.insert(TOTALS_KEY, &totals_value(count, bytes)[..])?;
            Ok::<_, ConflictableTransactionError<()>>((count, bytes, removed, removed_bytes))
        });
        let (count, bytes, removed, removed_bytes) = outcome.map_err(|e| match e {
            TransactionError::Storage(e) => CasError::Db(e),
            TransactionError::Abort(()) => CasError::Unavailable("blob index: aborted".into()),
        })?;
        inner.blob_count.store(count, Ordering::SeqCst);
        inner.total_bytes.store(bytes, Ordering::SeqCst);
        inner.removed.fetch_add(removed, Ordering::Relaxed);
        inner
            .removed_bytes
            .fetch_add(removed_bytes, Ordering::Relaxed);
        Ok(())
    }

    fn least_recently_used_now(&self, limit: usize) -> Result<Vec<Digest>> {
        let mut found = Vec::new();
        for entry in self.inner.lru.iter() {
            if found.len() >= limit {
                break;
            }
            let (lru, _) = entry?;
            let Some(key) = lru.get(8..) else { continue };
            let size = self
                .inner
                .blobs
                .get(key)?
                .as_deref()
                .and_then(parse_index_value)
                .map(|(size, _)| size);
            if let Some(digest) = size.and_then(|size| digest_from_key(key, size)) {
                found.push(digest);
            }
        }
        Ok(found)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    Insert,
    Touch,
    Remove,
}

#[async_trait]
impl BlobIndex for EmbeddedBlobIndex {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let (index, digests) = (self.clone(), digests.to_vec());
        blocking(move || index.find_missing_now(&digests)).await
    }

    async fn insert(&self, digests: &[Digest]) -> Result<()> {
        let (index, digests) = (self.clone(), digests.to_vec());
        blocking(move || index.change(&digests, Change::Insert)).await
    }

    async fn touch(&self, digests: &[Digest]) -> Result<()> {
        let (index, digests) = (self.clone(), digests.to_vec());
        blocking(move || index.change(&digests, Change::Touch)).await
    }

    async fn remove(&self, digests: &[Digest]) -> Result<()> {
        let (index, digests) = (self.clone(), digests.to_vec());
        blocking(move || index.change(&digests, Change::Remove)).await
    }

    async fn least_recently_used(&self, limit: usize) -> Result<Vec<Digest>> {
        let index = self.clone();
        blocking(move || index.least_recently_used_now(limit)).await
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            total_bytes: self.inner.total_bytes.load(Ordering::SeqCst),
            blob_count: self.inner.blob_count.load(Ordering::SeqCst),
            evictions: self.inner.removed.load(Ordering::Relaxed),
            evicted_bytes: self.inner.removed_bytes.load(Ordering::Relaxed),
        }
    }
}
