//! Artifacts back: after `rba build` (embedded or `--remote`), what cargo would leave in
//! `target/<profile>/` is written into the user's own target dir, as if cargo had run here.
//!
//! Why a module: both modes hand back the same list (`target/debug/hello`, digest, executable)
//! and must land it the same way. The paths come from the node and are hostile input: only
//! plain relative paths under `target/` are accepted, and every write goes through
//! [`Beneath`] (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), so neither a `..`, an
//! absolute path nor a symlink already in the user's target dir (a `debug` pointing elsewhere)
//! can send a write outside it. A file already identical (size, then hash) is left alone, so
//! its mtime is kept and cargo's own freshness checks stay valid; anything else is written to
//! a temporary file in the same directory and renamed over the old one.
//!
//! A lock file the node resolved for a workspace without one comes back among the outputs as
//! `Cargo.lock`; [`land_lockfile`] writes it next to `Cargo.toml`, as cargo would have, and
//! [`land`] leaves it out of the target dir.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use rba_cas::merkle::beneath::{Beneath, EntryKind};
use rba_cas::{BlobStore, Digest};
use rba_executor::runner::RESOLVED_LOCK_PATH;

/// One artifact the job reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Artifact {
    /// Path relative to the job's root, `target/debug/hello`.
    pub path: String,
    /// Its content.
    pub digest: Digest,
    /// Written with mode 0755 (else 0644).
    pub executable: bool,
}

impl From<&rba_executor::runner::Artifact> for Artifact {
    fn from(artifact: &rba_executor::runner::Artifact) -> Self {
        Artifact {
            path: artifact.path.clone(),
            digest: artifact.digest,
            executable: artifact.executable,
        }
    }
}

impl Artifact {
    /// From the End event's list; an artifact without a valid digest is refused by
    /// [`Download::plan`] (its digest is `None`).
    pub fn from_wire(wire: &rba_proto::rba::v1::Artifact) -> Option<Self> {
        let digest = Digest::from_wire(wire.digest.as_ref()?).ok()?;
        Some(Artifact {
            path: wire.path.clone(),
            digest,
            executable: wire.is_executable,
        })
    }
}

/// The local target dir: `--target-dir`, else `CARGO_TARGET_DIR`, else `<workspace>/target`.
pub fn target_dir(flag: Option<&Path>, workspace: &Path) -> PathBuf {
    if let Some(dir) = flag {
        return dir.to_path_buf();
    }
    match std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => workspace.join("target"),
    }
}

/// Where an artifact path from the node lands, relative to the target dir (`target/debug/hello`
/// → `debug/hello`); anything but `target/` followed by plain components is refused.
pub fn relative_in_target(path: &str) -> Result<PathBuf, String> {
    // Judged on the text itself: `Path::components` would quietly drop `.` and empty parts.
    let mut parts = path.split('/');
    if parts.next() != Some("target") {
        return Err(format!("{path:?} is not under target/"));
    }
    let rest: Vec<&str> = parts.collect();
    if rest.is_empty() {
        return Err(format!("{path:?} names no file"));
    }
    if path.contains('\0') || rest.iter().any(|p| matches!(*p, "" | "." | "..")) {
        return Err(format!(
            "{path:?} is not a plain relative path ('..', '.', empty or absolute parts are refused)"
        ));
    }
    Ok(rest.iter().collect())
}

/// What became of one artifact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Landed {
    /// Written (it was missing or different).
    Fetched {
        /// The artifact's path (`target/debug/hello`).
        path: String,
        /// Bytes written.
        size: u64,
    },
    /// Already identical: left untouched.
    Unchanged {
        /// The artifact's path.
        path: String,
    },
    /// Refused: not written.
    Refused {
        /// The path as the node sent it.
        path: String,
        /// Why.
        reason: String,
    },
}

/// The artifacts of one job, checked against the local target dir.
#[derive(Debug)]
pub struct Download {
    target: Beneath,
    /// Artifacts to write: (where beneath the target dir, what).
    pending: Vec<(PathBuf, Artifact)>,
    /// Refused and unchanged ones, in the order given.
    settled: Vec<Landed>,
}

