//! The `cache-server` binary: `--help`, `--print-config` over the node's configuration schema,
//! serving, clean shutdown on SIGTERM and SIGINT, and a restart on the same data directory
//! that still serves what was cached. (Its scale-out mode is in `scale_out.rs`.)

#[path = "../../cache-server/tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use rba_cache_server::resource_name::{self, Compressor};
use rba_cas::DigestFunction;
use rba_executor::logstream::strip_ansi;
use rba_proto::reapi::{
    ActionResult, GetActionResultRequest, OutputFile, UpdateActionResultRequest,
};

const BIN: &str = env!("CARGO_BIN_EXE_cache-server");

struct Running {
    child: Child,
    addr: std::net::SocketAddr,
    log: mpsc::Receiver<String>,
}

fn start(data_dir: &std::path::Path) -> Running {
    start_with(data_dir, &[])
}

fn start_with(data_dir: &std::path::Path, extra: &[&str]) -> Running {
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
            "--fsync",
            "false",
        ])
        .args(extra)
        .arg("--data-dir")
        .arg(data_dir)
        .env("RBA_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .expect("cache-server starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server logs its address");
        let plain = strip_ansi(&line);
        if plain.contains("serving REAPI")
            && let Some(rest) = plain.split("addr=").nth(1)
        {
            break rest
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .expect("address");
        }
    };
    Running {
        child,
        addr,
        log: rx,
    }
}

fn stop(mut running: Running, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &running.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = running.child.wait().unwrap();
    assert!(exit.success(), "clean exit after {signal}: {exit:?}");
    let log: Vec<String> = running
        .log
        .try_iter()
        .map(|l| strip_ansi(&l).into_owned())
        .collect();
    assert!(
        log.iter().any(|l| l.contains("shut down cleanly")),
        "{log:#?}"
    );
}

async fn clients(addr: std::net::SocketAddr) -> Clients {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Clients::new(channel)
}

