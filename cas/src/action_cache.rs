//! The action cache: `(instance name, action digest) → ActionResult`, stored in the store's sled
//! database.
//!
//! Contract: [`EmbeddedActionCache::get`] returns an entry only when every blob it references is present
//! (output files, every file inside each output directory's `Tree`, the tree blobs themselves,
//! stdout and stderr), and marks those blobs as just used so that eviction cannot break the hit
//! it just served. This is the completeness check REAPI asks for: a client told "hit" never finds
//! an output missing. The rule itself lives in [`crate::layers::complete`] (the same code serves
//! the async [`crate::layers::complete::CompleteActionCache`]). Instance names separate action
//! caches; blobs are shared by all instances.

use rba_proto::Message;
use rba_proto::reapi::ActionResult;

use crate::digest::{Digest, DigestFunction};
use crate::error::{CasError, Result};
use crate::layers::complete;
use crate::store::BlobStore;

/// The action cache. Cheap to clone.
#[derive(Clone, Debug)]
pub struct EmbeddedActionCache {
    blobs: BlobStore,
    entries: sled::Tree,
    /// Entries stored: counted once at open, then kept by `put` and `remove`, so metrics never
    /// scan the tree (sled's `len` is a full scan).
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

fn entry_key(instance: &str, action: &Digest) -> Vec<u8> {
    let mut key = Vec::with_capacity(4 + instance.len() + 33);
    key.extend_from_slice(&(instance.len() as u32).to_be_bytes());
    key.extend_from_slice(instance.as_bytes());
    key.push(match action.function {
        DigestFunction::Sha256 => 1,
        DigestFunction::Blake3 => 2,
    });
    key.extend_from_slice(&action.hash);
    key
}

impl EmbeddedActionCache {
    /// Opens the action cache of a store.
    pub fn open(blobs: BlobStore) -> Result<Self> {
        let entries = blobs.db().open_tree("action_cache")?;
        let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(entries.len() as u64));
        Ok(EmbeddedActionCache {
            blobs,
            entries,
            count,
        })
    }

