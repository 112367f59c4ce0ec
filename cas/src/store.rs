//! The blob store: content-addressed files on disk, indexed in sled for LRU eviction.
//!
//! Layout under the store root:
//! ```text
//! blobs/<function>/<hh>/<hash>   one file per blob, sharded by the hash's first byte
//! tmp/<pid>-<nanos>/             one process's writes in progress, with its `.lock` (flock'd)
//! index/                         the sled database (blob sizes and last access, action cache, stat cache)
//! lock                           the data dir's lock (flock'd), holding the owner's pid
//! ```
//! Contract:
//! - A blob becomes visible (indexed) only once its bytes are verified (size and hash), placed
//!   at its path (never over a file) and then synced, bytes and name, in one step. A stream
//!   or a file is placed by renaming its temporary; an in-memory batch
//!   ([`BlobStore::put_batch`]) is written straight to its paths, verified first. Many blobs
//!   go through that together (group commit: [`BlobWriter::stage`] each, then one
//!   [`BlobStore::publish`] with one `syncfs`), one blob alone through its `fdatasync` and its
//!   directory's `fsync`, in parallel. A crash mid-stream leaves at most a file under the
//!   process's `tmp/` directory, removed at the next open. A crash mid-batch or before a sync
//!   may leave an unindexed file at a blob's path that is short, or whose bytes never reached
//!   the disk: nothing trusts such a file without hashing it, a later write of that blob
//!   replaces it, and [`BlobStore::verify`] removes it. A wrong digest stores nothing.
//! - One data dir, many processes: sled is a single-process database, so one process at a
//!   time has the store open. A second opener waits for the first to close it, as cargo waits
//!   for its build directory (`rba: blocking waiting for the data dir lock held by pid N`, once,
//!   on stderr), instead of failing. Temporaries are per process: an opener removes only the
//!   temporary directories whose `.lock` no live process holds, never another process's
//!   in-flight writes.
//! - Readers stream with offset/limit and never load a whole blob. A reader pins its blob: the
//!   evictor skips pinned blobs. Writers of a blob already present only count the bytes.
//! - Every method is safe to call from many threads; all I/O is blocking (call it from
//!   `tokio::task::spawn_blocking` in async code when a blob may be large).
//! - Presence is answered by the index alone, the truth about what is stored: no `stat` per
//!   digest, so FindMissing of thousands of digests is a batch of sorted index reads, most
//!   served by an in-memory cache of recently seen entries. Eviction and every other removal
//!   update the index and the cache under the same lock, so an evicted blob is never reported
//!   present. The index is flushed in the background (sled), so a crash may lose the entries
//!   of blobs whose files are in place: such a blob is reported missing, and the upload that
//!   follows adopts the file, once hashed and synced, instead of writing it (as do the action
//!   cache's checks and [`BlobStore::verify`]); an index entry whose
//!   file was removed behind the store's back is dropped by the first read that misses it,
//!   and by `verify`, the full rescan. Startup and [`BlobStore::stats`] read only the index's
//!   running totals.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use tempfile::NamedTempFile;

use crate::digest::{Digest, DigestFunction, Hasher};
use crate::error::{CasError, Result};
use crate::read_buffers::READ_BUFFERS;

/// How the store behaves. The defaults suit a developer machine.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Evict least-recently-used blobs once the store holds more than this many bytes.
    pub max_bytes: u64,
    /// Eviction removes blobs until the store is at or below this fraction of `max_bytes`.
    pub low_watermark: f64,
    /// fsync each blob before it becomes visible (durability across power loss).
    pub fsync: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_bytes: 50 << 30,
            low_watermark: 0.9,
            fsync: true,
        }
    }
}

impl StoreConfig {
    /// The defaults without fsync: for scratch stores (tests, benchmarks, throwaway client
    /// caches) where surviving power loss does not matter and fsync would dominate the figures.
    pub fn without_fsync() -> Self {
        StoreConfig {
            fsync: false,
            ..Default::default()
        }
    }
}

/// Counters describing the store, for metrics.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct StoreStats {
    /// Bytes held by indexed blobs.
    pub total_bytes: u64,
    /// Number of indexed blobs.
    pub blob_count: u64,
    /// Blobs evicted since the store was opened.
    pub evictions: u64,
    /// Bytes evicted since the store was opened.
    pub evicted_bytes: u64,
}

/// What [`BlobStore::verify`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Blobs re-hashed and found intact.
    pub intact: u64,
    /// Blobs whose bytes no longer match their digest, now removed.
    pub corrupt: Vec<Digest>,
    /// Index entries whose file was gone, now removed.
    pub missing: Vec<Digest>,
    /// Files found on disk without an index entry, now indexed.
    pub adopted: u64,
    /// Files without an index entry whose bytes do not match their name (a write a crash
    /// interrupted), now removed.
    pub unfinished: u64,
}

impl VerifyReport {
    /// Whether the scan changed anything (removed, dropped or indexed), as opposed to finding
    /// every blob intact and indexed.
    pub fn repaired(&self) -> bool {
        !self.corrupt.is_empty()
            || !self.missing.is_empty()
            || self.adopted > 0
            || self.unfinished > 0
    }
}

/// Key of a blob in the index: function byte + raw hash.
pub(crate) type BlobKey = [u8; 33];

pub(crate) fn blob_key(digest: &Digest) -> BlobKey {
    let mut key = [0u8; 33];
    key[0] = function_byte(digest.function);
    key[1..].copy_from_slice(&digest.hash);
    key
}

pub(crate) fn function_byte(function: DigestFunction) -> u8 {
    match function {
        DigestFunction::Sha256 => 1,
        DigestFunction::Blake3 => 2,
    }
}

pub(crate) fn digest_from_key(key: &[u8], size: u64) -> Option<Digest> {
    let function = match key.first()? {
        1 => DigestFunction::Sha256,
        2 => DigestFunction::Blake3,
        _ => return None,
    };
    Some(Digest {
        function,
        hash: key.get(1..33)?.try_into().ok()?,
        size,
    })
}

pub(crate) fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Index value: size and last access, both big-endian u64.
pub(crate) fn index_value(size: u64, access: u64) -> [u8; 16] {
    let mut value = [0u8; 16];
    value[..8].copy_from_slice(&size.to_be_bytes());
    value[8..].copy_from_slice(&access.to_be_bytes());
    value
}

pub(crate) fn parse_index_value(value: &[u8]) -> Option<(u64, u64)> {
    Some((
        u64::from_be_bytes(value.get(..8)?.try_into().ok()?),
        u64::from_be_bytes(value.get(8..16)?.try_into().ok()?),
    ))
}

pub(crate) fn lru_key(access: u64, key: &BlobKey) -> [u8; 41] {
    let mut lru = [0u8; 41];
    lru[..8].copy_from_slice(&access.to_be_bytes());
    lru[8..].copy_from_slice(key);
    lru
}

/// Accesses closer together than this do not rewrite the LRU index: eviction order at minute
/// precision, and a storm of FindMissing calls writes each blob's entry at most once a minute.
pub(crate) const ACCESS_GRANULARITY_MS: u64 = 60_000;
/// The running totals are written to the index at most this often (and on flush and close);
/// a crash may leave them slightly behind, which [`BlobStore::verify`] corrects.
const TOTALS_PERSIST_MS: u64 = 1_000;

struct Inner {
    root: PathBuf,
    config: StoreConfig,
    db: sled::Db,
    blobs: sled::Tree,
    lru: sled::Tree,
    meta: sled::Tree,
    total_bytes: AtomicU64,
    blob_count: AtomicU64,
    totals_persisted_at: AtomicU64,
    presence: PresenceCache,
    evictions: AtomicU64,
    evicted_bytes: AtomicU64,
    pins: Mutex<HashMap<BlobKey, usize>>,
    evict_lock: Mutex<()>,
    syncer: FsSyncer,
    // Declared last: dropped after the database, so a waiting opener finds sled unlocked.
    temporaries: ProcessTemp,
    _root_lock: RootLock,
}

impl Inner {
    fn persist_totals(&self) -> Result<()> {
        let total = self.total_bytes.load(Ordering::SeqCst);
        let count = self.blob_count.load(Ordering::SeqCst);
        self.meta.insert(TOTAL_BYTES_KEY, &total.to_be_bytes())?;
        self.meta.insert(BLOB_COUNT_KEY, &count.to_be_bytes())?;
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = self.persist_totals() {
            tracing::warn!(error = %e, "saving the store's totals at close failed");
        }
    }
}

/// The content-addressed blob store. Cheap to clone; clones share one store.
#[derive(Clone)]
pub struct BlobStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore")
            .field("root", &self.inner.root)
            .finish()
    }
}

const TOTAL_BYTES_KEY: &[u8] = b"total_bytes";
const BLOB_COUNT_KEY: &[u8] = b"blob_count";

/// What the index said recently about blob keys, the existence cache: FindMissing of blobs
/// just uploaded or just asked about, present or absent, is answered from memory. Sharded by
/// the hash's first byte; a shard's lock is held across the index read or write of a key, so
/// a cached answer never outlives the index entry it reflects: every index insert
/// ([`BlobStore::index_insert`]) and removal ([`BlobStore::forget`], the one way out of the
/// index for eviction, `verify` and corruption) rewrites the key's cached answer under that
/// lock.
struct PresenceCache {
    shards: Vec<Mutex<PresenceShard>>,
}

#[derive(Default)]
struct PresenceShard {
    /// Present blobs: (size, last access) as indexed.
    present: HashMap<PresenceKey, (u64, u64), PresenceHasher>,
    /// Keys the index does not hold.
    absent: std::collections::HashSet<PresenceKey, PresenceHasher>,
}

/// A blob key as the existence cache holds it: the hash as four words and the function, so
/// a lookup compares words instead of calling `memcmp` on 33 bytes. Keys are client-chosen
/// (FindMissing of any digest leaves an absent entry), so the maps hash them with a seeded
/// hasher (foldhash, random per process), not with bytes of the key itself; SipHash, the
/// default, was the other large cost of a cached FindMissing.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct PresenceKey {
    words: [u64; 4],
    function: u8,
}

type PresenceHasher = foldhash::fast::RandomState;

impl From<&BlobKey> for PresenceKey {
    fn from(key: &BlobKey) -> Self {
        let word =
            |i: usize| u64::from_le_bytes(key[1 + 8 * i..9 + 8 * i].try_into().expect("8 bytes"));
        PresenceKey {
            words: [word(0), word(1), word(2), word(3)],
            function: key[0],
        }
    }
}

const PRESENCE_SHARDS: usize = 64;
/// Present entries per shard before the shard's present entries start over (64 × 2,048 ≈
/// 131k digests, ≈ 8 MB).
const PRESENCE_PER_SHARD: usize = 2_048;
/// Absent keys per shard before they start over (64 × 1,024 ≈ 65k digests): fewer, so a
/// client asking about many digests nobody stored cannot push out what is present.
const ABSENCE_PER_SHARD: usize = 1_024;

impl PresenceCache {
    fn new() -> Self {
        PresenceCache {
            shards: (0..PRESENCE_SHARDS)
                .map(|_| Mutex::new(PresenceShard::default()))
                .collect(),
        }
    }

