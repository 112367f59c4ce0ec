//! `reapi-bench` end to end at tiny sizes, so the bench the README's figures come from cannot
//! rot between benchmark sessions: against a real server on loopback (with a token, as a
//! deployed server would ask), every figure line is printed, each read is verified against its
//! digest (the bench fails otherwise), and the server-CPU figures appear when a server PID is
//! given (a PID that names no process is refused); embedded, the same figures without them.

mod common;

use std::process::Output;

use common::{RW_TOKEN, test_config, with_tokens};
use rba_cache_server::{RunningServer, Server};

/// Flags that shrink every phase to a second or so in a debug build.
const TINY: [&str; 14] = [
    "--throughput-gib",
    "0.01",
    "--big-blob-gib",
    "0.01",
    "--batch-blobs",
    "40",
    "--batch-blob-size",
    "1000",
    "--find-tasks",
    "2",
    "--find-calls",
    "2",
    "--read-streams",
    "3",
];

async fn bench(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_reapi-bench"))
            .args(TINY)
            .args(args)
            .env("RBA_LOG", "warn")
            .output()
            .expect("running reapi-bench")
    })
    .await
    .unwrap()
}

fn figures(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "reapi-bench failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

const EVERY_RUN: [&str; 10] = [
    "raw_sha256_hash_0.01GiB: ",
    "bytestream_write_0.01GiB: ",
    "bytestream_read_0.01GiB: ",
    "bytestream_read_0.01GiB_unverified: ",
    "bytestream_read_0.01GiB_x3_streams: ",
    "batch_update_40x1000B: ",
    "find_missing_1_digest: ",
    "find_missing_1000_digests: ",
    "find_missing_10000_digests: ",
    "peak_rss_streaming_0.01GiB: ",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reapi_bench_prints_every_figure_against_a_server_with_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::spawn(with_tokens(test_config(&dir.path().join("server"))))
        .await
        .unwrap();
    let endpoint = server.url().replacen("http://", "grpc://", 1);
    let work = dir.path().join("bench");
    let stdout = figures(
        &bench(vec![
            "--endpoint".into(),
            endpoint.clone(),
            "--token".into(),
            RW_TOKEN.into(),
            // This test process is the server's.
            "--server-pid".into(),
            std::process::id().to_string(),
            "--work-dir".into(),
            work.display().to_string(),
        ])
        .await,
    );
    for figure in EVERY_RUN {
        assert!(stdout.contains(figure), "no {figure:?} in:\n{stdout}");
    }
    for figure in [
        "bytestream_write_0.01GiB_server_cpu: ",
        "bytestream_read_0.01GiB_server_cpu: ",
        "bytestream_read_0.01GiB_unverified_server_cpu: ",
    ] {
        let line = stdout
            .lines()
            .find(|line| line.starts_with(figure))
            .unwrap_or_else(|| panic!("no {figure:?} in:\n{stdout}"));
        let seconds: f64 = line[figure.len()..]
            .split_whitespace()
            .next()
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no number in {line:?}"));
        assert!(seconds >= 0.0, "{line}");
    }

    // Without the token the server refuses, and the bench says so instead of printing figures.
    let refused = bench(vec![
        "--endpoint".into(),
        endpoint.clone(),
        "--work-dir".into(),
        work.display().to_string(),
    ])
    .await;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("Unauthenticated") || stderr.contains("token"),
        "{stderr}"
    );
    // A server PID that names no process: refused up front, naming it, not figures without
    // the server's lines. (PIDs never exceed 2^22 on Linux.)
    let no_such_pid = bench(vec![
        "--endpoint".into(),
        endpoint.clone(),
        "--token".into(),
        RW_TOKEN.into(),
        "--server-pid".into(),
        "4294967".into(),
        "--work-dir".into(),
        work.display().to_string(),
    ])
    .await;
    assert!(!no_such_pid.status.success());
    let stderr = String::from_utf8_lossy(&no_such_pid.stderr);
    assert!(
        stderr.contains("--server-pid 4294967: no process"),
        "{stderr}"
    );
    assert!(no_such_pid.stdout.is_empty(), "no figures printed");
    // Phases shrunk to nothing are refused by name, not a panic halfway through the figures.
    for (flag, value, named) in [
        ("--find-tasks", "0", "--find-tasks must be at least 1"),
        ("--batch-blobs", "0", "--batch-blobs must be at least 1"),
        (
            "--throughput-gib",
            "0",
            "--throughput-gib must be a positive size",
        ),
        (
            "--throughput-gib",
            "NaN",
            "--throughput-gib must be a positive size",
        ),
    ] {
        let refused = bench(vec![
            "--endpoint".into(),
            endpoint.clone(),
            "--token".into(),
            RW_TOKEN.into(),
            flag.into(),
            value.into(),
            "--work-dir".into(),
            work.display().to_string(),
        ])
        .await;
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{flag} {value}");
        assert!(stderr.contains(named), "{flag} {value}: {stderr}");
        assert!(!stderr.contains("panicked"), "{flag} {value}: {stderr}");
        assert!(
            refused.stdout.is_empty(),
            "{flag} {value}: no figures printed"
        );
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reapi_bench_runs_its_own_server_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = figures(
        &bench(vec![
            "--fsync".into(),
            "false".into(),
            "--work-dir".into(),
            dir.path().display().to_string(),
        ])
        .await,
    );
    assert!(stdout.contains("embedded rba cache-server"), "{stdout}");
    for figure in EVERY_RUN {
        assert!(stdout.contains(figure), "no {figure:?} in:\n{stdout}");
    }
    // The embedded server shares the bench's process: its CPU is not the server's alone.
    assert!(!stdout.contains("_server_cpu: "), "{stdout}");
}

/// `--versus`: the same blob is written to a second server and read from both in turn, each
/// round printed, then the medians; a second endpoint that cannot be reached, or no rounds,
/// is refused by name before any paired figure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reapi_bench_reads_a_second_endpoint_in_turn() {
    let dir = tempfile::tempdir().unwrap();
    let ours = Server::spawn(with_tokens(test_config(&dir.path().join("ours"))))
        .await
        .unwrap();
    let theirs = Server::spawn(with_tokens(test_config(&dir.path().join("theirs"))))
        .await
        .unwrap();
    let grpc = |server: &RunningServer| server.url().replacen("http://", "grpc://", 1);
    let work = dir.path().join("bench").display().to_string();
    let paired = |versus: String, rounds: &str| {
        let args: Vec<String> = [
            "--endpoint",
            &grpc(&ours),
            "--token",
            RW_TOKEN,
            "--versus",
            &versus,
            "--paired-reads",
            rounds,
            "--read-streams",
            "0",
            "--big-blob-gib",
            "0",
            "--work-dir",
            &work,
        ]
        .iter()
        .map(|arg| arg.to_string())
        .collect();
        bench(args)
    };
    let stdout = figures(&paired(grpc(&theirs), "3").await);
    for round in 1..=3 {
        let figure = format!("bytestream_read_0.01GiB_paired_round_{round}: ");
        let line = stdout
            .lines()
            .find(|line| line.starts_with(&figure))
            .unwrap_or_else(|| panic!("no {figure:?} in:\n{stdout}"));
        assert!(line.contains(" MiB/s vs ") && line.ends_with('x'), "{line}");
    }
    assert!(!stdout.contains("_paired_round_4"), "{stdout}");
    let summary = stdout
        .lines()
        .find(|line| line.starts_with("bytestream_read_0.01GiB_paired: "))
        .unwrap_or_else(|| panic!("no paired summary in:\n{stdout}"));
    assert!(
        summary.contains(&format!("at {}", theirs.url())) && summary.contains("median ratio"),
        "{summary}"
    );

    let no_rounds = paired(grpc(&theirs), "0").await;
    assert!(!no_rounds.status.success());
    let stderr = String::from_utf8_lossy(&no_rounds.stderr);
    assert!(
        stderr.contains("--paired-reads must be at least 1 with --versus"),
        "{stderr}"
    );
    assert!(no_rounds.stdout.is_empty(), "no figures printed");

    // Nothing listens on the second endpoint: the run fails, naming it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = format!("grpc://{}", closed.local_addr().unwrap());
    drop(closed);
    let unreachable = paired(nowhere.clone(), "2").await;
    assert!(!unreachable.status.success());
    let stderr = String::from_utf8_lossy(&unreachable.stderr);
    assert!(
        stderr.contains(&nowhere.replacen("grpc://", "http://", 1)),
        "{stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&unreachable.stdout).contains("_paired"),
        "no paired figure"
    );
    ours.shutdown().await.unwrap();
    theirs.shutdown().await.unwrap();
}
