//! Validation of `Directory` messages, and reading stored trees (always validated).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use rba_proto::Message;
use rba_proto::reapi::{self, Directory, Tree};

use crate::digest::{Digest, DigestFunction};
use crate::error::{CasError, Result};
use crate::layers::complete;
use crate::merkle::TreeLimits;
use crate::seams::{Grants, Store};
use crate::store::BlobStore;

/// `Directory` blobs larger than this are refused when read.
pub const MAX_DIRECTORY_BYTES: u64 = 64 << 20;

/// Checks a `Directory` against REAPI's rules, naming the offending entry: names non-empty,
/// not `.` or `..`, free of `/` and NUL; each list sorted by name (byte order) without
/// duplicates; no name shared between files, directories and symlinks; every file and directory
/// has a well-formed digest; symlink targets non-empty and free of NUL.
///
/// `node_properties` are allowed (clients may send them); our own trees never set them.
pub fn validate_directory(directory: &Directory) -> Result<()> {
    validate(directory, DigestFunction::Sha256)
        .map_err(|reason| CasError::invalid("Directory", reason))
}

/// Validates with digests parsed for `function`; returns the reason on failure.
fn validate(directory: &Directory, function: DigestFunction) -> std::result::Result<(), String> {
    check_list("file", directory.files.iter().map(|f| f.name.as_str()))?;
    check_list(
        "directory",
        directory.directories.iter().map(|d| d.name.as_str()),
    )?;
    check_list(
        "symlink",
        directory.symlinks.iter().map(|s| s.name.as_str()),
    )?;
    let mut all: Vec<&str> = directory
        .files
        .iter()
        .map(|f| f.name.as_str())
        .chain(directory.directories.iter().map(|d| d.name.as_str()))
        .chain(directory.symlinks.iter().map(|s| s.name.as_str()))
        .collect();
    all.sort_unstable();
    if let Some(pair) = all.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(format!("name {:?} is used by more than one entry", pair[0]));
    }
    for file in &directory.files {
        check_digest("file", &file.name, file.digest.as_ref(), function)?;
    }
    for dir in &directory.directories {
        check_digest("directory", &dir.name, dir.digest.as_ref(), function)?;
    }
    for link in &directory.symlinks {
        if link.target.is_empty() {
            return Err(format!("symlink {:?} has an empty target", link.name));
        }
        if link.target.contains('\0') {
            return Err(format!(
                "symlink {:?} has a NUL byte in its target",
                link.name
            ));
        }
    }
    Ok(())
}

fn check_list<'a>(
    kind: &str,
    names: impl Iterator<Item = &'a str>,
) -> std::result::Result<(), String> {
    let mut previous: Option<&str> = None;
    for name in names {
        check_name(kind, name)?;
        if let Some(previous) = previous {
            if previous == name {
                return Err(format!("duplicate {kind} name {name:?}"));
            }
            if previous > name {
                return Err(format!(
                    "{kind} names not sorted: {previous:?} comes before {name:?}"
                ));
            }
        }
        previous = Some(name);
    }
    Ok(())
}

fn check_name(kind: &str, name: &str) -> std::result::Result<(), String> {
    let problem = if name.is_empty() {
        "is empty"
    } else if name == "." || name == ".." {
        "is a relative reference"
    } else if name.contains('/') {
        "contains '/'"
    } else if name.contains('\0') {
        "contains a NUL byte"
    } else {
        return Ok(());
    };
    Err(format!("{kind} name {name:?} {problem}"))
}

fn check_digest(
    kind: &str,
    name: &str,
    digest: Option<&reapi::Digest>,
    function: DigestFunction,
) -> std::result::Result<Digest, String> {
    let digest = digest.ok_or_else(|| format!("{kind} {name:?} has no digest"))?;
    Digest::from_reapi(function, digest).map_err(|e| format!("{kind} {name:?}: {e}"))
}

/// Reads, decodes and validates a stored `Directory`.
pub fn read_directory(store: &BlobStore, digest: &Digest) -> Result<Directory> {
    let bytes = store.read_to_vec(digest, MAX_DIRECTORY_BYTES)?;
    decode_directory(digest, &bytes)
}

/// Decodes and validates a `Directory` blob, naming it in errors.
pub(crate) fn decode_directory(digest: &Digest, bytes: &[u8]) -> Result<Directory> {
    let what = || format!("Directory {digest:?}");
    let directory =
        Directory::decode(bytes).map_err(|e| CasError::invalid(what(), e.to_string()))?;
    validate(&directory, digest.function).map_err(|reason| CasError::invalid(what(), reason))?;
    Ok(directory)
}

