//! Merkle trees: canonical REAPI `Directory` trees built from a directory on disk or a zip
//! archive, stored blob by blob in the CAS, enumerated, and materialised back onto disk.
//!
//! Canonical form (so that a root digest depends on content only, never on the host):
//! - files, directories and symlinks each sorted by name in byte order, names unique across
//!   the three lists;
//! - a file carries its digest and its executable bit, nothing else: no `node_properties`,
//!   no mtimes, no modes;
//! - symlinks are `SymlinkNode`s whose targets stay inside the tree (relative, every `..`
//!   leading, never climbing above the root; see [`check_symlink_target`]).
//!
//! Modules:
//! - [`TreeBuilder`] (here): the in-memory tree every source feeds, and its storage.
//! - `validate`: [`validate_directory`], [`read_directory`], [`tree_digests`] (and
//!   [`tree_digests_in`] over any store), [`get_tree`].
//! - `disk`: [`build_from_dir`] (gitignore-aware, parallel, with the stat cache).
//! - `stat_cache`: [`StatCache`], `(path, size, mtime, ctime, inode) → digest`.
//! - `archive`: [`build_from_zip`] with [`ZipLimits`] against hostile archives.
//! - `materialize`: [`materialize`] a stored tree into an empty directory.
//! - `local`: [`make_tree_local`], a stored tree's blobs fetched into a store's local tier
//!   level by level (a scale-out worker, before it materialises).
//! - `input_tree`: [`validate_tree`], a whole input tree checked against [`TreeLimits`]
//!   (expanded size, depth, names, symlinks) from its distinct blobs, before anything touches
//!   disk.
//! - [`beneath`]: host-side filesystem calls under a directory that no tree path (nor a symlink
//!   a job left there) can steer outside it.

mod archive;
pub mod beneath;
mod disk;
mod input_tree;
mod local;
mod materialize;
mod stat_cache;
mod validate;

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use parking_lot::Mutex;
use rayon::prelude::*;
use rba_proto::Message;
use rba_proto::reapi::{Directory, DirectoryNode, FileNode, SymlinkNode};

pub use archive::{ZipLimits, build_from_zip, build_from_zip_file};
pub use disk::{DirOptions, build_from_dir};
pub use input_tree::{
    MAX_NAME_BYTES, MAX_SYMLINK_TARGET_BYTES, TreeLimits, TreeSummary, validate_tree,
};
pub use local::make_tree_local;
pub use materialize::{MaterializeOptions, Materialized, MaterializedFile, materialize};
pub use stat_cache::StatCache;
pub use validate::{
    MAX_DIRECTORY_BYTES, find_file, get_tree, missing_in_tree, read_directory, tree_digests,
    tree_digests_in, tree_digests_readable_in, validate_directory,
};

use crate::digest::{Digest, DigestFunction};
use crate::error::{CasError, Result};
use crate::store::{BlobStore, StagedBlob};

/// What building a tree did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TreeStats {
    /// File entries in the tree (a content present twice counts twice).
    pub files: u64,
    /// Directories, the root included.
    pub directories: u64,
    /// Symlink entries.
    pub symlinks: u64,
    /// Sum of the sizes of all file entries.
    pub bytes: u64,
    /// Files whose content was read and hashed.
    pub files_hashed: u64,
    /// Files whose digest came from the stat cache without reading them.
    pub stat_cache_hits: u64,
    /// Blobs (files and `Directory` messages) that were not in the store before.
    pub new_blobs: u64,
    /// Bytes of those new blobs.
    pub new_bytes: u64,
}

/// A stored tree: its root `Directory` digest, what building it did, and every blob it holds.
#[derive(Clone, Debug)]
pub struct TreeBuild {
    /// Digest of the root `Directory` message.
    pub root: Digest,
    /// Counters.
    pub stats: TreeStats,
    /// Every blob of the tree, without duplicates: each `Directory` (root first) and each file
    /// content. This is what a client asks `FindMissingBlobs` about before uploading.
    pub blobs: Vec<Digest>,
}

enum Node {
    File { digest: Digest, executable: bool },
    Symlink(String),
    Dir(DirNode),
}

#[derive(Default)]
struct DirNode {
    entries: BTreeMap<String, Node>,
    /// Added by name (not only implied by a deeper path): a second explicit add is a duplicate.
    explicit: bool,
}

