//! The real `rba` binary, run as a user would: embedded node, real sandbox, real cargo.

use std::path::PathBuf;

use assert_cmd::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn rba(data_dir: &std::path::Path) -> Command {
    let mut command = Command::cargo_bin("rba").unwrap();
    command
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("RBA_DATA_DIR")
        .env_remove("RBA_COLOR")
        .env_remove("NO_COLOR")
        .env_remove("RBA_REMOTE")
        .env_remove("RBA_CONFIG")
        .env_remove("RBA_WORKERS")
        // No user config file of whoever runs the tests.
        .env("XDG_CONFIG_HOME", data_dir.join("config"))
        .env_remove("RBA_CLIENT_CONFIG")
        // Builds land their binaries here, never in the fixtures' own target/.
        .env("CARGO_TARGET_DIR", data_dir.join("local-target"));
    command
}

fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

fn mode_of(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Runs a landed binary and returns its stdout.
fn run_binary(path: &std::path::Path) -> String {
    let out = std::process::Command::new(path).output().unwrap();
    assert!(out.status.success(), "{}: {out:?}", path.display());
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The digest printed as `rba: artifact PATH DIGEST`.
fn printed_digest(stderr: &str, path: &str) -> String {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix(&format!("rba: artifact {path} ")))
        .unwrap_or_else(|| panic!("no artifact line for {path}: {stderr}"))
        .to_string()
}

#[test]
fn build_streams_cargo_output_and_second_run_is_a_cache_hit() {
    let data = tempfile::tempdir().unwrap();
    let first = rba(data.path())
        .arg("build")
        .arg(fixture("hello"))
        .assert()
        .success();
    let out = String::from_utf8_lossy(&first.get_output().stdout).to_string();
    let err = String::from_utf8_lossy(&first.get_output().stderr).to_string();
    // cargo's human output is on stderr, as cargo prints it; stdout is for programs' output.
    assert!(
        err.contains("Compiling") && err.contains("hello v0.1.0"),
        "stderr: {err}"
    );
    assert!(!out.contains("Compiling"), "stdout: {out}");
    assert!(err.contains("rba: success"), "stderr: {err}");
    assert!(
        err.contains("artifact target/debug/hello blake3:"),
        "stderr: {err}"
    );
    assert!(!err.contains("action-cache hit"));
    assert!(
        !err.contains('\u{1b}'),
        "stderr is a pipe: cargo's colours are stripped by default: {err:?}"
    );

    let second = rba(data.path())
        .args(["--color", "always", "build"])
        .arg(fixture("hello"))
        .assert()
        .success();
    let err = String::from_utf8_lossy(&second.get_output().stderr).to_string();
    assert!(err.contains("action-cache hit"), "stderr: {err}");
    assert!(
        err.contains("\u{1b}[") && err.contains("hello v0.1.0"),
        "--color always keeps cargo's colours in the replayed log: {err:?}"
    );
}

/// `rba run`: the program runs on the node in the sandbox with the user's arguments; its
/// output is on stdout, its status is rba's, it cannot reach the host's loopback, and a second
/// run runs again (its output is never replayed from a cache) while its build is reused.
#[test]
fn run_runs_the_program_in_the_sandbox_every_time() {
    let data = tempfile::tempdir().unwrap();
    // A port on the host's loopback the program tries to reach from inside the sandbox.
    let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    host.set_nonblocking(true).unwrap();
    let port = host.local_addr().unwrap().port().to_string();
    let run = |code: i32| {
        rba(data.path())
            .arg("run")
            .arg(fixture("runs"))
            .args([
                "--",
                "--",
                &code.to_string(),
                &port,
                "two words",
                "--locked",
            ])
            .assert()
            .code(code)
    };
    let first = run(7);
    let out = String::from_utf8_lossy(&first.get_output().stdout).to_string();
    let err = stderr_of(first.get_output());
    assert!(
        out.contains(&format!("runs: args 7 {port} two words --locked")),
        "the program's arguments arrive as given: stdout {out}, stderr {err}"
    );
    assert!(
        out.contains(&format!("runs: port {port} unreachable")),
        "the sandbox has no route to the host: {out}"
    );
    assert!(
        err.contains("runs: exiting with 7") && err.contains("Compiling runs"),
        "{err}"
    );
    assert!(
        host.accept().is_err(),
        "nothing reached the host's listener"
    );
    let clock = |out: &str| {
        out.lines()
            .find(|l| l.starts_with("runs: clock "))
            .unwrap_or_else(|| panic!("no clock line: {out}"))
            .to_string()
    };
    // Two successful runs (a failed result is never cached anyway): the second runs again.
    let second = run(0);
    let second_out = String::from_utf8_lossy(&second.get_output().stdout).to_string();
    let third = run(0);
    let third_out = String::from_utf8_lossy(&third.get_output().stdout).to_string();
    let third_err = stderr_of(third.get_output());
    assert!(
        !third_err.contains("action-cache hit") && !third_err.contains("Compiling runs"),
        "the program runs again on the build it reuses: {third_err}"
    );
    assert_ne!(
        clock(&second_out),
        clock(&third_out),
        "a run is not a replay"
    );
    assert_ne!(clock(&out), clock(&second_out));
    // Like `cargo run`, a successful run lands the binary in the local target dir.
    let landed = run_binary(&data.path().join("local-target/debug/runs"));
    assert!(landed.starts_with("runs: args \n"), "{landed}");
}

#[test]
fn failing_build_exits_with_cargos_status_and_shows_the_error() {
    let data = tempfile::tempdir().unwrap();
    let run = rba(data.path())
        .arg("build")
        .arg(fixture("compile-error"))
        .assert()
        .failure();
    // Diagnostics are on stderr, where cargo prints them.
    let err = String::from_utf8_lossy(&run.get_output().stderr).to_string();
    assert!(err.contains("mismatched types"), "stderr: {err}");
    assert_eq!(run.get_output().status.code(), Some(101));
}

#[test]
fn user_errors_are_one_clear_line() {
    let data = tempfile::tempdir().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let run = rba(data.path())
        .arg("build")
        .arg(empty.path())
        .assert()
        .code(2);
    let err = String::from_utf8_lossy(&run.get_output().stderr).to_string();
    assert!(
        err.starts_with("rba: error: no Cargo.toml in"),
        "stderr: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "stderr: {err}");

    let run = rba(data.path())
        .arg("check")
        .arg("/definitely/not/here")
        .assert()
        .code(2);
    let err = String::from_utf8_lossy(&run.get_output().stderr).to_string();
    assert!(err.contains("is not a directory"), "stderr: {err}");

    rba(data.path()).arg("frobnicate").assert().code(2);

    let run = rba(data.path())
        .args(["--color", "rainbow", "build"])
        .arg(fixture("hello"))
        .assert()
        .code(2);
    let err = String::from_utf8_lossy(&run.get_output().stderr).to_string();
    assert!(
        err.contains("'rainbow'") && err.contains("--color"),
        "stderr: {err}"
    );
}

#[test]
fn help_lists_the_jobs_and_hash_prints_a_root() {
    let data = tempfile::tempdir().unwrap();
    let help = rba(data.path()).arg("--help").assert().success();
    let text = String::from_utf8_lossy(&help.get_output().stdout).to_string();
    for job in ["build", "test", "lint", "audit", "check", "run", "hash"] {
        assert!(text.contains(&format!("\n  {job} ")), "{job}: {text}");
    }
    // Each command is one short line; the details are in `rba COMMAND --help`.
    let commands = text
        .split("Commands:\n")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .unwrap_or_else(|| panic!("no Commands section: {text}"));
    for line in commands.lines() {
        assert!(line.chars().count() <= 100, "a long command line: {line:?}");
    }
    let hash = rba(data.path())
        .arg("hash")
        .arg(fixture("hello"))
        .assert()
        .success();
    let out = String::from_utf8_lossy(&hash.get_output().stdout).to_string();
    assert!(
        out.starts_with("blake3:") && out.contains("(3 files)"),
        "{out}"
    );
}

#[test]
fn verify_repairs_the_local_store_and_follows_no_link() {
    use rba_cas::DigestFunction;
    use std::os::unix::fs::PermissionsExt;
    let data = tempfile::tempdir().unwrap();
    let stdout = |assert: assert_cmd::assert::Assert| {
        String::from_utf8_lossy(&assert.get_output().stdout).to_string()
    };
    // No store there (a mistyped --data-dir): an error naming it, and nothing created.
    let nowhere = data.path().join("no-such-dir");
    let refused = rba(&nowhere).arg("verify").assert().code(2);
    assert!(
        stderr_of(refused.get_output()).contains("no store under"),
        "{}",
        stderr_of(refused.get_output())
    );
    assert!(!nowhere.join("cas").exists());
    rba(data.path())
        .arg("hash")
        .arg(fixture("hello"))
        .assert()
        .success();
    let out = stdout(rba(data.path()).arg("verify").assert().code(0));
    assert!(
        out.contains("removed 0 corrupt; dropped 0 index entries without a file; indexed 0"),
        "{out}"
    );
    let blobs = data.path().join("cas/blobs/blake3");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&blobs)
        .unwrap()
        .flat_map(|shard| std::fs::read_dir(shard.unwrap().path()).unwrap())
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    // One blob changed behind the store's back (same size), one removed.
    let (tampered, removed) = (&files[0], &files[1]);
    let len = std::fs::metadata(tampered).unwrap().len() as usize;
    std::fs::set_permissions(tampered, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(tampered, vec![b'x'; len]).unwrap();
    std::fs::remove_file(removed).unwrap();
    // A complete blob file the index never listed (a crash between rename and index).
    let place = |digest: &rba_cas::Digest| {
        let hex = digest.hash_hex();
        std::fs::create_dir_all(blobs.join(&hex[..2])).unwrap();
        blobs.join(&hex[..2]).join(hex)
    };
    let orphan: &[u8] = b"a blob whose index entry a crash lost";
    let orphan_digest = DigestFunction::Blake3.digest_of(orphan);
    std::fs::write(place(&orphan_digest), orphan).unwrap();
    // A link planted in the store, named after an outside file's digest: never followed.
    let secret: &[u8] = b"a file outside the store";
    let outside = data.path().join("outside");
    std::fs::write(&outside, secret).unwrap();
    let secret_digest = DigestFunction::Blake3.digest_of(secret);
    let link = place(&secret_digest);
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    // A write a crash interrupted: a short file at a blob's path, never indexed.
    let unfinished: &[u8] = b"a blob whose write a crash cut short";
    std::fs::write(
        place(&DigestFunction::Blake3.digest_of(unfinished)),
        &unfinished[..7],
    )
    .unwrap();

    let out = stdout(rba(data.path()).arg("verify").assert().code(1));
    assert!(
        out.contains("removed corrupt blob blake3:")
            && out.contains("dropped index entry without a file blake3:")
            && out.contains(
                "removed 1 corrupt; dropped 1 index entries without a file; indexed 1 files \
                 again; removed 1 unfinished writes"
            ),
        "{out}"
    );
    assert!(!tampered.exists());
    assert!(
        std::fs::symlink_metadata(&link).is_err(),
        "the link is gone"
    );
    assert_eq!(
        std::fs::read(&outside).unwrap(),
        secret,
        "its target is not"
    );
    // Repaired: clean on the next run; the adopted blob is served, the link's digest is not.
    rba(data.path()).arg("verify").assert().code(0);
    let got = data.path().join("got");
    rba(data.path())
        .args(["get", &format!("{orphan_digest:?}"), "-o"])
        .arg(&got)
        .assert()
        .success();
    assert_eq!(std::fs::read(&got).unwrap(), orphan);
    rba(data.path())
        .args(["get", &format!("{secret_digest:?}"), "-o"])
        .arg(&got)
        .assert()
        .failure();
}

#[test]
fn serve_refuses_an_open_grpc_face_off_loopback_and_names_the_fix() {
    let data = tempfile::tempdir().unwrap();
    let serve = |extra: &[&str]| {
        let run = rba(data.path())
            .args(["serve", "--listen", "/ip4/127.0.0.1/tcp/0", "--http", "off"])
            .args(extra)
            .env_remove("RBA_CONFIG")
            .env_remove("RBA_TOKENS")
            .env_remove("RBA_GRPC_LISTEN")
            .env_remove("RBA_TLS_CERT")
            .env_remove("RBA_TLS_KEY")
            .timeout(std::time::Duration::from_secs(60))
            .assert()
            .code(2);
        String::from_utf8_lossy(&run.get_output().stderr).to_string()
    };
    let err = serve(&["--grpc", "0.0.0.0:0"]);
    assert!(
        err.starts_with("rba: error: listening on 0.0.0.0:0 (not loopback) without tokens")
            && err.contains("--token NAME:TOKEN:read-write")
            && err.contains("127.0.0.1"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // Nothing was bound or created beyond the refusal.
    assert!(!data.path().join("identity.key").exists());

    let err = serve(&["--grpc", "0.0.0.0:0", "--token", "ci:short:read-write"]);
    assert!(err.contains("shorter than 8 characters"), "{err}");
    let err = serve(&["--grpc", "127.0.0.1:0", "--tls-cert", "/nonexistent.pem"]);
    assert!(
        err.contains("--tls-cert and --tls-key go together"),
        "{err}"
    );
    let err = serve(&[
        "--grpc",
        "127.0.0.1:0",
        "--tls-cert",
        "/nonexistent/cert.pem",
        "--tls-key",
        "/nonexistent/key.pem",
    ]);
    assert!(
        err.contains("reading TLS certificate /nonexistent/cert.pem"),
        "{err}"
    );
}

/// `rba serve` running in the background on loopback port 0; stopped with SIGTERM on drop.
struct Served {
    child: std::process::Child,
    tcp: String,
    quic: String,
    http: String,
    grpc: String,
    _stdout: std::thread::JoinHandle<()>,
}

impl Served {
    fn start(data_dir: &std::path::Path) -> Served {
        use std::io::BufRead;
        let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("rba"))
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "serve",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--listen",
                "/ip4/127.0.0.1/udp/0/quic-v1",
                "--http",
                "127.0.0.1:0",
                "--grpc",
                "127.0.0.1:0",
                "--no-fsync",
            ])
            .env_remove("RBA_DATA_DIR")
            .env_remove("RBA_CONFIG")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut tcp, mut quic, mut http, mut grpc) = (None, None, None, None);
        while tcp.is_none() || quic.is_none() || http.is_none() || grpc.is_none() {
            let line = lines
                .next()
                .expect("rba serve prints its addresses")
                .unwrap();
            if let Some(address) = line.strip_prefix("rba: listening on ") {
                if address.contains("/tcp/") {
                    tcp = Some(address.to_string());
                } else {
                    quic = Some(address.to_string());
                }
            } else if let Some(http_url) = line.strip_prefix("rba: http on ") {
                http = Some(http_url.to_string());
            } else if let Some(grpc_url) = line.strip_prefix("rba: reapi on ") {
                grpc = Some(grpc_url.to_string());
            }
        }
        let drain = std::thread::spawn(move || for _ in lines {});
        Served {
            child,
            tcp: tcp.unwrap(),
            quic: quic.unwrap(),
            http: http.unwrap(),
            grpc: grpc.unwrap(),
            _stdout: drain,
        }
    }

    fn stop(mut self) -> std::process::ExitStatus {
        self.terminate();
        self.child.wait().unwrap()
    }

    /// Sends SIGTERM without waiting.
    fn terminate(&self) {
        std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
    }
}

