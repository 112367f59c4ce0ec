//! Per-job limits on the real sandbox and the real executor: memory and processes of a whole
//! job (its cgroup), disk of its target dir (the slot volume), limits asked by the client and
//! capped by the node, and each limit named in the job's outcome. Needs `.ci/setup` (uidmap,
//! subuid entries), root and writable cgroup v1 `memory`/`pids` (or delegated v2) hierarchies.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Harness, hash_dir};
use rba_cas::DigestFunction;
use rba_executor::action::{sorted_platform, store_action};
use rba_executor::cargo::{CargoJob, JobKind};
use rba_executor::quota::DiskQuota;
use rba_executor::runner::{ExecuteRequest, ExecutorError, JobLimits, JobOutcome, JobStatus};
use rba_executor::sandbox::{
    LimitKind, Limits, OutputLine, Sandbox, SandboxConfig, SandboxOutcome, SandboxSpec,
};
use rba_proto::reapi::Command;

struct Fixture {
    sandbox: Sandbox,
    _scratch: tempfile::TempDir,
}

fn sandbox_with(configure: impl FnOnce(&mut SandboxConfig)) -> Fixture {
    let scratch = tempfile::tempdir().unwrap();
    let mut config = SandboxConfig::with_host_toolchain().unwrap();
    config.scratch_dir = scratch.path().to_path_buf();
    config.isolation = common::isolation();
    configure(&mut config);
    Fixture {
        sandbox: Sandbox::new(config).unwrap(),
        _scratch: scratch,
    }
}

async fn run(fx: &Fixture, spec: SandboxSpec) -> (Vec<OutputLine>, SandboxOutcome) {
    let mut lines = Vec::new();
    let outcome = fx.sandbox.run(spec, |line| lines.push(line)).await.unwrap();
    (lines, outcome)
}

fn limits(memory: Option<u64>, processes: Option<u64>) -> Limits {
    Limits {
        memory_bytes: memory,
        max_processes: processes,
        wall_time: Some(Duration::from_secs(60)),
        ..Limits::default()
    }
}

/// Host processes whose command line contains `needle`.
fn processes_with(needle: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .count()
}

#[tokio::test]
async fn four_processes_together_exceed_the_memory_limit() {
    assert!(
        rba_executor::cgroup::available().is_some(),
        "this host must have usable cgroups"
    );
    let fx = sandbox_with(|_| {});
    // Each process touches 96 MiB and holds it; the job may have 256 MiB: each alone fits,
    // four together do not.
    let script = r#"
        pids=""
        for i in 1 2 3 4; do
          python3 -c 'import time; b = b"x" * (96 << 20); print("holding", flush=True); time.sleep(4)' &
          pids="$pids $!"
        done
        failed=0
        for p in $pids; do wait $p || failed=1; done
        exit $failed
    "#;
    let started = Instant::now();
    let (lines, outcome) = run(
        &fx,
        SandboxSpec::new(["bash", "-c", script]).limits(limits(Some(256 << 20), Some(64))),
    )
    .await;
    assert!(!outcome.success(), "{outcome:?} {lines:?}");
    assert_eq!(outcome.limit, Some(LimitKind::Memory), "{outcome:?}");
    let report = outcome.cgroup.expect("ran in a cgroup");
    assert!(report.oom_kills >= 1, "{report:?}");
    assert!(report.memory_peak <= 256 << 20, "{report:?}");
    assert!(started.elapsed() < Duration::from_secs(30));

    // The same four processes with room for them: no limit named, and nothing left behind.
    let (lines, outcome) = run(
        &fx,
        SandboxSpec::new([
            "bash",
            "-c",
            &script.replace("time.sleep(4)", "time.sleep(1)"),
        ])
        .limits(limits(Some(1 << 30), Some(64))),
    )
    .await;
    assert!(outcome.success(), "{outcome:?} {lines:?}");
    assert_eq!(outcome.limit, None);
}