    fn shard(&self, key: &BlobKey) -> parking_lot::MutexGuard<'_, PresenceShard> {
        self.shards[shard_index(key)].lock()
    }

    /// What the cache knows of each digest ([`PresenceShard::known`], in the order given),
    /// each shard locked once for all of its digests. A lock is a full barrier on x86: one
    /// per digest kept the CPU from overlapping the cache misses of neighbouring lookups, and
    /// those misses were a quarter of the server's CPU in a FindMissing of 1,000 digests.
    fn known_all(&self, digests: &[Digest]) -> Vec<Option<Option<(u64, u64)>>> {
        let keys: Vec<BlobKey> = digests.iter().map(blob_key).collect();
        // The digests' positions grouped by shard (a counting sort).
        let mut starts = [0usize; PRESENCE_SHARDS + 1];
        for key in &keys {
            starts[shard_index(key) + 1] += 1;
        }
        for shard in 0..PRESENCE_SHARDS {
            starts[shard + 1] += starts[shard];
        }
        let mut next = starts;
        let mut by_shard = vec![0; keys.len()];
        for (position, key) in keys.iter().enumerate() {
            let slot = &mut next[shard_index(key)];
            by_shard[*slot] = position;
            *slot += 1;
        }
        let mut known = vec![None; keys.len()];
        for (shard, lock) in self.shards.iter().enumerate() {
            let positions = &by_shard[starts[shard]..starts[shard + 1]];
            if positions.is_empty() {
                continue;
            }
            let cached = lock.lock();
            for &position in positions {
                known[position] = cached.known(&keys[position]);
            }
        }
        known
    }
}

/// What the existence cache knew of each digest of one FindMissing, in order
/// ([`PresenceShard::known`]).
pub(crate) struct KnownPresence(Vec<Option<Option<(u64, u64)>>>);

fn shard_index(key: &BlobKey) -> usize {
    key[1] as usize % PRESENCE_SHARDS
}

impl PresenceShard {
    /// `Some(Some(entry))`: present as indexed; `Some(None)`: absent; `None`: not known.
    fn known(&self, key: &BlobKey) -> Option<Option<(u64, u64)>> {
        let key = PresenceKey::from(key);
        match self.present.get(&key) {
            Some(entry) => Some(Some(*entry)),
            None if self.absent.contains(&key) => Some(None),
            None => None,
        }
    }

    fn remember(&mut self, key: BlobKey, entry: (u64, u64)) {
        let key = PresenceKey::from(&key);
        self.absent.remove(&key);
        if self.present.len() >= PRESENCE_PER_SHARD && !self.present.contains_key(&key) {
            self.present.clear();
        }
        self.present.insert(key, entry);
    }

    fn remember_absent(&mut self, key: BlobKey) {
        let key = PresenceKey::from(&key);
        self.present.remove(&key);
        if self.absent.len() >= ABSENCE_PER_SHARD {
            self.absent.clear();
        }
        self.absent.insert(key);
    }
}

impl BlobStore {
    /// A throwaway store in a new temporary directory, without fsync. The store lives as long
    /// as the returned directory guard.
    pub fn scratch() -> Result<(tempfile::TempDir, Self)> {
        let dir = tempfile::tempdir()
            .map_err(|e| CasError::io("creating a scratch store in", std::env::temp_dir(), e))?;
        let store = BlobStore::open(dir.path(), StoreConfig::without_fsync())?;
        Ok((dir, store))
    }

    /// Opens (creating if needed) the store under `root`. When another process has it open,
    /// waits until that process closes it (saying so once on stderr).
    pub fn open(root: impl AsRef<Path>, config: StoreConfig) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        for function in DigestFunction::ALL {
            let dir = root.join("blobs").join(function.name());
            fs::create_dir_all(&dir).map_err(|e| CasError::io("creating", &dir, e))?;
        }
        let root_lock = RootLock::acquire(&root)?;
        let temporaries = ProcessTemp::create(&root.join("tmp"))?;
        let db = open_sled(&root.join("index"))?;
        let blobs = db.open_tree("blobs")?;
        let lru = db.open_tree("lru")?;
        let meta = db.open_tree("meta")?;
        let read_counter = |key: &[u8]| -> Result<Option<u64>> {
            Ok(meta
                .get(key)?
                .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
        };
        let total = read_counter(TOTAL_BYTES_KEY)?.unwrap_or(0);
        // Stores from before the running count: counted once, here.
        let count = match read_counter(BLOB_COUNT_KEY)? {
            Some(count) => count,
            None => {
                let count = blobs.len() as u64;
                meta.insert(BLOB_COUNT_KEY, &count.to_be_bytes())?;
                count
            }
        };
        Ok(BlobStore {
            inner: Arc::new(Inner {
                root,
                config,
                db,
                blobs,
                lru,
                meta,
                total_bytes: AtomicU64::new(total),
                blob_count: AtomicU64::new(count),
                totals_persisted_at: AtomicU64::new(0),
                presence: PresenceCache::new(),
                evictions: AtomicU64::new(0),
                evicted_bytes: AtomicU64::new(0),
                pins: Mutex::new(HashMap::new()),
                evict_lock: Mutex::new(()),
                syncer: FsSyncer::default(),
                temporaries,
                _root_lock: root_lock,
            }),
        })
    }

    /// This process's directory of writes in progress (emptied when the store closes).
    pub fn temp_dir(&self) -> &Path {
        &self.inner.temporaries.dir
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The store's configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// The sled database, shared with the action cache, grants, stat cache and record spaces
    /// ([`crate::records`]) of this store; never outside this crate.
    pub(crate) fn db(&self) -> &sled::Db {
        &self.inner.db
    }

    /// Where the blob's file lives (whether or not it is present).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hash_hex();
        self.inner
            .root
            .join("blobs")
            .join(digest.function.name())
            .join(&hex[..2])
            .join(hex)
    }

    /// True when the blob is present (in the index). The empty blob is always present.
    pub fn contains(&self, digest: &Digest) -> Result<bool> {
        if digest.is_empty_blob() {
            return Ok(true);
        }
        let key = blob_key(digest);
        Ok(self.lookup(&key)?.map(|(size, _)| size) == Some(digest.size))
    }

