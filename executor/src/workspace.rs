//! Keeps a slot's source directory in sync with an input root, with **mtime normalisation**.
//!
//! Cargo decides what to rebuild by comparing source mtimes with its fingerprints. Materialising
//! every submission afresh would give every file a new mtime and rebuild everything; trusting
//! the client's mtimes would let a stale "Fresh" through. Instead the slot keeps a manifest
//! (path → digest, mode, size, mtime) of what its `src/` holds: an unchanged file is left alone
//! and keeps its previous mtime, a changed or new file is written with a new mtime strictly
//! later than the one it replaces, and anything not in the tree is removed. Client mtimes never
//! enter: the Merkle tree carries none.
//!
//! `src/` is handed to jobs read-write, and its tree comes from a client: every host call under
//! it goes through [`Beneath`] (no symlink followed, on the way or final), and new contents are
//! written in a staging directory outside it, so neither a tree nor an earlier job can point a
//! write (the executor's, often as root) at a host path.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rba_cas::merkle::beneath::{Beneath, EntryKind};
use rba_cas::{BlobStore, Digest};

/// One entry the synced directory must hold, by path relative to its root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DesiredEntry {
    /// A regular file with the given content.
    File {
        /// Relative path.
        path: PathBuf,
        /// Content digest.
        digest: Digest,
        /// Executable bit.
        executable: bool,
    },
    /// A directory.
    Directory {
        /// Relative path.
        path: PathBuf,
    },
    /// A symbolic link (its target already validated to stay inside the tree).
    Symlink {
        /// Relative path.
        path: PathBuf,
        /// Link target as stored.
        target: String,
    },
}

