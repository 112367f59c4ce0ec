//! Keeps a slot's source directory in sync with an input root, with **mtime normalisation**.
//!
//! Cargo decides what to rebuild by comparing source mtimes with its fingerprints. Materialising
//! every submission afresh would give every file a new mtime and rebuild everything; trusting
//! the client's mtimes would let a stale "Fresh" through. Instead the slot keeps a manifest
//! (path → digest, mode, size, mtime) of what its `src/` holds: an unchanged file is left alone
//! and keeps its previous mtime, a changed or new file is written with a new mtime strictly
//! later than the one it replaces, and anything not in the tree is removed. Client mtimes never
//! enter: the Merkle tree carries none.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

fn mtime_ns(meta: &fs::Metadata) -> u128 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Makes `dest` hold exactly `entries`, using and updating the manifest at `manifest_path`.
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
    fs::create_dir_all(dest).map_err(io_at(dest))?;

    let desired: BTreeMap<&Path, &DesiredEntry> = entries.iter().map(|e| (e.path(), e)).collect();
    stats.removed = remove_undesired(dest, &desired)?;

    let mut seen_files = HashSet::new();
    for entry in entries {
        let full = dest.join(entry.path());
        match entry {
            DesiredEntry::Directory { .. } => {
                fs::create_dir_all(&full).map_err(io_at(&full))?;
                fs::set_permissions(&full, fs::Permissions::from_mode(0o755))
                    .map_err(io_at(&full))?;
            }
            DesiredEntry::Symlink { target, .. } => {
                let current = fs::read_link(&full).ok();
                if current.as_deref() != Some(Path::new(target)) {
                    remove_any(&full)?;
                    ensure_parent(&full)?;
                    std::os::unix::fs::symlink(target, &full).map_err(io_at(&full))?;
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
                let on_disk = fs::symlink_metadata(&full).ok();
                let unchanged = match (previous, &on_disk) {
                    (Some(previous), Some(meta)) => {
                        meta.is_file()
                            && previous.digest == format!("{digest:?}")
                            && previous.executable == *executable
                            && previous.size == meta.len()
                            && previous.mtime_ns == mtime_ns(meta)
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
                    .chain(on_disk.as_ref().map(mtime_ns))
                    .max();
                let written = write_file(blobs, digest, *executable, &full, not_before)?;
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
    manifest.retain(|path, _| seen_files.contains(path));
    let encoded = serde_json::to_vec(&manifest).expect("manifest serialises");
    let tmp = manifest_path.with_extension("tmp");
    fs::write(&tmp, encoded).map_err(io_at(&tmp))?;
    fs::rename(&tmp, manifest_path).map_err(io_at(manifest_path))?;
    Ok(stats)
}

/// Removes everything under `dest` whose path is not desired with the same kind.
fn remove_undesired(
    dest: &Path,
    desired: &BTreeMap<&Path, &DesiredEntry>,
) -> Result<u64, SyncError> {
    let mut removed = 0;
    let mut stack = vec![dest.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let listing = match fs::read_dir(&dir) {
            Ok(listing) => listing,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_at(&dir)(e)),
        };
        for item in listing {
            let item = item.map_err(io_at(&dir))?;
            let full = item.path();
            let relative = full.strip_prefix(dest).expect("walk stays under dest");
            let file_type = item.file_type().map_err(io_at(&full))?;
            let keep = match desired.get(relative) {
                Some(DesiredEntry::Directory { .. }) => file_type.is_dir(),
                Some(DesiredEntry::File { .. }) => file_type.is_file(),
                Some(DesiredEntry::Symlink { .. }) => file_type.is_symlink(),
                None => false,
            };
            if !keep {
                remove_any(&full)?;
                removed += 1;
            } else if file_type.is_dir() {
                stack.push(full);
            }
        }
    }
    Ok(removed)
}

fn remove_any(path: &Path) -> Result<(), SyncError> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(io_at(path))
}

fn ensure_parent(path: &Path) -> Result<(), SyncError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_at(parent))?;
    }
    Ok(())
}

/// Writes a blob to `path` (via a temp file and rename) and returns the mtime it was given,
/// strictly later than `not_before` so cargo sees the change even within one clock tick.
fn write_file(
    blobs: &BlobStore,
    digest: &Digest,
    executable: bool,
    path: &Path,
    not_before: Option<u128>,
) -> Result<u128, SyncError> {
    ensure_parent(path)?;
    let tmp = path.with_file_name(format!(
        ".{}.rba-sync",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    {
        let mut reader = blobs.reader(digest, 0, 0)?;
        let mut file = fs::File::create(&tmp).map_err(io_at(&tmp))?;
        io::copy(&mut reader, &mut file).map_err(io_at(&tmp))?;
        let mode = if executable { 0o755 } else { 0o644 };
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_at(&tmp))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let mtime = match not_before {
            Some(previous) if previous >= now => previous + 1_000_000,
            _ => now,
        };
        file.set_modified(UNIX_EPOCH + Duration::from_nanos(mtime as u64))
            .map_err(io_at(&tmp))?;
    }
    remove_any(path)?;
    fs::rename(&tmp, path).map_err(io_at(path))?;
    let meta = fs::symlink_metadata(path).map_err(io_at(path))?;
    Ok(mtime_ns(&meta))
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
