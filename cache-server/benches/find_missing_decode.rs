//! Decoding a FindMissingBlobs request of 1,000 digests into the store's digests, the way the
//! server does it (`FindMissingQuery`, `cas_route`) beside the generated message and
//! `status::digest` (the reference, what the server did before), from the same bytes in the
//! same run. Each iteration decodes from a fresh buffer as tonic hands one to the codec.
//!
//! `cargo bench -p rba-cache-server --bench find_missing_decode`; criterion prints each time
//! per request, and the ratio is the one to quote.

use bytes::BytesMut;
use criterion::{Criterion, criterion_group, criterion_main};
use prost::Message;
use rba_cache_server::cas_route::FindMissingQuery;
use rba_cache_server::status;
use rba_cas::{Digest, DigestFunction};
use rba_proto::reapi::FindMissingBlobsRequest;

const DIGESTS: u64 = 1_000;

fn request() -> Vec<u8> {
    FindMissingBlobsRequest {
        instance_name: String::new(),
        blob_digests: (0..DIGESTS)
            .map(|i| {
                DigestFunction::Sha256
                    .digest_of(&i.to_le_bytes())
                    .to_reapi()
            })
            .collect(),
        digest_function: 1,
    }
    .encode_to_vec()
}

fn decode(c: &mut Criterion) {
    let bytes = request();
    let function = DigestFunction::Sha256;
    let mut group = c.benchmark_group("find_missing_decode_1000_digests");
    group.bench_function("generated_then_parsed", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&bytes[..]);
            let request = FindMissingBlobsRequest::decode(&mut buf).unwrap();
            let digests: Vec<Digest> = request
                .blob_digests
                .iter()
                .map(|d| status::digest(function, d).unwrap())
                .collect();
            digests.len()
        })
    });
    group.bench_function("find_missing_query", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&bytes[..]);
            let query = FindMissingQuery::decode(&mut buf).unwrap();
            let digests: Vec<Digest> = query
                .blob_digests
                .iter()
                .map(|d| d.digest(function).unwrap())
                .collect();
            digests.len()
        })
    });
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
