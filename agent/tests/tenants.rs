//! Tenants over real libp2p: a second identity tries to read the first one's blobs, results
//! and sessions on a real node, and to get them by naming their digests or by uploading
//! bytes that are not the blob's.

mod common;

use common::{Client, fixture, node};
use rba_agent::p2p::CAS_PROTOCOL;
use rba_agent::p2p::frame::{read_frame, write_frame};
use rba_agent::p2p::session::NodeError;
use rba_cas::{Cas, Digest, DigestFunction};
use rba_executor::cargo::JobKind;
use rba_executor::runner::CARGO_INSTANCE;
use rba_proto::rba::v1::{BlobReply, BlobRequest, Chunk, JobStatus, Put, blob_reply, blob_request};

fn code_of(error: &anyhow::Error) -> String {
    format!("{error:#}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_identity_reads_none_of_the_first_ones_blobs_results_or_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path().join("node").as_path(), &[]).await;
    let (_scratch_dir, scratch) = Cas::scratch().unwrap();

    // Alice builds; everything of her build is hers to read.
    let alice = Client::connect(&node).await;
    let (built, _) = alice.run(JobKind::Build, &fixture("hello"), &[]).await;
    assert_eq!(built.body().status, JobStatus::Success as i32);
    let tree = alice.hash(&fixture("hello")).await;
    let wire = |d: &Option<rba_proto::rba::v1::BlobDigest>| {
        Digest::from_wire(d.as_ref().unwrap()).unwrap()
    };
    let artifact = wire(&built.body().artifacts[0].digest);
    let log = wire(&built.body().log_digest);
    let action = wire(&built.body().action_digest);
    let mut secrets: Vec<Digest> = tree
        .blobs
        .iter()
        .copied()
        .filter(|d| !d.is_empty_blob())
        .collect();
    secrets.extend([artifact, log, action]);
    secrets.sort();
    secrets.dedup();

    let mut hers = alice.remote.blobs().await.unwrap();
    assert_eq!(hers.has(&secrets).await.unwrap().len(), secrets.len());
    hers.get_into(&scratch.blobs, artifact).await.unwrap();
    hers.get_into(&scratch.blobs, log).await.unwrap();
    assert!(
        hers.get_action_result(CARGO_INSTANCE, action)
            .await
            .unwrap()
            .is_some()
    );

    // Mallory, a second identity, knows every digest and gets nothing.
    let mallory = Client::connect(&node).await;
    let mut theirs = mallory.remote.blobs().await.unwrap();
    let present = theirs.has(&secrets).await.unwrap();
    assert!(present.is_empty(), "Has leaks {present:?}");
    let never_stored = DigestFunction::Blake3.digest_of(b"never stored anywhere");
    let mut refusals = Vec::new();
    for digest in [artifact, log, tree.root, never_stored] {
        let error = theirs
            .get_into(&scratch.blobs, digest)
            .await
            .expect_err("another tenant's blob is refused");
        let text = code_of(&error);
        assert!(text.contains("forbidden"), "{text}");
        refusals.push(text.replace(&format!("{digest:?}"), "DIGEST"));
    }
    // A blob that exists and one that never did get the same answer.
    assert_eq!(refusals[0], refusals[3], "the refusal leaks existence");
    let error = theirs
        .get_action_result(CARGO_INSTANCE, action)
        .await
        .unwrap_err();
    assert!(code_of(&error).contains("forbidden"), "{error:#}");
    // The Action's bytes follow from the input root (a peer that knows the root can build
    // them): uploading them makes the Action Mallory's to read, not the result hers.
    let action_bytes = node
        .shared()
        .cas
        .blobs
        .read_to_vec(&action, 1 << 20)
        .unwrap();
    let (_mallory_dir, mallory_store) = Cas::scratch().unwrap();
    mallory_store
        .blobs
        .put_bytes(action.function, &action_bytes)
        .unwrap();
    theirs.put(&mallory_store.blobs, action).await.unwrap();
    let error = theirs
        .get_action_result(CARGO_INSTANCE, action)
        .await
        .unwrap_err();
    assert!(code_of(&error).contains("forbidden"), "{error:#}");
    // The stream survives refusals.
    assert!(theirs.has(&[log]).await.unwrap().is_empty());

    // Attaching to Alice's session looks exactly like attaching to one that does not exist.
    let attach_error = |id: String| {
        let remote = &mallory.remote;
        async move {
            let error = remote.follow(&id, 0, |_| {}).await.unwrap_err();
            let refusal = error
                .downcast_ref::<NodeError>()
                .expect("an Error frame")
                .clone();
            (refusal.code, refusal.message.replace(&id, "ID"))
        }
    };
    let hers_attach = attach_error(built.session_id.clone()).await;
    let nobodys = attach_error("00000000-0000-0000-0000-000000000000".to_string()).await;
    assert_eq!(hers_attach.0, "unknown_session");
    assert_eq!(hers_attach, nobodys);
    // Alice herself re-attaches.
    let replay = alice
        .remote
        .follow(&built.session_id, 0, |_| {})
        .await
        .unwrap();
    assert_eq!(replay.body().status, JobStatus::Success as i32);

    // Naming Alice's input root is not enough to be served her build: the node asks for the
    // blobs themselves.
    let refusal = mallory.refusal_without_upload(&tree).await;
    assert_eq!(refusal.code, "missing_input");
    assert!(refusal.missing.contains(&tree.root.to_wire()));

    // Bytes that are not the blob's prove nothing, even for a blob the node holds.
    let source = *tree
        .blobs
        .iter()
        .filter(|d| d.size > 0 && d.size < 4096 && **d != tree.root)
        .min_by_key(|d| d.size)
        .expect("a small file of the fixture");
    let mut raw = mallory.remote.open_raw(CAS_PROTOCOL).await.unwrap();
    for request in [
        blob_request::Request::Put(Put {
            digest: Some(source.to_wire()),
        }),
        blob_request::Request::Chunk(Chunk {
            data: vec![b'x'; source.size as usize],
            last: true,
        }),
    ] {
        write_frame(
            &mut raw,
            &BlobRequest {
                request: Some(request),
            },
        )
        .await
        .unwrap();
    }
    let reply: BlobReply = read_frame(&mut raw, 1 << 20).await.unwrap().unwrap();
    let Some(blob_reply::Reply::Error(error)) = reply.reply else {
        panic!("{reply:?}")
    };
    assert_eq!(error.code, "digest_mismatch", "{error:?}");
    let mut theirs = mallory.remote.blobs().await.unwrap();
    assert!(theirs.has(&[source]).await.unwrap().is_empty());
    assert!(
        node.shared().cas.blobs.contains(&source).unwrap(),
        "Alice's blob is untouched"
    );

    // Uploading the real tree is proof: Mallory then gets the (cached) build and its outputs.
    let (same, _) = mallory.run(JobKind::Build, &fixture("hello"), &[]).await;
    assert_eq!(same.body().status, JobStatus::Success as i32);
    assert!(same.body().cache_hit);
    assert!(same.upload.uploaded > 0, "Mallory had to upload her copy");
    let mut theirs = mallory.remote.blobs().await.unwrap();
    theirs.get_into(&scratch.blobs, artifact).await.unwrap();
    // Still not Alice's session.
    assert_eq!(
        attach_error(built.session_id.clone()).await.0,
        "unknown_session"
    );
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_submitter_cancels_a_session_not_even_a_peer_that_reads_everything() {
    use rba_agent::p2p::session::SessionEvent;
    use rba_executor::runner::JobState;
    use rba_proto::rba::v1::{Attach, client_frame};

    let dir = tempfile::tempdir().unwrap();
    let reader_key = libp2p::identity::Keypair::generate_ed25519();
    let reader_id = reader_key.public().to_peer_id().to_string();
    let node = common::node_with(dir.path(), &[], |config| {
        config.sharing_peers = vec![reader_id];
    })
    .await;

    // Alice's build never ends on its own; her client follows it in the background.
    let alice = Client::connect(&node).await;
    let tree = alice.hash(&fixture("endless-build")).await;
    let (accepted_tx, accepted) = tokio::sync::oneshot::channel();
    let mut accepted_tx = Some(accepted_tx);
    let (remote, blobs, tree_blobs) = (
        alice.remote.clone(),
        alice.cas.blobs.clone(),
        tree.blobs.clone(),
    );
    let submit = Client::submit(JobKind::Build, &tree, &[]);
    let following = tokio::spawn(async move {
        remote
            .run(&blobs, &tree_blobs, submit, |event| {
                if let (SessionEvent::Accepted(a), Some(tx)) = (event, accepted_tx.take()) {
                    let _ = tx.send(a.session_id.clone());
                }
            })
            .await
    });
    let session = accepted.await.unwrap();

    // A sharing peer reads everything: it may watch the session...
    let reader = Client::connect_as(&node, reader_key).await;
    let mut watching = reader.remote.session().await.unwrap();
    watching
        .send(client_frame::Frame::Attach(Attach {
            session_id: session.clone(),
            from_seq: 0,
        }))
        .await
        .unwrap();
    assert!(matches!(
        watching.next().await.unwrap(),
        Some(SessionEvent::Accepted(_))
    ));
    // ...but not stop it, nor may a stranger; hostile ids get the same answer.
    let mallory = Client::connect(&node).await;
    let long = "x".repeat(100_000);
    for (who, id) in [
        (&reader, session.as_str()),
        (&mallory, session.as_str()),
        (&mallory, ""),
        (&mallory, long.as_str()),
        (&mallory, "../../history"),
    ] {
        let refused = who.remote.cancel(id).await.unwrap_err();
        let refusal = refused.downcast_ref::<NodeError>().expect("a node error");
        assert_eq!(refusal.code, "unknown_session", "{id:.40}: {refusal}");
    }
    let job = node
        .shared()
        .executor
        .job(&session)
        .expect("the job is known");
    assert!(
        !matches!(job.state(), JobState::Done(_)),
        "refused cancels left the job alone: {:?}",
        job.state()
    );

    // Alice may: the node confirms with the signed end, and her own stream ends the same way.
    let end = alice.remote.cancel(&session).await.unwrap();
    assert_eq!(end.body.unwrap().status, JobStatus::Cancelled as i32);
    let followed = following.await.unwrap().unwrap();
    assert_eq!(followed.body().status, JobStatus::Cancelled as i32);
    assert_eq!(followed.session_id, session);
    let again = alice.remote.cancel(&session).await.unwrap_err();
    assert_eq!(
        again.downcast_ref::<NodeError>().unwrap().code,
        "session_finished"
    );
    // The node still serves.
    let (built, _) = alice.run(JobKind::Build, &fixture("hello"), &[]).await;
    assert_eq!(built.body().status, JobStatus::Success as i32);
}
