//! Hostile zip archives are refused with an error naming the entry; the store stays usable and
//! uncorrupted, and nothing is written outside it.

mod common;

use std::io::{Cursor, Write};

use common::*;
use rba_cas::{BlobStore, CasError, DigestFunction, MAX_BUILT_DEPTH, ZipLimits, build_from_zip};
use zip::write::SimpleFileOptions;

const F: DigestFunction = DigestFunction::Sha256;

/// Asserts a refusal naming `entry`, and that the store is still sound and usable.
fn refused(store: &BlobStore, zip: Vec<u8>, limits: &ZipLimits, entry: &str, reason: &str) {
    match build_from_zip(store, Cursor::new(zip), F, limits) {
        Err(CasError::HostileEntry {
            entry: named,
            reason: why,
        }) => {
            assert_eq!(named, entry, "wrong entry named ({why})");
            assert!(
                why.contains(reason),
                "reason {why:?} should mention {reason:?}"
            );
        }
        other => panic!("expected HostileEntry {entry:?} ({reason}), got {other:?}"),
    }
    let report = store.verify().unwrap();
    assert!(
        report.corrupt.is_empty() && report.missing.is_empty(),
        "{report:?}"
    );
    assert_eq!(
        std::fs::read_dir(store.temp_dir())
            .unwrap()
            .filter(|f| f.as_ref().unwrap().file_name() != ".lock")
            .count(),
        0,
        "no temp leftovers"
    );
    let good = write_zip(&vec![file("fine.txt", b"still works")]);
    build_from_zip(store, Cursor::new(good), F, limits).unwrap();
}

