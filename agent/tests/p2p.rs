//! Nodes and clients over real libp2p on loopback, building fixture crates in the real sandbox.

mod common;

use common::{Client, fixture, lines_of, node, slow_crate, stored_lines};
use rba_agent::p2p::session::{SessionEvent, verify_end};
use rba_executor::cargo::JobKind;
use rba_proto::rba::v1::JobStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_streams_lines_then_a_signed_end_and_a_resubmission_is_a_cache_hit() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), &[]).await;
    let client = Client::connect(&node).await;

    let (result, events) = client.run(JobKind::Build, &fixture("hello"), &[]).await;
    // Accepted first, End last, every line in between.
    assert!(matches!(events.first(), Some(SessionEvent::Accepted(_))));
    assert!(matches!(events.last(), Some(SessionEvent::End(_))));
    let lines = lines_of(&events);
    assert!(
        lines
            .iter()
            .any(|l| l.line.contains("Compiling") && l.line.contains("hello v0.1.0")),
        "{lines:?}"
    );
    let body = result.body();
    assert_eq!(body.status, JobStatus::Success as i32);
    assert_eq!(body.exit_code, 0);
    assert!(!body.cache_hit);
    assert_eq!(body.session_id, result.session_id);
    assert_eq!(body.lines, lines.len() as u64);
    assert_eq!(body.last_seq + 1, body.lines);
    assert!(body.duration_ms > 0);
    let artifact = body
        .artifacts
        .iter()
        .find(|a| a.path == "target/debug/hello")
        .expect("the executable is an artifact");
    assert!(artifact.is_executable);
    let artifact_digest = rba_cas::Digest::from_wire(artifact.digest.as_ref().unwrap()).unwrap();
    assert!(node.shared().cas.blobs.contains(&artifact_digest).unwrap());
    // The lines received are exactly the stored log.
    let received: Vec<(u64, String)> = lines.iter().map(|l| (l.seq, l.line.clone())).collect();
    assert_eq!(received, stored_lines(&node, &result));
    // The end is signed by the node, and a tampered end does not verify.
    verify_end(&result.end, node.peer_id()).unwrap();
    let mut forged = result.end.clone();
    forged.body.as_mut().unwrap().exit_code = 1;
    assert!(verify_end(&forged, node.peer_id()).is_err());
    assert!(verify_end(&result.end, client.remote.peer_id()).is_err());
    assert!(result.upload.uploaded > 0);

    // The same submission again: answered from the action cache, nothing uploaded.
    let (again, events) = client.run(JobKind::Build, &fixture("hello"), &[]).await;
    assert!(again.body().cache_hit);
    assert_eq!(again.body().status, JobStatus::Success as i32);
    assert_eq!(again.upload.uploaded, 0);
    assert_eq!(again.body().artifacts, body.artifacts);
    assert!(!lines_of(&events).is_empty(), "the cached log is replayed");

    // History and re-attachment to a finished session.
    let record = node.shared().history.get(&result.session_id).await.unwrap();
    assert_eq!(record.status, "success");
    assert!(record.steps.iter().any(|s| s.name == "build"));
    let mut replay = Vec::new();
    let followed = client
        .remote
        .follow(&result.session_id, 1, |e| replay.push(e.clone()))
        .await
        .unwrap();
    assert_eq!(lines_of(&replay).len() as u64, body.lines - 1);
    assert_eq!(followed.body().session_id, result.session_id);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_crate_ends_with_status_error() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), &[]).await;
    let client = Client::connect(&node).await;
    let (result, events) = client
        .run(JobKind::Build, &fixture("compile-error"), &[])
        .await;
    let body = result.body();
    assert_eq!(body.status, JobStatus::Error as i32);
    assert_eq!(body.exit_code, 101);
    assert!(
        lines_of(&events)
            .iter()
            .any(|l| l.line.contains("mismatched types"))
    );
    assert_eq!(
        node.shared()
            .history
            .get(&result.session_id)
            .await
            .unwrap()
            .status,
        "failed"
    );
    node.shutdown().await.unwrap();
}

