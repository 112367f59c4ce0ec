//! Disk and inode limits for the target dir: one size-capped ext4 volume per slot, and a
//! per-job allowance inside it.
//!
//! # Why it exists
//!
//! A job writes into its slot's target dir on the host: without a cap one job filled 1.9 GiB
//! and 150k inodes of the executor's disk. Quotas on the host filesystem would need it to be
//! mounted with quota options the executor does not control; a loop-mounted image is a
//! filesystem of its own, whatever the host has:
//!
//! * **Per slot, once.** [`mount_slot_volume`] makes `slots/<slot>/disk.img` (a sparse file,
//!   `mkfs.ext4` with the configured byte size and inode count, no reserved blocks) and mounts it
//!   at `slots/<slot>/vol` (`nosuid,nodev`); the target dir is `vol/target`. Mounting an existing
//!   image costs a few milliseconds and happens once per slot and process; a job only pays
//!   for its allowance.
//! * **Per job.** A job may ask for less than the volume ([`Allowance::reserve`]): the free space
//!   beyond its allowance is taken by a preallocated ballast file (`vol/.rba-ballast`, beside the
//!   target dir, out of the sandbox's view), which is deleted after the job. The slot lock
//!   guarantees one job per volume at a time, so the ballast is exact. The allowance is what the
//!   job may *add* to the target dir it inherited.
//! * **Running out** is `ENOSPC` for the job; a job that fails with its volume full ends with
//!   [`crate::sandbox::LimitKind::Disk`] ([`is_full`]). The next job in the slot starts with
//!   what is left; the operator's remedy for a full slot is eviction ([`unmount_under`] runs
//!   before a slot's directory is removed).
//! * **Clean-up.** Volumes stay mounted while the executor runs; [`unmount_under`] removes every
//!   mount below a directory, deepest first: at start-up (mounts left by a killed executor), when
//!   a slot is evicted and when the executor shuts down.
//!
//! Requires root (mount) and `mkfs.ext4`; [`mount_slot_volume`] says which is missing.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The ballast file's name in a volume's root.
const BALLAST: &str = ".rba-ballast";
/// A filesystem with less than this free counts as full.
const FULL_BELOW_BYTES: u64 = 1 << 20;

/// Size of each slot's volume: the node's maximum for one target dir.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskQuota {
    /// Bytes of the volume.
    pub bytes: u64,
    /// Inodes of the volume (files, directories and symlinks).
    pub inodes: u64,
}

impl Default for DiskQuota {
    /// 20 GiB and 1M inodes: a large workspace's debug and test builds.
    fn default() -> Self {
        DiskQuota {
            bytes: 20 << 30,
            inodes: 1 << 20,
        }
    }
}

/// Mounts the volume of the slot in `slot_dir` (creating its image on first use) and returns
/// the mount point; does nothing but return it when it is already mounted.
pub fn mount_slot_volume(slot_dir: &Path, quota: DiskQuota) -> io::Result<PathBuf> {
    let image = slot_dir.join("disk.img");
    let vol = slot_dir.join("vol");
    if is_mount_point(&vol)? {
        return Ok(vol);
    }
    fs::create_dir_all(&vol)?;
    let fresh = match fs::metadata(&image) {
        Ok(meta) if meta.len() == quota.bytes => false,
        _ => {
            make_image(&image, quota)?;
            true
        }
    };
    if let Err(e) = mount(&image, &vol) {
        if fresh {
            return Err(e);
        }
        // A damaged image (e.g. the host crashed mid-write): the slot is a cache, start over.
        tracing::warn!(image = %image.display(), "remaking a slot volume that did not mount: {e}");
        make_image(&image, quota)?;
        mount(&image, &vol)?;
    }
    // A ballast left by a job that was running when the process died.
    let _ = fs::remove_file(vol.join(BALLAST));
    Ok(vol)
}

fn make_image(image: &Path, quota: DiskQuota) -> io::Result<()> {
    if quota.bytes < 16 << 20 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a slot volume of {} bytes is too small (at least 16 MiB)",
                quota.bytes
            ),
        ));
    }
    let _ = fs::remove_file(image);
    let file = fs::File::create(image)?;
    file.set_len(quota.bytes)?; // sparse: blocks are allocated as the job writes
    drop(file);
    let mkfs = ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("mkfs.ext4");
    run(Command::new(mkfs)
        .args(["-q", "-F", "-m", "0", "-O", "^has_journal", "-N"])
        .arg(quota.inodes.max(128).to_string())
        .args(["-E", "nodiscard,root_owner=0:0"])
        .arg(image))
}