fn raw_zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    for (name, bytes) in entries {
        zip.start_file(*name, SimpleFileOptions::default()).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

fn patch_all(bytes: &mut [u8], from: &[u8], to: &[u8]) -> usize {
    assert_eq!(from.len(), to.len());
    let mut count = 0;
    let mut at = 0;
    while let Some(pos) = bytes[at..].windows(from.len()).position(|w| w == from) {
        bytes[at + pos..at + pos + from.len()].copy_from_slice(to);
        at += pos + from.len();
        count += 1;
    }
    count
}

#[test]
fn escaping_and_absolute_paths() {
    let (_s, store) = store();
    let limits = ZipLimits::default();
    for (name, reason) in [
        ("../evil", "'..'"),
        ("a/../../evil", "'..'"),
        ("./../evil", "'..'"),
        ("/etc/evil", "absolute"),
        ("C:/Windows/evil", "drive letter"),
        ("a\\..\\..\\evil", "backslash"),
    ] {
        refused(
            &store,
            raw_zip(&[("ok", b"ok"), (name, b"x")]),
            &limits,
            name,
            reason,
        );
    }
}

#[test]
fn escaping_symlinks() {
    let (_s, store) = store();
    let limits = ZipLimits::default();
    for (path, target, reason) in [
        ("link", "/etc/passwd", "absolute"),
        ("d/link", "../../outside", "escapes"),
        ("link", "..", "escapes"),
        ("link", "a/../../x", "after a name"),
    ] {
        let zip = write_zip(&vec![file("d/f", b"x"), link(path, target)]);
        refused(&store, zip, &limits, path, reason);
    }
    // In-tree symlinks are fine.
    let zip = write_zip(&vec![
        file("d/f", b"x"),
        link("d/l", "../d/f"),
        link("top", "d"),
    ]);
    build_from_zip(&store, Cursor::new(zip), F, &limits).unwrap();
}

#[test]
fn duplicate_paths() {
    let (_s, store) = store();
    let limits = ZipLimits::default();
    // A file and a directory of the same name, either order.
    refused(
        &store,
        write_zip(&vec![file("a", b"x"), dir("a")]),
        &limits,
        "a/",
        "both a file",
    );
    refused(
        &store,
        write_zip(&vec![dir("a"), file("a", b"x")]),
        &limits,
        "a",
        "both a file",
    );
    refused(
        &store,
        write_zip(&vec![file("a", b"x"), file("a/b", b"y")]),
        &limits,
        "a/b",
        "cannot contain",
    );
    refused(
        &store,
        write_zip(&vec![file("a/b", b"y"), file("a", b"x")]),
        &limits,
        "a",
        "both a file",
    );
    // Two spellings of one path.
    refused(
        &store,
        raw_zip(&[("x/y", b"1"), ("./x//y", b"2")]),
        &limits,
        "./x//y",
        "duplicate",
    );
    refused(
        &store,
        write_zip(&vec![dir("d"), dir("./d")]),
        &limits,
        "./d/",
        "duplicate",
    );
    // The exact same name twice: the zip writer refuses that, so rename one entry in the bytes.
    let mut zip = raw_zip(&[("dup-AAAA", b"first"), ("dup-BBBB", b"second")]);
    assert_eq!(
        patch_all(&mut zip, b"dup-BBBB", b"dup-AAAA"),
        2,
        "local and central headers"
    );
    refused(&store, zip, &limits, "(archive)", "duplicate");
}

#[test]
fn too_many_entries() {
    let (_s, store) = store();
    let limits = ZipLimits {
        max_entries: 3,
        ..ZipLimits::default()
    };
    let zip = raw_zip(&[("a", b"1"), ("b", b"2"), ("c", b"3"), ("d", b"4")]);
    refused(&store, zip, &limits, "(archive)", "exceed the limit of 3");
    let zip = raw_zip(&[("a", b"1"), ("b", b"2"), ("c", b"3")]);
    build_from_zip(&store, Cursor::new(zip), F, &limits).unwrap();
}

#[test]
fn too_many_bytes_in_total() {
    let (_s, store) = store();
    let limits = ZipLimits {
        max_total_bytes: 1000,
        ..ZipLimits::default()
    };
    let zip = raw_zip(&[("first", &[1u8; 600]), ("second", &[2u8; 600])]);
    refused(
        &store,
        zip,
        &limits,
        "second",
        "total exceeds the limit of 1000",
    );
}

#[test]
fn declared_compression_ratio_bomb() {
    let (_s, store) = store();
    // 16 MiB of zeros deflate to ~16 KiB: a ratio of ~1000:1.
    let zip = raw_zip(&[("small", b"fine"), ("zeros", &vec![0u8; 16 << 20])]);
    assert!(zip.len() < 100_000);
    refused(
        &store,
        zip,
        &ZipLimits::default(),
        "zeros",
        "declared compression ratio",
    );
    // Small highly compressible files are fine.
    let zip = raw_zip(&[("small-zeros", &[0u8; 64 * 1024])]);
    build_from_zip(&store, Cursor::new(zip), F, &ZipLimits::default()).unwrap();
}

#[test]
fn lying_declared_size_is_caught_while_decompressing() {
    let (_s, store) = store();
    let payload = vec![0u8; 8 << 20];
    let mut zip = raw_zip(&[("liar", &payload)]);
    // Declare 1000 bytes (below every up-front threshold) in both headers.
    let real = (payload.len() as u32).to_le_bytes();
    let fake = 1000u32.to_le_bytes();
    let local = zip.windows(4).position(|w| w == b"PK\x03\x04").unwrap();
    assert_eq!(zip[local + 22..local + 26], real);
    zip[local + 22..local + 26].copy_from_slice(&fake);
    let central = zip.windows(4).position(|w| w == b"PK\x01\x02").unwrap();
    assert_eq!(zip[central + 24..central + 28], real);
    zip[central + 24..central + 28].copy_from_slice(&fake);
    refused(
        &store,
        zip,
        &ZipLimits::default(),
        "liar",
        "declared 1000 bytes",
    );
}

#[test]
fn nothing_is_written_outside_the_store() {
    let (store_dir, store) = store();
    let around = store_dir.path().parent().unwrap().to_path_buf();
    let before: Vec<_> = std::fs::read_dir(&around)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let zip = raw_zip(&[("../../../../../../../../tmp/rba-evil-zip-entry", b"x")]);
    assert!(build_from_zip(&store, Cursor::new(zip), F, &ZipLimits::default()).is_err());
    assert!(!std::path::Path::new("/tmp/rba-evil-zip-entry").exists());
    let after: Vec<_> = std::fs::read_dir(&around)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        after
            .iter()
            .all(|name| before.contains(name) || name.to_string_lossy().starts_with(".tmp"))
    );
}