/// An in-memory tree of digests, turned into canonical `Directory` blobs by
/// [`TreeBuilder::finish`]. Insertion order does not matter.
///
/// Paths are relative, `/`-separated; empty and `.` components are skipped, `..`, NUL and
/// absolute paths are refused. A path added twice, or a path that is both a file (or symlink)
/// and a directory, is refused with [`CasError::HostileEntry`] naming it.
pub struct TreeBuilder {
    function: DigestFunction,
    root: DirNode,
    files: u64,
    symlinks: u64,
    bytes: u64,
}

impl TreeBuilder {
    /// An empty tree whose blobs will be hashed with `function`.
    pub fn new(function: DigestFunction) -> Self {
        TreeBuilder {
            function,
            root: DirNode {
                explicit: true,
                ..Default::default()
            },
            files: 0,
            symlinks: 0,
            bytes: 0,
        }
    }

    /// The tree's digest function.
    pub fn function(&self) -> DigestFunction {
        self.function
    }

    /// Adds a file whose content is already stored (or will be before the tree is used).
    pub fn add_file(&mut self, path: &str, digest: Digest, executable: bool) -> Result<()> {
        if digest.function != self.function {
            return Err(CasError::invalid(
                format!("file {path:?}"),
                format!("digest {digest:?} is not a {} digest", self.function),
            ));
        }
        self.insert(path, Some(Node::File { digest, executable }))?;
        self.files += 1;
        self.bytes += digest.size;
        Ok(())
    }

    /// Adds a directory (parents of added paths are implied; this adds empty ones).
    pub fn add_directory(&mut self, path: &str) -> Result<()> {
        self.insert(path, None)
    }

    /// Adds a symlink. Its target must stay inside the tree ([`check_symlink_target`]).
    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<()> {
        let depth = split_path(path)?.len().saturating_sub(1);
        check_symlink_target(path, depth, target)?;
        self.insert(path, Some(Node::Symlink(target.to_string())))?;
        self.symlinks += 1;
        Ok(())
    }

    fn insert(&mut self, path: &str, leaf: Option<Node>) -> Result<()> {
        let components = split_path(path)?;
        let Some((last, parents)) = components.split_last() else {
            return match leaf {
                None => Ok(()),
                Some(_) => Err(CasError::hostile(path, "empty path")),
            };
        };
        let mut dir = &mut self.root;
        for (i, component) in parents.iter().enumerate() {
            let node = dir
                .entries
                .entry(component.to_string())
                .or_insert_with(|| Node::Dir(DirNode::default()));
            let Node::Dir(next) = node else {
                return Err(CasError::hostile(
                    path,
                    format!(
                        "{:?} is a file or symlink, so it cannot contain entries",
                        components[..=i].join("/")
                    ),
                ));
            };
            dir = next;
        }
        match (dir.entries.entry(last.to_string()), leaf) {
            (Entry::Vacant(slot), Some(node)) => {
                slot.insert(node);
            }
            (Entry::Vacant(slot), None) => {
                slot.insert(Node::Dir(DirNode {
                    explicit: true,
                    ..Default::default()
                }));
            }
            (Entry::Occupied(mut slot), None) => match slot.get_mut() {
                Node::Dir(existing) if !existing.explicit => existing.explicit = true,
                Node::Dir(_) => return Err(CasError::hostile(path, "duplicate path")),
                _ => {
                    return Err(CasError::hostile(
                        path,
                        "path is both a file (or symlink) and a directory",
                    ));
                }
            },
            (Entry::Occupied(slot), Some(_)) => {
                return Err(CasError::hostile(
                    path,
                    match slot.get() {
                        Node::Dir(_) => "path is both a file (or symlink) and a directory",
                        _ => "duplicate path",
                    },
                ));
            }
        }
        Ok(())
    }

    /// Encodes every directory as a canonical `Directory` message, stores them (children in
    /// parallel), and returns the root digest. File contents are not touched: the caller stored
    /// them. `stats.new_*` count only the directory blobs stored here.
    pub fn finish(self, store: &BlobStore) -> Result<TreeBuild> {
        self.finish_with(store, PendingBlobs::default())
    }

    /// [`TreeBuilder::finish`], publishing the directory blobs together with `pending` (the
    /// file blobs the caller staged): one group commit for the whole tree.
    pub(crate) fn finish_with(self, store: &BlobStore, pending: PendingBlobs) -> Result<TreeBuild> {
        let sink = Sink {
            store: Some(store),
            pending,
            acc: Mutex::default(),
        };
        let root = store_dirs(self.function, &self.root, &sink)?;
        let Sink { pending, acc, .. } = sink;
        pending.publish(store)?;
        Ok(self.into_build(root, acc))
    }

