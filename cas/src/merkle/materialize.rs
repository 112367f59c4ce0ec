//! Materialising a stored tree into a directory.
//!
//! The whole tree is read and validated first (every `Directory`, every symlink target), so a
//! hostile or incomplete tree writes nothing. Then directories are created (each with
//! `mkdirat`, never following anything pre-existing: the target must be empty), files are
//! placed in parallel, and symlinks are created last. Every call is made beneath the target's
//! descriptor without following any symlink ([`super::beneath::Beneath`]), so no write ever goes
//! through one. Callers bound the tree's expansion first ([`super::validate_tree`]).
//!
//! Files: non-executable files are hard-linked from the store when possible (store files are
//! read-only, 0444, so a link shares them safely with well-behaved actions); executables are
//! always copied (mode 0755), since a hardlink shares the mode with the store file and every
//! other link. Copies (0644) are used when linking fails (another filesystem, link limits) or
//! when [`MaterializeOptions::hardlink`] is off, e.g. when actions run as root and could write
//! through a read-only link.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;
use rba_proto::reapi::Directory;

use super::beneath::Beneath;
use super::check_symlink_target;
use super::validate::{child_digests, read_directory};
use crate::digest::Digest;
use crate::error::{CasError, Result};
use crate::store::BlobStore;

/// How to place files.
#[derive(Clone, Debug)]
pub struct MaterializeOptions {
    /// Hard-link non-executable files from the store when possible (else always copy).
    pub hardlink: bool,
}

impl Default for MaterializeOptions {
    fn default() -> Self {
        MaterializeOptions { hardlink: true }
    }
}

/// One file placed by [`materialize`]; the executor's mtime normalisation walks these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaterializedFile {
    /// Path relative to the target directory.
    pub path: PathBuf,
    /// The file's content digest.
    pub digest: Digest,
    /// Whether the file is executable.
    pub is_executable: bool,
    /// True when the file is a hard link to the store's blob: its inode (and so its mtime) is
    /// shared with the store and every other materialisation of the same blob.
    pub hardlinked: bool,
}

/// What [`materialize`] did.
#[derive(Clone, Debug, Default)]
pub struct Materialized {
    /// Every file placed, in tree order (directory by directory, breadth-first).
    pub files: Vec<MaterializedFile>,
    /// Directories created, the target excluded.
    pub directories: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Bytes of all files placed.
    pub bytes: u64,
    /// Files hard-linked from the store.
    pub hardlinked: u64,
    /// Files copied.
    pub copied: u64,
}

struct Plan {
    dirs: Vec<PathBuf>,
    files: Vec<(PathBuf, Digest, bool)>,
    symlinks: Vec<(PathBuf, String)>,
}