#[test]
fn garbage_is_invalid_not_a_panic() {
    let (_s, store) = store();
    for bytes in [Vec::new(), b"not a zip at all".to_vec(), {
        let mut zip = raw_zip(&[("a", b"content")]);
        let cut = zip.len() / 2;
        zip.truncate(cut);
        zip
    }] {
        assert!(build_from_zip(&store, Cursor::new(bytes), F, &ZipLimits::default()).is_err());
    }
    // A flipped byte in the compressed data fails the CRC check, naming the entry.
    let mut zip = raw_zip(&[(
        "crc",
        b"some content that gets deflated, some content that gets deflated",
    )]);
    let local = zip.windows(4).position(|w| w == b"PK\x03\x04").unwrap();
    let data = local + 30 + 3;
    zip[data + 5] ^= 0xff;
    match build_from_zip(&store, Cursor::new(zip), F, &ZipLimits::default()) {
        Err(CasError::HostileEntry { entry, .. }) => assert_eq!(entry, "crc"),
        other => panic!("expected HostileEntry, got {other:?}"),
    }
}

/// `build_from_zip` on a thread with the 2 MiB stack of tokio's blocking and rayon's threads
/// (an overflow aborts the test binary, as it did the node).
fn on_a_small_stack(store: &BlobStore, zip: Vec<u8>) -> rba_cas::Result<rba_cas::TreeBuild> {
    let store = store.clone();
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || build_from_zip(&store, Cursor::new(zip), F, &ZipLimits::default()))
        .unwrap()
        .join()
        .expect("no overflow")
}

/// A path tens of thousands of levels deep (70 KB of archive) once meant as many levels of
/// recursion finishing the tree, on threads with 2 MiB stacks: the node aborted. Now it is
/// refused by name while the first pass reads names, as is a name no filesystem holds; a tree
/// exactly as deep as the builder takes is built, on a thread with the default stack.
#[test]
fn paths_too_deep_or_too_long_are_refused_naming_the_entry() {
    let (_s, store) = store();
    let limits = ZipLimits::default();
    let deep = format!("{}f", "a/".repeat(30_000));
    let refusal = on_a_small_stack(&store, raw_zip(&[(deep.as_str(), b"x")]));
    assert!(
        matches!(&refusal, Err(CasError::HostileEntry { entry, reason })
            if *entry == deep && reason.contains(&format!("more than {MAX_BUILT_DEPTH} levels"))),
        "{:?}",
        refusal.map(|b| b.root)
    );
    let one_too_deep = format!("{}f", "d/".repeat(MAX_BUILT_DEPTH));
    refused(
        &store,
        raw_zip(&[(one_too_deep.as_str(), b"x")]),
        &limits,
        &one_too_deep,
        "levels deep",
    );
    let long = format!("dir/{}", "n".repeat(256));
    refused(
        &store,
        raw_zip(&[(long.as_str(), b"x")]),
        &limits,
        &long,
        "longer than 255 bytes",
    );

    let deepest = format!("{}f", "d/".repeat(MAX_BUILT_DEPTH - 1));
    let built = on_a_small_stack(&store, raw_zip(&[(deepest.as_str(), b"deep")])).unwrap();
    assert_eq!(built.stats.directories, MAX_BUILT_DEPTH as u64);
    assert!(store.contains(&built.root).unwrap());
}
