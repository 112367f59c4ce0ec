//! On-disk caches shared between jobs: what makes a repeated build cost what a local
//! incremental build costs.
//!
//! Layout under the executor's data directory:
//! ```text
//! cargo-home/                      one shared CARGO_HOME (registry index, .crate files, git)
//! slots/<slot>/src/                the workspace's sources, kept in sync with each input root
//! slots/<slot>/target/             the target dir of (tenant, workspace identity, toolchain)
//! slots/<slot>/disk.img, vol/      with a disk limit: the slot's volume, target dir vol/target
//!                                  (see the `quota` module)
//! slots/<slot>/manifest.json       path → (digest, mtime) of what `src/` holds
//! slots/<slot>/lock                flock'd while a job uses the slot
//! jobs/<job id>/                   per-job scratch (REAPI actions' exec roots), removed after
//! exec-volumes/<n>/disk.img, vol/  with a disk limit: size-capped volumes REAPI actions run in
//!                                  (exec root vol/exec), one at a time each (`lock`), reused
//! ```
//! Contract: a slot belongs to one tenant (its key includes the [`Tenant`]; a target dir one
//! tenant's build scripts wrote into never serves another tenant's build, see the runner's
//! module doc); a slot is used by one job at a time ([`SlotLock`] is an exclusive `flock`, so two
//! processes sharing a data dir also exclude each other); cargo fingerprints embed absolute
//! paths, so a slot is always mounted at the same sandbox paths (`/workspace`, `/target`).
//! Cargo's own cache auto-clean is turned off (`CARGO_CACHE_AUTO_CLEAN_FREQUENCY=never` in the
//! job environment); [`CacheLayout::cleanup`] is the LRU cleanup instead.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::tenant::Tenant;

/// Where the executor keeps its caches.
#[derive(Clone, Debug)]
pub struct CacheLayout {
    root: PathBuf,
}

/// The directories of one (tenant, workspace identity, toolchain) slot.
#[derive(Clone, Debug)]
pub struct Slot {
    /// The slot's directory.
    pub dir: PathBuf,
    /// Synced sources, mounted read-only at `/workspace`.
    pub src: PathBuf,
    /// The target dir, mounted read-write at `/target`.
    pub target: PathBuf,
    /// Manifest of `src/` (see `workspace` module).
    pub manifest: PathBuf,
}

impl CacheLayout {
    /// Creates the layout's directories under `root`.
    pub fn create(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        for dir in ["cargo-home", "slots", "jobs", "exec-volumes"] {
            fs::create_dir_all(root.join(dir))?;
        }
        // Scratch of jobs that were running when the process died.
        for entry in fs::read_dir(root.join("jobs"))? {
            let path = entry?.path();
            let _ = fs::remove_dir_all(&path);
        }
        let layout = CacheLayout { root };
        // Slot volumes a killed executor left mounted.
        layout.unmount_volumes();
        Ok(layout)
    }

    /// Unmounts the disk volumes of the slots no job uses (at start-up and shut-down; a slot
    /// in use keeps its volume, its executor still runs). Failures are logged.
    pub fn unmount_volumes(&self) {
        for kind in ["slots", "exec-volumes"] {
            let Ok(entries) = fs::read_dir(self.root.join(kind)) else {
                continue;
            };
            for dir in entries.flatten().map(|e| e.path()) {
                if !dir.join("vol").exists() {
                    continue;
                }
                let Ok(Some(_lock)) = SlotLock::try_acquire(&dir) else {
                    continue;
                };
                if let Err(e) = crate::quota::unmount_under(&dir) {
                    tracing::warn!(volume = %dir.display(), "unmounting a disk volume: {e}");
                }
            }
        }
    }

    /// A free exec volume directory (`exec-volumes/<n>`, the first no job holds, made when all are
    /// held), locked for one REAPI action: its volume (mounted by the caller, once per
    /// process) is where the action's exec root lives, so what an action writes is capped as
    /// a cargo job's target dir is. As many exist as actions ever ran at once, across the
    /// processes sharing this data directory; each is reused.
    pub fn exec_volume(&self) -> io::Result<(PathBuf, SlotLock)> {
        for index in 0usize.. {
            let dir = self.root.join("exec-volumes").join(index.to_string());
            fs::create_dir_all(&dir)?;
            if let Some(lock) = SlotLock::try_acquire(&dir)? {
                return Ok((dir, lock));
            }
        }
        unreachable!("a free index is found before usize runs out")
    }

    /// The executor's data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The shared cargo home.
    pub fn cargo_home(&self) -> PathBuf {
        self.root.join("cargo-home")
    }

