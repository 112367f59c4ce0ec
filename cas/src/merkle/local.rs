//! Making a stored tree local: every blob of a tree (its `Directory` blobs and its files) made
//! readable from a [`Store`]'s local tier, level by level, before a worker materialises it.
//!
//! Why here: a worker of a scale-out deployment receives an input root whose blobs live in the
//! shared (slow) tier; materialisation hardlinks files from the local filesystem tier. A tree
//! can only be enumerated by reading its directories, so each level is fetched in one batch
//! (bounded by [`TreeLimits`], checked as the walk goes, so a hostile tree cannot make a worker
//! fetch without end) and the next level read from the blobs just made local.

use crate::digest::Digest;
use crate::error::Result;
use crate::layers::complete::Seam;
use crate::merkle::TreeLimits;
use crate::merkle::validate::{TreeWalk, digests_of_tree};
use crate::seams::Store;

/// Makes every blob of the tree under `root` readable from `store.local()`; returns how many
/// blobs the tree lists ([`crate::tree_digests`]). Fails with [`CasError::NotFound`] naming a
/// blob no tier holds, or [`CasError::QuotaExceeded`] when the tree breaks `limits` (entries,
/// depth, bytes). The walk is the one of [`crate::tree_digests_in`], fetching each level.
///
/// [`CasError::NotFound`]: crate::CasError::NotFound
/// [`CasError::QuotaExceeded`]: crate::CasError::QuotaExceeded
pub async fn make_tree_local(store: &dyn Store, root: &Digest, limits: &TreeLimits) -> Result<u64> {
    let walk = TreeWalk {
        limits: Some(limits),
        make_local_in: Some(store),
        ..TreeWalk::default()
    };
    let listed = digests_of_tree(&Seam(store), root, walk).await?;
    Ok(listed.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::TreeBuilder;
    use crate::{Cas, CasError, DigestFunction};

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