#[tokio::test]
async fn a_fork_bomb_stays_within_the_process_limit() {
    let fx = sandbox_with(|_| {});
    let marker = format!("rba-limits-forkbomb-{}", std::process::id());
    let sampler_marker = marker.clone();
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let keep_sampling = sampling.clone();
    // Counts the bomb's processes on the host while it runs.
    let sampler = std::thread::spawn(move || {
        let mut most = 0;
        while keep_sampling.load(std::sync::atomic::Ordering::SeqCst) {
            most = most.max(processes_with(&sampler_marker));
            std::thread::sleep(Duration::from_millis(20));
        }
        most
    });
    let (_lines, outcome) = run(
        &fx,
        SandboxSpec::new(["bash", "-c", "b() { b | b & }; b; sleep 3; exit 1", &marker])
            .limits(limits(Some(1 << 30), Some(48))),
    )
    .await;
    sampling.store(false, std::sync::atomic::Ordering::SeqCst);
    let most = sampler.join().unwrap();
    let report = outcome.cgroup.expect("ran in a cgroup");
    assert!(most > 1, "the bomb ran ({most} processes seen)");
    assert!(most <= 48, "{most} host processes of one job limited to 48");
    assert!(report.pids_peak <= 48, "{report:?}");
    assert!(report.pids_max_hits > 0, "{report:?}");
    assert_eq!(outcome.limit, Some(LimitKind::Processes), "{outcome:?}");
    assert_eq!(processes_with(&marker), 0);
    // The next job is unaffected.
    let (lines, outcome) = run(
        &fx,
        SandboxSpec::new(["sh", "-c", "echo fine"]).limits(limits(None, Some(48))),
    )
    .await;
    assert!(outcome.success(), "{outcome:?}");
    assert_eq!(lines[0].line, "fine");
}

#[tokio::test]
async fn without_cgroups_the_rlimits_remain_and_the_outcome_says_so() {
    let fx = sandbox_with(|config| config.cgroups = false);
    let (_, outcome) = run(
        &fx,
        SandboxSpec::new(["python3", "-c", "b = b'x' * (600 << 20)"])
            .limits(limits(Some(256 << 20), Some(64))),
    )
    .await;
    assert!(!outcome.success(), "{outcome:?}");
    assert_eq!(outcome.cgroup, None);
}

/// A crate whose build script writes `bytes` into OUT_DIR (in the target dir).
fn crate_writing(bytes: u64, files: u32) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("src")).unwrap();
    std::fs::write(
        root.join("Cargo.toml"),
        "[package]\nname = \"writer\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n",
    )
    .unwrap();
    std::fs::write(root.join("src/main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(
        root.join("build.rs"),
        format!(
            r#"use std::io::Write;
fn main() {{
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let mut f = std::fs::File::create(out.join("big")).unwrap();
    let chunk = vec![7u8; 1 << 20];
    for _ in 0..({bytes}u64 >> 20) {{
        f.write_all(&chunk).expect("writing big");
    }}
    for i in 0..{files}u32 {{
        std::fs::write(out.join(format!("f{{i}}")), b"x").expect("writing small files");
    }}
}}
"#
        ),
    )
    .unwrap();
    let status = std::process::Command::new("cargo")
        .args(["generate-lockfile", "--offline", "-q"])
        .current_dir(root)
        .status()
        .unwrap();
    assert!(status.success());
    dir
}

async fn build_with(
    harness: &Harness,
    source: &Path,
    limits: JobLimits,
) -> (Arc<JobOutcome>, String) {
    let root = hash_dir(&harness.cas, source, DigestFunction::Blake3).await;
    let handle = harness
        .executor
        .submit_cargo_with_limits(
            &CargoJob::new(JobKind::Build),
            root,
            "disk-slot",
            rba_executor::tenant::Tenant::local(),
            limits,
        )
        .await
        .unwrap();
    let outcome = handle.wait().await;
    let lines = common::log_lines(&handle).await;
    (outcome, lines.join("\n"))
}

