//! Hostile input on the libp2p protocols: malformed and oversized frames, unknown job kinds,
//! missing inputs, bad uploads, a peer serving corrupt blobs and forged results. The node
//! answers with clear Error codes and keeps serving.

mod common;

use std::time::Duration;

use common::{Client, fixture, node};
use futures::{AsyncWriteExt, StreamExt};
use libp2p::identity::Keypair;
use rba_agent::config::TrustedPeer;
use rba_agent::p2p::frame::{read_frame, write_frame};
use rba_agent::p2p::{CAS_PROTOCOL, Network, SESSION_PROTOCOL, sign};
use rba_cas::{Digest, DigestFunction};
use rba_executor::cargo::JobKind;
use rba_proto::Message;
use rba_proto::rba::v1::{
    ActionResultBody, Attach, BlobDigest, BlobReply, BlobRequest, Chunk, ClientFrame, JobStatus,
    NodeFrame, Put, SignedActionResult, Submit, blob_reply, blob_request, client_frame, node_frame,
};

const MAX: usize = 4 << 20;

async fn session_error(client: &Client, bytes: &[u8]) -> (String, NodeFrame) {
    let mut stream = client.remote.open_raw(SESSION_PROTOCOL).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    stream.flush().await.unwrap();
    let frame: NodeFrame =
        tokio::time::timeout(Duration::from_secs(30), read_frame(&mut stream, MAX))
            .await
            .unwrap()
            .unwrap()
            .expect("an answer");
    match &frame.frame {
        Some(node_frame::Frame::Error(e)) => (e.code.clone(), frame.clone()),
        other => panic!("expected an Error frame, got {other:?}"),
    }
}

fn encode(frame: &ClientFrame) -> Vec<u8> {
    frame.encode_length_delimited_to_vec()
}

