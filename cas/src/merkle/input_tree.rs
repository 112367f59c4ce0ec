//! Validation of a whole input tree before anything touches disk.
//!
//! Why: a client names a root `Directory` digest and the executor then writes every path of
//! the tree onto the host, as root. A tree is a DAG: 30 small `Directory` blobs, each holding
//! the next one twice, expand to 2^30 paths, so walking the expansion to find out how big it is
//! is itself the attack. Here the *distinct* `Directory` blobs are read once each (deduplicated
//! by digest, breadth-first, so each is first met at the shallowest depth it appears), their
//! expanded sizes are computed bottom-up with memoisation, and the limits are checked on those
//! numbers: time and memory are bounded by the distinct blobs (themselves bounded by
//! [`TreeLimits::max_entries`] and [`TreeLimits::max_directory_bytes`]), never by the expansion.
//!
//! Checked ([`validate_tree`]): every `Directory` valid (names, order, digests:
//! [`super::validate_directory`]), every name short enough for a filesystem, every symlink
//! target relative and resolving inside the tree from the link's shallowest place (the one rule
//! of [`super::check_symlink_target`], which trees built from disk and zip archives obey too), and
//! the expanded entries, depth and file bytes within [`TreeLimits`]. Errors name the offending
//! path and the limit.

use std::collections::{HashMap, VecDeque};

use super::check_symlink_target;
use super::validate::{child_digests, read_directory};
use crate::digest::Digest;
use crate::error::{CasError, Result};
use crate::store::BlobStore;

/// The longest name (bytes) of one tree entry: `NAME_MAX` of Linux filesystems.
pub const MAX_NAME_BYTES: usize = 255;
/// The longest symlink target (bytes): `PATH_MAX` less its NUL.
pub const MAX_SYMLINK_TARGET_BYTES: usize = 4095;

/// Bounds on the *expanded* input tree (every path, a directory present twice counting twice).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TreeLimits {
    /// Most entries (files, directories and symlinks, the root excluded) the tree may expand to.
    pub max_entries: u64,
    /// Most path components of any entry (`a/b/c` is 3).
    pub max_depth: u64,
    /// Most bytes all file entries together may hold.
    pub max_total_bytes: u64,
    /// Most bytes all distinct `Directory` blobs together may hold (bounds the validation's own
    /// reading).
    pub max_directory_bytes: u64,
}

impl Default for TreeLimits {
    fn default() -> Self {
        TreeLimits {
            max_entries: 1_000_000,
            max_depth: 128,
            max_total_bytes: 16 << 30,
            max_directory_bytes: 512 << 20,
        }
    }
}

/// What [`validate_tree`] found in a tree that passed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeSummary {
    /// Expanded entries (files, directories, symlinks; the root excluded).
    pub entries: u64,
    /// Path components of the deepest entry (0 for an empty tree).
    pub depth: u64,
    /// Expanded bytes of all file entries.
    pub total_bytes: u64,
    /// Distinct `Directory` blobs, the root included.
    pub distinct_directories: u64,
}

/// One distinct `Directory`, reduced to what the bottom-up pass needs.
struct Node {
    digest: Digest,
    /// Index of each subdirectory entry's node (repeated when a digest is repeated).
    children: Vec<usize>,
    own_entries: u64,
    own_bytes: u64,
    /// Path components of the shallowest place this directory appears at.
    min_depth: u64,
    /// Where it was first met (the shallowest place): its parent's index and its name there
    /// (paths are rebuilt from these only for messages).
    parent: usize,
    name: String,
}

/// The shallowest path of a distinct directory.
fn path_of(nodes: &[Node], mut at: usize) -> String {
    let mut names = Vec::new();
    while at != 0 {
        names.push(nodes[at].name.as_str());
        at = nodes[at].parent;
    }
    names.reverse();
    names.join("/")
}

/// The expanded size of one distinct directory's subtree.
#[derive(Clone, Copy, Default)]
struct Expanded {
    entries: u64,
    bytes: u64,
    /// Path components of its deepest entry, relative to it.
    height: u64,
}

