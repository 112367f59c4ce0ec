//! The `Store` contract, checked the same way against every backend through the trait alone
//! (see `rba_cas::seams`). Backends that need a server (a bucket, PostgreSQL) run the same
//! checks from this file once their harness is up.

use bytes::Bytes;
use futures::StreamExt;
use rba_cas::{Cas, CasError, Digest, DigestFunction, Store};

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
