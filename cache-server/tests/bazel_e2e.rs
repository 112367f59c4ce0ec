//! A real REAPI client: Bazel (Debian's `bazel-bootstrap`, 4.2.3) builds a small genrule
//! workspace against our server, `bazel clean`s, and builds again: every action must be a remote
//! cache hit and the outputs byte-identical. Then once more with `--remote_download_minimal`.
//!
//! And as a remote executor (`--remote_executor`): every action of the first build runs in our
//! sandbox ("6 remote", nothing local), the outputs are right, after `bazel clean` every action
//! is a remote cache hit, and a failing genrule reports its exit code and stderr through Bazel.
//!
//! Bazel runs in `--batch` mode with its output root and HOME in a temp directory, never
//! touching the network (genrules need no external repositories). Without Bazel this test
//! FAILS, asking to run `.ci/setup.d/bazel.sh`, unless `RBA_SKIP_BAZEL=1`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use rba_cache_server::resource_name::{self, Compressor};
use rba_cas::DigestFunction;

const INSTANCE: &str = "ci/linux";

/// Genrules: a chain, a fan-in, a source input, two outputs from one action, and a 5 MB output
/// (more than one gRPC message, so ByteStream streams it in several chunks).
const BUILD: &str = r#"
genrule(name = "a", outs = ["a.txt"], cmd = "echo 'hello from bazel' > $@")
genrule(name = "b", srcs = [":a"], outs = ["b.txt"], cmd = "tr a-z A-Z < $< > $@")
genrule(name = "c", srcs = [":a", ":b"], outs = ["c1.txt", "c2.txt"],
        cmd = "cat $(location :a) $(location :b) > $(location c1.txt) && rev $(location :a) > $(location c2.txt)")
genrule(name = "big", outs = ["big.bin"],
        cmd = "i=0; while [ $$i -lt 80000 ]; do echo \"line $$i of a big deterministic output....................................\"; i=$$((i+1)); done > $@")
genrule(name = "src", srcs = ["input.txt"], outs = ["src.txt"], cmd = "sort $< > $@")
genrule(name = "final", srcs = [":c", ":big", ":src"], outs = ["all.txt"],
        cmd = "wc -c $(SRCS) | sort > $@")
"#;
const ACTIONS: usize = 6;
const OUTPUTS: [&str; 7] = [
    "a.txt", "b.txt", "c1.txt", "c2.txt", "big.bin", "src.txt", "all.txt",
];

fn bazel_available() -> bool {
    Command::new("bazel")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// How Bazel uses the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Remote {
    /// `--remote_cache`, actions run locally.
    Cache,
    /// `--remote_executor`, actions run on the server.
    Executor,
}

struct Bazel {
    workspace: PathBuf,
    output_root: PathBuf,
    home: PathBuf,
    port: u16,
    remote: Remote,
    _tmp: tempfile::TempDir,
}

impl Bazel {
    /// The test workspace (BUILD, input.txt) in a fresh temp directory, for a server on `port`.
    fn new(port: u16, remote: Remote) -> Bazel {
        let tmp = tempfile::tempdir().unwrap();
        let workspace = tmp.path().join("ws");
        std::fs::create_dir_all(&workspace).unwrap();
        std::fs::write(
            workspace.join("WORKSPACE"),
            "workspace(name = \"rba_e2e\")\n",
        )
        .unwrap();
        std::fs::write(workspace.join("BUILD"), BUILD).unwrap();
        std::fs::write(workspace.join("input.txt"), "zebra\napple\nmango\n").unwrap();
        let bazel = Bazel {
            workspace,
            output_root: tmp.path().join("output_root"),
            home: tmp.path().join("home"),
            port,
            remote,
            _tmp: tmp,
        };
        std::fs::create_dir_all(&bazel.home).unwrap();
        bazel
    }

    /// Runs a bazel command (`build` builds `//:final` unless `extra` names targets); returns
    /// combined stdout+stderr, panicking with it on failure.
    fn run(&self, command: &str, extra: &[&str]) -> String {
        let (ok, text) = self.try_run(command, extra);
        assert!(ok, "bazel {command} {extra:?} failed:\n{text}");
        text
    }