#[test]
fn json_logs_are_one_object_per_line() {
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .args(["--fsync", "false", "--log-format", "json"])
        .arg("--data-dir")
        .arg(data.path())
        .env("RBA_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("cache-server starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let serving = loop {
        let line = lines.next().expect("a log line").unwrap();
        let object: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"));
        assert!(
            object["level"].is_string() && object["timestamp"].is_string(),
            "{line}"
        );
        seen.push(line);
        if object["message"] == "serving REAPI" {
            break object;
        }
        assert!(seen.len() < 50, "{seen:#?}");
    };
    let addr: std::net::SocketAddr = serving["addr"].as_str().unwrap().parse().unwrap();
    assert_ne!(addr.port(), 0);
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let rest: Vec<serde_json::Value> = lines
        .map(|line| serde_json::from_str(&line.unwrap()).expect("JSON line"))
        .collect();
    assert!(child.wait().unwrap().success());
    assert!(
        rest.iter().any(|o| o["message"] == "shut down cleanly"),
        "{rest:#?}"
    );
}

#[test]
fn an_unknown_log_format_is_refused_naming_it() {
    let data = tempfile::tempdir().unwrap();
    for (args, env) in [(vec!["--log-format", "xml"], None), (vec![], Some("yaml"))] {
        let mut command = Command::new(BIN);
        command.args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"]);
        command.args(&args).arg("--data-dir").arg(data.path());
        if let Some(format) = env {
            command.env("RBA_LOG_FORMAT", format);
        }
        let out = command.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        let named = env.unwrap_or("xml");
        assert!(err.contains(named) && err.contains("log-format"), "{err}");
    }
}

#[test]
fn help_and_print_config() {
    let help = Command::new(BIN).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--listen",
        "--data-dir",
        "--config",
        "--token",
        "--metrics-listen",
        "RBA_CACHE_LISTEN",
        "127.0.0.1:50051",
        "--no-execution",
        "--executor-workers",
        "--remote_executor",
    ] {
        assert!(text.contains(flag), "--help mentions {flag}:\n{text}");
    }
    let printed = Command::new(BIN)
        .args([
            "--print-config",
            "--token",
            "ci:secret-token-1:read-write",
            "--listen",
            "127.0.0.1:6000",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&printed.stdout);
    assert!(
        printed.status.success(),
        "{}",
        String::from_utf8_lossy(&printed.stderr)
    );
    // The node's schema: the REAPI face alone, its metrics on their own port.
    for key in [
        "reapi = \"127.0.0.1:6000\"",
        "http = \"off\"",
        "libp2p = []",
        "metrics = \"127.0.0.1:50052\"",
        "[store]",
        "[reapi]\nexecution = true",
    ] {
        assert!(text.contains(key), "{key}: {text}");
    }
    assert!(!text.contains("secret-token-1"), "tokens are masked");
    // A node config file applies as it is; flags win over it.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.toml");
    std::fs::write(
        &file,
        "[servers]\nreapi = \"127.0.0.1:6001\"\n[workers]\nslots = 7\n[workers.limits]\n\
         memory = \"1G\"\n[reapi]\nmetrics = \"off\"\n",
    )
    .unwrap();
    let cache_only = Command::new(BIN)
        .arg("--config")
        .arg(&file)
        .args([
            "--print-config",
            "--no-execution",
            "--executor-workers",
            "3",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&cache_only.stdout);
    for key in [
        "reapi = \"127.0.0.1:6001\"",
        "[workers]\nslots = 3\n",
        "memory = \"1G\"",
        "[reapi]\nexecution = false\nmetrics = \"off\"",
    ] {
        assert!(text.contains(key), "{key}: {text}");
    }
    // A value that cannot be used stops the start (not a cache-only server), naming the key.
    std::fs::write(&file, "[workers.limits]\nmemory = \"lots\"\n").unwrap();
    let refused = assert_cmd::Command::new(BIN)
        .arg("--config")
        .arg(&file)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .timeout(Duration::from_secs(60))
        .output()
        .unwrap();
    let error = String::from_utf8_lossy(&refused.stderr);
    assert!(
        refused.status.code().is_some_and(|code| code != 0),
        "it exits by itself, failing: {:?} {error}",
        refused.status
    );
    assert!(error.contains("[workers.limits] memory"), "{error}");
    assert!(!error.contains("serving REAPI"), "{error}");
    std::fs::write(&file, "[reapi]\nmetrcs = \"off\"\n").unwrap();
    let typo = Command::new(BIN)
        .arg("--config")
        .arg(&file)
        .arg("--print-config")
        .output()
        .unwrap();
    assert!(!typo.status.success());
    let error = String::from_utf8_lossy(&typo.stderr);
    assert!(
        error.contains("metrcs") && error.contains("node.toml"),
        "{error}"
    );
    let refused = Command::new(BIN)
        .args(["--print-config", "--listen", "0.0.0.0:6000"])
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "open server off loopback without tokens is refused"
    );
    let error = String::from_utf8_lossy(&refused.stderr);
    assert!(
        error.contains("without tokens") && error.contains("--token NAME:TOKEN:read-write"),
        "the refusal names the fix: {error}"
    );
    let half = Command::new(BIN)
        .args(["--print-config", "--tls-cert", "/tmp/cert.pem"])
        .output()
        .unwrap();
    assert!(!half.status.success());
    assert!(String::from_utf8_lossy(&half.stderr).contains("--tls-cert and --tls-key go together"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_grpc_over_tls_with_a_token() {
    rba_cache_server::server::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_pem = certified.cert.pem();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let running = start_with(
        &dir.path().join("data"),
        &[
            "--no-execution",
            "--token",
            &format!("ci:{RW_TOKEN}:read-write"),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", running.addr))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&cert_pem))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = Clients::new(channel);
    let data = noise(100 << 10, 7);
    let digest = DigestFunction::Sha256.digest_of(&data);
    let write = c
        .write("main", &digest, &data, Compressor::Identity, 64 << 10)
        .await
        .unwrap_err();
    assert_eq!(
        write.code(),
        tonic::Code::Unauthenticated,
        "a token is needed"
    );
    let anonymous = c
        .cas
        .find_missing_blobs(rba_proto::reapi::FindMissingBlobsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);
    let missing = c
        .cas
        .find_missing_blobs(bearer(
            rba_proto::reapi::FindMissingBlobsRequest {
                blob_digests: vec![digest.to_reapi()],
                ..Default::default()
            },
            RW_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(missing.missing_blob_digests, vec![digest.to_reapi()]);
    // Plaintext to the TLS port gets no answer.
    let plaintext = tonic::transport::Channel::from_shared(format!("http://{}", running.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut plain = Clients::new(plaintext);
    assert!(
        plain
            .cas
            .find_missing_blobs(bearer(
                rba_proto::reapi::FindMissingBlobsRequest::default(),
                RW_TOKEN
            ))
            .await
            .is_err()
    );
    drop((c, plain));
    stop(running, "-TERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_shuts_down_cleanly_and_restarts_on_the_same_data() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path());
    let mut c = clients(running.addr).await;
    let data = noise(1 << 20, 42);
    let digest = DigestFunction::Sha256.digest_of(&data);
    c.write("main", &digest, &data, Compressor::Identity, 64 << 10)
        .await
        .unwrap();
    let action = DigestFunction::Sha256.digest_of(b"binary action");
    let result = ActionResult {
        output_files: vec![OutputFile {
            path: "out".into(),
            digest: Some(digest.to_reapi()),
            ..Default::default()
        }],
        ..Default::default()
    };
    c.ac.update_action_result(UpdateActionResultRequest {
        instance_name: "main".into(),
        action_digest: Some(action.to_reapi()),
        action_result: Some(result.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    drop(c);
    stop(running, "-TERM");

    let running = start(dir.path());
    let mut c = clients(running.addr).await;
    let hit =
        c.ac.get_action_result(GetActionResultRequest {
            instance_name: "main".into(),
            action_digest: Some(action.to_reapi()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hit, result);
    assert_eq!(
        c.read(
            &resource_name::read_name("main", &digest, Compressor::Identity),
            0,
            0
        )
        .await
        .unwrap(),
        data
    );
    drop(c);
    stop(running, "-INT");
}