/// Mounts below `dir` (the executor's data dir).
fn mounts_below(dir: &Path) -> usize {
    let dir = dir.canonicalize().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m).starts_with(&dir))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writing_past_the_disk_limit_names_it_and_the_slot_serves_the_next_job() {
    let data = tempfile::tempdir().unwrap();
    let harness = Harness::new(|config| {
        config.data_dir = data.path().to_path_buf();
        config.sandbox.scratch_dir = data.path().join("sandbox-scratch");
        config.limits.wall_time = Some(Duration::from_secs(300));
        config.slot_disk = Some(DiskQuota {
            bytes: 512 << 20,
            inodes: 4096,
        });
    });
    let asked = JobLimits {
        disk_bytes: Some(48 << 20),
        ..JobLimits::default()
    };

    // 96 MiB into a job allowed 48 MiB more: ENOSPC, named.
    let big = crate_writing(96 << 20, 0);
    let (outcome, log) = build_with(&harness, big.path(), asked).await;
    assert_eq!(outcome.status, JobStatus::Failed, "{log}");
    assert!(
        outcome.error.as_deref() == Some("disk limit reached"),
        "{:?}\n{log}",
        outcome.error
    );
    assert_eq!(mounts_below(data.path()), 1, "one slot volume");

    // More files than the volume has inodes: named the same way.
    let many = crate_writing(0, 6000);
    let (outcome, log) = build_with(&harness, many.path(), JobLimits::default()).await;
    assert_eq!(outcome.status, JobStatus::Failed, "{log}");
    assert_eq!(
        outcome.error.as_deref(),
        Some("disk limit reached"),
        "{log}"
    );

    // The next job in the same slot (same volume) builds: the allowance was given back.
    let small = crate_writing(4 << 20, 10);
    let (outcome, log) = build_with(&harness, small.path(), asked).await;
    assert_eq!(outcome.status, JobStatus::Success, "{log}");

    // Shut-down unmounts the volume: when the executor's last clone goes, which a job's task
    // may hold for a moment after its outcome was published.
    drop(harness);
    let deadline = Instant::now() + Duration::from_secs(10);
    while mounts_below(data.path()) != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(mounts_below(data.path()), 0);
}

fn command_action(harness: &Harness, script: &str, properties: &[(&str, &str)]) -> rba_cas::Digest {
    let command = Command {
        arguments: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    };
    let input = tempfile::tempdir().unwrap();
    let blobs = harness.cas.blobs.clone();
    let root = rba_cas::merkle::build_from_dir(
        &blobs,
        input.path(),
        DigestFunction::Sha256,
        &Default::default(),
    )
    .unwrap()
    .root;
    store_action(
        command,
        root,
        sorted_platform(properties.iter().copied()),
        &blobs,
        DigestFunction::Sha256,
    )
    .unwrap()
    .action_digest
}

fn request(action: rba_cas::Digest, limits: JobLimits) -> ExecuteRequest {
    ExecuteRequest {
        instance: "main".into(),
        action_digest: action,
        skip_cache_lookup: true,
        workspace_identity: None,
        tenant: rba_executor::tenant::Tenant::local(),
        limits,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_limits_come_from_platform_properties_and_are_capped_by_the_node() {
    let harness = Harness::new(|config| {
        config.limits.wall_time = Some(Duration::from_secs(3));
        config.limits.memory_bytes = Some(1 << 30);
    });
    // The client asks for more time than the node allows: the node's 3 s apply.
    let forever = command_action(&harness, "sleep 60", &[("rba-timeout", "600")]);
    let started = Instant::now();
    let outcome = harness
        .executor
        .submit(request(forever, JobLimits::default()))
        .await
        .unwrap()
        .wait()
        .await;
    assert!(outcome.timed_out, "{outcome:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(
        outcome
            .error
            .as_deref()
            .unwrap_or_default()
            .starts_with("wall-clock time limit reached"),
        "{:?}",
        outcome.error
    );

    // A platform property lowers the memory: 128 MiB is not enough for 300 MiB.
    let hungry = command_action(
        &harness,
        "python3 -c 'b = b\"x\" * (300 << 20)'",
        &[("rba-memory", "128M")],
    );
    let outcome = harness
        .executor
        .submit(request(hungry, JobLimits::default()))
        .await
        .unwrap()
        .wait()
        .await;
    assert_eq!(outcome.status, JobStatus::Failed);
    assert_eq!(outcome.error.as_deref(), Some("memory limit reached"));

    // The request's own limits, the same way (the tighter of request and platform applies).
    let fits = command_action(&harness, "python3 -c 'b = b\"x\" * (300 << 20)'", &[]);
    let outcome = harness
        .executor
        .submit(request(
            fits,
            JobLimits {
                memory_bytes: Some(128 << 20),
                ..JobLimits::default()
            },
        ))
        .await
        .unwrap()
        .wait()
        .await;
    assert_eq!(outcome.error.as_deref(), Some("memory limit reached"));
    let outcome = harness
        .executor
        .submit(request(fits, JobLimits::default()))
        .await
        .unwrap()
        .wait()
        .await;
    assert_eq!(outcome.status, JobStatus::Success, "{outcome:?}");

    // Nonsense limits are refused before they become a job, naming the property.
    for (name, value) in [
        ("rba-memory", "lots"),
        ("rba-processes", "0"),
        ("rba-timeout", "-5"),
        ("rba-disk", "12X"),
    ] {
        let bad = command_action(&harness, "true", &[(name, value)]);
        let err = harness
            .executor
            .submit(request(bad, JobLimits::default()))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ExecutorError::Action(_)) && err.to_string().contains(name),
            "{name}={value}: {err}"
        );
    }
}