    /// Stores a result. Every digest it names must be well-formed for the action's function.
    pub fn put(&self, instance: &str, action: &Digest, result: &ActionResult) -> Result<()> {
        complete::direct_references(action.function, result)?;
        let previous = self
            .entries
            .insert(entry_key(instance, action), result.encode_to_vec())?;
        if previous.is_none() {
            self.count
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// The stored result, only if everything it references is present (then touched): the
    /// rule of [`crate::layers::complete`], run inline on this thread over the store's files.
    pub fn get(&self, instance: &str, action: &Digest) -> Result<Option<ActionResult>> {
        let Some(result) = self.get_unchecked(instance, action)? else {
            return Ok(None);
        };
        complete::run_inline(complete::complete(
            &complete::Inline(&self.blobs),
            action,
            result,
        ))
    }

    /// The stored result without the completeness check (e.g. to inspect a failed run).
    pub fn get_unchecked(&self, instance: &str, action: &Digest) -> Result<Option<ActionResult>> {
        let Some(bytes) = self.entries.get(entry_key(instance, action))? else {
            return Ok(None);
        };
        let result = ActionResult::decode(bytes.as_ref()).map_err(|e| {
            CasError::invalid(format!("stored ActionResult for {action:?}"), e.to_string())
        })?;
        Ok(Some(result))
    }

    /// Removes an entry; returns whether there was one.
    pub fn remove(&self, instance: &str, action: &Digest) -> Result<bool> {
        let removed = self.entries.remove(entry_key(instance, action))?.is_some();
        if removed {
            self.count
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(removed)
    }

    /// Every result stored under `instance` (unchecked, as [`EmbeddedActionCache::get_unchecked`]), for
    /// a namespace's owner to take stock of it (e.g. the executor's shared-unit index).
    pub fn results_in(&self, instance: &str) -> Result<Vec<ActionResult>> {
        // The key starts with the instance's length, so no other instance shares this prefix.
        let mut prefix = Vec::with_capacity(4 + instance.len());
        prefix.extend_from_slice(&(instance.len() as u32).to_be_bytes());
        prefix.extend_from_slice(instance.as_bytes());
        let mut results = Vec::new();
        for entry in self.entries.scan_prefix(prefix) {
            let (_, bytes) = entry?;
            let result = ActionResult::decode(bytes.as_ref()).map_err(|e| {
                CasError::invalid(
                    format!("stored ActionResult in {instance:?}"),
                    e.to_string(),
                )
            })?;
            results.push(result);
        }
        Ok(results)
    }

    /// Number of entries across all instances (a counter: no scan).
    pub fn len(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Relaxed) as usize
    }

    /// True when no entry is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every blob a result depends on, including the files inside its output trees
    /// ([`crate::layers::complete`] decides which).
    ///
    /// Fails with [`CasError::NotFound`] when a tree blob itself is missing.
    pub fn referenced_blobs(
        &self,
        function: DigestFunction,
        result: &ActionResult,
    ) -> Result<Vec<Digest>> {
        complete::run_inline(complete::referenced_blobs(
            &complete::Inline(&self.blobs),
            function,
            result,
        ))
    }
}

#[cfg(test)]
mod tests {
    use rba_proto::reapi::{Directory, FileNode, OutputDirectory, OutputFile, Tree};

    use super::*;

    fn cache() -> (tempfile::TempDir, BlobStore, EmbeddedActionCache) {
        let (dir, blobs) = BlobStore::scratch().unwrap();
        let cache = EmbeddedActionCache::open(blobs.clone()).unwrap();
        (dir, blobs, cache)
    }

    #[test]
    fn the_entry_count_follows_puts_and_removes_and_survives_a_reopen() {
        let (_dir, blobs, cache) = cache();
        let f = DigestFunction::Blake3;
        let result = ActionResult::default();
        let (a, b) = (f.digest_of(b"a"), f.digest_of(b"b"));
        assert!(cache.is_empty());
        cache.put("i", &a, &result).unwrap();
        cache.put("i", &a, &result).unwrap(); // replaced, not added
        cache.put("j", &a, &result).unwrap();
        cache.put("i", &b, &result).unwrap();
        assert_eq!(cache.len(), 3);
        assert!(cache.remove("i", &a).unwrap());
        assert!(!cache.remove("i", &a).unwrap());
        assert_eq!(cache.len(), 2);
        drop(cache);
        assert_eq!(EmbeddedActionCache::open(blobs).unwrap().len(), 2);
    }

    #[test]
    fn results_in_lists_one_instance_only() {
        let (_dir, _blobs, cache) = cache();
        let f = DigestFunction::Blake3;
        let result = |code| ActionResult {
            exit_code: code,
            ..Default::default()
        };
        cache.put("a", &f.digest_of(b"1"), &result(1)).unwrap();
        cache.put("a", &f.digest_of(b"2"), &result(2)).unwrap();
        cache.put("ab", &f.digest_of(b"3"), &result(3)).unwrap();
        cache.put("", &f.digest_of(b"4"), &result(4)).unwrap();
        let mut codes: Vec<i32> = cache
            .results_in("a")
            .unwrap()
            .iter()
            .map(|r| r.exit_code)
            .collect();
        codes.sort();
        assert_eq!(codes, [1, 2]);
        assert_eq!(cache.results_in("ab").unwrap().len(), 1);
        assert!(cache.results_in("none").unwrap().is_empty());
    }

    #[test]
    fn hit_only_when_complete_and_instances_are_separate() {
        let (_dir, blobs, cache) = cache();
        let f = DigestFunction::Sha256;
        let out = blobs.put_bytes(f, b"binary").unwrap();
        let inner = f.digest_of(b"inside a tree");
        let tree = Tree {
            root: Some(Directory {
                files: vec![FileNode {
                    name: "x".into(),
                    digest: Some(inner.to_reapi()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            children: vec![],
        };
        let tree_digest = blobs.put_bytes(f, &tree.encode_to_vec()).unwrap();
        let action = f.digest_of(b"action");
        let result = ActionResult {
            output_files: vec![OutputFile {
                path: "out".into(),
                digest: Some(out.to_reapi()),
                ..Default::default()
            }],
            output_directories: vec![OutputDirectory {
                path: "dir".into(),
                tree_digest: Some(tree_digest.to_reapi()),
                ..Default::default()
            }],
            ..Default::default()
        };
        cache.put("main", &action, &result).unwrap();
        assert_eq!(
            cache.get("main", &action).unwrap(),
            None,
            "file inside the tree is missing"
        );
        blobs.put_bytes(f, b"inside a tree").unwrap();
        assert_eq!(cache.get("main", &action).unwrap(), Some(result.clone()));
        assert_eq!(cache.get("other", &action).unwrap(), None);
        std::fs::remove_file(blobs.blob_path(&out)).unwrap();
        assert_eq!(
            cache.get("main", &action).unwrap(),
            None,
            "output file vanished"
        );
        assert!(cache.get_unchecked("main", &action).unwrap().is_some());
    }

    #[test]
    fn malformed_result_is_refused() {
        let (_dir, _blobs, cache) = cache();
        let action = DigestFunction::Sha256.digest_of(b"a");
        let result = ActionResult {
            output_files: vec![OutputFile {
                path: "out".into(),
                digest: Some(rba_proto::reapi::Digest {
                    hash: "nothex".into(),
                    size_bytes: 1,
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(cache.put("", &action, &result).is_err());
        assert!(cache.is_empty());
    }
}
