//! Helpers shared by the integration tests: stores, tree specs written to disk or to zips.
#![allow(dead_code)]

use std::fs;
use std::io::{Cursor, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rba_cas::BlobStore;
use zip::write::SimpleFileOptions;

/// A fresh store in a temp dir (fsync off: tests do not test power loss).
pub fn store() -> (tempfile::TempDir, BlobStore) {
    BlobStore::scratch().unwrap()
}

/// One entry of a test tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    File { bytes: Vec<u8>, executable: bool },
    Symlink(String),
    EmptyDir,
}

/// A tree as (relative path, entry), paths `/`-separated.
pub type Spec = Vec<(String, Entry)>;

pub fn file(path: &str, bytes: &[u8]) -> (String, Entry) {
    (
        path.to_string(),
        Entry::File {
            bytes: bytes.to_vec(),
            executable: false,
        },
    )
}

pub fn exe(path: &str, bytes: &[u8]) -> (String, Entry) {
    (
        path.to_string(),
        Entry::File {
            bytes: bytes.to_vec(),
            executable: true,
        },
    )
}

pub fn link(path: &str, target: &str) -> (String, Entry) {
    (path.to_string(), Entry::Symlink(target.to_string()))
}

pub fn dir(path: &str) -> (String, Entry) {
    (path.to_string(), Entry::EmptyDir)
}

/// Writes a spec under `root` (which must exist).
pub fn write_dir(root: &Path, spec: &Spec) {
    for (path, entry) in spec {
        let full = root.join(path);
        if let Some(parent) = full.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        match entry {
            Entry::File { bytes, executable } => {
                fs::write(&full, bytes).unwrap();
                let mode = if *executable { 0o755 } else { 0o644 };
                fs::set_permissions(&full, fs::Permissions::from_mode(mode)).unwrap();
            }
            Entry::Symlink(target) => std::os::unix::fs::symlink(target, &full).unwrap(),
            Entry::EmptyDir => fs::create_dir_all(&full).unwrap(),
        }
    }
}

/// Writes a spec as a zip archive (deflate), entries in the spec's order.
pub fn write_zip(spec: &Spec) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    for (path, entry) in spec {
        match entry {
            Entry::File { bytes, executable } => {
                let mode = if *executable { 0o755 } else { 0o644 };
                zip.start_file(
                    path.as_str(),
                    SimpleFileOptions::default().unix_permissions(mode),
                )
                .unwrap();
                zip.write_all(bytes).unwrap();
            }
            Entry::Symlink(target) => {
                zip.add_symlink(path.as_str(), target.as_str(), SimpleFileOptions::default())
                    .unwrap();
            }
            Entry::EmptyDir => zip
                .add_directory(path.as_str(), SimpleFileOptions::default())
                .unwrap(),
        }
    }
    zip.finish().unwrap().into_inner()
}
