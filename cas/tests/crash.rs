//! A writer process killed (SIGKILL) in the middle of a blob leaves no blob, no temp file after
//! the next open, and a store that can write and read that very blob.
//!
//! The test binary re-executes itself: with `RBA_CAS_CRASH_CHILD` set, the `child_writer` test
//! opens the store, writes half a blob, prints `READY` and waits to be killed.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rba_cas::{BlobStore, DigestFunction, StoreConfig};

const CHILD_ENV: &str = "RBA_CAS_CRASH_CHILD";
const BLOB_LEN: usize = 4 << 20;

fn payload() -> Vec<u8> {
    (0..BLOB_LEN).map(|i| (i % 251) as u8).collect()
}

/// Child mode only: does nothing in a normal test run.
#[test]
fn child_writer() {
    let Ok(root) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = BlobStore::open(&root, StoreConfig::default()).unwrap();
    let data = payload();
    let digest = DigestFunction::Sha256.digest_of(&data);
    let mut writer = store.writer(digest).unwrap();
    writer.write_chunk(&data[..BLOB_LEN / 2]).unwrap();
    let mut stdout = std::io::stdout();
    writeln!(stdout, "READY").unwrap();
    stdout.flush().unwrap();
    // Hold the writer (and the half-written temp file) until killed.
    std::thread::sleep(Duration::from_secs(120));
    panic!("the parent should have killed this process");
}

/// Temporary files under `tmp/` (every process's directory), not counting the lock files.
fn tmp_entries(root: &Path) -> usize {
    let Ok(dirs) = std::fs::read_dir(root.join("tmp")) else {
        return 0;
    };
    dirs.map(|d| d.unwrap().path())
        .map(|dir| match std::fs::read_dir(&dir) {
            Ok(files) => files
                .filter(|f| f.as_ref().unwrap().file_name() != ".lock")
                .count(),
            Err(_) => 1,
        })
        .sum()
}

#[test]
fn killed_writer_leaves_no_blob_and_a_usable_store() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = payload();
    let digest = DigestFunction::Sha256.digest_of(&data);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut ready = false;
    for line in BufReader::new(stdout).lines() {
        if line.unwrap().trim_end().ends_with("READY") {
            ready = true;
            break;
        }
    }
    assert!(ready, "child never got ready");
    // The write is in flight: a temp file holds half the blob.
    assert_eq!(tmp_entries(dir.path()), 1);
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success());

    let blob_file = {
        let store = BlobStore::open(dir.path(), StoreConfig::default()).unwrap();
        assert!(
            !store.contains(&digest).unwrap(),
            "half a blob must never be visible"
        );
        assert!(!store.blob_path(&digest).exists());
        assert_eq!(
            tmp_entries(dir.path()),
            0,
            "opening the store clears abandoned writes"
        );
        assert_eq!(store.stats().blob_count, 0);
        assert!(matches!(
            store.reader(&digest, 0, 0),
            Err(rba_cas::CasError::NotFound(_))
        ));
        store.put_verified(digest, &data).unwrap();
        let mut back = Vec::new();
        store
            .reader(&digest, 0, 0)
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert!(back == data);
        let report = store.verify().unwrap();
        assert_eq!((report.intact, report.corrupt.len()), (1, 0));
        store.flush().unwrap();
        store.blob_path(&digest)
    };
    // And it survives another reopen.
    let store = BlobStore::open(dir.path(), StoreConfig::default()).unwrap();
    assert!(store.contains(&digest).unwrap());
    assert!(blob_file.exists());
}

const BATCH_CHILD_ENV: &str = "RBA_CAS_CRASH_BATCH_CHILD";
const BATCH_BLOBS: usize = 64;
/// More batches than a child can write before it is killed.
const MAX_BATCHES: usize = 400;

/// Blob `j` of batch `i`: 4 KiB, distinct for every (i, j).
fn batch_blob(i: usize, j: usize) -> Vec<u8> {
    let seed = (i * BATCH_BLOBS + j) as u32;
    (0..4096u32)
        .map(|k| (seed.wrapping_mul(2_654_435_761).wrapping_add(k * 7) >> 13) as u8)
        .collect()
}

