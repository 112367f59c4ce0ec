//! The blob store: content-addressed files on disk, indexed in sled for LRU eviction.
//!
//! Layout under the store root:
//! ```text
//! blobs/<function>/<hh>/<hash>   one file per blob, sharded by the hash's first byte
//! tmp/                           writes in progress (emptied at startup)
//! index/                         the sled database (blob sizes and last access, action cache, stat cache)
//! ```
//! Contract:
//! - A blob becomes visible only once its bytes are written, verified (size and hash), fsync'd
//!   and renamed into place. A crash mid-write leaves at most a file under `tmp/`, removed at the
//!   next open; a wrong digest stores nothing.
//! - Readers stream with offset/limit and never load a whole blob. A reader pins its blob: the
//!   evictor skips pinned blobs. Writers of a blob already present only count the bytes.
//! - Every method is safe to call from many threads; all I/O is blocking (call it from
//!   `tokio::task::spawn_blocking` in async code when a blob may be large).
//! - Presence is answered by the index and one `stat` of the blob's file, so it stays exact: an
//!   index entry whose file vanished is dropped, and a file that exists on disk but not in the
//!   index (a crash between rename and index update) is adopted on first sight.
//!   Startup reads no more than the index's totals; [`BlobStore::verify`] is the full rescan.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tempfile::NamedTempFile;

use crate::digest::{Digest, DigestFunction, Hasher};
use crate::error::{CasError, Result};

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
}

/// Key of a blob in the index: function byte + raw hash.
type BlobKey = [u8; 33];

fn blob_key(digest: &Digest) -> BlobKey {
    let mut key = [0u8; 33];
    key[0] = function_byte(digest.function);
    key[1..].copy_from_slice(&digest.hash);
    key
}

fn function_byte(function: DigestFunction) -> u8 {
    match function {
        DigestFunction::Sha256 => 1,
        DigestFunction::Blake3 => 2,
    }
}

