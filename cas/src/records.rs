//! [`EmbeddedRecords`]: a named, ordered key space in the embedded store's own database, for
//! the records a node keeps beside its blobs (its build history).
//!
//! Why here: the embedded store's database is one file per data directory, locked by the
//! process that opened it, so a node cannot open a second one for its records; and no crate
//! outside `cas` names the database engine. Callers get bytes in, bytes out, in key order,
//! under a name of their own: the key spaces the store itself uses (its blob index, action
//! cache, grants, stat cache) cannot be opened through this type, so a caller can never read
//! or damage them.
//!
//! The scale-out counterpart of a caller's records is that caller's business (the build
//! history keeps its own PostgreSQL table): this type is only the embedded backend.

use crate::error::{CasError, Result};
use crate::store::BlobStore;

/// The key spaces the store keeps for itself; [`EmbeddedRecords::open`] refuses them.
const RESERVED: &[&str] = &[
    "blobs",
    "lru",
    "meta",
    "action_cache",
    "stat_cache",
    "read_grants",
    "read_grants_meta",
    "blob_index",
    "blob_index_lru",
    "blob_index_meta",
];

/// One named key space of the embedded database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct EmbeddedRecords {
    tree: sled::Tree,
}

impl EmbeddedRecords {
    /// Opens (creating it empty) the key space `name` of `blobs`' database. Names the store
    /// uses itself, and names that are empty or not `[a-z0-9_]`, are refused.
    pub fn open(blobs: &BlobStore, name: &str) -> Result<EmbeddedRecords> {
        let plain = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !plain || RESERVED.contains(&name) {
            return Err(CasError::invalid(
                format!("record space {name:?}"),
                "reserved by the store, or not [a-z0-9_]",
            ));
        }
        Ok(EmbeddedRecords {
            tree: blobs.db().open_tree(name)?,
        })
    }

    /// The value under `key`.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }

    /// Stores `value` under `key`; true when the key was new.
    pub fn insert(&self, key: &[u8], value: &[u8]) -> Result<bool> {
        Ok(self.tree.insert(key, value)?.is_none())
    }

    /// Up to `limit` keys strictly below `before` (all keys when `None`), greatest first.
    pub fn keys_below(&self, before: Option<&[u8]>, limit: usize) -> Result<Vec<Vec<u8>>> {
        let end = match before {
            Some(key) => std::ops::Bound::Excluded(key.to_vec()),
            None => std::ops::Bound::Unbounded,
        };
        self.tree
            .range::<Vec<u8>, _>((std::ops::Bound::Unbounded, end))
            .keys()
            .rev()
            .take(limit)
            .map(|key| Ok(key?.to_vec()))
            .collect()
    }

    /// Up to `limit` keys that start with `prefix`, in key order.
    pub fn keys_with_prefix(&self, prefix: &[u8], limit: usize) -> Result<Vec<Vec<u8>>> {
        self.tree
            .scan_prefix(prefix)
            .keys()
            .take(limit)
            .map(|key| Ok(key?.to_vec()))
            .collect()
    }

    /// Removes `key`.
    pub fn remove(&self, key: &[u8]) -> Result<()> {
        self.tree.remove(key)?;
        Ok(())
    }

    /// Every value, in key order (a full scan: for opening and repairs, not for requests).
    pub fn values(&self) -> impl Iterator<Item = Result<Vec<u8>>> + '_ {
        self.tree.iter().values().map(|value| Ok(value?.to_vec()))
    }

    /// The number of keys (a full scan: for opening, not for requests).
    pub fn count(&self) -> usize {
        self.tree.len()
    }

    /// Removes every key.
    pub fn clear(&self) -> Result<()> {
        Ok(self.tree.clear()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;

    #[test]
    fn the_store_own_spaces_are_refused_and_keys_come_greatest_first() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path(), StoreConfig::default()).unwrap();
        for name in ["blobs", "action_cache", "read_grants", "", "../x", "Builds"] {
            let error = EmbeddedRecords::open(&blobs, name).unwrap_err().to_string();
            assert!(error.contains("record space"), "{name:?}: {error}");
        }
        let records = EmbeddedRecords::open(&blobs, "builds").unwrap();
        for key in [b"a", b"c", b"b"] {
            assert!(records.insert(key, b"v").unwrap());
        }
        assert!(!records.insert(b"a", b"w").unwrap());
        assert_eq!(records.get(b"a").unwrap().as_deref(), Some(&b"w"[..]));
        assert_eq!(records.count(), 3);
        assert_eq!(
            records.keys_below(None, 2).unwrap(),
            vec![b"c".to_vec(), b"b".to_vec()]
        );
        assert_eq!(
            records.keys_below(Some(b"b"), 10).unwrap(),
            vec![b"a".to_vec()]
        );
        records.insert(b"ab", b"v").unwrap();
        assert_eq!(
            records.keys_with_prefix(b"a", 10).unwrap(),
            vec![b"a".to_vec(), b"ab".to_vec()]
        );
        records.remove(b"ab").unwrap();
        assert_eq!(
            records.keys_with_prefix(b"a", 10).unwrap(),
            vec![b"a".to_vec()]
        );
        records.clear().unwrap();
        assert_eq!(records.count(), 0);
    }
}
