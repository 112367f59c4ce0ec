//! Hostile build scripts through the executor's real job path: each is contained, nothing on
//! the host changes, and the next job on the same executor builds normally.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{Harness, fixture, hash_dir};
use rba_cas::DigestFunction;
use rba_executor::cargo::{CargoJob, JobKind};
use rba_executor::runner::{JobOutcome, JobStatus};

fn harness(wall_time: Duration) -> Harness {
    Harness::new(|config| {
        config.limits.wall_time = Some(wall_time);
        config.limits.max_processes = Some(256);
    })
}

/// A crate whose build script is `build_rs`, plus extra files.
fn hostile_crate(build_rs: &str, extra: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("src")).unwrap();
    std::fs::write(
        root.join("Cargo.toml"),
        "[package]\nname = \"hostile\"\nversion = \"0.1.0\"\nedition = \"2021\"\nbuild = \"build.rs\"\n\n[workspace]\n",
    )
    .unwrap();
    std::fs::write(root.join("src/main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(root.join("build.rs"), build_rs).unwrap();
    for (path, content) in extra {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    let status = std::process::Command::new("cargo")
        .args(["generate-lockfile", "--offline", "-q"])
        .current_dir(root)
        .status()
        .unwrap();
    assert!(status.success());
    dir
}

async fn build(harness: &Harness, source: &Path) -> (Arc<JobOutcome>, String) {
    let (_, outcome, lines) = harness
        .run(&CargoJob::new(JobKind::Build), source, "hostile")
        .await;
    (outcome, lines.join("\n"))
}

/// After every hostile job, an honest crate still builds on the same executor.
async fn next_job_unaffected(harness: &Harness) {
    let hello = fixture("hello");
    let (outcome, log) = build(harness, &hello).await;
    assert_eq!(
        outcome.status,
        JobStatus::Success,
        "honest job after a hostile one: {log}"
    );
}

fn unique(name: &str) -> String {
    format!("{name}-{}", uuid::Uuid::new_v4())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_script_cannot_read_host_secrets_or_write_outside() {
    let harness = harness(Duration::from_secs(120));
    let secret_path = Path::new("/root").join(unique("rba-secret"));
    std::fs::write(&secret_path, "TOP-SECRET-VALUE").unwrap();
    let outside = std::env::temp_dir().join(unique("rba-escape"));
    let build_rs = format!(
        r#"fn main() {{
    match std::fs::read_to_string("{secret}") {{
        Ok(s) => println!("cargo:warning=LEAKED {{s}}"),
        Err(e) => println!("cargo:warning=secret unreadable: {{e}}"),
    }}
    for path in ["{outside}", "/workspace/pwned", "/usr/pwned", "/etc/pwned"] {{
        match std::fs::write(path, "x") {{
            Ok(()) => println!("cargo:warning=WROTE {{path}}"),
            Err(e) => println!("cargo:warning=write to {{path}} refused: {{e}}"),
        }}
    }}
}}"#,
        secret = secret_path.display(),
        outside = outside.display(),
    );
    let source = hostile_crate(&build_rs, &[]);
    let (outcome, log) = build(&harness, source.path()).await;
    std::fs::remove_file(&secret_path).unwrap();
    assert!(!log.contains("TOP-SECRET-VALUE"), "{log}");
    assert!(
        log.contains("secret unreadable"),
        "the build script ran and was refused: {log}"
    );
    assert!(
        !log.contains("WROTE /workspace")
            && !log.contains("WROTE /usr")
            && !log.contains("WROTE /etc"),
        "{log}"
    );
    assert!(
        !outside.exists(),
        "nothing written on the host at {}",
        outside.display()
    );
    assert!(!source.path().join("pwned").exists());
    assert_eq!(outcome.status, JobStatus::Success);
    next_job_unaffected(&harness).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_script_has_no_network() {
    let harness = harness(Duration::from_secs(120));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let build_rs = format!(
        r#"fn main() {{
    match std::net::TcpStream::connect_timeout(&"127.0.0.1:{port}".parse().unwrap(), std::time::Duration::from_secs(2)) {{
        Ok(_) => println!("cargo:warning=CONNECTED"),
        Err(e) => println!("cargo:warning=no network: {{e}}"),
    }}
}}"#
    );
    let source = hostile_crate(&build_rs, &[]);
    let (_, log) = build(&harness, source.path()).await;
    assert!(log.contains("no network"), "{log}");
    assert!(!log.contains("CONNECTED"), "{log}");
    let mut probe = [0u8; 1];
    match listener.accept() {
        Ok((mut stream, _)) => panic!(
            "the listener saw a connection: {:?}",
            stream.read(&mut probe)
        ),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
    }
    next_job_unaffected(&harness).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rustc_wrapper_from_cargo_config_runs_only_inside_the_sandbox() {
    let harness = harness(Duration::from_secs(120));
    let marker = std::env::temp_dir().join(unique("rba-wrapper-ran"));
    let wrapper = format!(
        "#!/bin/sh\necho wrapper > {}\nexec \"$@\"\n",
        marker.display()
    );
    let source = hostile_crate(
        "fn main() {}\n",
        &[
            (
                ".cargo/config.toml",
                "[build]\nrustc-wrapper = \"/workspace/wrapper.sh\"\n",
            ),
            ("wrapper.sh", &wrapper),
        ],
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        source.path().join("wrapper.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let (outcome, log) = build(&harness, source.path()).await;
    // The wrapper ran (its write went to the sandbox's private /tmp) or failed; either way the
    // host never saw it.
    assert!(!marker.exists(), "the wrapper touched the host: {log}");
    assert!(
        matches!(outcome.status, JobStatus::Success | JobStatus::Failed),
        "{log}"
    );
    next_job_unaffected(&harness).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_cannot_forge_artifacts_that_point_at_host_files() {
    let harness = harness(Duration::from_secs(120));
    // The test prints cargo records naming host files, and plants a symlink to one in the
    // target dir that a forged record names.
    let forged = |path: &str| {
        format!(
            r#"{{"reason":"compiler-artifact","package_id":"hostile","executable":"{path}","filenames":[],"fresh":false}}"#
        )
    };
    let test = format!(
        r##"#[test]
fn forge() {{
    let _ = std::os::unix::fs::symlink("/etc/hostname", "/target/debug/planted");
    // Straight to fd 1: the harness captures only `print!` of passing tests.
    use std::io::Write;
    let mut out = std::io::stdout();
    writeln!(out, "{{}}", r#"{}"#).unwrap();
    writeln!(out, "{{}}", r#"{}"#).unwrap();
}}
"##,
        forged("/target/../../../../../etc/hostname"),
        forged("/target/debug/planted"),
    );
    let source = hostile_crate("fn main() {}\n", &[("tests/forge.rs", &test)]);
    let (_, outcome, lines) = harness
        .run(&CargoJob::new(JobKind::Test), source.path(), "forger")
        .await;
    let log = lines.join("\n");
    assert_eq!(outcome.status, JobStatus::Success, "{log}");
    assert!(log.contains("/target/debug/planted"), "the test ran: {log}");
    for artifact in &outcome.artifacts {
        assert!(
            !artifact.path.contains("..") && !artifact.path.ends_with("planted"),
            "{artifact:?}"
        );
    }
    let hostname = std::fs::read("/etc/hostname").unwrap_or_default();
    let digest = DigestFunction::Blake3.digest_of(&hostname);
    assert!(
        hostname.is_empty() || !harness.cas.blobs.contains(&digest).unwrap(),
        "a host file entered the CAS"
    );
    next_job_unaffected(&harness).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_die_and_endless_loops_are_killed() {
    let harness = harness(Duration::from_secs(8));
    let tag = 3000 + (std::process::id() % 900);
    let build_rs = format!(
        r#"fn main() {{
    std::process::Command::new("sh").arg("-c").arg("sleep {tag}.5 &").status().unwrap();
    loop {{ std::hint::spin_loop(); }}
}}"#
    );
    let source = hostile_crate(&build_rs, &[]);
    let (outcome, log) = build(&harness, source.path()).await;
    assert_eq!(outcome.status, JobStatus::Failed, "{log}");
    assert!(
        outcome
            .error
            .as_deref()
            .unwrap_or("")
            .contains("WallTimeout"),
        "{:?}",
        outcome.error
    );
    let needle = format!("sleep\0{tag}.5");
    let survivors: Vec<_> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|cmdline| String::from_utf8_lossy(cmdline).contains(&needle))
        .collect();
    assert!(survivors.is_empty(), "a daemon outlived its build");
    next_job_unaffected(&harness).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_jobs_report_positions_and_cancel_stops_a_running_job() {
    let harness = Harness::new(|config| config.workers = 1);
    let source = hostile_crate(
        "fn main() { loop { std::thread::sleep(std::time::Duration::from_millis(50)); } }\n",
        &[],
    );
    let root = hash_dir(&harness.cas, source.path(), DigestFunction::Blake3).await;
    let running = harness
        .executor
        .submit_cargo(
            &CargoJob::new(JobKind::Build),
            root,
            "a",
            rba_executor::tenant::Tenant::local(),
        )
        .await
        .unwrap();
    // Jobs take workers in the order they reach the queue, not the order of `submit`: the
    // second job is submitted only once the first holds the one worker.
    let mut first = running.watch();
    tokio::time::timeout(Duration::from_secs(30), async {
        while !matches!(
            &*first.borrow_and_update(),
            rba_executor::runner::JobState::Running { .. }
        ) {
            first.changed().await.unwrap();
        }
    })
    .await
    .expect("the first job starts running");
    let check = CargoJob::new(JobKind::Check);
    let waiting = harness
        .executor
        .submit_cargo(&check, root, "b", rba_executor::tenant::Tenant::local())
        .await
        .unwrap();
    let mut state = waiting.watch();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if matches!(
                &*state.borrow_and_update(),
                rba_executor::runner::JobState::Queued { position: 0 }
            ) && harness.executor.queue_len() == 1
            {
                break;
            }
            // The queue length changes without the job's state changing (the first job leaving
            // the queue while this one already sits at position 0): wake up on either.
            tokio::select! {
                changed = state.changed() => changed.unwrap(),
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    })
    .await
    .expect("the second job waits at queue position 0");
    running.cancel();
    let outcome = tokio::time::timeout(Duration::from_secs(30), running.wait())
        .await
        .expect("cancel is prompt");
    assert_eq!(outcome.status, JobStatus::Cancelled);
    waiting.cancel();
    assert_eq!(waiting.wait().await.status, JobStatus::Cancelled);
}