    /// The marker recording that the dependencies of the lock file with this digest (hex) are
    /// in the shared cargo home. Beside the cargo home, never inside: no sandbox mounts it.
    pub fn fetched_marker(&self, lock_digest_hex: &str) -> io::Result<PathBuf> {
        let dir = self.root.join("fetched");
        fs::create_dir_all(&dir)?;
        Ok(dir.join(lock_digest_hex))
    }

    /// The slot of a tenant's workspace identity under a toolchain; all three are hashed
    /// (length-prefixed, so no two triples collide) into a fixed-length, path-safe name, so
    /// hostile identities cannot escape the layout nor name another tenant's slot.
    pub fn slot(
        &self,
        tenant: &Tenant,
        workspace_identity: &str,
        toolchain_digest: &str,
    ) -> io::Result<Slot> {
        let mut hasher = blake3::Hasher::new();
        for part in [tenant.as_str(), workspace_identity, toolchain_digest] {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        let name = hasher.finalize().to_hex()[..32].to_string();
        let dir = self.root.join("slots").join(name);
        let slot = Slot {
            src: dir.join("src"),
            target: dir.join("target"),
            manifest: dir.join("manifest.json"),
            dir,
        };
        fs::create_dir_all(&slot.src)?;
        fs::create_dir_all(&slot.target)?;
        Ok(slot)
    }

    /// A fresh scratch directory for one job; removed when the guard drops.
    pub fn job_dir(&self, job_id: &str) -> io::Result<JobDir> {
        let path = self.root.join("jobs").join(sanitize(job_id));
        if path.exists() {
            fs::remove_dir_all(&path)?;
        }
        fs::create_dir_all(&path)?;
        Ok(JobDir { path })
    }

    /// Removes least-recently-used slots until at most `max_slots` remain (locked slots are
    /// skipped). Returns how many were removed.
    pub fn cleanup(&self, max_slots: usize) -> io::Result<usize> {
        let mut slots: Vec<(SystemTime, PathBuf)> = fs::read_dir(self.root.join("slots"))?
            .filter_map(|e| e.ok())
            .map(|e| {
                let used = fs::metadata(e.path().join("lock"))
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                (used, e.path())
            })
            .collect();
        if slots.len() <= max_slots {
            return Ok(0);
        }
        slots.sort();
        let excess = slots.len() - max_slots;
        let mut removed = 0;
        for (_, dir) in slots.into_iter().take(excess) {
            let Ok(Some(_lock)) = SlotLock::try_acquire(&dir) else {
                continue;
            };
            crate::quota::unmount_under(&dir)?;
            fs::remove_dir_all(&dir)?;
            removed += 1;
        }
        Ok(removed)
    }
}

/// What the caches hold (the node's dashboard and `/cache/stats` show it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheUsage {
    /// Per-(tenant, workspace, toolchain) slots on disk.
    pub slots: usize,
    /// Bytes of the shared cargo home (registry index, crate sources, git checkouts).
    pub cargo_home_bytes: u64,
    /// Registry units shared across workspaces (filled in by [`crate::runner::Executor::cache_usage`]).
    pub shared_units: crate::shared_units::SharedUnitStats,
}

impl CacheLayout {
    /// Counts the slots and sums the shared cargo home's file sizes (a directory walk that
    /// follows no links: call it off the async threads, and not on every request).
    pub fn usage(&self) -> CacheUsage {
        let slots = fs::read_dir(self.root.join("slots"))
            .map(|entries| entries.filter_map(Result::ok).count())
            .unwrap_or(0);
        let mut cargo_home_bytes = 0;
        let mut queue = vec![self.cargo_home()];
        while let Some(dir) = queue.pop() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                match entry.file_type() {
                    Ok(kind) if kind.is_dir() => queue.push(entry.path()),
                    Ok(kind) if kind.is_file() => {
                        cargo_home_bytes += entry.metadata().map(|m| m.len()).unwrap_or(0)
                    }
                    _ => {}
                }
            }
        }
        CacheUsage {
            slots,
            cargo_home_bytes,
            ..CacheUsage::default()
        }
    }
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect()
}

impl Slot {
    /// True when the target dir holds nothing at all: whatever a build in it sees was made by
    /// that build. Meaningful only while the caller holds the slot's [`SlotLock`].
    pub fn target_is_empty(&self) -> io::Result<bool> {
        match fs::read_dir(&self.target) {
            Ok(mut entries) => Ok(entries.next().is_none()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(e),
        }
    }
}

/// A per-job scratch directory, removed on drop.
#[derive(Debug)]
pub struct JobDir {
    path: PathBuf,
}

impl JobDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for JobDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove job dir");
        }
    }
}

