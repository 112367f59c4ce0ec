//! The sandbox against real hostile jobs (no mocks). Needs root or a user with subordinate ids,
//! and `.ci/setup.d/sandbox.sh` to have run.
//!
//! Tests run one at a time (a shared lock): each checks that its job left no container root dir
//! and no process behind, which is only exact when no other job of this file runs meanwhile.

mod common;

use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rba_executor::isolation::Isolation;
use rba_executor::sandbox::{
    ExitKind, KillReason, LimitKind, Limits, Mount, NetworkPolicy, OutputLine, Sandbox,
    SandboxConfig, SandboxError, SandboxOutcome, SandboxSpec, Stream,
};
use tempfile::TempDir;
use tokio::sync::{Mutex, MutexGuard};

static SERIAL: Mutex<()> = Mutex::const_new(());

/// One test's sandbox, with its own scratch dir so leftovers can be checked exactly.
struct Fixture {
    sandbox: Sandbox,
    scratch: TempDir,
    _serial: MutexGuard<'static, ()>,
}

async fn fixture() -> Fixture {
    let serial = SERIAL.lock().await;
    let scratch = tempfile::Builder::new()
        .prefix("rba-sandbox-test-")
        .tempdir()
        .unwrap();
    let config = SandboxConfig {
        scratch_dir: scratch.path().to_path_buf(),
        isolation: common::isolation(),
        ..SandboxConfig::with_host_toolchain().expect("rustc in PATH")
    };
    let sandbox = Sandbox::new(config).expect("sandbox prerequisites (.ci/setup.d/sandbox.sh)");
    Fixture {
        sandbox,
        scratch,
        _serial: serial,
    }
}

impl Fixture {
    async fn run(&self, spec: SandboxSpec) -> (Vec<OutputLine>, SandboxOutcome) {
        let mut lines = Vec::new();
        let outcome = self
            .sandbox
            .run(spec, |l| lines.push(l))
            .await
            .expect("sandbox runs");
        self.assert_clean();
        (lines, outcome)
    }

    /// No container root dir is left behind.
    fn assert_clean(&self) {
        let left: Vec<_> = std::fs::read_dir(self.scratch.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(left.is_empty(), "left in scratch dir: {left:?}");
    }

    /// A normal job still works (run after every hostile one).
    async fn assert_healthy(&self) {
        let (lines, outcome) = self
            .run(SandboxSpec::new(["sh", "-c", "echo healthy; id -u"]).limits(quick()))
            .await;
        assert!(outcome.success(), "{outcome:?} {lines:?}");
        assert_eq!(text(&lines, Stream::Stdout), ["healthy", "1000"]);
    }
}

fn quick() -> Limits {
    Limits {
        wall_time: Some(Duration::from_secs(30)),
        ..Limits::default()
    }
}

fn text(lines: &[OutputLine], stream: Stream) -> Vec<&str> {
    lines
        .iter()
        .filter(|l| l.stream == stream)
        .map(|l| l.line.as_str())
        .collect()
}

/// A temp dir the sandbox user may read (tempfile makes 0700 dirs).
fn readable_tempdir() -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Host processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            if !name.bytes().all(|b| b.is_ascii_digit()) || name == me {
                return None;
            }
            let cmdline = std::fs::read(format!("/proc/{name}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline
                .contains(needle)
                .then(|| format!("{name}: {cmdline}"))
        })
        .collect()
}

#[tokio::test]
async fn streams_stdout_and_stderr_and_propagates_exit_code() {
    let fx = fixture().await;
    let (lines, outcome) = fx
        .run(
            SandboxSpec::new(["sh", "-c", "echo out; echo err >&2; echo out2; exit 3"])
                .limits(quick()),
        )
        .await;
    assert_eq!(text(&lines, Stream::Stdout), ["out", "out2"]);
    assert_eq!(text(&lines, Stream::Stderr), ["err"]);
    assert_eq!(outcome.exit, ExitKind::Exited(3));
    assert!(!outcome.success());
    assert_eq!(outcome.killed, None);
    assert_eq!(outcome.log_bytes, 13);
    assert!(!outcome.log_truncated);
    // bubblewrap's init reaps the program out of this process's sight: no CPU time there.
    if common::isolation() == Isolation::Namespaces {
        assert!(outcome.usage.is_some());
    }
}

