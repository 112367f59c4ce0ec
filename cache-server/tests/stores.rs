//! The REAPI services over stores the caller built and handed in (`Server::with_stores`), the
//! construction path of a scale-out front end: the server opens nothing, serves exactly the
//! given stores, keeps the completeness rule and the verification of uploads through the
//! seams, and refuses to pair them with an executor that runs elsewhere.

mod common;

use std::sync::Arc;

use common::*;
use rba_cache_server::Server;
use rba_cache_server::resource_name::{self, Compressor};
use rba_cas::{Cas, ChunkStream, Digest, DigestFunction, Store, StoreConfig, StoreStats, Stores};
use rba_executor::runner::{Executor, ExecutorConfig};
use rba_proto::Message;
use rba_proto::bytestream::QueryWriteStatusRequest;
use rba_proto::reapi::{
    ActionResult, BatchUpdateBlobsRequest, Directory, FileNode, FindMissingBlobsRequest,
    GetActionResultRequest, GetCapabilitiesRequest, OutputDirectory, OutputFile, Tree,
    UpdateActionResultRequest, batch_update_blobs_request,
};
use tonic::Code;

const SHA: DigestFunction = DigestFunction::Sha256;

/// The embedded stores of a `Cas` the test opened itself, under `dir/cas`.
fn embedded(dir: &std::path::Path) -> Cas {
    Cas::open(dir.join("cas"), StoreConfig::without_fsync()).unwrap()
}

async fn missing(c: &mut Clients, digests: &[Digest]) -> Vec<rba_proto::reapi::Digest> {
    c.cas
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: digests.iter().map(Digest::to_reapi).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests
}

fn entry(digest: &Digest, data: &[u8]) -> batch_update_blobs_request::Request {
    batch_update_blobs_request::Request {
        digest: Some(digest.to_reapi()),
        data: data.to_vec(),
        compressor: 0,
    }
}