impl Download {
    /// Opens (creating it if needed) the target dir and sorts `artifacts` into refused, already
    /// there and to be written. `None` entries (no usable digest) are refused.
    pub fn plan(
        target_dir: &Path,
        artifacts: &[(String, Option<Artifact>)],
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(target_dir)
            .with_context(|| format!("creating the target dir {}", target_dir.display()))?;
        // The user's own choice of directory may itself be a symlink: resolve it once; nothing
        // beneath it is followed.
        let resolved = std::fs::canonicalize(target_dir)
            .with_context(|| format!("resolving the target dir {}", target_dir.display()))?;
        let target = Beneath::open(&resolved)
            .with_context(|| format!("opening the target dir {}", target_dir.display()))?;
        let mut download = Download {
            target,
            pending: Vec::new(),
            settled: Vec::new(),
        };
        for (path, artifact) in artifacts {
            let Some(artifact) = artifact else {
                download.settled.push(Landed::Refused {
                    path: path.clone(),
                    reason: "the node sent no valid digest".into(),
                });
                continue;
            };
            match relative_in_target(&artifact.path) {
                Err(reason) => download.settled.push(Landed::Refused {
                    path: path.clone(),
                    reason,
                }),
                Ok(relative) => match download.is_current(&relative, artifact) {
                    Ok(true) => download
                        .settled
                        .push(Landed::Unchanged { path: path.clone() }),
                    Ok(false) => download.pending.push((relative, artifact.clone())),
                    Err(error) => download.settled.push(Landed::Refused {
                        path: path.clone(),
                        reason: error.to_string(),
                    }),
                },
            }
        }
        Ok(download)
    }

    /// True when the file at `relative` has the artifact's content and executable bit.
    fn is_current(&self, relative: &Path, artifact: &Artifact) -> std::io::Result<bool> {
        let meta = match self.target.metadata(relative) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        if meta.kind != EntryKind::File
            || meta.size != artifact.digest.size
            || (meta.mode & 0o111 != 0) != artifact.executable
        {
            return Ok(false);
        }
        let mut file = self.target.open_file(relative)?;
        let mut hasher = artifact.digest.function.hasher();
        let mut buffer = vec![0u8; 256 * 1024];
        loop {
            let n = file.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
        Ok(hasher.finish() == artifact.digest)
    }

    /// The blobs the writes need (to fetch into the local store first when remote).
    pub fn digests(&self) -> Vec<Digest> {
        let mut digests: Vec<Digest> = self.pending.iter().map(|(_, a)| a.digest).collect();
        digests.sort();
        digests.dedup();
        digests
    }

    /// Writes the pending artifacts from `store`; returns what became of every artifact. A
    /// path the target dir refuses (a symlink on the way) is reported as refused; an I/O
    /// failure of the target dir itself is an error.
    pub fn write(self, store: &BlobStore) -> anyhow::Result<Vec<Landed>> {
        let mut landed = self.settled;
        for (relative, artifact) in &self.pending {
            match write_one(&self.target, relative, artifact, store) {
                Ok(()) => landed.push(Landed::Fetched {
                    path: artifact.path.clone(),
                    size: artifact.digest.size,
                }),
                Err(error)
                    if error.kind() == std::io::ErrorKind::InvalidInput
                        || (error.kind() == std::io::ErrorKind::PermissionDenied
                            && error.to_string().contains("refused")) =>
                {
                    landed.push(Landed::Refused {
                        path: artifact.path.clone(),
                        reason: error.to_string(),
                    })
                }
                Err(error) => {
                    return Err(anyhow::Error::new(error).context(format!(
                        "writing {} into {}",
                        artifact.path,
                        self.target.path().display()
                    )));
                }
            }
        }
        Ok(landed)
    }
}

/// Temp file in the artifact's directory, then rename over the final name.
fn write_one(
    target: &Beneath,
    relative: &Path,
    artifact: &Artifact,
    store: &BlobStore,
) -> std::io::Result<()> {
    let parent = relative.parent().unwrap_or(Path::new(""));
    let name = relative
        .file_name()
        .expect("checked: a normal last component");
    if !parent.as_os_str().is_empty() {
        target.create_dir_all(parent)?;
    }
    let directory = target.open_dir(parent)?;
    let mode = if artifact.executable { 0o755 } else { 0o644 };
    let (temp, mut file) = directory.create_temp(mode)?;
    let written = (|| {
        let mut reader = store
            .reader(&artifact.digest, 0, 0)
            .map_err(std::io::Error::other)?;
        std::io::copy(&mut reader, &mut file)?;
        file.flush()?;
        // The umask applied at creation: set the mode exactly.
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        drop(file);
        directory.rename_from(&directory, Path::new(&temp), Path::new(name))
    })();
    if written.is_err() {
        let _ = directory.remove(Path::new(&temp));
    }
    written
}

/// Lands `artifacts` (the job's list as the node reported it) from `store` in `target_dir`
/// after `fetch` brought the blobs the writes need into `store`, and prints one line per
/// artifact written or refused. Returns what became of each.
pub async fn land<F, Fut>(
    target_dir: &Path,
    artifacts: &[(String, Option<Artifact>)],
    store: &BlobStore,
    colours: bool,
    fetch: F,
) -> anyhow::Result<Vec<Landed>>
where
    F: FnOnce(Vec<Digest>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    // The resolved lock file is not the target dir's: see [`land_lockfile`].
    let artifacts: Vec<_> = artifacts
        .iter()
        .filter(|(path, _)| path != RESOLVED_LOCK_PATH)
        .cloned()
        .collect();
    if artifacts.is_empty() {
        return Ok(Vec::new());
    }
    let download = Download::plan(target_dir, &artifacts)?;
    let digests = download.digests();
    if !digests.is_empty() {
        fetch(digests)
            .await
            .context("fetching the build's artifacts")?;
    }
    let store = store.clone();
    let landed = tokio::task::spawn_blocking(move || download.write(&store)).await??;
    for outcome in &landed {
        match outcome {
            Landed::Fetched { path, size } => eprintln!(
                "{}",
                crate::output::status_line(
                    colours,
                    "Fetched",
                    &format!("{path} ({})", human_size(*size))
                )
            ),
            Landed::Unchanged { .. } => {}
            Landed::Refused { path, reason } => {
                eprintln!("rba: warning: refused the artifact {path:?}, not written: {reason}")
            }
        }
    }
    Ok(landed)
}

/// Writes the lock file the node resolved for a workspace that had none (the job's
/// [`RESOLVED_LOCK_PATH`] output) next to the workspace's `Cargo.toml`, as cargo would have.
///
/// Only when the workspace still has no `Cargo.lock`: one that appeared meanwhile is the
/// user's and kept. The write goes through [`Beneath`] in the workspace dir with a new
/// temporary file renamed into place, so a `Cargo.lock` that is a symlink (dangling or not)
/// is never followed. Returns whether the file was written.
pub async fn land_lockfile<F, Fut>(
    workspace: &Path,
    artifacts: &[(String, Option<Artifact>)],
    store: &BlobStore,
    colours: bool,
    fetch: F,
) -> anyhow::Result<bool>
where
    F: FnOnce(Vec<Digest>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let Some((_, lock)) = artifacts
        .iter()
        .find(|(path, _)| path == RESOLVED_LOCK_PATH)
    else {
        return Ok(false);
    };
    let Some(lock) = lock else {
        eprintln!("rba: warning: the node sent the resolved Cargo.lock without a valid digest");
        return Ok(false);
    };
    let directory = Beneath::open(workspace)
        .with_context(|| format!("opening the workspace {}", workspace.display()))?;
    match directory.metadata(Path::new(RESOLVED_LOCK_PATH)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Ok(_) => {
            eprintln!(
                "rba: warning: {} exists (written during the build, or a link); the node's \
                 resolved lock file {:?} was not written",
                workspace.join(RESOLVED_LOCK_PATH).display(),
                lock.digest
            );
            return Ok(false);
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!(
                "checking {}",
                workspace.join(RESOLVED_LOCK_PATH).display()
            )));
        }
    }
    fetch(vec![lock.digest])
        .await
        .context("fetching the resolved Cargo.lock")?;
    let lock_artifact = Artifact {
        executable: false,
        ..lock.clone()
    };
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        write_one(
            &directory,
            Path::new(RESOLVED_LOCK_PATH),
            &lock_artifact,
            &store,
        )
    })
    .await?
    .with_context(|| format!("writing {}", workspace.join(RESOLVED_LOCK_PATH).display()))?;
    eprintln!(
        "{}",
        crate::output::status_line(
            colours,
            "Resolved",
            &format!("{} (written by the node's resolution)", RESOLVED_LOCK_PATH)
        )
    );
    Ok(true)
}