#[tokio::test]
async fn lines_arrive_while_the_job_runs() {
    let fx = fixture().await;
    let mut running = fx
        .sandbox
        .spawn(SandboxSpec::new(["sh", "-c", "echo first; sleep 1; echo second"]).limits(quick()))
        .await
        .unwrap();
    let first = running.output.recv().await.unwrap();
    let first_at = Instant::now();
    assert_eq!(first.line, "first");
    let second = running.output.recv().await.unwrap();
    assert_eq!(second.line, "second");
    assert!(
        first_at.elapsed() >= Duration::from_millis(700),
        "lines were not streamed as produced"
    );
    assert!(running.wait().await.unwrap().success());
    fx.assert_clean();
}

#[tokio::test]
async fn environment_and_view_are_fixed() {
    let fx = fixture().await;
    let ws = readable_tempdir();
    let target = tempfile::tempdir().unwrap();
    let spec = SandboxSpec::new([
        "sh",
        "-c",
        "pwd; id -un; echo $HOME $CARGO_HOME $CARGO_TARGET_DIR ${RUSTUP_TOOLCHAIN:-unset}; \
         echo $PATH; cat /proc/sys/kernel/hostname; ls /; ls /proc | grep -c '^[0-9]'",
    ])
    .workspace(ws.path())
    .target_dir(target.path())
    .limits(quick());
    let (lines, outcome) = fx.run(spec).await;
    assert!(outcome.success(), "{lines:?}");
    let out = text(&lines, Stream::Stdout);
    assert_eq!(out[0], "/workspace");
    assert_eq!(out[1], "build");
    assert_eq!(out[2], "/tmp /cargo /target unset");
    assert!(out[3].starts_with("/toolchain/bin:"), "{}", out[3]);
    assert_eq!(out[4], "sandbox");
    assert!(!out.contains(&"root") && !out.contains(&"home"), "{out:?}");
    // Only the job's own processes are visible: sh, ls, grep.
    let procs: u32 = out.last().unwrap().parse().unwrap();
    assert!(procs <= 4, "sees {procs} processes");
}

