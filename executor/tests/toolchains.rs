//! A workspace's `rust-toolchain.toml` chooses the toolchain of its job among the node's
//! installed ones (rustup's, linked ones included), on the real sandbox with real cargo; a
//! missing channel and a toolchain file naming a path are refused, naming what they asked for.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Harness, hash_dir};
use rba_cas::DigestFunction;
use rba_executor::cargo::{CargoJob, JobKind};
use rba_executor::logstream::strip_ansi;
use rba_executor::runner::JobStatus;
use rba_executor::tenant::Tenant;

fn harness() -> Harness {
    Harness::new(|config| config.limits.wall_time = Some(Duration::from_secs(300)))
}

/// A crate that only nightly compiles (`#![feature]`), whose build script reports the
/// `rustc -V` it was built with, and that names its toolchain in `rust-toolchain.toml`.
fn nightly_crate(dir: &Path, toolchain_file: &str) {
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(
        dir.join("Cargo.toml"),
        "[package]\nname = \"pinned\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("Cargo.lock"),
        "version = 4\n\n[[package]]\nname = \"pinned\"\nversion = \"0.1.0\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("build.rs"),
        "fn main() {\n    let rustc = std::env::var(\"RUSTC\").unwrap();\n    \
         let out = std::process::Command::new(rustc).arg(\"-V\").output().unwrap();\n    \
         println!(\"cargo:warning=built by {}\", String::from_utf8_lossy(&out.stdout).trim());\n}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("src/main.rs"),
        "#![feature(never_type)]\nfn never() -> Option<!> { None }\nfn main() { assert!(never().is_none()); }\n",
    )
    .unwrap();
    std::fs::write(dir.join("rust-toolchain.toml"), toolchain_file).unwrap();
}

fn rustup(args: &[&str]) -> std::process::Output {
    Command::new("rustup")
        .args(args)
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .expect("rustup runs")
}

/// `rustup toolchain link NAME SYSROOT`, unlinked on drop.
struct LinkedToolchain(String);

impl LinkedToolchain {
    fn link(name: String, sysroot: &str) -> Self {
        let out = rustup(&["toolchain", "link", &name, sysroot]);
        assert!(out.status.success(), "rustup toolchain link: {out:?}");
        LinkedToolchain(name)
    }
}

impl Drop for LinkedToolchain {
    fn drop(&mut self) {
        let _ = rustup(&["toolchain", "uninstall", &self.0]);
    }
}

fn sysroot_of(toolchain: &str) -> String {
    let out = Command::new("rustc")
        .arg(format!("+{toolchain}"))
        .args(["--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .unwrap();
    assert!(out.status.success(), "rustc +{toolchain}: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_toolchain_named_by_rust_toolchain_toml_builds_the_job() {
    let harness = harness();
    let name = format!("rba-test-tc-{}", std::process::id());
    let linked_toolchain = LinkedToolchain::link(name.clone(), &sysroot_of("nightly"));
    let source = tempfile::tempdir().unwrap();
    nightly_crate(
        source.path(),
        &format!("[toolchain]\nchannel = \"{name}\"\n"),
    );

    let (_, outcome, lines) = harness
        .run(&CargoJob::new(JobKind::Build), source.path(), "pinned")
        .await;
    let text: Vec<String> = lines.iter().map(|l| strip_ansi(l).into_owned()).collect();
    assert_eq!(
        outcome.status,
        JobStatus::Success,
        "{text:#?} {:?}",
        outcome.error
    );
    assert!(
        text.iter()
            .any(|l| l.contains("built by rustc") && l.contains("-nightly")),
        "the build script ran the linked nightly rustc: {text:#?}"
    );

    // The same crate with the node's default toolchain (stable): the feature gate fails it,
    // and its action key differs (the toolchain is part of it).
    let stable = tempfile::tempdir().unwrap();
    nightly_crate(stable.path(), "[toolchain]\nchannel = \"stable\"\n");
    let (_, failed, lines) = harness
        .run(&CargoJob::new(JobKind::Build), stable.path(), "pinned")
        .await;
    let text: Vec<String> = lines.iter().map(|l| strip_ansi(l).into_owned()).collect();
    assert_eq!(failed.status, JobStatus::Failed, "{text:#?}");
    assert!(
        text.iter()
            .any(|l| l.contains("E0554") || l.contains("feature")),
        "{text:#?}"
    );

    // `channel = "nightly"` finds rustup's `nightly-<host>`: the same toolchain as the linked
    // one (same `rustc -vV`, so the same identity in action and slot keys).
    let by_channel = tempfile::tempdir().unwrap();
    nightly_crate(by_channel.path(), "[toolchain]\nchannel = \"nightly\"\n");
    let (_, again, lines) = harness
        .run(&CargoJob::new(JobKind::Build), by_channel.path(), "pinned")
        .await;
    assert_eq!(again.status, JobStatus::Success, "{lines:#?}");
    let nightly = harness
        .executor
        .toolchains()
        .select("nightly")
        .expect("nightly is installed");
    let linked = harness.executor.toolchains().select(&name).unwrap();
    assert_eq!(nightly.digest_hex, linked.digest_hex);
    assert_ne!(nightly.digest_hex, harness.executor.toolchain().digest_hex);
    drop(linked_toolchain);
    let listed = String::from_utf8(rustup(&["toolchain", "list"]).stdout).unwrap();
    assert!(!listed.contains(&name), "unlinked again: {listed}");
}

/// The error of submitting a crate whose `rust-toolchain.toml` is `toolchain_file`.
async fn refusal(harness: &Harness, toolchain_file: &str) -> String {
    let source = tempfile::tempdir().unwrap();
    nightly_crate(source.path(), toolchain_file);
    let root = hash_dir(&harness.cas, source.path(), DigestFunction::Blake3).await;
    harness
        .executor
        .submit_cargo(
            &CargoJob::new(JobKind::Build),
            root,
            "refused",
            Tenant::local(),
        )
        .await
        .expect_err("refused before it runs")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_toolchain_is_a_clear_error_naming_it() {
    let harness = harness();
    let error = refusal(&harness, "[toolchain]\nchannel = \"1.70.0\"\n").await;
    assert!(
        error.starts_with("toolchain \"1.70.0\" is not installed on this node; installed: "),
        "{error}"
    );
    assert!(
        error.contains("stable-"),
        "lists what is installed: {error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_toolchain_file_naming_a_path_is_refused_never_mounted() {
    let harness = harness();
    for (file, named) in [
        ("[toolchain]\npath = \"/usr\"\n", "\"/usr\""),
        ("[toolchain]\nchannel = \"../../etc\"\n", "\"../../etc\""),
        ("[toolchain]\nchannel = \"/usr\"\n", "\"/usr\""),
    ] {
        let error = refusal(&harness, file).await;
        assert!(
            error.starts_with("rust-toolchain.toml: ") && error.contains(named),
            "{file:?}: {error}"
        );
    }
    // The node still serves: a crate without a toolchain file builds.
    let (_, outcome, lines) = harness
        .run(
            &CargoJob::new(JobKind::Build),
            &common::fixture("hello"),
            "hello",
        )
        .await;
    assert_eq!(outcome.status, JobStatus::Success, "{lines:#?}");
}