fn digest_from_key(key: &[u8], size: u64) -> Option<Digest> {
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

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Index value: size and last access, both big-endian u64.
fn index_value(size: u64, access: u64) -> [u8; 16] {
    let mut value = [0u8; 16];
    value[..8].copy_from_slice(&size.to_be_bytes());
    value[8..].copy_from_slice(&access.to_be_bytes());
    value
}

fn parse_index_value(value: &[u8]) -> Option<(u64, u64)> {
    Some((
        u64::from_be_bytes(value.get(..8)?.try_into().ok()?),
        u64::from_be_bytes(value.get(8..16)?.try_into().ok()?),
    ))
}

fn lru_key(access: u64, key: &BlobKey) -> [u8; 41] {
    let mut lru = [0u8; 41];
    lru[..8].copy_from_slice(&access.to_be_bytes());
    lru[8..].copy_from_slice(key);
    lru
}

/// Accesses closer together than this do not rewrite the LRU index.
const ACCESS_GRANULARITY_MS: u64 = 1_000;

struct Inner {
    root: PathBuf,
    tmp_dir: PathBuf,
    config: StoreConfig,
    db: sled::Db,
    blobs: sled::Tree,
    lru: sled::Tree,
    meta: sled::Tree,
    total_bytes: AtomicU64,
    evictions: AtomicU64,
    evicted_bytes: AtomicU64,
    pins: Mutex<HashMap<BlobKey, usize>>,
    evict_lock: Mutex<()>,
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

impl BlobStore {
    /// A throwaway store in a new temporary directory, without fsync. The store lives as long
    /// as the returned directory guard.
    pub fn scratch() -> Result<(tempfile::TempDir, Self)> {
        let dir = tempfile::tempdir()
            .map_err(|e| CasError::io("creating a scratch store in", std::env::temp_dir(), e))?;
        let store = BlobStore::open(dir.path(), StoreConfig::without_fsync())?;
        Ok((dir, store))
    }

    /// Opens (creating if needed) the store under `root`.
    pub fn open(root: impl AsRef<Path>, config: StoreConfig) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let tmp_dir = root.join("tmp");
        for function in DigestFunction::ALL {
            let dir = root.join("blobs").join(function.name());
            fs::create_dir_all(&dir).map_err(|e| CasError::io("creating", &dir, e))?;
        }
        // Writes that were in flight when the process died: never visible, now garbage.
        if tmp_dir.exists() {
            fs::remove_dir_all(&tmp_dir).map_err(|e| CasError::io("cleaning", &tmp_dir, e))?;
        }
        fs::create_dir_all(&tmp_dir).map_err(|e| CasError::io("creating", &tmp_dir, e))?;
        let db_path = root.join("index");
        let db = sled::Config::new().path(&db_path).open()?;
        let blobs = db.open_tree("blobs")?;
        let lru = db.open_tree("lru")?;
        let meta = db.open_tree("meta")?;
        let total = meta
            .get(TOTAL_BYTES_KEY)?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0);
        Ok(BlobStore {
            inner: Arc::new(Inner {
                root,
                tmp_dir,
                config,
                db,
                blobs,
                lru,
                meta,
                total_bytes: AtomicU64::new(total),
                evictions: AtomicU64::new(0),
                evicted_bytes: AtomicU64::new(0),
                pins: Mutex::new(HashMap::new()),
                evict_lock: Mutex::new(()),
            }),
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The store's configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// The sled database, shared with the action cache and stat cache of this store.
    pub fn db(&self) -> &sled::Db {
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

    /// True when the blob is present. The empty blob is always present.
    pub fn contains(&self, digest: &Digest) -> Result<bool> {
        if digest.is_empty_blob() {
            return Ok(true);
        }
        let key = blob_key(digest);
        if let Some(value) = self.inner.blobs.get(key)? {
            if parse_index_value(&value).map(|(size, _)| size) != Some(digest.size) {
                return Ok(false);
            }
            // One stat keeps the answer exact even if a file was removed behind our back.
            if fs::symlink_metadata(self.blob_path(digest)).is_ok() {
                return Ok(true);
            }
            self.forget(digest)?;
            return Ok(false);
        }
        self.adopt_if_on_disk(digest)
    }

    /// The subset of `digests` that is not present, in the order given, without duplicates.
    pub fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let mut seen = std::collections::HashSet::new();
        let mut missing = Vec::new();
        for digest in digests {
            if seen.insert(*digest) && !self.contains(digest)? {
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
        let Some(value) = self.inner.blobs.get(key)? else {
            return Ok(());
        };
        let Some((size, access)) = parse_index_value(&value) else {
            return Ok(());
        };
        if now.saturating_sub(access) < ACCESS_GRANULARITY_MS {
            return Ok(());
        }
        // A concurrent eviction may remove the entry between get and insert: only rewrite the
        // entry if it is still the one we read.
        let swapped = self.inner.blobs.compare_and_swap(
            key,
            Some(value.as_ref()),
            Some(&index_value(size, now)[..]),
        )?;
        if swapped.is_ok() {
            self.inner.lru.remove(lru_key(access, &key))?;
            self.inner.lru.insert(lru_key(now, &key), &[])?;
        }
        Ok(())
    }

    /// Starts writing a blob whose digest is known; the bytes are verified against it.
    pub fn writer(&self, expected: Digest) -> Result<BlobWriter> {
        if expected.size > self.inner.config.max_bytes {
            return Err(CasError::QuotaExceeded(format!(
                "blob {expected:?} is larger than the store's capacity of {} bytes",
                self.inner.config.max_bytes
            )));
        }
        let present = self.contains(&expected)?;
        BlobWriter::new(self.clone(), expected.function, Some(expected), present)
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
        let tmp = &self.inner.tmp_dir;
        let mut copy = NamedTempFile::new_in(tmp)
            .map_err(|e| CasError::io("creating temp file in", tmp, e))?;
        let size =
            io::copy(source, copy.as_file_mut()).map_err(|e| CasError::io("copying", path, e))?;
        let digest = hash_own_file(function, copy.path())?;
        if self.contains(&digest)? {
            self.touch_at(&digest, now_millis())?;
            return Ok(digest);
        }
        BlobWriter {
            store: self.clone(),
            expected: Some(digest),
            // The digest was just computed from the stored copy itself.
            hasher: None,
            file: Some(copy),
            received: size,
        }
        .commit()
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
        if !self.contains(digest)? {
            return Err(CasError::NotFound(*digest));
        }
        let path = self.blob_path(digest);
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget(digest)?;
                return Err(CasError::NotFound(*digest));
            }
            Err(e) => return Err(CasError::io("opening", path, e)),
        };
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
            blob_count: self.inner.blobs.len() as u64,
            evictions: self.inner.evictions.load(Ordering::Relaxed),
            evicted_bytes: self.inner.evicted_bytes.load(Ordering::Relaxed),
        }
    }

    /// Flushes the index to disk (it also flushes itself periodically and on drop).
    pub fn flush(&self) -> Result<()> {
        self.inner.db.flush()?;
        Ok(())
    }

    fn adopt_if_on_disk(&self, digest: &Digest) -> Result<bool> {
        let path = self.blob_path(digest);
        match fs::metadata(&path) {
            Ok(meta) if meta.len() == digest.size => {
                self.index_insert(digest)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn index_insert(&self, digest: &Digest) -> Result<()> {
        let key = blob_key(digest);
        let now = now_millis();
        let previous = self
            .inner
            .blobs
            .insert(key, &index_value(digest.size, now))?;
        match previous.as_deref().and_then(parse_index_value) {
            Some((_, access)) => {
                self.inner.lru.remove(lru_key(access, &key))?;
            }
            None => self.add_total(digest.size as i64)?,
        }
        self.inner.lru.insert(lru_key(now, &key), &[])?;
        Ok(())
    }

    /// Drops a blob from the index (its file is already gone or about to be).
    fn forget(&self, digest: &Digest) -> Result<bool> {
        let key = blob_key(digest);
        match self
            .inner
            .blobs
            .remove(key)?
            .as_deref()
            .and_then(parse_index_value)
        {
            Some((size, access)) => {
                self.inner.lru.remove(lru_key(access, &key))?;
                self.add_total(-(size as i64))?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn add_total(&self, delta: i64) -> Result<()> {
        let total = if delta >= 0 {
            self.inner
                .total_bytes
                .fetch_add(delta as u64, Ordering::SeqCst)
                + delta as u64
        } else {
            let amount = delta.unsigned_abs();
            let previous = self
                .inner
                .total_bytes
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                    Some(t.saturating_sub(amount))
                })
                .unwrap_or(0);
            previous.saturating_sub(amount)
        };
        self.inner
            .meta
            .insert(TOTAL_BYTES_KEY, &total.to_be_bytes())?;
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

    /// Re-hashes every blob on disk: removes corrupt blobs and index entries whose file is gone,
    /// indexes files the index lost, and recomputes the byte total.
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let mut on_disk = std::collections::HashSet::new();
        for function in DigestFunction::ALL {
            let dir = self.inner.root.join("blobs").join(function.name());
            for entry in walk_files(&dir)? {
                let Some(name) = entry.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                let Ok(size) = fs::metadata(&entry).map(|m| m.len()) else {
                    continue;
                };
                let Ok(claimed) = Digest::from_hex(function, name, size as i64) else {
                    let _ = fs::remove_file(&entry);
                    continue;
                };
                let actual = hash_own_file(function, &entry)?;
                if actual != claimed {
                    self.forget(&claimed)?;
                    fs::remove_file(&entry)
                        .map_err(|e| CasError::io("removing corrupt", &entry, e))?;
                    report.corrupt.push(claimed);
                    continue;
                }
                if self.inner.blobs.get(blob_key(&claimed))?.is_none() {
                    self.index_insert(&claimed)?;
                    report.adopted += 1;
                }
                on_disk.insert(blob_key(&claimed));
                report.intact += 1;
            }
        }
        let mut total = 0u64;
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
            } else if let Some(digest) = digest_from_key(&key, size) {
                self.forget(&digest)?;
                report.missing.push(digest);
            }
        }
        self.inner.total_bytes.store(total, Ordering::SeqCst);
        self.inner
            .meta
            .insert(TOTAL_BYTES_KEY, &total.to_be_bytes())?;
        self.flush()?;
        Ok(report)
    }
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
            let tmp = &store.inner.tmp_dir;
            Some(
                NamedTempFile::new_in(tmp)
                    .map_err(|e| CasError::io("creating temp file in", tmp, e))?,
            )
        };
        Ok(BlobWriter {
            store,
            expected,
            hasher: Some(function.hasher()),
            file,
            received: 0,
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
        }
        self.received = after;
        Ok(())
    }

    /// Verifies size and hash, makes the blob durable and visible, and returns its digest.
    pub fn commit(self) -> Result<Digest> {
        let written = self.received;
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
            return Ok(expected);
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
        if actual.size > self.store.inner.config.max_bytes {
            return Err(CasError::QuotaExceeded(format!(
                "blob {actual:?} is larger than the store's capacity of {} bytes",
                self.store.inner.config.max_bytes
            )));
        }
        if self.store.inner.config.fsync {
            file.as_file()
                .sync_data()
                .map_err(|e| CasError::io("syncing", file.path(), e))?;
        }
        // Read-only: materialisation hard-links blobs into exec roots, where a writable file
        // would let an action corrupt the store.
        file.as_file()
            .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o444))
            .map_err(|e| CasError::io("chmod", file.path(), e))?;
        let path = self.store.blob_path(&actual);
        let parent = path.parent().expect("blob paths have a parent");
        fs::create_dir_all(parent).map_err(|e| CasError::io("creating", parent, e))?;
        file.persist(&path)
            .map_err(|e| CasError::io("publishing", &path, e.error))?;
        self.store.index_insert(&actual)?;
        self.store.evict_if_needed()?;
        Ok(actual)
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
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
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
        assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
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
}
