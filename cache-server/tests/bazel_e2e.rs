//! A real REAPI client: Bazel (Debian's `bazel-bootstrap`, 4.2.3) builds a small genrule
//! workspace against our server, `bazel clean`s, and builds again: every action must be a remote
//! cache hit and the outputs byte-identical. Then once more with `--remote_download_minimal`.
//!
//! Bazel runs in `--batch` mode with its output root and HOME in a temp directory, never
//! touching the network (genrules need no external repositories). Without Bazel this test
//! FAILS, asking to run `scripts/setup-bazel.sh`, unless `RBA_SKIP_BAZEL=1`.

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

struct Bazel {
    workspace: PathBuf,
    output_root: PathBuf,
    home: PathBuf,
    port: u16,
}

impl Bazel {
    /// Runs a bazel command; returns combined stdout+stderr, panicking with it on failure.
    fn run(&self, command: &str, extra: &[&str]) -> String {
        let remote = format!("--remote_cache=grpc://127.0.0.1:{}", self.port);
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
                    "--spawn_strategy=local",
                    "--remote_timeout=60",
                    "--color=no",
                    "--curses=no",
                    "--noshow_progress",
                    "//:final",
                ]
                .map(String::from),
            );
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
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success(),
            "bazel {} failed:\n{text}",
            args.join(" ")
        );
        text
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bazel_builds_are_all_remote_cache_hits_after_clean() {
    if std::env::var("RBA_SKIP_BAZEL").as_deref() == Ok("1") {
        eprintln!("RBA_SKIP_BAZEL=1: skipping the Bazel end-to-end test");
        return;
    }
    assert!(
        bazel_available(),
        "`bazel` is not installed: run scripts/setup-bazel.sh (installs Debian's bazel-bootstrap), \
         or set RBA_SKIP_BAZEL=1 to skip this test"
    );
    let server = TestServer::start().await;
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
        port: server.running().addr.port(),
    };
    std::fs::create_dir_all(&bazel.home).unwrap();

    let run = |command: &'static str, extra: &'static [&'static str]| {
        let bazel = &bazel;
        tokio::task::block_in_place(move || bazel.run(command, extra))
    };

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
        server.running().state.cas.actions.len(),
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