    /// Runs a bazel command; returns whether it succeeded and its combined output.
    fn try_run(&self, command: &str, extra: &[&str]) -> (bool, String) {
        let remote = match self.remote {
            Remote::Cache => format!("--remote_cache=grpc://127.0.0.1:{}", self.port),
            Remote::Executor => format!("--remote_executor=grpc://127.0.0.1:{}", self.port),
        };
        let strategy = match self.remote {
            Remote::Cache => "--spawn_strategy=local",
            Remote::Executor => "--spawn_strategy=remote",
        };
        let mut args: Vec<String> = vec![
            "--batch".into(),
            format!("--output_user_root={}", self.output_root.display()),
            "--nohome_rc".into(),
            "--noworkspace_rc".into(),
            command.into(),
        ];
        if command == "build" {
            args.extend(
                [
                    remote.as_str(),
                    "--remote_instance_name=ci/linux",
                    strategy,
                    "--remote_timeout=60",
                    "--color=no",
                    "--curses=no",
                    "--noshow_progress",
                ]
                .map(String::from),
            );
            if !extra.iter().any(|a| a.starts_with("//")) {
                args.push("//:final".into());
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let output = Command::new("bazel")
            .args(&args)
            .current_dir(&self.workspace)
            .env("HOME", &self.home)
            .env_remove("BAZELISK_HOME")
            .env("http_proxy", "http://127.0.0.1:9") // never the network
            .env("https_proxy", "http://127.0.0.1:9")
            .output()
            .expect("bazel runs");
        let text = format!(
            "bazel {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    }

    /// Runs `f` (blocking Bazel calls) from an async test without stalling the runtime.
    fn blocking<T>(&self, f: impl FnOnce(&Bazel) -> T) -> T {
        tokio::task::block_in_place(|| f(self))
    }

    fn outputs(&self) -> BTreeMap<&'static str, Vec<u8>> {
        OUTPUTS
            .iter()
            .map(|name| {
                (
                    *name,
                    std::fs::read(self.workspace.join("bazel-bin").join(name)).unwrap_or_default(),
                )
            })
            .collect()
    }
}

/// The count of the "N remote cache hit" process summary, 0 if absent.
fn remote_cache_hits(log: &str) -> usize {
    summary_count(log, "remote cache hit")
}

/// In "INFO: 7 processes: 1 internal, 6 remote cache hit.", the number before `kind`.
fn summary_count(log: &str, kind: &str) -> usize {
    let Some(line) = log
        .lines()
        .find(|l| l.contains(" processes: ") || l.contains(" process: "))
    else {
        panic!("no process summary in bazel's output:\n{log}");
    };
    line.split(':')
        .nth(2)
        .unwrap_or("")
        .split(',')
        .filter_map(|part| {
            let part = part.trim().trim_end_matches('.');
            let (count, what) = part.split_once(' ')?;
            (what == kind)
                .then(|| count.parse::<usize>().ok())
                .flatten()
        })
        .sum()
}

/// False (after saying so) when `RBA_SKIP_BAZEL=1`; fails when Bazel is missing otherwise.
fn bazel_wanted() -> bool {
    if std::env::var("RBA_SKIP_BAZEL").as_deref() == Ok("1") {
        eprintln!("RBA_SKIP_BAZEL=1: skipping the Bazel end-to-end test");
        return false;
    }
    assert!(
        bazel_available(),
        "`bazel` is not installed: run .ci/setup.d/bazel.sh (installs Debian's bazel-bootstrap), \
         or set RBA_SKIP_BAZEL=1 to skip this test"
    );
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bazel_builds_are_all_remote_cache_hits_after_clean() {
    if !bazel_wanted() {
        return;
    }
    let server = TestServer::start().await;
    let bazel = Bazel::new(server.running().addr.port(), Remote::Cache);
    let run = |command: &str, extra: &[&str]| bazel.blocking(|b| b.run(command, extra));

    // 1. Cold: everything runs locally and is uploaded.
    let cold = run("build", &[]);
    assert_eq!(remote_cache_hits(&cold), 0, "{cold}");
    assert_eq!(summary_count(&cold, "local"), ACTIONS, "{cold}");
    let expected = bazel.outputs();
    assert!(
        expected.values().all(|bytes| !bytes.is_empty()),
        "every output was built"
    );
    assert!(
        expected["big.bin"].len() > 4 << 20,
        "big output spans several messages"
    );
    assert_eq!(
        server.running().embedded.as_ref().unwrap().actions.len(),
        ACTIONS,
        "one action result per genrule"
    );

    // 2. After clean: every action a remote cache hit, outputs byte-identical.
    run("clean", &[]);
    assert!(!bazel.workspace.join("bazel-bin").join("a.txt").exists());
    let warm = run("build", &[]);
    assert_eq!(remote_cache_hits(&warm), ACTIONS, "{warm}");
    assert_eq!(summary_count(&warm, "local"), 0, "{warm}");
    assert_eq!(
        bazel.outputs(),
        expected,
        "outputs from the cache are byte-identical"
    );

    // 3. After clean, with --remote_download_minimal: still all hits (nothing downloaded).
    run("clean", &[]);
    let minimal = run("build", &["--remote_download_minimal"]);
    assert_eq!(remote_cache_hits(&minimal), ACTIONS, "{minimal}");
    // The outputs Bazel did not download are in our CAS, byte-identical.
    let mut clients = server.clients().await;
    for (name, bytes) in &expected {
        let digest = DigestFunction::Sha256.digest_of(bytes);
        let read = clients
            .read(
                &resource_name::read_name(INSTANCE, &digest, Compressor::Identity),
                0,
                0,
            )
            .await;
        assert_eq!(
            read.as_deref().ok(),
            Some(bytes.as_slice()),
            "{name} in the CAS"
        );
    }

    // The metrics saw it all.
    let metrics = http_get(server.running().metrics_addr.unwrap(), "/metrics").await;
    let hits = metrics
        .lines()
        .find_map(|l| l.strip_prefix("rba_cache_action_cache_hits_total "))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    assert!(hits >= 2 * ACTIONS, "{metrics}");
}

/// A genrule that fails remotely, for the executor test (not part of `//:final`).
const FAILING: &str = r#"
genrule(name = "fails", outs = ["never.txt"], cmd = "echo 'boom from the sandbox' >&2; exit 7")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bazel_remote_execution_runs_every_action_remotely_then_all_hits_after_clean() {
    if !bazel_wanted() {
        return;
    }
    let server = TestServer::start_executing().await;
    let bazel = Bazel::new(server.running().addr.port(), Remote::Executor);
    let run = |command: &str, extra: &[&str]| bazel.blocking(|b| b.run(command, extra));

    // 1. Cold: every action executed by our server, none locally.
    let cold = run("build", &[]);
    assert_eq!(summary_count(&cold, "remote"), ACTIONS, "{cold}");
    assert_eq!(summary_count(&cold, "local"), 0, "{cold}");
    assert_eq!(summary_count(&cold, "linux-sandbox"), 0, "{cold}");
    assert_eq!(remote_cache_hits(&cold), 0, "{cold}");
    let executor = server.running().state.executor.clone().unwrap();
    assert_eq!(executor.jobs().len(), ACTIONS, "one job per genrule");
    assert_eq!(
        server.running().embedded.as_ref().unwrap().actions.len(),
        ACTIONS
    );
    let built = bazel.outputs();
    assert_eq!(built["a.txt"], b"hello from bazel\n");
    assert_eq!(built["b.txt"], b"HELLO FROM BAZEL\n");
    assert_eq!(built["c1.txt"], b"hello from bazel\nHELLO FROM BAZEL\n");
    assert_eq!(built["c2.txt"], b"lezab morf olleh\n");
    assert_eq!(built["src.txt"], b"apple\nmango\nzebra\n");
    assert!(
        built["big.bin"].len() > 4 << 20,
        "big output spans several messages"
    );
    assert!(
        String::from_utf8_lossy(&built["all.txt"]).contains("6148890 bazel-out/"),
        "{}",
        String::from_utf8_lossy(&built["all.txt"])
    );

    // 2. After clean: every action a remote cache hit, nothing executed, same outputs.
    run("clean", &[]);
    let warm = run("build", &[]);
    assert_eq!(remote_cache_hits(&warm), ACTIONS, "{warm}");
    assert_eq!(summary_count(&warm, "remote"), 0, "{warm}");
    assert_eq!(executor.jobs().len(), ACTIONS, "no action executed again");
    assert_eq!(bazel.outputs(), built);

    // 3. A failing action: Bazel reports its exit code and stderr from the remote run.
    std::fs::write(bazel.workspace.join("BUILD"), format!("{BUILD}{FAILING}")).unwrap();
    let (ok, failed) = bazel.blocking(|b| b.try_run("build", &["//:fails"]));
    assert!(!ok, "{failed}");
    assert!(failed.contains("boom from the sandbox"), "{failed}");
    assert!(failed.to_lowercase().contains("exit 7"), "{failed}");
}

#[test]
fn summary_parsing() {
    let log = "INFO: Elapsed time: 1.3s\nINFO: 7 processes: 1 internal, 6 remote cache hit.\n";
    assert_eq!(remote_cache_hits(log), 6);
    assert_eq!(
        summary_count("INFO: 3 processes: 1 internal, 2 local.", "local"),
        2
    );
    assert_eq!(
        summary_count("INFO: 1 process: 1 internal.", "remote cache hit"),
        0
    );
    let _ = Path::new("unused");
}
