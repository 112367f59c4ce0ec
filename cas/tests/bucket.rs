//! The bucket store ([`BucketStore`] over [`EmbeddedBlobIndex`]) and the fast/slow layer
//! ([`Tiered`]) against a real S3-compatible server: moto in server mode
//! (`rba_e2e_tests::s3::TestS3`, installed by `.ci/setup.d/s3.sh`), one per test.
//!
//! Hostile writers go through the store's real entry points: garbage under another blob's
//! digest, more or fewer bytes than promised, and the race of a garbage writer against an
//! honest one on the same digest (S3 is last writer wins: the honest bytes must stay).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use rba_cas::backends::embedded_index::EmbeddedBlobIndex;
use rba_cas::backends::s3::{BucketOptions, BucketSettings, BucketStore, parse_store_url};
use rba_cas::layers::tiered::Tiered;
use rba_cas::{BlobIndex, BlobStore, CasError, ChunkStream, Digest, DigestFunction, Store};
use rba_cas::{Result, StoreStats};
use rba_e2e_tests::s3::TestS3;

const MIB: usize = 1 << 20;

/// Deterministic bytes that differ per seed.
fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn sha(bytes: &[u8]) -> Digest {
    DigestFunction::Sha256.digest_of(bytes)
}

fn stream(bytes: &[u8], chunk: usize) -> ChunkStream {
    let chunks: Vec<Result<Bytes>> = bytes
        .chunks(chunk.max(1))
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    futures::stream::iter(chunks).boxed()
}

/// A stream that waits `pause` before each chunk (a slow client).
fn slow_stream(bytes: &[u8], chunk: usize, pause: Duration) -> ChunkStream {
    stream(bytes, chunk)
        .then(move |c| async move {
            tokio::time::sleep(pause).await;
            c
        })
        .boxed()
}

async fn read_all(store: &dyn Store, digest: &Digest, offset: u64, limit: u64) -> Result<Vec<u8>> {
    let mut chunks = store.read(digest, offset, limit).await?;
    let mut out = Vec::new();
    while let Some(chunk) = chunks.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

/// A real index that counts the calls made to it (the batch contract: one insert).
#[derive(Debug)]
struct Counting {
    inner: EmbeddedBlobIndex,
    inserts: AtomicUsize,
    queries: AtomicUsize,
}

#[async_trait]
impl BlobIndex for Counting {
    fn backend(&self) -> &'static str {
        "counting"
    }
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        self.inner.find_missing(digests).await
    }
    async fn insert(&self, digests: &[Digest]) -> Result<()> {
        self.inserts.fetch_add(1, Ordering::SeqCst);
        self.inner.insert(digests).await
    }
    async fn touch(&self, digests: &[Digest]) -> Result<()> {
        self.inner.touch(digests).await
    }
    async fn remove(&self, digests: &[Digest]) -> Result<()> {
        self.inner.remove(digests).await
    }
    async fn least_recently_used(&self, limit: usize) -> Result<Vec<Digest>> {
        self.inner.least_recently_used(limit).await
    }
    fn stats(&self) -> StoreStats {
        self.inner.stats()
    }
}

struct Fixture {
    s3: TestS3,
    _dir: tempfile::TempDir,
    index: Arc<Counting>,
    store: BucketStore,
}

/// A moto server, an embedded index, and a bucket store under `s3://rba-test/pre/fix`
/// configured the way an operator does it: a URL and `AWS_*` variables.
fn fixture(options: BucketOptions) -> Fixture {
    let s3 = TestS3::start();
    let dir = tempfile::tempdir().unwrap();
    let index = Arc::new(Counting {
        inner: EmbeddedBlobIndex::open(dir.path().join("index")).unwrap(),
        inserts: AtomicUsize::new(0),
        queries: AtomicUsize::new(0),
    });
    let store = BucketStore::from_url_and_vars(
        &format!("{}/pre/fix/", s3.url()),
        s3.env(),
        options,
        index.clone(),
    )
    .unwrap();
    Fixture {
        s3,
        _dir: dir,
        index,
        store,
    }
}

