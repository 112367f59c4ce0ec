//! What the sandbox and its limits cost a job, apart from the job: a no-op job's start and stop
//! in the real sandbox with its own cgroup and without one (rlimits only), and the per-job cost
//! of the limits themselves (a cgroup created, entered, left and removed; a disk allowance
//! reserved and given back in a slot volume).
//!
//! `cargo bench -p rba-executor --bench sandbox_overhead` prints one `sandbox_overhead …` line
//! per figure (means over `RBA_BENCH_ROUNDS` jobs, default 20). `RBA_TEST_ISOLATION` picks the
//! isolation provider as in the tests. Needs `.ci/setup`, root and usable cgroups.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use rba_executor::cgroup::{CgroupLimits, JobCgroup};
use rba_executor::quota::{Allowance, DiskQuota, mount_slot_volume, unmount_under};
use rba_executor::sandbox::{Limits, Sandbox, SandboxConfig, SandboxSpec};

fn rounds() -> u32 {
    std::env::var("RBA_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

fn sandbox(cgroups: bool, scratch: &std::path::Path) -> Sandbox {
    let mut config = SandboxConfig::with_host_toolchain().expect("host toolchain");
    config.scratch_dir = scratch.to_path_buf();
    config.isolation = common::isolation();
    config.cgroups = cgroups;
    Sandbox::new(config).expect("sandbox")
}

/// Mean start+stop of a no-op job (`true`) with 1 GiB and 64 processes.
async fn no_op_job(cgroups: bool, n: u32) -> Duration {
    let scratch = tempfile::tempdir().unwrap();
    let sandbox = sandbox(cgroups, scratch.path());
    let spec = SandboxSpec::new(["true"]).limits(Limits {
        memory_bytes: Some(1 << 30),
        max_processes: Some(64),
        wall_time: Some(Duration::from_secs(60)),
        ..Limits::default()
    });
    let mut started = Instant::now();
    for round in 0..=n {
        if round == 1 {
            started = Instant::now(); // round 0 warms up
        }
        let outcome = sandbox
            .run(spec.clone(), |_| {})
            .await
            .expect("sandbox run");
        assert!(outcome.success(), "a no-op job failed: {outcome:?}");
        assert_eq!(outcome.cgroup.is_some(), cgroups, "{outcome:?}");
    }
    started.elapsed() / n
}

fn cgroup_cost(n: u32) -> Duration {
    let hierarchy = rba_executor::cgroup::available().expect("usable cgroups");
    let started = Instant::now();
    for _ in 0..n {
        let limits = CgroupLimits {
            memory_bytes: Some(1 << 30),
            max_processes: Some(64),
        };
        let cgroup = JobCgroup::create(hierarchy, limits).expect("cgroup");
        drop(cgroup.enter().expect("enter cgroup"));
        let _ = cgroup.report();
    }
    started.elapsed() / n
}

fn disk_allowance_cost(n: u32) -> Duration {
    let slot = tempfile::tempdir().unwrap();
    let quota = DiskQuota {
        bytes: 1 << 30,
        inodes: 10_000,
    };
    mount_slot_volume(slot.path(), quota).expect("slot volume");
    let started = Instant::now();
    for _ in 0..n {
        // What a job with a disk limit pays: the mount check and its allowance.
        let volume = mount_slot_volume(slot.path(), quota).expect("slot volume");
        drop(Allowance::reserve(&volume, 64 << 20).expect("allowance"));
    }
    let cost = started.elapsed() / n;
    unmount_under(slot.path()).expect("unmount the slot volume");
    cost
}

#[tokio::main]
async fn main() {
    let n = rounds();
    let with = no_op_job(true, n).await;
    let without = no_op_job(false, n).await;
    println!("sandbox_overhead no-op job start+stop: {with:?} with a cgroup, {without:?} without");
    println!(
        "sandbox_overhead per job: cgroup {:?}, disk allowance {:?}",
        cgroup_cost(n),
        disk_allowance_cost(n)
    );
}