#[test]
fn serve_then_remote_build_logs_and_clear_connection_errors() {
    let node_dir = tempfile::tempdir().unwrap();
    let client_dir = tempfile::tempdir().unwrap();
    let served = Served::start(node_dir.path());
    assert!(served.tcp.contains("/p2p/12D3KooW"), "{}", served.tcp);
    assert!(served.http.starts_with("http://127.0.0.1:"));
    assert!(
        served.grpc.starts_with("grpc://127.0.0.1:"),
        "{}",
        served.grpc
    );

    let first = rba(client_dir.path())
        .arg("build")
        .arg(fixture("hello"))
        .arg("--remote")
        .arg(&served.tcp)
        .assert()
        .success();
    let err = String::from_utf8_lossy(&first.get_output().stderr).to_string();
    assert!(
        err.contains("Compiling") && err.contains("hello v0.1.0"),
        "{err}"
    );
    assert!(err.contains("rba: success"), "{err}");
    assert!(err.contains("artifact target/debug/hello blake3:"), "{err}");
    assert!(!err.contains("action-cache hit"), "{err}");
    // The binary came back into the local target dir (CARGO_TARGET_DIR of `rba`).
    let landed = client_dir.path().join("local-target/debug/hello");
    assert!(err.contains("Fetched target/debug/hello ("), "{err}");
    assert_eq!(run_binary(&landed), "Hello, rust-build-agent!\n");
    let mtime = std::fs::metadata(&landed).unwrap().modified().unwrap();
    let session = err
        .lines()
        .find_map(|l| l.strip_prefix("rba: session "))
        .expect("the session id is printed")
        .to_string();

    // Unchanged, over QUIC this time: a cache hit with nothing uploaded.
    let second = rba(client_dir.path())
        .arg("build")
        .arg(fixture("hello"))
        .arg("--remote")
        .arg(&served.quic)
        .assert()
        .success();
    let err = String::from_utf8_lossy(&second.get_output().stderr).to_string();
    assert!(err.contains("action-cache hit"), "{err}");
    assert!(err.contains("uploaded 0 of"), "{err}");
    assert!(
        !err.contains("Fetched"),
        "an identical binary is not fetched again: {err}"
    );
    assert_eq!(
        std::fs::metadata(&landed).unwrap().modified().unwrap(),
        mtime
    );

    // A failing crate exits with cargo's status.
    let failed = rba(client_dir.path())
        .arg("build")
        .arg(fixture("compile-error"))
        .arg("--remote")
        .arg(&served.tcp)
        .assert()
        .code(101);
    let err = String::from_utf8_lossy(&failed.get_output().stderr).to_string();
    assert!(err.contains("mismatched types"), "{err}");

    // Re-attaching to the first session prints its log again from a line on.
    let logs = rba(client_dir.path())
        .args(["logs", &session, "--from-seq", "1", "--remote", &served.tcp])
        .assert()
        .success();
    let err = String::from_utf8_lossy(&logs.get_output().stderr).to_string();
    assert!(err.contains("Finished"), "{err}");

    // Errors the user can act on: one line each.
    let peer = served.tcp.rsplit('/').next().unwrap().to_string();
    let other_peer = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";
    let wrong = served.tcp.replace(&peer, other_peer);
    let unreachable = format!("/ip4/127.0.0.1/tcp/1/p2p/{peer}");
    for (target, expected) in [
        (wrong.as_str(), "rba: error: wrong PeerId"),
        (
            unreachable.as_str(),
            "rba: error: node unreachable at /ip4/127.0.0.1/tcp/1",
        ),
        (
            "/ip4/127.0.0.1/tcp/1",
            "rba: error: \"/ip4/127.0.0.1/tcp/1\" does not end with /p2p/PEERID",
        ),
    ] {
        let run = rba(client_dir.path())
            .arg("build")
            .arg(fixture("hello"))
            .arg("--remote")
            .arg(target)
            .assert()
            .code(2);
        let err = String::from_utf8_lossy(&run.get_output().stderr).to_string();
        assert!(err.starts_with(expected), "{target}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    let run = rba(client_dir.path())
        .arg("build")
        .arg(node_dir.path())
        .arg("--remote")
        .arg(&served.tcp)
        .assert()
        .code(2);
    let err = String::from_utf8_lossy(&run.get_output().stderr).to_string();
    assert!(err.starts_with("rba: error: no Cargo.toml in"), "{err}");
    let run = rba(client_dir.path())
        .args(["logs", "no-such-session", "--remote", &served.tcp])
        .assert()
        .code(2);
    let err = String::from_utf8_lossy(&run.get_output().stderr).to_string();
    assert!(err.contains("unknown_session"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    assert!(
        served.stop().success(),
        "rba serve stops cleanly on SIGTERM"
    );
    // The identity persists across restarts.
    let again = Served::start(node_dir.path());
    assert!(again.tcp.ends_with(&peer), "{} vs {peer}", again.tcp);
    again.stop();
}

#[test]
fn a_build_that_never_ends_stops_at_its_timeout() {
    let data = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let run = rba(data.path())
        .args(["build", "--timeout", "5"])
        .arg(fixture("endless-build"))
        .timeout(std::time::Duration::from_secs(120))
        .assert()
        .failure();
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&run.get_output().stderr).to_string();
    assert!(
        err.contains("wall-clock time limit reached"),
        "the limit is named: {err}"
    );
    // 5 s of build plus the embedded node's start and the build script's compilation.
    assert!(took < std::time::Duration::from_secs(60), "{took:?}: {err}");

    // The node configuration file (RBA_CONFIG: the schema `rba serve`, `rba worker` and
    // `cache-server` read) configures the embedded node too: its [workers.limits] stop the
    // same build without a flag; a key it does not know stops `rba` naming the file.
    let config = data.path().join("node.toml");
    std::fs::write(&config, "[workers.limits]\ntimeout_secs = 3\n").unwrap();
    let run = rba(data.path())
        .env("RBA_CONFIG", &config)
        .arg("build")
        .arg(fixture("endless-build"))
        .timeout(std::time::Duration::from_secs(120))
        .assert()
        .failure();
    let err = String::from_utf8_lossy(&run.get_output().stderr).to_string();
    assert!(err.contains("wall-clock time limit reached"), "{err}");
    std::fs::write(&config, "[workers.limits]\ntimeout_sec = 3\n").unwrap();
    let run = rba(data.path())
        .env("RBA_CONFIG", &config)
        .arg("build")
        .arg(fixture("endless-build"))
        .assert()
        .failure();
    let err = String::from_utf8_lossy(&run.get_output().stderr).to_string();
    assert!(
        err.contains("node.toml") && err.contains("timeout_sec"),
        "{err}"
    );
    // Zero slots is refused naming where it came from: the file, the environment, the flag.
    std::fs::write(&config, "[workers]\nslots = 0\n").unwrap();
    for (file, env, flag, named) in [
        (true, None, None, "[workers] slots"),
        (false, Some("0"), None, "RBA_WORKERS"),
        (true, None, Some("0"), "--workers"),
    ] {
        let mut command = rba(data.path());
        command.env_remove("RBA_WORKERS");
        if file {
            command.env("RBA_CONFIG", &config);
        }
        if let Some(env) = env {
            command.env("RBA_WORKERS", env);
        }
        command.arg("build");
        if let Some(flag) = flag {
            command.arg(format!("--workers={flag}"));
        }
        let run = command.arg(fixture("endless-build")).assert().failure();
        let err = String::from_utf8_lossy(&run.get_output().stderr).to_string();
        assert!(
            err.contains(named) && err.contains("at least 1"),
            "{named}: {err}"
        );
    }

    // Hostile values are refused before anything runs, naming the flag.
    for (flag, value) in [("--timeout", "0"), ("--memory", "lots"), ("--disk", "-1G")] {
        let run = rba(data.path())
            .args(["build", &format!("{flag}={value}")])
            .arg(fixture("endless-build"))
            .assert()
            .failure();
        let err = String::from_utf8_lossy(&run.get_output().stderr).to_string();
        assert!(err.contains(flag), "{flag} {value}: {err}");
    }
}

#[test]
fn embedded_build_lands_the_binary_and_leaves_an_unchanged_one_alone() {
    let data = tempfile::tempdir().unwrap();
    let target = tempfile::tempdir().unwrap();
    let first = rba(data.path())
        .arg("build")
        .arg(fixture("hello"))
        .arg("--target-dir")
        .arg(target.path())
        .assert()
        .success();
    let err = stderr_of(first.get_output());
    assert!(err.contains("     Fetched target/debug/hello ("), "{err}");
    let binary = target.path().join("debug/hello");
    assert_eq!(mode_of(&binary), 0o755);
    assert_eq!(run_binary(&binary), "Hello, rust-build-agent!\n");
    let mtime = std::fs::metadata(&binary).unwrap().modified().unwrap();

    // Unchanged: the action-cache hit finds the file identical and does not rewrite it.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let second = rba(data.path())
        .arg("build")
        .arg(fixture("hello"))
        .arg("--target-dir")
        .arg(target.path())
        .assert()
        .success();
    let err = stderr_of(second.get_output());
    assert!(err.contains("action-cache hit"), "{err}");
    assert!(!err.contains("Fetched"), "{err}");
    assert_eq!(
        std::fs::metadata(&binary).unwrap().modified().unwrap(),
        mtime
    );

    // A changed file is replaced.
    std::fs::write(&binary, b"not the binary").unwrap();
    rba(data.path())
        .arg("build")
        .arg(fixture("hello"))
        .arg("--target-dir")
        .arg(target.path())
        .assert()
        .success();
    assert_eq!(run_binary(&binary), "Hello, rust-build-agent!\n");

    // Without --target-dir, CARGO_TARGET_DIR is honoured.
    rba(data.path())
        .arg("build")
        .arg(fixture("hello"))
        .assert()
        .success();
    let from_env = data.path().join("local-target/debug/hello");
    assert_eq!(run_binary(&from_env), "Hello, rust-build-agent!\n");

    // --no-download leaves the target dir alone; `rba test` lands nothing either.
    let untouched = tempfile::tempdir().unwrap();
    for job in ["build", "test"] {
        let run = rba(data.path())
            .arg(job)
            .arg(fixture("hello"))
            .arg("--target-dir")
            .arg(untouched.path().join("t"))
            .args((job == "build").then_some("--no-download"))
            .assert()
            .success();
        assert!(!stderr_of(run.get_output()).contains("Fetched"));
    }
    assert!(!untouched.path().join("t").exists());

    // A target dir that cannot be created is one clear error.
    let file = untouched.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let run = rba(data.path())
        .arg("build")
        .arg(fixture("hello"))
        .arg("--target-dir")
        .arg(file.join("target"))
        .assert()
        .code(2);
    let err_unwritable = stderr_of(run.get_output());
    assert!(
        err_unwritable.contains("rba: error: creating the target dir"),
        "{err_unwritable}"
    );

    // `rba get` writes any blob of the local CAS by the digest printed.
    let digest = printed_digest(&err, "target/debug/hello");
    let copy = untouched.path().join("hello-copy");
    rba(data.path())
        .args(["get", &digest, "-o"])
        .arg(&copy)
        .assert()
        .success();
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(&binary).unwrap()
    );
    let missing = format!("blake3:{}/5", "ab".repeat(32));
    let run = rba(data.path())
        .args(["get", &missing, "-o"])
        .arg(untouched.path().join("nothing"))
        .assert()
        .code(2);
    assert!(stderr_of(run.get_output()).starts_with("rba: error: reading blake3:"));
    assert!(!untouched.path().join("nothing").exists());
    // A digest that does not parse is refused by the argument parser, naming it.
    for hostile in ["not-a-digest", "blake3:../../etc/passwd/5", "sha256:zz/1"] {
        let run = rba(data.path())
            .args(["get", hostile, "-o"])
            .arg(untouched.path().join("nothing"))
            .assert()
            .code(2);
        let err = stderr_of(run.get_output());
        assert!(err.contains(hostile), "{hostile}: {err}");
        assert!(!untouched.path().join("nothing").exists());
    }
}

/// A workspace of three packages: three binaries, a cdylib and a staticlib, written by the test (no dependencies, so
/// its hand-written lock file is what cargo would write).
fn multi_binary_workspace(root: &std::path::Path) {
    let files = [
        (
            "Cargo.toml",
            "[workspace]\nresolver = \"2\"\nmembers = [\"one\", \"two\", \"plug\"]\n",
        ),
        (
            "Cargo.lock",
            "version = 3\n\n[[package]]\nname = \"one\"\nversion = \"0.1.0\"\n\n[[package]]\nname = \"plug\"\nversion = \"0.1.0\"\n\n[[package]]\nname = \"two\"\nversion = \"0.1.0\"\n",
        ),
        (
            "one/Cargo.toml",
            "[package]\nname = \"one\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
        ),
        ("one/src/main.rs", "fn main() { println!(\"one\"); }\n"),
        (
            "one/src/bin/extra.rs",
            "fn main() { println!(\"extra\"); }\n",
        ),
        (
            "two/Cargo.toml",
            "[package]\nname = \"two\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
        ),
        ("two/src/main.rs", "fn main() { println!(\"two\"); }\n"),
        (
            "plug/Cargo.toml",
            "[package]\nname = \"plug\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[lib]\ncrate-type = [\"cdylib\", \"staticlib\"]\n",
        ),
        (
            "plug/src/lib.rs",
            "#[no_mangle]\npub extern \"C\" fn plug() -> u32 { 7 }\n",
        ),
    ];
    for (path, text) in files {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
}

#[test]
fn every_binary_of_a_workspace_lands_embedded_and_remote() {
    let workspace = tempfile::tempdir().unwrap();
    multi_binary_workspace(workspace.path());
    let data = tempfile::tempdir().unwrap();
    rba(data.path())
        .arg("build")
        .arg(workspace.path())
        .assert()
        .success();
    // The default: the workspace's own target/ (CARGO_TARGET_DIR unset).
    let run = rba(data.path())
        .env_remove("CARGO_TARGET_DIR")
        .arg("build")
        .arg(workspace.path())
        .assert()
        .success();
    assert_eq!(stderr_of(run.get_output()).matches("Fetched").count(), 5);
    for name in ["one", "extra", "two"] {
        let binary = workspace.path().join("target/debug").join(name);
        assert_eq!(mode_of(&binary), 0o755, "{name}");
        assert_eq!(run_binary(&binary), format!("{name}\n"));
    }
    // The libraries, with the modes the linker gave them.
    let shared = workspace.path().join("target/debug/libplug.so");
    assert_eq!(mode_of(&shared), 0o755);
    assert!(std::fs::read(&shared).unwrap().starts_with(b"\x7fELF"));
    let archive = workspace.path().join("target/debug/libplug.a");
    assert_eq!(mode_of(&archive), 0o644);
    assert!(std::fs::read(&archive).unwrap().starts_with(b"!<arch>\n"));

    // The same against a real node, release profile, into an explicit target dir.
    let node_dir = tempfile::tempdir().unwrap();
    let client_dir = tempfile::tempdir().unwrap();
    let served = Served::start(node_dir.path());
    let target = tempfile::tempdir().unwrap();
    let remote = rba(client_dir.path())
        .args(["build", "--release", "--target-dir"])
        .arg(target.path())
        .arg(workspace.path())
        .arg("--remote")
        .arg(&served.tcp)
        .assert()
        .success();
    let err = stderr_of(remote.get_output());
    assert!(err.contains("Fetched target/release/extra ("), "{err}");
    for name in ["one", "extra", "two"] {
        let binary = target.path().join("release").join(name);
        assert_eq!(mode_of(&binary), 0o755, "{name}");
        assert_eq!(run_binary(&binary), format!("{name}\n"));
    }

    // `rba get` over the network: the submitter may read its artifact; another client may not.
    let digest = printed_digest(&err, "target/release/two");
    let copy = target.path().join("two-copy");
    rba(client_dir.path())
        .args(["get", &digest, "-o"])
        .arg(&copy)
        .arg("--remote")
        .arg(&served.tcp)
        .assert()
        .success();
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(target.path().join("release/two")).unwrap()
    );
    let stranger = tempfile::tempdir().unwrap();
    let refused = rba(stranger.path())
        .args(["get", &digest, "-o"])
        .arg(stranger.path().join("stolen"))
        .arg("--remote")
        .arg(&served.tcp)
        .assert()
        .code(2);
    let err = stderr_of(refused.get_output());
    assert!(
        err.starts_with("rba: error:") && err.contains("forbidden"),
        "{err}"
    );
    assert!(!stranger.path().join("stolen").exists());
    served.stop();
}

#[test]
fn cargo_flags_pick_packages_binaries_and_profiles() {
    let workspace = tempfile::tempdir().unwrap();
    multi_binary_workspace(workspace.path());
    let manifest = workspace.path().join("Cargo.toml");
    let mut text = std::fs::read_to_string(&manifest).unwrap();
    text.push_str("\n[profile.fast]\ninherits = \"release\"\n");
    std::fs::write(&manifest, text).unwrap();
    let data = tempfile::tempdir().unwrap();
    let local = data.path().join("local-target");

    // `-p two -r`: that package only, release profile.
    let run = rba(data.path())
        .args(["build", "-p", "two", "-r"])
        .arg(workspace.path())
        .assert()
        .success();
    let err = stderr_of(run.get_output());
    assert!(err.contains("Fetched target/release/two ("), "{err}");
    assert_eq!(run_binary(&local.join("release/two")), "two\n");
    assert!(!local.join("release/one").exists(), "{err}");

    // `-p one --bin extra --profile fast`: one binary, a custom profile's directory.
    let run = rba(data.path())
        .args(["build", "-p", "one", "--bin", "extra", "--profile", "fast"])
        .arg(workspace.path())
        .assert()
        .success();
    let err = stderr_of(run.get_output());
    assert_eq!(run_binary(&local.join("fast/extra")), "extra\n");
    assert!(!local.join("fast/one").exists(), "{err}");

    // Values that are not what the flag takes are refused, named, before anything runs.
    for (args, expected) in [
        (
            vec!["build", "--target", "/etc/evil.json"],
            "rba: error: --target \"/etc/evil.json\": is a target-spec file",
        ),
        (
            vec!["build", "--profile", "../x"],
            "rba: error: --profile \"../x\"",
        ),
        (
            vec!["build", "--features", "a;touch /tmp/x"],
            "rba: error: --features",
        ),
    ] {
        let run = rba(data.path())
            .args(&args)
            .arg(workspace.path())
            .assert()
            .code(2);
        let err = stderr_of(run.get_output());
        assert!(err.starts_with(expected), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    // A value that is another flag never reaches cargo: clap refuses it.
    rba(data.path())
        .args(["build", "-p", "--config=build.rustflags=['-Cpanic=abort']"])
        .arg(workspace.path())
        .assert()
        .failure();
}

#[test]
fn named_remotes_come_from_config_files_and_a_project_cannot_pick_its_own() {
    let node_dir = tempfile::tempdir().unwrap();
    let client_dir = tempfile::tempdir().unwrap();
    let served = Served::start(node_dir.path());
    let user_file = client_dir.path().join("config/rba/config.toml");
    std::fs::create_dir_all(user_file.parent().unwrap()).unwrap();
    std::fs::write(
        &user_file,
        format!(
            "default_remote = \"team\"\n\n[remotes]\nteam = \"{}\"\n",
            served.tcp
        ),
    )
    .unwrap();
    let peer = served.tcp.rsplit('/').next().unwrap().to_string();

    // No --remote: the user's default remote.
    let run = rba(client_dir.path())
        .arg("build")
        .arg(fixture("hello"))
        .assert()
        .success();
    let err = stderr_of(run.get_output());
    assert!(err.contains(&format!("on {peer}")), "{err}");
    // `--remote local`: the embedded node.
    let run = rba(client_dir.path())
        .args(["build", "--remote", "local"])
        .arg(fixture("hello"))
        .assert()
        .success();
    assert!(
        stderr_of(run.get_output()).contains("on the embedded node"),
        "{err}"
    );
    // An unknown name lists the known ones.
    let run = rba(client_dir.path())
        .args(["build", "--remote", "nope"])
        .arg(fixture("hello"))
        .assert()
        .code(2);
    let err = stderr_of(run.get_output());
    assert!(
        err.starts_with("rba: error: no remote named \"nope\" (known: team)"),
        "{err}"
    );

    // A project whose .rba.toml makes its own node the default: refused, nothing uploaded.
    let project = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(project.path().join("src")).unwrap();
    std::fs::write(
        project.path().join("Cargo.toml"),
        "[package]\nname = \"p\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    )
    .unwrap();
    std::fs::write(project.path().join("src/main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(
        project.path().join(".rba.toml"),
        format!(
            "default_remote = \"theirs\"\n\n[remotes]\ntheirs = \"/ip4/127.0.0.1/tcp/1/p2p/{peer}\"\n"
        ),
    )
    .unwrap();
    let run = rba(client_dir.path())
        .arg("build")
        .arg(project.path())
        .assert()
        .code(2);
    let err = stderr_of(run.get_output());
    assert!(
        err.starts_with("rba: error: ") && err.contains(".rba.toml makes \"theirs\" the default"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // `rba config` shows what was read.
    let shown = rba(client_dir.path())
        .arg("config")
        .arg(project.path())
        .assert()
        .success();
    let out = String::from_utf8_lossy(&shown.get_output().stdout).to_string();
    assert!(
        out.contains(&format!("user config: {}", user_file.display())),
        "{out}"
    );
    assert!(out.contains("team = /ip4/127.0.0.1/"), "{out}");
    assert!(
        out.contains("project config: ") && out.contains("theirs"),
        "{out}"
    );
    // A malformed user file is named.
    std::fs::write(&user_file, "remote = 1\n").unwrap();
    let run = rba(client_dir.path())
        .arg("build")
        .arg(fixture("hello"))
        .assert()
        .code(2);
    let err = stderr_of(run.get_output());
    assert!(
        err.contains("config.toml") && err.contains("unknown field"),
        "{err}"
    );
    served.stop();
}

#[test]
fn cargo_rba_is_rba_and_completions_are_printed() {
    let data = tempfile::tempdir().unwrap();
    // Through cargo itself: `cargo rba` finds `cargo-rba` on PATH, which runs `rba`.
    let cargo_rba = assert_cmd::cargo::cargo_bin("cargo-rba");
    let path = format!(
        "{}:{}",
        cargo_rba.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = std::process::Command::new(env!("CARGO"))
        .args(["rba", "--version"])
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("rba "),
        "{out:?}"
    );
    let completions = rba(data.path())
        .args(["completions", "bash"])
        .assert()
        .success();
    let script = String::from_utf8_lossy(&completions.get_output().stdout).to_string();
    assert!(
        script.contains("_rba()") && script.contains("--features"),
        "{script}"
    );
    let run = rba(data.path())
        .args(["completions", "no-such-shell"])
        .assert()
        .failure();
    assert!(stderr_of(run.get_output()).contains("no-such-shell"));
}

#[test]
fn message_format_json_prints_cargos_records_on_stdout() {
    let data = tempfile::tempdir().unwrap();
    for round in ["built", "replayed from the action cache"] {
        let run = rba(data.path())
            .args(["build", "--message-format", "json"])
            .arg(fixture("hello"))
            .assert()
            .success();
        let out = String::from_utf8_lossy(&run.get_output().stdout).to_string();
        let records: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{round}: {l:?}: {e}")))
            .collect();
        let reasons: Vec<&str> = records
            .iter()
            .filter_map(|r| r["reason"].as_str())
            .collect();
        assert!(reasons.contains(&"compiler-artifact"), "{round}: {out}");
        assert_eq!(reasons.last(), Some(&"build-finished"), "{round}: {out}");
        let err = stderr_of(run.get_output());
        assert!(!err.contains("\"reason\""), "{round}: {err}");
    }
}

/// `rba` running in the background, its stdout and stderr gathered line by line, so a test
/// can act on what it printed (a session id, cargo starting) while it runs.
struct Background {
    child: std::process::Child,
    stdout: std::sync::Arc<parking_lot::Mutex<String>>,
    stderr: std::sync::Arc<parking_lot::Mutex<String>>,
}

impl Background {
    fn start(data_dir: &std::path::Path, args: &[&std::ffi::OsStr]) -> Background {
        use std::io::BufRead;
        let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("rba"))
            .arg("--data-dir")
            .arg(data_dir)
            .args(args)
            .env_remove("RBA_DATA_DIR")
            .env_remove("RBA_COLOR")
            .env_remove("NO_COLOR")
            .env("CARGO_TARGET_DIR", data_dir.join("local-target"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let gather = |pipe: Box<dyn std::io::Read + Send>| {
            let text = std::sync::Arc::new(parking_lot::Mutex::new(String::new()));
            let sink = text.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(pipe).lines() {
                    let Ok(line) = line else { return };
                    let mut text = sink.lock();
                    text.push_str(&line);
                    text.push('\n');
                }
            });
            text
        };
        let stdout = gather(Box::new(child.stdout.take().unwrap()));
        let stderr = gather(Box::new(child.stderr.take().unwrap()));
        Background {
            child,
            stdout,
            stderr,
        }
    }

    fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.stdout.lock(),
            self.stderr.lock()
        )
    }

    /// Waits (at most 3 minutes) until `stream` has a line containing `text`; returns it.
    fn wait_for(&self, stderr: bool, text: &str) -> String {
        let stream = if stderr { &self.stderr } else { &self.stdout };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
        loop {
            if let Some(line) = stream.lock().lines().find(|l| l.contains(text)) {
                return line.to_string();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no line with {text:?}: {}",
                self.output()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    fn session_id(&self) -> String {
        self.wait_for(true, "rba: session ")
            .strip_prefix("rba: session ")
            .unwrap()
            .to_string()
    }

    fn signal(&self, signal: &str) {
        let sent = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(sent.success());
    }

    /// Waits (at most `within`) for the process to exit; its exit code and stderr.
    fn wait(mut self, within: std::time::Duration) -> (Option<i32>, String) {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The reader threads end with the pipes.
                std::thread::sleep(std::time::Duration::from_millis(200));
                return (status.code(), self.stderr.lock().clone());
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("rba did not exit within {within:?}: {}", self.output());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// The processes in the job cgroups the executor of process `pid` made
/// (`…/rba-jobs/job-PID-N`, see executor/src/cgroup.rs); `None` when this machine gives the
/// executor no cgroups (no `rba-jobs` anywhere).
fn job_cgroup_processes(pid: u32) -> Option<Vec<u32>> {
    let prefix = format!("job-{pid}-");
    let mut jobs_dirs = Vec::new();
    let mut stack = vec![(PathBuf::from("/sys/fs/cgroup"), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if entry.file_name() == "rba-jobs" {
                jobs_dirs.push(entry.path());
            } else if depth < 4 {
                stack.push((entry.path(), depth + 1));
            }
        }
    }
    if jobs_dirs.is_empty() {
        return None;
    }
    let mut pids = Vec::new();
    for jobs in jobs_dirs {
        for job in std::fs::read_dir(jobs).into_iter().flatten().flatten() {
            if job.file_name().to_string_lossy().starts_with(&prefix) {
                let procs = std::fs::read_to_string(job.path().join("cgroup.procs"));
                pids.extend(
                    procs
                        .unwrap_or_default()
                        .lines()
                        .filter_map(|l| l.parse::<u32>().ok()),
                );
            }
        }
    }
    pids.sort_unstable();
    pids.dedup();
    Some(pids)
}

/// Waits (at most 60 s) until the jobs of executor process `pid` have processes (true), or
/// says there are no job cgroups on this machine to look at (false).
fn job_is_running(pid: u32) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match job_cgroup_processes(pid) {
            None => {
                eprintln!(
                    "no job cgroups on this machine: the sandbox's processes are not counted"
                );
                return false;
            }
            Some(pids) if !pids.is_empty() => return true,
            Some(_) => {}
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the job of {pid} never had a process in its cgroup"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Asserts that every process of the jobs of executor process `pid` is gone (within 10 s: the
/// kill is asynchronous to the job's end).
fn assert_no_job_processes(pid: u32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left = job_cgroup_processes(pid).unwrap_or_default();
        if left.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "processes of a cancelled job still run: {left:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn ctrl_c_cancels_a_remote_build_and_rba_cancel_is_the_owners_alone() {
    let node_dir = tempfile::tempdir().unwrap();
    let client_dir = tempfile::tempdir().unwrap();
    let served = Served::start(node_dir.path());
    let node_peer = served.tcp.rsplit('/').next().unwrap().to_string();
    let endless = fixture("endless-build");
    let remote_build = |client: &std::path::Path| {
        Background::start(
            client,
            &[
                "build".as_ref(),
                endless.as_os_str(),
                "--remote".as_ref(),
                served.tcp.as_ref(),
            ],
        )
    };

    // Ctrl-C once cargo runs on the node: the job is cancelled there, rba says so, exit 130.
    let node_pid = served.child.id();
    let build = remote_build(client_dir.path());
    let session = build.session_id();
    build.wait_for(true, "Compiling endless-build");
    let counted = job_is_running(node_pid);
    build.signal("INT");
    let (code, err) = build.wait(std::time::Duration::from_secs(30));
    assert_eq!(code, Some(130), "{err}");
    assert!(
        err.contains(&format!("rba: cancelled session {session} on {node_peer}")),
        "{err}"
    );
    if counted {
        assert_no_job_processes(node_pid);
    }
    // The node's own account of the session: it ended, cancelled.
    let logs = rba(client_dir.path())
        .args(["logs", &session, "--remote", &served.tcp])
        .timeout(std::time::Duration::from_secs(60))
        .assert()
        .failure();
    let err = stderr_of(logs.get_output());
    assert!(err.contains("rba: cancelled in"), "{err}");

    // A session whose client went away (SIGKILL: nothing sent) keeps running on the node.
    let detached = remote_build(client_dir.path());
    let session = detached.session_id();
    detached.wait_for(true, "Compiling endless-build");
    detached.signal("KILL");
    detached.wait(std::time::Duration::from_secs(10));
    let counted = job_is_running(node_pid);

    // Another client identity may not cancel it, and is told as if it did not exist.
    let stranger = tempfile::tempdir().unwrap();
    let refused = rba(stranger.path())
        .args(["cancel", &session, "--remote", &served.tcp])
        .timeout(std::time::Duration::from_secs(60))
        .assert()
        .code(2);
    let err = stderr_of(refused.get_output());
    assert!(
        err.starts_with("rba: error:") && err.contains("unknown_session"),
        "{err}"
    );
    if counted {
        std::thread::sleep(std::time::Duration::from_secs(1));
        assert!(
            !job_cgroup_processes(node_pid)
                .unwrap_or_default()
                .is_empty(),
            "the refused cancel left the job running"
        );
    }

    // The owner may: the job was still running (else this would be `session_finished`).
    let cancelled = rba(client_dir.path())
        .args(["cancel", &session, "--remote", &served.tcp])
        .timeout(std::time::Duration::from_secs(60))
        .assert()
        .success();
    let err = stderr_of(cancelled.get_output());
    assert!(
        err.contains(&format!("rba: cancelled session {session} on {node_peer}")),
        "{err}"
    );
    if counted {
        assert_no_job_processes(node_pid);
    }

    // Clear errors: a finished session, an unknown one.
    for (session, expected) in [
        (session.as_str(), "session_finished"),
        ("no-such-session", "unknown_session"),
    ] {
        let run = rba(client_dir.path())
            .args(["cancel", session, "--remote", &served.tcp])
            .timeout(std::time::Duration::from_secs(60))
            .assert()
            .code(2);
        let err = stderr_of(run.get_output());
        assert!(
            err.starts_with("rba: error:") && err.contains(expected),
            "{session}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    assert!(served.stop().success());
}

#[test]
fn ctrl_c_cancels_an_embedded_build() {
    let data = tempfile::tempdir().unwrap();
    let endless = fixture("endless-build");
    let build = Background::start(data.path(), &["build".as_ref(), endless.as_os_str()]);
    build.wait_for(true, "Compiling endless-build");
    let rba_pid = build.child.id();
    let counted = job_is_running(rba_pid);
    build.signal("INT");
    let (code, err) = build.wait(std::time::Duration::from_secs(30));
    assert_eq!(code, Some(130), "{err}");
    assert!(
        err.contains("rba: cancelled job ") && err.contains("(cancelled)"),
        "{err}"
    );
    // The sandbox went with the job, not left behind by the exiting process.
    if counted {
        assert_no_job_processes(rba_pid);
    }
}

#[test]
fn rba_test_reports_results_per_binary_and_the_failures_output() {
    let check = |err: &str| {
        assert!(
            err.contains(
                "rba: test result of unittests src/lib.rs (mixed_tests): 1 passed, 1 failed, 0 ignored"
            ),
            "{err}"
        );
        assert!(
            err.contains(
                "rba: failed test tests::fails_on_purpose in unittests src/lib.rs (mixed_tests):"
            ),
            "{err}"
        );
        assert!(
            err.contains("---- tests::fails_on_purpose stdout ----")
                && err.contains("this test fails on purpose"),
            "{err}"
        );
        // The node runs `cargo test --no-fail-fast`: the doc-tests ran too (there are none).
        assert!(
            err.contains(
                "rba: test result of doc-tests mixed_tests: 0 passed, 0 failed, 0 ignored"
            ),
            "{err}"
        );
        assert!(
            err.contains("rba: tests total: 1 passed, 1 failed, 0 ignored in 2 test binaries"),
            "{err}"
        );
        assert!(!err.contains("failed test tests::adds"), "{err}");
    };
    let data = tempfile::tempdir().unwrap();
    let embedded = rba(data.path())
        .arg("test")
        .arg(fixture("mixed-tests"))
        .assert()
        .code(101);
    check(&stderr_of(embedded.get_output()));

    let node_dir = tempfile::tempdir().unwrap();
    let served = Served::start(node_dir.path());
    let remote = rba(data.path())
        .arg("test")
        .arg(fixture("mixed-tests"))
        .arg("--remote")
        .arg(&served.tcp)
        .assert()
        .code(101);
    check(&stderr_of(remote.get_output()));
    served.stop();
}

#[test]
fn a_workspace_without_a_lock_file_gets_the_resolved_one_back_and_locked_refuses() {
    let data = tempfile::tempdir().unwrap();
    let workspace = tempfile::tempdir().unwrap();
    for file in ["Cargo.toml", "src/main.rs"] {
        let to = workspace.path().join(file);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(fixture("registry-dep").join(file), to).unwrap();
    }
    let lock = workspace.path().join("Cargo.lock");

    // `--locked` keeps cargo's meaning: no lock file, no build, nothing written.
    let refused = rba(data.path())
        .args(["build", "--locked"])
        .arg(workspace.path())
        .assert()
        .failure();
    let err = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.get_output().stdout),
        stderr_of(refused.get_output())
    );
    assert!(
        err.contains("cannot create the lock file") && err.contains("--locked"),
        "{err}"
    );
    assert!(!lock.exists());

    let built = rba(data.path())
        .arg("build")
        .arg(workspace.path())
        .assert()
        .success();
    let err = stderr_of(built.get_output());
    let text = std::fs::read_to_string(&lock).unwrap_or_else(|e| panic!("{e}: {err}"));
    assert!(
        text.contains("name = \"itoa\"\nversion = \"1.0.15\""),
        "{text}"
    );
    assert!(err.contains("Resolved"), "{err}");
    assert!(
        !err.contains("refused the artifact"),
        "the lock is not a target-dir artifact: {err}"
    );
}

#[test]
fn a_remote_build_without_a_lock_file_writes_the_resolved_one() {
    let workspace = tempfile::tempdir().unwrap();
    for file in ["Cargo.toml", "src/main.rs"] {
        let to = workspace.path().join(file);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(fixture("registry-dep").join(file), to).unwrap();
    }
    let node_dir = tempfile::tempdir().unwrap();
    let client_dir = tempfile::tempdir().unwrap();
    let served = Served::start(node_dir.path());
    let built = rba(client_dir.path())
        .arg("build")
        .arg(workspace.path())
        .arg("--remote")
        .arg(&served.tcp)
        .assert()
        .success();
    let err = stderr_of(built.get_output());
    let lock = std::fs::read_to_string(workspace.path().join("Cargo.lock"))
        .unwrap_or_else(|e| panic!("{e}: {err}"));
    assert!(
        lock.contains("name = \"itoa\"\nversion = \"1.0.15\""),
        "{lock}"
    );
    assert!(err.contains("Fetched target/debug/registry-dep ("), "{err}");
    served.stop();
}

#[test]
fn a_rust_toolchain_file_naming_a_missing_toolchain_or_a_path_is_a_clear_error() {
    let workspace = tempfile::tempdir().unwrap();
    for file in ["Cargo.toml", "Cargo.lock", "src/main.rs"] {
        let to = workspace.path().join(file);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(fixture("hello").join(file), to).unwrap();
    }
    let toolchain_file = workspace.path().join("rust-toolchain.toml");
    let data = tempfile::tempdir().unwrap();
    let node_dir = tempfile::tempdir().unwrap();
    let client_dir = tempfile::tempdir().unwrap();
    let served = Served::start(node_dir.path());
    for (file, named) in [
        (
            "[toolchain]\nchannel = \"1.70.0\"\n",
            "toolchain \"1.70.0\" is not installed on this node; installed: ",
        ),
        ("[toolchain]\npath = \"/usr\"\n", "\"/usr\""),
        ("[toolchain]\nchannel = \"../../etc\"\n", "\"../../etc\""),
    ] {
        std::fs::write(&toolchain_file, file).unwrap();
        let embedded = rba(data.path())
            .arg("build")
            .arg(workspace.path())
            .assert()
            .failure();
        let err = stderr_of(embedded.get_output());
        assert!(err.contains(named), "embedded, {file:?}: {err}");
        let remote = rba(client_dir.path())
            .arg("build")
            .arg(workspace.path())
            .arg("--remote")
            .arg(&served.tcp)
            .assert()
            .failure();
        let err = stderr_of(remote.get_output());
        assert!(err.contains(named), "remote, {file:?}: {err}");
    }
    // The node still serves: `stable` is installed.
    std::fs::write(&toolchain_file, "[toolchain]\nchannel = \"stable\"\n").unwrap();
    rba(client_dir.path())
        .arg("build")
        .arg(workspace.path())
        .arg("--remote")
        .arg(&served.tcp)
        .assert()
        .success();
    served.stop();
}

#[test]
fn embedded_audit_reports_a_vulnerable_dependency_from_the_users_advisory_db() {
    // The user's own cargo-audit database (`$CARGO_HOME/advisory-db`), not a git checkout
    // here: a RustSec-layout directory naming the fixture's itoa as vulnerable.
    let cargo_home = tempfile::tempdir().unwrap();
    let advisories = cargo_home.path().join("advisory-db/crates/itoa");
    std::fs::create_dir_all(&advisories).unwrap();
    std::fs::write(
        advisories.join("RUSTSEC-2099-0009.md"),
        "```toml\n[advisory]\nid = \"RUSTSEC-2099-0009\"\npackage = \"itoa\"\n\
         date = \"2099-01-01\"\nurl = \"https://example.invalid/\"\n\n[versions]\n\
         patched = [\">= 9.9.9\"]\n```\n\n# itoa is made-up vulnerable\n\nFor rba's test.\n",
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let audited = rba(data.path())
        .env("CARGO_HOME", cargo_home.path())
        .arg("audit")
        .arg(fixture("registry-dep"))
        .assert()
        .failure();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&audited.get_output().stdout),
        stderr_of(audited.get_output())
    );
    assert!(output.contains("RUSTSEC-2099-0009"), "{output}");
    assert!(output.contains("1 vulnerability found"), "{output}");
}

#[test]
fn sigterm_lets_a_running_build_finish_and_refuses_new_ones() {
    let node_dir = tempfile::tempdir().unwrap();
    let mut served = Served::start(node_dir.path());
    // A build that is surely running when the node is told to stop: its script sleeps 4 s.
    let sleepy = fixture("sleepy");
    let client = tempfile::tempdir().unwrap();
    let build = Background::start(
        client.path(),
        &[
            "build".as_ref(),
            sleepy.as_os_str(),
            "--remote".as_ref(),
            served.tcp.as_ref(),
        ],
    );
    build.wait_for(true, "Compiling sleepy");
    served.terminate();

    // Readiness turns 503 for load balancers while it drains.
    let http = served.http.trim_start_matches("http://").to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&http).unwrap();
        write!(
            stream,
            "GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        if answer.starts_with("HTTP/1.1 503") {
            assert!(answer.contains("accepting_jobs"), "{answer}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still ready while draining: {answer}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // While it drains, a new build is refused, saying why.
    let late_client = tempfile::tempdir().unwrap();
    let late = rba(late_client.path())
        .args(["build"])
        .arg(fixture("hello"))
        .args(["--remote", &served.tcp])
        .timeout(std::time::Duration::from_secs(60))
        .assert()
        .failure();
    let err = stderr_of(late.get_output());
    assert!(err.contains("shutting down"), "{err}");

    // The running one ends as it would have, and so does the node.
    let (code, output) = build.wait(std::time::Duration::from_secs(120));
    assert_eq!(code, Some(0), "{output}");
    let status = served.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// `deploy/rba.service` is a unit systemd accepts, run against the binary under test.
#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/rba.service"),
    )
    .unwrap();
    let rba = assert_cmd::cargo::cargo_bin("rba");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rba.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/rba", &rba.display().to_string()),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (package systemd)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
}

#[test]
fn serve_print_config_layers_file_environment_and_flags_and_masks_tokens() {
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("node.toml");
    std::fs::write(
        &file,
        "[workers]\nslots = 3\nshutdown_grace_secs = 9\n[[auth.tokens]]\nname = \"ci\"\ntoken = \"file-secret-0123456789\"\naccess = \"read-write\"\n",
    )
    .unwrap();
    let out = rba(data.path())
        .args(["serve", "--print-config", "--config"])
        .arg(&file)
        .args(["--http", "off"])
        .env("RBA_WORKERS", "5")
        .env_remove("RBA_CONFIG")
        .assert()
        .success();
    let printed = String::from_utf8_lossy(&out.get_output().stdout).to_string();
    // The environment beats the file, a flag beats both, the file beats the defaults.
    assert!(printed.contains("[workers]\nslots = 5\n"), "{printed}");
    assert!(printed.contains("shutdown_grace_secs = 9"), "{printed}");
    assert!(printed.contains("[servers]\n"), "{printed}");
    assert!(printed.contains("\nhttp = \"off\"\n"), "{printed}");
    assert!(printed.contains("name = \"ci\""), "{printed}");
    assert!(!printed.contains("file-secret"), "{printed}");
    // Nothing was started or created: printing is all it did.
    assert!(!data.path().join("cas").exists() && !data.path().join("identity.key").exists());

    // A bad file is refused naming it.
    std::fs::write(&file, "no_such_key = 1\n").unwrap();
    let out = rba(data.path())
        .args(["serve", "--print-config", "--config"])
        .arg(&file)
        .env_remove("RBA_CONFIG")
        .assert()
        .failure();
    let stderr = stderr_of(out.get_output());
    assert!(
        stderr.contains("node.toml") && stderr.contains("no_such_key"),
        "{stderr}"
    );
}