    /// The root digest the tree would have, storing nothing.
    pub fn root_digest(&self) -> Result<Digest> {
        store_dirs(
            self.function,
            &self.root,
            &Sink {
                store: None,
                pending: PendingBlobs::default(),
                acc: Mutex::default(),
            },
        )
    }

    fn into_build(self, root: Digest, acc: Mutex<Acc>) -> TreeBuild {
        let acc = acc.into_inner();
        let mut dirs = acc.dirs;
        // Root first, then the others in a stable order.
        dirs.retain(|d| *d != root);
        dirs.sort();
        dirs.dedup();
        let mut blobs = Vec::with_capacity(dirs.len() + 1 + self.files as usize);
        blobs.push(root);
        blobs.extend(dirs);
        let mut files = Vec::with_capacity(self.files as usize);
        collect_files(&self.root, &mut files);
        files.sort();
        files.dedup();
        blobs.extend(files);
        TreeBuild {
            root,
            stats: TreeStats {
                files: self.files,
                directories: acc.directories,
                symlinks: self.symlinks,
                bytes: self.bytes,
                new_blobs: acc.new_blobs,
                new_bytes: acc.new_bytes,
                ..Default::default()
            },
            blobs,
        }
    }
}

/// The digests of every file under `root` (a loop with a stack of directories to visit).
fn collect_files(root: &DirNode, out: &mut Vec<Digest>) {
    let mut unvisited = vec![root];
    while let Some(dir) = unvisited.pop() {
        for node in dir.entries.values() {
            match node {
                Node::File { digest, .. } => out.push(*digest),
                Node::Dir(sub) => unvisited.push(sub),
                Node::Symlink(_) => {}
            }
        }
    }
}

#[derive(Default)]
struct Acc {
    dirs: Vec<Digest>,
    directories: u64,
    new_blobs: u64,
    new_bytes: u64,
}

struct Sink<'a> {
    store: Option<&'a BlobStore>,
    pending: PendingBlobs,
    acc: Mutex<Acc>,
}

/// Encodes and stores every directory of the tree under `root`, the deepest level first and
/// each level's directories in parallel; returns the root's digest. A loop over levels, not a
/// recursion: a tree's depth costs no stack.
fn store_dirs(function: DigestFunction, root: &DirNode, sink: &Sink<'_>) -> Result<Digest> {
    // Every directory once, breadth-first (so each level is one run of the list), with the
    // indexes of its subdirectories in the order of its entries.
    let mut dirs: Vec<&DirNode> = vec![root];
    let mut subdirs: Vec<Vec<usize>> = Vec::new();
    // Level k is `dirs[bounds[k]..bounds[k + 1]]`.
    let mut bounds = vec![0, 1];
    loop {
        let level = bounds[bounds.len() - 2]..bounds[bounds.len() - 1];
        for at in level {
            let mut children = Vec::new();
            for node in dirs[at].entries.values() {
                if let Node::Dir(dir) = node {
                    children.push(dirs.len());
                    dirs.push(dir);
                }
            }
            subdirs.push(children);
        }
        if dirs.len() == bounds[bounds.len() - 1] {
            break;
        }
        bounds.push(dirs.len());
    }
    let mut digests: Vec<Option<Digest>> = vec![None; dirs.len()];
    for level in bounds.windows(2).rev().map(|w| w[0]..w[1]) {
        let stored: Vec<Digest> = level
            .clone()
            .into_par_iter()
            .map(|at| {
                let children = subdirs[at]
                    .iter()
                    .map(|&child| digests[child].expect("deeper levels are stored first"));
                store_dir(function, dirs[at], children, sink)
            })
            .collect::<Result<_>>()?;
        for (at, digest) in level.zip(stored) {
            digests[at] = Some(digest);
        }
    }
    Ok(digests[0].expect("the root is stored last"))
}

