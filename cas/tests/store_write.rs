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

/// `Store::write_batch` checks a blob already present as it checks a new one: a success is
/// what BatchUpdateBlobs grants the caller the blob on, so bytes that are not the blob must
/// fail even when someone else stored it first (before, a present blob was only sized, and a
/// client racing another's upload of a digest it knew earned the blob with the right number
/// of wrong bytes). The stored blob stays intact.
#[tokio::test]
async fn a_batch_entry_for_a_present_blob_is_hashed_too() {
    let (_dir, blobs) = BlobStore::scratch().unwrap();
    let data = Bytes::from_static(b"someone else's blob");
    let digest = DigestFunction::Sha256.digest_of(&data);
    let first = Store::write_batch(&blobs, vec![(digest, data.clone())]).await;
    assert!(first[0].is_ok(), "{first:?}");

    let forged = Bytes::from(vec![b'x'; data.len()]);
    let other = Bytes::from_static(b"a new blob beside it");
    let other_digest = DigestFunction::Sha256.digest_of(&other);
    let results = Store::write_batch(
        &blobs,
        vec![
            (digest, forged),
            (other_digest, other),
            (digest, data.clone()),
        ],
    )
    .await;
    assert!(
        matches!(&results[0], Err(CasError::HashMismatch { expected, .. }) if *expected == digest),
        "{results:?}"
    );
    assert!(results[1].is_ok() && results[2].is_ok(), "{results:?}");
    assert_eq!(blobs.read_to_vec(&digest, 1 << 20).unwrap(), data.to_vec());
    assert!(blobs.verify().unwrap().corrupt.is_empty());
}
