//! The Tangle jobs through the real blueprint `Router` (with `TangleLayer`), on a real node with
//! the real sandbox: synthetic `JobCall`s carry `X-TANGLE-CALL-ID` / `X-TANGLE-SERVICE-ID` the
//! way `TangleProducer` sets them, inputs are ABI-encoded as the service manager contract
//! accepts them, and the `BuildResult` is decoded from the job result's body. There is no chain
//! here (the SDK's own harness needs Docker and Anvil).
//!
//! Zips are made from `tests/fixtures/*` in the test, given by `file://` or served by a
//! loopback HTTP server (plain `http://` is allowed by the test's config only).
#![cfg(feature = "tangle")]

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use alloy_sol_types::SolValue;
use blueprint_sdk::Bytes;
use blueprint_sdk::tangle::extract::{CallId, Caller, ServiceId};
use blueprint_sdk::{JobCall, JobResult, Router};
use futures::StreamExt as _;
use rba_agent::config::NodeConfig;
use rba_agent::node::Node;
use rba_agent::tangle::jobs::{
    BuildResult, CHAIN_OUTPUT_CAP, EXECUTE_CODE, ExecutionResult, STATUS_ERROR, STATUS_SUCCESS,
    STATUS_TIMEOUT, router,
};
use rba_agent::tangle::{TangleConfig, TangleContext};
use rba_contracts::{encode_execute_inputs, encode_job_inputs};
use tower::ServiceExt as _;

const SERVICE_ID: u64 = 7;
/// The caller of most calls here.
const CALLER_A: [u8; 20] = [0xaa; 20];
/// Another account calling the same service.
const CALLER_B: [u8; 20] = [0xbb; 20];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn session() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Zips a fixture directory (skipping `target/`), entries under `prefix/` when given.
fn zip_fixture(name: &str, prefix: Option<&str>) -> Vec<u8> {
    use zip::write::SimpleFileOptions;
    let root = fixture(name);
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let relative = path
                .strip_prefix(&root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            if relative == "target" {
                continue;
            }
            let name = match prefix {
                Some(prefix) => format!("{prefix}/{relative}"),
                None => relative,
            };
            if path.is_dir() {
                stack.push(path);
            } else {
                writer
                    .start_file(
                        name,
                        SimpleFileOptions::default()
                            .compression_method(zip::CompressionMethod::Deflated)
                            .unix_permissions(0o644),
                    )
                    .unwrap();
                writer.write_all(&std::fs::read(&path).unwrap()).unwrap();
            }
        }
    }
    writer.finish().unwrap().into_inner()
}

/// A zip with the given (name, content) entries, stored as given.
fn zip_entries(entries: &[(&str, &[u8])]) -> Vec<u8> {
    use zip::write::SimpleFileOptions;
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, content) in entries {
        writer
            .start_file(
                *name,
                SimpleFileOptions::default()
                    .compression_method(zip::CompressionMethod::Deflated)
                    .unix_permissions(0o644),
            )
            .unwrap();
        writer.write_all(content).unwrap();
    }
    writer.finish().unwrap().into_inner()
}

/// A loopback HTTP server: `/zips/{name}`, `/ipfs/{cid}` (a gateway), `/slow` (answers after
/// a minute), `/loop` (redirects to itself), `/bounce/{n}` (redirect chains), `/big` (8 MiB
/// streamed without a length).
async fn serve(zips: HashMap<String, Vec<u8>>) -> std::net::SocketAddr {
    use axum::extract::{Path as UrlPath, State};
    use axum::http::{StatusCode, header};
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    type Zips = Arc<HashMap<String, Vec<u8>>>;
    async fn zip(State(zips): State<Zips>, UrlPath(name): UrlPath<String>) -> Response {
        match zips.get(&name) {
            Some(bytes) => bytes.clone().into_response(),
            None => StatusCode::NOT_FOUND.into_response(),
        }
    }
    // A trustless gateway: `/ipfs/{cid}?format=raw` answers the block stored under the CID
    // (whatever the test put there, tampered or not); any other form is refused.
    async fn block(
        State(zips): State<Zips>,
        UrlPath(name): UrlPath<String>,
        axum::extract::RawQuery(query): axum::extract::RawQuery,
        headers: axum::http::HeaderMap,
    ) -> Response {
        let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
        if query.as_deref() != Some("format=raw") || accept != Some("application/vnd.ipld.raw") {
            return StatusCode::NOT_ACCEPTABLE.into_response();
        }
        zip(State(zips), UrlPath(name)).await
    }
    let app = axum::Router::new()
        .route("/zips/{name}", get(zip))
        .route("/ipfs/{name}", get(block))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                "too late"
            }),
        )
        .route(
            "/loop",
            get(|| async { (StatusCode::FOUND, [(header::LOCATION, "/loop")]).into_response() }),
        )
        .route(
            "/bounce/{n}",
            get(|UrlPath(n): UrlPath<u32>| async move {
                let next = if n == 0 {
                    "/zips/hello.zip".to_string()
                } else {
                    format!("/bounce/{}", n - 1)
                };
                (StatusCode::FOUND, [(header::LOCATION, next)]).into_response()
            }),
        )
        .route(
            "/big",
            get(|| async {
                let chunks =
                    (0..128).map(|i| Ok::<_, std::io::Error>(Bytes::from(vec![i as u8; 64 << 10])));
                axum::body::Body::from_stream(futures::stream::iter(chunks))
            }),
        )
        .with_state(Arc::new(zips));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

