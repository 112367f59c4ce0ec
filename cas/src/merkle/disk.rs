//! Building a tree from a directory on disk.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;

use super::stat_cache::{StatCache, StatKey, now_nanos};
use super::{PendingBlobs, TreeBuild, TreeBuilder, TreeStats};
use crate::digest::{Digest, DigestFunction};
use crate::error::{CasError, Result};
use crate::store::{BlobStore, hash_file};

/// Files up to this size are read into memory once (hash, then store if missing); larger ones
/// are streamed twice (hash, then copy if missing).
const SMALL_FILE: u64 = 1 << 20;

/// What [`build_from_dir`] includes.
#[derive(Clone, Debug)]
pub struct DirOptions {
    /// Honour `.gitignore` files inside the tree (not the user's global excludes, nor
    /// `.gitignore` files above the root, nor `.git/info/exclude`: the result must not depend on
    /// the host).
    pub respect_gitignore: bool,
    /// Top-level directories skipped by name (default: `target`).
    pub skip_root_dirs: Vec<String>,
    /// Skip `.git` (directory or file) at any depth.
    pub skip_git: bool,
    /// Skip directories holding a `CACHEDIR.TAG` file (Cargo marks every target directory so,
    /// which catches nested and renamed target directories).
    pub skip_cache_dirs: bool,
    /// Use and update the stat cache.
    pub use_stat_cache: bool,
    /// Regular files at the root that are included even when a `.gitignore` lists them
    /// (default: `Cargo.lock`, which most published libraries ignore but an offline, `--locked`
    /// build needs).
    pub always_include: Vec<String>,
    /// Counts the files hashed (or found in the stat cache) as it goes, for a progress bar
    /// that polls it; `None`: nobody is watching.
    pub files_done: Option<Arc<AtomicU64>>,
}

impl Default for DirOptions {
    fn default() -> Self {
        DirOptions {
            respect_gitignore: true,
            skip_root_dirs: vec!["target".to_string()],
            skip_git: true,
            skip_cache_dirs: true,
            use_stat_cache: true,
            always_include: vec!["Cargo.lock".to_string()],
            files_done: None,
        }
    }
}

fn utf8<'a>(relative: &'a Path, what: &str) -> Result<&'a str> {
    relative.to_str().ok_or_else(|| {
        CasError::hostile(
            relative.to_string_lossy(),
            format!("{what} is not valid UTF-8"),
        )
    })
}

struct FileJob {
    relative: String,
    absolute: PathBuf,
}

struct Hashed {
    digest: Digest,
    executable: bool,
    from_cache: bool,
    new: bool,
}

/// Builds the tree of the directory `root`, storing every file and `Directory` in `store`.
///
/// Skips what [`DirOptions`] says; files that are neither regular files, directories nor
/// symlinks (sockets, FIFOs) are skipped. Names must be UTF-8 and symlinks must stay inside the
/// tree ([`super::check_symlink_target`]), else [`CasError::HostileEntry`] names the entry.
/// Files are hashed in parallel (rayon); with the stat cache, unchanged files are not read.
pub fn build_from_dir(
    store: &BlobStore,
    root: &Path,
    function: DigestFunction,
    options: &DirOptions,
) -> Result<TreeBuild> {
    let root = fs::canonicalize(root).map_err(|e| CasError::io("resolving", root, e))?;
    if !root.is_dir() {
        return Err(CasError::invalid(
            format!("tree root {}", root.display()),
            "not a directory",
        ));
    }
    let mut builder = TreeBuilder::new(function);
    let mut jobs = Vec::new();
    let mut walk = ignore::WalkBuilder::new(&root);
    walk.standard_filters(false)
        .hidden(false)
        .parents(false)
        .git_ignore(options.respect_gitignore)
        .require_git(false)
        .follow_links(false);
    let skip_root_dirs = options.skip_root_dirs.clone();
    let skip_git = options.skip_git;
    let skip_cache_dirs = options.skip_cache_dirs;
    walk.filter_entry(move |entry| {
        let name = entry.file_name();
        let is_dir = entry.file_type().is_some_and(|t| t.is_dir());
        if skip_git && name == ".git" {
            return false;
        }
        if is_dir && entry.depth() == 1 && skip_root_dirs.iter().any(|skip| name == skip.as_str()) {
            return false;
        }
        if is_dir
            && skip_cache_dirs
            && entry.depth() > 0
            && entry.path().join("CACHEDIR.TAG").is_file()
        {
            return false;
        }
        true
    });
    for entry in walk.build() {
        let entry = entry.map_err(|e| {
            let path = match &e {
                ignore::Error::WithPath { path, .. } => path.clone(),
                _ => root.clone(),
            };
            CasError::io("walking", path, std::io::Error::other(e.to_string()))
        })?;
        if entry.depth() == 0 {
            continue;
        }
        let Some(file_type) = entry.file_type() else {
            continue;
        };
        let absolute = entry.into_path();
        let relative = absolute
            .strip_prefix(&root)
            .expect("walk stays under its root");
        let name = utf8(relative, "path")?.to_string();
        if file_type.is_dir() {
            builder.add_directory(&name)?;
        } else if file_type.is_symlink() {
            let target = fs::read_link(&absolute)
                .map_err(|e| CasError::io("reading symlink", &absolute, e))?;
            let target = target
                .to_str()
                .ok_or_else(|| CasError::hostile(&name, "symlink target is not valid UTF-8"))?;
            builder.add_symlink(&name, target)?;
        } else if file_type.is_file() {
            jobs.push(FileJob {
                relative: name,
                absolute,
            });
        } else {
            tracing::debug!(path = %absolute.display(), "skipping special file");
        }
    }
    for name in &options.always_include {
        let absolute = root.join(name);
        let is_file = fs::symlink_metadata(&absolute).is_ok_and(|m| m.is_file());
        if is_file && !jobs.iter().any(|job| job.relative == *name) {
            jobs.push(FileJob {
                relative: name.clone(),
                absolute,
            });
        }
    }
    let cache = if options.use_stat_cache {
        Some(StatCache::open(store)?)
    } else {
        None
    };
    let pending = PendingBlobs::default();
    let hashed: Vec<Hashed> = jobs
        .par_iter()
        .map(|job| {
            let hashed = hash_one(store, &pending, function, cache.as_ref(), &job.absolute);
            if let Some(done) = &options.files_done {
                done.fetch_add(1, Ordering::Relaxed);
            }
            hashed
        })
        .collect::<Result<_>>()?;
    let mut file_stats = TreeStats::default();
    for (job, hashed) in jobs.iter().zip(&hashed) {
        builder.add_file(&job.relative, hashed.digest, hashed.executable)?;
        if hashed.from_cache {
            file_stats.stat_cache_hits += 1;
        } else {
            file_stats.files_hashed += 1;
        }
        if hashed.new {
            file_stats.new_blobs += 1;
            file_stats.new_bytes += hashed.digest.size;
        }
    }
    let mut build = builder.finish_with(store, pending)?;
    build.stats.files_hashed = file_stats.files_hashed;
    build.stats.stat_cache_hits = file_stats.stat_cache_hits;
    build.stats.new_blobs += file_stats.new_blobs;
    build.stats.new_bytes += file_stats.new_bytes;
    Ok(build)
}