impl DesiredEntry {
    fn path(&self) -> &Path {
        match self {
            DesiredEntry::File { path, .. }
            | DesiredEntry::Directory { path }
            | DesiredEntry::Symlink { path, .. } => path,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct ManifestEntry {
    digest: String,
    executable: bool,
    size: u64,
    mtime_ns: u128,
}

/// What a sync did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Files written (new or changed).
    pub written: u64,
    /// Files left untouched, keeping their mtime.
    pub kept: u64,
    /// Entries removed because the tree no longer has them.
    pub removed: u64,
    /// Bytes written.
    pub bytes_written: u64,
}

/// Errors of a sync, naming the path involved.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Filesystem failure.
    #[error("syncing workspace at {path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading a blob from the store failed.
    #[error(transparent)]
    Cas(#[from] rba_cas::CasError),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> SyncError + '_ {
    move |source| SyncError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The directory, next to the manifest, where new file contents are written before they are
/// renamed into place: a sibling of `dest`, so no path of the tree can name it (nor a symlink
/// in it point the write elsewhere).
fn staging_dir(dest: &Path, manifest_path: &Path) -> Result<PathBuf, SyncError> {
    let staging = manifest_path
        .parent()
        .unwrap_or(Path::new("."))
        .join("sync-staging");
    if staging.starts_with(dest) {
        return Err(SyncError::Io {
            path: staging,
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                "the staging directory must not be inside the synced directory",
            ),
        });
    }
    Ok(staging)
}

/// Makes `dest` hold exactly `entries`, using and updating the manifest at `manifest_path`.
///
/// Every call under `dest` goes through [`Beneath`]: nothing is created, written, read or
/// removed through a symlink, whether the tree or an earlier job put it there (a desired entry
/// below a symlink fails the sync naming it). New contents are written in a staging directory
/// next to the manifest (outside `dest`) with `O_EXCL` and renamed into place.
pub fn sync_directory(
    blobs: &BlobStore,
    entries: &[DesiredEntry],
    dest: &Path,
    manifest_path: &Path,
) -> Result<SyncStats, SyncError> {
    let mut manifest: BTreeMap<String, ManifestEntry> = fs::read(manifest_path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    let mut stats = SyncStats::default();
    let root = Beneath::create(dest).map_err(io_at(dest))?;
    let staging_path = staging_dir(dest, manifest_path)?;
    // Leftovers of an interrupted sync go.
    match fs::remove_dir_all(&staging_path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_at(&staging_path)(e)),
    }
    let staging = Beneath::create(&staging_path).map_err(io_at(&staging_path))?;

    let desired: BTreeMap<&Path, &DesiredEntry> = entries.iter().map(|e| (e.path(), e)).collect();
    stats.removed = remove_undesired(&root, &desired)?;

    let mut seen_files = HashSet::new();
    for entry in entries {
        let relative = entry.path();
        let at = |source| SyncError::Io {
            path: dest.join(relative),
            source,
        };
        match entry {
            DesiredEntry::Directory { .. } => {
                root.create_dir_all(relative).map_err(at)?;
                root.set_dir_mode(relative, 0o755).map_err(at)?;
            }
            DesiredEntry::Symlink { target, .. } => {
                let current = root.read_link(relative).ok();
                if current.as_deref() != Some(std::ffi::OsStr::new(target)) {
                    root.remove(relative).map_err(at)?;
                    ensure_parent(&root, relative).map_err(at)?;
                    root.symlink(std::ffi::OsStr::new(target), relative)
                        .map_err(at)?;
                }
            }
            DesiredEntry::File {
                path,
                digest,
                executable,
            } => {
                let key = path.to_string_lossy().into_owned();
                seen_files.insert(key.clone());
                let previous = manifest.get(&key);
                let on_disk = root.metadata(relative).ok();
                let unchanged = match (previous, &on_disk) {
                    (Some(previous), Some(meta)) => {
                        meta.kind == EntryKind::File
                            && previous.digest == format!("{digest:?}")
                            && previous.executable == *executable
                            && previous.size == meta.size
                            && previous.mtime_ns == meta.mtime_ns
                    }
                    _ => false,
                };
                if unchanged {
                    stats.kept += 1;
                    continue;
                }
                let not_before = previous
                    .map(|p| p.mtime_ns)
                    .into_iter()
                    .chain(on_disk.as_ref().map(|meta| meta.mtime_ns))
                    .max();
                let written = write_file(
                    blobs,
                    digest,
                    *executable,
                    &root,
                    &staging,
                    relative,
                    not_before,
                )
                .map_err(|e| match e {
                    SyncError::Io { source, .. } => at(source),
                    other => other,
                })?;
                stats.written += 1;
                stats.bytes_written += digest.size;
                manifest.insert(
                    key,
                    ManifestEntry {
                        digest: format!("{digest:?}"),
                        executable: *executable,
                        size: digest.size,
                        mtime_ns: written,
                    },
                );
            }
        }
    }
    drop(staging);
    let _ = fs::remove_dir(&staging_path);
    manifest.retain(|path, _| seen_files.contains(path));
    let encoded = serde_json::to_vec(&manifest).expect("manifest serialises");
    let tmp = manifest_path.with_extension("tmp");
    fs::write(&tmp, encoded).map_err(io_at(&tmp))?;
    fs::rename(&tmp, manifest_path).map_err(io_at(manifest_path))?;
    Ok(stats)
}

/// Removes everything under `root` whose path is not desired with the same kind.
fn remove_undesired(
    root: &Beneath,
    desired: &BTreeMap<&Path, &DesiredEntry>,
) -> Result<u64, SyncError> {
    let mut removed = 0;
    let mut stack = vec![PathBuf::new()];
    while let Some(dir) = stack.pop() {
        let at = |source| SyncError::Io {
            path: root.path().join(&dir),
            source,
        };
        let listing = match root.read_dir(&dir) {
            Ok(listing) => listing,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(at(e)),
        };
        for (name, kind) in listing {
            let relative = dir.join(&name);
            let keep = match desired.get(relative.as_path()) {
                Some(DesiredEntry::Directory { .. }) => kind == EntryKind::Directory,
                Some(DesiredEntry::File { .. }) => kind == EntryKind::File,
                Some(DesiredEntry::Symlink { .. }) => kind == EntryKind::Symlink,
                None => false,
            };
            if !keep {
                root.remove(&relative).map_err(|source| SyncError::Io {
                    path: root.path().join(&relative),
                    source,
                })?;
                removed += 1;
            } else if kind == EntryKind::Directory {
                stack.push(relative);
            }
        }
    }
    Ok(removed)
}

fn ensure_parent(root: &Beneath, relative: &Path) -> io::Result<()> {
    match relative.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => root.create_dir_all(parent),
        _ => Ok(()),
    }
}

/// Writes a blob to `relative` beneath `root` (via a new file in `staging` renamed into place)
/// and returns the mtime it was given, strictly later than `not_before` so cargo sees the change
/// even within one clock tick.
fn write_file(
    blobs: &BlobStore,
    digest: &Digest,
    executable: bool,
    root: &Beneath,
    staging: &Beneath,
    relative: &Path,
    not_before: Option<u128>,
) -> Result<u128, SyncError> {
    let fail = |source| SyncError::Io {
        path: relative.to_path_buf(),
        source,
    };
    ensure_parent(root, relative).map_err(fail)?;
    let mode = if executable { 0o755 } else { 0o644 };
    let (tmp, mut file) = staging.create_temp(mode).map_err(fail)?;
    {
        let mut reader = blobs.reader(digest, 0, 0)?;
        io::copy(&mut reader, &mut file).map_err(fail)?;
        // The umask may have cleared bits.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(fail)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let mtime = match not_before {
            Some(previous) if previous >= now => previous + 1_000_000,
            _ => now,
        };
        file.set_modified(UNIX_EPOCH + Duration::from_nanos(mtime as u64))
            .map_err(fail)?;
    }
    drop(file);
    // A directory (or anything renameat cannot replace) in the way goes first.
    if root
        .metadata(relative)
        .is_ok_and(|meta| meta.kind == EntryKind::Directory)
    {
        root.remove(relative).map_err(fail)?;
    }
    root.rename_from(staging, Path::new(&tmp), relative)
        .map_err(fail)?;
    Ok(root.metadata(relative).map_err(fail)?.mtime_ns)
}

