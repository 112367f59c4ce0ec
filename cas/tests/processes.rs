//! Two processes on one store: the second waits for the first instead of failing on the
//! index lock, and never removes the first's in-flight writes.
//!
//! The test binary re-executes itself: with `RBA_CAS_PROCESS_ROLE` set to `writer`, the
//! `child` test opens the store, writes half a blob, prints `READY`, waits for a line on stdin,
//! finishes and commits the blob; with `opener`, it opens the store (waiting) and prints
//! `PRESENT` or `ABSENT` for that blob.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rba_cas::{BlobStore, DigestFunction, StoreConfig};

const ROLE_ENV: &str = "RBA_CAS_PROCESS_ROLE";
const ROOT_ENV: &str = "RBA_CAS_PROCESS_ROOT";
const BLOB_LEN: usize = 1 << 20;

fn payload() -> Vec<u8> {
    (0..BLOB_LEN).map(|i| (i % 253) as u8).collect()
}

/// Child mode only: does nothing in a normal test run.
#[test]
fn child() {
    let (Ok(role), Ok(root)) = (std::env::var(ROLE_ENV), std::env::var(ROOT_ENV)) else {
        return;
    };
    let store = BlobStore::open(&root, StoreConfig::default()).unwrap();
    let data = payload();
    let digest = DigestFunction::Blake3.digest_of(&data);
    let mut stdout = std::io::stdout();
    match role.as_str() {
        "writer" => {
            let mut writer = store.writer(digest).unwrap();
            writer.write_chunk(&data[..BLOB_LEN / 2]).unwrap();
            writeln!(stdout, "READY").unwrap();
            stdout.flush().unwrap();
            let mut go = String::new();
            std::io::stdin().read_line(&mut go).unwrap();
            writer.write_chunk(&data[BLOB_LEN / 2..]).unwrap();
            writer.commit().unwrap();
        }
        "opener" => {
            let present = store.contains(&digest).unwrap();
            writeln!(stdout, "{}", if present { "PRESENT" } else { "ABSENT" }).unwrap();
        }
        other => panic!("unknown role {other}"),
    }
}

fn spawn(role: &str, root: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env(ROLE_ENV, role)
        .env(ROOT_ENV, root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Temporary files under `tmp/`, not counting lock files.
fn temp_files(root: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for dir in std::fs::read_dir(root.join("tmp")).unwrap() {
        for file in std::fs::read_dir(dir.unwrap().path()).unwrap() {
            let path = file.unwrap().path();
            if path.file_name().unwrap() != ".lock" {
                files.push(path);
            }
        }
    }
    files
}

#[test]
fn a_second_process_waits_and_keeps_the_first_ones_writes() {
    if std::env::var(ROLE_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut writer = spawn("writer", dir.path());
    let mut writer_out = BufReader::new(writer.stdout.take().unwrap());
    let mut line = String::new();
    while !line.trim_end().ends_with("READY") {
        line.clear();
        assert!(
            writer_out.read_line(&mut line).unwrap() > 0,
            "writer never got ready"
        );
    }
    let in_flight = temp_files(dir.path());
    assert_eq!(in_flight.len(), 1, "the writer's half blob is in flight");

    // The opener blocks on the data dir lock and says so, naming the writer.
    let mut opener = spawn("opener", dir.path());
    let opener_err = BufReader::new(opener.stderr.take().unwrap());
    let (said, said_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in opener_err.lines() {
            let _ = said.send(line.unwrap());
        }
    });
    let expected = format!(
        "rba: blocking waiting for the data dir lock held by pid {}",
        writer.id()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = said_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the opener never said it waits");
        if line == expected {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        in_flight[0].exists(),
        "another process opening the store must not remove an in-flight write"
    );
    assert!(
        opener.try_wait().unwrap().is_none(),
        "the opener waits for the lock instead of failing"
    );

    // The writer finishes: its blob is published, and the opener then gets the store.
    writeln!(writer.stdin.take().unwrap(), "GO").unwrap();
    assert!(writer.wait().unwrap().success());
    let output = opener.wait_with_output().unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("PRESENT"), "opener said {stdout:?}");
    assert!(
        said_rx.try_iter().all(|l| !l.contains("blocking waiting")),
        "the waiting message is printed once"
    );
    assert!(
        temp_files(dir.path()).is_empty(),
        "closed stores leave no temporaries"
    );

    // A store already open in this process is refused, not waited for.
    let store = BlobStore::open(dir.path(), StoreConfig::default()).unwrap();
    let again = BlobStore::open(dir.path(), StoreConfig::default()).unwrap_err();
    assert!(
        again.to_string().contains("already open in this process"),
        "{again}"
    );
    drop(store);
    BlobStore::open(dir.path(), StoreConfig::default()).unwrap();
}
