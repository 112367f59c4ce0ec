//! The action cache: `(instance name, action digest) → ActionResult`, stored in the store's sled
//! database.
//!
//! Contract: [`EmbeddedActionCache::get`] returns an entry only when every blob it references is present
//! (output files, every file inside each output directory's `Tree`, the tree blobs themselves,
//! stdout and stderr), and marks those blobs as just used so that eviction cannot break the hit
//! it just served. This is the completeness check REAPI asks for: a client told "hit" never finds
//! an output missing. Instance names separate action caches; blobs are shared by all instances.

use rba_proto::Message;
use rba_proto::reapi::{ActionResult, Tree};

use crate::digest::{Digest, DigestFunction};
use crate::error::{CasError, Result};
use crate::store::BlobStore;

/// Trees larger than this are not decoded for the completeness check (they are refused).
const MAX_TREE_BYTES: u64 = 64 << 20;

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
        referenced_digests(action.function, result)?;
        let previous = self
            .entries
            .insert(entry_key(instance, action), result.encode_to_vec())?;
        if previous.is_none() {
            self.count
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// The stored result, only if everything it references is present.
    pub fn get(&self, instance: &str, action: &Digest) -> Result<Option<ActionResult>> {
        let Some(result) = self.get_unchecked(instance, action)? else {
            return Ok(None);
        };
        let referenced = match self.referenced_blobs(action.function, &result) {
            Ok(referenced) => referenced,
            Err(CasError::NotFound(missing)) => {
                tracing::debug!(?action, ?missing, "action result incomplete");
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let missing = self.blobs.find_missing_on_disk(&referenced)?;
        if !missing.is_empty() {
            tracing::debug!(?action, missing = missing.len(), "action result incomplete");
            return Ok(None);
        }
        self.blobs.touch(&referenced)?;
        Ok(Some(result))
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

    /// Every blob a result depends on, including the files inside its output trees.
    ///
    /// Fails with [`CasError::NotFound`] when a tree blob itself is missing.
    pub fn referenced_blobs(
        &self,
        function: DigestFunction,
        result: &ActionResult,
    ) -> Result<Vec<Digest>> {
        let mut digests = referenced_digests(function, result)?;
        for directory in &result.output_directories {
            let tree_digest = Digest::from_reapi_field(
                function,
                directory.tree_digest.as_ref(),
                "OutputDirectory.tree_digest",
            )?;
            let bytes = self.blobs.read_to_vec(&tree_digest, MAX_TREE_BYTES)?;
            let tree = Tree::decode(bytes.as_slice())
                .map_err(|e| CasError::invalid(format!("Tree {tree_digest:?}"), e.to_string()))?;
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
}

/// The digests an `ActionResult` names directly (not those inside its trees); an error names
/// the first malformed one. Every backend's `put` checks a result with it.
pub(crate) fn referenced_digests(
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
        digests.push(Digest::from_reapi_field(
            function,
            directory.tree_digest.as_ref(),
            "OutputDirectory.tree_digest",
        )?);
    }
    for digest in [&result.stdout_digest, &result.stderr_digest]
        .into_iter()
        .flatten()
    {
        digests.push(Digest::from_reapi(function, digest)?);
    }
    Ok(digests)
}

#[cfg(test)]
mod tests {
    use rba_proto::reapi::{Directory, FileNode, OutputDirectory, OutputFile};

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
