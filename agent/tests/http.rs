//! The HTTP face with real clients: WebSocket events (tokio-tungstenite) in the exact JSON
//! format, the read-only queries, and who may read them (tokens, `--public-read`).

mod common;

use std::net::SocketAddr;

use common::{Client, fixture, lines_of, node_with, slow_crate, stored_lines};
use futures::StreamExt;
use rba_agent::node::Node;
use rba_agent::p2p::session::SessionEvent;
use rba_cache_server::auth::Access;
use rba_cache_server::config::TokenConfig;
use rba_executor::cargo::JobKind;
use rba_executor::runner::JobState;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// A node whose build views are open to everyone (`--public-read`).
async fn public_node(dir: &std::path::Path) -> Node {
    node_with(dir, &[], |config| config.public_read = true).await
}

/// A plain HTTP/1.1 GET; returns (status, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    get_with(addr, path, None).await
}

/// A plain HTTP/1.1 GET with an optional bearer token; returns (status, body).
async fn get_with(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|b| ("Authorization", b.as_str()))
        .collect();
    let (status, _, body) = common::http_request(addr, "GET", path, &headers, "").await;
    (status, body)
}

/// Every JSON message of a session's event socket, until the server closes it.
async fn events(addr: SocketAddr, session: &str, from_seq: u64) -> Vec<Value> {
    events_with(addr, session, from_seq, "").await
}

/// The same with extra query parameters (`&token=…`).
async fn events_with(addr: SocketAddr, session: &str, from_seq: u64, query: &str) -> Vec<Value> {
    let url = format!("ws://{addr}/v1/sessions/{session}/events?from_seq={from_seq}{query}");
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut out = Vec::new();
    while let Some(message) = socket.next().await {
        match message.unwrap() {
            Message::Text(text) => out.push(serde_json::from_str(&text).unwrap()),
            Message::Close(_) => break,
            _ => {}
        }
    }
    out
}