/// The input root's `Cargo.lock` (following the tree's own symlinks, inside the tree), read
/// from the CAS, never from the host; empty when the tree has none.
pub fn read_lockfile(blobs: &BlobStore, root: &Digest) -> Result<String, SyncError> {
    const MAX_LOCKFILE_BYTES: u64 = 64 << 20;
    match rba_cas::merkle::find_file(blobs, root, "Cargo.lock")? {
        Some((digest, _)) => {
            let bytes = blobs.read_to_vec(&digest, MAX_LOCKFILE_BYTES)?;
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
        None => Ok(String::new()),
    }
}

#[cfg(test)]
mod tests {
    use rba_cas::DigestFunction;

    use super::*;

    fn file(blobs: &BlobStore, path: &str, content: &[u8]) -> DesiredEntry {
        let digest = blobs.put_bytes(DigestFunction::Blake3, content).unwrap();
        DesiredEntry::File {
            path: path.into(),
            digest,
            executable: false,
        }
    }

    #[test]
    fn unchanged_files_keep_mtimes_changed_ones_move_forward() {
        let (_store_dir, blobs) = BlobStore::scratch().unwrap();
        let slot = tempfile::tempdir().unwrap();
        let dest = slot.path().join("src");
        let manifest = slot.path().join("manifest.json");
        let first = vec![
            DesiredEntry::Directory { path: "src".into() },
            file(&blobs, "src/lib.rs", b"pub fn a() {}"),
            file(&blobs, "src/main.rs", b"fn main() {}"),
            file(&blobs, "Cargo.toml", b"[package]"),
        ];
        let stats = sync_directory(&blobs, &first, &dest, &manifest).unwrap();
        assert_eq!((stats.written, stats.kept), (3, 0));
        let mtime = |p: &str| fs::metadata(dest.join(p)).unwrap().modified().unwrap();
        let lib_before = mtime("src/lib.rs");
        let main_before = mtime("src/main.rs");

        // One changed file, one removed, a stray file a previous job left.
        fs::write(dest.join("stray.txt"), b"x").unwrap();
        let second = vec![
            DesiredEntry::Directory { path: "src".into() },
            file(&blobs, "src/lib.rs", b"pub fn a() { /* changed */ }"),
            file(&blobs, "src/main.rs", b"fn main() {}"),
        ];
        let stats = sync_directory(&blobs, &second, &dest, &manifest).unwrap();
        assert_eq!((stats.written, stats.kept, stats.removed), (1, 1, 2));
        assert_eq!(
            mtime("src/main.rs"),
            main_before,
            "unchanged file keeps its mtime"
        );
        assert!(
            mtime("src/lib.rs") > lib_before,
            "changed file gets a later mtime"
        );
        assert!(!dest.join("Cargo.toml").exists());
        assert!(!dest.join("stray.txt").exists());
        assert_eq!(
            fs::read(dest.join("src/lib.rs")).unwrap(),
            b"pub fn a() { /* changed */ }"
        );

        // Tampering behind the manifest's back is detected by size/mtime and repaired.
        fs::write(dest.join("src/main.rs"), b"tampered!!!!").unwrap();
        let stats = sync_directory(&blobs, &second, &dest, &manifest).unwrap();
        assert_eq!(stats.written, 1);
        assert_eq!(fs::read(dest.join("src/main.rs")).unwrap(), b"fn main() {}");
    }

    #[test]
    fn kinds_can_swap_and_corrupt_manifest_means_full_rewrite() {
        let (_store_dir, blobs) = BlobStore::scratch().unwrap();
        let slot = tempfile::tempdir().unwrap();
        let dest = slot.path().join("src");
        let manifest = slot.path().join("manifest.json");
        sync_directory(&blobs, &[file(&blobs, "a", b"file")], &dest, &manifest).unwrap();
        let swapped = vec![
            DesiredEntry::Directory { path: "a".into() },
            file(&blobs, "a/b", b"inner"),
        ];
        sync_directory(&blobs, &swapped, &dest, &manifest).unwrap();
        assert!(dest.join("a").is_dir());
        fs::write(&manifest, b"{not json").unwrap();
        let stats = sync_directory(&blobs, &swapped, &dest, &manifest).unwrap();
        assert_eq!(stats.written, 1);
        let link = vec![
            DesiredEntry::Symlink {
                path: "a".into(),
                target: "b".into(),
            },
            file(&blobs, "b", b"x"),
        ];
        sync_directory(&blobs, &link, &dest, &manifest).unwrap();
        assert_eq!(fs::read_link(dest.join("a")).unwrap(), Path::new("b"));
    }
}