#[tokio::test]
async fn reapi_services_run_over_the_stores_they_are_given() {
    let dir = tempfile::tempdir().unwrap();
    let cas = embedded(dir.path());
    let config = test_config(&dir.path().join("unused"));
    let server = Server::with_stores(config, Stores::embedded(&cas), None)
        .unwrap()
        .spawn_server()
        .await
        .unwrap();
    assert!(server.embedded.is_none(), "the server opened no store");
    assert!(
        !dir.path().join("unused").exists(),
        "nothing created under the configured data_dir"
    );
    let mut c = Clients::new(
        tonic::transport::Channel::from_shared(server.url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let caps = c
        .caps
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!caps.execution_capabilities.unwrap().exec_enabled);

    // Blobs in through the services land in the caller's store, and back out.
    let small = c.put("", SHA, b"a small blob").await;
    assert!(cas.blobs.contains(&small).unwrap());
    let big = noise(3 << 20, 1);
    let big_digest = SHA.digest_of(&big);
    c.write("", &big_digest, &big, Compressor::Identity, 100_000)
        .await
        .unwrap();
    assert!(cas.blobs.contains(&big_digest).unwrap());
    for compressor in [Compressor::Identity, Compressor::Zstd] {
        let wire = c
            .read(&resource_name::read_name("", &big_digest, compressor), 0, 0)
            .await
            .unwrap();
        let data = match compressor {
            Compressor::Identity => wire,
            Compressor::Zstd => zstd::stream::decode_all(wire.as_slice()).unwrap(),
        };
        assert!(data == big, "{compressor:?} read differs");
    }
    let ranged = c
        .read(
            &resource_name::read_name("", &big_digest, Compressor::Identity),
            (1 << 20) + 7,
            (1 << 20) + 3,
        )
        .await
        .unwrap();
    assert!(ranged == big[(1 << 20) + 7..(2 << 20) + 10]);

    // Completeness: a result is served while every blob it names is present, not after.
    let out = c.put("", SHA, b"the binary").await;
    let inner = c.put("", SHA, b"a file in an output directory").await;
    let tree = Tree {
        root: Some(Directory {
            files: vec![FileNode {
                name: "f".into(),
                digest: Some(inner.to_reapi()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        children: vec![],
    };
    let tree_digest = c.put("", SHA, &tree.encode_to_vec()).await;
    let action = SHA.digest_of(b"an action");
    let result = ActionResult {
        output_files: vec![OutputFile {
            path: "bin".into(),
            digest: Some(out.to_reapi()),
            ..Default::default()
        }],
        output_directories: vec![OutputDirectory {
            path: "dir".into(),
            tree_digest: Some(tree_digest.to_reapi()),
            ..Default::default()
        }],
        ..Default::default()
    };
    c.ac.update_action_result(UpdateActionResultRequest {
        action_digest: Some(action.to_reapi()),
        action_result: Some(result.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let get = GetActionResultRequest {
        action_digest: Some(action.to_reapi()),
        ..Default::default()
    };
    assert_eq!(
        c.ac.get_action_result(get.clone())
            .await
            .unwrap()
            .into_inner(),
        result
    );
    // The file inside the output tree disappears behind the store's back: a miss.
    std::fs::remove_file(cas.blobs.blob_path(&inner)).unwrap();
    assert_eq!(
        c.ac.get_action_result(get.clone())
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    // Uploaded again: a hit again.
    c.put("", SHA, b"a file in an output directory").await;
    c.ac.get_action_result(get.clone()).await.unwrap();

    // Hostile batch: each lie fails alone, is not findable, and the good entry is stored.
    let lie = SHA.digest_of(b"the truth");
    let good = b"an honest blob";
    let good_digest = SHA.digest_of(good);
    let response = c
        .cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: vec![
                entry(&lie, b"the lies!"),                     // same size, wrong bytes
                entry(&good_digest, good),                     // fine
                entry(&small, b"not the small blob"),          // present: still verified
                entry(&lie, b"the truth, and then some more"), // size lie
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> = response
        .responses
        .iter()
        .map(|r| r.status.as_ref().unwrap().code)
        .collect();
    let invalid = Code::InvalidArgument as i32;
    assert_eq!(codes, [invalid, 0, invalid, invalid]);
    assert_eq!(missing(&mut c, &[lie, good_digest]).await, [lie.to_reapi()]);
    assert!(!cas.blobs.contains(&lie).unwrap());

    // ByteStream writes that lie about the digest or the size are refused, storing nothing.
    let data = noise(300_000, 2);
    let digest = SHA.digest_of(&data);
    let longer = [data.as_slice(), b"extra"].concat();
    let mut wrong = data.clone();
    wrong[1234] ^= 1;
    for (what, wire) in [
        ("more bytes than the digest says", longer.as_slice()),
        ("fewer bytes", &data[..data.len() - 1]),
        ("the right size, the wrong bytes", wrong.as_slice()),
    ] {
        let status = c
            .write("", &digest, wire, Compressor::Identity, 64 << 10)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    }
    assert_eq!(missing(&mut c, &[digest]).await, [digest.to_reapi()]);
    assert!(!cas.blobs.contains(&digest).unwrap());
    assert_eq!(temp_files(&dir.path().join("cas")), 0, "temp files left");

    // A stored blob truncated behind the store's back is lost data, plain or compressed.
    let doomed = noise(50_000, 9);
    let doomed_digest = c.put("", SHA, &doomed).await;
    std::fs::write(cas.blobs.blob_path(&doomed_digest), &doomed[..20_000]).unwrap();
    for compressor in [Compressor::Identity, Compressor::Zstd] {
        let status = c
            .read(
                &resource_name::read_name("", &doomed_digest, compressor),
                0,
                0,
            )
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::DataLoss, "{compressor:?}: {status:?}");
    }

    // Metrics read the seams' counters.
    let metrics = http_get(server.metrics_addr.unwrap(), "/metrics").await;
    assert!(
        metrics.contains("rba_cache_action_cache_entries 1\n"),
        "{metrics}"
    );
    let blobs = format!("rba_cache_store_blobs {}\n", cas.blobs.stats().blob_count);
    assert!(metrics.contains(&blobs), "{metrics}");

    server.shutdown().await.unwrap();
    // The caller's store outlives the server and holds what it stored.
    assert!(cas.blobs.contains(&good_digest).unwrap());
}

/// A real store seen through a seam without a local filesystem tier (as a bucket-only backend
/// is): every call goes to the embedded store, but `local()` is `None`.
#[derive(Debug)]
struct WithoutLocalTier(rba_cas::BlobStore);

#[tonic::async_trait]
impl Store for WithoutLocalTier {
    fn backend(&self) -> &'static str {
        "no-local-tier"
    }

    async fn find_missing(&self, digests: &[Digest]) -> rba_cas::Result<Vec<Digest>> {
        Store::find_missing(&self.0, digests).await
    }

    async fn touch(&self, digests: &[Digest]) -> rba_cas::Result<()> {
        Store::touch(&self.0, digests).await
    }

    async fn read(&self, digest: &Digest, offset: u64, limit: u64) -> rba_cas::Result<ChunkStream> {
        Store::read(&self.0, digest, offset, limit).await
    }

    async fn write(&self, digest: Digest, chunks: ChunkStream) -> rba_cas::Result<()> {
        Store::write(&self.0, digest, chunks).await
    }

    async fn write_batch(&self, blobs: Vec<(Digest, bytes::Bytes)>) -> Vec<rba_cas::Result<()>> {
        Store::write_batch(&self.0, blobs).await
    }

    fn stats(&self) -> StoreStats {
        Store::stats(&self.0)
    }
}

#[tokio::test]
async fn a_store_without_a_local_tier_takes_whole_uploads_through_its_write() {
    let dir = tempfile::tempdir().unwrap();
    let cas = embedded(dir.path());
    let stores = Stores::new(
        Arc::new(WithoutLocalTier(cas.blobs.clone())),
        Arc::new(cas.actions.clone()),
        Arc::new(cas.reads.clone()),
    );
    let server = Server::with_stores(test_config(dir.path()), stores, None)
        .unwrap()
        .spawn_server()
        .await
        .unwrap();
    let mut c = Clients::new(
        tonic::transport::Channel::from_shared(server.url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    // Whole uploads, plain and compressed, in many messages.
    for (seed, compressor) in [(3, Compressor::Identity), (4, Compressor::Zstd)] {
        let data = noise(700_000, seed);
        let digest = SHA.digest_of(&data);
        let wire = match compressor {
            Compressor::Identity => data.clone(),
            Compressor::Zstd => zstd::bulk::compress(&data, 1).unwrap(),
        };
        c.write("i", &digest, &wire, compressor, 50_000)
            .await
            .unwrap();
        assert!(cas.blobs.contains(&digest).unwrap());
        let read = c
            .read(
                &resource_name::read_name("i", &digest, Compressor::Identity),
                0,
                0,
            )
            .await
            .unwrap();
        assert!(read == data);
    }
    // A broken stream stores nothing and cannot be resumed.
    let data = noise(200_000, 5);
    let digest = SHA.digest_of(&data);
    let name = resource_name::write_name("", "broken", &digest, Compressor::Identity);
    let status = c
        .write_named(&name, &data[..100_000], 10_000, false)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("from offset 0"), "{status:?}");
    let state =
        c.bs.query_write_status(QueryWriteStatusRequest {
            resource_name: name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((state.committed_size, state.complete), (0, false));
    let resumed = write_requests(&name, &data, 100_000, 10_000, true);
    assert_eq!(
        c.bs.write(tokio_stream::iter(resumed))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    // Lies are refused by the store's own verification.
    let mut wrong = data.clone();
    wrong[7] ^= 1;
    let status = c
        .write("", &digest, &wrong, Compressor::Identity, 10_000)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let longer = [data.as_slice(), b"!"].concat();
    let status = c
        .write("", &digest, &longer, Compressor::Identity, 10_000)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(missing(&mut c, &[digest]).await, [digest.to_reapi()]);
    // The whole blob, in one stream: stored.
    c.write("", &digest, &data, Compressor::Identity, 10_000)
        .await
        .unwrap();
    assert!(missing(&mut c, &[digest]).await.is_empty());
    server.shutdown().await.unwrap();
    assert_eq!(temp_files(&dir.path().join("cas")), 0, "temp files left");
}

#[tokio::test]
async fn execution_is_refused_over_stores_that_are_not_the_executors() {
    let dir = tempfile::tempdir().unwrap();
    let executors = embedded(&dir.path().join("a"));
    let others = embedded(&dir.path().join("b"));
    let executor = Executor::new(
        executors.clone(),
        ExecutorConfig::new(dir.path().join("executor")).unwrap(),
    )
    .expect("the executor starts (run .ci/setup.d/sandbox.sh)");
    let config = test_config(dir.path());

    let refused = Server::with_stores(
        config.clone(),
        Stores::embedded(&others),
        Some(executor.clone()),
    )
    .unwrap_err();
    let message = format!("{refused:#}");
    assert!(
        message.contains("the executor runs on the embedded store under"),
        "{message}"
    );
    let cache_only = Server::with_stores(config.clone(), Stores::embedded(&others), None).unwrap();
    assert!(!cache_only.state().execution_enabled());
    assert!(cache_only.with_executor(executor.clone()).is_err());

    // The executor's own stores (a second handle on the same Cas): served with Execution.
    let served = Server::with_stores(config, Stores::embedded(&executors), Some(executor)).unwrap();
    assert!(served.state().execution_enabled());
}