fn hash_one(
    store: &BlobStore,
    pending: &PendingBlobs,
    function: DigestFunction,
    cache: Option<&StatCache>,
    path: &Path,
) -> Result<Hashed> {
    let started = now_nanos();
    let meta = fs::symlink_metadata(path).map_err(|e| CasError::io("inspecting", path, e))?;
    let executable = meta.permissions().mode() & 0o111 != 0;
    if let Some(cache) = cache
        && let Some(digest) = cache.lookup(function, path, &meta)?
    {
        let new = store_file_as(store, pending, digest, path)?;
        return Ok(Hashed {
            digest,
            executable,
            from_cache: true,
            new,
        });
    }
    let (digest, new) = if meta.len() <= SMALL_FILE {
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| CasError::io("reading", path, e))?;
        let digest = function.digest_of(&bytes);
        (digest, pending.stage_bytes(store, digest, &bytes)?)
    } else {
        let digest = hash_file(function, path)?;
        (digest, store_file_as(store, pending, digest, path)?)
    };
    if let Some(cache) = cache {
        // Only record what we read if the file did not change while we read it.
        let after = fs::symlink_metadata(path).map_err(|e| CasError::io("inspecting", path, e))?;
        let stat = StatKey::of(&meta);
        if StatKey::of(&after) == stat && stat.size() == digest.size {
            cache.record(path, &stat, started, &digest)?;
        }
    }
    Ok(Hashed {
        digest,
        executable,
        from_cache: false,
        new,
    })
}

/// Stages a file whose digest is known unless present; returns whether it was new.
fn store_file_as(
    store: &BlobStore,
    pending: &PendingBlobs,
    digest: Digest,
    path: &Path,
) -> Result<bool> {
    let mut writer = store.writer(digest)?;
    if writer.already_present() {
        return Ok(false);
    }
    let mut file = File::open(path).map_err(|e| CasError::io("opening", path, e))?;
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let n = file
            .read(&mut buffer)
            .map_err(|e| CasError::io("reading", path, e))?;
        if n == 0 {
            break;
        }
        writer
            .write_chunk(&buffer[..n])
            .map_err(|e| changed_while_hashing(path, e))?;
    }
    pending.push(writer.stage().map_err(|e| changed_while_hashing(path, e))?);
    Ok(true)
}

fn changed_while_hashing(path: &Path, error: CasError) -> CasError {
    match error {
        CasError::SizeMismatch { .. } | CasError::HashMismatch { .. } => CasError::invalid(
            format!("file {}", path.display()),
            "changed while it was being hashed; retry",
        ),
        other => other,
    }
}
