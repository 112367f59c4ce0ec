//! The `Store` contract, checked the same way against every backend through the trait alone
//! (see `rba_cas::seams`): the embedded filesystem store, a bucket store on a real
//! S3-compatible server (moto, `rba_e2e_tests::s3`), and the fast/slow layer over it. Each
//! backend's own behaviour (multipart, races, refusals) is tested beside it (`bucket.rs`).

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use rba_cas::backends::embedded_index::EmbeddedBlobIndex;
use rba_cas::backends::s3::{BucketOptions, BucketStore};
use rba_cas::layers::tiered::Tiered;
use rba_cas::{Cas, CasError, Digest, DigestFunction, Store, StoreConfig};
use rba_e2e_tests::s3::TestS3;

fn chunks(parts: Vec<&'static [u8]>) -> rba_cas::ChunkStream {
    futures::stream::iter(parts.into_iter().map(|p| Ok(Bytes::from_static(p)))).boxed()
}

async fn read_all(store: &dyn Store, digest: &Digest, offset: u64, limit: u64) -> Vec<u8> {
    let mut stream = store.read(digest, offset, limit).await.unwrap();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        bytes.extend_from_slice(&chunk.unwrap());
    }
    bytes
}

/// Everything a caller may rely on, through `dyn Store`.
async fn store_contract(store: &dyn Store) {
    let function = DigestFunction::Sha256;
    let hello = function.digest_of(b"hello world");
    let empty = function.empty();
    let absent = function.digest_of(b"never written");

    // Absent until written; the empty blob always present; order kept, duplicates once.
    assert_eq!(
        store
            .find_missing(&[absent, hello, empty, absent])
            .await
            .unwrap(),
        vec![absent, hello]
    );
    store
        .write(hello, chunks(vec![b"hello ", b"world"]))
        .await
        .unwrap();
    assert!(store.contains(&hello).await.unwrap());
    assert_eq!(read_all(store, &hello, 0, 0).await, b"hello world");
    assert_eq!(read_all(store, &hello, 6, 3).await, b"wor");
    assert_eq!(read_all(store, &hello, 11, 0).await, b"");
    assert!(matches!(
        store.read(&hello, 12, 0).await,
        Err(CasError::OffsetOutOfRange { .. })
    ));
    assert!(matches!(
        store.read(&absent, 0, 0).await,
        Err(CasError::NotFound(d)) if d == absent
    ));
    // Writing again is harmless.
    store
        .write(hello, chunks(vec![b"hello world"]))
        .await
        .unwrap();

    // Bytes that do not match their digest are refused and never become visible.
    let lie = function.digest_of(b"the truth");
    assert!(matches!(
        store.write(lie, chunks(vec![b"the lies!"])).await,
        Err(CasError::HashMismatch { .. })
    ));
    let short = function.digest_of(b"longer than this");
    assert!(matches!(
        store.write(short, chunks(vec![b"longer"])).await,
        Err(CasError::SizeMismatch { .. })
    ));
    assert_eq!(
        store.find_missing(&[lie, short]).await.unwrap(),
        vec![lie, short]
    );

    // A failed stream stores nothing.
    let cut = function.digest_of(b"cut short");
    let failing = futures::stream::iter(vec![
        Ok(Bytes::from_static(b"cut ")),
        Err(CasError::Unavailable("the client went away".into())),
    ])
    .boxed();
    assert!(store.write(cut, failing).await.is_err());
    assert!(!store.contains(&cut).await.unwrap());

    // A batch: each blob stands alone.
    let good = function.digest_of(b"good");
    let bad = function.digest_of(b"bad");
    let results = store
        .write_batch(vec![
            (good, Bytes::from_static(b"good")),
            (bad, Bytes::from_static(b"BAD")),
            (hello, Bytes::from_static(b"hello world")),
        ])
        .await;
    assert_eq!(results.len(), 3);
    assert!(
        results[0].is_ok() && results[1].is_err() && results[2].is_ok(),
        "{results:?}"
    );
    assert_eq!(store.find_missing(&[good, bad]).await.unwrap(), vec![bad]);
    assert_eq!(store.read_to_vec(&good, 4).await.unwrap(), b"good");
    assert!(matches!(
        store.read_to_vec(&hello, 4).await,
        Err(CasError::QuotaExceeded(_))
    ));
    store.touch(&[good, absent]).await.unwrap();
    assert!(store.stats().blob_count >= 2);
}