/// Child mode only: publishes batches of small blobs (group commit) until killed. The first
/// batch alone, then two threads at once, so the kill lands in both ways of making a batch
/// durable and in syncs shared between batches: one stages and publishes 64 blobs at a time
/// (each file and directory synced), the other stores 192 at a time through `put_batch` (what
/// BatchUpdateBlobs calls: `syncfs`, shared with any batch publishing at the same moment).
#[test]
fn child_batch_writer() {
    let Ok(root) = std::env::var(BATCH_CHILD_ENV) else {
        return;
    };
    let store = BlobStore::open(&root, StoreConfig::default()).unwrap();
    let stage_and_publish = |i: usize| {
        let staged = (0..BATCH_BLOBS)
            .map(|j| {
                let data = batch_blob(i, j);
                let mut writer = store
                    .writer(DigestFunction::Blake3.digest_of(&data))
                    .unwrap();
                writer.write_chunk(&data).unwrap();
                writer.stage().unwrap()
            })
            .collect();
        for result in store.publish(staged) {
            result.unwrap();
        }
    };
    stage_and_publish(0);
    let mut stdout = std::io::stdout();
    writeln!(stdout, "READY").unwrap();
    stdout.flush().unwrap();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for i in (4..MAX_BATCHES).step_by(4) {
                stage_and_publish(i);
            }
        });
        scope.spawn(|| {
            for first in (1..MAX_BATCHES).step_by(4) {
                let blobs = (first..(first + 3).min(MAX_BATCHES))
                    .flat_map(|i| (0..BATCH_BLOBS).map(move |j| batch_blob(i, j)))
                    .map(|data| {
                        (
                            DigestFunction::Blake3.digest_of(&data),
                            bytes::Bytes::from(data),
                        )
                    })
                    .collect();
                for result in store.put_batch(blobs) {
                    result.unwrap();
                }
            }
        });
    });
    panic!("the parent should have killed this process");
}

#[test]
fn killed_batch_writer_leaves_only_complete_blobs_visible() {
    if std::env::var(CHILD_ENV).is_ok() || std::env::var(BATCH_CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let candidates: Vec<_> = (0..MAX_BATCHES)
        .flat_map(|i| (0..BATCH_BLOBS).map(move |j| (i, j)))
        .collect();
    let digests: Vec<_> = candidates
        .iter()
        .map(|&(i, j)| DigestFunction::Blake3.digest_of(&batch_blob(i, j)))
        .collect();
    // Killed at several moments: mid-write, mid-sync, mid-rename, mid-index, across runs.
    for delay_ms in [0u64, 3, 10, 25, 60, 150, 600] {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_batch_writer",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(BATCH_CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let ready = BufReader::new(stdout)
            .lines()
            .any(|line| line.unwrap().trim_end().ends_with("READY"));
        assert!(ready, "batch child never got ready");
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        assert!(!child.wait().unwrap().success());

        let store = BlobStore::open(dir.path(), StoreConfig::default()).unwrap();
        assert_eq!(
            tmp_entries(dir.path()),
            0,
            "abandoned batch writes are cleared"
        );
        let missing: std::collections::HashSet<_> =
            store.find_missing(&digests).unwrap().into_iter().collect();
        let mut visible = 0;
        for (&(i, j), digest) in candidates.iter().zip(&digests) {
            if missing.contains(digest) {
                continue;
            }
            visible += 1;
            // Every visible blob is complete and its bytes are the ones its digest names.
            assert!(
                store.read_to_vec(digest, u64::MAX).unwrap() == batch_blob(i, j),
                "visible blob {i}/{j} is not complete"
            );
        }
        eprintln!("killed after {delay_ms} ms: {visible} blobs visible");
        // The index is flushed in the background: the kill may have lost the entries of
        // published blobs, never their files. Repaired, every blob the child was told was
        // published (at least the first batch) is there, and nothing is corrupt.
        let report = store.verify().unwrap();
        assert!(
            report.corrupt.is_empty() && report.missing.is_empty(),
            "{report:?}"
        );
        assert!(
            store
                .find_missing(&digests[..BATCH_BLOBS])
                .unwrap()
                .is_empty(),
            "a published batch survives the kill"
        );
        // The running totals lag a crash; verify recounts them.
        let present = digests.len() - store.find_missing(&digests).unwrap().len();
        assert_eq!(store.stats().blob_count, present as u64);
        drop(store);
    }
}