    /// The subset of `digests` that is not present, in the order given, without duplicates.
    /// No filesystem access: the presence cache answers what it knows, and the rest is read
    /// from the index in key order (neighbouring keys share index pages).
    pub fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.find_missing_at(digests, None)
    }

    /// [`BlobStore::find_missing`] that also marks the present blobs as just used (what a
    /// REAPI FindMissingBlobs does), in the same pass.
    pub fn find_missing_and_touch(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.find_missing_at(digests, Some(now_millis()))
    }

    /// [`BlobStore::find_missing`] (with `touch`: [`BlobStore::find_missing_and_touch`])
    /// answered from the existence cache alone, without blocking: `None` as soon as a digest
    /// needs the index (not cached, or present and due for an LRU update).
    pub fn find_missing_cached(&self, digests: &[Digest], touch: bool) -> Option<Vec<Digest>> {
        self.answer_from_memory(digests, &self.known_presence(digests), touch)
    }

    /// What the existence cache knows of each of `digests`, looked up once per FindMissing:
    /// async callers try [`BlobStore::answer_from_memory`] with it on their own thread, then
    /// hand it to [`BlobStore::answer_from_index`] on a blocking one when the index is needed.
    pub(crate) fn known_presence(&self, digests: &[Digest]) -> KnownPresence {
        KnownPresence(self.inner.presence.known_all(digests))
    }

    /// [`BlobStore::find_missing_cached`] from what the cache knew.
    pub(crate) fn answer_from_memory(
        &self,
        digests: &[Digest],
        known: &KnownPresence,
        touch: bool,
    ) -> Option<Vec<Digest>> {
        let now = if touch { now_millis() } else { 0 };
        let mut missing = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (digest, known) in digests.iter().zip(&known.0) {
            if digest.is_empty_blob() {
                continue;
            }
            match (*known)? {
                Some((size, access)) if size == digest.size => {
                    if touch && now.saturating_sub(access) >= ACCESS_GRANULARITY_MS {
                        return None;
                    }
                }
                _ => {
                    if seen.insert(*digest) {
                        missing.push(*digest);
                    }
                }
            }
        }
        Some(missing)
    }

    fn find_missing_at(&self, digests: &[Digest], touch_at: Option<u64>) -> Result<Vec<Digest>> {
        self.answer_from_index(digests, self.known_presence(digests), touch_at)
    }

    /// The whole answer from what the cache knew and, for the rest, the index (touching the
    /// present blobs due for it when `touch_at` is given).
    pub(crate) fn answer_from_index(
        &self,
        digests: &[Digest],
        known: KnownPresence,
        touch_at: Option<u64>,
    ) -> Result<Vec<Digest>> {
        let mut present = vec![false; digests.len()];
        let mut unknown = Vec::new();
        for (index, (digest, cached)) in digests.iter().zip(known.0).enumerate() {
            if digest.is_empty_blob() {
                present[index] = true;
                continue;
            }
            match cached {
                Some(Some((size, access))) => {
                    present[index] = size == digest.size;
                    if present[index]
                        && let Some(now) = touch_at
                        && now.saturating_sub(access) >= ACCESS_GRANULARITY_MS
                    {
                        self.touch_at(digest, now)?;
                    }
                }
                Some(None) => {}
                None => unknown.push((blob_key(digest), index)),
            }
        }
        // In key order: neighbouring keys share index pages.
        unknown.sort_unstable();
        let mut previous: Option<(BlobKey, Option<(u64, u64)>)> = None;
        for (key, index) in unknown {
            let entry = match previous {
                Some((seen, entry)) if seen == key => entry,
                _ => self.lookup(&key)?,
            };
            previous = Some((key, entry));
            present[index] = entry.is_some_and(|(size, _)| size == digests[index].size);
            if present[index]
                && let Some(now) = touch_at
            {
                self.touch_at(&digests[index], now)?;
            }
        }
        let mut seen = std::collections::HashSet::new();
        Ok(digests
            .iter()
            .zip(present)
            .filter(|(digest, present)| !present && seen.insert(**digest))
            .map(|(digest, _)| *digest)
            .collect())
    }

    /// The index entry (size, last access) of a blob, from the existence cache or the index
    /// (whose answer, present or absent, the cache then keeps).
    fn lookup(&self, key: &BlobKey) -> Result<Option<(u64, u64)>> {
        let mut shard = self.inner.presence.shard(key);
        if let Some(known) = shard.known(key) {
            return Ok(known);
        }
        let entry = self
            .inner
            .blobs
            .get(key)?
            .as_deref()
            .and_then(parse_index_value);
        match entry {
            Some(entry) => shard.remember(*key, entry),
            None => shard.remember_absent(*key),
        }
        Ok(entry)
    }

    /// [`BlobStore::find_missing`], then one `stat` per blob: an index entry whose file
    /// vanished behind the store's back is dropped and reported missing, a file whose index
    /// entry a crash lost is adopted. For promises a client acts on without asking again (an
    /// action-cache hit), not the hot path.
    pub fn find_missing_on_disk(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let mut missing = self.find_missing(digests)?;
        let mut adopted = Vec::new();
        for digest in &missing {
            if self.adopt_if_on_disk(digest)? {
                adopted.push(*digest);
            }
        }
        missing.retain(|d| !adopted.contains(d));
        let known_missing: std::collections::HashSet<Digest> = missing.iter().copied().collect();
        let mut seen = std::collections::HashSet::new();
        for digest in digests {
            if digest.is_empty_blob() || known_missing.contains(digest) || !seen.insert(*digest) {
                continue;
            }
            if fs::symlink_metadata(self.blob_path(digest)).is_err() {
                self.forget(digest)?;
                missing.push(*digest);
            }
        }
        Ok(missing)
    }

    /// Marks blobs as just used, so eviction keeps them. Missing blobs are ignored.
    pub fn touch(&self, digests: &[Digest]) -> Result<()> {
        let now = now_millis();
        for digest in digests {
            self.touch_at(digest, now)?;
        }
        Ok(())
    }

    fn touch_at(&self, digest: &Digest, now: u64) -> Result<()> {
        let key = blob_key(digest);
        let mut shard = self.inner.presence.shard(&key);
        let cached = shard.known(&key).flatten();
        // Recently touched (as the cache knows): nothing to read or write.
        if cached.is_some_and(|(_, access)| now.saturating_sub(access) < ACCESS_GRANULARITY_MS) {
            return Ok(());
        }
        let Some(value) = self.inner.blobs.get(key)? else {
            shard.remember_absent(key);
            return Ok(());
        };
        let Some((size, access)) = parse_index_value(&value) else {
            return Ok(());
        };
        if now.saturating_sub(access) < ACCESS_GRANULARITY_MS {
            shard.remember(key, (size, access));
            return Ok(());
        }
        // Removals take this shard's lock too, so the entry read above is still current.
        self.inner.blobs.insert(key, &index_value(size, now))?;
        self.inner.lru.remove(lru_key(access, &key))?;
        self.inner.lru.insert(lru_key(now, &key), &[])?;
        shard.remember(key, (size, now));
        Ok(())
    }

    /// Refuses a blob larger than the whole store (eviction could never make room for it).
    fn fits(&self, digest: &Digest) -> Result<()> {
        if digest.size > self.inner.config.max_bytes {
            return Err(CasError::QuotaExceeded(format!(
                "blob {digest:?} is larger than the store's capacity of {} bytes",
                self.inner.config.max_bytes
            )));
        }
        Ok(())
    }

    /// Starts writing a blob whose digest is known; the bytes are verified against it. A file
    /// a crash left unindexed at the blob's path is adopted (hashed) instead of uploaded again.
    pub fn writer(&self, expected: Digest) -> Result<BlobWriter> {
        self.fits(&expected)?;
        let present = self.contains(&expected)? || self.adopt_if_on_disk(&expected)?;
        BlobWriter::new(self.clone(), expected.function, Some(expected), present)
    }

    /// Indexes a blob whose file is in place but not indexed: a crash lost its entry, or a
    /// publish has placed it and not yet synced it. Files are placed before they are synced,
    /// so after a crash the right size is no proof of the right bytes: the file is
    /// hashed and made durable first. Called where a miss is about to cost a write, never on
    /// the FindMissing path.
    fn adopt_if_on_disk(&self, digest: &Digest) -> Result<bool> {
        let path = self.blob_path(digest);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() && meta.len() == digest.size => {}
            _ => return Ok(false),
        }
        if !hash_own_file(digest.function, &path).is_ok_and(|actual| actual == *digest) {
            // Left for the publish that follows, which replaces it.
            return Ok(false);
        }
        self.adopt(digest, &path)?;
        Ok(true)
    }

    /// Indexes a blob file found on disk and already hashed, once it is durable.
    fn adopt(&self, digest: &Digest, path: &Path) -> Result<()> {
        if self.inner.config.fsync {
            let parent = path.parent().expect("blob paths have a parent");
            sync_each(&[path], true)?;
            sync_each(&[parent], false)?;
        }
        self.index_insert(digest)
    }

    /// Starts writing a blob whose digest is computed from the bytes.
    pub fn writer_for(&self, function: DigestFunction) -> Result<BlobWriter> {
        BlobWriter::new(self.clone(), function, None, false)
    }

    /// Stores a buffer whose digest is known, verifying it.
    pub fn put_verified(&self, expected: Digest, bytes: &[u8]) -> Result<()> {
        let mut writer = self.writer(expected)?;
        writer.write_chunk(bytes)?;
        writer.commit().map(|_| ())
    }

    /// Stores a buffer and returns its digest.
    pub fn put_bytes(&self, function: DigestFunction, bytes: &[u8]) -> Result<Digest> {
        let digest = function.digest_of(bytes);
        let mut writer = self.writer(digest)?;
        // The digest was just computed from these bytes: hashing them again proves nothing.
        writer.hasher = None;
        writer.write_chunk(bytes)?;
        writer.commit()
    }

    /// Copies a file into the store and returns its digest.
    ///
    /// The copy is made first (in the kernel: `copy_file_range`) and the digest is taken of
    /// that private copy, on all cores for large BLAKE3 files: it names exactly the bytes
    /// stored even if the source changes meanwhile. A blob already present is not stored again.
    pub fn put_file(&self, function: DigestFunction, path: &Path) -> Result<Digest> {
        let mut source = File::open(path).map_err(|e| CasError::io("opening", path, e))?;
        self.put_open_file(function, &mut source, path)
    }

    /// [`BlobStore::put_file`] for a file the caller opened (and checked) itself; `path` only
    /// names it in errors.
    pub fn put_open_file(
        &self,
        function: DigestFunction,
        source: &mut File,
        path: &Path,
    ) -> Result<Digest> {
        let staged = self.stage_open_file(function, source, path)?;
        self.publish(vec![staged])
            .pop()
            .expect("one result per staged blob")
    }

    /// Copies an open file into a temporary of the store and hashes it: a [`StagedBlob`] to
    /// [`BlobStore::publish`] with others (an action's outputs made durable together). A blob
    /// the store already holds is touched and staged as present.
    pub fn stage_open_file(
        &self,
        function: DigestFunction,
        source: &mut File,
        path: &Path,
    ) -> Result<StagedBlob> {
        let tmp = &self.inner.temporaries.dir;
        let mut copy = new_temp(tmp)?;
        let size =
            io::copy(source, copy.as_file_mut()).map_err(|e| CasError::io("copying", path, e))?;
        let digest = hash_own_file(function, copy.path())?;
        if self.contains(&digest)? {
            self.touch_at(&digest, now_millis())?;
            return Ok(StagedBlob { digest, temp: None });
        }
        BlobWriter {
            store: self.clone(),
            expected: Some(digest),
            // The digest was just computed from the stored copy itself.
            hasher: None,
            file: Some(copy),
            received: size,
            early_sync: None,
        }
        .stage()
    }

    /// Stores a file whose digest is already known (e.g. from a stat cache) without re-hashing
    /// when the blob is present; otherwise copies and verifies it.
    pub fn put_file_as(&self, expected: Digest, path: &Path) -> Result<()> {
        if self.contains(&expected)? {
            return Ok(());
        }
        let mut file = File::open(path).map_err(|e| CasError::io("opening", path, e))?;
        let mut writer = self.writer(expected)?;
        copy_into(&mut file, path, &mut writer)?;
        writer.commit().map(|_| ())
    }

    /// Opens a blob for reading from `offset`, at most `limit` bytes (0 = to the end).
    ///
    /// The reader pins the blob against eviction until dropped.
    pub fn reader(&self, digest: &Digest, offset: u64, limit: u64) -> Result<BlobReader> {
        if offset > digest.size {
            return Err(CasError::OffsetOutOfRange {
                digest: *digest,
                offset,
            });
        }
        let remaining = digest.size - offset;
        let length = if limit == 0 {
            remaining
        } else {
            limit.min(remaining)
        };
        if digest.is_empty_blob() {
            return Ok(BlobReader {
                source: ReaderSource::Empty,
                _pin: None,
                remaining: 0,
            });
        }
        let pin = self.pin(digest);
        let (mut file, path) = self.open_present(digest)?;
        if offset > 0 {
            file.seek(SeekFrom::Start(offset))
                .map_err(|e| CasError::io("seeking", &path, e))?;
        }
        self.touch_at(digest, now_millis())?;
        Ok(BlobReader {
            source: ReaderSource::File(file),
            _pin: Some(pin),
            remaining: length,
        })
    }

    /// A present blob's file, opened for reading: for readers that must seek (a zip's central
    /// directory). The open file stays readable when the blob is evicted afterwards.
    pub fn open_file(&self, digest: &Digest) -> Result<File> {
        let _pin = self.pin(digest);
        self.open_present(digest).map(|(file, _)| file)
    }

    /// Opens the file of a blob the index holds; a file gone behind the index's back is
    /// forgotten and reported missing.
    fn open_present(&self, digest: &Digest) -> Result<(File, PathBuf)> {
        if !self.contains(digest)? {
            return Err(CasError::NotFound(*digest));
        }
        let path = self.blob_path(digest);
        match File::open(&path) {
            Ok(file) => Ok((file, path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget(digest)?;
                Err(CasError::NotFound(*digest))
            }
            Err(e) => Err(CasError::io("opening", path, e)),
        }
    }

    /// Reads a whole blob into memory, refusing blobs larger than `max_size`.
    pub fn read_to_vec(&self, digest: &Digest, max_size: u64) -> Result<Vec<u8>> {
        if digest.size > max_size {
            return Err(CasError::QuotaExceeded(format!(
                "blob {digest:?} is larger than the {max_size} bytes allowed here"
            )));
        }
        let mut buffer = Vec::with_capacity(digest.size as usize);
        self.reader(digest, 0, 0)?
            .read_to_end(&mut buffer)
            .map_err(|e| CasError::io("reading", self.blob_path(digest), e))?;
        if buffer.len() as u64 != digest.size {
            return Err(CasError::SizeMismatch {
                expected: *digest,
                actual: buffer.len() as u64,
            });
        }
        Ok(buffer)
    }

    /// Pins a blob against eviction for as long as the guard lives.
    pub fn pin(&self, digest: &Digest) -> PinGuard {
        let key = blob_key(digest);
        *self.inner.pins.lock().entry(key).or_insert(0) += 1;
        PinGuard {
            store: self.clone(),
            key,
        }
    }

    /// Counters for metrics.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            total_bytes: self.inner.total_bytes.load(Ordering::Relaxed),
            blob_count: self.inner.blob_count.load(Ordering::Relaxed),
            evictions: self.inner.evictions.load(Ordering::Relaxed),
            evicted_bytes: self.inner.evicted_bytes.load(Ordering::Relaxed),
        }
    }

    /// Flushes the index to disk (it also flushes itself periodically and on drop).
    pub fn flush(&self) -> Result<()> {
        self.inner.persist_totals()?;
        self.inner.db.flush()?;
        Ok(())
    }

    fn index_insert(&self, digest: &Digest) -> Result<()> {
        let key = blob_key(digest);
        let now = now_millis();
        let mut shard = self.inner.presence.shard(&key);
        let previous = self
            .inner
            .blobs
            .insert(key, &index_value(digest.size, now))?;
        match previous.as_deref().and_then(parse_index_value) {
            Some((_, access)) => {
                self.inner.lru.remove(lru_key(access, &key))?;
            }
            None => self.add_total(digest.size as i64, 1)?,
        }
        self.inner.lru.insert(lru_key(now, &key), &[])?;
        shard.remember(key, (digest.size, now));
        Ok(())
    }

    /// Drops a blob from the index (its file is already gone or about to be).
    fn forget(&self, digest: &Digest) -> Result<bool> {
        let key = blob_key(digest);
        let mut shard = self.inner.presence.shard(&key);
        shard.remember_absent(key);
        match self
            .inner
            .blobs
            .remove(key)?
            .as_deref()
            .and_then(parse_index_value)
        {
            Some((size, access)) => {
                self.inner.lru.remove(lru_key(access, &key))?;
                self.add_total(-(size as i64), -1)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Adjusts the running byte total and blob count (kept in the index's meta tree, so
    /// neither startup nor [`BlobStore::stats`] scans the index; written at most once per
    /// [`TOTALS_PERSIST_MS`], not once per blob).
    fn add_total(&self, bytes: i64, blobs: i64) -> Result<()> {
        adjust(&self.inner.total_bytes, bytes);
        adjust(&self.inner.blob_count, blobs);
        let now = now_millis();
        let last = self.inner.totals_persisted_at.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= TOTALS_PERSIST_MS
            && self
                .inner
                .totals_persisted_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.inner.persist_totals()?;
        }
        Ok(())
    }

    /// Evicts least-recently-used, unpinned blobs while the store is above its cap, down to the
    /// low watermark. Returns the number of blobs evicted.
    pub fn evict_if_needed(&self) -> Result<u64> {
        let config = &self.inner.config;
        if self.inner.total_bytes.load(Ordering::SeqCst) <= config.max_bytes {
            return Ok(0);
        }
        let target = (config.max_bytes as f64 * config.low_watermark.clamp(0.0, 1.0)) as u64;
        self.evict_down_to(target)
    }

    /// Evicts least-recently-used, unpinned blobs until at most `target` bytes remain.
    pub fn evict_down_to(&self, target: u64) -> Result<u64> {
        let _only_one_evictor = self.inner.evict_lock.lock();
        let mut evicted = 0;
        for entry in self.inner.lru.iter() {
            if self.inner.total_bytes.load(Ordering::SeqCst) <= target {
                break;
            }
            let (lru, _) = entry?;
            let Ok(key) = BlobKey::try_from(&lru[8..]) else {
                continue;
            };
            if self.inner.pins.lock().contains_key(&key) {
                continue;
            }
            let Some(value) = self.inner.blobs.get(key)? else {
                self.inner.lru.remove(&lru)?;
                continue;
            };
            let Some(digest) =
                parse_index_value(&value).and_then(|(size, _)| digest_from_key(&key, size))
            else {
                continue;
            };
            // Remove from the index first: a reader that races us then sees "missing", never a
            // half-deleted blob.
            if self.forget(&digest)? {
                let path = self.blob_path(&digest);
                if let Err(e) = fs::remove_file(&path)
                    && e.kind() != io::ErrorKind::NotFound
                {
                    return Err(CasError::io("evicting", path, e));
                }
                evicted += 1;
                self.inner.evictions.fetch_add(1, Ordering::Relaxed);
                self.inner
                    .evicted_bytes
                    .fetch_add(digest.size, Ordering::Relaxed);
            }
        }
        if evicted > 0 {
            tracing::info!(
                evicted,
                total_bytes = self.inner.total_bytes.load(Ordering::SeqCst),
                "evicted blobs"
            );
        }
        Ok(evicted)
    }

    /// Re-hashes one blob (e.g. after a reader found bytes that do not match its digest): if
    /// they no longer match, the blob's file and index entry are removed, so the next put of
    /// those bytes stores them again. Returns true when it was corrupt (false when intact or
    /// absent).
    pub fn remove_if_corrupt(&self, digest: &Digest) -> Result<bool> {
        let path = self.blob_path(digest);
        if digest.is_empty_blob() || !path.exists() {
            return Ok(false);
        }
        if hash_own_file(digest.function, &path)? == *digest {
            return Ok(false);
        }
        self.forget(digest)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(CasError::io("removing corrupt", &path, e)),
        }
    }

    /// Re-hashes every blob on disk: removes corrupt blobs, unfinished writes and index entries
    /// whose file is gone, indexes files the index lost, and recomputes the byte total. For a
    /// store with no writes in flight (`rba verify` holds the data dir): a blob being written
    /// in place would count as unfinished.
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let mut on_disk = std::collections::HashSet::new();
        for function in DigestFunction::ALL {
            let dir = self.inner.root.join("blobs").join(function.name());
            for entry in walk_files(&dir)? {
                let Some(name) = entry.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                // Only regular files are blobs: anything else (a link planted in the data dir)
                // is removed as itself, never followed, hashed or adopted.
                let Ok(meta) = fs::symlink_metadata(&entry) else {
                    continue;
                };
                if !meta.is_file() {
                    let _ = fs::remove_file(&entry);
                    continue;
                }
                let size = meta.len();
                let Ok(claimed) = Digest::from_hex(function, name, size as i64) else {
                    let _ = fs::remove_file(&entry);
                    continue;
                };
                let actual = hash_own_file(function, &entry)?;
                if actual != claimed {
                    let indexed = self.forget(&claimed)?;
                    fs::remove_file(&entry)
                        .map_err(|e| CasError::io("removing corrupt", &entry, e))?;
                    if indexed {
                        report.corrupt.push(claimed);
                    } else {
                        report.unfinished += 1;
                    }
                    continue;
                }
                if self.inner.blobs.get(blob_key(&claimed))?.is_none() {
                    self.adopt(&claimed, &entry)?;
                    report.adopted += 1;
                }
                on_disk.insert(blob_key(&claimed));
                report.intact += 1;
            }
        }
        let mut total = 0u64;
        let mut count = 0u64;
        for entry in self.inner.blobs.iter() {
            let (key, value) = entry?;
            let Some((size, _)) = parse_index_value(&value) else {
                continue;
            };
            let Ok(key) = BlobKey::try_from(key.as_ref()) else {
                continue;
            };
            if on_disk.contains(&key) {
                total += size;
                count += 1;
            } else if let Some(digest) = digest_from_key(&key, size) {
                self.forget(&digest)?;
                report.missing.push(digest);
            }
        }
        self.inner.total_bytes.store(total, Ordering::SeqCst);
        self.inner.blob_count.store(count, Ordering::SeqCst);
        self.inner
            .meta
            .insert(TOTAL_BYTES_KEY, &total.to_be_bytes())?;
        self.inner
            .meta
            .insert(BLOB_COUNT_KEY, &count.to_be_bytes())?;
        self.flush()?;
        Ok(report)
    }
}

