//! Merkle trees: directories on disk, the stat cache, zips of the same content,
//! materialisation, enumeration, and the canonical-form properties.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use rba_cas::merkle::check_symlink_target;
use rba_cas::{
    CasError, DigestFunction, DirOptions, MaterializeOptions, StatCache, TreeBuilder, ZipLimits,
    build_from_dir, build_from_zip, get_tree, materialize, read_directory, tree_digests,
};
use rba_proto::Message;

const F: DigestFunction = DigestFunction::Blake3;

fn sample() -> Spec {
    vec![
        file("Cargo.toml", b"[package]\nname = \"x\"\n"),
        file("src/lib.rs", b"pub fn x() {}\n"),
        exe("scripts/run.sh", b"#!/bin/sh\necho hi\n"),
        file("src/nested/deep/mod.rs", b"// deep\n"),
        file("src/dup.rs", b"pub fn x() {}\n"),
        link("src/link.rs", "lib.rs"),
        link("src/nested/up", "../../Cargo.toml"),
        dir("empty/dir"),
        file(".hidden/config.toml", b"hidden files are kept\n"),
    ]
}

fn build(root: &Path, store: &rba_cas::BlobStore) -> rba_cas::TreeBuild {
    build_from_dir(store, root, F, &DirOptions::default()).unwrap()
}

#[test]
fn directory_tree_is_canonical_and_complete() {
    let (_s, store) = store();
    let work = tempfile::tempdir().unwrap();
    write_dir(work.path(), &sample());
    let built = build(work.path(), &store);
    assert_eq!(built.stats.files, 6);
    assert_eq!(built.stats.symlinks, 2);
    assert_eq!(
        built.stats.directories, 8,
        "root, src, src/nested, deep, scripts, empty, empty/dir, .hidden"
    );
    assert_eq!(built.stats.files_hashed, 6);
    let root = read_directory(&store, &built.root).unwrap();
    let names: Vec<_> = root.directories.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, [".hidden", "empty", "scripts", "src"]);
    // Every blob the build reports is in the store, and enumeration finds the same set.
    assert!(store.find_missing(&built.blobs).unwrap().is_empty());
    let mut listed = tree_digests(&store, &built.root).unwrap();
    assert_eq!(listed[0], built.root);
    let mut reported = built.blobs.clone();
    listed.sort();
    reported.sort();
    assert_eq!(listed, reported);
    // The REAPI Tree holds the root and every distinct directory.
    let tree = get_tree(&store, &built.root).unwrap();
    assert_eq!(tree.root.as_ref(), Some(&root));
    let dir_digests: std::collections::HashSet<_> = tree
        .children
        .iter()
        .map(|d| F.digest_of(&d.encode_to_vec()))
        .collect();
    assert_eq!(
        tree.children.len(),
        dir_digests.len(),
        "children are distinct"
    );
    // Executable bit.
    let scripts = read_directory(
        &store,
        &rba_cas::Digest::from_reapi(F, root.directories[2].digest.as_ref().unwrap()).unwrap(),
    )
    .unwrap();
    assert!(scripts.files[0].is_executable);
}

