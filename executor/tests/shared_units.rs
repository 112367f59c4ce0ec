//! Shared units end to end (see `rba_executor::shared_units`): real executor, real sandbox,
//! real cargo, registry dependencies fetched from crates.io through the egress proxy. Workspaces
//! at different identities and tenants share compiled registry units (build scripts and
//! proc-macros included), and a profile, feature or version change of one dependency rebuilds
//! exactly it and its dependents; a workspace that controls its dependencies' compilation
//! neither receives nor publishes them; a corrupted or evicted unit is rebuilt, never used. Needs `.ci/setup` (uidmap, subuid entries) and crates.io reachable.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{Harness, copy_fixture, hash_dir, log_lines};
use rba_cas::DigestFunction;
use rba_executor::cargo::{CargoJob, JobKind};
use rba_executor::logstream::strip_ansi;
use rba_executor::runner::{JobOutcome, JobStatus};
use rba_executor::shared_units::lock_registry_packages;
use rba_executor::tenant::Tenant;

fn harness(shared_units: bool) -> Harness {
    Harness::new(|config| {
        config.limits.wall_time = Some(Duration::from_secs(900));
        config.shared_units = shared_units;
    })
}

/// Another workspace with the registry dependencies of `registry-dep` (itoa): its package is
/// `name`, its program prints something else and has a test.
fn other_workspace(name: &str) -> tempfile::TempDir {
    let dir = copy_fixture("registry-dep");
    for file in ["Cargo.toml", "Cargo.lock"] {
        let path = dir.path().join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            text.replace("name = \"registry-dep\"", &format!("name = \"{name}\"")),
        )
        .unwrap();
    }
    std::fs::write(
        dir.path().join("src/main.rs"),
        "fn format(n: u64) -> String {\n    itoa::Buffer::new().format(n).to_string()\n}\n\n\
         fn main() {\n    println!(\"{} from another workspace\", format(7));\n}\n\n\
         #[cfg(test)]\nmod tests {\n    #[test]\n    fn formats() {\n        \
         assert_eq!(super::format(1234), \"1234\");\n    }\n}\n",
    )
    .unwrap();
    dir
}

fn append(path: &Path, text: &str) {
    let mut old = std::fs::read_to_string(path).unwrap();
    old.push_str(text);
    std::fs::write(path, old).unwrap();
}

/// Runs `kind` on `source` as `tenant` at `identity`; the outcome and the log without colours.
async fn run(
    harness: &Harness,
    kind: JobKind,
    source: &Path,
    identity: &str,
    tenant: Tenant,
) -> (Arc<JobOutcome>, Vec<String>) {
    let root = hash_dir(&harness.cas, source, DigestFunction::Blake3).await;
    let handle = harness
        .executor
        .submit_cargo(&CargoJob::new(kind), root, identity, tenant)
        .await
        .unwrap();
    let outcome = handle.wait().await;
    // Its units are stored after the job ended: the next step of a test may count on them.
    harness.executor.units_published().await;
    let lines = log_lines(&handle)
        .await
        .iter()
        .map(|l| strip_ansi(l).into_owned())
        .collect();
    (outcome, lines)
}