#[tokio::test]
async fn the_embedded_store_keeps_the_contract() {
    let (_dir, cas) = Cas::scratch().unwrap();
    store_contract(&cas.blobs).await;
    // Its local tier is itself: making blobs local only checks they are there.
    let function = DigestFunction::Blake3;
    let absent = function.digest_of(b"absent");
    assert!(cas.blobs.local().is_some());
    assert!(matches!(
        cas.blobs.make_local(&[absent]).await,
        Err(CasError::NotFound(d)) if d == absent
    ));
}

#[tokio::test]
async fn a_large_blob_streams_in_chunks() {
    let (_dir, cas) = Cas::scratch().unwrap();
    let bytes: Vec<u8> = (0..5 * rba_cas::seams::READ_CHUNK_BYTES + 17)
        .map(|i| (i % 251) as u8)
        .collect();
    let digest = DigestFunction::Blake3.digest_of(&bytes);
    let stream = futures::stream::iter(
        bytes
            .chunks(100_000)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    )
    .boxed();
    cas.blobs.write(digest, stream).await.unwrap();
    let mut stream = Store::read(&cas.blobs, &digest, 0, 0).await.unwrap();
    let mut chunks = 0;
    let mut read = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        assert!(chunk.len() <= rba_cas::seams::READ_CHUNK_BYTES);
        read.extend_from_slice(&chunk);
        chunks += 1;
    }
    assert_eq!(chunks, 6);
    assert_eq!(read, bytes);
}

fn bucket(s3: &TestS3, index_dir: &std::path::Path) -> BucketStore {
    let index = Arc::new(EmbeddedBlobIndex::open(index_dir).unwrap());
    BucketStore::from_url_and_vars(&s3.url(), s3.env(), BucketOptions::no_retries(), index).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bucket_store_keeps_the_contract() {
    let s3 = TestS3::start();
    let dir = tempfile::tempdir().unwrap();
    let store = bucket(&s3, &dir.path().join("index"));
    store_contract(&store).await;
    assert!(store.local().is_none());
    assert!(matches!(
        store.make_local(&[DigestFunction::Sha256.empty()]).await,
        Err(CasError::Unavailable(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tiered_store_keeps_the_contract_and_publishes_what_was_written_locally() {
    let s3 = TestS3::start();
    let dir = tempfile::tempdir().unwrap();
    let slow: Arc<dyn Store> = Arc::new(bucket(&s3, &dir.path().join("index")));
    let fast =
        rba_cas::BlobStore::open(dir.path().join("fast"), StoreConfig::without_fsync()).unwrap();
    let tiered = Tiered::new(fast.clone(), slow.clone());
    store_contract(&tiered).await;

    // Written straight into the fast tier (as a resumable upload or an action's outputs are):
    // not stored for other processes until published.
    let function = DigestFunction::Blake3;
    let output = fast.put_bytes(function, b"an action's output").unwrap();
    assert_eq!(tiered.find_missing(&[output]).await.unwrap(), vec![output]);
    tiered.publish_local(&[output]).await.unwrap();
    assert!(slow.contains(&output).await.unwrap());
    tiered.publish_local(&[output]).await.unwrap(); // again: nothing to do
    let absent = function.digest_of(b"in no tier");
    assert!(matches!(
        tiered.publish_local(&[absent]).await,
        Err(CasError::NotFound(d)) if d == absent
    ));

    // Another machine's tiered view (its own empty fast tier) reads it and makes it local.
    let other_fast =
        rba_cas::BlobStore::open(dir.path().join("other-fast"), StoreConfig::without_fsync())
            .unwrap();
    let other = Tiered::new(other_fast.clone(), slow);
    other.make_local(&[output]).await.unwrap();
    assert_eq!(
        other_fast.read_to_vec(&output, 100).unwrap(),
        b"an action's output"
    );
}