fn keys(value: &Value) -> Vec<String> {
    let mut keys: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_events_stream_live_lines_then_the_end_in_the_exact_format() {
    let dir = tempfile::tempdir().unwrap();
    let node = public_node(dir.path().join("node").as_path()).await;
    let http = node.http_addr().unwrap();
    let client = Client::connect(&node).await;
    let slow = slow_crate(dir.path(), 30, 60);
    let tree = client.hash(&slow).await;

    // Submit in the background; take the session id from Accepted.
    let (id_tx, id_rx) = tokio::sync::oneshot::channel();
    let remote = client.remote.clone();
    let blobs = client.cas.blobs.clone();
    let submit = Client::submit(JobKind::Test, &tree, &["--", "--nocapture"]);
    let tree_blobs = tree.blobs.clone();
    let job = tokio::spawn(async move {
        let mut id_tx = Some(id_tx);
        remote
            .run(&blobs, &tree_blobs, submit, |event| {
                if let SessionEvent::Accepted(accepted) = event
                    && let Some(tx) = id_tx.take()
                {
                    let _ = tx.send(accepted.session_id.clone());
                }
            })
            .await
            .unwrap()
    });
    let id = id_rx.await.unwrap();

    let url = format!("ws://{http}/v1/sessions/{id}/events?from_seq=0");
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut messages = Vec::new();
    let mut first_line_while_running = None;
    while let Some(message) = socket.next().await {
        match message.unwrap() {
            Message::Text(text) => {
                let value: Value = serde_json::from_str(&text).unwrap();
                if first_line_while_running.is_none() && value["type"] == "log" {
                    let state = node.shared().executor.job(&id).unwrap().state();
                    first_line_while_running = Some(!matches!(state, JobState::Done(_)));
                }
                messages.push(value);
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    assert_eq!(first_line_while_running, Some(true), "lines arrive live");
    let result = job.await.unwrap();
    let (end, logs) = messages.split_last().unwrap();
    for log in logs {
        assert_eq!(keys(log), ["line", "session_id", "type"], "{log}");
        assert_eq!(log["type"], "log");
        assert_eq!(log["session_id"], id.as_str());
    }
    let lines: Vec<String> = logs
        .iter()
        .map(|l| l["line"].as_str().unwrap().to_string())
        .collect();
    let stored: Vec<String> = stored_lines(&node, &result)
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    assert_eq!(lines, stored);
    assert_eq!(
        keys(end),
        ["binary_hash", "duration_ms", "session_id", "status", "type"],
        "{end}"
    );
    assert_eq!(end["type"], "end");
    assert_eq!(end["status"], "success");
    assert_eq!(end["session_id"], id.as_str());
    assert_eq!(
        end["duration_ms"].as_u64().unwrap(),
        result.body().duration_ms
    );

    // A finished build from a later line: the rest, and the main artifact's hash.
    let (built, built_events) = client.run(JobKind::Build, &fixture("hello"), &[]).await;
    let hello = built
        .body()
        .artifacts
        .iter()
        .find(|a| a.path == "target/debug/hello")
        .unwrap();
    let replay = events(http, &built.session_id, 1).await;
    let (end, logs) = replay.split_last().unwrap();
    assert_eq!(logs.len(), lines_of(&built_events).len() - 1);
    assert_eq!(end["status"], "success");
    assert_eq!(
        end["binary_hash"],
        hello.digest.as_ref().unwrap().hash.as_str()
    );

    // A crate that does not compile ends with status error.
    let (failed, _) = client
        .run(JobKind::Build, &fixture("compile-error"), &[])
        .await;
    let replay = events(http, &failed.session_id, 0).await;
    let end = replay.last().unwrap();
    assert_eq!(end["type"], "end");
    assert_eq!(end["status"], "error");
    assert!(replay.iter().any(|m| {
        m["line"]
            .as_str()
            .is_some_and(|l| l.contains("mismatched types"))
    }));

    // Unknown sessions are a 404, not a socket.
    let (status, _) = get(http, "/v1/sessions/nope/events").await;
    assert_eq!(status, 404);
    assert!(
        tokio_tungstenite::connect_async(format!("ws://{http}/v1/sessions/nope/events"))
            .await
            .is_err()
    );
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_queries_answer_history_logs_cache_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let node = public_node(dir.path()).await;
    let http = node.http_addr().unwrap();
    let client = Client::connect(&node).await;
    let (result, _) = client.run(JobKind::Build, &fixture("hello"), &[]).await;
    let id = &result.session_id;

    let (status, body) = get(http, "/health").await;
    assert_eq!(status, 200);
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["peer_id"], node.peer_id().to_string());
    let (status, body) = get(http, "/ready").await;
    assert_eq!(status, 200, "{body}");

    let (status, body) = get(http, "/builds").await;
    assert_eq!(status, 200);
    let builds: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(builds[0]["id"], id.as_str());

    let (status, body) = get(http, &format!("/builds/{id}")).await;
    assert_eq!(status, 200);
    let record: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(record["status"], "success");
    assert_eq!(record["kind"], "build");
    assert_eq!(record["client"], client.remote.peer_id().to_string());
    assert!(
        record["input_root"]
            .as_str()
            .unwrap()
            .starts_with("blake3:")
    );
    assert!(
        record["log_digest"]
            .as_str()
            .unwrap()
            .starts_with("blake3:")
    );
    assert!(
        record["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "build")
    );
    assert_eq!(record["artifacts"][0]["path"], "target/debug/hello");

    let (status, body) = get(http, &format!("/builds/{id}/logs")).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("Compiling") && body.contains("hello v0.1.0"),
        "{body}"
    );
    assert_eq!(get(http, "/builds/nope").await.0, 404);
    assert_eq!(get(http, "/builds/nope/logs").await.0, 404);

    let (status, body) = get(http, "/cache/stats").await;
    assert_eq!(status, 200);
    let stats: Value = serde_json::from_str(&body).unwrap();
    assert!(stats["blob_count"].as_u64().unwrap() > 0);
    assert_eq!(stats["action_cache_entries"], 1);
    assert_eq!(
        stats["shared_units"]["units"], 0,
        "hello has no registry dependency"
    );

    let (status, body) = get(http, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("# TYPE rba_sessions_submitted counter"),
        "{body}"
    );
    assert!(
        body.contains("# TYPE rba_job_duration_seconds histogram"),
        "{body}"
    );
    assert!(body.contains("rba_jobs_succeeded_total 1"), "{body}");
    assert!(body.contains("rba_cas_blobs "));

    // No state changes over HTTP.
    let mut stream = tokio::net::TcpStream::connect(http).await.unwrap();
    stream
        .write_all(
            b"POST /builds HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_breaks_ends_its_event_stream_with_an_error_message() {
    let dir = tempfile::tempdir().unwrap();
    let node = public_node(dir.path().join("node").as_path()).await;
    let http = node.http_addr().unwrap();
    let client = Client::connect(&node).await;
    let slow = slow_crate(dir.path(), 200, 50);
    let tree = client.hash(&slow).await;
    client
        .remote
        .upload_missing(&client.cas.blobs, &tree.blobs)
        .await
        .unwrap();
    let mut session = client.remote.session().await.unwrap();
    session
        .send(rba_proto::rba::v1::client_frame::Frame::Submit(
            Client::submit(JobKind::Test, &tree, &["--", "--nocapture"]),
        ))
        .await
        .unwrap();
    let Some(SessionEvent::Accepted(accepted)) = session.next().await.unwrap() else {
        panic!("accepted first")
    };
    let id = accepted.session_id;
    // Wait for the test to print, then cancel the job on the node.
    loop {
        if let Some(SessionEvent::Line(line)) = session.next().await.unwrap()
            && line.line.contains("slow line 3")
        {
            break;
        }
    }
    node.shared().executor.job(&id).unwrap().cancel();
    let messages = events(http, &id, 0).await;
    let last = messages.last().unwrap();
    assert_eq!(keys(last), ["message", "session_id", "type"], "{last}");
    assert_eq!(last["type"], "error");
    assert_eq!(last["session_id"], id.as_str());
    assert!(
        last["message"].as_str().unwrap().contains("cancelled"),
        "{last}"
    );
    // The libp2p side sees a signed end with status CANCELLED.
    let end = loop {
        match session.next().await.unwrap() {
            Some(SessionEvent::End(end)) => break end,
            Some(_) => {}
            None => panic!("no end"),
        }
    };
    assert_eq!(
        end.body.unwrap().status,
        rba_proto::rba::v1::JobStatus::Cancelled as i32
    );
    node.shutdown().await.unwrap();
}

fn token(name: &str, tenants: &[String]) -> TokenConfig {
    TokenConfig {
        name: name.into(),
        token: format!("{name}-secret-token"),
        access: Access::ReadOnly,
        tenants: tenants.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_views_need_a_token_that_sees_the_builds_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let alice_key = libp2p::identity::Keypair::generate_ed25519();
    let alice_tenant = format!("peer:{}", alice_key.public().to_peer_id());
    let node = node_with(dir.path(), &[], |config| {
        config.auth.tokens = vec![
            // Alice's dashboard token: her builds (those of her libp2p identity).
            token("alice", std::slice::from_ref(&alice_tenant)),
            token("bob", &[]),
            token("ops", &["*".to_string()]),
        ];
    })
    .await;
    let http = node.http_addr().unwrap();
    let alice = Client::connect_as(&node, alice_key).await;
    let (built, _) = alice.run(JobKind::Build, &fixture("hello"), &[]).await;
    let id = built.session_id.clone();
    let views = [
        "/builds".to_string(),
        format!("/builds/{id}"),
        format!("/builds/{id}/logs"),
    ];

    // Aggregates stay open.
    for open in ["/health", "/ready", "/metrics", "/cache/stats"] {
        assert_eq!(get(http, open).await.0, 200, "{open}");
    }
    // No token, or a wrong one: 401, saying how to get in.
    for view in &views {
        let (status, body) = get(http, view).await;
        assert_eq!(status, 401, "{view}: {body}");
        assert!(
            body.contains("Bearer") && body.contains("--public-read"),
            "{body}"
        );
        assert_eq!(get_with(http, view, Some("not-a-token")).await.0, 401);
    }
    let refused = tokio_tungstenite::connect_async(format!("ws://{http}/v1/sessions/{id}/events"))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("401"), "{refused}");
    // `?token=` is for the WebSocket only (tokens in URLs end up in logs).
    assert_eq!(get(http, "/builds?token=alice-secret-token").await.0, 401);

    // Bob's token sees nothing of Alice's: her build does not exist for him.
    let (status, body) = get_with(http, "/builds", Some("bob-secret-token")).await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        serde_json::json!([])
    );
    let (mine, theirs) = (
        get_with(http, &format!("/builds/{id}"), Some("bob-secret-token")).await,
        get_with(
            http,
            "/builds/00000000-0000-0000-0000-000000000000",
            Some("bob-secret-token"),
        )
        .await,
    );
    assert_eq!(mine.0, 404);
    assert_eq!(
        mine.1.replace(&id, "ID"),
        theirs
            .1
            .replace("00000000-0000-0000-0000-000000000000", "ID"),
        "the 404 leaks existence"
    );
    assert_eq!(
        get_with(
            http,
            &format!("/builds/{id}/logs"),
            Some("bob-secret-token")
        )
        .await
        .0,
        404
    );
    let refused = tokio_tungstenite::connect_async(format!(
        "ws://{http}/v1/sessions/{id}/events?token=bob-secret-token"
    ))
    .await
    .unwrap_err();
    assert!(refused.to_string().contains("404"), "{refused}");

    // Alice's token and the operator's see it all.
    for token in ["alice-secret-token", "ops-secret-token"] {
        let (status, body) = get_with(http, "/builds", Some(token)).await;
        assert_eq!(status, 200);
        let builds: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(builds[0]["id"], id.as_str(), "{token}");
        assert_eq!(builds[0]["tenant"], alice_tenant.as_str());
        assert_eq!(
            get_with(http, &format!("/builds/{id}"), Some(token))
                .await
                .0,
            200
        );
        let (status, log) = get_with(http, &format!("/builds/{id}/logs"), Some(token)).await;
        assert_eq!(status, 200);
        assert!(log.contains("hello v0.1.0"), "{log}");
        let messages = events_with(http, &id, 0, &format!("&token={token}")).await;
        assert_eq!(messages.last().unwrap()["status"], "success");
    }
    node.shutdown().await.unwrap();

    // The same data under --public-read: open to anyone.
    let node = public_node(dir.path()).await;
    let http = node.http_addr().unwrap();
    for view in &views {
        assert_eq!(get(http, view).await.0, 200, "{view}");
    }
    assert_eq!(
        events(http, &id, 0).await.last().unwrap()["status"],
        "success"
    );
    node.shutdown().await.unwrap();
}
