//! Host-side filesystem calls beneath one directory, which no path inside it can steer out.
//!
//! Why: the executor (often root) writes client trees onto the host and reads what jobs left
//! there. A relative path joined onto a host directory and handed to `open(2)` follows every
//! symlink on the way: one that a tree or an earlier job placed at `a` sends a write of `a/b`
//! anywhere on the host. Here every path is resolved relative to an open directory with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`: a symlink anywhere on the way (present
//! from the start or swapped in at any moment), a `..`, or an absolute path fails the call
//! instead of leaving the directory. The final component is then created, replaced, read or
//! removed with the `*at` calls on its parent's descriptor, none of which follows a final
//! symlink (`O_NOFOLLOW`, `O_EXCL`, `mkdirat`, `symlinkat`, `renameat`, `unlinkat`). Kernels
//! without `openat2` (before 5.6, or where seccomp hides it) get the same rule by opening one
//! component at a time with `O_NOFOLLOW`.
//!
//! Paths given to [`Beneath`] must be plain relative paths (normal components only); anything
//! else is refused with [`io::ErrorKind::InvalidInput`] naming it.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// What kind of entry a path names (never following a final symlink).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
    /// A FIFO, socket or device.
    Other,
}

/// The metadata of one entry (as `lstat` gives it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryMeta {
    /// Its kind.
    pub kind: EntryKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: u128,
}

/// An open directory, and the calls that act beneath it. Cheap to share between threads.
#[derive(Debug)]
pub struct Beneath {
    fd: OwnedFd,
    path: PathBuf,
}

fn refused(path: &Path, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{}: {why}", path.display()),
    )
}

/// Turns the errors of a refused resolution into one that says so.
fn resolution_error(root: &Path, relative: &Path, errno: Errno) -> io::Error {
    match errno {
        Errno::LOOP | Errno::XDEV => io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{}: refused, the path crosses a symlink or leaves {} (nothing under it is reached through a symlink)",
                relative.display(),
                root.display()
            ),
        ),
        other => io::Error::from(other),
    }
}

fn kind_of(mode: u32) -> EntryKind {
    match FileType::from_raw_mode(mode as _) {
        FileType::RegularFile => EntryKind::File,
        FileType::Directory => EntryKind::Directory,
        FileType::Symlink => EntryKind::Symlink,
        _ => EntryKind::Other,
    }
}