/// The data dir's lock, held (flock) while a process has the store open. sled allows one
/// process per database: this lock makes a second process wait instead of failing.
struct RootLock {
    _file: File,
    _open_here: OpenHere,
}

/// Registers a root as open in this process: a second open of it in the same process would
/// wait for itself, so it fails instead.
struct OpenHere(PathBuf);

fn roots_open_here() -> &'static Mutex<std::collections::HashSet<PathBuf>> {
    static ROOTS: std::sync::OnceLock<Mutex<std::collections::HashSet<PathBuf>>> =
        std::sync::OnceLock::new();
    ROOTS.get_or_init(Default::default)
}

impl OpenHere {
    fn register(root: &Path) -> Result<Self> {
        let root = fs::canonicalize(root).map_err(|e| CasError::io("resolving", root, e))?;
        if !roots_open_here().lock().insert(root.clone()) {
            return Err(CasError::Invalid {
                what: format!("store {}", root.display()),
                reason: "it is already open in this process; share the open store".into(),
            });
        }
        Ok(OpenHere(root))
    }
}

impl Drop for OpenHere {
    fn drop(&mut self) {
        roots_open_here().lock().remove(&self.0);
    }
}

impl RootLock {
    fn acquire(root: &Path) -> Result<Self> {
        use rustix::fs::{FlockOperation, flock};
        let open_here = OpenHere::register(root)?;
        let path = root.join("lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| CasError::io("opening", &path, e))?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                // Only a number is shown: the file is the data dir's, not to be echoed as is.
                let holder = fs::read_to_string(&path)
                    .ok()
                    .and_then(|text| text.trim().parse::<u32>().ok())
                    .map_or_else(|| "?".to_string(), |pid| pid.to_string());
                eprintln!("rba: blocking waiting for the data dir lock held by pid {holder}");
                flock(&file, FlockOperation::LockExclusive)
                    .map_err(|e| CasError::io("locking", &path, e.into()))?;
            }
            Err(e) => return Err(CasError::io("locking", &path, e.into())),
        }
        file.set_len(0)
            .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
            .map_err(|e| CasError::io("writing", &path, e))?;
        Ok(RootLock {
            _file: file,
            _open_here: open_here,
        })
    }
}

/// This process's directory of temporaries, `tmp/<pid>-<nanos>/`, flock'd through its `.lock`
/// for the store's lifetime and removed when the store closes.
struct ProcessTemp {
    dir: PathBuf,
    _lock: File,
}

const TEMP_LOCK_NAME: &str = ".lock";

impl ProcessTemp {
    /// Removes the temporaries of processes that are gone (their `.lock` is free, or they
    /// predate per-process directories) and creates this process's directory.
    fn create(tmp: &Path) -> Result<Self> {
        use rustix::fs::{FlockOperation, flock};
        fs::create_dir_all(tmp).map_err(|e| CasError::io("creating", tmp, e))?;
        for entry in fs::read_dir(tmp).map_err(|e| CasError::io("listing", tmp, e))? {
            let path = entry.map_err(|e| CasError::io("listing", tmp, e))?.path();
            // Never followed: a link here is removed as a link, whatever it points to.
            if !fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                // A write of a version that kept temporaries directly in `tmp/`.
                let _ = fs::remove_file(&path);
                continue;
            }
            let owner_alive = File::open(path.join(TEMP_LOCK_NAME))
                .ok()
                .is_some_and(|lock| flock(&lock, FlockOperation::NonBlockingLockShared).is_err());
            if !owner_alive
                && let Err(e) = fs::remove_dir_all(&path)
                && e.kind() != io::ErrorKind::NotFound
            {
                return Err(CasError::io("removing abandoned writes in", path, e));
            }
        }
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = tmp.join(format!("{}-{nanos}", std::process::id()));
        fs::create_dir(&dir).map_err(|e| CasError::io("creating", &dir, e))?;
        let lock_path = dir.join(TEMP_LOCK_NAME);
        let lock = File::create(&lock_path).map_err(|e| CasError::io("creating", &lock_path, e))?;
        flock(&lock, FlockOperation::NonBlockingLockExclusive)
            .map_err(|e| CasError::io("locking", &lock_path, e.into()))?;
        Ok(ProcessTemp { dir, _lock: lock })
    }
}

impl Drop for ProcessTemp {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Opens a sled database (this store's index, or an [`EmbeddedBlobIndex`]'s). A previous
/// owner's lock on it outlives the owner by a moment (its flusher thread finishing, even in this
/// process): a lock error is retried for up to 5 s, so a database still held after that is
/// another owner's, and the error says so.
///
/// [`EmbeddedBlobIndex`]: crate::backends::embedded_index::EmbeddedBlobIndex
pub(crate) fn open_sled(path: &Path) -> sled::Result<sled::Db> {
    let mut attempts = 0;
    loop {
        match sled::Config::new().path(path).open() {
            Err(sled::Error::Io(e))
                if attempts < 200 && e.to_string().contains("could not acquire lock") =>
            {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(25));
            }
            other => return other,
        }
    }
}