/// A run over a session: the program's lines and status come back, and the same submission
/// again runs again (a run's result is never served from the action cache).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_never_answered_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), &[]).await;
    let client = Client::connect(&node).await;
    let clock = |events: &[SessionEvent]| {
        lines_of(events)
            .into_iter()
            .find(|l| l.line.starts_with("runs: clock "))
            .map(|l| l.line)
            .expect("the program's output is streamed")
    };
    let (failed, _) = client
        .run(JobKind::Run, &fixture("runs"), &["--", "3", "x"])
        .await;
    assert_eq!(failed.body().exit_code, 3);
    assert_eq!(failed.body().status, JobStatus::Error as i32);
    // Successful runs, whose results a build would cache.
    let (first, first_events) = client
        .run(JobKind::Run, &fixture("runs"), &["--", "0", "x"])
        .await;
    assert_eq!(first.body().status, JobStatus::Success as i32);
    let (second, second_events) = client
        .run(JobKind::Run, &fixture("runs"), &["--", "0", "x"])
        .await;
    assert!(!second.body().cache_hit, "a run is not replayed");
    assert_eq!(second.body().status, JobStatus::Success as i32);
    assert_ne!(clock(&first_events), clock(&second_events));
    let record = node.shared().history.get(&second.session_id).await.unwrap();
    assert_eq!(record.kind, "run");
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_resumes_from_its_seq_with_no_line_lost_or_doubled() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path().join("node").as_path(), &[]).await;
    let identity = libp2p::identity::Keypair::generate_ed25519();
    let client = Client::connect_as(&node, identity.clone()).await;
    let slow = slow_crate(dir.path(), 40, 60);

    let remote = client.remote.clone();
    let mut cut = false;
    let tree = client.hash(&slow).await;
    let mut events = Vec::new();
    let result = client
        .remote
        .run(
            &client.cas.blobs,
            &tree.blobs,
            Client::submit(JobKind::Test, &tree, &["--", "--nocapture"]),
            |event| {
                if let SessionEvent::Line(line) = event
                    && line.line.contains("slow line 5")
                    && !cut
                {
                    cut = true;
                    let remote = remote.clone();
                    tokio::spawn(async move { remote.disconnect().await });
                }
                events.push(event.clone());
            },
        )
        .await
        .unwrap();
    assert!(cut);
    assert!(result.resumed >= 1, "the connection was cut mid-build");
    let body = result.body();
    assert_eq!(body.status, JobStatus::Success as i32, "{events:?}");
    let lines = lines_of(&events);
    let received: Vec<(u64, String)> = lines.iter().map(|l| (l.seq, l.line.clone())).collect();
    let stored = stored_lines(&node, &result);
    assert_eq!(received, stored, "every line exactly once, in order");
    for i in 0..40 {
        let text = format!("slow line {i}");
        assert_eq!(lines.iter().filter(|l| l.line == text).count(), 1, "{text}");
    }

    // The same identity on a second connection, attaching later from the middle, gets
    // exactly the rest; another identity gets nothing (the session is its owner's).
    let stranger = Client::connect(&node).await;
    let refused = stranger
        .remote
        .follow(&result.session_id, 10, |_| {})
        .await
        .unwrap_err();
    assert!(
        format!("{refused:#}").contains("unknown_session"),
        "{refused:#}"
    );
    let other = Client::connect_as(&node, identity).await;
    let mut tail = Vec::new();
    other
        .remote
        .follow(&result.session_id, 10, |e| tail.push(e.clone()))
        .await
        .unwrap();
    let tail: Vec<(u64, String)> = lines_of(&tail)
        .iter()
        .map(|l| (l.seq, l.line.clone()))
        .collect();
    assert_eq!(tail, stored[10..].to_vec());
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_peer_serves_signed_results_to_clients_that_prove_their_tree() {
    let dir = tempfile::tempdir().unwrap();
    // B fetches from A, so A shares with B (B's identity made first, to name it in A's config).
    std::fs::create_dir_all(dir.path().join("b")).unwrap();
    let b_identity =
        rba_agent::p2p::load_or_create_identity(&dir.path().join("b").join("identity.key"))
            .unwrap();
    let a = common::node_with(dir.path().join("a").as_path(), &[], |config| {
        config.sharing_peers = vec![b_identity.public().to_peer_id().to_string()];
    })
    .await;
    let b = node(dir.path().join("b").as_path(), &[&a]).await;
    let untrusting = node(dir.path().join("c").as_path(), &[]).await;

    // The client builds on A (uploading there).
    let on_a = Client::connect(&a).await;
    let (built, _) = on_a.run(JobKind::Build, &fixture("hello"), &[]).await;
    assert_eq!(built.body().status, JobStatus::Success as i32);
    assert!(built.upload.uploaded > 0);

    // A stranger on B who knows only the input root (a digest in a log, on a dashboard) is
    // served nothing: neither A's result through B, nor the tree B could fetch from A. It is
    // asked for the root itself, and then for the files, whatever B and A hold.
    let tree = on_a.hash(&fixture("hello")).await;
    let stranger = Client::connect(&b).await;
    let refusal = stranger.refusal_without_upload(&tree).await;
    assert_eq!(refusal.code, "missing_input", "{refusal:?}");
    assert!(
        refusal.missing.contains(&tree.root.to_wire()),
        "{refusal:?}"
    );
    let metrics = b.shared().metrics.render(&[]);
    assert!(
        metrics.contains("rba_peer_action_results_total 0"),
        "nothing asked of A for a stranger: {metrics}"
    );
    for artifact in &built.body().artifacts {
        let digest = rba_cas::Digest::from_wire(artifact.digest.as_ref().unwrap()).unwrap();
        let mut blobs = stranger.remote.blobs().await.unwrap();
        assert!(
            blobs.get_into(&stranger.cas.blobs, digest).await.is_err(),
            "the stranger reads none of the artifacts"
        );
    }

    // The client on B uploads its tree (the proof), and is served A's signed result: a cache
    // hit, nothing built again.
    let on_b = Client::connect(&b).await;
    let (hit, _) = on_b.run(JobKind::Build, &fixture("hello"), &[]).await;
    assert_eq!(hit.body().status, JobStatus::Success as i32);
    assert!(hit.body().cache_hit);
    assert!(hit.upload.uploaded > 0);
    assert_eq!(hit.body().artifacts, built.body().artifacts);

    // A job A never ran, on the tree the client proved: nothing more to upload.
    let (checked, _) = on_b.run(JobKind::Check, &fixture("hello"), &[]).await;
    assert_eq!(checked.body().status, JobStatus::Success as i32);
    assert!(!checked.body().cache_hit);
    assert_eq!(checked.upload.uploaded, 0);
    let metrics = b.shared().metrics.render(&[]);
    assert!(
        metrics.contains("rba_peer_action_results_total 1"),
        "{metrics}"
    );

    // A node that trusts nobody says exactly what it lacks.
    let on_c = Client::connect(&untrusting).await;
    let tree = on_c.hash(&fixture("hello")).await;
    let refusal = on_c.refusal_without_upload(&tree).await;
    assert_eq!(refusal.code, "missing_input");
    assert!(refusal.missing.contains(&tree.root.to_wire()));

    // A trusts nobody but shares with B only: D, which trusts A, gets neither A's signed
    // result nor A's blobs (they are A's clients'), so its client must upload.
    let stranger = node(dir.path().join("d").as_path(), &[&a]).await;
    let on_d = Client::connect(&stranger).await;
    let tree_d = on_d.hash(&fixture("hello")).await;
    let refusal = on_d.refusal_without_upload(&tree_d).await;
    assert_eq!(refusal.code, "missing_input", "{refusal:?}");
    stranger.shutdown().await.unwrap();
    for node in [a, b, untrusting] {
        node.shutdown().await.unwrap();
    }
}

