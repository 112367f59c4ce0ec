//! The fetch phase's network, attacked through the executor's real job path: a lock file or a
//! manifest naming a registry or git repository on loopback is refused with its name and not
//! one connection reaches it; the egress proxy itself refuses private targets and names not
//! allowed; crates.io still works through it.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use common::{Harness, fixture};
use rba_executor::cargo::{CargoJob, JobKind};
use rba_executor::egress::{EgressPolicy, EgressProxy};
use rba_executor::logstream::strip_ansi;
use rba_executor::runner::JobStatus;

fn harness() -> Harness {
    Harness::new(|config| {
        config.limits.wall_time = Some(Duration::from_secs(120));
    })
}

/// A loopback listener that must never be connected to (non-blocking, to check afterwards).
fn trap() -> TcpListener {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    listener
}

fn assert_untouched(listener: &TcpListener) {
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("something connected to the trap listener: {other:?}"),
    }
}

/// A crate with this `[dependencies]` section and lock file (written as given: the job runs
/// `cargo fetch --locked` on it).
fn crate_with(dependencies: &str, lockfile: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("src")).unwrap();
    std::fs::write(
        root.join("Cargo.toml"),
        format!(
            "[package]\nname = \"egress\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
             [dependencies]\n{dependencies}\n\n[workspace]\n"
        ),
    )
    .unwrap();
    std::fs::write(root.join("src/main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(root.join("Cargo.lock"), lockfile).unwrap();
    dir
}

fn lock_with(source: &str) -> String {
    format!(
        "version = 4\n\n[[package]]\nname = \"egress\"\nversion = \"0.1.0\"\ndependencies = [\"evil\"]\n\n\
         [[package]]\nname = \"evil\"\nversion = \"1.0.0\"\nsource = \"{source}\"\n"
    )
}

async fn refused(harness: &Harness, source: &Path, needles: &[&str]) {
    let (_, outcome, lines) = harness
        .run(&CargoJob::new(JobKind::Build), source, "egress")
        .await;
    let error = outcome.error.clone().unwrap_or_default();
    assert_ne!(outcome.status, JobStatus::Success, "{lines:#?}");
    for needle in needles {
        assert!(error.contains(needle), "{needle:?} in {error:?}");
    }
    let log = lines.join("\n");
    assert!(log.contains(needles[0]), "the log names it too: {log}");
    assert!(
        !outcome
            .steps
            .iter()
            .any(|(step, _)| step == "fetch" || step == "build"),
        "nothing ran: {:?}",
        outcome.steps
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockfile_naming_a_loopback_registry_is_refused_before_any_connection() {
    let harness = harness();
    let listener = trap();
    let port = listener.local_addr().unwrap().port();
    for source in [
        format!("sparse+http://127.0.0.1:{port}/"),
        format!("sparse+https://127.0.0.1:{port}/"),
        format!("registry+https://localhost:{port}/index"),
        format!(
            "git+http://127.0.0.1:{port}/repo?rev=main#0123456789abcdef0123456789abcdef01234567"
        ),
    ] {
        let krate = crate_with("", &lock_with(&source));
        refused(&harness, krate.path(), &[source.as_str(), "Cargo.lock"]).await;
    }
    assert_untouched(&listener);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_naming_a_loopback_registry_or_git_repo_is_refused() {
    let harness = harness();
    let listener = trap();
    let port = listener.local_addr().unwrap().port();
    // The lock file only names crates.io (allowed): the manifests are what is refused.
    let crates_io_lock = lock_with("registry+https://github.com/rust-lang/crates.io-index");
    let registry = format!("sparse+http://127.0.0.1:{port}/");
    let krate = crate_with(
        &format!("evil = {{ version = \"1\", registry-index = \"{registry}\" }}"),
        &crates_io_lock,
    );
    refused(&harness, krate.path(), &[&registry, "Cargo.toml"]).await;

    let git = format!("http://127.0.0.1:{port}/evil.git");
    let krate = crate_with(&format!("evil = {{ git = \"{git}\" }}"), &crates_io_lock);
    refused(&harness, krate.path(), &[&git, "Cargo.toml"]).await;

    // A member's manifest, deeper in the tree, and a [patch] on a private address.
    let krate = crate_with("", &crates_io_lock);
    std::fs::create_dir_all(krate.path().join("member/sub")).unwrap();
    std::fs::write(
        krate.path().join("member/sub/Cargo.toml"),
        format!(
            "[package]\nname = \"m\"\nversion = \"0.1.0\"\n[patch.crates-io]\n\
             evil = {{ git = \"https://169.254.169.254:{port}/x\" }}\n"
        ),
    )
    .unwrap();
    refused(
        &harness,
        krate.path(),
        &[
            "169.254.169.254",
            "member/sub/Cargo.toml",
            "not a public address",
        ],
    )
    .await;
    assert_untouched(&listener);

    // The executor keeps serving: crates.io dependencies still fetch and build.
    registry_dependency_builds_through_the_proxy(&harness).await;
}

async fn registry_dependency_builds_through_the_proxy(harness: &Harness) {
    let source = tempfile::tempdir().unwrap();
    for name in ["Cargo.toml", "Cargo.lock", "src/main.rs"] {
        let from = fixture("registry-dep").join(name);
        std::fs::create_dir_all(source.path().join(name).parent().unwrap()).unwrap();
        std::fs::copy(from, source.path().join(name)).unwrap();
    }
    let (_, outcome, lines) = harness
        .run(
            &CargoJob::new(JobKind::Build),
            source.path(),
            "registry-dep",
        )
        .await;
    let text: Vec<String> = lines.iter().map(|l| strip_ansi(l).into_owned()).collect();
    assert_eq!(outcome.status, JobStatus::Success, "{text:#?}");
    assert!(
        text.iter().any(|l| l.contains("through the egress proxy")),
        "{text:#?}"
    );
    assert!(
        text.iter().any(|l| l.contains("Compiling itoa")),
        "{text:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crates_io_is_refused_when_the_operator_allows_only_a_mirror() {
    let harness = Harness::new(|config| {
        config.fetch_allowed_hosts = vec!["mirror.example.com".into()];
    });
    refused(
        &harness,
        &fixture("registry-dep"),
        &[
            "registry+https://github.com/rust-lang/crates.io-index",
            "crates.io (index.crates.io) is not in the fetch allowlist",
        ],
    )
    .await;
}

/// Sends `CONNECT target` to the proxy and returns its status line.
fn connect(proxy: &EgressProxy, target: &str) -> String {
    let mut stream = TcpStream::connect(proxy.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"
    )
    .unwrap();
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with(b"\r\n") && stream.read(&mut byte).unwrap() == 1 {
        reply.push(byte[0]);
    }
    let _ = stream.shutdown(Shutdown::Both);
    String::from_utf8_lossy(&reply).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_refuses_private_targets_and_names_not_allowed() {
    let listener = trap();
    let port = listener.local_addr().unwrap().port();
    // Even when the operator lists them, private addresses are refused after resolution.
    let policy = EgressPolicy::new(&[
        "index.crates.io".to_string(),
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("10.0.0.1:{port}"),
        format!("169.254.169.254:{port}"),
        format!("[::1]:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
    ])
    .unwrap();
    let proxy = EgressProxy::start(policy).await.unwrap();
    let refusals = tokio::task::spawn_blocking({
        let addr = proxy.addr();
        move || {
            let proxy_addr = addr;
            let statuses: Vec<(String, String)> = [
                format!("127.0.0.1:{port}"),
                format!("localhost:{port}"),
                format!("10.0.0.1:{port}"),
                format!("169.254.169.254:{port}"),
                format!("[::1]:{port}"),
                format!("[::ffff:127.0.0.1]:{port}"),
                "example.com:443".to_string(),
                "index.crates.io:22".to_string(),
                "index.crates.io.evil.test:443".to_string(),
            ]
            .into_iter()
            .map(|target| {
                let mut stream = TcpStream::connect(proxy_addr).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                write!(stream, "CONNECT {target} HTTP/1.1\r\n\r\n").unwrap();
                let mut reply = String::new();
                let _ = stream.read_to_string(&mut reply);
                (target, reply)
            })
            .collect();
            statuses
        }
    })
    .await
    .unwrap();
    for (target, reply) in &refusals {
        assert!(reply.starts_with("HTTP/1.1 403"), "{target}: {reply:?}");
    }
    // A plain HTTP request (not CONNECT) is not proxied either.
    let plain = tokio::task::spawn_blocking({
        let addr = proxy.addr();
        move || {
            let mut stream = TcpStream::connect(addr).unwrap();
            write!(
                stream,
                "GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            )
            .unwrap();
            let mut reply = String::new();
            let _ = stream.read_to_string(&mut reply);
            reply
        }
    })
    .await
    .unwrap();
    assert!(plain.starts_with("HTTP/1.1 405"), "{plain:?}");
    let named = proxy.refusals().join("\n");
    for needle in [
        "127.0.0.1 is not a public address",
        "10.0.0.1 is not a public address",
        "169.254.169.254 is not a public address",
        "::1 is not a public address",
        "example.com:443 is not in the fetch allowlist",
        "index.crates.io:22 is not in the fetch allowlist",
        "only CONNECT",
    ] {
        assert!(named.contains(needle), "{needle:?} in {named}");
    }
    assert_untouched(&listener);

    // An allowed public name is tunnelled (crates.io is reachable from here).
    let status = tokio::task::spawn_blocking(move || {
        let status = connect(&proxy, "index.crates.io:443");
        (status, proxy)
    })
    .await
    .unwrap()
    .0;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
}

/// The network layer on its own: a manifest the checks before the fetch do not read (a
/// symlinked `Cargo.toml`) names a git repository on loopback; cargo tries it through the
/// proxy, which refuses it, and the job's error names the refusal. Not one connection reaches
/// the listener. (Also the proof that cargo's traffic goes through the proxy at all.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_the_checks_did_not_see_is_refused_by_the_proxy() {
    let harness = harness();
    let listener = trap();
    let port = listener.local_addr().unwrap().port();
    let source = tempfile::tempdir().unwrap();
    let root = source.path();
    std::fs::create_dir_all(root.join("src")).unwrap();
    std::fs::write(root.join("src/main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(
        root.join("real.toml"),
        format!(
            "[package]\nname = \"registry-dep\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
             [dependencies]\nitoa = \"=1.0.15\"\nevil = {{ git = \"https://127.0.0.1:{port}/evil.git\" }}\n\n\
             [workspace]\n"
        ),
    )
    .unwrap();
    std::os::unix::fs::symlink("real.toml", root.join("Cargo.toml")).unwrap();
    std::fs::copy(
        fixture("registry-dep").join("Cargo.lock"),
        root.join("Cargo.lock"),
    )
    .unwrap();
    let (_, outcome, lines) = harness
        .run(&CargoJob::new(JobKind::Build), root, "egress")
        .await;
    assert_eq!(outcome.status, JobStatus::Failed, "{lines:#?}");
    let error = outcome.error.clone().unwrap_or_default();
    assert!(
        error.contains(&format!(
            "the egress proxy refused CONNECT 127.0.0.1:{port}: 127.0.0.1:{port} is not in the fetch allowlist"
        )),
        "{error}\n{lines:#?}"
    );
    assert_untouched(&listener);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_without_a_lock_file_is_checked_before_its_resolution() {
    let harness = harness();
    let listener = trap();
    let port = listener.local_addr().unwrap().port();
    let git = format!("http://127.0.0.1:{port}/evil.git");
    let krate = crate_with(&format!("evil = {{ git = \"{git}\" }}"), "");
    std::fs::remove_file(krate.path().join("Cargo.lock")).unwrap();
    refused(&harness, krate.path(), &[&git, "Cargo.toml"]).await;
    let (_, outcome, _) = harness
        .run(&CargoJob::new(JobKind::Build), krate.path(), "egress")
        .await;
    assert!(
        !outcome.steps.iter().any(|(step, _)| step == "resolve"),
        "no resolution with a refused source: {:?}",
        outcome.steps
    );
    assert_untouched(&listener);
}