/// The crates cargo compiled (its `Compiling NAME vX` lines).
fn compiled(lines: &[String]) -> BTreeSet<String> {
    lines
        .iter()
        .filter_map(|l| l.trim().strip_prefix("Compiling "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(String::from)
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

fn assert_success(outcome: &JobOutcome, lines: &[String]) {
    assert_eq!(
        outcome.status,
        JobStatus::Success,
        "error: {:?}, log: {lines:#?}",
        outcome.error
    );
}

fn has_line(lines: &[String], text: &str) -> bool {
    lines.iter().any(|l| l.contains(text))
}

fn artifact(outcome: &JobOutcome, path: &str) -> rba_cas::Digest {
    outcome
        .artifacts
        .iter()
        .find(|a| a.path == path)
        .unwrap_or_else(|| panic!("no {path} in {:?}", outcome.artifacts))
        .digest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_workspace_of_another_tenant_compiles_only_its_own_crates() {
    let node = harness(true);
    let first = copy_fixture("registry-dep");
    let alice = Tenant::peer("alice");
    let (outcome, lines) = run(&node, JobKind::Build, first.path(), "alice:/a", alice).await;
    assert_success(&outcome, &lines);
    assert_eq!(
        compiled(&lines),
        set(&["itoa", "registry-dep"]),
        "{lines:#?}"
    );
    assert!(
        has_line(&lines, "shared units: 0 materialised"),
        "{lines:#?}"
    );
    let stats = node.executor.shared_units().stats();
    assert!(stats.units >= 1 && stats.bytes > 0, "{stats:?}");

    // Another workspace (other sources, identity and tenant) resolving itoa the same way.
    let other = other_workspace("other-app");
    let bob = Tenant::peer("bob");
    let (warm, lines) = run(&node, JobKind::Build, other.path(), "bob:/b", bob.clone()).await;
    assert_success(&warm, &lines);
    assert_eq!(compiled(&lines), set(&["other-app"]), "{lines:#?}");
    assert!(
        !has_line(&lines, "shared units: 0 materialised"),
        "{lines:#?}"
    );

    // The same bytes as a cold build of that workspace on a node without shared units.
    let cold_node = harness(false);
    let (cold, cold_lines) = run(
        &cold_node,
        JobKind::Build,
        other.path(),
        "bob:/b",
        bob.clone(),
    )
    .await;
    assert_success(&cold, &cold_lines);
    assert_eq!(compiled(&cold_lines), set(&["itoa", "other-app"]));
    assert!(!has_line(&cold_lines, "shared units"), "{cold_lines:#?}");
    assert_eq!(
        artifact(&warm, "target/debug/other-app"),
        artifact(&cold, "target/debug/other-app"),
        "a build on shared units produces the cold build's binary"
    );

    // Its tests, at yet another identity, pass on shared units too.
    let (tested, lines) = run(
        &node,
        JobKind::Test,
        other.path(),
        "bob:/b-test",
        bob.clone(),
    )
    .await;
    assert_success(&tested, &lines);
    assert!(has_line(&lines, "test tests::formats ... ok"), "{lines:#?}");
    assert!(!compiled(&lines).contains("itoa"), "{lines:#?}");
    assert!(
        has_line(&lines, "`cargo test` jobs do not publish units"),
        "{lines:#?}"
    );

    // And so does a run, whose program runs beside the units it received: it publishes none.
    let published = node.executor.shared_units().stats();
    let (ran, lines) = run(&node, JobKind::Run, other.path(), "bob:/b-run", bob).await;
    assert_success(&ran, &lines);
    assert!(has_line(&lines, "7 from another workspace"), "{lines:#?}");
    assert_eq!(compiled(&lines), set(&["other-app"]), "{lines:#?}");
    assert!(
        has_line(&lines, "`cargo run` jobs do not publish units"),
        "{lines:#?}"
    );
    assert_eq!(node.executor.shared_units().stats(), published);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_unit_is_detected_and_rebuilt_never_used() {
    let node = harness(true);
    let first = copy_fixture("registry-dep");
    let (outcome, lines) = run(&node, JobKind::Build, first.path(), "a", Tenant::local()).await;
    assert_success(&outcome, &lines);

    // Flip the bytes of the stored itoa rlib (same size).
    let lock = std::fs::read_to_string(first.path().join("Cargo.lock")).unwrap();
    let checksum = lock_registry_packages(&lock).into_values().next().unwrap();
    let toolchain = node.executor.toolchain().digest_hex.clone();
    let units = node.executor.shared_units().units(&toolchain, &checksum);
    let rlib = units
        .iter()
        .flat_map(|u| &u.files)
        .find(|f| f.path.ends_with(".rlib"))
        .unwrap_or_else(|| panic!("no rlib in {units:#?}"));
    let digest: rba_cas::Digest = rlib.digest.parse().unwrap();
    let path = node.cas.blobs.blob_path(&digest);
    let mut bytes = std::fs::read(&path).unwrap();
    for byte in bytes.iter_mut().take(64) {
        *byte ^= 0xff;
    }
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(&path, &bytes).unwrap();

    let other = other_workspace("other-app");
    let (rebuilt, lines) = run(&node, JobKind::Build, other.path(), "b", Tenant::local()).await;
    assert_success(&rebuilt, &lines);
    assert!(has_line(&lines, "not used: corrupt"), "{lines:#?}");
    assert_eq!(compiled(&lines), set(&["itoa", "other-app"]), "{lines:#?}");
    let (ran, run_lines) = (rebuilt.artifacts.len(), lines.len());
    assert!(ran > 0 && run_lines > 0);

    // The corrupt blob left the store; the rebuild published the unit again, intact.
    let third = other_workspace("third-app");
    let (warm, lines) = run(&node, JobKind::Build, third.path(), "c", Tenant::local()).await;
    assert_success(&warm, &lines);
    assert_eq!(compiled(&lines), set(&["third-app"]), "{lines:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_go_to_builds_of_their_own_kind_only() {
    let node = harness(true);
    let first = copy_fixture("registry-dep");
    let (outcome, lines) = run(&node, JobKind::Check, first.path(), "a", Tenant::local()).await;
    assert_success(&outcome, &lines);
    assert!(node.executor.shared_units().stats().units > 0, "{lines:#?}");

    // `cargo check`'s metadata-only units are not copied into a `cargo build`...
    let other = other_workspace("other-app");
    let (built, lines) = run(&node, JobKind::Build, other.path(), "b", Tenant::local()).await;
    assert_success(&built, &lines);
    assert!(
        has_line(&lines, "shared units: 0 materialised"),
        "{lines:#?}"
    );
    assert_eq!(compiled(&lines), set(&["itoa", "other-app"]), "{lines:#?}");

    // ...but into another workspace's `cargo check`.
    let third = other_workspace("third-app");
    let (checked, lines) = run(&node, JobKind::Check, third.path(), "c", Tenant::local()).await;
    assert_success(&checked, &lines);
    assert!(!compiled(&lines).contains("itoa"), "{lines:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variants_are_kept_by_use() {
    let node = harness(true);
    let build = |source: tempfile::TempDir, identity: &'static str| {
        let node = &node;
        async move {
            let (outcome, lines) = run(
                node,
                JobKind::Build,
                source.path(),
                identity,
                Tenant::local(),
            )
            .await;
            assert_success(&outcome, &lines);
            compiled(&lines)
        }
    };
    let with_profile = |name: &str, setting: &str| {
        let source = other_workspace(name);
        append(
            &source.path().join("Cargo.toml"),
            &format!("\n[profile.dev.package.itoa]\n{setting}\n"),
        );
        source
    };
    let variants = [
        "opt-level = 1",
        "opt-level = 2",
        "opt-level = 3",
        "opt-level = \"s\"",
        "opt-level = \"z\"",
        "codegen-units = 1",
        "overflow-checks = false",
        "debug-assertions = false",
    ];
    assert!(variants.len() > rba_executor::shared_units::MAX_VARIANTS - 1);
    // The default itoa, then MAX_VARIANTS - 1 others: the default is the oldest of the key.
    assert!(
        build(copy_fixture("registry-dep"), "default")
            .await
            .contains("itoa")
    );
    let names = ["v1", "v2", "v3", "v4", "v5", "v6", "v7", "v8"];
    for (i, setting) in variants[..7].iter().enumerate() {
        let compiled = build(with_profile(names[i], setting), names[i]).await;
        assert!(compiled.contains("itoa"), "{setting}: {compiled:?}");
    }
    // A workspace uses the default: it moves up, so one more variant drops another one.
    assert_eq!(build(other_workspace("user"), "user").await, set(&["user"]));
    assert!(
        build(with_profile(names[7], variants[7]), names[7])
            .await
            .contains("itoa")
    );
    assert_eq!(
        build(other_workspace("late"), "late").await,
        set(&["late"]),
        "the variant in use outlived unused ones"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_units_are_rebuilt_and_republished() {
    let node = harness(true);
    let first = copy_fixture("registry-dep");
    let (outcome, lines) = run(&node, JobKind::Build, first.path(), "a", Tenant::local()).await;
    assert_success(&outcome, &lines);
    let published = node.executor.shared_units().stats();
    assert!(published.units > 0);

    // The store's LRU takes everything (units are blobs like any other).
    node.cas.blobs.evict_down_to(0).unwrap();
    let other = other_workspace("other-app");
    let (rebuilt, lines) = run(&node, JobKind::Build, other.path(), "b", Tenant::local()).await;
    assert_success(&rebuilt, &lines);
    assert!(has_line(&lines, "not used: evicted"), "{lines:#?}");
    assert_eq!(compiled(&lines), set(&["itoa", "other-app"]), "{lines:#?}");
    assert_eq!(
        node.executor.shared_units().stats(),
        published,
        "the evicted unit left the index; the rebuild published it again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspaces_that_control_their_dependencies_build_neither_receive_nor_publish() {
    let node = harness(true);
    let local = Tenant::local;

    // Rustflags in a workspace config.
    let flags = other_workspace("with-flags");
    std::fs::create_dir_all(flags.path().join(".cargo")).unwrap();
    std::fs::write(
        flags.path().join(".cargo/config.toml"),
        "[build]\nrustflags = [\"-C\", \"overflow-checks=off\"]\n",
    )
    .unwrap();
    // A [patch] (unused here, so the lock file stays; the node resolves it with the patch).
    let patched = other_workspace("with-patch");
    std::fs::remove_file(patched.path().join("Cargo.lock")).unwrap();
    append(
        &patched.path().join("Cargo.toml"),
        "\n[patch.crates-io]\nunused-crate = { path = \"vendor/unused-crate\" }\n",
    );
    std::fs::create_dir_all(patched.path().join("vendor/unused-crate/src")).unwrap();
    std::fs::write(
        patched.path().join("vendor/unused-crate/Cargo.toml"),
        "[package]\nname = \"unused-crate\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    )
    .unwrap();
    std::fs::write(patched.path().join("vendor/unused-crate/src/lib.rs"), "").unwrap();

    // First on an empty node: they build, and publish nothing.
    for (source, identity, reason) in [
        (&flags, "flags-1", ".cargo"),
        (&patched, "patch-1", "has `patch`"),
    ] {
        let (outcome, lines) = run(&node, JobKind::Build, source.path(), identity, local()).await;
        assert_success(&outcome, &lines);
        assert!(compiled(&lines).contains("itoa"), "{lines:#?}");
        assert!(
            has_line(&lines, "shared units off:") && has_line(&lines, reason),
            "{lines:#?}"
        );
        assert_eq!(
            node.executor.shared_units().stats().units,
            0,
            "{identity} published"
        );
    }

    // A workspace with a build script of its own receives, but publishes nothing.
    let scripted = other_workspace("with-build-script");
    std::fs::write(scripted.path().join("build.rs"), "fn main() {}\n").unwrap();
    let (outcome, lines) = run(&node, JobKind::Build, scripted.path(), "scripted", local()).await;
    assert_success(&outcome, &lines);
    assert!(
        has_line(&lines, "shared units not published") && has_line(&lines, "build script"),
        "{lines:#?}"
    );
    assert_eq!(node.executor.shared_units().stats().units, 0);

    // A clean workspace publishes; the controlling ones still receive nothing.
    let clean = copy_fixture("registry-dep");
    let (outcome, lines) = run(&node, JobKind::Build, clean.path(), "clean", local()).await;
    assert_success(&outcome, &lines);
    assert!(compiled(&lines).contains("itoa"));
    assert!(node.executor.shared_units().stats().units > 0, "{lines:#?}");
    // Each workspace edited, so the second build is not the first one's action-cache hit.
    for source in [&flags, &patched, &scripted] {
        append(&source.path().join("src/main.rs"), "// edited\n");
    }
    for (source, identity) in [(&flags, "flags-2"), (&patched, "patch-2")] {
        let (outcome, lines) = run(&node, JobKind::Build, source.path(), identity, local()).await;
        assert_success(&outcome, &lines);
        assert!(has_line(&lines, "shared units off:"), "{lines:#?}");
        assert!(!has_line(&lines, "materialised"), "{lines:#?}");
        assert!(compiled(&lines).contains("itoa"), "{lines:#?}");
    }
    let (outcome, lines) = run(
        &node,
        JobKind::Build,
        scripted.path(),
        "scripted-2",
        local(),
    )
    .await;
    assert_success(&outcome, &lines);
    assert_eq!(compiled(&lines), set(&["with-build-script"]), "{lines:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn midsize_shares_build_scripts_and_proc_macros_and_a_change_rebuilds_exactly_its_units() {
    let node = harness(true);
    let first = copy_fixture("midsize");
    let (outcome, lines) = run(
        &node,
        JobKind::Build,
        first.path(),
        "mid-a",
        Tenant::peer("alice"),
    )
    .await;
    assert_success(&outcome, &lines);
    assert!(compiled(&lines).len() > 20, "{lines:#?}");

    // Another workspace identity and tenant, its own crates edited.
    let second = copy_fixture("midsize");
    append(
        &second.path().join("core/src/lib.rs"),
        "\npub fn shared_units_edit() -> u32 {\n    7\n}\n",
    );
    let bob = Tenant::peer("bob");
    let (outcome, lines) = run(&node, JobKind::Build, second.path(), "mid-b", bob.clone()).await;
    assert_success(&outcome, &lines);
    assert_eq!(
        compiled(&lines),
        set(&["midsize-cli", "midsize-core"]),
        "{lines:#?}"
    );

    // A profile change of one dependency: it, its dependents, and nothing else.
    let third = copy_fixture("midsize");
    append(
        &third.path().join("Cargo.toml"),
        "\n[profile.dev.package.itoa]\nopt-level = 1\n",
    );
    let (outcome, lines) = run(&node, JobKind::Build, third.path(), "mid-c", bob.clone()).await;
    assert_success(&outcome, &lines);
    assert_eq!(
        compiled(&lines),
        set(&["itoa", "midsize-cli", "midsize-core", "serde_json"]),
        "{lines:#?}"
    );

    // A feature change (serde_json's `raw_value`, no new dependency): serde_json (its build
    // script too) and its dependents.
    let fourth = copy_fixture("midsize");
    let manifest = fourth.path().join("core/Cargo.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replace(
            "serde_json = \"1\"",
            "serde_json = { version = \"1\", features = [\"raw_value\"] }",
        ),
    )
    .unwrap();
    let (outcome, lines) = run(&node, JobKind::Build, fourth.path(), "mid-d", bob.clone()).await;
    assert_success(&outcome, &lines);
    assert_eq!(
        compiled(&lines),
        set(&["midsize-cli", "midsize-core", "serde_json"]),
        "{lines:#?}"
    );

    // A dependency version change (itoa 1.0.18 -> 1.0.14, fetched): it and its dependents.
    let fifth = copy_fixture("midsize");
    let lock = fifth.path().join("Cargo.lock");
    let text = std::fs::read_to_string(&lock).unwrap();
    let old = "name = \"itoa\"\nversion = \"1.0.18\"\nsource = \"registry+https://github.com/rust-lang/crates.io-index\"\nchecksum = \"8f42a60cbdf9a97f5d2305f08a87dc4e09308d1276d28c869c684d7777685682\"";
    assert!(text.contains(old), "the fixture's lock names itoa 1.0.18");
    std::fs::write(
        &lock,
        text.replace(
            old,
            "name = \"itoa\"\nversion = \"1.0.14\"\nsource = \"registry+https://github.com/rust-lang/crates.io-index\"\nchecksum = \"d75a2a4b1b190afb6f5425f10f6a8f959d2ea0b9c2b1d79553551850539e4674\"",
        ),
    )
    .unwrap();
    let (outcome, lines) = run(&node, JobKind::Build, fifth.path(), "mid-e", bob).await;
    assert_success(&outcome, &lines);
    assert_eq!(
        compiled(&lines),
        set(&["itoa", "midsize-cli", "midsize-core", "serde_json"]),
        "{lines:#?}"
    );
}

/// A workspace depending on itoa only, locked to the same itoa as `midsize`, printing `n`.
fn itoa_only_workspace(n: u32) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("src")).unwrap();
    std::fs::write(
        root.join("Cargo.toml"),
        "[package]\nname = \"itoa-only\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
         [dependencies]\nitoa = \"=1.0.18\"\n\n[workspace]\n",
    )
    .unwrap();
    std::fs::write(
        root.join("src/main.rs"),
        format!("fn main() {{\n    println!(\"{{}}\", itoa::Buffer::new().format({n}));\n}}\n"),
    )
    .unwrap();
    std::fs::write(
        root.join("Cargo.lock"),
        "version = 4\n\n[[package]]\nname = \"itoa\"\nversion = \"1.0.18\"\n\
         source = \"registry+https://github.com/rust-lang/crates.io-index\"\n\
         checksum = \"8f42a60cbdf9a97f5d2305f08a87dc4e09308d1276d28c869c684d7777685682\"\n\n\
         [[package]]\nname = \"itoa-only\"\nversion = \"0.1.0\"\ndependencies = [\n \"itoa\",\n]\n",
    )
    .unwrap();
    dir
}

/// A tenant cannot reach another tenant's build through a crate the other did not pick: a unit
/// made where registry build scripts and proc-macros ran goes only to workspaces that lock every
/// one of them (they could have rewritten it, and run in such a workspace's own build anyway).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_go_only_to_workspaces_that_lock_the_build_time_code_that_ran_beside_them() {
    let node = harness(true);
    // Midsize runs build scripts and proc-macros (serde, proc-macro2, clap_derive…) beside
    // itoa's compilation, and publishes itoa among its units.
    let midsize = copy_fixture("midsize");
    let (outcome, lines) = run(
        &node,
        JobKind::Build,
        midsize.path(),
        "mallory:/midsize",
        Tenant::peer("mallory"),
    )
    .await;
    assert_success(&outcome, &lines);
    assert!(compiled(&lines).contains("itoa"), "{lines:#?}");

    // A workspace that locks the same itoa and none of that build-time code compiles itoa
    // itself: nothing of midsize's build is materialised into it.
    let itoa_only = itoa_only_workspace(1);
    let alice = Tenant::peer("alice");
    let (outcome, lines) = run(
        &node,
        JobKind::Build,
        itoa_only.path(),
        "alice:/itoa-only",
        alice.clone(),
    )
    .await;
    assert_success(&outcome, &lines);
    assert_eq!(compiled(&lines), set(&["itoa", "itoa-only"]), "{lines:#?}");
    assert!(
        has_line(&lines, "shared units: 0 materialised"),
        "{lines:#?}"
    );

    // Its own clean build ran no build-time code: its itoa is for every workspace, midsize's
    // included (a new identity of midsize still receives all its units).
    // (Other sources: not an action-cache hit of the same build.)
    let again = itoa_only_workspace(2);
    let (outcome, lines) = run(
        &node,
        JobKind::Build,
        again.path(),
        "bob:/itoa-only",
        Tenant::peer("bob"),
    )
    .await;
    assert_success(&outcome, &lines);
    assert_eq!(compiled(&lines), set(&["itoa-only"]), "{lines:#?}");
    let second_midsize = copy_fixture("midsize");
    append(
        &second_midsize.path().join("core/src/lib.rs"),
        "\npub fn another_tenants_edit() -> u32 {\n    9\n}\n",
    );
    let (outcome, lines) = run(
        &node,
        JobKind::Build,
        second_midsize.path(),
        "alice:/midsize",
        alice,
    )
    .await;
    assert_success(&outcome, &lines);
    assert_eq!(
        compiled(&lines),
        set(&["midsize-cli", "midsize-core"]),
        "{lines:#?}"
    );
}
