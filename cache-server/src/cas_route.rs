//! FindMissingBlobs with its request decoded straight into digests.
//!
//! Why: a FindMissing of 1,000 digests is 70 KB of protobuf, and once the store answered from
//! memory its decoding was a third of the server's CPU for the call (`perf`). prost decoded
//! each digest into a generated `Digest` (a `String` allocated and copied, then freed) through
//! the generic `Buf` calls of tonic's receive buffer, and the hash text was then parsed again:
//! 126 µs per request against 55 µs for [`FindMissingQuery`] (`cargo bench -p
//! rba-cache-server --bench find_missing_decode`), which reads the digest messages every
//! client sends (a 64-digit lowercase hash field, then the size) directly from the buffer into
//! their 32 bytes. Any other shape of digest message (fields in another order, unknown fields,
//! a hash that is not lowercase hex, a negative size) is decoded by prost as before and judged
//! by the same [`crate::status::digest`], so every request means what it meant and is refused
//! with the same status.
//!
//! [`CasCalls`] serves the call with tonic's own unary handling (framing, limits, compression
//! refused, status) and this codec, authenticated as every other call, and answered by
//! [`CasService::answer_find_missing`], which the generated trait's method also calls.

use std::pin::Pin;

use bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType};
use prost::{DecodeError, Message};
use rba_cas::digest::hash_from_hex;
use rba_cas::{Digest, DigestFunction};
use rba_proto::reapi::{self, FindMissingBlobsRequest, FindMissingBlobsResponse};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::{Request, Response, Status};

use crate::auth::Authenticator;
use crate::cas::CasService;
use crate::hand_route::{HandAnswer, HandCalls, authenticated, grpc};
use crate::status;

/// The path of `ContentAddressableStorage/FindMissingBlobs`.
const FIND_MISSING_PATH: &str =
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs";

/// A `FindMissingBlobsRequest` (same fields, same tags) whose digests were parsed as they were
/// decoded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FindMissingQuery {
    /// `instance_name` (field 1).
    pub instance_name: String,
    /// `blob_digests` (field 2).
    pub blob_digests: Vec<QueryDigest>,
    /// `digest_function` (field 3).
    pub digest_function: i32,
}

/// One digest of a [`FindMissingQuery`].
#[derive(Clone, Debug, PartialEq)]
pub enum QueryDigest {
    /// A well-formed digest: its hash, and its size (not negative).
    Parsed {
        /// The 32 bytes of the hash.
        hash: [u8; 32],
        /// The blob's size.
        size: u64,
    },
    /// Any other digest, as sent, for [`status::digest`] to judge.
    AsSent(reapi::Digest),
}

impl QueryDigest {
    /// This digest under `function`, or the status that names what is wrong with it.
    pub fn digest(&self, function: DigestFunction) -> Result<Digest, Status> {
        match self {
            QueryDigest::Parsed { hash, size } => Ok(Digest {
                function,
                hash: *hash,
                size: *size,
            }),
            QueryDigest::AsSent(digest) => status::digest(function, digest),
        }
    }

    /// Parsed when it is well formed.
    fn from_reapi(digest: reapi::Digest) -> Self {
        match (
            hash_from_hex(digest.hash.as_bytes()),
            u64::try_from(digest.size_bytes),
        ) {
            (Some(hash), Ok(size)) => QueryDigest::Parsed { hash, size },
            _ => QueryDigest::AsSent(digest),
        }
    }

    /// The generated message it stands for.
    fn to_reapi(&self) -> reapi::Digest {
        match self {
            // The function is the request's, not part of a digest's wire form.
            QueryDigest::Parsed { hash, size } => Digest {
                function: DigestFunction::Sha256,
                hash: *hash,
                size: *size,
            }
            .to_reapi(),
            QueryDigest::AsSent(digest) => digest.clone(),
        }
    }

    /// The length-delimited digest message at the start of `value` (its length, then the
    /// message) when it has the shape clients send: field 1 with 64 lowercase hex digits, then
    /// field 2 (the size, not negative) unless it is zero, nothing else. With the bytes it
    /// takes. `None` for anything else, which prost then decodes.
    fn well_formed_at(value: &[u8]) -> Option<(Self, usize)> {
        let (&length, rest) = value.split_first()?;
        // Such a message is at most 77 bytes, so its length is a one-byte varint.
        if length >= 0x80 {
            return None;
        }
        let message = rest.get(..usize::from(length))?;
        let after_hash = message.strip_prefix(&[0x0a, 64])?;
        let hash = hash_from_hex(after_hash.get(..64)?)?;
        let size = match &after_hash[64..] {
            [] => 0,
            [0x10, varint @ ..] => {
                let mut varint = varint;
                let size = prost::encoding::decode_varint(&mut varint).ok()?;
                // int64: a varint over 63 bits is negative.
                if !varint.is_empty() || i64::try_from(size).is_err() {
                    return None;
                }
                size
            }
            _ => return None,
        };
        Some((QueryDigest::Parsed { hash, size }, 1 + usize::from(length)))
    }
}