/// Adds `delta` to a counter (never below zero) and returns the new value.
fn adjust(counter: &AtomicU64, delta: i64) -> u64 {
    let amount = delta.unsigned_abs();
    let apply = |value: u64| {
        if delta >= 0 {
            value.saturating_add(amount)
        } else {
            value.saturating_sub(amount)
        }
    };
    let previous = counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| Some(apply(v)))
        .unwrap_or(0);
    apply(previous)
}

fn walk_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(CasError::io("listing", dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| CasError::io("listing", &dir, e))?;
            let path = entry.path();
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    Ok(files)
}

/// BLAKE3 files at least this large are hashed memory-mapped on all cores.
const PARALLEL_HASH_MIN_BYTES: u64 = 1 << 20;

/// Hashes a file that only the store writes (a blob, a private temp copy): large BLAKE3 files
/// are memory-mapped and hashed on all cores. Not for files others may truncate meanwhile: a
/// mapped file that shrinks faults the process.
fn hash_own_file(function: DigestFunction, path: &Path) -> Result<Digest> {
    if function == DigestFunction::Blake3 {
        let size = fs::metadata(path)
            .map_err(|e| CasError::io("reading metadata of", path, e))?
            .len();
        if size >= PARALLEL_HASH_MIN_BYTES {
            let mut hasher = blake3::Hasher::new();
            hasher
                .update_mmap_rayon(path)
                .map_err(|e| CasError::io("hashing", path, e))?;
            return Ok(Digest {
                function,
                hash: *hasher.finalize().as_bytes(),
                size,
            });
        }
    }
    hash_file(function, path)
}

/// Hashes a file's contents by streaming it.
pub fn hash_file(function: DigestFunction, path: &Path) -> Result<Digest> {
    let mut file = File::open(path).map_err(|e| CasError::io("opening", path, e))?;
    let mut hasher = function.hasher();
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let n = file
            .read(&mut buffer)
            .map_err(|e| CasError::io("reading", path, e))?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buffer[..n]);
    }
}

fn copy_into(source: &mut impl Read, path: &Path, writer: &mut BlobWriter) -> Result<()> {
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let n = source
            .read(&mut buffer)
            .map_err(|e| CasError::io("reading", path, e))?;
        if n == 0 {
            return Ok(());
        }
        writer.write_chunk(&buffer[..n])?;
    }
}

/// A new temporary for a blob's bytes, created read-only (`0o444`; this process writes it
/// through the descriptor it opened): blobs are read-only because materialisation hard-links
/// them into exec roots, where a writable file would let an action corrupt the store. Made so
/// at creation, a published blob costs no `chmod`.
fn new_temp(dir: &Path) -> Result<NamedTempFile> {
    tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o444))
        .tempfile_in(dir)
        .map_err(|e| CasError::io("creating temp file in", dir, e))
}

/// Keeps a blob from being evicted while it lives.
pub struct PinGuard {
    store: BlobStore,
    key: BlobKey,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let mut pins = self.store.inner.pins.lock();
        if let Some(count) = pins.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                pins.remove(&self.key);
            }
        }
    }
}

enum ReaderSource {
    Empty,
    File(File),
}

/// Streams a blob (or a range of it). Pins the blob while alive.
pub struct BlobReader {
    source: ReaderSource,
    _pin: Option<PinGuard>,
    remaining: u64,
}

impl BlobReader {
    /// Bytes left to read.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// The next `max` bytes (fewer only at the end) as one buffer of their own, read in as few
    /// `read` calls as the kernel allows (usually one): what large streamed reads hand on as a
    /// chunk without copying it again. A chunk of a large read lives in a
    /// `read_buffers` buffer, reused once every slice of it is dropped.
    pub fn read_chunk(&mut self, max: usize) -> io::Result<Bytes> {
        let size = self.remaining.min(max as u64) as usize;
        let source = &mut self.source;
        let chunk = READ_BUFFERS.filled(size, |buffer| {
            let mut filled = 0;
            if let ReaderSource::File(file) = source {
                while filled < buffer.len() {
                    match file.read(&mut buffer[filled..]) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok(filled)
        })?;
        self.remaining -= chunk.len() as u64;
        if chunk.len() < size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "blob shorter than its digest says",
            ));
        }
        Ok(chunk)
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let max = buf
            .len()
            .min(self.remaining.min(usize::MAX as u64) as usize);
        let n = match &mut self.source {
            ReaderSource::Empty => 0,
            ReaderSource::File(file) => file.read(&mut buf[..max])?,
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "blob shorter than its digest says",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Writes one blob: streams into a temp file while hashing, then verifies and publishes it.
///
/// Dropping a writer without [`BlobWriter::commit`] discards everything written.
pub struct BlobWriter {
    store: BlobStore,
    expected: Option<Digest>,
    /// `None` when the store computed `expected` from these very bytes (`put_bytes`).
    hasher: Option<Hasher>,
    /// `None` when the blob is already present: bytes are only counted.
    file: Option<NamedTempFile>,
    received: u64,
    /// Syncs a large blob while it is written (started once it passes [`EARLY_SYNC_BYTES`]).
    early_sync: Option<EarlySync>,
}

/// A large blob is made durable while it is written: each time another this many bytes are
/// in, a helper thread `fdatasync`s what is there (skipped while the previous sync runs), so
/// the disk writes while the network delivers and the sync at publish only waits for the
/// tail. A streamed multi-GiB upload then costs about its transfer, not transfer + flush.
const EARLY_SYNC_BYTES: u64 = if cfg!(test) { 1 << 20 } else { 32 << 20 };

/// The helper thread of one writer, and the first error it met (kept: once reported to one
/// `fdatasync`, a write-back error is not reported again to the later sync of the publish).
struct EarlySync {
    wake: std::sync::mpsc::SyncSender<()>,
    thread: std::thread::JoinHandle<io::Result<()>>,
}

impl EarlySync {
    fn start(file: &File) -> Option<Self> {
        let file = file.try_clone().ok()?;
        let (wake, woken) = std::sync::mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("rba-blob-sync".into())
            .spawn(move || {
                while woken.recv().is_ok() {
                    file.sync_data()?;
                }
                Ok(())
            })
            .ok()?;
        Some(EarlySync { wake, thread })
    }

    /// Asks for a sync; none is queued behind one already running.
    fn nudge(&self) {
        let _ = self.wake.try_send(());
    }

    /// Waits for the sync in progress; its error, if any sync failed.
    fn finish(self) -> io::Result<()> {
        drop(self.wake);
        self.thread
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the blob sync thread panicked")))
    }
}

impl BlobWriter {
    fn new(
        store: BlobStore,
        function: DigestFunction,
        expected: Option<Digest>,
        present: bool,
    ) -> Result<Self> {
        let file = if present {
            None
        } else {
            let tmp = &store.inner.temporaries.dir;
            Some(new_temp(tmp)?)
        };
        Ok(BlobWriter {
            store,
            expected,
            hasher: Some(function.hasher()),
            file,
            received: 0,
            early_sync: None,
        })
    }

    /// True when the blob was already stored: writing is then only counted, not hashed.
    pub fn already_present(&self) -> bool {
        self.file.is_none()
    }

    /// Bytes received so far.
    pub fn written(&self) -> u64 {
        self.received
    }

    /// Appends bytes. Fails as soon as more bytes arrive than the expected digest's size.
    pub fn write_chunk(&mut self, bytes: &[u8]) -> Result<()> {
        let after = self.received + bytes.len() as u64;
        if let Some(expected) = self.expected
            && after > expected.size
        {
            return Err(CasError::SizeMismatch {
                expected,
                actual: after,
            });
        }
        // Present already (no file): only count, so the size check still holds.
        if let Some(file) = &mut self.file {
            if let Some(hasher) = &mut self.hasher {
                hasher.update(bytes);
            }
            file.write_all(bytes)
                .map_err(|e| CasError::io("writing", file.path(), e))?;
            if self.store.inner.config.fsync
                && after / EARLY_SYNC_BYTES > self.received / EARLY_SYNC_BYTES
            {
                if self.early_sync.is_none() {
                    self.early_sync = EarlySync::start(file.as_file());
                }
                if let Some(early) = &self.early_sync {
                    early.nudge();
                }
            }
        }
        self.received = after;
        Ok(())
    }

    /// Verifies size and hash, makes the blob durable and visible, and returns its digest.
    pub fn commit(self) -> Result<Digest> {
        let store = self.store.clone();
        let staged = self.stage()?;
        store
            .publish(vec![staged])
            .pop()
            .expect("one result per staged blob")
    }

    /// Verifies size and hash and closes the temp file: the blob is complete but neither
    /// durable nor visible until [`BlobStore::publish`] (which makes a batch durable at once).
    /// Dropping the staged blob discards it.
    pub fn stage(self) -> Result<StagedBlob> {
        let written = self.received;
        if let Some(early) = self.early_sync
            && let Err(e) = early.finish()
        {
            let path = self.file.as_ref().map(|f| f.path().to_path_buf());
            return Err(CasError::io("syncing", path.unwrap_or_default(), e));
        }
        let Some(file) = self.file else {
            let expected = self
                .expected
                .expect("present blobs always have an expected digest");
            if written != expected.size {
                return Err(CasError::SizeMismatch {
                    expected,
                    actual: written,
                });
            }
            return Ok(StagedBlob {
                digest: expected,
                temp: None,
            });
        };
        let actual = match (self.hasher, self.expected) {
            (Some(hasher), _) => hasher.finish(),
            (None, Some(expected)) => Digest {
                size: written,
                ..expected
            },
            (None, None) => unreachable!("unhashed writers always have an expected digest"),
        };
        if let Some(expected) = self.expected {
            if actual.size != expected.size {
                return Err(CasError::SizeMismatch {
                    expected,
                    actual: actual.size,
                });
            }
            if actual != expected {
                return Err(CasError::HashMismatch { expected, actual });
            }
        }
        self.store.fits(&actual)?;
        // Created read-only ([`new_temp`]): nothing to change before it is published.
        Ok(StagedBlob {
            digest: actual,
            temp: Some(file.into_temp_path()),
        })
    }
}

/// A blob written and verified, waiting in the process's temp directory for
/// [`BlobStore::publish`]. Holds no open file, so a large batch costs no descriptors.
pub struct StagedBlob {
    digest: Digest,
    /// `None` when the blob was already present: publishing it only confirms it.
    temp: Option<tempfile::TempPath>,
}

impl StagedBlob {
    /// The verified digest.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// True when the store held the blob already (nothing to publish).
    pub fn already_present(&self) -> bool {
        self.temp.is_none()
    }
}

impl std::fmt::Debug for StagedBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedBlob")
            .field("digest", &self.digest)
            .field("already_present", &self.already_present())
            .finish()
    }
}

/// Up to this many files (and directories) a publish syncs one by one, in parallel, so that
/// the kernel's journal commits them together; more, and one `syncfs(2)` is cheaper. A small
/// batch (an action's outputs, a few uploads) never waits for the rest of the filesystem's
/// dirty data (the target dir cargo just wrote, other processes' files), which `syncfs` would.
const SMALL_BATCH: usize = 64;