struct Harness {
    node: Node,
    router: Router,
    dir: tempfile::TempDir,
    zip_root: PathBuf,
    http: std::net::SocketAddr,
}

impl Harness {
    async fn new(zips: HashMap<String, Vec<u8>>, tweak: impl FnOnce(&mut TangleConfig)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let mut config = NodeConfig::ephemeral(dir.path().join("node"));
        config.servers.reapi = None;
        config.servers.libp2p = vec!["/ip4/127.0.0.1/tcp/0".to_string()];
        // The on-chain requester follows its session over HTTP without a token.
        config.public_read = true;
        let node = Node::start(config).await.expect("node starts");
        let zip_root = dir.path().join("zips");
        std::fs::create_dir_all(&zip_root).unwrap();
        let http = serve(zips).await;
        let mut tangle = TangleConfig::new(dir.path().join("node"));
        tangle.file_root = Some(zip_root.clone());
        tangle.ipfs_gateway = Some(format!("http://{http}"));
        tangle.allow_http = true;
        tangle.allow_private_hosts = true;
        tangle.max_zip_bytes = 4 << 20;
        tangle.fetch_timeout = Duration::from_secs(3);
        tangle.connect_timeout = Duration::from_secs(2);
        tangle.max_redirects = 3;
        tweak(&mut tangle);
        let ctx = TangleContext::new(node.shared().clone(), tangle).unwrap();
        Harness {
            router: router(ctx),
            node,
            dir,
            zip_root,
            http,
        }
    }

    fn put_zip(&self, name: &str, bytes: &[u8]) -> String {
        let path = self.zip_root.join(name);
        std::fs::write(&path, bytes).unwrap();
        format!("file://{}", path.display())
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    fn download_dir(&self) -> PathBuf {
        self.dir.path().join("node/tangle/downloads")
    }

    /// Sends one job call from [`CALLER_A`] through the router; returns the raw results.
    async fn call_raw(&self, job: u8, body: Vec<u8>, call_id: Option<u64>) -> Vec<JobResult> {
        self.call_raw_from(job, body, call_id, Some(CALLER_A)).await
    }

    /// Sends one job call through the router, with the ids and the caller (`X-TANGLE-CALLER`)
    /// `TangleProducer` sets; returns the raw results.
    async fn call_raw_from(
        &self,
        job: u8,
        body: Vec<u8>,
        call_id: Option<u64>,
        caller: Option<[u8; 20]>,
    ) -> Vec<JobResult> {
        let mut call = JobCall::new(job, Bytes::from(body));
        if let Some(call_id) = call_id {
            call.metadata_mut().insert(CallId::METADATA_KEY, call_id);
            call.metadata_mut()
                .insert(ServiceId::METADATA_KEY, SERVICE_ID);
        }
        if let Some(caller) = caller {
            call.metadata_mut().insert(Caller::METADATA_KEY, caller);
        }
        self.router
            .clone()
            .oneshot(call)
            .await
            .expect("the router does not fail")
            .expect("a route matched")
    }

    /// Sends job `job` from [`CALLER_A`] with the contract's flat input encoding; decodes the
    /// one `Ok` result.
    async fn call(&self, job: u8, zip_uri: &str, session_id: &str, target: &str) -> BuildResult {
        self.call_from(Some(CALLER_A), job, zip_uri, session_id, target)
            .await
    }

    /// As [`Harness::call`], from `caller` (`None`: no `X-TANGLE-CALLER`).
    async fn call_from(
        &self,
        caller: Option<[u8; 20]>,
        job: u8,
        zip_uri: &str,
        session_id: &str,
        target: &str,
    ) -> BuildResult {
        let call_id = rand_call_id();
        let results = self
            .call_raw_from(
                job,
                encode_job_inputs(zip_uri, session_id, target),
                Some(call_id),
                caller,
            )
            .await;
        decode(&results, call_id)
    }

    /// The target-dir slots the node's executor holds.
    fn slots(&self) -> usize {
        std::fs::read_dir(self.dir.path().join("node/executor/slots"))
            .map(|entries| entries.count())
            .unwrap_or(0)
    }

    fn log_text(&self, result: &BuildResult) -> String {
        let digest: rba_cas::Digest = result.logDigest.parse().expect("a log digest");
        common::stored_log(&self.node, &digest)
            .into_iter()
            .map(|l| l.line + "\n")
            .collect()
    }
}

fn rand_call_id() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0 >> 1
}

