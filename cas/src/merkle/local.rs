//! Making a stored tree local: every blob of a tree (its `Directory` blobs and its files) made
//! readable from a [`Store`]'s local tier, level by level, before a worker materialises it.
//!
//! Why here: a worker of a scale-out deployment receives an input root whose blobs live in the
//! shared (slow) tier; materialisation hardlinks files from the local filesystem tier. A tree
//! can only be enumerated by reading its directories, so each level is fetched in one batch
//! (bounded by [`TreeLimits`], checked as the walk goes, so a hostile tree cannot make a worker
//! fetch without end) and the next level read from the blobs just made local.

use std::collections::HashSet;

use crate::digest::Digest;
use crate::error::{CasError, Result};
use crate::merkle::TreeLimits;
use crate::merkle::validate::{child_digests, decode_directory};
use crate::seams::Store;

/// Largest `Directory` blob read while walking (as the validation bounds it).
const MAX_DIRECTORY_BYTES: u64 = 64 << 20;

/// Makes every blob of the tree under `root` readable from `store.local()`; returns how many
/// distinct blobs the tree has. Fails with [`CasError::NotFound`] naming a blob no tier holds,
/// or [`CasError::QuotaExceeded`] when the tree breaks `limits` (entries, depth, bytes).
pub async fn make_tree_local(store: &dyn Store, root: &Digest, limits: &TreeLimits) -> Result<u64> {
    let mut seen: HashSet<Digest> = HashSet::from([*root]);
    let mut level = vec![*root];
    let (mut entries, mut depth, mut file_bytes, mut directory_bytes) = (0u64, 0u64, 0u64, 0u64);
    while !level.is_empty() {
        store.make_local(&level).await?;
        let mut files = Vec::new();
        let mut next = Vec::new();
        for digest in &level {
            directory_bytes += digest.size;
            let bytes = store.read_to_vec(digest, MAX_DIRECTORY_BYTES).await?;
            let directory = decode_directory(digest, &bytes)?;
            entries += (directory.files.len()
                + directory.directories.len()
                + directory.symlinks.len()) as u64;
            let (file_digests, dir_digests) = child_digests(&directory, root.function)?;
            for file in file_digests {
                if seen.insert(file) {
                    file_bytes += file.size;
                    files.push(file);
                }
            }
            next.extend(dir_digests.into_iter().filter(|d| seen.insert(*d)));
        }
        check(entries <= limits.max_entries, || {
            format!("more than {} entries", limits.max_entries)
        })?;
        check(file_bytes <= limits.max_total_bytes, || {
            format!("more than {} bytes of files", limits.max_total_bytes)
        })?;
        check(directory_bytes <= limits.max_directory_bytes, || {
            format!(
                "more than {} bytes of directories",
                limits.max_directory_bytes
            )
        })?;
        if !next.is_empty() {
            depth += 1;
            check(depth < limits.max_depth, || {
                format!("deeper than {} levels", limits.max_depth)
            })?;
        }
        store.make_local(&files).await?;
        level = next;
    }
    Ok(seen.len() as u64)
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(CasError::QuotaExceeded(format!(
            "input tree has {}",
            what()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::TreeBuilder;
    use crate::{Cas, DigestFunction};

    #[tokio::test]
    async fn a_local_store_has_every_blob_and_limits_hold() {
        let (_dir, cas) = Cas::scratch().unwrap();
        let function = DigestFunction::Sha256;
        let mut tree = TreeBuilder::new(function);
        for (path, bytes) in [("a/b/c.txt", &b"c"[..]), ("a/d.txt", b"d"), ("e.txt", b"e")] {
            let digest = cas.blobs.put_bytes(function, bytes).unwrap();
            tree.add_file(path, digest, false).unwrap();
        }
        let root = tree.finish(&cas.blobs).unwrap().root;
        // 3 directories (root, a, a/b) and 3 files.
        assert_eq!(
            make_tree_local(&cas.blobs, &root, &TreeLimits::default())
                .await
                .unwrap(),
            6
        );

        let shallow = TreeLimits {
            max_depth: 2,
            ..TreeLimits::default()
        };
        let error = make_tree_local(&cas.blobs, &root, &shallow)
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("deeper than 2 levels"),
            "{error}"
        );
        let few = TreeLimits {
            max_entries: 2,
            ..TreeLimits::default()
        };
        let error = make_tree_local(&cas.blobs, &root, &few).await.unwrap_err();
        assert!(error.to_string().contains("more than 2 entries"), "{error}");

        let absent = function.digest_of(b"a Directory no tier holds");
        match make_tree_local(&cas.blobs, &absent, &TreeLimits::default()).await {
            Err(CasError::NotFound(digest)) => assert_eq!(digest, absent),
            other => panic!("expected NotFound, got {other:?}"),
        }
    }
}
