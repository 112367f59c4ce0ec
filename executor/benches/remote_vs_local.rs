//! Remote (the executor's job path: hash → action cache → sandboxed cargo with shared caches)
//! against plain local `cargo` on the same machine, measured side by side in one run on a
//! mid-size workspace with registry dependencies (`tests/fixtures/midsize`, ~34 crates).
//!
//! `cargo bench -p rba-executor --bench remote_vs_local` prints one line per figure:
//! - cold build with a warm registry: remote/local (goal ≤ 1.03, issue 11)
//! - incremental build after a one-line change in a leaf crate: remote/local (goal ≤ 1.05, issue 11),
//!   also on a store without fsync (what the durable copy of the new binary costs)
//! - unchanged resubmission (action-cache hit) vs local no-op build (goal ≤ 1.0)
//! - sandbox start/stop overhead per job
//!
//! Every figure is the median of several rounds, local and remote alternating, so a burst of
//! load elsewhere skews one round only (cold: 3 rounds, each on a fresh target dir and slot).
//!
//! The remote side includes hashing the workspace into the CAS and submitting, as a client
//! would; it needs `.ci/setup` (sandbox prerequisites) and the registry reachable for the
//! one-time fetch.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rba_cas::{Cas, DigestFunction, StoreConfig};
use rba_executor::cargo::{CargoJob, JobKind};
use rba_executor::isolation::Isolation;
use rba_executor::runner::{Executor, ExecutorConfig, JobStatus};
use rba_executor::sandbox::{Sandbox, SandboxConfig, SandboxSpec};
use tokio::runtime::Runtime;

async fn remote(
    executor: &Executor,
    cas: &Cas,
    workspace: &Path,
    kind: JobKind,
    identity: &str,
) -> (Duration, bool) {
    let started = Instant::now();
    let root = common::hash_dir(cas, workspace, DigestFunction::Blake3).await;
    let handle = executor
        .submit_cargo(
            &CargoJob::new(kind),
            root,
            identity,
            rba_executor::tenant::Tenant::local(),
        )
        .await
        .unwrap();
    let outcome = handle.wait().await;
    if outcome.status != JobStatus::Success {
        for line in common::log_lines(&handle).await {
            eprintln!("{line}");
        }
        panic!("remote {kind:?} failed: {:?}", outcome.error);
    }
    let steps: Vec<String> = outcome
        .steps
        .iter()
        .map(|(name, took)| format!("{name} {:.3}s", took.as_secs_f64()))
        .collect();
    eprintln!("  remote {kind:?} steps: {}", steps.join(", "));
    (started.elapsed(), outcome.cache_hit)
}

/// The leaf crate's file that the rounds change by one line.
const LEAF: &str = "cli/src/main.rs";

