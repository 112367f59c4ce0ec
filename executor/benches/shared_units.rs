//! Shared units (issue 15, `rba_executor::shared_units`): the first build of a new workspace
//! identity whose registry dependencies the node compiled before for another workspace, against
//! a cold local `cargo build` and the node's own cold build; what publishing costs a build that
//! finds nothing to share; bytes stored per shared unit set.
//!
//! `cargo bench -p rba-executor --bench shared_units` prints one line per figure (medians of
//! `RBA_BENCH_ROUNDS` rounds, default 3; the fixture is `tests/fixtures/$RBA_BENCH_FIXTURE`,
//! default `midsize`, ~34 crates):
//! - warm start: a new workspace (other identity, other tenant, edited sources) on a node that
//!   built the same dependencies for another workspace, vs a cold local `cargo build` with a warm
//!   registry (goal ≤ 0.2) and vs the node's cold build without shared units;
//! - publishing: a cold build on a node with shared units (finds nothing, publishes its registry
//!   units) vs the same node without shared units (goal ≤ 1.03);
//! - the units and bytes one build published.
//!
//! Every round uses fresh executors (own store, data dir and cargo home; the cargo home is
//! filled by an untimed `fmt` job first, as the registry of the local side is warm), so a cold
//! build really finds nothing. Times are wall times as a client sees them (hashing the workspace
//! into the CAS and submitting included). Needs `.ci/setup` and crates.io reachable.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use rba_cas::{Cas, DigestFunction, StoreConfig};
use rba_executor::cargo::{CargoJob, JobKind};
use rba_executor::logstream::strip_ansi;
use rba_executor::runner::{Executor, ExecutorConfig, JobStatus};
use rba_executor::tenant::Tenant;
use tokio::runtime::Runtime;

/// A Rust source file of the fixture's workspace, edited per round (a new tree: no action-cache
/// hit, and another workspace's sources).
fn a_source_file(workspace: &Path) -> std::path::PathBuf {
    ["cli/src/main.rs", "src/main.rs", "src/lib.rs"]
        .iter()
        .map(|f| workspace.join(f))
        .find(|p| p.exists())
        .expect("the fixture has a main.rs or lib.rs")
}

fn edit(workspace: &Path, text: &str) {
    let path = a_source_file(workspace);
    let mut old = std::fs::read_to_string(&path).unwrap();
    old.push_str(&format!("\n// {text}\n"));
    std::fs::write(path, old).unwrap();
}

struct Node {
    executor: Executor,
    cas: Cas,
}

impl Node {
    fn new(dir: &Path, shared_units: bool) -> Node {
        let cas = Cas::open(dir.join("cas"), StoreConfig::default()).unwrap();
        let mut config = ExecutorConfig::new(dir.join("executor")).unwrap();
        config.workers = 1;
        config.shared_units = shared_units;
        let executor = Executor::new(cas.clone(), config).unwrap();
        Node { executor, cas }
    }

