//! Hostile input trees through the executor's real entry points ([`Executor::submit`] and the
//! workspace sync): symlinked sync temporaries, links leaving the tree, a symlinked
//! `Cargo.lock`, output paths leaving the exec root and a Directory DAG that expands to 2^30
//! paths. Each is refused with an error naming the path and the rule or limit, or handled
//! safely, and no host file changes.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Harness;
use rba_cas::merkle::TreeLimits;
use rba_cas::{BlobStore, Digest, DigestFunction, TreeBuilder};
use rba_executor::action::store_action;
use rba_executor::cargo::{CargoJob, JobKind};
use rba_executor::runner::{ExecuteRequest, ExecutorError, JobHandle, JobStatus};
use rba_executor::tenant::Tenant;
use rba_executor::workspace::{DesiredEntry, read_lockfile, sync_directory};
use rba_proto::Message;
use rba_proto::reapi::{Command, Directory, DirectoryNode, FileNode, Platform, SymlinkNode};

const F: DigestFunction = DigestFunction::Blake3;
const MAIN_RS: &[u8] = b"fn main() { println!(\"synced\"); }\n";
const CARGO_TOML: &[u8] =
    b"[package]\nname = \"trees\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n";

const CARGO_LOCK: &[u8] = b"version = 4\n\n[[package]]\nname = \"trees\"\nversion = \"0.1.0\"\n";

/// A harness whose executor data dir is known (to check nothing was written there).
fn harness() -> (Harness, PathBuf) {
    let mut data_dir = PathBuf::new();
    let harness = Harness::new(|config| {
        config.limits.wall_time = Some(Duration::from_secs(120));
        data_dir = config.data_dir.clone();
    });
    (harness, data_dir)
}

/// A host file standing in for something the executor must never touch.
fn host_file() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("host-secret");
    std::fs::write(&path, b"host content\n").unwrap();
    (dir, path)
}

fn put(blobs: &BlobStore, directory: &Directory) -> Digest {
    blobs.put_bytes(F, &directory.encode_to_vec()).unwrap()
}

fn file(blobs: &BlobStore, name: &str, content: &[u8]) -> FileNode {
    FileNode {
        name: name.into(),
        digest: Some(blobs.put_bytes(F, content).unwrap().to_reapi()),
        ..Default::default()
    }
}

fn link(name: &str, target: &str) -> SymlinkNode {
    SymlinkNode {
        name: name.into(),
        target: target.into(),
        node_properties: None,
    }
}

/// A crate (`Cargo.toml`, `src/main.rs`) with extra symlinks at the root and in `src/`, built
/// as raw `Directory` messages (our own tree builders refuse such links).
fn crate_with_links(
    blobs: &BlobStore,
    root_links: &[(&str, &str)],
    src_links: &[(&str, &str)],
) -> Digest {
    let mut src = Directory {
        files: vec![file(blobs, "main.rs", MAIN_RS)],
        symlinks: src_links.iter().map(|(n, t)| link(n, t)).collect(),
        ..Default::default()
    };
    src.symlinks.sort_by(|a, b| a.name.cmp(&b.name));
    let src = put(blobs, &src);
    let mut root = Directory {
        files: vec![file(blobs, "Cargo.toml", CARGO_TOML)],
        directories: vec![DirectoryNode {
            name: "src".into(),
            digest: Some(src.to_reapi()),
        }],
        symlinks: root_links.iter().map(|(n, t)| link(n, t)).collect(),
        ..Default::default()
    };
    root.symlinks.sort_by(|a, b| a.name.cmp(&b.name));
    put(blobs, &root)
}

/// Every path under `dir` (empty when it does not exist).
fn all_paths(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(listing) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in listing.flatten() {
            found.push(entry.path());
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
    }
    found
}

async fn submit_cargo(harness: &Harness, root: Digest) -> Result<JobHandle, ExecutorError> {
    harness
        .executor
        .submit_cargo(
            &CargoJob::new(JobKind::Build),
            root,
            "trees",
            Tenant::local(),
        )
        .await
}

