//! Scale-out end to end, with the real binaries: one `rba serve` front end and two `rba
//! worker` processes over a real PostgreSQL ([`TestPostgres`]) and a real S3-compatible server
//! ([`TestS3`], moto), joined by `RBA_DATABASE_URL` and `RBA_STORE_URL` alone.
//!
//! What it proves: a REAPI Execute runs on a worker and its output is served by the front end;
//! a cargo build through the front end (`rba build --remote`) gets its binary back; a worker
//! killed with SIGKILL mid-job loses the job to the other worker, which finishes it once; after
//! every process restarted (fresh local dirs for the front end and the workers) the earlier
//! result is a cache hit served from the bucket and the database, and the new front end lists
//! the earlier build and serves its log (the history is in the database); `cache-server` as a
//! second front end answers WaitExecution for an operation the first one took; a worker
//! drains and exits 0
//! on SIGTERM; `/ready` reports the shared state; and a broken store or database URL stops
//! `rba serve` and `rba worker` with an error naming the variable.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rba_agent::history::postgres::PgHistory;
use rba_agent::history::{BuildRecord, History};
use rba_cas::backends::postgres::Postgres;
use rba_cas::{Digest, DigestFunction};
use rba_e2e_tests::postgres::TestPostgres;
use rba_e2e_tests::s3::TestS3;
use rba_proto::Message;
use rba_proto::longrunning::operation;
use rba_proto::reapi::{self, digest_function};
use tonic::transport::Channel;