#[test]
fn root_digest_is_host_independent() {
    // Same content in two places, with different mtimes, modes other than the x bit, and
    // creation order: same root.
    let (_s, store) = store();
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let mut spec = sample();
    write_dir(a.path(), &spec);
    spec.reverse();
    write_dir(b.path(), &spec);
    fs::set_permissions(
        b.path().join("Cargo.toml"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    filetime::set_file_mtime(
        b.path().join("src/lib.rs"),
        filetime::FileTime::from_unix_time(1, 0),
    )
    .unwrap();
    assert_eq!(build(a.path(), &store).root, build(b.path(), &store).root);
}

#[test]
fn skips_target_git_gitignored_and_cache_dirs() {
    let (_s, store) = store();
    let work = tempfile::tempdir().unwrap();
    let clean = tempfile::tempdir().unwrap();
    let keep = vec![
        file("src/lib.rs", b"x"),
        file(".gitignore", b"*.log\n/generated/\n"),
        file("sub/.gitignore", b"local-only\n"),
        file("sub/target/kept.rs", b"a nested dir named target is source"),
    ];
    write_dir(work.path(), &keep);
    write_dir(clean.path(), &keep);
    write_dir(
        work.path(),
        &vec![
            file("target/debug/big", b"artifact"),
            file(".git/HEAD", b"ref: refs/heads/main"),
            file("build.log", b"log"),
            file("src/deep.log", b"log"),
            file("generated/x.rs", b"gen"),
            file("sub/local-only", b"ignored by sub/.gitignore"),
            file(
                "other-target/CACHEDIR.TAG",
                b"Signature: 8a477f597d28d172789f06886806bc55",
            ),
            file("other-target/debug/big", b"artifact"),
        ],
    );
    let built = build(work.path(), &store);
    assert_eq!(built.root, build(clean.path(), &store).root);
    // With every filter off, everything is there.
    let everything = DirOptions {
        respect_gitignore: false,
        skip_root_dirs: vec![],
        skip_git: false,
        skip_cache_dirs: false,
        use_stat_cache: false,
        always_include: vec![],
        files_done: None,
    };
    let all = build_from_dir(&store, work.path(), F, &everything).unwrap();
    assert_eq!(all.stats.files, built.stats.files + 8);
}

#[test]
fn an_ignored_lock_file_is_uploaded_all_the_same() {
    // Most published libraries list Cargo.lock in .gitignore; an offline, --locked build
    // needs it. Nested ignored lock files and other ignored files stay out.
    let (_s, store) = store();
    let work = tempfile::tempdir().unwrap();
    write_dir(
        work.path(),
        &vec![
            file(".gitignore", b"Cargo.lock\n/ignored.txt\n"),
            file("Cargo.toml", b"[package]\nname = \"x\"\n"),
            file("Cargo.lock", b"version = 4\n"),
            file("ignored.txt", b"stays out"),
            file("nested/Cargo.lock", b"stays out too"),
        ],
    );
    let built = build(work.path(), &store);
    let root = read_directory(&store, &built.root).unwrap();
    let names: Vec<&str> = root.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, [".gitignore", "Cargo.lock", "Cargo.toml"]);
    assert_eq!(
        built.stats.files, 3,
        "nested/Cargo.lock and ignored.txt stay out"
    );

    // A symlinked lock file that is ignored is not followed to the host.
    let linked = tempfile::tempdir().unwrap();
    write_dir(
        linked.path(),
        &vec![
            file(".gitignore", b"Cargo.lock\n"),
            file("Cargo.toml", b"[package]\nname = \"x\"\n"),
        ],
    );
    std::os::unix::fs::symlink("/etc/hostname", linked.path().join("Cargo.lock")).unwrap();
    let built = build(linked.path(), &store);
    let root = read_directory(&store, &built.root).unwrap();
    assert!(root.files.iter().all(|f| f.name != "Cargo.lock"));
}

#[test]
fn escaping_symlink_on_disk_is_refused_naming_it() {
    let (_s, store) = store();
    for (path, target) in [
        ("evil", "/etc/passwd"),
        ("d/evil", "../../outside"),
        ("evil", "a/../../x"),
    ] {
        let work = tempfile::tempdir().unwrap();
        write_dir(work.path(), &vec![file("ok", b"ok"), link(path, target)]);
        match build_from_dir(&store, work.path(), F, &DirOptions::default()) {
            Err(CasError::HostileEntry { entry, .. }) => assert_eq!(entry, path),
            other => panic!("{target:?}: expected HostileEntry, got {other:?}"),
        }
    }
}

#[test]
fn non_utf8_names_and_non_directory_roots_are_refused() {
    use std::os::unix::ffi::OsStrExt;
    let (_s, store) = store();
    let work = tempfile::tempdir().unwrap();
    fs::create_dir(work.path().join("src")).unwrap();
    fs::write(
        work.path()
            .join("src")
            .join(std::ffi::OsStr::from_bytes(b"bad\xff.rs")),
        b"x",
    )
    .unwrap();
    match build_from_dir(&store, work.path(), F, &DirOptions::default()) {
        Err(CasError::HostileEntry { entry, reason }) => {
            assert!(entry.starts_with("src/bad"), "{entry}");
            assert!(reason.contains("UTF-8"));
        }
        other => panic!("expected HostileEntry, got {other:?}"),
    }
    let plain = work.path().join("plain-file");
    fs::write(&plain, b"x").unwrap();
    assert!(matches!(
        build_from_dir(&store, &plain, F, &DirOptions::default()),
        Err(CasError::Invalid { .. })
    ));
}

#[test]
fn stat_cache_skips_reading_unchanged_files_and_catches_changes() {
    let (_s, store) = store();
    let work = tempfile::tempdir().unwrap();
    write_dir(work.path(), &sample());
    // Files just written are racy (ctime is now): the first two builds hash everything.
    let first = build(work.path(), &store);
    assert_eq!(
        (first.stats.files_hashed, first.stats.stat_cache_hits),
        (6, 0)
    );
    let racy = build(work.path(), &store);
    assert_eq!(
        racy.stats.stat_cache_hits, 0,
        "entries recorded within the racy window are not trusted"
    );
    assert_eq!(racy.stats.new_blobs, 0);
    // Once the files have been quiet for the racy window, a rebuild records trusted entries.
    std::thread::sleep(Duration::from_millis(2100));
    let recorded = build(work.path(), &store);
    assert_eq!(
        recorded.stats.files_hashed, 6,
        "re-recorded now that the files are quiet"
    );
    let warm = build(work.path(), &store);
    assert_eq!(
        (warm.stats.files_hashed, warm.stats.stat_cache_hits),
        (0, 6)
    );
    assert_eq!(warm.root, first.root);
    // A change of content (with a different size) is seen.
    fs::write(work.path().join("src/lib.rs"), b"pub fn changed() {}\n").unwrap();
    let changed = build(work.path(), &store);
    assert_ne!(changed.root, first.root);
    assert_eq!(changed.stats.files_hashed, 1);
    // A same-size change within the mtime granularity is caught by the racy check: restore
    // the original mtime, the ctime still moves.
    let path = work.path().join("Cargo.toml");
    let meta = fs::metadata(&path).unwrap();
    let mtime = filetime::FileTime::from_last_modification_time(&meta);
    fs::write(&path, b"[package]\nname = \"y\"\n").unwrap();
    filetime::set_file_mtime(&path, mtime).unwrap();
    let sneaky = build(work.path(), &store);
    assert_ne!(
        sneaky.root, changed.root,
        "same size, same mtime, new content is still noticed"
    );
    let cache = StatCache::open(&store).unwrap();
    assert!(!cache.is_empty());
    assert_eq!(
        cache
            .forget_under(work.path().canonicalize().unwrap().as_path())
            .unwrap(),
        6
    );
    assert!(cache.is_empty());
}

#[test]
fn stat_cache_hit_restores_an_evicted_blob() {
    let (_s, store) = store();
    let work = tempfile::tempdir().unwrap();
    write_dir(work.path(), &vec![file("a", b"content of a")]);
    let first = build(work.path(), &store);
    // Wait out the racy window, then rebuild so the entry is recorded as trusted.
    std::thread::sleep(Duration::from_millis(2100));
    build(work.path(), &store);
    let blob = F.digest_of(b"content of a");
    // Evicted (the index is the truth of what the store holds, and eviction updates it).
    store.evict_down_to(0).unwrap();
    assert!(!store.contains(&blob).unwrap());
    let again = build(work.path(), &store);
    assert_eq!(again.stats.stat_cache_hits, 1);
    assert_eq!(
        again.stats.new_blobs, 2,
        "the file blob (and the root directory, evicted too) stored again"
    );
    assert_eq!(again.root, first.root);
    assert!(store.contains(&blob).unwrap());
}

#[test]
fn zip_and_directory_agree() {
    let (_s, store) = store();
    let work = tempfile::tempdir().unwrap();
    let spec = sample();
    write_dir(work.path(), &spec);
    let zip = write_zip(&spec);
    let from_zip =
        build_from_zip(&store, std::io::Cursor::new(zip), F, &ZipLimits::default()).unwrap();
    let from_dir = build(work.path(), &store);
    assert_eq!(from_zip.root, from_dir.root);
    assert_eq!(from_zip.stats.files, from_dir.stats.files);
    assert_eq!(
        from_dir.stats.new_blobs, 0,
        "the zip stored everything already"
    );
}

#[test]
fn large_zip_entries_stream_and_agree() {
    let (_s, store) = store();
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let spec = vec![file("big.bin", &big), exe("bin/tool", &big[..100])];
    let work = tempfile::tempdir().unwrap();
    write_dir(work.path(), &spec);
    let from_zip = build_from_zip(
        &store,
        std::io::Cursor::new(write_zip(&spec)),
        F,
        &ZipLimits::default(),
    )
    .unwrap();
    assert_eq!(
        from_zip.stats.new_bytes,
        big.len() as u64 + 100 + /* dirs */ {
        let total: u64 = tree_digests(&store, &from_zip.root)
            .unwrap()
            .iter()
            .filter(|d| d.size != big.len() as u64 && d.size != 100)
            .map(|d| d.size)
            .sum();
        total
    }
    );
    // Both digest functions work, and a second import stores nothing new.
    let again = build_from_zip(
        &store,
        std::io::Cursor::new(write_zip(&spec)),
        F,
        &ZipLimits::default(),
    )
    .unwrap();
    assert_eq!(again.stats.new_blobs, 0);
    let sha = build_from_dir(
        &store,
        work.path(),
        DigestFunction::Sha256,
        &DirOptions::default(),
    )
    .unwrap();
    assert_eq!(sha.root.function, DigestFunction::Sha256);
    assert_eq!(build(work.path(), &store).root, from_zip.root);
}

#[test]
fn materialise_round_trips_with_links_and_copies() {
    let (_s, store) = store();
    let work = tempfile::tempdir().unwrap();
    write_dir(work.path(), &sample());
    let built = build(work.path(), &store);
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("exec");
    let done = materialize(&store, &built.root, &target, &MaterializeOptions::default()).unwrap();
    assert_eq!(done.files.len(), 6);
    assert_eq!(done.symlinks, 2);
    // Re-hashing the materialised tree gives the same root.
    assert_eq!(build(&target, &store).root, built.root);
    // Non-executables are hard links to the (read-only) store file; executables are copies.
    let lib = done
        .files
        .iter()
        .find(|f| f.path == Path::new("src/lib.rs"))
        .unwrap();
    assert!(lib.hardlinked);
    let lib_meta = fs::metadata(target.join("src/lib.rs")).unwrap();
    assert_eq!(
        lib_meta.ino(),
        fs::metadata(store.blob_path(&lib.digest)).unwrap().ino()
    );
    assert_eq!(lib_meta.permissions().mode() & 0o777, 0o444);
    let script = done
        .files
        .iter()
        .find(|f| f.path == Path::new("scripts/run.sh"))
        .unwrap();
    assert!(script.is_executable && !script.hardlinked);
    let script_meta = fs::metadata(target.join("scripts/run.sh")).unwrap();
    assert_eq!(script_meta.permissions().mode() & 0o777, 0o755);
    assert_eq!(
        store
            .blob_path(&script.digest)
            .metadata()
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o444
    );
    assert_eq!(
        fs::read_link(target.join("src/nested/up")).unwrap(),
        Path::new("../../Cargo.toml")
    );
    assert_eq!(
        fs::read_to_string(target.join("src/nested/up")).unwrap(),
        "[package]\nname = \"x\"\n"
    );
    assert!(target.join("empty/dir").is_dir());
    // Copies only.
    let copies = out.path().join("copies");
    let done = materialize(
        &store,
        &built.root,
        &copies,
        &MaterializeOptions { hardlink: false },
    )
    .unwrap();
    assert_eq!((done.hardlinked, done.copied), (0, 6));
    assert_eq!(build(&copies, &store).root, built.root);
    // A non-empty target, or a symlink as target, is refused.
    assert!(matches!(
        materialize(&store, &built.root, &target, &MaterializeOptions::default()),
        Err(CasError::Invalid { .. })
    ));
    let link_target = out.path().join("link");
    std::os::unix::fs::symlink(out.path().join("empty"), &link_target).unwrap();
    fs::create_dir(out.path().join("empty")).unwrap();
    assert!(
        materialize(
            &store,
            &built.root,
            &link_target,
            &MaterializeOptions::default()
        )
        .is_err()
    );
    assert_eq!(fs::read_dir(out.path().join("empty")).unwrap().count(), 0);
}

#[test]
fn hostile_stored_trees_write_nothing() {
    use rba_proto::reapi::{Directory, DirectoryNode, FileNode, SymlinkNode};
    let (_s, store) = store();
    let out = tempfile::tempdir().unwrap();
    let content = store.put_bytes(F, b"payload").unwrap();
    let put = |d: &Directory| store.put_bytes(F, &d.encode_to_vec()).unwrap();
    let file_node = |name: &str| FileNode {
        name: name.into(),
        digest: Some(content.to_reapi()),
        ..Default::default()
    };
    let cases: Vec<(&str, Directory)> = vec![
        (
            "escaping symlink",
            Directory {
                files: vec![file_node("a")],
                symlinks: vec![SymlinkNode {
                    name: "x".into(),
                    target: "../../outside".into(),
                    node_properties: None,
                }],
                ..Default::default()
            },
        ),
        (
            "absolute symlink",
            Directory {
                symlinks: vec![SymlinkNode {
                    name: "x".into(),
                    target: "/etc".into(),
                    node_properties: None,
                }],
                ..Default::default()
            },
        ),
        (
            "dotdot name",
            Directory {
                files: vec![file_node("a"), file_node("..")],
                ..Default::default()
            },
        ),
        (
            "slash name",
            Directory {
                files: vec![file_node("a/../../../outside")],
                ..Default::default()
            },
        ),
        (
            "unsorted",
            Directory {
                files: vec![file_node("b"), file_node("a")],
                ..Default::default()
            },
        ),
        (
            "missing blob",
            Directory {
                files: vec![FileNode {
                    name: "m".into(),
                    digest: Some(F.digest_of(b"absent").to_reapi()),
                    ..Default::default()
                }],
                ..Default::default()
            },
        ),
    ];
    for (i, (what, directory)) in cases.into_iter().enumerate() {
        // Nest the bad directory one level down so the root itself is fine.
        let bad = put(&directory);
        let root = put(&Directory {
            files: vec![file_node("fine")],
            directories: vec![DirectoryNode {
                name: "sub".into(),
                digest: Some(bad.to_reapi()),
            }],
            ..Default::default()
        });
        let target = out.path().join(format!("case{i}"));
        let result = materialize(&store, &root, &target, &MaterializeOptions::default());
        assert!(result.is_err(), "{what} must be refused");
        assert!(!target.exists(), "{what}: nothing may be written");
    }
    assert_eq!(fs::read_dir(out.path()).unwrap().count(), 0);
}

#[test]
fn executables_and_plain_files_share_one_blob_safely() {
    let (_s, store) = store();
    let work = tempfile::tempdir().unwrap();
    write_dir(
        work.path(),
        &vec![file("plain", b"same bytes"), exe("tool", b"same bytes")],
    );
    let built = build(work.path(), &store);
    assert_eq!(built.blobs.len(), 2, "root + one shared content blob");
    let target = tempfile::tempdir().unwrap();
    let target = target.path().join("t");
    materialize(&store, &built.root, &target, &MaterializeOptions::default()).unwrap();
    let mode = |p: &str| fs::metadata(target.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode("plain"), mode("tool")), (0o444, 0o755));
    assert_eq!(build(&target, &store).root, built.root);
}