fn mount(image: &Path, vol: &Path) -> io::Result<()> {
    run(Command::new("mount")
        .args(["-t", "ext4", "-o", "loop,nosuid,nodev,noatime"])
        .arg(image)
        .arg(vol))?;
    // The volume root stays root's (the ballast lives there); the target dir is the job's.
    fs::create_dir_all(vol.join("target"))
}

fn run(cmd: &mut Command) -> io::Result<()> {
    let out = cmd
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running {cmd:?}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Mount points in this mount namespace, in mount order (decoded `\040`-style escapes).
fn mount_points() -> io::Result<Vec<PathBuf>> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .collect())
}

fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(code) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(code);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_mount_point(dir: &Path) -> io::Result<bool> {
    Ok(mount_points()?.iter().any(|m| m == dir))
}

/// Unmounts every mount at or below `dir`, deepest first; returns how many. Slot volumes are
/// detached lazily when busy (their loop device goes when the last user does).
pub fn unmount_under(dir: &Path) -> io::Result<usize> {
    let Ok(dir) = dir.canonicalize() else {
        return Ok(0); // nothing there, nothing mounted there
    };
    let mut below: Vec<PathBuf> = mount_points()?
        .into_iter()
        .filter(|m| m.starts_with(&dir))
        .collect();
    below.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    below.dedup();
    let mut count = 0;
    for mount_point in below {
        // A mount point can be stacked: unmount until it is gone.
        while is_mount_point(&mount_point)? {
            let result = run(Command::new("umount").arg(&mount_point))
                .or_else(|_| run(Command::new("umount").arg("-l").arg(&mount_point)));
            if let Err(e) = result {
                return Err(io::Error::other(format!(
                    "unmounting {}: {e}",
                    mount_point.display()
                )));
            }
            count += 1;
        }
    }
    Ok(count)
}

/// Whether the filesystem holding `dir` has (almost) no bytes or no inodes left.
pub fn is_full(dir: &Path) -> bool {
    match nix::sys::statvfs::statvfs(dir) {
        Ok(st) => {
            let free = st.blocks_available() * st.fragment_size();
            free < FULL_BELOW_BYTES || st.files_available() == 0
        }
        Err(_) => false,
    }
}

/// A job's share of a slot volume: the rest of the free space is held by a ballast file until
/// it drops.
#[derive(Debug)]
pub struct Allowance {
    ballast: Option<PathBuf>,
}

impl Allowance {
    /// Leaves the job at most `bytes` of the free space of the volume `vol`.
    pub fn reserve(vol: &Path, bytes: u64) -> io::Result<Allowance> {
        let ballast = vol.join(BALLAST);
        let _ = fs::remove_file(&ballast);
        let st = nix::sys::statvfs::statvfs(vol).map_err(io::Error::from)?;
        let free = st.blocks_available() * st.fragment_size();
        if free <= bytes {
            return Ok(Allowance { ballast: None });
        }
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&ballast)?;
        let mut len = free - bytes;
        // The ballast's own extent blocks come out of the free space too: step down a little
        // until it fits.
        loop {
            match nix::fcntl::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                nix::fcntl::FallocateFlags::empty(),
                0,
                i64::try_from(len).unwrap_or(i64::MAX),
            ) {
                Ok(()) => break,
                Err(nix::errno::Errno::ENOSPC) if len > 1 << 20 => len -= 1 << 20,
                Err(e) => {
                    drop(file);
                    let _ = fs::remove_file(&ballast);
                    return Err(io::Error::from(e));
                }
            }
        }
        Ok(Allowance {
            ballast: Some(ballast),
        })
    }

    /// No ballast: the job may use the whole free space.
    pub fn unlimited() -> Allowance {
        Allowance { ballast: None }
    }
}

impl Drop for Allowance {
    fn drop(&mut self) {
        if let Some(ballast) = &self.ballast
            && let Err(e) = fs::remove_file(ballast)
        {
            tracing::warn!(path = %ballast.display(), "removing a disk ballast: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/a\040b\011c"), "/a b\tc");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/trail\"), "/trail\\");
    }
}