/// Validates the tree `root` against `limits` without expanding it (see the module docs).
///
/// Fails with [`CasError::NotFound`] naming a missing `Directory`, [`CasError::Invalid`] for an
/// undecodable or invalid one (naming its digest and path), and [`CasError::HostileEntry`]
/// naming the path that breaks a rule or crosses a limit (and the limit).
pub fn validate_tree(store: &BlobStore, root: &Digest, limits: &TreeLimits) -> Result<TreeSummary> {
    let nodes = discover(store, root, limits)?;
    let expanded = expand(&nodes)?;
    let total = expanded[0];
    if total.entries > limits.max_entries {
        let (path, at) = descend(store, &nodes, |i| expanded[i].entries > limits.max_entries)?;
        return Err(CasError::hostile(
            display(&path),
            format!(
                "expands to {} entries (directories repeated in the tree count each time), above the limit of {} (max_entries)",
                expanded[at].entries, limits.max_entries
            ),
        ));
    }
    if total.bytes > limits.max_total_bytes {
        let (path, at) = descend(store, &nodes, |i| {
            expanded[i].bytes > limits.max_total_bytes
        })?;
        return Err(CasError::hostile(
            display(&path),
            format!(
                "expands to {} bytes of files, above the limit of {} (max_total_bytes)",
                expanded[at].bytes, limits.max_total_bytes
            ),
        ));
    }
    if total.height > limits.max_depth {
        // Follow the deepest chain down to the first directory past the limit.
        let mut path = String::new();
        let mut at = 0usize;
        let mut depth = 0u64;
        while depth < limits.max_depth {
            let directory = read_directory(store, &nodes[at].digest)?;
            let Some((name, child)) = directory
                .directories
                .iter()
                .zip(&nodes[at].children)
                .max_by_key(|(_, child)| expanded[**child].height)
            else {
                break;
            };
            path = join(&path, &name.name);
            at = *child;
            depth += 1;
        }
        return Err(CasError::hostile(
            display(&path),
            format!(
                "the tree is {} levels deep here, above the limit of {} (max_depth)",
                depth + expanded[at].height,
                limits.max_depth
            ),
        ));
    }
    Ok(TreeSummary {
        entries: total.entries,
        depth: total.height,
        total_bytes: total.bytes,
        distinct_directories: nodes.len() as u64,
    })
}

/// Reads every distinct `Directory` breadth-first, checking each one's own entries.
fn discover(store: &BlobStore, root: &Digest, limits: &TreeLimits) -> Result<Vec<Node>> {
    let mut nodes: Vec<Node> = Vec::new();
    let mut index: HashMap<Digest, usize> = HashMap::new();
    let mut queue = VecDeque::from([0usize]);
    let (mut distinct_entries, mut distinct_bytes, mut directory_bytes) = (0u64, 0u64, 0u64);
    index.insert(*root, 0);
    nodes.push(Node {
        digest: *root,
        children: Vec::new(),
        own_entries: 0,
        own_bytes: 0,
        min_depth: 0,
        parent: 0,
        name: String::new(),
    });
    while let Some(at) = queue.pop_front() {
        let (digest, depth) = (nodes[at].digest, nodes[at].min_depth);
        let path = || path_of(&nodes, at);
        if depth > limits.max_depth {
            return Err(CasError::hostile(
                display(&path()),
                format!(
                    "the tree is at least {depth} levels deep here, above the limit of {} (max_depth)",
                    limits.max_depth
                ),
            ));
        }
        directory_bytes = directory_bytes.saturating_add(digest.size);
        if directory_bytes > limits.max_directory_bytes {
            return Err(CasError::hostile(
                display(&path()),
                format!(
                    "the tree's distinct Directory messages hold more than {} bytes (max_directory_bytes)",
                    limits.max_directory_bytes
                ),
            ));
        }
        let directory = read_directory(store, &digest).map_err(|e| match e {
            CasError::Invalid { what, reason } => {
                CasError::invalid(format!("{what} at {}", display(&path())), reason)
            }
            other => other,
        })?;
        let (files, dirs) = child_digests(&directory, root.function)?;
        let names = directory
            .files
            .iter()
            .map(|f| &f.name)
            .chain(directory.directories.iter().map(|d| &d.name))
            .chain(directory.symlinks.iter().map(|s| &s.name));
        for name in names {
            if name.len() > MAX_NAME_BYTES {
                return Err(CasError::hostile(
                    join(&path(), name),
                    format!("name is longer than {MAX_NAME_BYTES} bytes"),
                ));
            }
        }
        for link in &directory.symlinks {
            let link_path = || join(&path(), &link.name);
            if link.target.len() > MAX_SYMLINK_TARGET_BYTES {
                return Err(CasError::hostile(
                    link_path(),
                    format!("symlink target is longer than {MAX_SYMLINK_TARGET_BYTES} bytes"),
                ));
            }
            check_symlink_target(&link.name, depth as usize, &link.target).map_err(
                |e| match e {
                    CasError::HostileEntry { reason, .. } => CasError::hostile(link_path(), reason),
                    other => other,
                },
            )?;
        }
        let own_entries =
            (directory.files.len() + directory.directories.len() + directory.symlinks.len()) as u64;
        let own_bytes = files
            .iter()
            .fold(0u64, |sum, file| sum.saturating_add(file.size));
        distinct_entries = distinct_entries.saturating_add(own_entries);
        distinct_bytes = distinct_bytes.saturating_add(own_bytes);
        // Every distinct directory appears at least once, so these bound the expansion from below.
        if distinct_entries > limits.max_entries {
            return Err(CasError::hostile(
                display(&path()),
                format!(
                    "the tree holds more than {} entries (max_entries)",
                    limits.max_entries
                ),
            ));
        }
        if distinct_bytes > limits.max_total_bytes {
            return Err(CasError::hostile(
                display(&path()),
                format!(
                    "the tree holds more than {} bytes of files (max_total_bytes)",
                    limits.max_total_bytes
                ),
            ));
        }
        let mut children = Vec::with_capacity(dirs.len());
        for (node, child) in directory.directories.iter().zip(dirs) {
            let next = *index.entry(child).or_insert_with(|| {
                nodes.push(Node {
                    digest: child,
                    children: Vec::new(),
                    own_entries: 0,
                    own_bytes: 0,
                    min_depth: depth + 1,
                    parent: at,
                    name: node.name.clone(),
                });
                queue.push_back(nodes.len() - 1);
                nodes.len() - 1
            });
            children.push(next);
        }
        let node = &mut nodes[at];
        node.children = children;
        node.own_entries = own_entries;
        node.own_bytes = own_bytes;
    }
    Ok(nodes)
}