/// Exclusive use of a slot, across threads and processes (an `flock` on `slot/lock`, released
/// when the guard drops).
#[derive(Debug)]
pub struct SlotLock {
    _lock: nix::fcntl::Flock<File>,
}

impl SlotLock {
    fn open(dir: &Path) -> io::Result<File> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))?;
        // Records the slot's last use for `cleanup`.
        file.set_modified(SystemTime::now())?;
        Ok(file)
    }

    /// Waits for the slot (blocking; call from `spawn_blocking`).
    pub fn acquire(slot: &Slot) -> io::Result<SlotLock> {
        let file = Self::open(&slot.dir)?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| io::Error::from(e))?;
        Ok(SlotLock { _lock: lock })
    }

    /// Takes the slot if free.
    pub fn try_acquire(dir: &Path) -> io::Result<Option<SlotLock>> {
        let file = Self::open(dir)?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(SlotLock { _lock: lock })),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(io::Error::from(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_slots_and_the_cargo_homes_files_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        let layout = CacheLayout::create(dir.path().join("executor")).unwrap();
        assert_eq!(layout.usage(), CacheUsage::default());
        layout.slot(&Tenant::token("a"), "w", "tc").unwrap();
        layout.slot(&Tenant::token("b"), "w", "tc").unwrap();
        let registry = layout.cargo_home().join("registry/src/x");
        fs::create_dir_all(&registry).unwrap();
        fs::write(registry.join("lib.rs"), vec![0u8; 1000]).unwrap();
        fs::write(layout.cargo_home().join(".package-cache"), b"lock").unwrap();
        // A link to something big outside is not the cache's size.
        fs::write(dir.path().join("big"), vec![0u8; 100_000]).unwrap();
        std::os::unix::fs::symlink(dir.path().join("big"), registry.join("link")).unwrap();
        std::os::unix::fs::symlink(dir.path(), registry.join("loop")).unwrap();
        assert_eq!(
            layout.usage(),
            CacheUsage {
                slots: 2,
                cargo_home_bytes: 1004,
                ..CacheUsage::default()
            }
        );
    }

    #[test]
    fn slots_are_stable_exclusive_and_path_safe() {
        let dir = tempfile::tempdir().unwrap();
        let layout = CacheLayout::create(dir.path()).unwrap();
        let (alice, bob) = (Tenant::token("alice"), Tenant::token("bob"));
        let a = layout.slot(&alice, "../../etc", "tc1").unwrap();
        assert!(a.dir.starts_with(dir.path().join("slots")));
        assert!(
            a.target_is_empty().unwrap(),
            "a new slot's target dir is empty"
        );
        assert_eq!(layout.slot(&alice, "../../etc", "tc1").unwrap().dir, a.dir);
        assert_ne!(layout.slot(&alice, "../../etc", "tc2").unwrap().dir, a.dir);
        assert_ne!(
            layout.slot(&bob, "../../etc", "tc1").unwrap().dir,
            a.dir,
            "another tenant never gets the same slot"
        );
        // The parts are length-prefixed: moving text from one part to the next is another slot.
        assert_ne!(
            layout.slot(&alice, "ab", "c").unwrap().dir,
            layout.slot(&alice, "a", "bc").unwrap().dir
        );
        fs::write(a.target.join(".fingerprint"), b"planted").unwrap();
        assert!(!a.target_is_empty().unwrap(), "a dotfile is content too");
        let held = SlotLock::acquire(&a).unwrap();
        assert!(SlotLock::try_acquire(&a.dir).unwrap().is_none());
        drop(held);
        assert!(SlotLock::try_acquire(&a.dir).unwrap().is_some());
    }

    #[test]
    fn job_dirs_vanish_and_cleanup_keeps_newest() {
        let dir = tempfile::tempdir().unwrap();
        let layout = CacheLayout::create(dir.path()).unwrap();
        let job = layout.job_dir("job/../1").unwrap();
        let path = job.path().to_path_buf();
        assert!(path.starts_with(dir.path().join("jobs")));
        fs::write(path.join("x"), b"x").unwrap();
        drop(job);
        assert!(!path.exists());
        let dirs: Vec<PathBuf> = (0..3)
            .map(|i| {
                let slot = layout
                    .slot(&Tenant::local(), &format!("ws{i}"), "tc")
                    .unwrap();
                drop(SlotLock::acquire(&slot).unwrap());
                std::thread::sleep(std::time::Duration::from_millis(20));
                slot.dir
            })
            .collect();
        assert_eq!(layout.cleanup(2).unwrap(), 1);
        assert!(!dirs[0].exists(), "least recently used slot removed");
        assert!(dirs[1].exists() && dirs[2].exists());
    }
}