fn append_line(path: &Path, line: &str) {
    let mut text = std::fs::read_to_string(path).unwrap();
    text.push_str(&format!("\n{line}\n"));
    std::fs::write(path, text).unwrap();
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn line(figure: &str, remote: Duration, local: Duration, goal: f64) {
    let ratio = remote.as_secs_f64() / local.as_secs_f64().max(1e-9);
    println!(
        "{figure:<52} remote {:>8.3}s  local {:>8.3}s  remote/local {ratio:>6.3}  (goal <= {goal})",
        remote.as_secs_f64(),
        local.as_secs_f64()
    );
}

/// One remote side: an executor on its own store, and the copy of the workspace it builds.
struct RemoteSide {
    executor: Executor,
    cas: Cas,
    workspace: PathBuf,
}

impl RemoteSide {
    fn new(scratch: &Path, name: &str, store: StoreConfig) -> RemoteSide {
        let workspace = scratch.join(format!("{name}-workspace"));
        std::fs::create_dir_all(&workspace).unwrap();
        common::copy_dir(&common::fixture("midsize"), &workspace);
        let cas = Cas::open(scratch.join(format!("{name}-cas")), store).unwrap();
        let mut config = ExecutorConfig::new(scratch.join(format!("{name}-executor"))).unwrap();
        config.workers = 1;
        // These figures are issue 11's: every cold round really cold (the `shared_units` bench
        // measures a node that shares units between workspaces).
        config.shared_units = false;
        let executor = Executor::new(cas.clone(), config).unwrap();
        RemoteSide {
            executor,
            cas,
            workspace,
        }
    }

    /// Runs one job on the side's workspace: (wall time as a client sees it, cache hit).
    fn run(&self, runtime: &Runtime, kind: JobKind, identity: &str) -> (Duration, bool) {
        runtime.block_on(remote(
            &self.executor,
            &self.cas,
            &self.workspace,
            kind,
            identity,
        ))
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for the list; nothing to list.
    }
    let scratch = tempfile::tempdir().unwrap();
    let local_ws = scratch.path().join("local");
    std::fs::create_dir_all(&local_ws).unwrap();
    common::copy_dir(&common::fixture("midsize"), &local_ws);
    let local_target = scratch.path().join("local-target");
    let local_build =
        |target: &Path| common::local_cargo(&local_ws, target, &["build", "--locked", "--offline"]);

    let runtime = Runtime::new().unwrap();
    let synced = RemoteSide::new(scratch.path(), "remote", StoreConfig::default());
    // The same executor on a store without fsync (`rba serve --no-fsync`): what durability of
    // the stored artifact costs. Local cargo syncs nothing.
    let unsynced = RemoteSide::new(scratch.path(), "unsynced", StoreConfig::without_fsync());

    // Warm the registries: local ~/.cargo, and each executor's shared cargo home (its fetch
    // phase runs before any cargo job; `fmt --check` compiles nothing).
    common::local_cargo(&local_ws, &local_target, &["fetch", "--locked"]);
    for side in [&synced, &unsynced] {
        side.run(&runtime, JobKind::Fmt, "midsize");
    }

    // Cold builds: a fresh local target dir and a fresh remote slot (a new workspace identity)
    // per round; the registries stay warm. A different tree each round, or the action cache
    // would answer rounds after the first.
    let cold_rounds = 3;
    let mut local_cold = Vec::new();
    let mut remote_cold = Vec::new();
    for round in 0..cold_rounds {
        for ws in [&local_ws, &synced.workspace] {
            append_line(&ws.join(LEAF), &format!("// cold round {round}"));
        }
        let last = round + 1 == cold_rounds;
        let (identity, target) = if last {
            ("midsize".to_string(), local_target.clone())
        } else {
            (
                format!("midsize-cold-{round}"),
                scratch.path().join(format!("local-target-cold-{round}")),
            )
        };
        local_cold.push(local_build(&target));
        remote_cold.push(synced.run(&runtime, JobKind::Build, &identity).0);
        if !last {
            let _ = std::fs::remove_dir_all(&target);
        }
    }
    line(
        "cold build, warm registry",
        median(remote_cold),
        median(local_cold),
        1.03,
    );
    unsynced.run(&runtime, JobKind::Build, "midsize");

    // Repeated figures report the median of their rounds, each side measured alternately.
    let rounds = 7;
    let mut local_incremental = Vec::new();
    let mut synced_incremental = Vec::new();
    let mut unsynced_incremental = Vec::new();
    for round in 0..rounds {
        for ws in [&local_ws, &synced.workspace, &unsynced.workspace] {
            append_line(&ws.join(LEAF), &format!("// one-line change {round}"));
        }
        local_incremental.push(local_build(&local_target));
        for (side, times) in [
            (&synced, &mut synced_incremental),
            (&unsynced, &mut unsynced_incremental),
        ] {
            let (took, hit) = side.run(&runtime, JobKind::Build, "midsize");
            assert!(!hit, "a changed tree is no action-cache hit");
            times.push(took);
        }
    }
    let local_incremental = median(local_incremental);
    line(
        "incremental build, one-line change in a leaf crate",
        median(synced_incremental),
        local_incremental,
        1.05,
    );
    line(
        "  the same on a store without fsync",
        median(unsynced_incremental),
        local_incremental,
        1.05,
    );

    let mut local_noop = Vec::new();
    let mut remote_hit = Vec::new();
    for _ in 0..rounds + 2 {
        local_noop.push(local_build(&local_target));
        let (took, hit) = synced.run(&runtime, JobKind::Build, "midsize");
        assert!(
            hit,
            "the unchanged resubmission must be an action-cache hit"
        );
        remote_hit.push(took);
    }
    line(
        "unchanged: action-cache hit vs local no-op build",
        median(remote_hit),
        median(local_noop),
        1.0,
    );

    // The fixed cost of one sandboxed run, per isolation provider.
    for isolation in Isolation::ALL {
        let config = SandboxConfig {
            isolation,
            ..SandboxConfig::with_host_toolchain().unwrap()
        };
        let sandbox = match Sandbox::new(config) {
            Ok(sandbox) => sandbox,
            Err(e) => {
                println!("sandbox start/stop overhead ({isolation}): unavailable: {e}");
                continue;
            }
        };
        let runs = 20;
        let started = Instant::now();
        for _ in 0..runs {
            let outcome = runtime
                .block_on(sandbox.run(SandboxSpec::new(["true"]), |_| {}))
                .unwrap();
            assert!(outcome.success());
        }
        let per_job = started.elapsed() / runs;
        println!(
            "{:<52} {:>8.1} ms per job ({runs} runs of `true`)",
            format!("sandbox start/stop overhead ({isolation})"),
            per_job.as_secs_f64() * 1e3
        );
    }
}