const SHA: DigestFunction = DigestFunction::Sha256;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// The deployment's shared settings: the two URLs, the bucket's `AWS_*` variables, and a
/// config file with short leases (a killed worker's job moves within seconds).
struct Deployment {
    pg: TestPostgres,
    s3: TestS3,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Deployment {
    fn start() -> Deployment {
        let pg = TestPostgres::start();
        let s3 = TestS3::start();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("rba.toml");
        std::fs::write(
            &config,
            "public_read = true\n\
             [workers]\n\
             shutdown_grace_secs = 5\n\
             [scheduler]\n\
             lease_secs = 3\n\
             heartbeat_secs = 1\n\
             prefer_grace_secs = 1\n\
             queue_timeout_secs = 60\n\
             poll_interval_ms = 200\n\
             reap_interval_secs = 1\n",
        )
        .unwrap();
        Deployment {
            pg,
            s3,
            config,
            _dir: dir,
        }
    }

    fn command(&self, data_dir: &Path) -> Command {
        let mut command = self.binary("rba");
        command.arg("--data-dir").arg(data_dir);
        command
    }

    /// One of the binaries, joined to the deployment by the two URLs and the bucket's `AWS_*`.
    fn binary(&self, name: &str) -> Command {
        let mut command = Command::new(assert_cmd::cargo::cargo_bin(name));
        command
            .env_remove("RBA_DATA_DIR")
            .env_remove("RBA_CONFIG")
            .env_remove("RBA_WORKERS")
            .env("RBA_DATABASE_URL", self.pg.url())
            .env("RBA_STORE_URL", self.s3.url())
            .env("RBA_LOG", "info,rba_cas=warn");
        for (key, value) in self.s3.env() {
            command.env(key, value);
        }
        command
    }

    fn serve(&self, data_dir: &Path) -> Process {
        let mut command = self.command(data_dir);
        command.args([
            "serve",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--http",
            "127.0.0.1:0",
            "--grpc",
            "127.0.0.1:0",
            "--no-fsync",
            "--config",
        ]);
        command.arg(&self.config);
        Process::start(
            command,
            &["rba: listening on ", "rba: http on ", "rba: reapi on "],
        )
    }

    /// `cache-server` as a front end: the same file and variables, the REAPI face alone.
    fn cache_server(&self, data_dir: &Path) -> Process {
        let mut command = self.binary("cache-server");
        command
            .env_remove("RBA_CACHE_CONFIG")
            .env("NO_COLOR", "1")
            .args([
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "off",
                "--fsync",
                "false",
                "--data-dir",
            ])
            .arg(data_dir)
            .arg("--config")
            .arg(&self.config);
        // Its address is in its log ("serving REAPI addr=…"), not on stdout.
        let process = Process::start(command, &[]);
        let started = Instant::now();
        loop {
            let log = process.stderr();
            if let Some(addr) = log
                .lines()
                .filter(|line| line.contains("serving REAPI"))
                .find_map(|line| line.split("addr=").nth(1)?.split_whitespace().next())
            {
                let mut process = process;
                process.printed = vec![String::new(), String::new(), format!("grpc://{addr}")];
                return process;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "cache-server did not start: {log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn worker(&self, data_dir: &Path) -> Process {
        let mut command = self.command(data_dir);
        command.args(["worker", "--workers", "1", "--no-fsync", "--config"]);
        command.arg(&self.config);
        Process::start(command, &["rba: worker "])
    }
}

/// A running `rba` process: what it printed on stdout (the prefixes asked for) and its
/// stderr, collected as it comes.
struct Process {
    child: Child,
    printed: Vec<String>,
    stderr: Arc<Mutex<String>>,
}

impl Process {
    fn start(mut command: Command, prefixes: &[&str]) -> Process {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut text = sink.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut printed: Vec<String> = Vec::new();
        for prefix in prefixes {
            loop {
                let Some(Ok(line)) = lines.next() else {
                    panic!(
                        "rba exited before printing {prefix:?}: {}",
                        stderr.lock().unwrap()
                    );
                };
                if let Some(rest) = line.strip_prefix(prefix) {
                    printed.push(rest.to_string());
                    break;
                }
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Process {
            child,
            printed,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status (within 30 s).
    fn terminate(mut self) -> (std::process::ExitStatus, String) {
        Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100)); // the stderr reader's last lines
                return (status, self.stderr());
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "rba did not stop on SIGTERM: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn channel(front: &Process) -> Channel {
    let url = front.printed[2].replace("grpc://", "http://");
    tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn upload(channel: &Channel, blobs: &[&[u8]]) -> Vec<Digest> {
    let digests: Vec<Digest> = blobs.iter().map(|b| SHA.digest_of(b)).collect();
    let response = reapi::content_addressable_storage_client::ContentAddressableStorageClient::new(
        channel.clone(),
    )
    .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
        requests: blobs
            .iter()
            .zip(&digests)
            .map(
                |(bytes, digest)| reapi::batch_update_blobs_request::Request {
                    digest: Some(digest.to_reapi()),
                    data: bytes.to_vec(),
                    ..Default::default()
                },
            )
            .collect(),
        digest_function: digest_function::Value::Sha256 as i32,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner();
    for answer in response.responses {
        assert_eq!(answer.status.unwrap_or_default().code, 0);
    }
    digests
}

/// Stores `sh -c SCRIPT` over an input root holding `in.txt` (collecting `out.txt`) through
/// the front end's REAPI: the Action's digest.
async fn shell_action(channel: &Channel, script: &str) -> Digest {
    let input = b"input from the client\n".as_slice();
    let input_digest = SHA.digest_of(input);
    let root = reapi::Directory {
        files: vec![reapi::FileNode {
            name: "in.txt".into(),
            digest: Some(input_digest.to_reapi()),
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec();
    let command = reapi::Command {
        arguments: vec!["sh".into(), "-c".into(), script.into()],
        output_paths: vec!["out.txt".into()],
        ..Default::default()
    }
    .encode_to_vec();
    let digests = upload(channel, &[input, &root, &command]).await;
    let action = reapi::Action {
        command_digest: Some(digests[2].to_reapi()),
        input_root_digest: Some(digests[1].to_reapi()),
        ..Default::default()
    }
    .encode_to_vec();
    upload(channel, &[&action]).await[0]
}

/// Starts an Execute of `action`: its stream of operations.
async fn start_execute(
    channel: &Channel,
    action: Digest,
) -> tonic::Streaming<rba_proto::longrunning::Operation> {
    reapi::execution_client::ExecutionClient::new(channel.clone())
        .execute(reapi::ExecuteRequest {
            action_digest: Some(action.to_reapi()),
            digest_function: digest_function::Value::Sha256 as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// The response of the final operation of a stream (Execute or WaitExecution).
async fn final_response(
    stream: &mut tonic::Streaming<rba_proto::longrunning::Operation>,
) -> reapi::ExecuteResponse {
    loop {
        let operation = tokio::time::timeout(Duration::from_secs(90), stream.message())
            .await
            .expect("the operation ends")
            .unwrap()
            .expect("a final operation");
        if operation.done {
            let Some(operation::Result::Response(any)) = operation.result else {
                panic!("{operation:?}")
            };
            return reapi::ExecuteResponse::decode(any.value.as_slice()).unwrap();
        }
    }
}

async fn execute(channel: &Channel, action: Digest) -> reapi::ExecuteResponse {
    final_response(&mut start_execute(channel, action).await).await
}

/// The bytes of `out.txt` of a response, read from the front end.
async fn output(channel: &Channel, response: &reapi::ExecuteResponse) -> String {
    let result = response.result.as_ref().expect("a result");
    assert_eq!(result.exit_code, 0, "{response:?}");
    let file = result
        .output_files
        .iter()
        .find(|f| f.path == "out.txt")
        .expect("out.txt");
    let read = reapi::content_addressable_storage_client::ContentAddressableStorageClient::new(
        channel.clone(),
    )
    .batch_read_blobs(reapi::BatchReadBlobsRequest {
        digests: vec![file.digest.clone().unwrap()],
        digest_function: digest_function::Value::Sha256 as i32,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner();
    String::from_utf8(read.responses[0].data.to_vec()).unwrap()
}

fn claims(worker: &Process) -> usize {
    worker.stderr().matches("claimed a job").count()
}

fn http_get(front: &Process, path: &str) -> (u16, String) {
    let address = front.printed[1]
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let port: u16 = address.rsplit(':').next().unwrap().parse().unwrap();
    rba_e2e_tests::s3::http(port, "GET", path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_front_end_and_two_workers_over_postgres_and_a_bucket() {
    let deployment = Deployment::start();
    let front_dir = tempfile::tempdir().unwrap();
    let front = deployment.serve(front_dir.path());
    let (w1_dir, w2_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut workers = vec![
        deployment.worker(w1_dir.path()),
        deployment.worker(w2_dir.path()),
    ];
    assert_ne!(workers[0].printed[0], workers[1].printed[0], "worker ids");
    let channel = channel(&front).await;

    // /ready: the database, the bucket and a worker seen.
    let started = Instant::now();
    loop {
        let (status, body) = http_get(&front, "/ready");
        if status == 200 {
            assert!(body.contains("\"shared_store\":true"), "{body}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // (a) A REAPI Execute runs on a worker; the front end serves its output.
    let action = shell_action(&channel, "cat in.txt > out.txt; echo ran on a worker").await;
    let response = execute(&channel, action).await;
    assert!(!response.cached_result);
    assert_eq!(output(&channel, &response).await, "input from the client\n");
    assert_eq!(
        claims(&workers[0]) + claims(&workers[1]),
        1,
        "one worker ran it"
    );

    // (b) A cargo build through the front end's libp2p face gets its binary back.
    let client_dir = tempfile::tempdir().unwrap();
    let build = Command::new(assert_cmd::cargo::cargo_bin("rba"))
        .arg("--data-dir")
        .arg(client_dir.path())
        .arg("build")
        .arg(fixture("hello"))
        .arg("--remote")
        .arg(&front.printed[0])
        .env_remove("RBA_DATA_DIR")
        .env_remove("RBA_REMOTE")
        .env_remove("RBA_DATABASE_URL")
        .env_remove("RBA_STORE_URL")
        .env("XDG_CONFIG_HOME", client_dir.path().join("config"))
        .env("CARGO_TARGET_DIR", client_dir.path().join("local-target"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&build.stderr);
    assert!(build.status.success(), "{err}");
    assert!(err.contains("rba: success"), "{err}");
    let binary = client_dir.path().join("local-target/debug/hello");
    let ran = Command::new(&binary).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&ran.stdout),
        "Hello, rust-build-agent!\n"
    );

    // (c) SIGKILL of the worker running a job: the other one finishes it, once.
    let before = [claims(&workers[0]), claims(&workers[1])];
    let sleeper = shell_action(&channel, "sleep 4; cat in.txt > out.txt; echo slept").await;
    let running = {
        let channel = channel.clone();
        tokio::spawn(async move { execute(&channel, sleeper).await })
    };
    let started = Instant::now();
    let victim = loop {
        if let Some(victim) = (0..2).find(|&i| claims(&workers[i]) > before[i]) {
            break victim;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "nobody claimed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let survivor = 1 - victim;
    workers[victim].kill9();
    let killed_at = Instant::now();
    let response = running.await.unwrap();
    assert_eq!(output(&channel, &response).await, "input from the client\n");
    assert_eq!(
        claims(&workers[survivor]) - before[survivor],
        1,
        "the survivor ran it once: {}",
        workers[survivor].stderr()
    );
    assert!(killed_at.elapsed() < Duration::from_secs(40));

    // A worker drains and exits 0 on SIGTERM; the front end stops cleanly.
    let survivor = workers.remove(survivor);
    let (status, stderr) = survivor.terminate();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("rba: worker stopped"), "{stderr}");
    drop(workers);
    // No worker left: the front end is not ready, and says why.
    let started = Instant::now();
    loop {
        let (status, body) = http_get(&front, "/ready");
        if status == 503 {
            assert!(body.contains("no worker seen within"), "{body}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, stderr) = front.terminate();
    assert!(status.success(), "{stderr}");

    // (d) Every process restarted, every local dir fresh: the earlier result is a hit from the
    // shared state, its output served by the new front end.
    let front_dir = tempfile::tempdir().unwrap();
    let front = deployment.serve(front_dir.path());
    let worker_dir = tempfile::tempdir().unwrap();
    let worker = deployment.worker(worker_dir.path());
    let channel = self::channel(&front).await;
    // Its metrics count the shared store's blobs and the shared action cache's entries, not
    // its empty local tier and cache.
    let started = Instant::now();
    loop {
        let (_, metrics) = http_get(&front, "/metrics");
        let gauge = |name: &str| {
            metrics
                .lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|n| n.trim().parse::<u64>().ok())
        };
        if gauge("rba_cas_blobs").is_some_and(|n| n > 0)
            && gauge("rba_action_cache_entries").is_some_and(|n| n > 0)
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let action = shell_action(&channel, "cat in.txt > out.txt; echo ran on a worker").await;
    let response = execute(&channel, action).await;
    assert!(response.cached_result, "{response:?}");
    assert_eq!(output(&channel, &response).await, "input from the client\n");
    assert_eq!(claims(&worker), 0, "nothing ran again");

    // The build history is the database's: the new front end lists the cargo build of (b)
    // and serves its log, which its fresh local tier reads from the bucket.
    let (status, response) = http_get(&front, "/builds");
    assert_eq!(status, 200, "{response}");
    let body = response.split_once("\r\n\r\n").unwrap().1;
    let builds: serde_json::Value = serde_json::from_str(body).unwrap();
    let hello = builds
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["kind"] == "build" && b["status"] == "success")
        .unwrap_or_else(|| panic!("the build of (b) is not listed: {body}"));
    let id = hello["id"].as_str().unwrap();
    let (status, log) = http_get(&front, &format!("/builds/{id}/logs"));
    assert_eq!(status, 200, "{log}");
    assert!(log.contains("hello v0.1.0 (/workspace)"), "{log}");

    // (e) An operation is served by whichever front end a client reaches: a second front end
    // — `cache-server`, scaled out by the same file and variables — answers WaitExecution for
    // an Execute the first one took, its output read from there.
    let other_dir = tempfile::tempdir().unwrap();
    let other = deployment.cache_server(other_dir.path());
    let other_channel = self::channel(&other).await;
    let slow = shell_action(
        &channel,
        "sleep 2; cat in.txt > out.txt; echo waited elsewhere",
    )
    .await;
    let mut first = start_execute(&channel, slow).await;
    let name = first.message().await.unwrap().expect("an operation").name;
    // Another front end finds it once it is queued (REAPI clients retry Execute on a
    // NOT_FOUND): here, once the worker has claimed it.
    let started = Instant::now();
    while claims(&worker) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "nobody claimed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut waited = reapi::execution_client::ExecutionClient::new(other_channel.clone())
        .wait_execution(reapi::WaitExecutionRequest { name: name.clone() })
        .await
        .unwrap_or_else(|status| panic!("WaitExecution({name}) on the other front end: {status}"))
        .into_inner();
    let response = final_response(&mut waited).await;
    assert!(!response.cached_result);
    // A name built to hurt the queue's lookup is a plain unknown (or invalid) name, and the
    // front end goes on serving.
    for hostile in [
        "operations/x'); DELETE FROM rba_jobs; --",
        "operations/\u{0}\u{7f}\u{202e}",
    ] {
        let refused = reapi::execution_client::ExecutionClient::new(other_channel.clone())
            .wait_execution(reapi::WaitExecutionRequest {
                name: hostile.into(),
            })
            .await
            .unwrap_err();
        assert!(
            matches!(
                refused.code(),
                tonic::Code::NotFound | tonic::Code::InvalidArgument
            ),
            "{hostile:?}: {refused}"
        );
    }
    let operation =
        rba_proto::longrunning::operations_client::OperationsClient::new(other_channel.clone())
            .get_operation(rba_proto::longrunning::GetOperationRequest { name: name.clone() })
            .await
            .unwrap()
            .into_inner();
    assert!(operation.done && operation.name == name, "{operation:?}");
    assert_eq!(
        output(&other_channel, &response).await,
        "input from the client\n"
    );
    assert_eq!(claims(&worker), 1, "it ran once");
    let unknown = reapi::execution_client::ExecutionClient::new(other_channel)
        .wait_execution(reapi::WaitExecutionRequest {
            name: "operations/00000000-0000-0000-0000-000000000000".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown}");
    drop(worker);
    drop(other);
    drop(front);
}

fn record(id: &str, at_ms: u64, tenant: &str, status: &str) -> BuildRecord {
    serde_json::from_value(serde_json::json!({
        "id": id, "kind": "build", "release": false, "input_root": "", "action_digest": "",
        "client": null, "workspace": "w", "tenant": tenant, "submitted_at_ms": at_ms,
        "status": status, "exit_code": null, "cache_hit": false, "duration_ms": null,
        "steps": [], "log_digest": null, "lines": null, "artifacts": [], "error": null,
    }))
    .unwrap()
}

/// The build history in PostgreSQL, as two front ends over one database see it: one list,
/// newest first a page at a time (hidden records skipped, ids of one millisecond in bytewise
/// order, as the embedded history), counted without a scan, and each front end marking only
/// its own interrupted builds; a front end opened again migrates nothing and sees it all.
/// A database that stops answering is an error for writes and pages, and a miss for reads.
#[tokio::test]
async fn the_build_history_in_postgres_is_shared_by_the_front_ends() {
    let mut pg = TestPostgres::start();
    let postgres = Postgres::connect(&pg.url()).await.unwrap();
    let open = |front_end: &'static str| {
        let postgres = postgres.clone();
        async move {
            let store = PgHistory::open(&postgres, front_end).await.unwrap();
            History::over(Arc::new(store))
        }
    };
    let (a, b) = (open("front-a").await, open("front-b").await);
    assert_eq!(a.backend(), "postgres");
    for (id, at, tenant) in [
        ("x", 5, "me"),
        ("B", 5, "me"),
        ("a", 5, "me"),
        ("o", 1, "other"),
    ] {
        a.put(&record(id, at, tenant, "success")).await.unwrap();
    }
    b.put(&record("run-b", 9, "me", "running")).await.unwrap();
    a.put(&record("run-a", 8, "me", "running")).await.unwrap();
    // An outcome replaces its record: not a second one.
    a.put(&record("x", 5, "me", "failed")).await.unwrap();
    assert_eq!(a.count().await.unwrap(), 6, "both front ends' records");
    let mine = |r: BuildRecord| (r.tenant.as_deref() == Some("me")).then_some(r.id);
    let first = b.page(None, 3, mine).await.unwrap();
    assert_eq!(first.items, ["run-b", "run-a", "x"]);
    let rest = b.page(first.next.as_ref(), 3, mine).await.unwrap();
    assert_eq!(rest.items, ["a", "B"]);
    assert!(rest.next.is_none(), "only another tenant's record is left");
    assert_eq!(b.get("x").await.unwrap().status, "failed");
    assert!(b.get("nothing").await.is_none());
    // A record that does not decode (a newer version's, or damaged) is left out of pages and
    // lookups instead of failing them.
    postgres
        .pool()
        .get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO rba_builds (id, submitted_at_ms, running, front_end, tenant, record)
             VALUES ('damaged', 6, false, 'front-a', 'me', '{\"id\": 7')",
            &[],
        )
        .await
        .unwrap();
    let all = b.page(None, 10, mine).await.unwrap();
    assert_eq!(all.items, ["run-b", "run-a", "x", "a", "B"]);
    assert!(b.get("damaged").await.is_none());

    // An alias names one build per owner, across front ends.
    let mut aliased = record("al-1", 6, "me", "success");
    aliased.alias = Some("0xabc".into());
    a.put(&aliased).await.unwrap();
    let mut again = record("al-2", 7, "me", "success");
    again.alias = Some("0xabc".into());
    assert!(
        b.put(&again).await.is_err(),
        "a second build of one owner's alias"
    );
    let mut other_owner = record("al-3", 7, "other", "success");
    other_owner.alias = Some("0xabc".into());
    b.put(&other_owner).await.unwrap();
    let named: Vec<String> = b.aliased("0xabc").await.into_iter().map(|r| r.id).collect();
    assert_eq!(named, ["al-1", "al-3"]);

    // Front end a restarts: its running build is interrupted, b's is alive.
    let a = open("front-a").await;
    assert_eq!(a.mark_interrupted().await.unwrap(), 1);
    assert_eq!(a.get("run-a").await.unwrap().status, "error");
    assert_eq!(a.get("run-b").await.unwrap().status, "running");
    assert_eq!(a.mark_interrupted().await.unwrap(), 0);
    assert_eq!(
        postgres
            .schema_version(rba_agent::history::postgres::SCHEMA_COMPONENT)
            .await
            .unwrap(),
        Some(rba_agent::history::postgres::MIGRATIONS.len() as i32)
    );

    // The database stops: writes and pages fail naming it, reads miss (and so refuse).
    pg.stop();
    let error = a
        .put(&record("late", 10, "me", "success"))
        .await
        .unwrap_err();
    assert!(format!("{error:#}").contains("postgres"), "{error:#}");
    assert!(a.page(None, 5, mine).await.is_err());
    assert!(a.get("x").await.is_none());
    pg.start_again();
    let again = tokio::time::Instant::now();
    while a.get("x").await.is_none() {
        assert!(
            again.elapsed() < Duration::from_secs(20),
            "the history did not come back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.put(&record("late", 10, "me", "success")).await.unwrap();
    assert_eq!(
        b.count().await.unwrap(),
        9,
        "the refused alias was not counted"
    );
}

#[test]
fn broken_urls_stop_serve_and_worker_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let rba = |args: &[&str], vars: &[(&str, &str)]| {
        let mut command = Command::new(assert_cmd::cargo::cargo_bin("rba"));
        command
            .arg("--data-dir")
            .arg(dir.path())
            .args(args)
            .env_remove("RBA_DATA_DIR")
            .env_remove("RBA_CONFIG")
            .env_remove("RBA_DATABASE_URL")
            .env_remove("RBA_STORE_URL");
        for (key, value) in vars {
            command.env(key, value);
        }
        let output = command.output().unwrap();
        assert!(!output.status.success(), "{args:?} {vars:?} succeeded");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let serve = ["serve", "--listen", "/ip4/127.0.0.1/tcp/0", "--http", "off"];
    // A closed port: nothing listens on port 1.
    let closed = "postgres://rba@127.0.0.1:1/rba";
    for args in [&serve[..], &["worker"][..]] {
        let err = rba(
            args,
            &[
                ("RBA_STORE_URL", "gs://bucket"),
                ("RBA_DATABASE_URL", closed),
            ],
        );
        assert!(err.contains("RBA_STORE_URL"), "{err}");
        let err = rba(
            args,
            &[("RBA_STORE_URL", "s3://"), ("RBA_DATABASE_URL", closed)],
        );
        assert!(err.contains("RBA_STORE_URL"), "{err}");
        let err = rba(
            args,
            &[
                ("RBA_STORE_URL", "s3://bucket"),
                ("RBA_DATABASE_URL", closed),
            ],
        );
        assert!(err.contains("RBA_DATABASE_URL"), "{err}");
        let err = rba(args, &[("RBA_STORE_URL", "s3://bucket")]);
        assert!(err.contains("RBA_DATABASE_URL"), "{err}");
        let err = rba(args, &[("RBA_DATABASE_URL", closed)]);
        assert!(err.contains("RBA_STORE_URL"), "{err}");
    }
    // The worker has nothing to join without them.
    let err = rba(&["worker"], &[]);
    assert!(err.contains("RBA_DATABASE_URL"), "{err}");
    // --print-config masks the database password.
    let printed = Command::new(assert_cmd::cargo::cargo_bin("rba"))
        .args(["worker", "--print-config"])
        .env_remove("RBA_CONFIG")
        .env("RBA_DATABASE_URL", "postgres://rba:hunter2@db.example/rba")
        .env("RBA_STORE_URL", "s3://bucket/prefix")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&printed.stdout);
    assert!(printed.status.success());
    assert!(!text.contains("hunter2"), "{text}");
    assert!(
        text.contains("postgres://rba:********@db.example/rba"),
        "{text}"
    );
    assert!(text.contains("s3://bucket/prefix"), "{text}");
}