#[test]
fn sizes_and_counts_parse_strictly() {
    use rba_executor::runner::{parse_count, parse_size};
    assert_eq!(parse_size("1048576"), Ok(1 << 20));
    assert_eq!(parse_size("512M"), Ok(512 << 20));
    assert_eq!(parse_size("2G"), Ok(2 << 30));
    assert_eq!(parse_size("2GiB"), Ok(2 << 30));
    assert_eq!(parse_size("1.5k"), Ok(1536));
    for bad in ["", "0", "-1G", "G", "1Q", "nan", "inf", "1e30T"] {
        assert!(parse_size(bad).is_err(), "{bad}");
    }
    assert_eq!(parse_count("12"), Ok(12));
    for bad in ["0", "-3", "1.5", "x", ""] {
        assert!(parse_count(bad).is_err(), "{bad}");
    }
}

/// A REAPI action's exec root lives on a size-capped exec volume when the node limits disk
/// (before, it was a plain directory on the executor's disk: one action could fill the disk
/// every tenant's store and jobs share; here 100 MB go into a 64 MiB volume). Bytes or inodes
/// past the volume are the action's "disk limit reached"; the volume is cleared and serves the next action; shut-down
/// unmounts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_writing_past_the_disk_limit_names_it_and_the_next_action_runs() {
    let data = tempfile::tempdir().unwrap();
    let harness = Harness::new(|config| {
        config.data_dir = data.path().to_path_buf();
        config.sandbox.scratch_dir = data.path().join("sandbox-scratch");
        config.slot_disk = Some(DiskQuota {
            bytes: 64 << 20,
            inodes: 2048,
        });
    });
    let run = |script: &str| {
        let action = command_action(&harness, script, &[]);
        let executor = harness.executor.clone();
        async move {
            executor
                .submit(request(action, JobLimits::default()))
                .await
                .unwrap()
                .wait()
                .await
        }
    };

    let outcome = run("head -c 100000000 /dev/zero > big").await;
    assert_eq!(outcome.status, JobStatus::Failed, "{outcome:?}");
    assert_eq!(outcome.error.as_deref(), Some("disk limit reached"));
    assert_eq!(mounts_below(data.path()), 1, "one exec volume");
    let outcome = run("i=0; while [ $i -lt 4000 ]; do : > f$i; i=$((i+1)); done").await;
    assert_eq!(outcome.status, JobStatus::Failed, "{outcome:?}");
    assert_eq!(outcome.error.as_deref(), Some("disk limit reached"));

    // Nothing of the two is left for the next action, which runs in the same volume.
    let outcome = run("test ! -e big && test ! -e f1 && head -c 1000000 /dev/zero > small").await;
    assert_eq!(outcome.status, JobStatus::Success, "{outcome:?}");
    assert_eq!(mounts_below(data.path()), 1, "the volume was reused");

    drop(harness);
    let deadline = Instant::now() + Duration::from_secs(10);
    while mounts_below(data.path()) != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(mounts_below(data.path()), 0);
}