/// The expanded size of every distinct directory, children before parents (memoised: each
/// distinct directory is computed once, whatever the number of places it appears at).
fn expand(nodes: &[Node]) -> Result<Vec<Expanded>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut marks = vec![Mark::New; nodes.len()];
    let mut expanded = vec![Expanded::default(); nodes.len()];
    let mut stack = vec![0usize];
    while let Some(&at) = stack.last() {
        match marks[at] {
            Mark::Done => {
                stack.pop();
            }
            Mark::New => {
                marks[at] = Mark::Open;
                for &child in &nodes[at].children {
                    match marks[child] {
                        Mark::New => stack.push(child),
                        // Content addressing makes a cycle impossible unless SHA-256/BLAKE3 break.
                        Mark::Open => {
                            return Err(CasError::invalid(
                                format!("Directory {:?}", nodes[child].digest),
                                "the tree contains itself",
                            ));
                        }
                        Mark::Done => {}
                    }
                }
            }
            Mark::Open => {
                let node = &nodes[at];
                let mut sum = Expanded {
                    entries: node.own_entries,
                    bytes: node.own_bytes,
                    height: u64::from(node.own_entries > 0),
                };
                for &child in &node.children {
                    let child = expanded[child];
                    sum.entries = sum.entries.saturating_add(child.entries);
                    sum.bytes = sum.bytes.saturating_add(child.bytes);
                    sum.height = sum.height.max(child.height.saturating_add(1));
                }
                expanded[at] = sum;
                marks[at] = Mark::Done;
                stack.pop();
            }
        }
    }
    Ok(expanded)
}

