//! Hashing a user's workspace into a local CAS, shared by the embedded and remote modes.
//!
//! Why: both modes must hash the same way (respecting `.gitignore`, skipping `target/` and
//! other cache directories, BLAKE3 trees) and refuse the same user mistakes with one clear
//! line (no `Cargo.toml`, not a directory).

use std::path::Path;

use anyhow::{Context, bail};
use rba_cas::merkle::{DirOptions, TreeBuild, build_from_dir};
use rba_cas::{Cas, DigestFunction, StoreConfig};

/// Opens (creating) the CAS under `data_dir/cas` with `store`'s capacity and durability.
pub fn open_cas(data_dir: &Path, store: StoreConfig) -> anyhow::Result<Cas> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    Cas::open(cas_dir(data_dir), store)
        .with_context(|| format!("opening the CAS under {}", data_dir.display()))
}

/// Where a data dir keeps its store: `DATA_DIR/cas` (the client's, an embedded node's, a
/// node's, a worker's and `cache-server`'s alike).
pub fn cas_dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("cas")
}

/// Hashes a workspace into the CAS; `require_manifest` refuses a directory without
/// `Cargo.toml`.
pub async fn hash_workspace(
    cas: &Cas,
    path: &Path,
    require_manifest: bool,
) -> anyhow::Result<TreeBuild> {
    if !path.is_dir() {
        bail!("{} is not a directory", path.display());
    }
    if require_manifest && !path.join("Cargo.toml").is_file() {
        bail!(
            "no Cargo.toml in {}: point rba at a crate or workspace root",
            path.display()
        );
    }
    let (blobs, path) = (cas.blobs.clone(), path.to_path_buf());
    let files_done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let options = DirOptions {
        files_done: Some(files_done.clone()),
        ..DirOptions::default()
    };
    let hashing = tokio::task::spawn_blocking(move || {
        build_from_dir(&blobs, &path, DigestFunction::Blake3, &options)
            .with_context(|| format!("hashing {}", path.display()))
    });
    let bar = crate::output::hashing_bar();
    let ticker = {
        let bar = bar.clone();
        tokio::spawn(async move {
            loop {
                bar.set_position(files_done.load(std::sync::atomic::Ordering::Relaxed));
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
    };
    let built = hashing.await;
    ticker.abort();
    bar.finish_and_clear();
    built?
}

/// A stable name for the workspace's target cache on this machine: its canonical path.
pub fn workspace_identity(path: &Path) -> String {
    std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

/// A short name for the workspace sent to a node (its directory name).
pub fn workspace_hint(path: &Path) -> String {
    std::fs::canonicalize(path)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default()
}