fn decode(results: &[JobResult], call_id: u64) -> BuildResult {
    assert_eq!(results.len(), 1, "one result per call");
    match &results[0] {
        JobResult::Ok { head, body } => {
            let meta = |key| {
                u64::try_from(head.metadata.get(key).expect("TangleLayer attaches ids")).unwrap()
            };
            assert_eq!(meta(CallId::METADATA_KEY), call_id);
            assert_eq!(meta(ServiceId::METADATA_KEY), SERVICE_ID);
            BuildResult::abi_decode(body).expect("an ABI BuildResult")
        }
        JobResult::Err(e) => panic!("an Err result is dropped by the consumer: {e:?}"),
    }
}

fn assert_success(result: &BuildResult, what: &str) {
    assert_eq!(result.status, STATUS_SUCCESS, "{what}: {result:?}");
    assert_eq!(result.exitCode, 0, "{what}: {result:?}");
    assert!(result.message.is_empty(), "{what}: {result:?}");
    assert!(
        result.logDigest.starts_with("blake3:"),
        "{what}: {result:?}"
    );
    assert!(result.durationMs > 0, "{what}: {result:?}");
}

/// An error result of a refused input: nothing ran.
fn assert_refused(result: &BuildResult, needle: &str) {
    assert_eq!(result.status, STATUS_ERROR, "{needle}: {result:?}");
    assert_eq!(result.exitCode, -1, "{needle}: {result:?}");
    assert!(result.logDigest.is_empty(), "{needle}: {result:?}");
    assert_eq!(result.binaryHash, alloy_primitives::FixedBytes::ZERO);
    assert!(
        result.message.contains(needle),
        "expected {needle:?} in {:?}",
        result.message
    );
}