/// The outcome of creating a blob's file at `path` (`first`). When that failed because the
/// shard directory is missing (`missing`: the shard's first blob), the directory is created and
/// the creation tried again (`retry`, given the first error). Also returns the directories a
/// durable blob needs synced: its own, and the parent of a shard directory made here.
fn in_shard_dir<T, E>(
    path: &Path,
    first: std::result::Result<T, E>,
    missing: impl Fn(&E) -> bool,
    retry: impl FnOnce(E) -> std::result::Result<T, E>,
) -> Result<(std::result::Result<T, E>, Vec<PathBuf>)> {
    let parent = path.parent().expect("blob paths have a parent");
    let mut dirs = vec![parent.to_path_buf()];
    let outcome = match first {
        Err(e) if missing(&e) => {
            fs::create_dir_all(parent).map_err(|e| CasError::io("creating", parent, e))?;
            dirs.extend(parent.parent().map(Path::to_path_buf));
            retry(e)
        }
        other => other,
    };
    Ok((outcome, dirs))
}

/// `fdatasync` (`data_only`) or `fsync` of every path, in parallel.
fn sync_each(paths: &[&Path], data_only: bool) -> Result<()> {
    use rayon::prelude::*;
    paths.par_iter().try_for_each(|path| {
        File::open(path)
            .and_then(|f| {
                if data_only {
                    f.sync_data()
                } else {
                    f.sync_all()
                }
            })
            .map_err(|e| CasError::io("syncing", path.to_path_buf(), e))
    })
}

impl BlobStore {
    /// Stores many small buffers as one group commit. Each is verified against its digest
    /// (present or not) and, when absent, written straight to its blob's path (`O_EXCL`: never over a file; no temporary, no
    /// rename), in parallel; then one sync makes the batch durable and the index lists it
    /// ([`BlobStore::publish`]'s second half). One result per blob, in order; a blob whose
    /// bytes do not match its digest fails alone.
    ///
    /// A crash mid-batch may leave short files at blob paths, unindexed: what a crash before a
    /// publish's sync leaves too, and handled the same way (nothing trusts such a file
    /// unhashed; [`BlobStore::verify`] removes it).
    pub fn put_batch(&self, blobs: Vec<(Digest, bytes::Bytes)>) -> Vec<Result<()>> {
        use rayon::prelude::*;
        let placed: Vec<Result<Placement>> = blobs
            .into_par_iter()
            .map(|(digest, bytes)| self.write_in_place(digest, bytes))
            .collect();
        self.make_durable_and_index(placed)
            .into_iter()
            .map(|result| result.map(|_| ()))
            .collect()
    }

    /// Verifies an in-memory blob and, unless the index lists it, writes it to its path.
    fn write_in_place(&self, expected: Digest, bytes: bytes::Bytes) -> Result<Placement> {
        self.fits(&expected)?;
        if bytes.len() as u64 != expected.size {
            return Err(CasError::SizeMismatch {
                expected,
                actual: bytes.len() as u64,
            });
        }
        // Hashed even when present: a success tells the caller (who may grant the blob on
        // it) that these bytes are the blob, whoever stored it first and when.
        let actual = expected.function.digest_of(&bytes);
        if actual != expected {
            return Err(CasError::HashMismatch { expected, actual });
        }
        if self.contains(&expected)? {
            return Ok(Placement::present(expected));
        }
        let path = self.blob_path(&expected);
        let create = || {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o444)
                .open(&path)
        };
        let (created, dirs) = in_shard_dir(
            &path,
            create(),
            |e| e.kind() == io::ErrorKind::NotFound,
            |_| create(),
        )?;
        let mut file = match created {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Ok(Placement::placed(
                    expected,
                    path,
                    dirs,
                    Some(Ours::Bytes(bytes)),
                ));
            }
            Err(e) => return Err(CasError::io("creating", &path, e)),
        };
        if let Err(e) = file.write_all(&bytes) {
            // Ours (`O_EXCL`), unindexed: removed, so no short file is left behind.
            let _ = fs::remove_file(&path);
            return Err(CasError::io("writing", &path, e));
        }
        Ok(Placement::placed(expected, path, dirs, None))
    }

    /// Publishes staged blobs together (group commit): each is renamed into place (never over
    /// a file), one sync makes all their bytes and names durable, and only then does the index
    /// list them. Up to [`SMALL_BATCH`] blobs the sync is their own `fdatasync`s and their
    /// directories' `fsync`s, issued in parallel; with more, one `syncfs(2)` of the store's
    /// filesystem, whatever the count. Returns one result per blob, in order.
    ///
    /// A crash before the sync may leave a renamed file whose bytes the disk never got (zeros,
    /// a short file) at a blob's path, unindexed and so invisible. Nothing trusts such a file
    /// unhashed: adoption ([`BlobStore::verify`], a writer finding the file) hashes and syncs
    /// it first, and a publish that finds its path taken hashes what is there after its sync
    /// and replaces it (synced first, the old way) unless it is the very blob.
    pub fn publish(&self, staged: Vec<StagedBlob>) -> Vec<Result<Digest>> {
        let placed = staged
            .into_iter()
            .map(|blob| match blob.temp {
                None => Ok(Placement::present(blob.digest)),
                Some(temp) => self.place(blob.digest, temp),
            })
            .collect();
        self.make_durable_and_index(placed)
    }

    /// The second half of a group commit: one sync for every blob placed (bytes and names),
    /// then the taken paths settled ([`BlobStore::keep_or_replace`]), then the index.
    fn make_durable_and_index(&self, placed: Vec<Result<Placement>>) -> Vec<Result<Digest>> {
        let fsync = self.inner.config.fsync;
        let mut files: Vec<&Path> = Vec::new();
        let mut dirs: Vec<&Path> = Vec::new();
        for placement in placed.iter().flatten() {
            if let Some(path) = &placement.path {
                files.push(path);
                dirs.extend(placement.dirs.iter().map(PathBuf::as_path));
            }
        }
        if fsync && !files.is_empty() {
            dirs.sort();
            dirs.dedup();
            let synced = if files.len() <= SMALL_BATCH {
                let (files, dirs) =
                    rayon::join(|| sync_each(&files, true), || sync_each(&dirs, false));
                files.and(dirs)
            } else {
                self.sync_filesystem()
            };
            if let Err(e) = synced {
                // Placed but not known durable: not indexed, so invisible (adoption hashes).
                let message = e.to_string();
                return placed
                    .into_iter()
                    .map(|placement| {
                        placement.and_then(|placement| match placement.path {
                            None => Ok(placement.digest),
                            Some(_) => Err(CasError::io(
                                "making a batch durable in",
                                self.root().to_path_buf(),
                                io::Error::other(message.clone()),
                            )),
                        })
                    })
                    .collect();
            }
        }
        let results: Vec<Result<Digest>> = placed
            .into_iter()
            .map(|placement| {
                let placement = placement?;
                if let Some(ours) = placement.taken {
                    self.keep_or_replace(&placement.digest, ours)?;
                }
                self.index_insert(&placement.digest)?;
                Ok(placement.digest)
            })
            .collect();
        if let Err(e) = self.evict_if_needed() {
            tracing::warn!(error = %e, "eviction after a publish failed");
        }
        results
    }

    /// Renames a verified temporary to a blob's path unless a file is there already
    /// (`RENAME_NOREPLACE`: an indexed blob's file is never replaced by bytes not yet durable).
    /// A taken path keeps the temporary, to settle after the sync, unless the index lists the
    /// blob. The blob's directory (and a new shard directory's parent) is synced with the rest.
    fn place(&self, digest: Digest, temp: tempfile::TempPath) -> Result<Placement> {
        let path = self.blob_path(&digest);
        let (renamed, dirs) = in_shard_dir(
            &path,
            temp.persist_noclobber(&path),
            |e| e.error.kind() == io::ErrorKind::NotFound,
            |e| e.path.persist_noclobber(&path),
        )?;
        let taken = match renamed {
            Ok(_) => None,
            Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => {
                // The name may be another publish's, not yet durable: synced here too.
                (!self.contains(&digest)?).then_some(Ours::Temp(e.path))
            }
            Err(e) => return Err(CasError::io("publishing", &path, e.error)),
        };
        Ok(Placement::placed(digest, path, dirs, taken))
    }

    /// A blob's path held a file the index does not list: another publish of the same blob
    /// between its placement and its index entry (perhaps still writing it), or a crash's
    /// leftover. Called after a sync that began once the file was seen. Kept if it hashes to
    /// the blob, and synced again after the hash (a writer still writing it when the sync ran
    /// is done by now: complete files are never written again); else replaced by our copy,
    /// synced before and after the rename.
    fn keep_or_replace(&self, digest: &Digest, ours: Ours) -> Result<()> {
        let path = self.blob_path(digest);
        let fsync = self.inner.config.fsync;
        if hash_own_file(digest.function, &path).is_ok_and(|actual| actual == *digest) {
            return if fsync {
                sync_each(&[path.as_path()], true)
            } else {
                Ok(())
            };
        }
        let ours = match ours {
            Ours::Temp(temp) => temp,
            Ours::Bytes(bytes) => {
                let mut temp = new_temp(self.temp_dir())?;
                temp.write_all(&bytes)
                    .map_err(|e| CasError::io("writing", temp.path(), e))?;
                temp.into_temp_path()
            }
        };
        let parent = path.parent().expect("blob paths have a parent");
        if fsync {
            sync_each(&[ours.as_ref()], true)?;
        }
        ours.persist(&path)
            .map_err(|e| CasError::io("publishing", &path, e.error))?;
        if fsync {
            sync_each(&[parent], false)?;
        }
        Ok(())
    }

    /// `syncfs(2)` of the filesystem holding the store: every write so far is durable.
    /// Concurrent publishes share syncs ([`FsSyncer`]).
    fn sync_filesystem(&self) -> Result<()> {
        let dir = self.temp_dir();
        self.inner.syncer.sync(dir, || {
            let handle = File::open(dir).map_err(|e| CasError::io("opening", dir, e))?;
            rustix::fs::syncfs(&handle)
                .map_err(|e| CasError::io("syncing the filesystem of", dir, e.into()))
        })
    }
}

/// A blob on its way into the index, between placement and the batch's sync.
struct Placement {
    digest: Digest,
    /// Where it was placed (`None`: the index lists it already; nothing to sync).
    path: Option<PathBuf>,
    /// Directories whose entries the sync must make durable.
    dirs: Vec<PathBuf>,
    /// The path was taken by a file the index does not list: our verified copy, to settle.
    taken: Option<Ours>,
}

impl Placement {
    fn present(digest: Digest) -> Self {
        Placement {
            digest,
            path: None,
            dirs: Vec::new(),
            taken: None,
        }
    }

    fn placed(digest: Digest, path: PathBuf, dirs: Vec<PathBuf>, taken: Option<Ours>) -> Self {
        Placement {
            digest,
            path: Some(path),
            dirs,
            taken,
        }
    }
}

/// Our verified copy of a blob whose path was taken.
enum Ours {
    Temp(tempfile::TempPath),
    Bytes(bytes::Bytes),
}

