//! `Store::write` of the embedded store: a stream that fails stores nothing, even when every
//! byte of the blob already arrived (only a clean end of the stream commits).

use bytes::Bytes;
use futures::StreamExt;
use rba_cas::{BlobStore, CasError, DigestFunction, Store};

#[tokio::test]
async fn a_stream_that_fails_after_all_its_bytes_stores_nothing() {
    let (_dir, blobs) = BlobStore::scratch().unwrap();
    let data = vec![7u8; 300_000];
    let digest = DigestFunction::Sha256.digest_of(&data);
    let chunks: Vec<rba_cas::Result<Bytes>> = data
        .chunks(64 << 10)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .chain([Err(CasError::Unavailable("the client went away".into()))])
        .collect();
    let error = Store::write(&blobs, digest, futures::stream::iter(chunks).boxed())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("went away"), "{error}");
    assert!(!blobs.contains(&digest).unwrap());

    // The same bytes, ending cleanly: stored.
    let chunks: Vec<rba_cas::Result<Bytes>> = data
        .chunks(64 << 10)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    Store::write(&blobs, digest, futures::stream::iter(chunks).boxed())
        .await
        .unwrap();
    assert!(blobs.contains(&digest).unwrap());
}