    /// Runs `kind` on `workspace`: wall time and how many crates cargo compiled.
    fn run(
        &self,
        runtime: &Runtime,
        kind: JobKind,
        workspace: &Path,
        identity: &str,
        tenant: Tenant,
    ) -> (Duration, usize) {
        runtime.block_on(async {
            let started = Instant::now();
            let root = common::hash_dir(&self.cas, workspace, DigestFunction::Blake3).await;
            let handle = self
                .executor
                .submit_cargo(&CargoJob::new(kind), root, identity, tenant)
                .await
                .unwrap();
            let outcome = handle.wait().await;
            let took = started.elapsed();
            // Shared units are stored after the job (the client does not wait for them): not
            // timed, but done before anything else is measured.
            self.executor.units_published().await;
            let lines = common::log_lines(&handle).await;
            if outcome.status != JobStatus::Success {
                for line in &lines {
                    eprintln!("{line}");
                }
                panic!("{kind:?} failed: {:?}", outcome.error);
            }
            let compiled = lines
                .iter()
                .filter(|l| strip_ansi(l).trim_start().starts_with("Compiling "))
                .count();
            let steps: Vec<String> = outcome
                .steps
                .iter()
                .map(|(name, took)| format!("{name} {:.3}s", took.as_secs_f64()))
                .collect();
            eprintln!("  {identity}: {compiled} compiled; {}", steps.join(", "));
            (took, compiled)
        })
    }
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ratio_line(figure: &str, measured: Duration, against: &str, base: Duration, goal: f64) {
    let ratio = measured.as_secs_f64() / base.as_secs_f64().max(1e-9);
    println!(
        "{figure:<44} {:>8.3}s  {against:<28} {:>8.3}s  ratio {ratio:>6.3}  (goal <= {goal})",
        measured.as_secs_f64(),
        base.as_secs_f64()
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for the list; nothing to list.
    }
    let fixture = std::env::var("RBA_BENCH_FIXTURE").unwrap_or_else(|_| "midsize".into());
    let rounds: usize = std::env::var("RBA_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let scratch = tempfile::tempdir().unwrap();
    let runtime = Runtime::new().unwrap();
    let local_ws = scratch.path().join("local");
    common::copy_dir(&common::fixture(&fixture), &local_ws);
    common::local_cargo(&local_ws, &scratch.path().join("t"), &["fetch", "--locked"]);

    let mut local_cold = Vec::new();
    let mut node_cold = Vec::new();
    let mut publishing_cold = Vec::new();
    let mut warm_start = Vec::new();
    let mut published = Vec::new();
    for round in 0..rounds {
        // Local: a fresh target dir, warm registry.
        edit(&local_ws, &format!("local round {round}"));
        let target = scratch.path().join(format!("local-target-{round}"));
        local_cold.push(common::local_cargo(
            &local_ws,
            &target,
            &["build", "--locked", "--offline"],
        ));
        let _ = std::fs::remove_dir_all(&target);

        // The node without shared units: its cold build (registry warmed first, untimed).
        let dir = scratch.path().join(format!("off-{round}"));
        let off = Node::new(&dir, false);
        let ws = dir.join("workspace");
        common::copy_dir(&common::fixture(&fixture), &ws);
        off.run(&runtime, JobKind::Fmt, &ws, "warm", Tenant::local());
        edit(&ws, &format!("off round {round}"));
        node_cold.push(
            off.run(&runtime, JobKind::Build, &ws, "cold", Tenant::local())
                .0,
        );
        drop(off);
        let _ = std::fs::remove_dir_all(&dir);

        // The node with shared units: a cold build that finds nothing and publishes, then a new
        // workspace of another tenant.
        let dir = scratch.path().join(format!("on-{round}"));
        let on = Node::new(&dir, true);
        let first = dir.join("first");
        common::copy_dir(&common::fixture(&fixture), &first);
        on.run(&runtime, JobKind::Fmt, &first, "warm", Tenant::local());
        edit(&first, &format!("first round {round}"));
        let alice = Tenant::peer("alice");
        publishing_cold.push(
            on.run(&runtime, JobKind::Build, &first, "alice:/first", alice)
                .0,
        );
        published.push(on.executor.shared_units().stats());
        let second = dir.join("second");
        common::copy_dir(&common::fixture(&fixture), &second);
        edit(&second, &format!("another workspace, round {round}"));
        let bob = Tenant::peer("bob");
        warm_start.push(
            on.run(&runtime, JobKind::Build, &second, "bob:/second", bob)
                .0,
        );
        drop(on);
        let _ = std::fs::remove_dir_all(&dir);
    }
    let (local_cold, node_cold) = (median(local_cold), median(node_cold));
    let warm_start = median(warm_start);
    println!("shared units, fixture {fixture}, median of {rounds} rounds");
    ratio_line(
        "warm start of a new workspace",
        warm_start,
        "vs cold local cargo build",
        local_cold,
        0.2,
    );
    ratio_line(
        "warm start of a new workspace",
        warm_start,
        "vs the node's cold build",
        node_cold,
        0.2,
    );
    ratio_line(
        "cold build publishing (nothing to share)",
        median(publishing_cold),
        "vs without shared units",
        node_cold,
        1.03,
    );
    let stats = published[published.len() / 2];
    println!(
        "{:<44} {} units, {} bytes ({:.1} MiB)",
        "stored per shared unit set",
        stats.units,
        stats.bytes,
        stats.bytes as f64 / (1 << 20) as f64
    );
}