/// Encodes one directory, its subdirectories' digests given in the order of its entries, and
/// stages it.
fn store_dir(
    function: DigestFunction,
    node: &DirNode,
    mut subdigests: impl Iterator<Item = Digest>,
    sink: &Sink<'_>,
) -> Result<Digest> {
    let mut directory = Directory::default();
    for (name, child) in &node.entries {
        match child {
            Node::File { digest, executable } => directory.files.push(FileNode {
                name: name.clone(),
                digest: Some(digest.to_reapi()),
                is_executable: *executable,
                node_properties: None,
            }),
            Node::Symlink(target) => directory.symlinks.push(SymlinkNode {
                name: name.clone(),
                target: target.clone(),
                node_properties: None,
            }),
            Node::Dir(_) => directory.directories.push(DirectoryNode {
                name: name.clone(),
                digest: Some(
                    subdigests
                        .next()
                        .expect("one digest per subdirectory")
                        .to_reapi(),
                ),
            }),
        }
    }
    let bytes = directory.encode_to_vec();
    let digest = function.digest_of(&bytes);
    let new = match sink.store {
        Some(store) => sink.pending.stage_bytes(store, digest, &bytes)?,
        None => false,
    };
    let mut acc = sink.acc.lock();
    acc.dirs.push(digest);
    acc.directories += 1;
    if new {
        acc.new_blobs += 1;
        acc.new_bytes += digest.size;
    }
    Ok(digest)
}

/// The blobs of one tree build: written and verified as they come (in parallel), published
/// together at the end (one group commit, see [`BlobStore::publish`]), so a tree of thousands
/// of small files costs a few syncs, not one per file. Dropped unpublished, they vanish.
#[derive(Default)]
pub(crate) struct PendingBlobs(Mutex<Vec<StagedBlob>>);

impl PendingBlobs {
    /// Stages bytes whose digest is known; returns whether the blob is new to the store.
    pub(crate) fn stage_bytes(
        &self,
        store: &BlobStore,
        digest: Digest,
        bytes: &[u8],
    ) -> Result<bool> {
        let mut writer = store.writer(digest)?;
        if writer.already_present() {
            return Ok(false);
        }
        writer.write_chunk(bytes)?;
        self.push(writer.stage()?);
        Ok(true)
    }

    /// Adds a blob the caller staged.
    pub(crate) fn push(&self, blob: StagedBlob) {
        self.0.lock().push(blob);
    }

    /// Makes every staged blob durable and visible; the first failure is returned.
    pub(crate) fn publish(self, store: &BlobStore) -> Result<()> {
        store
            .publish(self.0.into_inner())
            .into_iter()
            .try_for_each(|result| result.map(|_| ()))
    }
}

/// The deepest path a [`TreeBuilder`] takes (directories above its last component, plus one).
///
/// Why: a tree is encoded a level at a time (`store_dirs`) and its files collected with a
/// stack of its own, but dropping its nested maps still recurses once per level, on threads
/// with the default 2 MiB stack (tokio's blocking pool, rayon's); a zip entry named `a/a/a/…`
/// 30,000 levels deep (70 KB of archive) or an output tree as deep as `PATH_MAX` allows must
/// fail one request, not abort the whole node. Input trees are held to [`TreeLimits::max_depth`]
/// (128 by default) when submitted; this bound is above it and refuses while a tree is built.
pub const MAX_BUILT_DEPTH: usize = 256;

/// Splits a relative `/`-separated path into its components, skipping empty and `.` ones.
fn split_path(path: &str) -> Result<Vec<&str>> {
    if path.contains('\0') {
        return Err(CasError::hostile(path, "NUL byte in path"));
    }
    if path.starts_with('/') {
        return Err(CasError::hostile(path, "absolute path"));
    }
    let mut components = Vec::new();
    for component in path.split('/') {
        match component {
            "" | "." => {}
            ".." => return Err(CasError::hostile(path, "'..' component escapes the tree")),
            name if name.len() > MAX_NAME_BYTES => {
                return Err(CasError::hostile(
                    path,
                    format!("a component is longer than {MAX_NAME_BYTES} bytes"),
                ));
            }
            name => components.push(name),
        }
        if components.len() > MAX_BUILT_DEPTH {
            return Err(CasError::hostile(
                path,
                format!("more than {MAX_BUILT_DEPTH} levels deep (MAX_BUILT_DEPTH)"),
            ));
        }
    }
    Ok(components)
}