/// Group commit across batches: concurrent publishes share their `syncfs` calls instead of
/// queueing one each behind the others.
///
/// A caller needs a sync that *started* after its writes (one already running may have
/// started before them). So it waits for the running sync to end, and the waiters then share
/// the next one: N batches in flight cost about two syncs, not N. On a shared disk each `syncfs`
/// also waits for everyone else's dirty data, which is what makes the count matter.
#[derive(Default)]
struct FsSyncer {
    state: Mutex<SyncState>,
    ended: parking_lot::Condvar,
}

#[derive(Default)]
struct SyncState {
    /// Generations started and finished (a generation is one sync).
    started: u64,
    finished: u64,
    running: bool,
    /// The last finished sync's failure, if it failed.
    failure: Option<String>,
}

impl FsSyncer {
    /// Runs `sync` (or waits for a sync started after this call, run by another caller).
    /// `dir` names the filesystem in a shared sync's error.
    fn sync(&self, dir: &Path, sync: impl FnOnce() -> Result<()>) -> Result<()> {
        let mut state = self.state.lock();
        let needed = state.started + 1;
        let mut sync = Some(sync);
        loop {
            if state.finished >= needed {
                // Any sync of generation >= `needed` started after the caller's writes.
                return match &state.failure {
                    None => Ok(()),
                    Some(message) => Err(CasError::io(
                        "syncing (with other batches) the filesystem of",
                        dir,
                        io::Error::other(message.clone()),
                    )),
                };
            }
            if !state.running {
                let run = sync.take().expect("a caller leads at most one sync");
                state.running = true;
                state.started += 1;
                let generation = state.started;
                let outcome = parking_lot::MutexGuard::unlocked(&mut state, run);
                state.running = false;
                state.finished = generation;
                state.failure = outcome.as_ref().err().map(ToString::to_string);
                self.ended.notify_all();
                return outcome;
            }
            self.ended.wait(&mut state);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(max_bytes: u64) -> (tempfile::TempDir, BlobStore) {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            max_bytes,
            low_watermark: 0.5,
            fsync: false,
        };
        let store = BlobStore::open(dir.path(), config).unwrap();
        (dir, store)
    }

    #[test]
    fn put_file_digests_the_stored_bytes_and_skips_present_blobs() {
        let (dir, store) = store(1 << 30);
        // Below and above the size from which BLAKE3 hashes memory-mapped on all cores.
        for size in [0usize, 1000, (3 << 20) + 17] {
            let bytes: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let source = dir.path().join(format!("source-{size}"));
            fs::write(&source, &bytes).unwrap();
            for function in DigestFunction::ALL {
                let digest = store.put_file(function, &source).unwrap();
                assert_eq!(digest, function.digest_of(&bytes), "{function} {size}");
                assert_eq!(store.read_to_vec(&digest, u64::MAX).unwrap(), bytes);
                let total = store.stats().total_bytes;
                assert_eq!(store.put_file(function, &source).unwrap(), digest);
                assert_eq!(store.stats().total_bytes, total, "stored once");
            }
        }
        assert_eq!(
            fs::read_dir(store.temp_dir()).unwrap().count(),
            1,
            "only .lock"
        );
        assert!(matches!(
            store.put_file(DigestFunction::Blake3, &dir.path().join("missing")),
            Err(CasError::Io { .. })
        ));
    }

    #[test]
    fn put_get_round_trip_and_ranges() {
        let (_dir, store) = store(1 << 20);
        for function in DigestFunction::ALL {
            let digest = store.put_bytes(function, b"hello world").unwrap();
            assert!(store.contains(&digest).unwrap());
            assert_eq!(store.read_to_vec(&digest, 100).unwrap(), b"hello world");
            let mut part = String::new();
            store
                .reader(&digest, 6, 3)
                .unwrap()
                .read_to_string(&mut part)
                .unwrap();
            assert_eq!(part, "wor");
            assert!(matches!(
                store.reader(&digest, 12, 0),
                Err(CasError::OffsetOutOfRange { .. })
            ));
        }
        assert_eq!(store.stats().blob_count, 2);
        assert_eq!(store.stats().total_bytes, 22);
    }

    #[test]
    fn wrong_digest_stores_nothing() {
        let (_dir, store) = store(1 << 20);
        let claimed = DigestFunction::Sha256.digest_of(b"good");
        assert!(matches!(
            store.put_verified(claimed, b"evil"),
            Err(CasError::HashMismatch { .. })
        ));
        assert!(matches!(
            store.put_verified(claimed, b"goodbye"),
            Err(CasError::SizeMismatch { .. })
        ));
        assert!(matches!(
            store.put_verified(claimed, b"goo"),
            Err(CasError::SizeMismatch { .. })
        ));
        assert!(!store.contains(&claimed).unwrap());
        assert!(!store.blob_path(&claimed).exists());
        assert_eq!(
            fs::read_dir(store.temp_dir()).unwrap().count(),
            1,
            "only .lock"
        );
        assert_eq!(store.stats().total_bytes, 0);
    }

    #[test]
    fn empty_blob_is_always_present() {
        let (_dir, store) = store(1 << 20);
        let empty = DigestFunction::Sha256.empty();
        assert!(store.find_missing(&[empty]).unwrap().is_empty());
        assert!(store.read_to_vec(&empty, 0).unwrap().is_empty());
    }

    #[test]
    fn find_missing_is_exact() {
        let (_dir, store) = store(1 << 20);
        let a = store.put_bytes(DigestFunction::Sha256, b"a").unwrap();
        let b = DigestFunction::Sha256.digest_of(b"b");
        let a_blake = DigestFunction::Blake3.digest_of(b"a");
        let wrong_size = Digest { size: 2, ..a };
        assert_eq!(
            store.find_missing(&[a, b, b, a_blake, wrong_size]).unwrap(),
            vec![b, a_blake, wrong_size]
        );
    }

    #[test]
    fn presence_is_the_index_and_eviction_clears_it() {
        let (_dir, store) = store(100);
        let first = store.put_bytes(DigestFunction::Sha256, &[1u8; 40]).unwrap();
        // Asked (and cached) present, then evicted by newer writes: reported missing after.
        assert!(store.find_missing(&[first]).unwrap().is_empty());
        store.touch(&[first]).unwrap();
        store.put_bytes(DigestFunction::Sha256, &[2u8; 40]).unwrap();
        store.put_bytes(DigestFunction::Sha256, &[3u8; 40]).unwrap();
        assert!(store.stats().evictions > 0);
        assert!(!store.blob_path(&first).exists());
        assert_eq!(store.find_missing(&[first]).unwrap(), vec![first]);
        assert!(!store.contains(&first).unwrap());
        assert_eq!(store.stats().blob_count, store.inner.blobs.len() as u64);

        // A file on disk the index does not list is not present until verify adopts it.
        let (_dir, store) = self::store(1 << 20);
        let orphan = DigestFunction::Blake3.digest_of(b"orphan");
        let path = store.blob_path(&orphan);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, b"orphan").unwrap();
        assert_eq!(store.find_missing(&[orphan]).unwrap(), vec![orphan]);
        assert_eq!(store.verify().unwrap().adopted, 1);
        assert!(store.find_missing(&[orphan]).unwrap().is_empty());
        assert_eq!(store.stats().blob_count, 1);

        // An indexed blob whose file was removed behind the store's back: the first read
        // that misses it drops it from the index and the cache.
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        fs::remove_file(&path).unwrap();
        assert!(matches!(
            store.reader(&orphan, 0, 0),
            Err(CasError::NotFound(_))
        ));
        assert_eq!(store.find_missing(&[orphan]).unwrap(), vec![orphan]);
        assert_eq!(store.stats().blob_count, 0);
    }

    #[test]
    fn a_batch_written_in_place_fails_only_its_lying_blobs() {
        let (_dir, store) = store(1 << 20);
        let good = bytes::Bytes::from_static(b"a good blob");
        let digest = DigestFunction::Sha256.digest_of(&good);
        let claimed = DigestFunction::Sha256.digest_of(b"something else");
        let liar = Digest {
            size: good.len() as u64,
            ..claimed
        };
        let short = Digest {
            size: digest.size + 1,
            ..digest
        };
        let results = store.put_batch(vec![
            (digest, good.clone()),
            (liar, good.clone()),
            (short, good.clone()),
            // The same blob twice in one batch: one write, the other finds it and keeps it.
            (digest, good.clone()),
        ]);
        assert!(results[0].is_ok() && results[3].is_ok(), "{results:?}");
        assert!(matches!(results[1], Err(CasError::HashMismatch { .. })));
        assert!(matches!(results[2], Err(CasError::SizeMismatch { .. })));
        assert!(!store.blob_path(&liar).exists(), "a lie leaves no file");
        assert_eq!(store.read_to_vec(&digest, 100).unwrap(), good.as_ref());
        assert_eq!(store.stats().blob_count, 1);
        let mode = fs::metadata(store.blob_path(&digest))
            .unwrap()
            .permissions();
        assert!(mode.readonly(), "blob files are read-only");
        assert_eq!(store.verify().unwrap().intact, 1);
    }