/// Options that send blobs above 1 MiB as multipart uploads of 5 MiB parts (S3's minimum).
fn small_multipart() -> BucketOptions {
    BucketOptions {
        single_put_max: MIB as u64,
        part_size: 5 * MIB,
        ..BucketOptions::no_retries()
    }
}

async fn keys(store: &BucketStore) -> Vec<String> {
    let mut keys: Vec<String> = store
        .objects()
        .list(None)
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await
        .unwrap();
    keys.sort();
    keys
}

/// Multipart uploads the server still holds open (aborted ones are gone).
fn open_uploads(s3: &TestS3) -> usize {
    let (status, body) = s3
        .request("GET", &format!("/{}?uploads", s3.bucket()))
        .unwrap();
    assert_eq!(status, 200, "{body}");
    body.matches("<UploadId>").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_then_read_whole_and_ranges() {
    let f = fixture(BucketOptions::no_retries());
    let bytes = data(1, 100_000);
    let digest = sha(&bytes);
    f.store.write(digest, stream(&bytes, 7_000)).await.unwrap();

    assert_eq!(
        keys(&f.store).await,
        vec![format!("pre/fix/cas/sha256/{}-100000", digest.hash_hex())]
    );
    assert_eq!(read_all(&f.store, &digest, 0, 0).await.unwrap(), bytes);
    assert_eq!(
        read_all(&f.store, &digest, 10, 90).await.unwrap(),
        &bytes[10..100]
    );
    assert_eq!(
        read_all(&f.store, &digest, 99_990, 1_000).await.unwrap(),
        &bytes[99_990..],
        "a limit past the end stops at the end"
    );
    assert!(
        read_all(&f.store, &digest, 100_000, 0)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        f.store.read(&digest, 100_001, 0).await,
        Err(CasError::OffsetOutOfRange {
            offset: 100_001,
            ..
        })
    ));

    let absent = sha(b"never stored");
    assert!(matches!(
        f.store.read(&absent, 0, 0).await,
        Err(CasError::NotFound(d)) if d == absent
    ));
    let empty = DigestFunction::Sha256.empty();
    assert!(read_all(&f.store, &empty, 0, 0).await.unwrap().is_empty());
    assert!(matches!(
        f.store.read(&empty, 1, 0).await,
        Err(CasError::OffsetOutOfRange { .. })
    ));

    // A second write of the same blob is drained and counted, not stored again; a wrong
    // length is still refused.
    let inserts = f.index.inserts.load(Ordering::SeqCst);
    f.store.write(digest, stream(&bytes, 50_000)).await.unwrap();
    assert!(matches!(
        f.store.write(digest, stream(&bytes[1..], 50_000)).await,
        Err(CasError::SizeMismatch { actual: 99_999, .. })
    ));
    assert_eq!(f.index.inserts.load(Ordering::SeqCst), inserts);
    assert_eq!(f.store.stats().blob_count, 1);
    assert_eq!(f.store.stats().total_bytes, 100_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_settings_and_blake3() {
    let s3 = TestS3::start();
    let dir = tempfile::tempdir().unwrap();
    let index = Arc::new(EmbeddedBlobIndex::open(dir.path()).unwrap());
    let settings = BucketSettings {
        endpoint: Some(s3.endpoint()),
        bucket: s3.bucket().to_string(),
        prefix: String::new(),
        access_key_id: "key".into(),
        secret_access_key: "secret".into(),
        region: "us-east-1".into(),
        allow_http: true,
    };
    let store = BucketStore::from_settings(&settings, BucketOptions::no_retries(), index).unwrap();
    let bytes = data(2, 3_000);
    let digest = DigestFunction::Blake3.digest_of(&bytes);
    store.write(digest, stream(&bytes, 1_000)).await.unwrap();
    assert_eq!(
        keys(&store).await,
        vec![format!("cas/blake3/{}-3000", digest.hash_hex())]
    );
    assert_eq!(read_all(&store, &digest, 0, 0).await.unwrap(), bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_missing_keeps_order_drops_duplicates_and_knows_the_empty_blob() {
    let f = fixture(BucketOptions::no_retries());
    let (a, b, c) = (data(3, 10), data(4, 20), data(5, 30));
    let (da, db, dc) = (sha(&a), sha(&b), sha(&c));
    f.store.write(da, stream(&a, 10)).await.unwrap();
    let empty = DigestFunction::Sha256.empty();
    let other_size = Digest { size: 11, ..da };

    let queries = f.index.queries.load(Ordering::SeqCst);
    let missing = f
        .store
        .find_missing(&[dc, da, db, empty, dc, other_size, db])
        .await
        .unwrap();
    assert_eq!(missing, vec![dc, db, other_size]);
    assert_eq!(
        f.index.queries.load(Ordering::SeqCst),
        queries + 1,
        "one index query, no probe of the bucket"
    );
    assert!(f.store.find_missing(&[]).await.unwrap().is_empty());
    assert!(f.store.contains(&empty).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_bytes_are_refused_and_leave_nothing_in_the_bucket() {
    let f = fixture(small_multipart());
    for size in [1_000usize, 6 * MIB] {
        // (1,000 bytes: checked in memory, one PUT; 6 MiB: a multipart upload of 2 parts)
        let honest = data(6, size);
        let digest = sha(&honest);
        let garbage = data(7, size);
        match f.store.write(digest, stream(&garbage, 256 * 1024)).await {
            Err(CasError::HashMismatch { expected, actual }) => {
                assert_eq!((expected, actual), (digest, sha(&garbage)))
            }
            other => panic!("garbage of {size} bytes: {other:?}"),
        }
        let mut longer = honest.clone();
        longer.push(0);
        assert!(matches!(
            f.store.write(digest, stream(&longer, 256 * 1024)).await,
            Err(CasError::SizeMismatch { .. })
        ));
        assert!(matches!(
            f.store.write(digest, stream(&honest[..size - 1], 256 * 1024)).await,
            Err(CasError::SizeMismatch { actual, .. }) if actual == size as u64 - 1
        ));
        let failing = stream(&honest[..size / 2], 256 * 1024)
            .chain(futures::stream::once(async {
                Err(CasError::Unavailable("client went away".into()))
            }))
            .boxed();
        assert!(matches!(
            f.store.write(digest, failing).await,
            Err(CasError::Unavailable(m)) if m == "client went away"
        ));
        assert_eq!(f.store.find_missing(&[digest]).await.unwrap(), vec![digest]);
    }
    assert!(keys(&f.store).await.is_empty(), "no object under any key");
    assert_eq!(open_uploads(&f.s3), 0, "refused uploads are aborted");
    assert_eq!(f.index.inserts.load(Ordering::SeqCst), 0);
    assert_eq!(f.store.stats().blob_count, 0);
}

/// A client that goes away mid-upload (its write dropped) leaves no upload open on the server,
/// and a blob larger than the store takes is refused before a byte is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_upload_is_aborted_and_an_oversized_blob_refused() {
    let f = fixture(BucketOptions {
        max_blob_bytes: 10 * MIB as u64,
        ..small_multipart()
    });
    let bytes = data(18, 8 * MIB);
    let digest = sha(&bytes);
    // 6 MiB arrive (a first 5 MiB part is sent), then the client says nothing more.
    let stalled = stream(&bytes[..6 * MIB], MIB)
        .chain(futures::stream::pending())
        .boxed();
    let store = f.store.clone();
    let writing = tokio::spawn(async move { store.write(digest, stalled).await });
    let mut waited = 0;
    while open_uploads(&f.s3) == 0 {
        assert!(waited < 200, "the upload never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    writing.abort();
    assert!(writing.await.unwrap_err().is_cancelled());
    let mut waited = 0;
    while open_uploads(&f.s3) > 0 {
        assert!(waited < 200, "the abandoned upload is still open");
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    assert!(keys(&f.store).await.is_empty());
    assert_eq!(f.store.find_missing(&[digest]).await.unwrap(), vec![digest]);

    let huge = Digest {
        size: 10 * MIB as u64 + 1,
        ..digest
    };
    let never_read = futures::stream::once(async { panic!("the stream was read") }).boxed();
    assert!(matches!(
        f.store.write(huge, never_read).await,
        Err(CasError::QuotaExceeded(m)) if m.contains("s3 bucket rba-test")
    ));
}

/// A hostile tenant sends garbage under the digest of a blob an honest tenant is uploading at
/// the same moment, finishing after it (S3 keeps the last writer's object). The honest bytes
/// must be what the key holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_racing_an_honest_upload_never_replaces_it() {
    let f = fixture(small_multipart());
    for (seed, size) in [(8u64, 600_000usize), (9, 6 * MIB)] {
        let honest = data(seed, size);
        let digest = sha(&honest);
        let garbage = data(seed + 100, size);
        let chunk = size / 6;
        let honest_write = f.store.write(
            digest,
            slow_stream(&honest, chunk, Duration::from_millis(20)),
        );
        let hostile_write = f.store.write(
            digest,
            slow_stream(&garbage, chunk, Duration::from_millis(60)),
        );
        let (honest_result, hostile_result) = tokio::join!(honest_write, hostile_write);
        honest_result.unwrap();
        assert!(
            matches!(hostile_result, Err(CasError::HashMismatch { .. })),
            "{hostile_result:?}"
        );
        let stored = f
            .store
            .objects()
            .get(&f.store.key(&digest))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(
            stored == honest[..],
            "the key holds the honest bytes ({size})"
        );
        assert_eq!(read_all(&f.store, &digest, 0, 0).await.unwrap(), honest);
    }
    assert_eq!(open_uploads(&f.s3), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20_mib_blob_is_a_streamed_multipart_upload_and_read() {
    let f = fixture(BucketOptions::no_retries());
    let bytes = data(10, 20 * MIB);
    let digest = sha(&bytes);
    f.store.write(digest, stream(&bytes, MIB)).await.unwrap();
    assert_eq!(keys(&f.store).await.len(), 1);

    let mut chunks = f.store.read(&digest, 0, 0).await.unwrap();
    let (mut count, mut hasher) = (0usize, DigestFunction::Sha256.hasher());
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.unwrap();
        assert!(chunk.len() < 20 * MIB);
        hasher.update(&chunk);
        count += 1;
    }
    assert_eq!(hasher.finish(), digest);
    assert!(count > 1, "streamed, not one 20 MiB buffer");
    let middle = read_all(&f.store, &digest, 7 * MIB as u64, 3 * MIB as u64)
        .await
        .unwrap();
    assert!(middle == bytes[7 * MIB..10 * MIB]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_1000_small_blobs_is_one_index_insert() {
    let f = fixture(BucketOptions::no_retries());
    let mut blobs: Vec<(Digest, Bytes)> = (0..1_000u64)
        .map(|i| {
            let bytes = data(1_000 + i, 100 + (i as usize % 50));
            (sha(&bytes), Bytes::from(bytes))
        })
        .collect();
    let bad = Bytes::from(data(5_000, 64));
    blobs.push((sha(b"something else"), bad)); // wrong size and hash
    let mut wrong_hash = data(5_001, 64);
    let wrong_hash_digest = sha(&wrong_hash);
    wrong_hash[0] ^= 1;
    blobs.push((wrong_hash_digest, Bytes::from(wrong_hash)));
    blobs.push(blobs[3].clone()); // a duplicate
    blobs.push((DigestFunction::Sha256.empty(), Bytes::new()));

    let results = f.store.write_batch(blobs.clone()).await;
    assert_eq!(results.len(), 1_004);
    for (i, result) in results.iter().enumerate() {
        match i {
            1_000 => assert!(matches!(result, Err(CasError::SizeMismatch { .. }))),
            1_001 => assert!(matches!(result, Err(CasError::HashMismatch { .. }))),
            _ => assert!(result.is_ok(), "blob {i}: {result:?}"),
        }
    }
    assert_eq!(f.index.inserts.load(Ordering::SeqCst), 1);
    assert_eq!(keys(&f.store).await.len(), 1_000);
    let digests: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
    assert_eq!(
        f.store.find_missing(&digests).await.unwrap(),
        vec![digests[1_000], digests[1_001]]
    );
    assert_eq!(f.store.stats().blob_count, 1_000);
    assert_eq!(
        read_all(&f.store, &digests[999], 0, 0).await.unwrap(),
        blobs[999].1
    );

    // Again: all present, nothing put, nothing inserted.
    let again = f.store.write_batch(blobs[..1_000].to_vec()).await;
    assert!(again.iter().all(Result::is_ok));
    assert_eq!(f.index.inserts.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_that_refuses_writes_is_a_clear_error_and_nothing_is_recorded() {
    let mut f = fixture(small_multipart());
    let dir = tempfile::tempdir().unwrap();
    let index = Arc::new(EmbeddedBlobIndex::open(dir.path()).unwrap());
    // A bucket the server does not have.
    let nowhere = BucketStore::from_url_and_vars(
        "s3://rba-no-such-bucket",
        f.s3.env(),
        small_multipart(),
        index.clone(),
    )
    .unwrap();
    let small = data(11, 500);
    let large = data(12, 2 * MIB);
    for bytes in [&small, &large] {
        let digest = sha(bytes);
        match nowhere.write(digest, stream(bytes, 64 * 1024)).await {
            Err(CasError::Unavailable(message)) => assert!(
                message.starts_with("s3 bucket rba-no-such-bucket: ")
                    && message.contains("NoSuchBucket"),
                "{message}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(nowhere.find_missing(&[digest]).await.unwrap(), vec![digest]);
    }
    let results = nowhere
        .write_batch(vec![(sha(b"x"), Bytes::from_static(b"x"))])
        .await;
    assert!(
        matches!(&results[0], Err(CasError::Unavailable(m)) if m.contains("rba-no-such-bucket")),
        "{results:?}"
    );
    assert!(matches!(
        nowhere.ready().await,
        Err(CasError::Unavailable(m)) if m.starts_with("s3 bucket rba-no-such-bucket: listing cas")
    ));
    assert_eq!(index.stats().blob_count, 0);

    // The server gone: every request fails (no retries configured), nothing is indexed.
    let kept = data(13, 700);
    f.store.write(sha(&kept), stream(&kept, 700)).await.unwrap();
    f.store.ready().await.unwrap();
    f.s3.stop();
    assert!(f.store.ready().await.is_err());
    let digest = sha(&small);
    match f.store.write(digest, stream(&small, 100)).await {
        Err(CasError::Unavailable(message)) => {
            assert!(
                message.starts_with("s3 bucket rba-test: put pre/fix/cas/sha256/")
                    && message.contains("Connection refused"),
                "{message}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(f.store.find_missing(&[digest]).await.unwrap(), vec![digest]);
    assert!(matches!(
        f.store.read(&sha(&kept), 0, 0).await,
        Err(CasError::Unavailable(m)) if m.contains("rba-test")
    ));
    assert_eq!(f.store.stats().blob_count, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_indexed_blob_gone_from_the_bucket_is_forgotten_by_the_read_that_misses_it() {
    let f = fixture(BucketOptions::no_retries());
    let bytes = data(14, 4_000);
    let digest = sha(&bytes);
    f.store.write(digest, stream(&bytes, 4_000)).await.unwrap();
    f.store
        .objects()
        .delete(&f.store.key(&digest))
        .await
        .unwrap();
    assert!(f.store.find_missing(&[digest]).await.unwrap().is_empty());
    assert!(matches!(
        f.store.read(&digest, 0, 0).await,
        Err(CasError::NotFound(d)) if d == digest
    ));
    assert_eq!(f.store.find_missing(&[digest]).await.unwrap(), vec![digest]);
    // Uploaded again, it is there again.
    f.store.write(digest, stream(&bytes, 1_000)).await.unwrap();
    assert_eq!(read_all(&f.store, &digest, 0, 0).await.unwrap(), bytes);
}

fn tiered(slow: &BucketStore) -> (tempfile::TempDir, Tiered) {
    let (dir, fast) = BlobStore::scratch().unwrap();
    (dir, Tiered::new(fast, Arc::new(slow.clone())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiered_writes_through_and_a_second_process_reads_through() {
    let f = fixture(BucketOptions::no_retries());
    let (_a_dir, a) = tiered(&f.store);
    let (_b_dir, b) = tiered(&f.store);
    assert_eq!(a.backend(), "tiered");

    let big = data(15, 3 * MIB);
    let big_digest = sha(&big);
    a.write(big_digest, stream(&big, 256 * 1024)).await.unwrap();
    let batch: Vec<(Digest, Bytes)> = (0..20u64)
        .map(|i| {
            let bytes = data(200 + i, 500);
            (sha(&bytes), Bytes::from(bytes))
        })
        .collect();
    assert!(a.write_batch(batch.clone()).await.iter().all(Result::is_ok));
    let all: Vec<Digest> = std::iter::once(big_digest)
        .chain(batch.iter().map(|(d, _)| *d))
        .collect();

    // Written through: in A's fast tier and in the bucket, so B (its own empty fast tier over
    // the same bucket and index, another process's view) finds them present.
    assert!(a.local().unwrap().find_missing(&all).unwrap().is_empty());
    assert!(f.store.find_missing(&all).await.unwrap().is_empty());
    assert!(b.find_missing(&all).await.unwrap().is_empty());
    assert_eq!(b.stats().blob_count, 21);
    let b_fast = b.local().unwrap();
    assert_eq!(b_fast.find_missing(&all).unwrap().len(), 21);

    // Read-through fills B's fast tier; a range is served from the local copy.
    assert!(read_all(&b, &big_digest, MIB as u64, 10).await.unwrap() == big[MIB..MIB + 10]);
    assert!(b_fast.contains(&big_digest).unwrap());
    assert!(read_all(&b, &big_digest, 0, 0).await.unwrap() == big);

    // make_local fetches the rest; unknown blobs are NotFound.
    b.make_local(&all).await.unwrap();
    assert!(b_fast.find_missing(&all).unwrap().is_empty());
    let unknown = sha(b"in no tier");
    assert!(matches!(
        b.make_local(&[all[1], unknown]).await,
        Err(CasError::NotFound(d)) if d == unknown
    ));
    assert!(matches!(
        b.read(&unknown, 0, 0).await,
        Err(CasError::NotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiered_recovers_from_damaged_or_vanished_local_files() {
    let f = fixture(BucketOptions::no_retries());
    let (_dir, tiers) = tiered(&f.store);
    let bytes = data(16, 300_000);
    let digest = sha(&bytes);
    tiers
        .write(digest, stream(&bytes, 64 * 1024))
        .await
        .unwrap();
    let fast = tiers.local().unwrap().clone();
    let path = fast.blob_path(&digest);

    // Truncated: the read fails mid-stream, the local copy is found damaged and removed, and
    // the next read fetches the blob from the bucket again.
    std::fs::write(&path, &bytes[..1_000]).unwrap();
    assert!(read_all(&tiers, &digest, 0, 0).await.is_err());
    for _ in 0..100 {
        if !fast.contains(&digest).unwrap() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!fast.contains(&digest).unwrap());
    assert_eq!(read_all(&tiers, &digest, 0, 0).await.unwrap(), bytes);

    // Same size, flipped bits: the fast tier serves files as they are (as always); the
    // consumer that hashes them reports the damage through `local()`, and the next read is
    // fetched again.
    let mut flipped = bytes.clone();
    flipped[12_345] ^= 0xff;
    std::fs::write(&path, &flipped).unwrap();
    let served = read_all(&tiers, &digest, 0, 0).await.unwrap();
    assert_ne!(sha(&served), digest);
    assert!(tiers.local().unwrap().remove_if_corrupt(&digest).unwrap());
    assert_eq!(read_all(&tiers, &digest, 0, 0).await.unwrap(), bytes);

    // Removed behind the fast store's back: fetched again.
    std::fs::remove_file(&path).unwrap();
    assert_eq!(
        read_all(&tiers, &digest, 5, 10).await.unwrap(),
        &bytes[5..15]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiered_over_a_refusing_bucket_reports_the_blob_missing() {
    let mut f = fixture(BucketOptions::no_retries());
    let (_dir, tiers) = tiered(&f.store);
    f.s3.stop();
    let bytes = data(17, 2_000);
    let digest = sha(&bytes);
    assert!(matches!(
        tiers.write(digest, stream(&bytes, 500)).await,
        Err(CasError::Unavailable(m)) if m.starts_with("s3 bucket rba-test: ")
    ));
    // Only this machine has it: for every other process it is missing, so it is missing.
    assert!(tiers.local().unwrap().contains(&digest).unwrap());
    assert_eq!(tiers.find_missing(&[digest]).await.unwrap(), vec![digest]);
    let results = tiers
        .write_batch(vec![(digest, Bytes::from(bytes.clone()))])
        .await;
    assert!(matches!(&results[0], Err(CasError::Unavailable(_))));

    // The server back (empty: moto keeps objects in memory): the upload goes through.
    f.s3.restart();
    tiers.write(digest, stream(&bytes, 500)).await.unwrap();
    assert!(tiers.find_missing(&[digest]).await.unwrap().is_empty());
    assert_eq!(keys(&f.store).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_index_keeps_totals_and_eviction_order_across_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (sha(b"a"), sha(b"bb"), sha(b"ccc"));
    {
        let index = EmbeddedBlobIndex::open(dir.path()).unwrap();
        assert!(matches!(
            EmbeddedBlobIndex::open(dir.path()),
            Err(CasError::Unavailable(m)) if m.contains(&dir.path().display().to_string())
        ));
        for digest in [a, b, c] {
            index.insert(&[digest, digest]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        index.insert(&[a]).await.unwrap(); // again: now the most recently used
        assert_eq!(index.least_recently_used(2).await.unwrap(), vec![b, c]);
        let stats = index.stats();
        assert_eq!((stats.blob_count, stats.total_bytes), (3, 6));
        index.remove(&[b, sha(b"never indexed")]).await.unwrap();
        let stats = index.stats();
        assert_eq!(
            (
                stats.blob_count,
                stats.total_bytes,
                stats.evictions,
                stats.evicted_bytes
            ),
            (2, 4, 1, 2)
        );
        index.touch(&[b, c]).await.unwrap(); // b is ignored: absent
    }
    let index = EmbeddedBlobIndex::open(dir.path()).unwrap();
    let stats = index.stats();
    assert_eq!((stats.blob_count, stats.total_bytes), (2, 4));
    assert_eq!(
        index
            .find_missing(&[b, a, DigestFunction::Sha256.empty(), c, b])
            .await
            .unwrap(),
        vec![b]
    );
    assert_eq!(index.least_recently_used(10).await.unwrap(), vec![c, a]);
}

#[test]
fn store_urls_name_a_bucket_and_an_optional_prefix() {
    let parsed = |url: &str| parse_store_url(url).ok();
    let pair = |b: &str, p: &str| Some((b.to_string(), p.to_string()));
    assert_eq!(parsed("s3://cache"), pair("cache", ""));
    assert_eq!(parsed("s3://cache/"), pair("cache", ""));
    assert_eq!(parsed("s3://cache/team/a/"), pair("cache", "team/a"));
    for bad in ["s3://", "s3:///prefix", "https://cache", "cache", ""] {
        assert!(
            matches!(parse_store_url(bad), Err(CasError::Invalid { .. })),
            "{bad:?}"
        );
    }
}