fn submit(kind: i32, root: Option<BlobDigest>) -> Vec<u8> {
    encode(&ClientFrame {
        frame: Some(client_frame::Frame::Submit(Submit {
            kind,
            options: None,
            input_root: root,
            workspace_hint: String::new(),
            limits: None,
        })),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_get_clear_error_codes_and_the_node_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let node = common::node_with(dir.path(), &[], |c| c.servers.max_upload_bytes = 1 << 20).await;
    let client = Client::connect(&node).await;
    let tree = client.hash(&fixture("hello")).await;

    // Garbage after a valid length.
    let (code, _) = session_error(&client, &[4, 0xff, 0xff, 0xff, 0xff]).await;
    assert_eq!(code, "malformed_frame");
    // A declared length far over the cap: refused before reading the body.
    let (code, _) = session_error(&client, &[0x80, 0x80, 0x80, 0x80, 0x08]).await;
    assert_eq!(code, "frame_too_large");
    // A frame that is neither Submit nor Attach.
    let (code, _) = session_error(&client, &encode(&ClientFrame { frame: None })).await;
    assert_eq!(code, "unexpected_frame");
    // Unknown and unspecified job kinds.
    let (code, frame) = session_error(&client, &submit(99, Some(tree.root.to_wire()))).await;
    assert_eq!(code, "unknown_job_kind", "{frame:?}");
    let (code, _) = session_error(&client, &submit(0, Some(tree.root.to_wire()))).await;
    assert_eq!(code, "unknown_job_kind");
    // Bad digests.
    let (code, _) = session_error(&client, &submit(1, None)).await;
    assert_eq!(code, "bad_digest");
    let bogus = BlobDigest {
        function: "md5".into(),
        hash: "00".into(),
        size_bytes: 1,
    };
    let (code, _) = session_error(&client, &submit(1, Some(bogus))).await;
    assert_eq!(code, "bad_digest");
    // An input root the node does not have.
    let (code, frame) = session_error(&client, &submit(1, Some(tree.root.to_wire()))).await;
    assert_eq!(code, "missing_input");
    let Some(node_frame::Frame::Error(error)) = frame.frame else {
        unreachable!()
    };
    assert_eq!(error.missing, vec![tree.root.to_wire()]);
    // Attaching to a session that never existed.
    let attach = encode(&ClientFrame {
        frame: Some(client_frame::Frame::Attach(Attach {
            session_id: "nope".into(),
            from_seq: 0,
        })),
    });
    let (code, _) = session_error(&client, &attach).await;
    assert_eq!(code, "unknown_session");

    // Blob protocol: a Put whose bytes do not match, an upload over the limit, garbage.
    let mut blobs = client.remote.open_raw(CAS_PROTOCOL).await.unwrap();
    let claimed = DigestFunction::Blake3.digest_of(b"hello");
    for request in [
        blob_request::Request::Put(Put {
            digest: Some(claimed.to_wire()),
        }),
        blob_request::Request::Chunk(Chunk {
            data: b"jello".to_vec(),
            last: true,
        }),
    ] {
        write_frame(
            &mut blobs,
            &BlobRequest {
                request: Some(request),
            },
        )
        .await
        .unwrap();
    }
    let reply: BlobReply = read_frame(&mut blobs, MAX).await.unwrap().unwrap();
    let Some(blob_reply::Reply::Error(error)) = reply.reply else {
        panic!("{reply:?}")
    };
    assert_eq!(error.code, "digest_mismatch");
    assert!(!node.shared().cas.blobs.contains(&claimed).unwrap());

    let mut blobs = client.remote.open_raw(CAS_PROTOCOL).await.unwrap();
    let huge = Digest {
        function: DigestFunction::Blake3,
        hash: [7; 32],
        size: 2 << 20,
    };
    write_frame(
        &mut blobs,
        &BlobRequest {
            request: Some(blob_request::Request::Put(Put {
                digest: Some(huge.to_wire()),
            })),
        },
    )
    .await
    .unwrap();
    let reply: BlobReply = read_frame(&mut blobs, MAX).await.unwrap().unwrap();
    let Some(blob_reply::Reply::Error(error)) = reply.reply else {
        panic!("{reply:?}")
    };
    assert_eq!(error.code, "upload_refused");
    // The client's own upload of a too-large blob reports the refusal in one line.
    let big = client
        .cas
        .blobs
        .put_bytes(DigestFunction::Blake3, &vec![1u8; 2 << 20])
        .unwrap();
    let mut uploader = client.remote.blobs().await.unwrap();
    let message = format!(
        "{:#}",
        uploader.put(&client.cas.blobs, big).await.unwrap_err()
    );
    assert!(
        message.starts_with("upload refused (upload_refused): blob")
            && message.contains("upload limit")
            && !message.contains('\n'),
        "{message}"
    );

    let mut blobs = client.remote.open_raw(CAS_PROTOCOL).await.unwrap();
    blobs.write_all(&[3, 0xff, 0xff, 0xff]).await.unwrap();
    let reply: BlobReply = read_frame(&mut blobs, MAX).await.unwrap().unwrap();
    let Some(blob_reply::Reply::Error(error)) = reply.reply else {
        panic!("{reply:?}")
    };
    assert_eq!(error.code, "malformed_frame");

    // Still serving: Has works and a real build runs.
    let mut has = client.remote.blobs().await.unwrap();
    let present = has.has(&[tree.root, claimed]).await.unwrap();
    assert!(present.is_empty(), "{present:?}");
    let (result, _) = client.run(JobKind::Build, &fixture("hello"), &[]).await;
    assert_eq!(result.body().status, JobStatus::Success as i32);
    let metrics = node.shared().metrics.render(&[]);
    assert!(
        !metrics.contains("rba_protocol_errors_total 0"),
        "{metrics}"
    );
    node.shutdown().await.unwrap();
}

/// A fake operator that forges action results and serves corrupt blobs.
async fn corrupt_peer() -> (Network, libp2p::Multiaddr) {
    let network = Network::start(Keypair::generate_ed25519(), Duration::from_secs(60)).unwrap();
    network
        .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .await
        .unwrap();
    let address = network.listen_addrs()[0].clone();
    let mut incoming = network.control().accept(CAS_PROTOCOL).unwrap();
    tokio::spawn(async move {
        while let Some((_, mut stream)) = incoming.next().await {
            tokio::spawn(async move {
                while let Ok(Some(request)) = read_frame::<_, BlobRequest>(&mut stream, MAX).await {
                    let replies = match request.request {
                        Some(blob_request::Request::GetActionResult(ask)) => {
                            // Signed, but by a key that is not this peer's.
                            let body = ActionResultBody {
                                instance: ask.instance,
                                action_digest: ask.action_digest,
                                action_result: rba_proto::reapi::ActionResult::default()
                                    .encode_to_vec(),
                            };
                            let (signature, key) =
                                sign(&Keypair::generate_ed25519(), &body.encode_to_vec());
                            vec![blob_reply::Reply::ActionResult(SignedActionResult {
                                body: Some(body),
                                signature,
                                signer_public_key: key,
                            })]
                        }
                        Some(blob_request::Request::Get(get)) => {
                            let size = get.digest.map(|d| d.size_bytes).unwrap_or(0) as usize;
                            vec![
                                blob_reply::Reply::Chunk(Chunk {
                                    data: vec![0x55; size],
                                    last: false,
                                }),
                                blob_reply::Reply::Chunk(Chunk {
                                    data: Vec::new(),
                                    last: true,
                                }),
                            ]
                        }
                        Some(blob_request::Request::Has(_)) => {
                            vec![blob_reply::Reply::Has(Default::default())]
                        }
                        _ => return,
                    };
                    for reply in replies {
                        if write_frame(&mut stream, &BlobReply { reply: Some(reply) })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    (network, address)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_serving_corrupt_blobs_or_forged_results_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, address) = corrupt_peer().await;
    let node = common::node_with(dir.path(), &[], |config| {
        config.trusted_peers = vec![TrustedPeer {
            peer_id: fake.peer_id().to_string(),
            addresses: vec![address.to_string()],
        }];
    })
    .await;
    let client = Client::connect(&node).await;
    let (result, _) = client.run(JobKind::Build, &fixture("hello"), &[]).await;
    // Neither the forged result nor the corrupt blobs were taken: the client had to upload
    // and the node built for real.
    assert_eq!(result.body().status, JobStatus::Success as i32);
    assert!(!result.body().cache_hit);
    assert!(result.upload.uploaded > 0);
    let metrics = node.shared().metrics.render(&[]);
    assert!(
        metrics.contains("rba_peer_action_results_total 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("rba_peer_fetched_blobs_total 0"),
        "{metrics}"
    );
    let report = node.shared().cas.blobs.verify().unwrap();
    assert!(report.corrupt.is_empty(), "{report:?}");
    fake.shutdown();
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_before_the_upload_names_the_missing_root() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), &[]).await;
    let client = Client::connect(&node).await;
    let tree = client.hash(&fixture("hello")).await;
    let mut session = client.remote.session().await.unwrap();
    session
        .send(client_frame::Frame::Submit(Client::submit(
            JobKind::Build,
            &tree,
            &[],
        )))
        .await
        .unwrap();
    let error = session.next().await.unwrap_err();
    let error = error
        .downcast_ref::<rba_agent::p2p::session::NodeError>()
        .unwrap();
    assert_eq!(error.code, "missing_input");
    // After uploading exactly what Has says is missing, the same Submit is accepted.
    let stats = client
        .remote
        .upload_missing(&client.cas.blobs, &tree.blobs)
        .await
        .unwrap();
    assert_eq!(stats.uploaded as usize, tree.blobs.len());
    let again = client
        .remote
        .upload_missing(&client.cas.blobs, &tree.blobs)
        .await
        .unwrap();
    assert_eq!(again.uploaded, 0);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_clients_may_upload_and_submit() {
    let dir = tempfile::tempdir().unwrap();
    let someone_else = Keypair::generate_ed25519().public().to_peer_id();
    let node = common::node_with(dir.path(), &[], |config| {
        config.allowed_clients = Some(vec![someone_else.to_string()]);
    })
    .await;
    let client = Client::connect(&node).await;
    let tree = client.hash(&fixture("hello")).await;
    let error = client
        .remote
        .upload_missing(&client.cas.blobs, &tree.blobs)
        .await
        .unwrap_err();
    assert!(format!("{error:#}").contains("(forbidden)"), "{error:#}");
    let (code, _) = session_error(&client, &submit(1, Some(tree.root.to_wire()))).await;
    assert_eq!(code, "forbidden");
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_with_an_escaping_link_is_invalid_input_naming_it() {
    use rba_proto::reapi::{Directory, SymlinkNode};
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), &[]).await;
    let client = Client::connect(&node).await;
    // A tree no honest client builds (the client refuses such links on disk): made by hand.
    let root = Directory {
        symlinks: vec![SymlinkNode {
            name: "Cargo.lock".into(),
            target: "../../../../etc/shadow".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let digest = client
        .cas
        .blobs
        .put_bytes(DigestFunction::Blake3, &root.encode_to_vec())
        .unwrap();
    let tree = rba_cas::TreeBuild {
        root: digest,
        stats: Default::default(),
        blobs: vec![digest],
    };
    client
        .remote
        .upload_missing(&client.cas.blobs, &tree.blobs)
        .await
        .unwrap();
    let mut session = client.remote.session().await.unwrap();
    session
        .send(client_frame::Frame::Submit(Client::submit(
            JobKind::Build,
            &tree,
            &[],
        )))
        .await
        .unwrap();
    let error = session.next().await.unwrap_err();
    let error = error
        .downcast_ref::<rba_agent::p2p::session::NodeError>()
        .unwrap();
    assert_eq!(error.code, "invalid_input", "{error}");
    assert!(error.message.contains("Cargo.lock"), "{error}");
    // The node keeps serving: an honest build goes through.
    let (result, _) = client.run(JobKind::Build, &fixture("hello"), &[]).await;
    assert_eq!(result.body().status, JobStatus::Success as i32);
    node.shutdown().await.unwrap();
}