    #[test]
    fn a_file_at_a_blob_path_whose_bytes_never_reached_the_disk_is_never_trusted() {
        // A crash between a publish's rename and its sync can leave, unindexed at a blob's
        // path, a file of the right size whose bytes the disk never got (here: zeros).
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), StoreConfig::default()).unwrap();
        assert!(store.config().fsync, "the sync paths are under test");
        let blob = |fill: u8| {
            let bytes = bytes::Bytes::from(vec![fill; 4096]);
            (DigestFunction::Sha256.digest_of(&bytes), bytes)
        };
        let lost = [blob(1), blob(2), blob(3)];
        for (digest, _) in &lost {
            let path = store.blob_path(digest);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, [0u8; 4096]).unwrap();
        }
        let (first, second, third) = (lost[0].0, lost[1].0, lost[2].0);
        // Neither a writer nor an action-cache check adopts it: it does not hash to the blob.
        assert!(!store.writer(first).unwrap().already_present());
        assert_eq!(store.find_missing_on_disk(&[second]).unwrap(), vec![second]);
        // A batch over two leftovers and a new blob: the leftovers are replaced, all readable.
        let fresh = blob(4);
        let results = store.put_batch(vec![lost[0].clone(), lost[1].clone(), fresh.clone()]);
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        for (digest, bytes) in [&lost[0], &lost[1], &fresh] {
            assert_eq!(store.read_to_vec(digest, 1 << 20).unwrap(), bytes.as_ref());
        }
        // The third, never uploaded again: verify removes it, an unfinished write (it was
        // never indexed, so nothing served was corrupt).
        let report = store.verify().unwrap();
        assert_eq!((report.corrupt.len(), report.unfinished), (0, 1));
        assert!(!store.blob_path(&third).exists());
        assert_eq!(store.find_missing(&[third]).unwrap(), vec![third]);
        // The same bytes with their own digest are adopted (hashed and synced) by a writer.
        let (digest, bytes) = blob(5);
        let path = store.blob_path(&digest);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, &bytes).unwrap();
        assert!(store.writer(digest).unwrap().already_present());
        assert!(store.contains(&digest).unwrap());
    }

    #[test]
    fn the_existence_cache_follows_every_index_change() {
        use std::os::unix::fs::PermissionsExt;
        let (_dir, store) = store(1 << 20);
        let bytes: &[u8] = b"a blob asked about before it was stored";
        let blob = DigestFunction::Sha256.digest_of(bytes);
        let never = DigestFunction::Sha256.digest_of(b"never asked about");
        // Not known to the cache: a cache-only answer refuses to guess.
        assert_eq!(store.find_missing_cached(&[never], false), None);
        // Asked and absent: cached as absent.
        assert_eq!(store.find_missing(&[blob]).unwrap(), vec![blob]);
        assert_eq!(store.find_missing_cached(&[blob], true), Some(vec![blob]));
        // Stored (group commit): present right after, from the cache too.
        let stored = store.put_batch(vec![(blob, bytes::Bytes::from_static(bytes))]);
        assert!(stored.into_iter().all(|r| r.is_ok()));
        assert_eq!(store.find_missing_cached(&[blob], true), Some(vec![]));
        assert!(store.find_missing_and_touch(&[blob]).unwrap().is_empty());

        // Found corrupt and removed: missing right after.
        let path = store.blob_path(&blob);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&path, b"a blob asked about before it was Stored").unwrap();
        assert!(store.remove_if_corrupt(&blob).unwrap());
        assert_eq!(store.find_missing_cached(&[blob], false), Some(vec![blob]));
        assert_eq!(store.find_missing(&[blob]).unwrap(), vec![blob]);

        // Stored again, then its file removed behind the store's back: `verify` drops it, and
        // it is missing right after.
        store.put_verified(blob, bytes).unwrap();
        assert_eq!(store.find_missing_cached(&[blob], false), Some(vec![]));
        fs::remove_file(&path).unwrap();
        assert_eq!(store.verify().unwrap().missing, vec![blob]);
        assert_eq!(store.find_missing_cached(&[blob], false), Some(vec![blob]));
        assert_eq!(store.find_missing(&[blob]).unwrap(), vec![blob]);

        // A file the index lost (a crash): missing until a write adopts it, present right after.
        fs::write(&path, bytes).unwrap();
        assert_eq!(store.find_missing(&[blob]).unwrap(), vec![blob]);
        assert!(store.writer(blob).unwrap().already_present());
        assert_eq!(store.find_missing_cached(&[blob], false), Some(vec![]));
        assert_eq!(store.stats().blob_count, 1);
    }

    #[test]
    fn a_large_blob_is_synced_while_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), StoreConfig::default()).unwrap();
        let bytes: Vec<u8> = (0..(EARLY_SYNC_BYTES * 3 + 1000) as usize)
            .map(|i| (i % 253) as u8)
            .collect();
        let digest = DigestFunction::Blake3.digest_of(&bytes);
        let mut writer = store.writer(digest).unwrap();
        for chunk in bytes.chunks(64 << 10) {
            writer.write_chunk(chunk).unwrap();
        }
        assert!(writer.early_sync.is_some(), "the helper started");
        writer.commit().unwrap();
        assert!(store.read_to_vec(&digest, u64::MAX).unwrap() == bytes);
        // A lie is still refused once the helper has synced part of it.
        let lie = Digest {
            hash: [7; 32],
            ..digest
        };
        let mut writer = store.writer(lie).unwrap();
        for chunk in bytes.chunks(64 << 10) {
            writer.write_chunk(chunk).unwrap();
        }
        assert!(matches!(
            writer.commit(),
            Err(CasError::HashMismatch { .. })
        ));
        assert!(!store.contains(&lie).unwrap());
    }

    #[test]
    fn concurrent_batches_share_their_syncs() {
        let syncer = FsSyncer::default();
        let runs = AtomicU64::new(0);
        let slow_sync = || {
            runs.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(50));
            Ok(())
        };
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| syncer.sync(Path::new("/"), slow_sync).unwrap());
            }
        });
        // The first sync, then (usually) one for all who came while it ran.
        let runs = runs.load(Ordering::SeqCst);
        assert!((1..8).contains(&runs), "{runs} syncs for 8 batches");
        // A failed sync fails every batch that relied on it, and the next one starts afresh.
        let failed = syncer.sync(Path::new("/store"), || {
            Err(CasError::io(
                "syncing",
                "/store",
                io::Error::other("disk gone"),
            ))
        });
        assert!(failed.unwrap_err().to_string().contains("disk gone"));
        assert!(syncer.sync(Path::new("/"), || Ok(())).is_ok());
    }

    #[test]
    fn a_staged_batch_is_invisible_until_published_together() {
        let (_dir, store) = store(1 << 20);
        let present = store.put_bytes(DigestFunction::Sha256, b"already").unwrap();
        let stage = |bytes: &[u8]| {
            let mut writer = store
                .writer(DigestFunction::Sha256.digest_of(bytes))
                .unwrap();
            writer.write_chunk(bytes).unwrap();
            writer.stage().unwrap()
        };
        let batch = vec![
            stage(b"one"),
            stage(b"already"),
            stage(b"two"),
            stage(b"one"),
        ];
        assert!(batch[1].already_present() && !batch[0].already_present());
        let digests: Vec<Digest> = batch.iter().map(StagedBlob::digest).collect();
        assert_eq!(
            store.find_missing(&digests).unwrap().len(),
            2,
            "staged is not visible"
        );
        assert!(!store.blob_path(&digests[0]).exists());
        let abandoned = stage(b"never published");
        drop(abandoned);
        let results = store.publish(batch);
        assert_eq!(
            results.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
            digests
        );
        assert!(store.find_missing(&digests).unwrap().is_empty());
        assert_eq!(store.read_to_vec(&digests[2], 10).unwrap(), b"two");
        assert_eq!(store.stats().blob_count, 3);
        assert_eq!(store.stats().total_bytes, (b"already".len() + 6) as u64);
        assert!(store.contains(&present).unwrap());
        assert_eq!(
            fs::read_dir(store.temp_dir()).unwrap().count(),
            1,
            "only .lock"
        );
    }

    #[test]
    fn opening_removes_only_dead_temporaries_and_follows_no_link() {
        use rustix::fs::{FlockOperation, flock};
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("precious"), b"keep").unwrap();
        let tmp = dir.path().join("tmp");
        for name in ["dead", "live"] {
            fs::create_dir_all(tmp.join(name)).unwrap();
            fs::write(tmp.join(name).join("half-a-blob"), b"x").unwrap();
        }
        fs::write(tmp.join("dead").join(TEMP_LOCK_NAME), b"").unwrap();
        let live_lock = File::create(tmp.join("live").join(TEMP_LOCK_NAME)).unwrap();
        flock(&live_lock, FlockOperation::NonBlockingLockExclusive).unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.join("link")).unwrap();
        fs::write(tmp.join("stray"), b"old layout").unwrap();
        fs::write(dir.path().join("lock"), "\u{1b}[2J not a pid").unwrap();

        let store = BlobStore::open(dir.path(), StoreConfig::without_fsync()).unwrap();
        assert!(!tmp.join("dead").exists(), "a dead process's writes go");
        assert!(
            tmp.join("live").join("half-a-blob").exists(),
            "a live process's in-flight write stays"
        );
        assert!(!tmp.join("stray").exists());
        assert!(
            fs::symlink_metadata(tmp.join("link")).is_err(),
            "the link is removed"
        );
        assert!(outside.path().join("precious").exists(), "never followed");
        assert_eq!(
            fs::read_to_string(dir.path().join("lock")).unwrap().trim(),
            std::process::id().to_string()
        );
        drop(store);
        assert!(tmp.join("live").exists());
    }

    #[test]
    fn evicts_least_recently_used_but_not_pinned() {
        let (_dir, store) = store(100);
        let old = store.put_bytes(DigestFunction::Sha256, &[1u8; 40]).unwrap();
        let pinned = store.put_bytes(DigestFunction::Sha256, &[2u8; 40]).unwrap();
        let _guard = store.pin(&pinned);
        // Over the cap of 100: evicts down to 50, oldest unpinned first.
        let newest = store.put_bytes(DigestFunction::Sha256, &[3u8; 40]).unwrap();
        assert!(!store.contains(&old).unwrap());
        assert!(store.contains(&pinned).unwrap());
        assert!(!store.blob_path(&old).exists());
        assert_eq!(
            store.stats().evictions,
            2,
            "old and newest evicted, pinned kept"
        );
        assert!(!store.contains(&newest).unwrap());
    }

    #[test]
    fn blob_files_are_read_only() {
        use std::os::unix::fs::PermissionsExt;
        let (_dir, store) = store(1 << 20);
        let digest = store
            .put_bytes(DigestFunction::Sha256, b"shared by hard links")
            .unwrap();
        let mode = fs::metadata(store.blob_path(&digest))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o444);
    }

    #[test]
    fn oversized_blob_is_refused() {
        let (_dir, store) = store(10);
        let digest = DigestFunction::Sha256.digest_of(&[0u8; 11]);
        assert!(matches!(
            store.writer(digest),
            Err(CasError::QuotaExceeded(_))
        ));
    }

    #[test]
    fn reopening_keeps_blobs_and_totals() {
        let dir = tempfile::tempdir().unwrap();
        let digest = {
            let store = BlobStore::open(dir.path(), StoreConfig::default()).unwrap();
            let digest = store
                .put_bytes(DigestFunction::Blake3, b"persist me")
                .unwrap();
            store.flush().unwrap();
            digest
        };
        let store = BlobStore::open(dir.path(), StoreConfig::default()).unwrap();
        assert_eq!(store.read_to_vec(&digest, 100).unwrap(), b"persist me");
        assert_eq!(store.stats().total_bytes, 10);
    }

    #[test]
    fn verify_drops_corrupt_and_missing_blobs() {
        let (_dir, store) = store(1 << 20);
        let corrupt = store
            .put_bytes(DigestFunction::Sha256, b"original")
            .unwrap();
        let gone = store
            .put_bytes(DigestFunction::Sha256, b"will vanish")
            .unwrap();
        let fine = store.put_bytes(DigestFunction::Blake3, b"fine").unwrap();
        let corrupt_path = store.blob_path(&corrupt);
        fs::set_permissions(
            &corrupt_path,
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .unwrap();
        fs::write(&corrupt_path, b"tampered").unwrap();
        fs::remove_file(store.blob_path(&gone)).unwrap();
        let report = store.verify().unwrap();
        assert_eq!(report.corrupt, vec![corrupt]);
        assert_eq!(report.missing, vec![gone]);
        assert_eq!(report.intact, 1);
        assert!(store.contains(&fine).unwrap());
        assert!(!store.contains(&corrupt).unwrap());
        assert_eq!(store.stats().total_bytes, 4);
    }

    #[test]
    fn remove_if_corrupt_drops_only_a_tampered_blob() {
        let (_dir, store) = store(1 << 20);
        let blob = store
            .put_bytes(DigestFunction::Blake3, b"original")
            .unwrap();
        assert!(!store.remove_if_corrupt(&blob).unwrap(), "intact: kept");
        assert!(store.contains(&blob).unwrap());
        let path = store.blob_path(&blob);
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        fs::write(&path, b"tampere").unwrap();
        assert!(store.remove_if_corrupt(&blob).unwrap());
        assert!(!store.contains(&blob).unwrap() && !path.exists());
        assert!(
            !store.remove_if_corrupt(&blob).unwrap(),
            "absent: nothing to do"
        );
        assert_eq!(
            store
                .put_bytes(DigestFunction::Blake3, b"original")
                .unwrap(),
            blob
        );
        assert_eq!(store.read_to_vec(&blob, 100).unwrap(), b"original");
    }
}