#[tokio::test]
async fn cargo_builds_a_crate_with_the_mounted_toolchain() {
    let fx = fixture().await;
    let ws = readable_tempdir();
    std::fs::write(
        ws.path().join("Cargo.toml"),
        "[package]\nname = \"hello\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    )
    .unwrap();
    std::fs::write(
        ws.path().join("Cargo.lock"),
        "# This file is automatically @generated by Cargo.\n# It is not intended for manual editing.\n\
         version = 4\n\n[[package]]\nname = \"hello\"\nversion = \"0.1.0\"\n",
    )
    .unwrap();
    std::fs::create_dir(ws.path().join("src")).unwrap();
    std::fs::write(
        ws.path().join("src/main.rs"),
        "fn main() { println!(\"hello from the sandbox\"); }\n",
    )
    .unwrap();
    for p in [ws.path().join("src"), ws.path().join("src/main.rs")] {
        let mode = if p.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let target = tempfile::tempdir().unwrap();
    let cargo_home = readable_tempdir();

    let spec = SandboxSpec::new(["cargo", "build", "--offline", "--locked"])
        .workspace(ws.path())
        .target_dir(target.path())
        .cargo_home(cargo_home.path(), false)
        .limits(Limits {
            wall_time: Some(Duration::from_secs(120)),
            ..Limits::default()
        });
    let (lines, outcome) = fx.run(spec).await;
    assert!(outcome.success(), "{outcome:?}\n{lines:#?}");
    let binary = target.path().join("debug/hello");
    assert!(binary.is_file(), "{lines:#?}");
    assert_eq!(std::fs::metadata(&binary).unwrap().uid(), 65534);
    // The sources were not touched.
    assert!(!ws.path().join("target").exists());

    // And the result runs in the next job, from /target.
    let (lines, outcome) = fx
        .run(
            SandboxSpec::new(["/target/debug/hello"])
                .target_dir(target.path())
                .limits(quick()),
        )
        .await;
    assert!(outcome.success());
    assert_eq!(text(&lines, Stream::Stdout), ["hello from the sandbox"]);
}

#[tokio::test]
async fn host_secrets_are_unreadable() {
    let fx = fixture().await;
    let secret = PathBuf::from(format!("/root/rba-sandbox-secret-{}", std::process::id()));
    /// Removes the secret even when an assertion fails.
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _cleanup = Remove(secret.clone());
    std::fs::write(&secret, "hunter2\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A root-only file inside a directory the job can see.
    let ws = readable_tempdir();
    let inner = ws.path().join("private-key");
    std::fs::write(&inner, "hunter3\n").unwrap();
    std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600)).unwrap();

    let script = format!(
        "cat {0} && echo LEAK1; ls /root && echo LEAK2; cat /workspace/private-key && echo LEAK3; \
         cat /etc/shadow && echo LEAK4; unshare -Ur true && echo LEAK5; exit 0",
        secret.display()
    );
    let (lines, outcome) = fx
        .run(
            SandboxSpec::new(["sh", "-c", &script])
                .workspace(ws.path())
                .limits(quick()),
        )
        .await;
    assert!(outcome.success(), "{outcome:?}");
    let out = text(&lines, Stream::Stdout);
    assert!(
        !out.iter()
            .any(|l| l.contains("LEAK") || l.contains("hunter")),
        "{lines:#?}"
    );
    let err = text(&lines, Stream::Stderr).join("\n");
    assert!(
        err.contains("No such file") && err.contains("Permission denied"),
        "{err}"
    );
    fx.assert_healthy().await;
}

#[tokio::test]
async fn writes_outside_its_dirs_fail() {
    let fx = fixture().await;
    let ws = readable_tempdir();
    std::fs::write(ws.path().join("lib.rs"), "// original\n").unwrap();
    std::fs::set_permissions(
        ws.path().join("lib.rs"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let target = tempfile::tempdir().unwrap();
    let marker = format!("rba-sandbox-write-{}", std::process::id());
    let script = format!(
        "for p in /workspace/new /workspace/lib.rs /usr/{marker} /{marker} /etc/{marker} \
         /toolchain/{marker} /proc/{marker}; do (echo x > $p) 2>/dev/null && echo WROTE $p; done; \
         echo ok > /target/out && echo ok > /tmp/scratch && echo wrote-allowed"
    );
    let (lines, outcome) = fx
        .run(
            SandboxSpec::new(["sh", "-c", &script])
                .workspace(ws.path())
                .target_dir(target.path())
                .limits(quick()),
        )
        .await;
    assert!(outcome.success(), "{outcome:?} {lines:#?}");
    assert_eq!(
        text(&lines, Stream::Stdout),
        ["wrote-allowed"],
        "{lines:#?}"
    );
    assert_eq!(
        std::fs::read_to_string(ws.path().join("lib.rs")).unwrap(),
        "// original\n"
    );
    assert!(!ws.path().join("new").exists());
    assert!(!Path::new("/usr").join(&marker).exists());
    assert!(!Path::new("/").join(&marker).exists());
    assert_eq!(
        std::fs::read_to_string(target.path().join("out")).unwrap(),
        "ok\n"
    );
    fx.assert_healthy().await;
}

#[tokio::test]
async fn network_is_off_unless_host_policy() {
    let fx = fixture().await;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = format!("echo hi > /dev/tcp/127.0.0.1/{port} && echo connected");

    let (lines, outcome) = fx
        .run(SandboxSpec::new(["bash", "-c", &script]).limits(quick()))
        .await;
    assert_eq!(outcome.exit, ExitKind::Exited(1), "{lines:#?}");
    assert!(!text(&lines, Stream::Stdout).contains(&"connected"));
    assert_eq!(
        listener.accept().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "the listener saw a connection"
    );
    fx.assert_healthy().await;

    // The fetch phase shares the host network.
    let (lines, outcome) = fx
        .run(
            SandboxSpec::new(["bash", "-c", &script])
                .network(NetworkPolicy::Host)
                .limits(quick()),
        )
        .await;
    assert!(outcome.success(), "{lines:#?}");
    assert_eq!(text(&lines, Stream::Stdout), ["connected"]);
    listener.set_nonblocking(false).unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    let mut got = String::new();
    std::io::Read::read_to_string(&mut conn, &mut got).unwrap();
    assert_eq!(got, "hi\n");
}

#[tokio::test]
async fn fork_bomb_is_contained() {
    let fx = fixture().await;
    let marker = format!("rba-forkbomb-{}", std::process::id());
    let started = Instant::now();
    let (_lines, outcome) = fx
        .run(
            SandboxSpec::new(["bash", "-c", "b() { b | b & }; b; sleep 2", &marker]).limits(
                Limits {
                    max_processes: Some(64),
                    wall_time: Some(Duration::from_secs(10)),
                    ..Limits::default()
                },
            ),
        )
        .await;
    assert!(started.elapsed() < Duration::from_secs(20), "{outcome:?}");
    assert!(
        processes_with(&marker).is_empty(),
        "{:?}",
        processes_with(&marker)
    );
    fx.assert_healthy().await;
}

#[tokio::test]
async fn memory_bomb_is_contained() {
    let fx = fixture().await;
    let limits = Limits {
        memory_bytes: Some(512 << 20),
        wall_time: Some(Duration::from_secs(30)),
        ..Limits::default()
    };
    let (lines, outcome) = fx
        .run(
            SandboxSpec::new(["python3", "-c", "a = b'x' * (2 << 30); print('allocated')"])
                .limits(limits.clone()),
        )
        .await;
    assert!(!outcome.success(), "{outcome:?}");
    assert!(!text(&lines, Stream::Stdout).contains(&"allocated"));
    if outcome.cgroup.is_some() {
        // The job's cgroup: the OOM killer ends it and the outcome names the limit.
        assert_eq!(outcome.limit, Some(LimitKind::Memory), "{outcome:?}");
    } else {
        // The per-process fallback: the allocation fails.
        assert!(
            text(&lines, Stream::Stderr)
                .join("\n")
                .contains("MemoryError"),
            "{lines:#?}"
        );
    }

    // A streaming allocator: tail must buffer an endless line.
    let (_lines, outcome) = fx
        .run(
            SandboxSpec::new(["sh", "-c", "head -c 2G /dev/zero | tail -n 1 >/dev/null"])
                .limits(limits),
        )
        .await;
    assert!(!outcome.success(), "{outcome:?}");
    fx.assert_healthy().await;
}

#[tokio::test]
async fn endless_loop_is_killed_by_the_wall_clock() {
    let fx = fixture().await;
    let marker = format!("rba-loop-{}", std::process::id());
    let started = Instant::now();
    let (_lines, outcome) = fx
        .run(
            SandboxSpec::new(["sh", "-c", "while :; do :; done", &marker]).limits(Limits {
                wall_time: Some(Duration::from_secs(2)),
                ..Limits::default()
            }),
        )
        .await;
    let took = started.elapsed();
    assert_eq!(outcome.killed, Some(KillReason::WallTimeout));
    assert_eq!(outcome.limit, Some(LimitKind::WallTime));
    assert_eq!(outcome.exit, ExitKind::Signaled(9));
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(8),
        "{took:?}"
    );
    assert!(processes_with(&marker).is_empty());
    fx.assert_healthy().await;
}

#[tokio::test]
async fn endless_loop_is_stopped_by_the_cpu_limit() {
    let fx = fixture().await;
    let limits = Limits {
        cpu_time: Some(Duration::from_secs(1)),
        wall_time: Some(Duration::from_secs(60)),
        ..Limits::default()
    };
    // As pid 1 of the sandbox (namespaces): SIGKILL at the hard limit (soft + 1 s); as pid 2
    // (bubblewrap's init is pid 1): SIGXCPU at the soft limit.
    let (_lines, outcome) = fx
        .run(SandboxSpec::new(["sh", "-c", "while :; do :; done"]).limits(limits.clone()))
        .await;
    assert_eq!(outcome.killed, None, "{outcome:?}");
    let signal = match common::isolation() {
        Isolation::Namespaces => 9,
        Isolation::Bubblewrap => 24,
    };
    assert_eq!(outcome.exit, ExitKind::Signaled(signal), "{outcome:?}");
    assert_eq!(outcome.limit, Some(LimitKind::CpuTime), "{outcome:?}");

    // Any other process: SIGXCPU at the soft limit.
    let (lines, outcome) = fx
        .run(
            SandboxSpec::new(["sh", "-c", "sh -c 'while :; do :; done'; echo status=$?"])
                .limits(limits),
        )
        .await;
    assert!(outcome.success());
    assert_eq!(
        text(&lines, Stream::Stdout),
        ["status=152"],
        "128 + SIGXCPU"
    );
    fx.assert_healthy().await;
}

#[tokio::test]
async fn daemons_do_not_outlive_the_job() {
    let fx = fixture().await;
    let (lines, outcome) = fx
        .run(
            SandboxSpec::new([
                "sh",
                "-c",
                "(sleep 3007 &) ; (setsid sleep 3007 &); echo started",
            ])
            .limits(quick()),
        )
        .await;
    assert!(outcome.success());
    assert_eq!(text(&lines, Stream::Stdout), ["started"]);
    assert!(
        processes_with("sleep 3007").is_empty(),
        "{:?}",
        processes_with("sleep 3007")
    );
    fx.assert_healthy().await;
}

#[tokio::test]
async fn endless_output_is_cut_at_the_log_cap() {
    let fx = fixture().await;
    let started = Instant::now();
    let (lines, outcome) = fx
        .run(SandboxSpec::new(["yes", "spam"]).limits(Limits {
            max_log_bytes: Some(100_000),
            wall_time: Some(Duration::from_secs(30)),
            ..Limits::default()
        }))
        .await;
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(outcome.log_truncated);
    assert_eq!(outcome.killed, Some(KillReason::LogLimit));
    assert_eq!(outcome.limit, Some(LimitKind::LogSize));
    assert_eq!(outcome.log_bytes, 100_000);
    let delivered: usize = lines.iter().map(|l| l.line.len() + 1).sum();
    assert!(delivered <= 100_000 + 1, "{delivered}");
    assert!(lines.len() >= 19_999, "{}", lines.len());
    assert!(
        lines
            .iter()
            .all(|l| l.line == "spam" || "spam".starts_with(&l.line))
    );
    fx.assert_healthy().await;
}

#[tokio::test]
async fn a_running_job_can_be_cancelled() {
    let fx = fixture().await;
    let running = fx
        .sandbox
        .spawn(SandboxSpec::new(["sleep", "3011"]).limits(quick()))
        .await
        .unwrap();
    let kill = running.kill_handle();
    tokio::time::sleep(Duration::from_millis(200)).await;
    kill.kill();
    let outcome = running.wait().await.unwrap();
    assert_eq!(outcome.killed, Some(KillReason::Cancelled));
    assert!(processes_with("sleep 3011").is_empty());
    fx.assert_clean();

    // Dropping a running job kills it too.
    let running = fx
        .sandbox
        .spawn(SandboxSpec::new(["sleep", "3012"]).limits(quick()))
        .await
        .unwrap();
    drop(running);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_with("sleep 3012").is_empty()
        || std::fs::read_dir(fx.scratch.path())
            .unwrap()
            .next()
            .is_some()
    {
        assert!(Instant::now() < deadline, "dropped job still running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fx.assert_healthy().await;
}

#[tokio::test]
async fn bad_specs_fail_before_anything_runs() {
    let fx = fixture().await;
    let ws = readable_tempdir();
    let cases = [
        SandboxSpec::new(Vec::<String>::new()),
        SandboxSpec::new(["no-such-program-rba"]),
        SandboxSpec::new(["true"]).mount(Mount::ro("/nonexistent-rba", "/x")),
        SandboxSpec::new(["true"]).mount(Mount::ro(ws.path(), "relative")),
        SandboxSpec::new(["true"]).mount(Mount::ro(ws.path(), "/usr/sneaky")),
        SandboxSpec::new(["true"])
            .workspace(ws.path())
            .mount(Mount::rw(ws.path(), "/workspace/out")),
        SandboxSpec::new(["true"]).mount(Mount::ro(ws.path(), "/etc")),
        SandboxSpec::new(["true"]).cwd("/nowhere"),
    ];
    for spec in cases {
        let err = fx.sandbox.spawn(spec.clone()).await.err();
        assert!(
            matches!(
                err,
                Some(SandboxError::InvalidSpec(_) | SandboxError::Io { .. })
            ),
            "{spec:?} -> {err:?}"
        );
        fx.assert_clean();
    }
    assert!(!Path::new("/usr/sneaky").exists());
    fx.assert_healthy().await;
}

/// A job's environment (a REAPI client chooses it) never steers the host side: a `PATH` naming
/// a directory of planted `setpriv`, `prlimit`, `mount`, `mkdir`, `sh` and `bwrap` runs none
/// of them, and the job still sees its own `PATH`.
#[tokio::test]
async fn the_jobs_path_never_picks_what_the_host_runs() {
    let fx = fixture().await;
    let planted = readable_tempdir();
    let marker = planted.path().join("ran-on-the-host");
    for tool in [
        "setpriv", "prlimit", "mount", "mkdir", "sh", "bwrap", "unshare", "true",
    ] {
        let path = planted.path().join(tool);
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho {tool} >> {}\n", marker.display()),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let hostile_path = format!("{}:/usr/bin:/bin", planted.path().display());
    let (lines, outcome) = fx
        .run(
            SandboxSpec::new(["/bin/sh", "-c", "echo \"$PATH\""])
                .env("PATH", &hostile_path)
                .limits(quick()),
        )
        .await;
    assert!(outcome.success(), "{outcome:?} {lines:?}");
    assert_eq!(text(&lines, Stream::Stdout), [hostile_path.as_str()]);
    assert!(!marker.exists(), "a planted tool ran on the host");
    fx.assert_healthy().await;
}

#[tokio::test]
async fn a_provider_missing_its_tool_is_refused_naming_it() {
    let _serial = SERIAL.lock().await;
    let provider = rba_executor::isolation::bubblewrap::Bubblewrap {
        program: "/nonexistent/rba-bwrap".into(),
    };
    let config = SandboxConfig::with_host_toolchain().unwrap();
    let err = Sandbox::with_provider(config, std::sync::Arc::new(provider)).unwrap_err();
    assert!(
        matches!(&err, SandboxError::Prerequisite(m) if m.contains("/nonexistent/rba-bwrap")),
        "{err}"
    );
}

#[tokio::test]
async fn the_job_view_is_built_without_touching_the_host_mounts() {
    let fx = fixture().await;
    let ws = readable_tempdir();
    std::fs::write(ws.path().join("marker"), "inside").unwrap();
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let host_mnt: Vec<_> = std::fs::read_dir("/mnt")
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    let mut running = fx
        .sandbox
        .spawn(
            SandboxSpec::new(["sh", "-c", "cat /workspace/marker; echo; sleep 2"])
                .workspace(ws.path())
                .limits(quick()),
        )
        .await
        .unwrap();
    let first = running.output.recv().await.unwrap();
    assert_eq!(first.line, "inside");
    // While the job runs: the host's mount table and /mnt are as they were (whatever a
    // provider mounts for the job lives in the job's own mount namespaces).
    assert_eq!(
        std::fs::read_to_string("/proc/self/mountinfo").unwrap(),
        host_mounts
    );
    let now_mnt: Vec<_> = std::fs::read_dir("/mnt")
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert_eq!(now_mnt, host_mnt);
    assert!(running.wait().await.unwrap().success());
    fx.assert_clean();
}