fn refusal(result: Result<JobHandle, ExecutorError>) -> String {
    match result {
        Ok(handle) => panic!("job {} was accepted", handle.id),
        Err(error) => error.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaping_links_are_refused_at_submission_and_nothing_touches_disk() {
    let (harness, data_dir) = harness();
    let (_host_dir, host) = host_file();
    let host_path = host.display().to_string();
    let blobs = harness.cas.blobs.clone();
    let cases: Vec<(Digest, String, String)> = vec![
        // The sync's temporary name as a link to a host file.
        (
            crate_with_links(&blobs, &[], &[(".main.rs.rba-sync", &host_path)]),
            "src/.main.rs.rba-sync".into(),
            "is absolute".into(),
        ),
        // The same, relative, climbing out of the slot.
        (
            crate_with_links(
                &blobs,
                &[],
                &[(
                    ".main.rs.rba-sync",
                    &format!("../../../../../../..{host_path}"),
                )],
            ),
            "src/.main.rs.rba-sync".into(),
            "escapes the tree".into(),
        ),
        (
            crate_with_links(&blobs, &[("escape", "../../x")], &[]),
            "escape".into(),
            "escapes the tree".into(),
        ),
        (
            crate_with_links(&blobs, &[("passwd", "/etc/passwd")], &[]),
            "passwd".into(),
            "is absolute".into(),
        ),
        // A symlinked Cargo.lock naming a host file.
        (
            crate_with_links(&blobs, &[("Cargo.lock", &host_path)], &[]),
            "Cargo.lock".into(),
            "is absolute".into(),
        ),
        (
            crate_with_links(&blobs, &[], &[("inner", "../sub/../../x")]),
            "src/inner".into(),
            "after a name".into(),
        ),
    ];
    for (root, path, rule) in cases {
        let error = refusal(submit_cargo(&harness, root).await);
        assert!(error.contains("input root"), "{error}");
        assert!(
            error.contains(&format!("{path:?}")),
            "{error} should name {path}"
        );
        assert!(error.contains(&rule), "{error} should say {rule}");
    }
    assert_eq!(std::fs::read(&host).unwrap(), b"host content\n");
    assert!(
        harness.executor.jobs().is_empty(),
        "no refused tree became a job"
    );
    let slots: Vec<_> = all_paths(&data_dir)
        .into_iter()
        .filter(|p| p.ends_with("src"))
        .collect();
    assert!(slots.is_empty(), "no workspace was synced: {slots:?}");
}

/// A link in the tree named like the sync's old temporary, pointing at another file of the tree
/// (so the tree is valid): the sync writes `src/main.rs` without going through it, the linked
/// file keeps its content, and the crate builds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_named_like_a_sync_temporary_is_never_written_through() {
    let (harness, data_dir) = harness();
    let mut tree = TreeBuilder::new(F);
    let blobs = &harness.cas.blobs;
    let add = |tree: &mut TreeBuilder, path: &str, content: &[u8]| {
        let digest = blobs.put_bytes(F, content).unwrap();
        tree.add_file(path, digest, false).unwrap();
    };
    add(&mut tree, "Cargo.toml", CARGO_TOML);
    add(&mut tree, "Cargo.lock", CARGO_LOCK);
    add(&mut tree, "keep.txt", b"keep me\n");
    add(&mut tree, "src/main.rs", MAIN_RS);
    tree.add_symlink("src/.main.rs.rba-sync", "../keep.txt")
        .unwrap();
    let root = tree.finish(blobs).unwrap().root;
    let handle = submit_cargo(&harness, root).await.unwrap();
    let outcome = handle.wait().await;
    assert_eq!(outcome.status, JobStatus::Success, "{:?}", outcome.error);
    let synced: Vec<_> = all_paths(&data_dir)
        .into_iter()
        .filter(|p| p.ends_with("src/keep.txt"))
        .collect();
    assert_eq!(synced.len(), 1, "{synced:?}");
    let src = synced[0].parent().unwrap();
    assert_eq!(std::fs::read(src.join("keep.txt")).unwrap(), b"keep me\n");
    assert_eq!(std::fs::read(src.join("src/main.rs")).unwrap(), MAIN_RS);
    assert!(
        std::fs::symlink_metadata(src.join("src/main.rs"))
            .unwrap()
            .is_file()
    );
    assert_eq!(
        std::fs::read_link(src.join("src/.main.rs.rba-sync")).unwrap(),
        Path::new("../keep.txt")
    );
}

/// The sync itself, given entries no validated tree holds (a link to a host path, a file below
/// a link) or facing links an earlier job left: no host file is written, read or removed.
#[test]
fn the_workspace_sync_never_goes_through_a_symlink() {
    let (_store_dir, blobs) = BlobStore::scratch().unwrap();
    let (host_dir, host) = host_file();
    let slot = tempfile::tempdir().unwrap();
    let dest = slot.path().join("src");
    let manifest = slot.path().join("manifest.json");
    let main = blobs.put_bytes(F, MAIN_RS).unwrap();
    let file = |path: &str| DesiredEntry::File {
        path: path.into(),
        digest: main,
        executable: false,
    };

    // The old temporary name as a link to a host file, then the file it stood for.
    let entries = vec![
        DesiredEntry::Symlink {
            path: ".main.rs.rba-sync".into(),
            target: host.display().to_string(),
        },
        file("main.rs"),
    ];
    sync_directory(&blobs, &entries, &dest, &manifest).unwrap();
    assert_eq!(std::fs::read(&host).unwrap(), b"host content\n");
    assert_eq!(std::fs::read(dest.join("main.rs")).unwrap(), MAIN_RS);
    assert!(
        std::fs::symlink_metadata(dest.join("main.rs"))
            .unwrap()
            .is_file()
    );

    // A file below a link to a host directory: refused, naming it; nothing lands there.
    let entries = vec![
        DesiredEntry::Symlink {
            path: "out".into(),
            target: host_dir.path().display().to_string(),
        },
        file("out/planted"),
    ];
    let error = sync_directory(&blobs, &entries, &dest, &manifest)
        .unwrap_err()
        .to_string();
    assert!(error.contains("out/planted"), "{error}");
    assert!(error.contains("symlink"), "{error}");
    assert!(!host_dir.path().join("planted").exists());

    // An earlier job replaced a directory by a link to the host and planted links where files
    // go: the sync removes the links (not what they point at) and writes real entries.
    std::fs::remove_dir_all(&dest).unwrap();
    std::fs::create_dir_all(&dest).unwrap();
    std::os::unix::fs::symlink(host_dir.path(), dest.join("sub")).unwrap();
    std::os::unix::fs::symlink(&host, dest.join("main.rs")).unwrap();
    let entries = vec![
        file("main.rs"),
        DesiredEntry::Directory { path: "sub".into() },
        file("sub/host-secret"),
    ];
    sync_directory(&blobs, &entries, &dest, &manifest).unwrap();
    assert_eq!(std::fs::read(&host).unwrap(), b"host content\n");
    assert!(
        std::fs::symlink_metadata(dest.join("sub"))
            .unwrap()
            .is_dir()
    );
    assert_eq!(
        std::fs::read(dest.join("sub/host-secret")).unwrap(),
        MAIN_RS
    );
    assert_eq!(std::fs::read(dest.join("main.rs")).unwrap(), MAIN_RS);
    assert_eq!(
        all_paths(host_dir.path()),
        vec![host.clone()],
        "the host directory holds only its own file"
    );
    // No temporary was left beside the files, nor in the staging directory.
    let leftovers: Vec<_> = all_paths(slot.path())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// `Cargo.lock` comes from the tree in the CAS, following the tree's own links; never from the
/// host.
#[test]
fn the_lockfile_is_read_from_the_tree() {
    let (_store_dir, blobs) = BlobStore::scratch().unwrap();
    let lock = b"# real lock\nversion = 4\n";
    let mut tree = TreeBuilder::new(F);
    tree.add_file("locks/real.lock", blobs.put_bytes(F, lock).unwrap(), false)
        .unwrap();
    tree.add_symlink("Cargo.lock", "locks/real.lock").unwrap();
    let root = tree.finish(&blobs).unwrap().root;
    assert_eq!(read_lockfile(&blobs, &root).unwrap().as_bytes(), lock);
    let empty = TreeBuilder::new(F).finish(&blobs).unwrap().root;
    assert_eq!(read_lockfile(&blobs, &empty).unwrap(), "");
    let (_host_dir, host) = host_file();
    let dangling = put(
        &blobs,
        &Directory {
            symlinks: vec![link("Cargo.lock", &host.display().to_string())],
            ..Default::default()
        },
    );
    assert_eq!(read_lockfile(&blobs, &dangling).unwrap(), "");
}

/// 30 `Directory` blobs, each holding the next twice: 2^30 paths.
fn expansion_bomb(blobs: &BlobStore, levels: usize) -> Digest {
    let mut digest = put(
        blobs,
        &Directory {
            files: vec![file(blobs, "f", b"x")],
            ..Default::default()
        },
    );
    for _ in 0..levels {
        digest = put(
            blobs,
            &Directory {
                directories: ["a", "b"]
                    .into_iter()
                    .map(|name| DirectoryNode {
                        name: name.into(),
                        digest: Some(digest.to_reapi()),
                    })
                    .collect(),
                ..Default::default()
            },
        );
    }
    digest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dag_expansion_bomb_is_refused_in_bounded_time_naming_the_limit() {
    let (harness, data_dir) = harness();
    let root = expansion_bomb(&harness.cas.blobs, 30);
    let before = all_paths(&data_dir).len();

    let started = Instant::now();
    let error = refusal(submit_cargo(&harness, root).await);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert!(error.contains("max_entries"), "{error}");
    assert!(error.contains("1000000"), "{error}");

    // The same tree under a REAPI-style command action.
    let command = Command {
        arguments: vec!["true".into()],
        ..Default::default()
    };
    let prepared = store_action(command, root, Platform::default(), &harness.cas.blobs, F).unwrap();
    let started = Instant::now();
    let error = refusal(
        harness
            .executor
            .submit(ExecuteRequest {
                instance: "bomb".into(),
                action_digest: prepared.action_digest,
                skip_cache_lookup: true,
                workspace_identity: None,
                tenant: Tenant::anonymous(),
                limits: Default::default(),
            })
            .await,
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(error.contains("max_entries"), "{error}");
    assert!(harness.executor.jobs().is_empty());
    assert_eq!(all_paths(&data_dir).len(), before, "nothing was written");
    assert_eq!(
        TreeLimits::default().max_entries,
        1_000_000,
        "the message above names the default"
    );
}

/// The executor refuses output paths and working directories that leave the exec root itself,
/// whoever submits (the REAPI server refuses them first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_paths_leaving_the_exec_root_are_refused_by_the_executor() {
    let (harness, data_dir) = harness();
    let host = tempfile::tempdir().unwrap();
    let absolute = host.path().join("made/out").display().to_string();
    let root = TreeBuilder::new(F).finish(&harness.cas.blobs).unwrap().root;
    let cases = [
        ("", "../escape", "'..'"),
        ("", absolute.as_str(), "absolute"),
        ("..", "out", "'..'"),
    ];
    for (working_directory, output, rule) in cases {
        let command = Command {
            arguments: vec!["true".into()],
            output_paths: vec![output.into()],
            working_directory: working_directory.into(),
            ..Default::default()
        };
        let prepared =
            store_action(command, root, Platform::default(), &harness.cas.blobs, F).unwrap();
        let error = refusal(
            harness
                .executor
                .submit(ExecuteRequest {
                    instance: "paths".into(),
                    action_digest: prepared.action_digest,
                    skip_cache_lookup: true,
                    workspace_identity: None,
                    tenant: Tenant::anonymous(),
                    limits: Default::default(),
                })
                .await,
        );
        let named = if working_directory.is_empty() {
            format!("output_paths {output:?}")
        } else {
            format!("working_directory {working_directory:?}")
        };
        assert!(error.contains(&named), "{error} should name {named}");
        assert!(error.contains(rule), "{error}");
    }
    assert!(!host.path().join("made").exists());
    assert!(
        !all_paths(&data_dir)
            .iter()
            .any(|p| p.ends_with("escape") || p.ends_with("exec")),
        "no exec root was made"
    );
}