/// Writes the tree `root` into `target`, which must be absent or an empty directory (not a
/// symlink). Nothing is written outside `target`.
///
/// Fails with [`CasError::NotFound`] when a blob is missing, [`CasError::Invalid`] for an
/// invalid `Directory`, and [`CasError::HostileEntry`] for a symlink leaving the tree; these are
/// all detected before anything is written.
pub fn materialize(
    store: &BlobStore,
    root: &Digest,
    target: &Path,
    options: &MaterializeOptions,
) -> Result<Materialized> {
    let plan = plan(store, root)?;
    let missing = store.find_missing(&plan.files.iter().map(|(_, d, _)| *d).collect::<Vec<_>>())?;
    if let Some(first) = missing.first() {
        return Err(CasError::NotFound(*first));
    }
    prepare_target(target)?;
    let beneath = Beneath::open(target).map_err(|e| CasError::io("opening", target, e))?;
    for dir in &plan.dirs {
        beneath
            .create_new_dir(dir, 0o755)
            .map_err(|e| CasError::io("creating", target.join(dir), e))?;
    }
    let hardlinked = AtomicU64::new(0);
    let files = plan
        .files
        .par_iter()
        .map(|(relative, digest, executable)| {
            let linked = place_file(store, &beneath, relative, digest, *executable, options)
                .map_err(|e| match e {
                    CasError::Io {
                        context, source, ..
                    } => CasError::io(context, target.join(relative), source),
                    other => other,
                })?;
            if linked {
                hardlinked.fetch_add(1, Ordering::Relaxed);
            }
            Ok(MaterializedFile {
                path: relative.clone(),
                digest: *digest,
                is_executable: *executable,
                hardlinked: linked,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    for (relative, link_target) in &plan.symlinks {
        beneath
            .symlink(std::ffi::OsStr::new(link_target), relative)
            .map_err(|e| CasError::io("creating symlink", target.join(relative), e))?;
    }
    let hardlinked = hardlinked.into_inner();
    Ok(Materialized {
        bytes: files.iter().map(|f| f.digest.size).sum(),
        copied: files.len() as u64 - hardlinked,
        hardlinked,
        directories: plan.dirs.len() as u64,
        symlinks: plan.symlinks.len() as u64,
        files,
    })
}

/// Reads and validates the whole tree, listing what to create.
fn plan(store: &BlobStore, root: &Digest) -> Result<Plan> {
    let mut plan = Plan {
        dirs: Vec::new(),
        files: Vec::new(),
        symlinks: Vec::new(),
    };
    let mut cache: HashMap<Digest, Directory> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([(PathBuf::new(), *root, 0usize)]);
    while let Some((relative, digest, depth)) = queue.pop_front() {
        let directory = match cache.entry(digest) {
            std::collections::hash_map::Entry::Occupied(slot) => slot.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(read_directory(store, &digest)?)
            }
        };
        let (files, dirs) = child_digests(directory, root.function)?;
        for (node, file_digest) in directory.files.iter().zip(files) {
            plan.files
                .push((relative.join(&node.name), file_digest, node.is_executable));
        }
        for link in &directory.symlinks {
            let path = relative.join(&link.name);
            check_symlink_target(&path.to_string_lossy(), depth, &link.target)?;
            plan.symlinks.push((path, link.target.clone()));
        }
        for (node, dir_digest) in directory.directories.iter().zip(dirs) {
            let path = relative.join(&node.name);
            plan.dirs.push(path.clone());
            queue.push_back((path, dir_digest, depth + 1));
        }
    }
    Ok(plan)
}

fn prepare_target(target: &Path) -> Result<()> {
    match fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() => {
            let mut entries =
                fs::read_dir(target).map_err(|e| CasError::io("listing", target, e))?;
            if entries.next().is_some() {
                return Err(CasError::invalid(
                    format!("materialisation target {}", target.display()),
                    "directory is not empty",
                ));
            }
            Ok(())
        }
        Ok(_) => Err(CasError::invalid(
            format!("materialisation target {}", target.display()),
            "exists and is not a directory (or is a symlink)",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(target).map_err(|e| CasError::io("creating", target, e))
        }
        Err(e) => Err(CasError::io("inspecting", target, e)),
    }
}

/// Places one file at `path` beneath the target; returns true when hard-linked.
fn place_file(
    store: &BlobStore,
    beneath: &Beneath,
    path: &Path,
    digest: &Digest,
    executable: bool,
    options: &MaterializeOptions,
) -> Result<bool> {
    let _pin = store.pin(digest);
    if options.hardlink && !executable && !digest.is_empty_blob() {
        match beneath.hard_link_from(&store.blob_path(digest), path) {
            Ok(()) => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(CasError::NotFound(*digest));
            }
            Err(e) => {
                tracing::debug!(error = %e, path = %path.display(), "hard link failed, copying")
            }
        }
    }
    let mode = if executable { 0o755 } else { 0o644 };
    let mut file = beneath
        .create_new(path, mode)
        .map_err(|e| CasError::io("creating", path, e))?;
    let mut reader = store.reader(digest, 0, 0)?;
    let copied = io::copy(&mut reader, &mut file).map_err(|e| CasError::io("writing", path, e))?;
    if copied != digest.size {
        return Err(CasError::SizeMismatch {
            expected: *digest,
            actual: copied,
        });
    }
    // The umask may have cleared bits the tree asks for.
    if executable {
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| CasError::io("chmod", path, e))?;
    }
    Ok(false)
}