// ---- properties ----

/// Trees of up to ~12 entries over a small alphabet, so that paths share prefixes; paths that
/// would conflict (a file that is also a directory) are dropped.
fn spec_strategy() -> impl Strategy<Value = Spec> {
    let name = prop::sample::select(vec!["a", "b", "B", "c.rs", "é", "z z", ".dot"]);
    let path = prop::collection::vec(name, 1..4).prop_map(|parts| parts.join("/"));
    let entry = prop_oneof![
        6 => (prop::collection::vec(any::<u8>(), 0..64), any::<bool>())
            .prop_map(|(bytes, executable)| Entry::File { bytes, executable }),
        1 => Just(Entry::EmptyDir),
        1 => prop::sample::select(vec!["a", "c.rs", "missing"]).prop_map(|t| Entry::Symlink(t.to_string())),
    ];
    prop::collection::vec((path, entry), 0..12).prop_map(|raw| {
        let mut accepted: Spec = Vec::new();
        for (path, entry) in raw {
            let conflicts = accepted.iter().any(|(other, other_entry)| {
                let leaf = |e: &Entry| !matches!(e, Entry::EmptyDir);
                other == &path
                    || (path.starts_with(&format!("{other}/")) && leaf(other_entry))
                    || (other.starts_with(&format!("{path}/")) && leaf(&entry))
            });
            if !conflicts {
                accepted.push((path, entry));
            }
        }
        accepted
    })
}