/// The digests of a directory's files and subdirectories (already validated).
pub(crate) fn child_digests(
    directory: &Directory,
    function: DigestFunction,
) -> Result<(Vec<Digest>, Vec<Digest>)> {
    let files = directory
        .files
        .iter()
        .map(|f| Digest::from_reapi_field(function, f.digest.as_ref(), "FileNode.digest"))
        .collect::<Result<Vec<_>, _>>()?;
    let dirs = directory
        .directories
        .iter()
        .map(|d| Digest::from_reapi_field(function, d.digest.as_ref(), "DirectoryNode.digest"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((files, dirs))
}

/// Walks a stored tree breadth-first, visiting each distinct `Directory` once.
fn walk(
    store: &BlobStore,
    root: &Digest,
    mut visit: impl FnMut(&Digest, &Arc<Directory>, &[Digest]),
) -> Result<()> {
    let mut seen = HashSet::new();
    let mut queue = VecDeque::from([*root]);
    seen.insert(*root);
    while let Some(digest) = queue.pop_front() {
        let directory = Arc::new(read_directory(store, &digest)?);
        let (files, dirs) = child_digests(&directory, root.function)?;
        visit(&digest, &directory, &files);
        for sub in dirs {
            if seen.insert(sub) {
                queue.push_back(sub);
            }
        }
    }
    Ok(())
}

/// Every blob of a stored tree without duplicates: the root `Directory` first, then the other
/// directories breadth-first, then file contents. Fails with [`CasError::NotFound`] when a
/// `Directory` is missing (missing *files* are listed, not checked: ask `find_missing`).
pub fn tree_digests(store: &BlobStore, root: &Digest) -> Result<Vec<Digest>> {
    complete::run_inline(digests_of_tree(
        &complete::Inline(store),
        root,
        TreeWalk::default(),
    ))
}

/// Blobs of the tree under `root` that `store` lacks, sorted: a missing (or unreadable)
/// `Directory` is listed and hides its subtree; a `Directory` naming a malformed digest is
/// listed as if missing, as nothing under it can be trusted to be complete.
pub fn missing_in_tree(store: &BlobStore, root: &Digest) -> Vec<Digest> {
    let mut missing = Vec::new();
    let mut seen = HashSet::from([*root]);
    let mut queue = vec![*root];
    while let Some(digest) = queue.pop() {
        let children = read_directory(store, &digest)
            .and_then(|directory| child_digests(&directory, digest.function));
        let Ok((files, dirs)) = children else {
            missing.push(digest);
            continue;
        };
        match store.find_missing(&files) {
            Ok(absent) => missing.extend(absent),
            Err(_) => missing.extend(files),
        }
        queue.extend(dirs.into_iter().filter(|dir| seen.insert(*dir)));
    }
    missing.sort();
    missing.dedup();
    missing
}

/// [`tree_digests`] over any [`Store`]: the same walk, each `Directory` read through the seam.
pub async fn tree_digests_in(store: &dyn Store, root: &Digest) -> Result<Vec<Digest>> {
    digests_of_tree(&complete::Seam(store), root, TreeWalk::default()).await
}

/// [`tree_digests_in`] on behalf of `tenants`: a `Directory` none of them may read is listed
/// but not opened, so its subtree is not (the caller must not learn what another tenant's
/// directory holds by naming it in a tree of its own). The root is opened as any other.
pub async fn tree_digests_readable_in(
    store: &dyn Store,
    root: &Digest,
    grants: &dyn Grants,
    tenants: &[&str],
) -> Result<Vec<Digest>> {
    let walk = TreeWalk {
        readable_by: Some((grants, tenants)),
        ..TreeWalk::default()
    };
    digests_of_tree(&complete::Seam(store), root, walk).await
}

/// How [`digests_of_tree`] walks: within which bounds, and whether each level's blobs are
/// first made local in a store (a worker fetching a tree from the shared tier).
#[derive(Clone, Copy, Default)]
pub(crate) struct TreeWalk<'a> {
    /// Bounds checked after each level (a hostile tree stops the walk early).
    pub(crate) limits: Option<&'a TreeLimits>,
    /// Before a level's directories are read, they are made local in this store; after, the
    /// files they name.
    pub(crate) make_local_in: Option<&'a dyn Store>,
    /// Only directories one of these tenants may read are opened (the others are listed).
    pub(crate) readable_by: Option<(&'a dyn Grants, &'a [&'a str])>,
}

/// The one walk of a stored tree, level by level (so a fetching walk asks for a whole level in
/// one batch), behind [`tree_digests`], [`tree_digests_in`] and
/// [`crate::merkle::make_tree_local`]. Lists each directory once and each file once, in the
/// order [`tree_digests`] documents.
pub(crate) async fn digests_of_tree(
    source: &dyn complete::BlobSource,
    root: &Digest,
    walk: TreeWalk<'_>,
) -> Result<Vec<Digest>> {
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    let mut seen_files = HashSet::new();
    let mut seen = HashSet::from([*root]);
    let mut level = vec![*root];
    let mut tally = Tally::default();
    while !level.is_empty() {
        if let Some(store) = walk.make_local_in {
            store.make_local(&level).await?;
        }
        let files_before = files.len();
        let mut next = Vec::new();
        let closed: HashSet<Digest> = match walk.readable_by {
            Some((grants, tenants)) => grants
                .not_readable_by_any(tenants, &level)
                .await?
                .into_iter()
                .collect(),
            None => HashSet::new(),
        };
        for digest in level.iter().filter(|d| !closed.contains(d)) {
            let bytes = source.read_whole(digest, MAX_DIRECTORY_BYTES).await?;
            let directory = decode_directory(digest, &bytes)?;
            tally.directory_bytes += digest.size;
            tally.entries += (directory.files.len()
                + directory.directories.len()
                + directory.symlinks.len()) as u64;
            let (file_digests, subdirectories) = child_digests(&directory, root.function)?;
            for file in file_digests {
                if seen_files.insert(file) {
                    tally.file_bytes += file.size;
                    files.push(file);
                }
            }
            next.extend(subdirectories.into_iter().filter(|d| seen.insert(*d)));
        }
        if !next.is_empty() {
            tally.depth += 1;
        }
        if let Some(limits) = walk.limits {
            tally.check(limits)?;
        }
        if let Some(store) = walk.make_local_in {
            store.make_local(&files[files_before..]).await?;
        }
        dirs.append(&mut level);
        level = next;
    }
    dirs.extend(files);
    Ok(dirs)
}

/// What a walk has seen so far, against [`TreeLimits`].
#[derive(Default)]
struct Tally {
    entries: u64,
    depth: u64,
    file_bytes: u64,
    directory_bytes: u64,
}

impl Tally {
    fn check(&self, limits: &TreeLimits) -> Result<()> {
        let broken = if self.entries > limits.max_entries {
            format!("more than {} entries", limits.max_entries)
        } else if self.file_bytes > limits.max_total_bytes {
            format!("more than {} bytes of files", limits.max_total_bytes)
        } else if self.directory_bytes > limits.max_directory_bytes {
            format!(
                "more than {} bytes of directories",
                limits.max_directory_bytes
            )
        } else if self.depth >= limits.max_depth {
            format!("deeper than {} levels", limits.max_depth)
        } else {
            return Ok(());
        };
        Err(CasError::QuotaExceeded(format!("input tree has {broken}")))
    }
}

/// The file a `/`-separated `path` names in a stored tree, following the tree's own symlinks
/// (lexically, inside the tree, at most 40 of them), as a process in the materialised tree would
/// see it. `None` when the path names nothing, a directory, or a dangling or looping link;
/// returns the file's digest and executable bit. Reads only the directories on the way.
pub fn find_file(store: &BlobStore, root: &Digest, path: &str) -> Result<Option<(Digest, bool)>> {
    let mut pending: VecDeque<String> = path.split('/').map(str::to_string).collect();
    // The directories from the root to where the walk stands.
    let mut stack = vec![*root];
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        match name.as_str() {
            "" | "." => continue,
            ".." => {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            _ => {}
        }
        let directory = read_directory(store, stack.last().expect("the root stays"))?;
        if let Some(file) = directory.files.iter().find(|f| f.name == name) {
            if !pending.iter().all(|rest| rest.is_empty() || rest == ".") {
                return Ok(None);
            }
            let digest =
                Digest::from_reapi_field(root.function, file.digest.as_ref(), "FileNode.digest")?;
            return Ok(Some((digest, file.is_executable)));
        }
        if let Some(dir) = directory.directories.iter().find(|d| d.name == name) {
            stack.push(Digest::from_reapi_field(
                root.function,
                dir.digest.as_ref(),
                "DirectoryNode.digest",
            )?);
            continue;
        }
        if let Some(link) = directory.symlinks.iter().find(|l| l.name == name) {
            links += 1;
            if links > 40 || link.target.starts_with('/') {
                return Ok(None);
            }
            for component in link.target.rsplit('/') {
                pending.push_front(component.to_string());
            }
            continue;
        }
        return Ok(None);
    }
    Ok(None)
}

/// The REAPI `Tree` of a stored root: the root `Directory` and every distinct descendant.
pub fn get_tree(store: &BlobStore, root: &Digest) -> Result<Tree> {
    let mut tree = Tree::default();
    walk(store, root, |digest, directory, _| {
        if digest == root {
            tree.root = Some((**directory).clone());
        } else {
            tree.children.push((**directory).clone());
        }
    })?;
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use rba_proto::reapi::{DirectoryNode, FileNode, SymlinkNode};

    use super::*;

    fn file(name: &str) -> FileNode {
        FileNode {
            name: name.into(),
            digest: Some(DigestFunction::Sha256.digest_of(b"x").to_reapi()),
            ..Default::default()
        }
    }

    fn dir(name: &str) -> DirectoryNode {
        DirectoryNode {
            name: name.into(),
            digest: Some(DigestFunction::Sha256.digest_of(b"d").to_reapi()),
        }
    }

    fn refused(directory: Directory, needle: &str) {
        match validate_directory(&directory) {
            Err(CasError::Invalid { reason, .. }) => {
                assert!(
                    reason.contains(needle),
                    "{reason:?} should mention {needle:?}"
                )
            }
            other => panic!("expected Invalid mentioning {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn valid_directory_passes() {
        let directory = Directory {
            files: vec![file("a"), file("b")],
            directories: vec![dir("c")],
            symlinks: vec![SymlinkNode {
                name: "d".into(),
                target: "a".into(),
                node_properties: None,
            }],
            node_properties: None,
        };
        validate_directory(&directory).unwrap();
    }

    #[test]
    fn every_invalid_case_is_named() {
        refused(
            Directory {
                files: vec![file("b"), file("a")],
                ..Default::default()
            },
            "not sorted",
        );
        refused(
            Directory {
                files: vec![file("a"), file("a")],
                ..Default::default()
            },
            "duplicate file name \"a\"",
        );
        refused(
            Directory {
                files: vec![file("a")],
                directories: vec![dir("a")],
                ..Default::default()
            },
            "\"a\" is used",
        );
        refused(
            Directory {
                directories: vec![dir("s")],
                symlinks: vec![SymlinkNode {
                    name: "s".into(),
                    target: "x".into(),
                    node_properties: None,
                }],
                ..Default::default()
            },
            "\"s\" is used",
        );
        refused(
            Directory {
                files: vec![file("a/b")],
                ..Default::default()
            },
            "contains '/'",
        );
        refused(
            Directory {
                files: vec![file("a\0")],
                ..Default::default()
            },
            "NUL",
        );
        refused(
            Directory {
                directories: vec![dir("..")],
                ..Default::default()
            },
            "\"..\"",
        );
        refused(
            Directory {
                directories: vec![dir(".")],
                ..Default::default()
            },
            "\".\"",
        );
        refused(
            Directory {
                files: vec![file("")],
                ..Default::default()
            },
            "is empty",
        );
        refused(
            Directory {
                files: vec![FileNode {
                    name: "nodigest".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            "\"nodigest\" has no digest",
        );
        refused(
            Directory {
                directories: vec![DirectoryNode {
                    name: "x".into(),
                    digest: None,
                }],
                ..Default::default()
            },
            "\"x\" has no digest",
        );
        let bad = reapi::Digest {
            hash: "zz".into(),
            size_bytes: 1,
        };
        refused(
            Directory {
                files: vec![FileNode {
                    name: "bad".into(),
                    digest: Some(bad),
                    ..Default::default()
                }],
                ..Default::default()
            },
            "\"bad\"",
        );
        refused(
            Directory {
                symlinks: vec![SymlinkNode {
                    name: "l".into(),
                    target: String::new(),
                    node_properties: None,
                }],
                ..Default::default()
            },
            "empty target",
        );
    }

    #[test]
    fn invalid_stored_directory_is_refused_on_read() {
        let (_tmp, store) = BlobStore::scratch().unwrap();
        let bad = Directory {
            files: vec![file("b"), file("a")],
            ..Default::default()
        };
        let digest = store
            .put_bytes(DigestFunction::Sha256, &bad.encode_to_vec())
            .unwrap();
        let err = read_directory(&store, &digest).unwrap_err();
        assert!(err.to_string().contains(&digest.hash_hex()), "{err}");
        assert!(tree_digests(&store, &digest).is_err());
        let garbage = store
            .put_bytes(DigestFunction::Sha256, b"\xff\xff\xff")
            .unwrap();
        assert!(matches!(
            read_directory(&store, &garbage),
            Err(CasError::Invalid { .. })
        ));
        let missing = DigestFunction::Sha256.digest_of(b"nope");
        assert!(matches!(
            get_tree(&store, &missing),
            Err(CasError::NotFound(_))
        ));
    }
}
