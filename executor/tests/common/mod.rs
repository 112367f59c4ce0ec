//! What the executor's integration tests (and its bench) share: a scratch CAS with an executor
//! on it, hashing a directory into that CAS, and running a cargo job to its end with its log.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rba_cas::merkle::{DirOptions, build_from_dir};
use rba_cas::{Cas, Digest, DigestFunction};
use rba_executor::cargo::CargoJob;
use rba_executor::isolation::Isolation;
use rba_executor::runner::{ExecuteRequest, Executor, ExecutorConfig, JobHandle, JobOutcome};
use rba_proto::reapi::{Command, Platform};

/// A fixture crate of `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// Copies the directory `from` into `to` (created if missing), as `cp -r from/. to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success(), "copying {}", from.display());
}

/// A copy of a fixture in a temp dir, for a test that edits it.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture(name), dir.path());
    dir
}

/// Runs a local `cargo ARGS` in `workspace` with `target` as its target dir, output discarded;
/// how long it took (the benches' reference).
pub fn local_cargo(workspace: &Path, target: &Path, args: &[&str]) -> std::time::Duration {
    let started = std::time::Instant::now();
    let status = std::process::Command::new("cargo")
        .args(args)
        .current_dir(workspace)
        .env("CARGO_TARGET_DIR", target)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "local cargo {args:?}");
    started.elapsed()
}

/// The isolation provider the sandbox tests run against: `RBA_TEST_ISOLATION` (`namespaces`,
/// the default, or `bubblewrap`), so that one suite checks every provider (`.ci/test` runs the
/// sandbox, hostile-job and limit suites once per provider).
pub fn isolation() -> Isolation {
    match std::env::var("RBA_TEST_ISOLATION") {
        Ok(name) => name.parse().expect("RBA_TEST_ISOLATION"),
        Err(_) => Isolation::default(),
    }
}

/// A scratch CAS and an executor on it; both directories go away with the harness.
pub struct Harness {
    pub executor: Executor,
    pub cas: Cas,
    _cas_dir: tempfile::TempDir,
    _executor_dir: tempfile::TempDir,
}

impl Harness {
    /// An executor with the default config, changed by `configure`.
    pub fn new(configure: impl FnOnce(&mut ExecutorConfig)) -> Harness {
        let (cas_dir, cas) = Cas::scratch().unwrap();
        let executor_dir = tempfile::tempdir().unwrap();
        let mut config = ExecutorConfig::new(executor_dir.path()).unwrap();
        config.sandbox.isolation = isolation();
        configure(&mut config);
        let executor = Executor::new(cas.clone(), config).unwrap();
        Harness {
            executor,
            cas,
            _cas_dir: cas_dir,
            _executor_dir: executor_dir,
        }
    }

    /// Hashes `source` into the CAS (BLAKE3, as the agent does) and runs `job` on it to its
    /// end; returns the handle, the outcome and every log line.
    pub async fn run(
        &self,
        job: &CargoJob,
        source: &Path,
        identity: &str,
    ) -> (JobHandle, Arc<JobOutcome>, Vec<String>) {
        let root = hash_dir(&self.cas, source, DigestFunction::Blake3).await;
        let handle = self
            .executor
            .submit_cargo(job, root, identity, rba_executor::tenant::Tenant::local())
            .await
            .unwrap();
        let outcome = handle.wait().await;
        let lines = log_lines(&handle).await;
        (handle, outcome, lines)
    }
}

/// Stores the directory at `source` in `cas` and returns its root digest.
pub async fn hash_dir(cas: &Cas, source: &Path, function: DigestFunction) -> Digest {
    let blobs = cas.blobs.clone();
    let source = source.to_path_buf();
    tokio::task::spawn_blocking(move || {
        build_from_dir(&blobs, &source, function, &DirOptions::default())
            .unwrap()
            .root
    })
    .await
    .unwrap()
}

/// Every line of a job's log, from the first (waits for the log to end).
pub async fn log_lines(handle: &JobHandle) -> Vec<String> {
    let mut reader = handle.log.subscribe(0);
    let mut lines = Vec::new();
    while let Some(line) = reader.next().await {
        lines.push(line.line);
    }
    lines
}

/// Stores `command` as an Action over the input root `root` in `cas` (SHA-256, no platform);
/// a request for it from the local tenant on instance `main`.
pub fn command_request(
    cas: &Cas,
    root: Digest,
    command: Command,
    skip_cache_lookup: bool,
) -> ExecuteRequest {
    let prepared = rba_executor::action::store_action(
        command,
        root,
        Platform::default(),
        &cas.blobs,
        DigestFunction::Sha256,
    )
    .unwrap();
    ExecuteRequest {
        instance: "main".into(),
        action_digest: prepared.action_digest,
        skip_cache_lookup,
        workspace_identity: None,
        tenant: rba_executor::tenant::Tenant::local(),
        limits: Default::default(),
    }
}

/// `sh -c SCRIPT` as a [`Command`].
pub fn shell(script: impl Into<String>) -> Command {
    Command {
        arguments: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}