/// Refuses symlink targets that could lead outside the tree.
///
/// `depth` is the number of directories between the root and the link (0 for a link in the
/// root). A target is accepted when it is relative, not empty, free of NUL, and all its `..`
/// components come first and climb at most `depth` levels: `../lib/x.so` is fine one level down,
/// `a/../../x` is not (a `..` after a normal component could cross another symlink, so its
/// effect cannot be decided from the text alone). Every symlink of a tree obeying this rule
/// resolves inside the tree, whatever chain of links it crosses.
pub fn check_symlink_target(link: &str, depth: usize, target: &str) -> Result<()> {
    if target.is_empty() {
        return Err(CasError::hostile(link, "empty symlink target"));
    }
    if target.contains('\0') {
        return Err(CasError::hostile(link, "NUL byte in symlink target"));
    }
    if target.starts_with('/') {
        return Err(CasError::hostile(
            link,
            format!("symlink target {target:?} is absolute"),
        ));
    }
    let mut ups = 0usize;
    let mut seen_name = false;
    for component in target.split('/') {
        match component {
            "" | "." => {}
            ".." if seen_name => {
                return Err(CasError::hostile(
                    link,
                    format!(
                        "symlink target {target:?} has '..' after a name; only leading '..' are accepted"
                    ),
                ));
            }
            ".." => {
                ups += 1;
                if ups > depth {
                    return Err(CasError::hostile(
                        link,
                        format!("symlink target {target:?} escapes the tree"),
                    ));
                }
            }
            _ => seen_name = true,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlink_targets() {
        assert!(check_symlink_target("l", 0, "a/b").is_ok());
        assert!(check_symlink_target("d/l", 1, "../x").is_ok());
        assert!(check_symlink_target("d/l", 1, "..").is_ok());
        assert!(check_symlink_target("d/l", 1, "./../x/./y").is_ok());
        for (depth, bad) in [
            (0, ".."),
            (0, "../x"),
            (1, "../../x"),
            (3, "a/../b"),
            (3, "/etc/passwd"),
            (0, ""),
            (0, "a\0"),
        ] {
            let err = check_symlink_target("the/link", depth, bad).unwrap_err();
            assert!(
                matches!(&err, CasError::HostileEntry { entry, .. } if entry == "the/link"),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn builder_refuses_conflicts_naming_the_path() {
        let f = DigestFunction::Blake3;
        let d = f.digest_of(b"x");
        let mut b = TreeBuilder::new(f);
        b.add_file("a/b", d, false).unwrap();
        b.add_directory("a").unwrap();
        let conflict = |r: Result<()>, name: &str| match r {
            Err(CasError::HostileEntry { entry, .. }) => assert_eq!(entry, name),
            other => panic!("expected a hostile entry {name:?}, got {other:?}"),
        };
        conflict(b.add_directory("a"), "a");
        conflict(b.add_file("a/b", d, true), "a/b");
        conflict(b.add_file("a", d, false), "a");
        conflict(b.add_directory("a/b"), "a/b");
        conflict(b.add_file("a/b/c", d, false), "a/b/c");
        conflict(b.add_file("../x", d, false), "../x");
        conflict(b.add_file("/x", d, false), "/x");
        conflict(b.add_file("", d, false), "");
        conflict(b.add_symlink("l", "/etc"), "l");
        assert!(
            b.add_file("x", DigestFunction::Sha256.digest_of(b"x"), false)
                .is_err()
        );
        // Normalised spellings of the same path are the same path.
        conflict(b.add_file("./a//b", d, false), "./a//b");
    }

    #[test]
    fn canonical_directory_has_no_properties_and_is_sorted() {
        let f = DigestFunction::Sha256;
        let mut b = TreeBuilder::new(f);
        b.add_file("b", f.digest_of(b"1"), true).unwrap();
        b.add_file("a", f.digest_of(b"2"), false).unwrap();
        b.add_symlink("c", "a").unwrap();
        b.add_directory("e/f").unwrap();
        let (_dir, store) = BlobStore::scratch().unwrap();
        let build = b.finish(&store).unwrap();
        let root = read_directory(&store, &build.root).unwrap();
        assert_eq!(
            root.files
                .iter()
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(root.files[1].is_executable && !root.files[0].is_executable);
        assert!(
            root.files.iter().all(|f| f.node_properties.is_none())
                && root.node_properties.is_none()
        );
        assert_eq!(root.symlinks[0].target, "a");
        assert_eq!(build.stats.directories, 3);
        // The empty directory `e/f` encodes to the empty blob, which every store holds.
        assert_eq!(build.stats.new_blobs, 2);
        assert_eq!(build.blobs[0], build.root);
        assert_eq!(build.blobs.len(), 5);
    }
}
