//! The executor's one job path, end to end on a real sandbox and real cargo: fixture crates
//! hashed into a real CAS, built, cached, rebuilt incrementally; a generic REAPI command with
//! declared outputs. Needs `.ci/setup` (uidmap, subuid entries).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{Harness, copy_fixture, fixture, hash_dir};
use rba_cas::DigestFunction;
use rba_executor::action::store_action;
use rba_executor::cargo::{CargoJob, JobKind};
use rba_executor::logstream::strip_ansi;
use rba_executor::runner::{ExecuteRequest, JobHandle, JobOutcome, JobStatus};
use rba_proto::reapi::{Command, Platform};

fn harness() -> Harness {
    Harness::new(|config| config.limits.wall_time = Some(Duration::from_secs(300)))
}

async fn run(
    harness: &Harness,
    kind: JobKind,
    source: &Path,
    identity: &str,
) -> (JobHandle, Arc<JobOutcome>, Vec<String>) {
    harness.run(&CargoJob::new(kind), source, identity).await
}

fn compiled(lines: &[String], krate: &str) -> bool {
    lines
        .iter()
        .any(|l| strip_ansi(l).contains(&format!("Compiling {krate} ")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_then_cache_hit_then_incremental_rebuild() {
    let harness = harness();
    let source = copy_fixture("hello");

    let (_, first, lines) = run(&harness, JobKind::Build, source.path(), "hello").await;
    assert_eq!(
        first.status,
        JobStatus::Success,
        "log: {lines:#?} error: {:?}",
        first.error
    );
    assert!(!first.cache_hit);
    assert!(
        compiled(&lines, "hello"),
        "cargo's own output is streamed: {lines:#?}"
    );
    let binary = first
        .artifacts
        .iter()
        .find(|a| a.path == "target/debug/hello")
        .expect("binary artifact");
    assert!(binary.executable);
    assert!(harness.cas.blobs.contains(&binary.digest).unwrap());
    // Each step is located in the log: the sync's report is its own, cargo's output the build's.
    assert_eq!(first.step_end_lines.len(), first.steps.len());
    assert!(first.step_end_lines.windows(2).all(|w| w[0] <= w[1]));
    let step_lines = |name: &str| {
        let i = first.steps.iter().position(|(s, _)| s == name).unwrap();
        let from = i
            .checked_sub(1)
            .map_or(0, |p| first.step_end_lines[p] as usize);
        lines[from..first.step_end_lines[i] as usize].to_vec()
    };
    assert!(
        step_lines("sync")
            .iter()
            .any(|l| l.starts_with("workspace synced")),
        "{lines:#?} {:?}",
        first.step_end_lines
    );
    assert!(compiled(&step_lines("build"), "hello"));
    assert!(!compiled(&step_lines("sync"), "hello"));

    let (_, second, replayed) = run(&harness, JobKind::Build, source.path(), "hello").await;
    assert!(
        second.cache_hit,
        "unchanged resubmission is an action-cache hit"
    );
    assert!(second.steps.is_empty(), "nothing ran: {:?}", second.steps);
    assert_eq!(second.artifacts, first.artifacts);
    assert!(compiled(&replayed, "hello"), "the log is replayed on a hit");

    std::fs::write(
        source.path().join("src/main.rs"),
        "fn main() { println!(\"changed\"); }\n",
    )
    .unwrap();
    let (_, third, lines) = run(&harness, JobKind::Build, source.path(), "hello").await;
    assert_eq!(third.status, JobStatus::Success);
    assert!(!third.cache_hit);
    assert!(compiled(&lines, "hello"));
    assert_ne!(third.artifacts[0].digest, first.artifacts[0].digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_changed_leaf_file_rebuilds_only_its_crate() {
    let harness = harness();
    let source = copy_fixture("workspace3");
    let (_, first, lines) = run(&harness, JobKind::Build, source.path(), "ws3").await;
    assert_eq!(first.status, JobStatus::Success, "{lines:#?}");
    assert!(compiled(&lines, "util") && compiled(&lines, "core-lib") && compiled(&lines, "app"));

    std::fs::write(
        source.path().join("app/src/main.rs"),
        "fn main() { println!(\"{}\", core_lib::quadruple(11)); }\n",
    )
    .unwrap();
    let (_, second, lines) = run(&harness, JobKind::Build, source.path(), "ws3").await;
    assert_eq!(second.status, JobStatus::Success, "{lines:#?}");
    assert!(compiled(&lines, "app"), "{lines:#?}");
    assert!(
        !compiled(&lines, "util") && !compiled(&lines, "core-lib"),
        "unchanged crates stay fresh: {lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compile_error_fails_streams_the_error_and_is_not_a_hit() {
    let harness = harness();
    let source = fixture("compile-error");
    let (_, first, lines) = run(&harness, JobKind::Build, &source, "broken").await;
    assert_eq!(first.status, JobStatus::Failed);
    assert_ne!(first.exit_code, 0);
    assert!(
        lines
            .iter()
            .any(|l| strip_ansi(l).contains("mismatched types")),
        "{lines:#?}"
    );
    let (_, second, _) = run(&harness, JobKind::Build, &source, "broken").await;
    assert!(!second.cache_hit, "failures are re-run on resubmission");
    assert_eq!(second.status, JobStatus::Failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tests_job_reports_failing_test() {
    let harness = harness();
    let (_, outcome, lines) = run(&harness, JobKind::Test, &fixture("mixed-tests"), "mixed").await;
    assert_eq!(outcome.status, JobStatus::Failed);
    let text: Vec<String> = lines.iter().map(|l| strip_ansi(l).into_owned()).collect();
    assert!(
        text.iter().any(|l| l.contains("test tests::adds ... ok")),
        "{text:#?}"
    );
    assert!(
        text.iter()
            .any(|l| l.contains("test tests::fails_on_purpose ... FAILED")),
        "{text:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_dependency_is_fetched_once_without_the_workspaces_cargo_config() {
    let harness = harness();
    let source = copy_fixture("registry-dep");
    // A workspace config that would break (or hijack) downloads: a dead proxy. The fetch phase
    // must not read it; the offline build phase may.
    std::fs::create_dir_all(source.path().join(".cargo")).unwrap();
    std::fs::write(
        source.path().join(".cargo/config.toml"),
        "[http]\nproxy = \"http://127.0.0.1:9\"\n",
    )
    .unwrap();
    let (_, first, lines) = run(&harness, JobKind::Build, source.path(), "dep-a").await;
    let text: Vec<String> = lines.iter().map(|l| strip_ansi(l).into_owned()).collect();
    assert_eq!(first.status, JobStatus::Success, "{text:#?}");
    assert!(
        text.iter().any(|l| l.contains("fetching dependencies")) && compiled(&lines, "itoa"),
        "{text:#?}"
    );
    assert!(first.steps.iter().any(|(step, _)| step == "fetch"));

    // Another slot with the same Cargo.lock: the shared cargo home has it, no second fetch.
    let (_, second, lines) = run(&harness, JobKind::Check, source.path(), "dep-b").await;
    assert_eq!(second.status, JobStatus::Success, "{lines:#?}");
    assert!(
        !second.steps.iter().any(|(step, _)| step == "fetch"),
        "{:?}",
        second.steps
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_command_collects_declared_outputs() {
    let harness = harness();
    let input = tempfile::tempdir().unwrap();
    std::fs::write(input.path().join("in.txt"), "input\n").unwrap();
    let blobs = harness.cas.blobs.clone();
    let root = hash_dir(&harness.cas, input.path(), DigestFunction::Sha256).await;
    let command = Command {
        arguments: vec![
            "sh".into(),
            "-c".into(),
            "cat in.txt > out/result.txt; echo done; echo warn >&2".into(),
        ],
        output_paths: vec!["out/result.txt".into()],
        ..Default::default()
    };
    let prepared = store_action(
        command,
        root,
        Platform::default(),
        &blobs,
        DigestFunction::Sha256,
    )
    .unwrap();
    let request = ExecuteRequest {
        instance: "main".into(),
        action_digest: prepared.action_digest,
        skip_cache_lookup: false,
        workspace_identity: None,
        tenant: rba_executor::tenant::Tenant::local(),
        limits: Default::default(),
    };
    let handle = harness.executor.submit(request.clone()).await.unwrap();
    let outcome = handle.wait().await;
    assert_eq!(outcome.status, JobStatus::Success, "{:?}", outcome.error);
    let result = outcome.result.as_ref().unwrap();
    assert_eq!(result.output_files.len(), 1);
    let digest = rba_cas::Digest::from_reapi(
        DigestFunction::Sha256,
        result.output_files[0].digest.as_ref().unwrap(),
    )
    .unwrap();
    assert_eq!(blobs.read_to_vec(&digest, 1024).unwrap(), b"input\n");
    let stdout = rba_cas::Digest::from_reapi(
        DigestFunction::Sha256,
        result.stdout_digest.as_ref().unwrap(),
    )
    .unwrap();
    assert_eq!(
        String::from_utf8(blobs.read_to_vec(&stdout, 1024).unwrap())
            .unwrap()
            .trim(),
        "done"
    );
    assert!(
        harness
            .cas
            .actions
            .get("main", &prepared.action_digest)
            .unwrap()
            .is_some()
    );

    let again = harness.executor.submit(request).await.unwrap().wait().await;
    assert!(again.cache_hit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_without_a_lock_file_gets_one_resolved_and_returned() {
    let harness = harness();
    let source = copy_fixture("registry-dep");
    std::fs::remove_file(source.path().join("Cargo.lock")).unwrap();

    let (_, outcome, lines) = run(&harness, JobKind::Build, source.path(), "nolock").await;
    let text: Vec<String> = lines.iter().map(|l| strip_ansi(l).into_owned()).collect();
    assert_eq!(
        outcome.status,
        JobStatus::Success,
        "{text:#?} {:?}",
        outcome.error
    );
    assert!(
        outcome.steps.iter().any(|(step, _)| step == "resolve"),
        "{:?}",
        outcome.steps
    );
    assert!(compiled(&lines, "itoa"), "{text:#?}");
    let lock = outcome
        .artifacts
        .iter()
        .find(|a| a.path == "Cargo.lock")
        .expect("the resolved lock file is an output of the job");
    let lock_text = String::from_utf8(
        harness
            .cas
            .blobs
            .read_to_vec(&lock.digest, 1 << 20)
            .unwrap(),
    )
    .unwrap();
    assert!(
        lock_text.contains("name = \"itoa\"\nversion = \"1.0.15\""),
        "{lock_text}"
    );
    assert!(lock_text.contains("registry+https://github.com/rust-lang/crates.io-index"));
    // The resolution's scratch copy is gone from the target dir.
    let (_, again, _) = run(&harness, JobKind::Build, source.path(), "nolock").await;
    assert!(again.cache_hit);
    assert!(
        again.artifacts.iter().any(|a| a.path == "Cargo.lock"),
        "a cache hit returns the lock file too: {:?}",
        again.artifacts
    );

    // `--locked` keeps cargo's meaning: no lock file, no build (same slot, whose sources held
    // the resolved lock: it is not this tree's and must not be used).
    let locked = CargoJob {
        kind: JobKind::Build,
        release: false,
        extra_args: vec!["--locked".into()],
    };
    let (_, refused, lines) = harness.run(&locked, source.path(), "nolock").await;
    let text: Vec<String> = lines.iter().map(|l| strip_ansi(l).into_owned()).collect();
    assert_eq!(refused.status, JobStatus::Failed, "{text:#?}");
    assert!(
        text.iter()
            .any(|l| l.contains("cannot create the lock file") && l.contains("--locked")),
        "{text:#?}"
    );
    assert!(!refused.artifacts.iter().any(|a| a.path == "Cargo.lock"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_file_that_is_a_link_is_the_trees_own_never_resolved_over() {
    let harness = harness();
    let source = copy_fixture("registry-dep");
    std::fs::remove_file(source.path().join("Cargo.lock")).unwrap();
    // Dangling inside the tree (an absolute one would be refused as leaving it).
    std::os::unix::fs::symlink("missing.lock", source.path().join("Cargo.lock")).unwrap();
    let (_, outcome, lines) = run(&harness, JobKind::Build, source.path(), "linked-lock").await;
    assert_eq!(outcome.status, JobStatus::Failed, "{lines:#?}");
    // Cargo itself meets the link (it cannot read it), not the executor's resolution.
    assert!(
        outcome.steps.iter().any(|(step, _)| step == "build")
            && !outcome.steps.iter().any(|(step, _)| step == "resolve"),
        "{:?}",
        outcome.steps
    );
    assert!(!outcome.artifacts.iter().any(|a| a.path == "Cargo.lock"));
    assert!(!source.path().join("missing.lock").exists());
}

async fn submit_running(harness: &Harness, source: &Path, identity: &str) -> JobHandle {
    let root = hash_dir(&harness.cas, source, DigestFunction::Blake3).await;
    let handle = harness
        .executor
        .submit_cargo(
            &CargoJob::new(JobKind::Build),
            root,
            identity,
            rba_executor::tenant::Tenant::local(),
        )
        .await
        .unwrap();
    let mut state = handle.watch();
    state
        .wait_for(|s| matches!(s, rba_executor::runner::JobState::Running { .. }))
        .await
        .unwrap();
    handle
}

#[tokio::test]
async fn drain_refuses_new_jobs_and_lets_taken_ones_finish_within_the_grace() {
    let h = harness();
    let running = submit_running(&h, &fixture("sleepy"), "drain-slow").await;
    let executor = h.executor.clone();
    let draining = tokio::spawn(async move { executor.drain(Duration::from_secs(120)).await });
    while !h.executor.is_draining() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Nothing new is taken, whatever it is.
    let root = hash_dir(&h.cas, &fixture("hello"), DigestFunction::Blake3).await;
    let refused = h
        .executor
        .submit_cargo(
            &CargoJob::new(JobKind::Build),
            root,
            "drain-new",
            rba_executor::tenant::Tenant::local(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(refused, rba_executor::runner::ExecutorError::Draining),
        "{refused}"
    );
    // The running build ends on its own, successfully; nothing had to be cancelled.
    assert_eq!(draining.await.unwrap(), 0);
    assert_eq!(running.wait().await.status, JobStatus::Success);
}

#[tokio::test]
async fn drain_cancels_what_outlives_the_grace() {
    let h = harness();
    let running = submit_running(&h, &fixture("endless-build"), "drain-endless").await;
    let started = std::time::Instant::now();
    assert_eq!(h.executor.drain(Duration::from_secs(1)).await, 1);
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(running.wait().await.status, JobStatus::Cancelled);
}

/// An isolation provider of an embedder's own: the namespaces provider, counting its starts.
#[derive(Debug, Default)]
struct Counting {
    starts: std::sync::atomic::AtomicUsize,
}

impl rba_executor::isolation::IsolationProvider for Counting {
    fn name(&self) -> &'static str {
        "counting"
    }

    fn check(
        &self,
        config: &rba_executor::sandbox::SandboxConfig,
    ) -> Result<(), rba_executor::sandbox::SandboxError> {
        rba_executor::isolation::namespaces::Namespaces.check(config)
    }

    fn start(
        &self,
        layout: &rba_executor::isolation::JobLayout,
        config: &rba_executor::sandbox::SandboxConfig,
        root: &Path,
        stdin: std::fs::File,
    ) -> Result<rba_executor::isolation::StartedJob, rba_executor::sandbox::SandboxError> {
        self.starts
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        rba_executor::isolation::namespaces::Namespaces.start(layout, config, root, stdin)
    }
}

#[tokio::test]
async fn an_embedders_own_isolation_provider_runs_every_job() {
    use rba_executor::isolation::IsolationProvider as _;
    let counting = Arc::new(Counting::default());
    let provider = counting.clone();
    let h = Harness::new(move |config| config.isolation_provider = Some(provider));
    let (_, outcome, lines) = h
        .run(
            &CargoJob::new(JobKind::Build),
            &fixture("hello"),
            "own-provider",
        )
        .await;
    assert_eq!(outcome.status, JobStatus::Success, "{lines:?}");
    assert!(counting.starts.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert_eq!(counting.name(), "counting");
}