fn builder_root(spec: &Spec) -> rba_cas::Digest {
    let mut builder = TreeBuilder::new(F);
    for (path, entry) in spec {
        match entry {
            Entry::File { bytes, executable } => builder
                .add_file(path, F.digest_of(bytes), *executable)
                .unwrap(),
            Entry::Symlink(target) => builder.add_symlink(path, target).unwrap(),
            Entry::EmptyDir => builder.add_directory(path).unwrap(),
        }
    }
    builder.root_digest().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn canonical_root_ignores_insertion_order(spec in spec_strategy().prop_flat_map(|s| {
        let shuffled = Just(s.clone()).prop_shuffle();
        (Just(s), shuffled)
    })) {
        let (spec, shuffled) = spec;
        prop_assert_eq!(builder_root(&spec), builder_root(&shuffled));
    }

    #[test]
    fn zip_directory_and_materialisation_agree(spec in spec_strategy()) {
        let (_s, store) = store();
        let work = tempfile::tempdir().unwrap();
        write_dir(work.path(), &spec);
        let from_dir = build_from_dir(&store, work.path(), F, &DirOptions::default()).unwrap();
        prop_assert_eq!(from_dir.root, builder_root(&spec));
        let from_zip = build_from_zip(&store, std::io::Cursor::new(write_zip(&spec)), F, &ZipLimits::default()).unwrap();
        prop_assert_eq!(from_zip.root, from_dir.root);
        let out = tempfile::tempdir().unwrap();
        let target = out.path().join("m");
        materialize(&store, &from_dir.root, &target, &MaterializeOptions::default()).unwrap();
        let again = build_from_dir(&store, &target, F, &DirOptions::default()).unwrap();
        prop_assert_eq!(again.root, from_dir.root);
    }

    #[test]
    fn accepted_symlink_targets_never_leave_the_tree(
        depth in 0usize..4,
        parts in prop::collection::vec(prop::sample::select(vec!["..", ".", "a", ""]), 1..6),
    ) {
        let target = parts.join("/");
        if check_symlink_target("l", depth, &target).is_ok() {
            // Resolve lexically from a link `depth` directories deep.
            let mut level = depth as i64;
            for part in target.split('/') {
                match part {
                    ".." => level -= 1,
                    "" | "." => {}
                    _ => level += 1,
                }
                prop_assert!(level >= 0, "{:?} at depth {} escaped", target, depth);
            }
        }
    }
}