impl Beneath {
    /// Opens the directory at `path` (a path of the executor's own, trusted up to its last
    /// component, which must not be a symlink).
    pub fn open(path: &Path) -> io::Result<Beneath> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("opening {}: {e}", path.display()),
            )
        })?;
        Ok(Beneath {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Creates the directory at `path` (and its parents) if needed, then opens it.
    pub fn create(path: &Path) -> io::Result<Beneath> {
        std::fs::create_dir_all(path)?;
        Beneath::open(path)
    }

    /// The host path this was opened at (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory's descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A path naming the open directory itself, through `/proc/self/fd`, for APIs that only
    /// take paths: resolving it lands on this directory whatever its host path now holds.
    pub fn proc_path(&self) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    fn check(relative: &Path) -> io::Result<()> {
        if relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
        {
            Ok(())
        } else {
            Err(refused(
                relative,
                "not a plain relative path (absolute, '.' or '..' components are refused)",
            ))
        }
    }

    /// Opens a directory beneath this one (the empty path is this one).
    fn open_dir_fd(&self, relative: &Path) -> io::Result<OwnedFd> {
        Self::check(relative)?;
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        if relative.as_os_str().is_empty() {
            return rustix::fs::openat(&self.fd, ".", flags, Mode::empty()).map_err(Into::into);
        }
        // RESOLVE_NO_SYMLINKS covers the final component too (ELOOP, where O_NOFOLLOW with
        // O_DIRECTORY would say ENOTDIR).
        match rustix::fs::openat2(
            &self.fd,
            relative,
            flags - OFlags::NOFOLLOW,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        ) {
            Err(Errno::NOSYS) | Err(Errno::PERM) => {}
            other => return other.map_err(|e| resolution_error(&self.path, relative, e)),
        }
        // No openat2: one component at a time, none followed.
        let mut fd = rustix::io::dup(&self.fd)?;
        for component in relative.components() {
            fd = rustix::fs::openat(&fd, component.as_os_str(), flags, Mode::empty())
                .map_err(|e| resolution_error(&self.path, relative, e))?;
        }
        Ok(fd)
    }

    /// Opens a directory beneath this one as a [`Beneath`] of its own.
    pub fn open_dir(&self, relative: &Path) -> io::Result<Beneath> {
        Ok(Beneath {
            fd: self.open_dir_fd(relative)?,
            path: self.path.join(relative),
        })
    }

    /// The parent directory's descriptor and the final name of `relative`.
    fn parent_of<'a>(&self, relative: &'a Path) -> io::Result<(OwnedFd, &'a OsStr)> {
        Self::check(relative)?;
        let name = relative
            .file_name()
            .ok_or_else(|| refused(relative, "empty path"))?;
        let parent = relative.parent().unwrap_or(Path::new(""));
        Ok((self.open_dir_fd(parent)?, name))
    }

    /// The metadata of the entry at `relative`, not following a final symlink.
    pub fn metadata(&self, relative: &Path) -> io::Result<EntryMeta> {
        let (parent, name) = self.parent_of(relative)?;
        let stat = rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
        let seconds = stat.st_mtime as i64;
        let nanos = stat.st_mtime_nsec as u64;
        Ok(EntryMeta {
            kind: kind_of(stat.st_mode as u32),
            size: stat.st_size as u64,
            mode: stat.st_mode as u32 & 0o7777,
            mtime_ns: (seconds.max(0) as u128) * 1_000_000_000 + nanos as u128,
        })
    }

    /// The target of the symlink at `relative`.
    pub fn read_link(&self, relative: &Path) -> io::Result<OsString> {
        let (parent, name) = self.parent_of(relative)?;
        let target = rustix::fs::readlinkat(&parent, name, Vec::new())?;
        Ok(OsStr::from_bytes(target.as_bytes()).to_os_string())
    }

    /// Creates the directory `relative` with `mode`; an existing directory (not a symlink to
    /// one) is fine and keeps its mode.
    pub fn create_dir(&self, relative: &Path, mode: u32) -> io::Result<()> {
        let (parent, name) = self.parent_of(relative)?;
        match rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(mode as _)) {
            Ok(()) => Ok(()),
            Err(Errno::EXIST) => {
                let stat = rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
                if kind_of(stat.st_mode as u32) == EntryKind::Directory {
                    Ok(())
                } else {
                    Err(refused(
                        relative,
                        "exists and is not a directory (a symlink is never followed)",
                    ))
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Creates the directory `relative`, which must not exist.
    pub fn create_new_dir(&self, relative: &Path, mode: u32) -> io::Result<()> {
        let (parent, name) = self.parent_of(relative)?;
        rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(mode as _)).map_err(Into::into)
    }

    /// Creates `relative` and every missing parent (mode 0755), never through a symlink.
    pub fn create_dir_all(&self, relative: &Path) -> io::Result<()> {
        Self::check(relative)?;
        let mut path = PathBuf::new();
        for component in relative.components() {
            path.push(component);
            self.create_dir(&path, 0o755)?;
        }
        Ok(())
    }

    /// Sets the permission bits of the directory `relative` (the empty path: this one).
    pub fn set_dir_mode(&self, relative: &Path, mode: u32) -> io::Result<()> {
        let fd = self.open_dir_fd(relative)?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode as _)).map_err(Into::into)
    }

    /// Creates a new file at `relative` for writing (`O_EXCL`: nothing existing, not even a
    /// dangling symlink, is opened).
    pub fn create_new(&self, relative: &Path, mode: u32) -> io::Result<File> {
        let (parent, name) = self.parent_of(relative)?;
        let fd = rustix::fs::openat(
            &parent,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode as _),
        )?;
        Ok(File::from(fd))
    }

    /// Creates a new file with a fresh unique name directly in this directory; returns the name.
    pub fn create_temp(&self, mode: u32) -> io::Result<(OsString, File)> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        loop {
            let name = format!(
                "tmp-{}-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .subsec_nanos()
            );
            match self.create_new(Path::new(&name), mode) {
                Ok(file) => return Ok((name.into(), file)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Opens the regular file at `relative` for reading: never a symlink (final or on the
    /// way), never blocking on a FIFO; anything but a regular file is refused.
    pub fn open_file(&self, relative: &Path) -> io::Result<File> {
        let (parent, name) = self.parent_of(relative)?;
        let fd = rustix::fs::openat(
            &parent,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| resolution_error(&self.path, relative, e))?;
        let file = File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(refused(relative, "not a regular file"));
        }
        Ok(file)
    }

    /// Creates a symlink at `relative` pointing at `target` (the target is not resolved here).
    pub fn symlink(&self, target: &OsStr, relative: &Path) -> io::Result<()> {
        let (parent, name) = self.parent_of(relative)?;
        rustix::fs::symlinkat(target, &parent, name).map_err(Into::into)
    }

    /// Hard-links `source` (a host path of the executor's own, e.g. a store blob) at
    /// `relative`.
    pub fn hard_link_from(&self, source: &Path, relative: &Path) -> io::Result<()> {
        let (parent, name) = self.parent_of(relative)?;
        rustix::fs::linkat(rustix::fs::CWD, source, &parent, name, AtFlags::empty())
            .map_err(Into::into)
    }

    /// Moves `from` (beneath `source`) to `to` (beneath this one), replacing a file or symlink
    /// there.
    pub fn rename_from(&self, source: &Beneath, from: &Path, to: &Path) -> io::Result<()> {
        let (from_parent, from_name) = source.parent_of(from)?;
        let (to_parent, to_name) = self.parent_of(to)?;
        rustix::fs::renameat(&from_parent, from_name, &to_parent, to_name).map_err(Into::into)
    }

    /// Removes whatever is at `relative` (a directory with everything in it); a missing entry
    /// is fine. Nothing is followed: a symlink is removed, not what it points at.
    pub fn remove(&self, relative: &Path) -> io::Result<()> {
        let (parent, name) = self.parent_of(relative)?;
        remove_at(parent, name.to_os_string())
    }

    /// The names and kinds of the entries of the directory `relative` (the empty path: this
    /// one), without `.` and `..`.
    pub fn read_dir(&self, relative: &Path) -> io::Result<Vec<(OsString, EntryKind)>> {
        let fd = self.open_dir_fd(relative)?;
        let mut entries = Vec::new();
        for entry in rustix::fs::Dir::read_from(&fd)? {
            let entry = entry?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            let stat = rustix::fs::statat(&fd, name, AtFlags::SYMLINK_NOFOLLOW)?;
            entries.push((name.to_os_string(), kind_of(stat.st_mode as u32)));
        }
        Ok(entries)
    }
}

/// Removes `name` in the directory `parent`, recursively for a directory, with an explicit
/// stack (a job can leave a very deep tree) and without following anything.
fn remove_at(parent: OwnedFd, name: OsString) -> io::Result<()> {
    use std::sync::Arc;
    let mut stack: Vec<(Arc<OwnedFd>, OsString)> = vec![(Arc::new(parent), name)];
    while let Some((parent, name)) = stack.last().cloned() {
        match rustix::fs::unlinkat(&*parent, &name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {
                stack.pop();
                continue;
            }
            Err(Errno::ISDIR) | Err(Errno::PERM) => {}
            Err(e) => return Err(e.into()),
        }
        let dir = match rustix::fs::openat(
            &*parent,
            &name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(dir) => Arc::new(dir),
            Err(Errno::NOENT) => {
                stack.pop();
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let mut subdirs = Vec::new();
        for entry in rustix::fs::Dir::read_from(&*dir)? {
            let entry = entry?;
            let child = OsStr::from_bytes(entry.file_name().to_bytes());
            if child == "." || child == ".." {
                continue;
            }
            match rustix::fs::unlinkat(&*dir, child, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(Errno::ISDIR) | Err(Errno::PERM) => subdirs.push(child.to_os_string()),
                Err(e) => return Err(e.into()),
            }
        }
        if subdirs.is_empty() {
            match rustix::fs::unlinkat(&*parent, &name, AtFlags::REMOVEDIR) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(e) => return Err(e.into()),
            }
            stack.pop();
        } else {
            // Back to this directory once its subdirectories are gone.
            stack.extend(subdirs.into_iter().map(|sub| (dir.clone(), sub)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    #[test]
    fn nothing_is_reached_through_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let host = tmp.path().join("host");
        std::fs::create_dir_all(root.join("real")).unwrap();
        std::fs::create_dir_all(&host).unwrap();
        std::fs::write(host.join("secret"), b"host").unwrap();
        std::os::unix::fs::symlink(&host, root.join("escape")).unwrap();
        std::os::unix::fs::symlink(host.join("secret"), root.join("real/link")).unwrap();
        let beneath = Beneath::open(&root).unwrap();

        for path in [
            "escape/new",
            "escape/secret",
            "../host/secret",
            "/etc/passwd",
        ] {
            assert!(
                beneath.create_new(Path::new(path), 0o644).is_err(),
                "{path}"
            );
            assert!(beneath.open_file(Path::new(path)).is_err(), "{path}");
            assert!(beneath.create_dir_all(Path::new(path)).is_err(), "{path}");
        }
        let err = beneath.open_file(Path::new("escape/secret")).unwrap_err();
        assert!(err.to_string().contains("crosses a symlink"), "{err}");
        assert!(beneath.open_file(Path::new("real/link")).is_err());
        assert!(beneath.create_new(Path::new("real/link"), 0o644).is_err());
        assert_eq!(
            beneath.metadata(Path::new("real/link")).unwrap().kind,
            EntryKind::Symlink
        );
        // Removing the symlinks removes them, not what they point at.
        beneath.remove(Path::new("escape")).unwrap();
        beneath.remove(Path::new("real")).unwrap();
        assert_eq!(std::fs::read(host.join("secret")).unwrap(), b"host");
        assert!(beneath.read_dir(Path::new("")).unwrap().is_empty());

        beneath.create_dir_all(Path::new("a/b/c")).unwrap();
        let mut file = beneath.create_new(Path::new("a/b/c/f"), 0o644).unwrap();
        file.write_all(b"inside").unwrap();
        let mut read = String::new();
        beneath
            .open_file(Path::new("a/b/c/f"))
            .unwrap()
            .read_to_string(&mut read)
            .unwrap();
        assert_eq!(read, "inside");
        beneath.remove(Path::new("a")).unwrap();
        assert!(!root.join("a").exists());
    }

    #[test]
    fn deep_trees_are_removed_without_recursion() {
        let tmp = tempfile::tempdir().unwrap();
        let beneath = Beneath::open(tmp.path()).unwrap();
        let deep: PathBuf = std::iter::repeat_n("d", 300).collect();
        beneath.create_dir_all(&deep).unwrap();
        beneath.create_new(&deep.join("f"), 0o644).unwrap();
        beneath.create_dir_all(Path::new("d/e/f")).unwrap();
        beneath.remove(Path::new("d")).unwrap();
        assert!(beneath.read_dir(Path::new("")).unwrap().is_empty());
    }
}
