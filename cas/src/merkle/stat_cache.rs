//! The stat cache: `(absolute path, digest function) → (size, mtime, ctime, inode, device,
//! digest)`, in the `stat_cache` tree of the store's sled database.
//!
//! When a file's `lstat` matches its entry, its digest is reused without reading the file.
//!
//! Racy timestamps: a file written within the filesystem's timestamp granularity of being
//! hashed could change again without its mtime changing. Each entry records when the file's
//! hashing started; an entry is trusted only if that moment is at least [`RACY_WINDOW_NANOS`]
//! after both the file's mtime and ctime. An untrusted entry just means the file is hashed again
//! (and re-recorded, trusted once the file has been quiet long enough).

use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::digest::{Digest, DigestFunction};
use crate::error::Result;
use crate::store::BlobStore;

/// Entries whose file changed less than this before it was hashed are not trusted (2 s covers
/// filesystems with 1 s and 2 s timestamp granularity).
pub const RACY_WINDOW_NANOS: i128 = 2_000_000_000;

/// size, ino, dev (u64); mtime, ctime, hashed_at (i128 nanoseconds); hash.
const VALUE_LEN: usize = 3 * 8 + 3 * 16 + 32;

/// The stat cache of a store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct StatCache {
    tree: sled::Tree,
}

/// The fields of an `lstat` the cache compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StatKey {
    size: u64,
    mtime: i128,
    ctime: i128,
    ino: u64,
    dev: u64,
}

impl StatKey {
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn of(meta: &Metadata) -> Self {
        StatKey {
            size: meta.len(),
            mtime: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
            ino: meta.ino(),
            dev: meta.dev(),
        }
    }
}

/// Nanoseconds since the Unix epoch.
pub(crate) fn now_nanos() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

fn key(function: DigestFunction, path: &Path) -> Vec<u8> {
    let bytes = path.as_os_str().as_bytes();
    let mut key = Vec::with_capacity(1 + bytes.len());
    key.push(match function {
        DigestFunction::Sha256 => 1,
        DigestFunction::Blake3 => 2,
    });
    key.extend_from_slice(bytes);
    key
}

fn encode(stat: &StatKey, hashed_at: i128, hash: &[u8; 32]) -> [u8; VALUE_LEN] {
    let mut value = [0u8; VALUE_LEN];
    value[0..8].copy_from_slice(&stat.size.to_be_bytes());
    value[8..24].copy_from_slice(&stat.mtime.to_be_bytes());
    value[24..40].copy_from_slice(&stat.ctime.to_be_bytes());
    value[40..48].copy_from_slice(&stat.ino.to_be_bytes());
    value[48..56].copy_from_slice(&stat.dev.to_be_bytes());
    value[56..72].copy_from_slice(&hashed_at.to_be_bytes());
    value[72..104].copy_from_slice(hash);
    value
}

fn decode(value: &[u8]) -> Option<(StatKey, i128, [u8; 32])> {
    if value.len() != VALUE_LEN {
        return None;
    }
    let u64_at = |at: usize| u64::from_be_bytes(value[at..at + 8].try_into().unwrap());
    let i128_at = |at: usize| i128::from_be_bytes(value[at..at + 16].try_into().unwrap());
    let stat = StatKey {
        size: u64_at(0),
        mtime: i128_at(8),
        ctime: i128_at(24),
        ino: u64_at(40),
        dev: u64_at(48),
    };
    Some((stat, i128_at(56), value[72..104].try_into().unwrap()))
}

impl StatCache {
    /// Opens the stat cache of a store.
    pub fn open(store: &BlobStore) -> Result<Self> {
        Ok(StatCache {
            tree: store.db().open_tree("stat_cache")?,
        })
    }

    /// The cached digest of `path` (absolute) if its `lstat` still matches a trusted entry.
    pub fn lookup(
        &self,
        function: DigestFunction,
        path: &Path,
        meta: &Metadata,
    ) -> Result<Option<Digest>> {
        let Some(value) = self.tree.get(key(function, path))? else {
            return Ok(None);
        };
        let Some((stat, hashed_at, hash)) = decode(&value) else {
            return Ok(None);
        };
        if stat != StatKey::of(meta) || hashed_at - stat.mtime.max(stat.ctime) < RACY_WINDOW_NANOS {
            return Ok(None);
        }
        Ok(Some(Digest {
            function,
            hash,
            size: stat.size,
        }))
    }

    /// Records that `path`, with this `lstat`, hashed to `digest`; `hashed_at` is when reading
    /// it started (nanoseconds since the epoch), which decides whether the entry is trusted.
    pub(crate) fn record(
        &self,
        path: &Path,
        stat: &StatKey,
        hashed_at: i128,
        digest: &Digest,
    ) -> Result<()> {
        self.tree.insert(
            key(digest.function, path),
            &encode(stat, hashed_at, &digest.hash)[..],
        )?;
        Ok(())
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    /// True when the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// Forgets every entry.
    pub fn clear(&self) -> Result<()> {
        self.tree.clear()?;
        Ok(())
    }

    /// Forgets the entries of paths under `root` (e.g. a workspace that was deleted).
    pub fn forget_under(&self, root: &Path) -> Result<u64> {
        let mut removed = 0;
        for function in DigestFunction::ALL {
            let mut prefix = key(function, root);
            if !prefix.ends_with(b"/") {
                prefix.push(b'/');
            }
            for entry in self.tree.scan_prefix(&prefix) {
                let (k, _) = entry?;
                self.tree.remove(k)?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}