/// A session's alias (a Tangle call's on-chain id) is its history record's: one build per
/// alias and owner, another owner's use of the same alias is no conflict, and after a restart
/// of the node the alias still names the finished session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_alias_is_kept_in_the_history_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), &[]).await;
    let client = Client::connect(&node).await;
    let (first, _) = client.run(JobKind::Build, &fixture("hello"), &[]).await;
    let (second, _) = client.run(JobKind::Check, &fixture("hello"), &[]).await;
    let shared = node.shared();
    assert!(shared.alias_session("0xabc", &first.session_id).await);
    assert!(
        !shared.alias_session("0xabc", &second.session_id).await,
        "one build per alias and owner"
    );
    assert!(
        !shared
            .alias_session(&second.session_id, &first.session_id)
            .await,
        "a job's id is no alias"
    );
    let owner = shared.history.get(&first.session_id).await.unwrap().tenant;
    assert_eq!(
        shared
            .resolve_session("0xabc", |o| o == owner.as_deref())
            .await
            .as_deref(),
        Some(first.session_id.as_str())
    );
    assert!(
        shared.resolve_session("0xabc", |_| false).await.is_none(),
        "a reader that may not see the owner finds nothing"
    );
    drop(client);
    node.shutdown().await.unwrap();

    let node = common::node(dir.path(), &[]).await;
    let shared = node.shared();
    match shared
        .visible_session("0xabc", |o| o == owner.as_deref())
        .await
    {
        Some(rba_agent::node::SessionSource::Finished(record)) => {
            assert_eq!(record.id, first.session_id);
            assert_eq!(record.alias.as_deref(), Some("0xabc"));
            assert_eq!(record.status, "success");
        }
        _ => panic!("the alias does not name the finished session after a restart"),
    }
    node.shutdown().await.unwrap();
}