impl From<FindMissingBlobsRequest> for FindMissingQuery {
    fn from(request: FindMissingBlobsRequest) -> Self {
        FindMissingQuery {
            instance_name: request.instance_name,
            blob_digests: request
                .blob_digests
                .into_iter()
                .map(QueryDigest::from_reapi)
                .collect(),
            digest_function: request.digest_function,
        }
    }
}

impl From<&FindMissingQuery> for FindMissingBlobsRequest {
    fn from(query: &FindMissingQuery) -> Self {
        FindMissingBlobsRequest {
            instance_name: query.instance_name.clone(),
            blob_digests: query
                .blob_digests
                .iter()
                .map(QueryDigest::to_reapi)
                .collect(),
            digest_function: query.digest_function,
        }
    }
}

impl Message for FindMissingQuery {
    /// As the generated message (not on any hot path: the server only decodes these).
    fn encode_raw(&self, buf: &mut impl BufMut) {
        FindMissingBlobsRequest::from(self).encode_raw(buf)
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => prost::encoding::string::merge(wire_type, &mut self.instance_name, buf, ctx),
            2 => {
                if wire_type == WireType::LengthDelimited
                    && let Some((digest, taken)) = QueryDigest::well_formed_at(buf.chunk())
                {
                    buf.advance(taken);
                    self.blob_digests.push(digest);
                    return Ok(());
                }
                let mut digest = reapi::Digest::default();
                prost::encoding::message::merge(wire_type, &mut digest, buf, ctx)?;
                self.blob_digests.push(QueryDigest::from_reapi(digest));
                Ok(())
            }
            3 => prost::encoding::int32::merge(wire_type, &mut self.digest_function, buf, ctx),
            _ => prost::encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        FindMissingBlobsRequest::from(self).encoded_len()
    }

    fn clear(&mut self) {
        *self = FindMissingQuery::default();
    }
}

/// The CAS calls served by hand: FindMissingBlobs, decoded into a [`FindMissingQuery`].
#[derive(Clone)]
pub struct CasCalls {
    cas: CasService,
    auth: Authenticator,
    max_decoding_bytes: usize,
    max_encoding_bytes: usize,
}

impl CasCalls {
    /// FindMissingBlobs by `cas` after `auth`, with the generated server's message limits.
    pub fn new(
        cas: CasService,
        auth: Authenticator,
        max_decoding_bytes: usize,
        max_encoding_bytes: usize,
    ) -> Self {
        CasCalls {
            cas,
            auth,
            max_decoding_bytes,
            max_encoding_bytes,
        }
    }
}

impl HandCalls for CasCalls {
    fn serves(&self, path: &str) -> bool {
        path == FIND_MISSING_PATH
    }

    fn serve(&self, request: http::Request<Body>) -> HandAnswer {
        let call = FindMissingCall {
            cas: self.cas.clone(),
            auth: self.auth.clone(),
        };
        let mut grpc = grpc::<FindMissingBlobsResponse, FindMissingQuery>(
            self.max_decoding_bytes,
            self.max_encoding_bytes,
        );
        Box::pin(async move { grpc.unary(call, request).await })
    }
}

/// One FindMissingBlobs call: authenticated, then answered by the CAS service.
struct FindMissingCall {
    cas: CasService,
    auth: Authenticator,
}

impl tonic::server::UnaryService<FindMissingQuery> for FindMissingCall {
    type Response = FindMissingBlobsResponse;
    type Future =
        Pin<Box<dyn Future<Output = Result<Response<FindMissingBlobsResponse>, Status>> + Send>>;