/// Goes down from the root as long as some subdirectory still crosses the limit
/// (`over(index)`), and returns the deepest such directory's path and index: the smallest part
/// of the tree that alone is too big.
fn descend(
    store: &BlobStore,
    nodes: &[Node],
    over: impl Fn(usize) -> bool,
) -> Result<(String, usize)> {
    let mut path = String::new();
    let mut at = 0usize;
    loop {
        let directory = read_directory(store, &nodes[at].digest)?;
        let next = directory
            .directories
            .iter()
            .zip(&nodes[at].children)
            .find(|(_, child)| over(**child));
        match next {
            Some((node, child)) => {
                path = join(&path, &node.name);
                at = *child;
            }
            None => return Ok((path, at)),
        }
    }
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

/// A tree path for messages: the root is `.`.
fn display(path: &str) -> String {
    if path.is_empty() {
        ".".to_string()
    } else {
        path.to_string()
    }
}

#[cfg(test)]
mod tests {
    use rba_proto::Message;
    use rba_proto::reapi::{Directory, DirectoryNode, FileNode, SymlinkNode};

    use super::*;
    use crate::digest::DigestFunction;

    const F: DigestFunction = DigestFunction::Blake3;

    fn put(store: &BlobStore, directory: &Directory) -> Digest {
        store.put_bytes(F, &directory.encode_to_vec()).unwrap()
    }

    fn file(store: &BlobStore, name: &str, content: &[u8]) -> FileNode {
        FileNode {
            name: name.into(),
            digest: Some(store.put_bytes(F, content).unwrap().to_reapi()),
            ..Default::default()
        }
    }

    fn dir(name: &str, digest: Digest) -> DirectoryNode {
        DirectoryNode {
            name: name.into(),
            digest: Some(digest.to_reapi()),
        }
    }

    fn link(name: &str, target: &str) -> SymlinkNode {
        SymlinkNode {
            name: name.into(),
            target: target.into(),
            node_properties: None,
        }
    }

    fn refused(result: Result<TreeSummary>, entry_is: &str, needle: &str) {
        match result {
            Err(CasError::HostileEntry { entry, reason }) => {
                assert_eq!(entry, entry_is, "{reason}");
                assert!(
                    reason.contains(needle),
                    "{reason:?} should mention {needle:?}"
                );
            }
            other => panic!("expected a refusal of {entry_is:?} ({needle}), got {other:?}"),
        }
    }

    /// `levels` directories, each holding the next twice (as `a` and `b`) and the last one file.
    fn bomb(store: &BlobStore, levels: usize) -> Digest {
        let mut digest = put(
            store,
            &Directory {
                files: vec![file(store, "f", b"x")],
                ..Default::default()
            },
        );
        for _ in 0..levels {
            digest = put(
                store,
                &Directory {
                    directories: vec![dir("a", digest), dir("b", digest)],
                    ..Default::default()
                },
            );
        }
        digest
    }

    #[test]
    fn a_normal_tree_passes_with_its_expanded_size() {
        let (_tmp, store) = BlobStore::scratch().unwrap();
        let shared = put(
            &store,
            &Directory {
                files: vec![file(&store, "lib.rs", b"fn a() {}")],
                symlinks: vec![link("up", "../x")],
                ..Default::default()
            },
        );
        let root = put(
            &store,
            &Directory {
                files: vec![file(&store, "x", b"12345")],
                directories: vec![dir("one", shared), dir("two", shared)],
                ..Default::default()
            },
        );
        let summary = validate_tree(&store, &root, &TreeLimits::default()).unwrap();
        assert_eq!(
            summary,
            TreeSummary {
                entries: 7,
                depth: 2,
                total_bytes: 5 + 2 * 9,
                distinct_directories: 2,
            }
        );
    }

    #[test]
    fn an_expansion_bomb_is_refused_in_bounded_time_naming_the_limit() {
        let (_tmp, store) = BlobStore::scratch().unwrap();
        let root = bomb(&store, 40);
        let started = std::time::Instant::now();
        let result = validate_tree(&store, &root, &TreeLimits::default());
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        // A subtree of height h expands to 3 * 2^h - 2 entries: h = 19 is the smallest above
        // 1_000_000, 21 levels below the root.
        refused(result, &["a"; 21].join("/"), "max_entries");
        let limits = TreeLimits {
            max_entries: u64::MAX,
            ..Default::default()
        };
        // 2^h bytes of files: h = 35 is the smallest above 16 GiB, 5 levels down.
        let result = validate_tree(&store, &root, &limits);
        refused(result, &["a"; 5].join("/"), "max_total_bytes");
    }

    #[test]
    fn depth_is_the_deepest_occurrence_not_the_shallowest() {
        let (_tmp, store) = BlobStore::scratch().unwrap();
        let leaf = put(
            &store,
            &Directory {
                files: vec![file(&store, "f", b"x")],
                ..Default::default()
            },
        );
        // `deep` holds leaf 3 levels down; the root also holds leaf directly.
        let mut chain = leaf;
        for name in ["c", "b", "a"] {
            chain = put(
                &store,
                &Directory {
                    directories: vec![dir(name, chain)],
                    ..Default::default()
                },
            );
        }
        let root = put(
            &store,
            &Directory {
                directories: vec![dir("deep", chain), dir("leaf", leaf)],
                ..Default::default()
            },
        );
        let limits = |max_depth| TreeLimits {
            max_depth,
            ..Default::default()
        };
        assert_eq!(validate_tree(&store, &root, &limits(5)).unwrap().depth, 5);
        refused(
            validate_tree(&store, &root, &limits(4)),
            "deep/a/b/c",
            "max_depth",
        );
        refused(
            validate_tree(&store, &root, &limits(1)),
            "deep/a",
            "max_depth",
        );
    }

    #[test]
    fn symlinks_must_stay_inside_from_their_shallowest_place() {
        let (_tmp, store) = BlobStore::scratch().unwrap();
        for (target, needle) in [
            ("/etc/passwd", "absolute"),
            ("../../x", "escapes the tree"),
            ("a/../../x", "after a name"),
        ] {
            let sub = put(
                &store,
                &Directory {
                    symlinks: vec![link(".lib.rs.rba-sync", target)],
                    ..Default::default()
                },
            );
            let root = put(
                &store,
                &Directory {
                    directories: vec![dir("src", sub)],
                    ..Default::default()
                },
            );
            refused(
                validate_tree(&store, &root, &TreeLimits::default()),
                "src/.lib.rs.rba-sync",
                needle,
            );
        }
        // `../../x` is inside from `a/src/`, but the same directory also sits at `b/`.
        let sub = put(
            &store,
            &Directory {
                symlinks: vec![link("l", "../../x")],
                ..Default::default()
            },
        );
        let nested = put(
            &store,
            &Directory {
                directories: vec![dir("src", sub)],
                ..Default::default()
            },
        );
        let inside = put(
            &store,
            &Directory {
                directories: vec![dir("a", nested)],
                ..Default::default()
            },
        );
        let ok = validate_tree(&store, &inside, &TreeLimits::default());
        assert!(ok.is_ok(), "{ok:?}");
        let root = put(
            &store,
            &Directory {
                directories: vec![dir("a", nested), dir("b", sub)],
                ..Default::default()
            },
        );
        refused(
            validate_tree(&store, &root, &TreeLimits::default()),
            "b/l",
            "escapes the tree",
        );
    }

    #[test]
    fn bad_names_invalid_and_missing_directories_are_named() {
        let (_tmp, store) = BlobStore::scratch().unwrap();
        let long = "n".repeat(MAX_NAME_BYTES + 1);
        let root = put(
            &store,
            &Directory {
                files: vec![file(&store, &long, b"x")],
                ..Default::default()
            },
        );
        refused(
            validate_tree(&store, &root, &TreeLimits::default()),
            &long,
            "longer than 255",
        );
        let unsorted = put(
            &store,
            &Directory {
                files: vec![file(&store, "b", b""), file(&store, "a", b"")],
                ..Default::default()
            },
        );
        let root = put(
            &store,
            &Directory {
                directories: vec![dir("pkg", unsorted)],
                ..Default::default()
            },
        );
        match validate_tree(&store, &root, &TreeLimits::default()) {
            Err(CasError::Invalid { what, reason }) => {
                assert!(what.contains("at pkg"), "{what}");
                assert!(reason.contains("not sorted"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let missing = F.digest_of(b"no such directory");
        let root = put(
            &store,
            &Directory {
                directories: vec![dir("gone", missing)],
                ..Default::default()
            },
        );
        assert!(matches!(
            validate_tree(&store, &root, &TreeLimits::default()),
            Err(CasError::NotFound(d)) if d == missing
        ));
    }

    #[test]
    fn directory_bytes_are_bounded_before_reading() {
        let (_tmp, store) = BlobStore::scratch().unwrap();
        let root = bomb(&store, 3);
        let limits = TreeLimits {
            max_directory_bytes: 10,
            ..Default::default()
        };
        refused(
            validate_tree(&store, &root, &limits),
            ".",
            "max_directory_bytes",
        );
    }
}
