//! `POST /execute` on a real node: real HTTP, the real sandbox, real cargo and rustc.

mod common;

use std::net::SocketAddr;

use common::node_with;
use rba_cache_server::auth::Access;
use rba_cache_server::config::TokenConfig;
use serde_json::{Value, json};

const RUNNER: &str = "runner-secret-token";
const OTHER: &str = "other-secret-token";
const VIEWER: &str = "viewer-secret-token";

/// A plain HTTP/1.1 POST; returns (status, body as JSON).
async fn post(addr: SocketAddr, token: Option<&str>, body: &str) -> (u16, Value) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json")];
    headers.extend(bearer.iter().map(|b| ("Authorization", b.as_str())));
    let (status, _, body) = common::http_request(addr, "POST", "/execute", &headers, body).await;
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

async fn run(addr: SocketAddr, request: Value) -> Value {
    let (status, answer) = post(addr, Some(RUNNER), &request.to_string()).await;
    assert_eq!(status, 200, "{request}: {answer}");
    answer
}

fn token(name: &str, secret: &str, access: Access) -> TokenConfig {
    TokenConfig {
        name: name.into(),
        token: secret.into(),
        access,
        tenants: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snippets_run_in_the_sandbox_with_their_limits_and_hostile_requests_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with(dir.path(), &[], |config| {
        config.auth.tokens = vec![
            token("runner", RUNNER, Access::ReadWrite),
            token("other", OTHER, Access::ReadWrite),
            token("viewer", VIEWER, Access::ReadOnly),
        ];
        config.execute.output_cap_bytes = 4096;
    })
    .await;
    let http = node.http_addr().unwrap();
    let hello = json!({"language": "rust", "code": "fn main() { println!(\"hello\"); }"});

    // Who may run: a read-write token only.
    let (status, answer) = post(http, None, &hello.to_string()).await;
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = post(http, Some("wrong"), &hello.to_string()).await;
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = post(http, Some(VIEWER), &hello.to_string()).await;
    assert_eq!(status, 403, "{answer}");
    // Malformed requests: 400 naming the field.
    for (body, field, says) in [
        ("{\"code\": ", "body", "EOF"),
        ("[1, 2]", "body", "invalid type"),
        (
            r#"{"code": "x", "shell": "rm -rf /"}"#,
            "body",
            "unknown field `shell`",
        ),
        (
            r#"{"language": "python", "code": "print(1)"}"#,
            "language",
            "python",
        ),
        (
            r#"{"code": "fn main(){}", "timeout": 0}"#,
            "timeout",
            "0 seconds",
        ),
        (
            r#"{"artifact": "blake3:../../etc/passwd/1"}"#,
            "artifact",
            "etc/passwd",
        ),
    ] {
        let (status, answer) = post(http, Some(RUNNER), body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["field"], field, "{body}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(says),
            "{body}: {answer}"
        );
    }

    // Hello world, then the same code again: compiled once, run twice.
    let first = run(http, hello.clone()).await;
    assert_eq!(first["status"], "success", "{first}");
    assert_eq!(first["exit_code"], 0);
    assert_eq!(first["stdout"], "hello\n");
    assert_eq!(first["compile_cached"], false);
    assert!(first["memory_usage_bytes"].as_u64().unwrap() > 0, "{first}");
    let again = run(http, hello.clone()).await;
    assert_eq!(again["stdout"], "hello\n");
    assert_eq!(again["compile_cached"], true, "{again}");

    // stdin and arguments reach the program; a stored binary runs again by digest.
    let echo = run(
        http,
        json!({"code": "use std::io::Read; fn main() { let mut s = String::new(); std::io::stdin().read_to_string(&mut s).unwrap(); let args: Vec<String> = std::env::args().skip(1).collect(); print!(\"{}|{}\", s.to_uppercase(), args.join(\",\")); }",
               "stdin": "echo me"}),
    )
    .await;
    // Output is kept line by line (as every log of the node): the last line ends with '\n'.
    assert_eq!(echo["stdout"], "ECHO ME|\n", "{echo}");
    let artifact = echo["artifact"].as_str().unwrap().to_string();
    let rerun = run(
        http,
        json!({"artifact": artifact, "args": ["a", "b c"], "stdin": "x"}),
    )
    .await;
    assert_eq!(rerun["stdout"], "X|a,b c\n", "{rerun}");
    // Another tenant cannot run it (its digest tells nothing), and an unknown one is the same.
    let (status, answer) = post(
        http,
        Some(OTHER),
        &json!({"artifact": artifact}).to_string(),
    )
    .await;
    assert_eq!(status, 404, "{answer}");
    let unknown = format!("blake3:{}/10", "ab".repeat(32));
    let (status, _) = post(
        http,
        Some(RUNNER),
        &json!({"artifact": unknown}).to_string(),
    )
    .await;
    assert_eq!(status, 404);

    // A compile error: rustc's diagnostics.
    let broken = run(http, json!({"code": "fn main() { let x: u32 = \"no\"; }"})).await;
    assert_eq!(broken["status"], "error", "{broken}");
    assert!(
        broken["stderr"]
            .as_str()
            .unwrap()
            .contains("mismatched types"),
        "{broken}"
    );

    // A panic: exit 101, the message on stderr.
    let panic = run(
        http,
        json!({"code": "fn main() { panic!(\"on purpose\"); }"}),
    )
    .await;
    assert_eq!(panic["status"], "error", "{panic}");
    assert_eq!(panic["exit_code"], 101);
    assert!(
        panic["stderr"].as_str().unwrap().contains("on purpose"),
        "{panic}"
    );

    // An endless loop ends at its timeout.
    let endless = run(
        http,
        json!({"code": "fn main() { loop { std::hint::spin_loop(); } }", "timeout": 2}),
    )
    .await;
    assert_eq!(endless["status"], "timeout", "{endless}");
    assert!(
        endless["execution_time_ms"].as_u64().unwrap() >= 2000,
        "{endless}"
    );

    // A memory hog ends at its memory limit.
    let hog = run(
        http,
        json!({"code": "fn main() { let mut v: Vec<Vec<u8>> = Vec::new(); loop { v.push(vec![1u8; 1 << 20]); } }",
               "memory": "64M", "timeout": 20}),
    )
    .await;
    assert_eq!(hog["status"], "memory", "{hog}");

    // A fork bomb hits the process limit, and the node goes on serving.
    let bomb = run(
        http,
        json!({"code": "fn main() { let mut children = Vec::new(); loop { match std::process::Command::new(\"/bin/sleep\").arg(\"30\").spawn() { Ok(c) => children.push(c), Err(e) => { eprintln!(\"spawn refused after {}: {e}\", children.len()); std::process::exit(3); } } } }",
               "timeout": 20}),
    )
    .await;
    assert_eq!(bomb["status"], "error", "{bomb}");
    assert!(
        bomb["stderr"].as_str().unwrap().contains("spawn refused"),
        "{bomb}"
    );

    // Output beyond the cap is cut, and says so.
    let loud = run(
        http,
        json!({"code": "fn main() { for i in 0..10000 { println!(\"line {i}\"); } }"}),
    )
    .await;
    assert_eq!(loud["status"], "success", "{loud}");
    assert_eq!(loud["stdout_truncated"], true);
    assert!(loud["stdout"].as_str().unwrap().len() <= 4096);
    assert!(loud["stdout"].as_str().unwrap().starts_with("line 0\n"));

    let after = run(http, hello).await;
    assert_eq!(after["stdout"], "hello\n", "the node still serves: {after}");
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_queue_the_answer_is_resource_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with(dir.path(), &[], |config| {
        config.auth.tokens = vec![token("runner", RUNNER, Access::ReadWrite)];
        config.execute.max_concurrent_executions = 1;
        config.execute.max_queued = 0;
    })
    .await;
    let http = node.http_addr().unwrap();
    let slow = json!({"code": "fn main() { std::thread::sleep(std::time::Duration::from_secs(8)); }", "timeout": 30});
    let running = tokio::spawn(async move { post(http, Some(RUNNER), &slow.to_string()).await });
    // Nothing else runs: the slow one takes the only turn as soon as it arrives.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let (status, answer) = post(
        http,
        Some(RUNNER),
        &json!({"code": "fn main() {}"}).to_string(),
    )
    .await;
    assert_eq!(status, 429, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .starts_with("RESOURCE_EXHAUSTED"),
        "{answer}"
    );
    let (status, answer) = running.await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "success", "{answer}");
    node.shutdown().await.unwrap();
}