    fn call(&mut self, request: Request<FindMissingQuery>) -> Self::Future {
        let (cas, mut auth) = (self.cas.clone(), self.auth.clone());
        Box::pin(async move {
            let request = authenticated(&mut auth, request)?;
            cas.answer_find_missing(request).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(i: u64) -> String {
        format!("{i:064x}")
    }

    /// What the generated decoding and `status::digest` made of a request's `bytes`: the
    /// digests or the first status, per element.
    fn generated(bytes: &[u8]) -> Vec<Result<Digest, String>> {
        let decoded = FindMissingBlobsRequest::decode(bytes).expect("generated decoding");
        decoded
            .blob_digests
            .iter()
            .map(|d| status::digest(DigestFunction::Sha256, d).map_err(|s| s.message().into()))
            .collect()
    }

    fn by_hand(bytes: &[u8]) -> Vec<Result<Digest, String>> {
        let query = FindMissingQuery::decode(bytes).expect("hand decoding");
        query
            .blob_digests
            .iter()
            .map(|d| {
                d.digest(DigestFunction::Sha256)
                    .map_err(|s| s.message().into())
            })
            .collect()
    }

    #[test]
    fn requests_mean_what_the_generated_decoding_makes_of_them() {
        let digest = |hash: String, size_bytes: i64| reapi::Digest { hash, size_bytes };
        let request = FindMissingBlobsRequest {
            instance_name: "main".into(),
            blob_digests: vec![
                digest(hex(1), 4096),
                digest(hex(2), 0),
                digest(hex(3), i64::MAX),
                digest(hex(4), -1),
                digest(hex(0xabcdef).to_uppercase(), 1),
                digest(hex(6)[..63].into(), 1),
                digest(format!("{}0", hex(7)), 1),
                digest("zz".repeat(32), 1),
                digest(String::new(), 0),
                digest("é".repeat(32), 1),
            ],
            digest_function: reapi::digest_function::Value::Sha256 as i32,
        };
        let bytes = request.encode_to_vec();
        let query = FindMissingQuery::decode(bytes.as_slice()).unwrap();
        assert_eq!(query.instance_name, "main");
        assert_eq!(query.digest_function, request.digest_function);
        assert_eq!(by_hand(&bytes), generated(&bytes));
        // The well-formed ones took the fast path; the rest are kept as sent, to be named.
        let parsed = |d: &QueryDigest| matches!(d, QueryDigest::Parsed { .. });
        assert_eq!(query.blob_digests.iter().filter(|d| parsed(d)).count(), 3);
        // And it encodes back to the same bytes.
        assert_eq!(query.encode_to_vec(), bytes);
    }

    #[test]
    fn digest_messages_of_other_shapes_are_decoded_by_prost() {
        // Size before hash, an unknown field, the hash twice (the last wins), a non-minimal
        // varint for the size: all valid protobuf, none in the fast path's shape.
        let hash_field = |i: u64| [&[0x0a, 64][..], hex(i).as_bytes()].concat();
        let shapes: Vec<Vec<u8>> = vec![
            [&[0x10, 0x05][..], &hash_field(1)].concat(),
            [&hash_field(2), &[0x10, 0x05, 0x18, 0x01][..]].concat(),
            [hash_field(3), hash_field(4)].concat(),
            [&hash_field(5), &[0x10, 0x85, 0x00][..]].concat(),
        ];
        let mut bytes = Vec::new();
        for shape in &shapes {
            bytes.push(0x12);
            prost::encoding::encode_varint(shape.len() as u64, &mut bytes);
            bytes.extend_from_slice(shape);
        }
        let generated = generated(&bytes);
        assert_eq!(by_hand(&bytes), generated);
        assert_eq!(generated[2].as_ref().unwrap().hash_hex(), hex(4));
        assert_eq!(generated[3].as_ref().unwrap().size, 5);
    }

    #[test]
    fn truncated_and_hostile_messages_are_refused_as_prost_refuses_them() {
        let well_formed = FindMissingBlobsRequest {
            blob_digests: vec![reapi::Digest {
                hash: hex(9),
                size_bytes: 300,
            }],
            ..Default::default()
        }
        .encode_to_vec();
        // Every prefix: the last digest cut anywhere, including inside the fast path's shape.
        for end in 0..well_formed.len() {
            let cut = &well_formed[..end];
            assert_eq!(
                FindMissingQuery::decode(cut).is_ok(),
                FindMissingBlobsRequest::decode(cut).is_ok(),
                "cut at {end}"
            );
        }
        // A digest message claiming more bytes than follow; a varint of eleven bytes; a wrong
        // wire type for the digests.
        for hostile in [
            &[0x12, 0x7f, 0x0a, 0x40][..],
            &[
                0x12, 0x0c, 0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ][..],
            &[0x10, 0x01][..],
        ] {
            assert!(FindMissingQuery::decode(hostile).is_err(), "{hostile:?}");
            assert!(
                FindMissingBlobsRequest::decode(hostile).is_err(),
                "{hostile:?}"
            );
        }
    }
}