/// A protobuf varint (for the dag-pb nodes the IPFS tests build by hand, independently of the
/// node's decoder).
fn varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A length-delimited protobuf field.
fn pb_bytes(field: u64, bytes: &[u8], out: &mut Vec<u8>) {
    varint(field << 3 | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// A dag-pb node holding a UnixFS file of `content`, with `links` links (each to `content`'s
/// own raw block).
fn unixfs_file_node(content: &[u8], links: usize) -> Vec<u8> {
    let mut unixfs = vec![0x08, 0x02]; // Type = File
    if links == 0 {
        pb_bytes(2, content, &mut unixfs);
    }
    unixfs.push(0x18); // filesize
    varint(content.len() as u64, &mut unixfs);
    let mut node = Vec::new();
    for _ in 0..links {
        let mut link = Vec::new();
        pb_bytes(1, &raw_cid_bytes(content), &mut link);
        pb_bytes(2, &link, &mut node);
    }
    pb_bytes(1, &unixfs, &mut node);
    node
}

fn sha256_multihash(bytes: &[u8]) -> cid::multihash::Multihash<64> {
    use sha2::Digest as _;
    cid::multihash::Multihash::wrap(0x12, &sha2::Sha256::digest(bytes)).unwrap()
}

fn raw_cid_bytes(bytes: &[u8]) -> Vec<u8> {
    cid::Cid::new_v1(0x55, sha256_multihash(bytes)).to_bytes()
}

/// The CIDv1 (raw codec, sha2-256, base32) of a block.
fn raw_cid(bytes: &[u8]) -> String {
    cid::Cid::new_v1(0x55, sha256_multihash(bytes)).to_string()
}

/// The CIDv0 (`Qm…`: dag-pb, sha2-256) of a dag-pb block.
fn v0_cid(block: &[u8]) -> String {
    cid::Cid::new_v0(sha256_multihash(block))
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ipfs_content_is_verified_against_its_cid() {
    let hello = zip_fixture("hello", None);
    let other = zip_fixture("compile-error", None);
    let single_block = unixfs_file_node(&hello, 0);
    let two_blocks = unixfs_file_node(&hello, 2);
    let sha512_cid = {
        use sha2::Digest as _;
        let digest = sha2::Sha512::digest(&hello);
        cid::Cid::new_v1(
            0x55,
            cid::multihash::Multihash::wrap(0x13, &digest).unwrap(),
        )
        .to_string()
    };
    let (good_raw, good_v0, good_v1_pb) = (
        raw_cid(&hello),
        v0_cid(&single_block),
        cid::Cid::new_v1(0x70, sha256_multihash(&single_block)).to_string(),
    );
    let tampered_raw = raw_cid(&other);
    let tampered_v0 = v0_cid(&unixfs_file_node(&other, 0));
    let zips = HashMap::from([
        (good_raw.clone(), hello.clone()),
        (good_v0.clone(), single_block.clone()),
        (good_v1_pb.clone(), single_block.clone()),
        // What a lying gateway sends: other bytes under a CID.
        (tampered_raw.clone(), hello.clone()),
        (tampered_v0.clone(), single_block.clone()),
        (v0_cid(&two_blocks), two_blocks.clone()),
        (sha512_cid.clone(), hello.clone()),
    ]);
    let h = Harness::new(zips, |_| {}).await;
    for cid in [&good_raw, &good_v0, &good_v1_pb] {
        let checked = h.call(4, &format!("ipfs://{cid}"), &session(), "").await;
        assert_success(&checked, cid);
    }
    for (cid, needle) in [
        (
            tampered_raw.clone(),
            format!("does not match its CID {tampered_raw}"),
        ),
        (
            tampered_v0.clone(),
            format!("does not match its CID {tampered_v0}"),
        ),
        (v0_cid(&two_blocks), "a file of 2 blocks".to_string()),
        (
            sha512_cid.clone(),
            "hash function 0x13 is not supported".to_string(),
        ),
    ] {
        let result = h.call(4, &format!("ipfs://{cid}"), &session(), "").await;
        assert_refused(&result, &needle);
    }
    assert_eq!(std::fs::read_dir(h.download_dir()).unwrap().count(), 0);
    h.node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_0_to_4_on_fixture_zips() {
    let hello = zip_fixture("hello", None);
    let hello_main = zip_fixture("hello", Some("hello-main"));
    let hello_main_cid = raw_cid(&hello_main);
    let zips = HashMap::from([
        ("hello.zip".to_string(), hello.clone()),
        (hello_main_cid.clone(), hello_main),
    ]);
    let h = Harness::new(zips, |_| {}).await;

    // Job 0 by file://, flat ABI encoding: a binary with its hash.
    let uri = h.put_zip("hello.zip", &hello);
    let compiled = h.call(0, &uri, &session(), "").await;
    assert_success(&compiled, "compile");
    assert_ne!(compiled.binaryHash, alloy_primitives::FixedBytes::ZERO);
    let log = h.log_text(&compiled);
    assert!(log.contains("hello v0.1.0 (/workspace)"), "{log}");
    assert_eq!(
        h.node.shared().history.count().await.unwrap(),
        1,
        "the build is in the node's history"
    );

    // Job 0 release by http://, the single-tuple encoding (alloy's `abi_encode` of the tuple).
    let call_id = rand_call_id();
    let body = (h.url("/zips/hello.zip"), session(), "release".to_string()).abi_encode();
    let release = decode(&h.call_raw(0, body, Some(call_id)).await, call_id);
    assert_success(&release, "compile release");
    assert!(h.log_text(&release).contains("release"), "release profile");
    assert_ne!(release.binaryHash, compiled.binaryHash);

    // Job 1: the fixture's test passes; through a chain of redirects.
    let tested = h.call(1, &h.url("/bounce/2"), &session(), "").await;
    assert_success(&tested, "test");
    let log = h.log_text(&tested);
    assert!(log.contains("greets ... ok"), "{log}");

    // Job 2: clippy, from a tree already in the CAS (cas://ROOT of the zip's tree), which
    // this caller's earlier calls brought (and so may read).
    let tree = rba_cas::merkle::build_from_zip(
        &h.node.shared().cas.blobs,
        std::io::Cursor::new(hello.clone()),
        rba_cas::DigestFunction::Blake3,
        &Default::default(),
    )
    .unwrap();
    let root_uri = format!("cas://{:?}", tree.root);
    let linted = h.call(2, &root_uri, &session(), "").await;
    assert_success(&linted, "lint");
    // The digest is public on chain: another caller naming it is answered as if the node
    // held no such blob, and nothing runs.
    let builds = h.node.shared().history.count().await.unwrap();
    let theirs = h
        .call_from(Some(CALLER_B), 2, &root_uri, &session(), "")
        .await;
    assert_refused(&theirs, &format!("no blob {:?}", tree.root));
    // ...and from a zip blob in the CAS: only one the caller may read (granted by the
    // operator here; no call brings a zip blob).
    let blob = h
        .node
        .shared()
        .cas
        .blobs
        .put_bytes(rba_cas::DigestFunction::Blake3, &hello)
        .unwrap();
    let blob_uri = format!("cas://{blob:?}");
    let unread = h.call(2, &blob_uri, &session(), "").await;
    assert_refused(&unread, &format!("no blob {blob:?}"));
    assert_eq!(h.node.shared().history.count().await.unwrap(), builds);
    let caller_a =
        rba_executor::tenant::Tenant::tangle(SERVICE_ID, alloy_primitives::Address::from(CALLER_A));
    h.node
        .shared()
        .cas
        .reads
        .grant(caller_a.as_str(), &[blob])
        .unwrap();
    let linted = h.call(2, &blob_uri, &session(), "").await;
    assert_success(&linted, "lint from a zip blob");

    // Job 3: this node keeps no advisory database (`advisory_db`): an Ok result with status
    // error, and the log says why.
    let audited = h.call(3, &uri, &session(), "").await;
    assert_eq!(audited.status, STATUS_ERROR, "{audited:?}");
    assert_ne!(audited.exitCode, 0, "{audited:?}");
    assert!(!audited.message.is_empty(), "{audited:?}");
    let log = h.log_text(&audited);
    assert!(log.contains("audit"), "{log}");

    // Job 4: check, fetched through the IPFS gateway (a zip with one top-level directory).
    let checked = h
        .call(4, &format!("ipfs://{hello_main_cid}"), &session(), "")
        .await;
    assert_success(&checked, "check");
    assert_eq!(checked.binaryHash, alloy_primitives::FixedBytes::ZERO);

    // A compile error: status error inside an Ok result, with cargo's exit code and log.
    let broken = h.put_zip("broken.zip", &zip_fixture("compile-error", None));
    let failed = h.call(0, &broken, &session(), "debug").await;
    assert_eq!(failed.status, STATUS_ERROR, "{failed:?}");
    assert_eq!(failed.exitCode, 101, "{failed:?}");
    assert!(failed.logDigest.starts_with("blake3:"));
    assert_eq!(failed.binaryHash, alloy_primitives::FixedBytes::ZERO);
    assert!(failed.message.contains("exited with 101"), "{failed:?}");
    let log = h.log_text(&failed);
    assert!(log.contains("error[E"), "{log}");

    // Nothing stays in the download directory.
    assert_eq!(std::fs::read_dir(h.download_dir()).unwrap().count(), 0);
    h.node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requester_attached_to_the_session_gets_the_log_and_the_end() {
    let h = Harness::new(HashMap::new(), |_| {}).await;
    let uri = h.put_zip("hello.zip", &zip_fixture("hello", None));
    let session_id = session();
    let router_call = {
        let (uri, session_id) = (uri.clone(), session_id.clone());
        let router = h.router.clone();
        tokio::spawn(async move {
            let call_id = 42;
            let mut call = JobCall::new(1u8, Bytes::from(encode_job_inputs(&uri, &session_id, "")));
            call.metadata_mut().insert(CallId::METADATA_KEY, call_id);
            call.metadata_mut()
                .insert(ServiceId::METADATA_KEY, SERVICE_ID);
            call.metadata_mut().insert(Caller::METADATA_KEY, CALLER_A);
            let results = router.oneshot(call).await.unwrap().unwrap();
            decode(&results, call_id)
        })
    };

    // The requester knows only the session id from the chain: it retries until the node has
    // the session (the zip is imported first), then reads the events.
    let http = h.node.http_addr().expect("HTTP is on");
    let url = format!("ws://{http}/v1/sessions/{session_id}/events");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut socket = loop {
        match tokio_tungstenite::connect_async(&url).await {
            Ok((socket, _)) => break socket,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "no session: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(
        h.node.shared().session(&session_id).await.is_some(),
        "the session id names the job"
    );
    let mut lines = Vec::new();
    let end = loop {
        let message = tokio::time::timeout(Duration::from_secs(600), socket.next())
            .await
            .expect("events keep coming")
            .expect("the socket stays open until the end")
            .unwrap();
        let tokio_tungstenite::tungstenite::Message::Text(text) = message else {
            continue;
        };
        let event: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(event["session_id"], session_id.as_str());
        match event["type"].as_str() {
            Some("log") => lines.push(event["line"].as_str().unwrap().to_string()),
            _ => break event,
        }
    };
    let _ = socket.close(None).await;
    assert_eq!(end["type"], "end", "{end}");
    assert_eq!(end["status"], "success", "{end}");
    assert!(
        lines.iter().any(|l| l.contains("greets ... ok")),
        "{lines:#?}"
    );

    let result = router_call.await.unwrap();
    assert_success(&result, "test");
    assert!(
        end["duration_ms"].as_u64().unwrap() <= result.durationMs,
        "the job's duration includes the fetch: {end} vs {result:?}"
    );
    // The same session id again is refused (one job per session and caller).
    let again = h.call(1, &uri, &session_id, "").await;
    assert_refused(&again, "already in use");
    // Another caller may use the same id (it is public on chain): its call is not refused,
    // so no caller can squat another's session id; each reads only its own session.
    let other = h.call_from(Some(CALLER_B), 1, &uri, &session_id, "").await;
    assert_success(&other, "caller B with caller A's session id");
    h.node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_zip_uris_give_error_results_and_write_nothing_outside() {
    let h = Harness::new(HashMap::new(), |_| {}).await;
    let outside = tempfile::tempdir().unwrap();
    let escape_name = format!("rba-slip-{}", uuid::Uuid::new_v4());

    let mut cases: Vec<(String, &str)> = Vec::new();
    // Zip slip: a relative escape and an absolute path.
    let slip = zip_entries(&[
        ("Cargo.toml", b"[package]\nname = \"x\"\n"),
        (&format!("../../{escape_name}"), b"escaped"),
    ]);
    cases.push((
        h.put_zip("slip.zip", &slip),
        "'..' component escapes the tree",
    ));
    let absolute = zip_entries(&[(&format!("/tmp/{escape_name}"), b"escaped")]);
    cases.push((h.put_zip("absolute.zip", &absolute), "absolute path"));
    // Zip bomb: 20 MiB of zeros in a few KiB.
    let bomb = zip_entries(&[("bomb.bin", &vec![0u8; 20 << 20])]);
    assert!(bomb.len() < 100 << 10);
    cases.push((h.put_zip("bomb.zip", &bomb), "compression ratio"));
    // Over the size cap (4 MiB here): a file, and a download streamed without a length.
    let big: Vec<u8> = (0..(5u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    cases.push((h.put_zip("big.zip", &big), "larger than the limit"));
    cases.push((h.url("/big"), "larger than the limit"));
    // Not a zip at all.
    cases.push((
        h.put_zip("text.zip", b"hello, not a zip"),
        "rejected archive",
    ));
    // Unreachable host (a port nobody listens on), a slow server, a redirect loop, too many
    // redirects, a 404.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    cases.push((format!("http://{closed}/x.zip"), "cannot reach"));
    cases.push((h.url("/slow"), "timed out"));
    cases.push((h.url("/loop"), "redirect refused"));
    cases.push((h.url("/bounce/5"), "redirect refused"));
    cases.push((h.url("/zips/none.zip"), "HTTP 404"));
    // file:// outside the allowed directory: directly, through `..`, through a symlink.
    let secret = outside.path().join("secret.zip");
    std::fs::write(&secret, zip_fixture("hello", None)).unwrap();
    cases.push((
        format!("file://{}", secret.display()),
        "outside the allowed directory",
    ));
    cases.push((
        "file:///etc/passwd".to_string(),
        "outside the allowed directory",
    ));
    cases.push((
        format!("file://{}/../{}", h.zip_root.display(), "x.zip"),
        "outside the allowed directory",
    ));
    std::os::unix::fs::symlink(&secret, h.zip_root.join("link.zip")).unwrap();
    cases.push((
        format!("file://{}", h.zip_root.join("link.zip").display()),
        "outside the allowed directory",
    ));
    cases.push((
        format!("file://{}", h.zip_root.display()),
        "not a regular file",
    ));
    // IPFS: malformed CIDs.
    cases.push(("ipfs://not-a-cid".to_string(), "malformed IPFS CID"));
    cases.push((
        "ipfs://Qm../../etc/passwd".to_string(),
        "malformed IPFS CID",
    ));
    // Unknown schemes, CAS digests the node does not have, garbage.
    cases.push((
        "ftp://example.com/x.zip".to_string(),
        "unsupported zip_uri scheme",
    ));
    cases.push(("gopher://x".to_string(), "unsupported zip_uri scheme"));
    cases.push(("just-a-path.zip".to_string(), "unsupported zip_uri scheme"));
    cases.push((
        format!("cas://blake3:{}/12", "ab".repeat(32)),
        "not on this node",
    ));
    cases.push(("cas://nonsense".to_string(), "malformed zip_uri"));

    for (uri, needle) in &cases {
        let result = tokio::time::timeout(Duration::from_secs(30), h.call(0, uri, &session(), ""))
            .await
            .unwrap_or_else(|_| panic!("{uri} took too long"));
        assert_refused(&result, needle);
    }

    // Bad inputs other than the URI.
    let uri = h.put_zip("hello.zip", &zip_fixture("hello", None));
    let upper = session().to_uppercase();
    assert_refused(
        &h.call(0, &uri, &upper, "").await,
        "not a canonical lowercase UUID",
    );
    assert_refused(
        &h.call(0, &uri, "", "").await,
        "not a canonical lowercase UUID",
    );
    assert_refused(
        &h.call(0, &uri, &session(), "fast").await,
        "unknown build_target",
    );
    assert_refused(
        &h.call(1, &uri, &session(), "clippy").await,
        "only allowed for job 0",
    );

    // Nothing ran, nothing escaped, nothing stayed behind.
    assert_eq!(
        h.node.shared().history.count().await.unwrap(),
        0,
        "no job was submitted"
    );
    assert!(!Path::new("/tmp").join(&escape_name).exists());
    for ancestor in h.zip_root.ancestors().take(4) {
        assert!(
            !ancestor.join(&escape_name).exists(),
            "{}",
            ancestor.display()
        );
    }
    assert_eq!(std::fs::read_dir(h.download_dir()).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1);
    h.node.shutdown().await.unwrap();
}

#[tokio::test]
async fn plain_http_and_private_hosts_are_refused_and_calls_without_ids_are_skipped() {
    let h = Harness::new(HashMap::new(), |config| config.allow_http = false).await;
    let result = h.call(0, &h.url("/zips/hello.zip"), &session(), "").await;
    assert_refused(&result, "plain http:// is not accepted");
    // The gateway is the operator's choice: a plain-HTTP loopback gateway is still used (and
    // the CID here is unknown to it).
    let result = h
        .call(
            0,
            "ipfs://QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG",
            &session(),
            "",
        )
        .await;
    assert_refused(&result, "HTTP 404");

    h.node.shutdown().await.unwrap();

    // Production settings: a customer's URI cannot reach the operator's own network, neither
    // directly nor by the name `localhost` (names resolving only to private addresses and
    // redirects to them are refused the same way, see `fetch::PublicResolver`).
    let h = Harness::new(HashMap::new(), |config| config.allow_private_hosts = false).await;
    let port = h.http.port();
    for (uri, needle) in [
        (
            format!("http://127.0.0.1:{port}/zips/hello.zip"),
            "127.0.0.1 is not a public address",
        ),
        (
            format!("http://[::1]:{port}/zips/hello.zip"),
            "[::1] is not a public address",
        ),
        (
            format!("http://localhost:{port}/zips/hello.zip"),
            "localhost is not a public address",
        ),
        (
            format!("http://10.0.0.1:{port}/x"),
            "10.0.0.1 is not a public address",
        ),
    ] {
        let result = h.call(0, &uri, &session(), "").await;
        assert_refused(&result, needle);
    }

    // Without X-TANGLE-CALL-ID / X-TANGLE-SERVICE-ID, TangleLayer skips the job: no result at
    // all (so a producer must always set them).
    let results = h
        .call_raw(
            0,
            encode_job_inputs("https://example.com/x.zip", &session(), ""),
            None,
        )
        .await;
    assert!(results.is_empty(), "{results:?}");
    h.node.shutdown().await.unwrap();
}

/// The `hello` fixture with another greeting: another tree, so one caller's build is not
/// answered from the other's shared result.
fn hello_variant_zip() -> Vec<u8> {
    let read = |path: &str| std::fs::read(fixture("hello").join(path)).unwrap();
    let main = String::from_utf8(read("src/main.rs"))
        .unwrap()
        .replace("rust-build-agent", "another caller");
    zip_entries(&[
        ("Cargo.toml", &read("Cargo.toml")),
        ("Cargo.lock", &read("Cargo.lock")),
        ("src/main.rs", main.as_bytes()),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callers_of_one_service_get_their_own_target_dirs_unless_the_operator_shares_them() {
    let (hello, variant) = (zip_fixture("hello", None), hello_variant_zip());

    let h = Harness::new(HashMap::new(), |_| {}).await;
    let (first, second) = (h.put_zip("a.zip", &hello), h.put_zip("b.zip", &variant));
    let a = h.call_from(Some(CALLER_A), 4, &first, &session(), "").await;
    assert_success(&a, "caller A");
    assert_eq!(h.slots(), 1);
    let b = h
        .call_from(Some(CALLER_B), 4, &second, &session(), "")
        .await;
    assert_success(&b, "caller B");
    assert_eq!(h.slots(), 2, "caller B builds in a target dir of its own");
    // A call without a caller has no tenant: refused, nothing runs.
    let anonymous = h.call_from(None, 4, &first, &session(), "").await;
    assert_refused(&anonymous, "names no caller");
    h.node.shutdown().await.unwrap();

    // The operator's choice: one target dir per service, whoever calls.
    let h = Harness::new(HashMap::new(), |config| {
        config.share_target_dir_per_service = true
    })
    .await;
    let (first, second) = (h.put_zip("a.zip", &hello), h.put_zip("b.zip", &variant));
    assert_success(
        &h.call_from(Some(CALLER_A), 4, &first, &session(), "").await,
        "caller A, shared",
    );
    assert_success(
        &h.call_from(Some(CALLER_B), 4, &second, &session(), "")
            .await,
        "caller B, shared",
    );
    assert_eq!(
        h.slots(),
        1,
        "both callers used the service's one target dir"
    );
    h.node.shutdown().await.unwrap();
}

impl Harness {
    /// Job 5 from `caller` with the contract's flat input encoding; the one decoded result.
    async fn execute(
        &self,
        caller: Option<[u8; 20]>,
        code: &str,
        artifact: &str,
        stdin: &str,
        timeout_secs: u64,
    ) -> ExecutionResult {
        let call_id = rand_call_id();
        let inputs = encode_execute_inputs(code, artifact, stdin, timeout_secs, 0);
        let results = self
            .call_raw_from(EXECUTE_CODE, inputs, Some(call_id), caller)
            .await;
        assert_eq!(results.len(), 1, "one result per call");
        match &results[0] {
            JobResult::Ok { body, .. } => ExecutionResult::abi_decode(body).expect("ABI result"),
            JobResult::Err(e) => panic!("job 5 answered an error instead of a result: {e:?}"),
        }
    }
}

#[tokio::test]
async fn job_5_runs_code_like_post_execute_and_refuses_what_it_must() {
    let h = Harness::new(HashMap::new(), |_| {}).await;
    let echo = "use std::io::Read;\nfn main() { let mut s = String::new(); \
                std::io::stdin().read_to_string(&mut s).unwrap(); print!(\"got {s}\"); }";
    let first = h.execute(Some(CALLER_A), echo, "", "tangle", 0).await;
    assert_eq!(first.status, STATUS_SUCCESS, "{first:?}");
    assert_eq!(first.exitCode, 0);
    assert_eq!(first.stdout, "got tangle\n", "{first:?}");
    assert!(!first.compileCached);
    assert!(first.artifact.starts_with("blake3:"), "{first:?}");
    // The same code again: the compilation is an action-cache hit, the run happens again.
    let again = h.execute(Some(CALLER_A), echo, "", "again", 0).await;
    assert_eq!(again.stdout, "got again\n");
    assert!(again.compileCached, "{again:?}");
    // By artifact, for the caller whose build it is.
    let by_artifact = h.execute(Some(CALLER_A), "", &first.artifact, "x", 0).await;
    assert_eq!(by_artifact.stdout, "got x\n", "{by_artifact:?}");

    // Another caller may not run A's binary: the same answer as a digest nobody stored.
    let stranger = h.execute(Some(CALLER_B), "", &first.artifact, "", 0).await;
    assert_eq!(stranger.status, STATUS_ERROR);
    assert!(stranger.message.contains("not found"), "{stranger:?}");
    assert!(stranger.stdout.is_empty());

    // A panic: exit 101 and the panic message on stderr.
    let panic = h
        .execute(Some(CALLER_A), "fn main() { panic!(\"boom\") }", "", "", 0)
        .await;
    assert_eq!(
        (panic.status, panic.exitCode),
        (STATUS_ERROR, 101),
        "{panic:?}"
    );
    assert!(panic.stderr.contains("boom"), "{panic:?}");
    // An endless loop ends at the timeout it asked for.
    let endless = h
        .execute(Some(CALLER_A), "fn main() { loop {} }", "", "", 1)
        .await;
    assert_eq!(endless.status, STATUS_TIMEOUT, "{endless:?}");
    // Output larger than what goes on chain is cut and says so.
    let loud = h
        .execute(
            Some(CALLER_A),
            "fn main() { for _ in 0..2000 { println!(\"0123456789\"); } }",
            "",
            "",
            0,
        )
        .await;
    assert_eq!(loud.status, STATUS_SUCCESS, "{loud:?}");
    assert!(loud.stdout.len() <= CHAIN_OUTPUT_CAP && loud.outputTruncated);

    // Refused before anything runs, the field named: both programs, none, a bad digest, no
    // caller.
    for (code, artifact, needle) in [
        ("fn main() {}", first.artifact.as_str(), "artifact"),
        ("", "", "code"),
        ("", "blake3:zz/1", "artifact"),
    ] {
        let refused = h.execute(Some(CALLER_A), code, artifact, "", 0).await;
        assert_eq!(refused.status, STATUS_ERROR, "{refused:?}");
        assert_eq!(refused.exitCode, -1);
        assert!(refused.message.contains(needle), "{needle}: {refused:?}");
    }
    let anonymous = h.execute(None, "fn main() {}", "", "", 0).await;
    assert!(
        anonymous.message.contains("names no caller"),
        "{anonymous:?}"
    );
    h.node.shutdown().await.unwrap();
}

#[test]
fn tangle_run_help_and_missing_environment() {
    let help = assert_cmd::Command::cargo_bin("rba")
        .unwrap()
        .args(["tangle", "run", "--help"])
        .assert()
        .success();
    let text = String::from_utf8_lossy(&help.get_output().stdout).to_string();
    for needle in [
        "KEYSTORE_URI",
        "DATA_DIR",
        "HTTP_RPC_URL",
        "--file-root",
        "--ipfs-gateway",
    ] {
        assert!(text.contains(needle), "{needle} in {text}");
    }

    let data = tempfile::tempdir().unwrap();
    let run = assert_cmd::Command::cargo_bin("rba")
        .unwrap()
        .env_clear()
        .env("HOME", data.path())
        .args(["tangle", "run"])
        .assert()
        .code(2);
    let stderr = String::from_utf8_lossy(&run.get_output().stderr).to_string();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.starts_with(
            "rba: error: the blueprint environment is incomplete: BLUEPRINT_ID is not set"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("KEYSTORE_URI is not set"), "{stderr}");

    // A keystore path that does not exist is named.
    let run = assert_cmd::Command::cargo_bin("rba")
        .unwrap()
        .env_clear()
        .env("BLUEPRINT_ID", "3")
        .env("SERVICE_ID", "1")
        .env("DATA_DIR", data.path())
        .env("KEYSTORE_URI", data.path().join("no-keystore"))
        .args(["tangle", "run"])
        .assert()
        .code(2);
    let stderr = String::from_utf8_lossy(&run.get_output().stderr).to_string();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("no keystore at"), "{stderr}");
    assert!(!stderr.contains("BLUEPRINT_ID"), "{stderr}");
}