/// `1.2 MiB`, `816 B`: cargo's way of giving sizes.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rba_cas::DigestFunction;

    #[test]
    fn only_plain_paths_under_target_are_accepted() {
        assert_eq!(
            relative_in_target("target/debug/hello").unwrap(),
            PathBuf::from("debug/hello")
        );
        for hostile in [
            "../x",
            "/etc/x",
            "target/../../x",
            "target/debug/../../x",
            "target",
            "target/",
            "src/main.rs",
            "./target/debug/x",
            "target/./debug/x",
            "target//debug/x",
            "target/debug/x/",
            "target/debug/\0x",
            "",
        ] {
            assert!(relative_in_target(hostile).is_err(), "{hostile:?} accepted");
        }
    }

    fn store_with(bytes: &[u8]) -> (tempfile::TempDir, BlobStore, Digest) {
        let (dir, cas) = rba_cas::Cas::scratch().unwrap();
        let digest = cas.blobs.put_bytes(DigestFunction::Blake3, bytes).unwrap();
        (dir, cas.blobs, digest)
    }

    fn artifact(path: &str, digest: Digest) -> (String, Option<Artifact>) {
        (
            path.to_string(),
            Some(Artifact {
                path: path.to_string(),
                digest,
                executable: true,
            }),
        )
    }

    #[tokio::test]
    async fn the_resolved_lock_lands_next_to_cargo_toml_never_through_a_symlink() {
        let lock_text = b"version = 4\n";
        let (_store_dir, store, digest) = store_with(lock_text);
        let list = vec![
            artifact("target/debug/app", digest),
            artifact("Cargo.lock", digest),
        ];
        let no_fetch = |_| async { Ok::<(), anyhow::Error>(()) };

        let workspace = tempfile::tempdir().unwrap();
        assert!(
            land_lockfile(workspace.path(), &list, &store, false, no_fetch)
                .await
                .unwrap()
        );
        let lock = workspace.path().join("Cargo.lock");
        assert_eq!(std::fs::read(&lock).unwrap(), lock_text);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&lock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644, "a lock file is never executable");

        // One the user has (written meanwhile) is kept.
        std::fs::write(&lock, "mine").unwrap();
        assert!(
            !land_lockfile(workspace.path(), &list, &store, false, no_fetch)
                .await
                .unwrap()
        );
        assert_eq!(std::fs::read_to_string(&lock).unwrap(), "mine");

        // A symlink named Cargo.lock (dangling here) is not followed: nothing is created.
        let other = tempfile::tempdir().unwrap();
        let outside = other.path().join("outside");
        let workspace = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(&outside, workspace.path().join("Cargo.lock")).unwrap();
        assert!(
            !land_lockfile(workspace.path(), &list, &store, false, no_fetch)
                .await
                .unwrap()
        );
        assert!(!outside.exists());

        // Without a resolved lock among the outputs, nothing happens.
        let workspace = tempfile::tempdir().unwrap();
        assert!(
            !land_lockfile(workspace.path(), &list[..1], &store, false, no_fetch)
                .await
                .unwrap()
        );
        assert!(!workspace.path().join("Cargo.lock").exists());
    }

    #[test]
    fn hostile_paths_and_a_symlinked_profile_dir_write_nothing_outside() {
        let (_store_dir, store, digest) = store_with(b"#!/bin/sh\necho hi\n");
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("target");
        let elsewhere = root.path().join("elsewhere");
        std::fs::create_dir_all(&target).unwrap();
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, target.join("debug")).unwrap();

        let list = vec![
            artifact("../x", digest),
            artifact("/etc/x", digest),
            artifact("target/../../x", digest),
            artifact("target/debug/hello", digest),
            artifact("target/release/hello", digest),
            ("target/debug/nodigest".to_string(), None),
        ];
        let landed = Download::plan(&target, &list)
            .unwrap()
            .write(&store)
            .unwrap();
        let refused: Vec<&str> = landed
            .iter()
            .filter_map(|l| match l {
                Landed::Refused { path, .. } => Some(path.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(
            refused.len(),
            5,
            "every hostile path and the symlinked dir are refused: {landed:?}"
        );
        assert!(refused.contains(&"target/debug/hello"), "{landed:?}");
        assert_eq!(
            std::fs::read_dir(&elsewhere).unwrap().count(),
            0,
            "nothing written through the symlink"
        );
        assert!(!root.path().join("x").exists());
        assert!(!Path::new("/etc/x").exists());
        // The plain one still lands, executable.
        let written = target.join("release/hello");
        assert_eq!(std::fs::read(&written).unwrap(), b"#!/bin/sh\necho hi\n");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&written).unwrap().permissions().mode() & 0o777,
            0o755
        );
        // The symlink itself is left as it was.
        assert!(
            std::fs::symlink_metadata(target.join("debug"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn identical_files_are_kept_and_different_ones_replaced() {
        let (_store_dir, store, digest) = store_with(b"new contents");
        let target = tempfile::tempdir().unwrap();
        let list = vec![artifact("target/debug/app", digest)];
        let first = Download::plan(target.path(), &list)
            .unwrap()
            .write(&store)
            .unwrap();
        assert!(
            matches!(first[0], Landed::Fetched { size: 12, .. }),
            "{first:?}"
        );
        let again = Download::plan(target.path(), &list).unwrap();
        assert!(again.digests().is_empty());
        let second = again.write(&store).unwrap();
        assert!(matches!(second[0], Landed::Unchanged { .. }), "{second:?}");

        // Same size, other bytes: replaced.
        std::fs::write(target.path().join("debug/app"), b"old contents").unwrap();
        let third = Download::plan(target.path(), &list).unwrap();
        assert_eq!(third.digests(), vec![digest]);
        third.write(&store).unwrap();
        assert_eq!(
            std::fs::read(target.path().join("debug/app")).unwrap(),
            b"new contents"
        );
        let leftovers = std::fs::read_dir(target.path().join("debug"))
            .unwrap()
            .count();
        assert_eq!(leftovers, 1, "no temporary file is left behind");
    }

    #[test]
    fn sizes_read_like_cargos() {
        assert_eq!(human_size(816), "816 B");
        assert_eq!(human_size(1024), "1.0 KiB");
        assert_eq!(human_size(1_258_291), "1.2 MiB");
    }
}
