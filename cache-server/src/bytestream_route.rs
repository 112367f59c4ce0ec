//! ByteStream's two data paths served without the copies tonic and prost make of every byte:
//! `Read` answered with gRPC frames built here, `Write` decoded into [`WriteMessage`]s whose
//! data is a slice of the buffer it arrived in.
//!
//! Why, for `Read`: tonic encodes every response message into its own buffer, so each byte a
//! client reads was copied once more in user space (the store's read, then tonic's encode, then
//! the kernel's send). For a 1 MiB `ReadResponse` that copy is the whole message: `perf` of
//! `cache-server` under a 1 GiB read put it at 15 % of the server's CPU. A `ReadResponse` is one
//! `bytes` field, so its encoding is a 5-byte gRPC header and a 2–4 byte protobuf field header
//! in front of the data; [`ByteStreamCalls`] sends those few bytes and the store's buffer as
//! separate body frames, and h2 hands the buffer to `writev` as it is.
//!
//! Why, for `Write`: the generated `WriteRequest` holds its data in a `Vec<u8>`, which prost
//! fills by copying out of tonic's receive buffer (and allocating a fresh megabyte per
//! message). The route runs tonic's own server-side gRPC handling (framing, limits, status)
//! with a codec for [`WriteMessage`], the same message with its data as `Bytes`, which prost
//! decodes as a slice of that buffer.
//!
//! Only the framing and decoding are ours. Requests go through the same [`Authenticator`] as
//! every other call; the answers come from [`ByteStreamService::open_read`] and
//! [`ByteStreamService::open_write`] (the one place reads and writes are decided and counted);
//! `QueryWriteStatus` goes to tonic's generated server unchanged
//! ([`crate::hand_route::HandRoute`]). Errors before the first message are a trailers-only
//! response, as tonic sends them; errors mid-stream end the body with `grpc-status` trailers.

use std::pin::Pin;

use bytes::{BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use http_body::Frame;
use http_body_util::{BodyExt, Limited, StreamBody};
use prost::Message;
use rba_proto::bytestream::{ReadRequest, WriteResponse};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::auth::Authenticator;
use crate::bytestream::{ByteStreamService, ReadChunks, WriteMessage};
use crate::hand_route::{HandAnswer, HandCalls, authenticated, grpc};

/// The path of `google.bytestream.ByteStream/Read`.
const READ_PATH: &str = "/google.bytestream.ByteStream/Read";
/// The path of `google.bytestream.ByteStream/Write`.
const WRITE_PATH: &str = "/google.bytestream.ByteStream/Write";
/// A gRPC message's header: compressed flag and big-endian length.
const GRPC_HEADER: usize = 5;
/// `ReadResponse.data` and `WriteRequest.data` are field 10, length-delimited: (10 << 3) | 2.
const DATA_FIELD_KEY: u8 = 0x52;

/// ByteStream's `Read` served by [`serve_read`] and `Write` by [`WriteCall`]; every other path
/// goes to the generated server behind [`crate::hand_route::HandRoute`].
#[derive(Clone)]
pub struct ByteStreamCalls {
    service: ByteStreamService,
    auth: Authenticator,
    max_request_bytes: usize,
    max_response_bytes: usize,
}

impl ByteStreamCalls {
    /// `Read` and `Write` by `service` (after `auth`, with request messages up to
    /// `max_request_bytes` and `Write` responses up to `max_response_bytes`, the generated
    /// server's limits).
    pub fn new(
        service: ByteStreamService,
        auth: Authenticator,
        max_request_bytes: usize,
        max_response_bytes: usize,
    ) -> Self {
        ByteStreamCalls {
            service,
            auth,
            max_request_bytes,
            max_response_bytes,
        }
    }
}

impl HandCalls for ByteStreamCalls {
    fn serves(&self, path: &str) -> bool {
        path == READ_PATH || path == WRITE_PATH
    }

    fn serve(&self, request: http::Request<Body>) -> HandAnswer {
        let (service, auth, limit) = (
            self.service.clone(),
            self.auth.clone(),
            self.max_request_bytes,
        );
        match request.uri().path() {
            READ_PATH => Box::pin(async move {
                match serve_read(service, auth, limit, request).await {
                    Ok(response) => response,
                    Err(status) => status.into_http(),
                }
            }),
            // WRITE_PATH, the other path these calls serve.
            _ => {
                // prost decoding the data as `Bytes`.
                let mut grpc = grpc::<WriteResponse, WriteMessage>(limit, self.max_response_bytes);
                Box::pin(async move {
                    grpc.client_streaming(WriteCall { service, auth }, request)
                        .await
                })
            }
        }
    }
}

/// One `Write` call: authenticated like every other call, then taken by
/// [`ByteStreamService::open_write`].
struct WriteCall {
    service: ByteStreamService,
    auth: Authenticator,
}

impl tonic::server::ClientStreamingService<WriteMessage> for WriteCall {
    type Response = WriteResponse;
    type Future = Pin<Box<dyn Future<Output = Result<Response<WriteResponse>, Status>> + Send>>;

    fn call(&mut self, request: Request<tonic::Streaming<WriteMessage>>) -> Self::Future {
        let (service, mut auth) = (self.service.clone(), self.auth.clone());
        Box::pin(async move {
            let request = authenticated(&mut auth, request)?;
            service.open_write(request).await.map(Response::new)
        })
    }
}

/// Decodes the one `ReadRequest`, authenticates it and opens the read; the response streams
/// the read's messages framed by [`frames`].
async fn serve_read(
    reads: ByteStreamService,
    mut auth: Authenticator,
    max_request_bytes: usize,
    request: http::Request<Body>,
) -> Result<http::Response<Body>, Status> {
    let (parts, body) = request.into_parts();
    if let Some(encoding) = parts.headers.get("grpc-encoding")
        && encoding != "identity"
    {
        return Err(Status::unimplemented(format!(
            "Read requests compressed with {encoding:?} are not accepted"
        )));
    }
    // One message: its header, and at most the decoding limit of the server's other calls.
    let body = Limited::new(body, GRPC_HEADER + max_request_bytes)
        .collect()
        .await
        .map_err(|e| match e.downcast::<Status>() {
            Ok(status) => *status,
            Err(e) => Status::resource_exhausted(format!("Read request: {e}")),
        })?
        .to_bytes();
    let message = read_request(&body)?;
    let metadata = MetadataMap::from_headers(parts.headers);
    let request = authenticated(
        &mut auth,
        Request::from_parts(metadata, parts.extensions, message),
    )?;
    let stream = reads.open_read(request).await?;
    let mut response = http::Response::new(Body::new(StreamBody::new(frames(stream))));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    Ok(response)
}

/// The `ReadRequest` in a request body that must hold exactly one uncompressed gRPC message.
fn read_request(body: &[u8]) -> Result<ReadRequest, Status> {
    let Some((header, rest)) = body.split_first_chunk::<GRPC_HEADER>() else {
        return Err(Status::invalid_argument(format!(
            "Read request: {} bytes, shorter than a gRPC message header",
            body.len()
        )));
    };
    if header[0] != 0 {
        return Err(Status::invalid_argument(
            "Read request: a compressed message without a grpc-encoding",
        ));
    }
    let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if rest.len() != length {
        return Err(Status::invalid_argument(format!(
            "Read request: the message header says {length} bytes and the body holds {}",
            rest.len()
        )));
    }
    ReadRequest::decode(rest)
        .map_err(|e| Status::invalid_argument(format!("Read request: not a ReadRequest: {e}")))
}

/// The body frames of a read: for each message its headers, then its data as it is; then the
/// call's status as trailers (the stream's error, or OK).
fn frames(mut messages: ReadChunks) -> impl Stream<Item = Result<Frame<Bytes>, Status>> + Send {
    async_stream::stream! {
        let status = loop {
            match messages.next().await {
                Some(Ok(data)) => {
                    let (header, data) = message_frames(&[], data);
                    yield Ok(Frame::data(header));
                    if !data.is_empty() {
                        yield Ok(Frame::data(data));
                    }
                }
                Some(Err(status)) => break status,
                None => break Status::ok(""),
            }
        };
        let mut trailers = http::HeaderMap::new();
        yield status.add_header(&mut trailers).map(|()| Frame::trailers(trailers));
    }
}

/// The gRPC message whose protobuf is `fields` (other fields, already encoded) and `data` as
/// field 10 (a `ReadResponse`, a `WriteRequest`), as two body frames: the gRPC header, `fields`
/// and the data field's header, then the data itself (empty when it is).
pub fn message_frames(fields: &[u8], data: Bytes) -> (Bytes, Bytes) {
    // proto3 leaves an empty `bytes` field out.
    let field_header = if data.is_empty() {
        0
    } else {
        1 + prost::encoding::encoded_len_varint(data.len() as u64)
    };
    let mut header = BytesMut::with_capacity(GRPC_HEADER + fields.len() + field_header);
    header.put_u8(0);
    header.put_u32((fields.len() + field_header + data.len()) as u32);
    header.put_slice(fields);
    if !data.is_empty() {
        header.put_u8(DATA_FIELD_KEY);
        prost::encoding::encode_varint(data.len() as u64, &mut header);
    }
    (header.freeze(), data)
}

/// `message` (an encoded protobuf) as one uncompressed gRPC message: flag, big-endian length,
/// bytes ([`message_frames`] with no data field). What a client sends as a `Read` request body.
pub fn grpc_message(message: &[u8]) -> Vec<u8> {
    let (framed, _) = message_frames(message, Bytes::new());
    framed.to_vec()
}

/// Decodes a `ByteStream.Read` response body as it arrives, handing on each piece of
/// `ReadResponse.data` as a slice of the chunk it came in (no copy): the client side of
/// [`ByteStreamCalls`]' framing, for clients that verify what they read and cannot spare a copy of
/// every byte (`reapi-bench`). Any server's framing decodes: messages and field headers may be
/// split anywhere, and fields other than `data` are skipped.
#[derive(Debug, Default)]
pub struct ReadResponseDecoder {
    state: DecodeState,
    /// A gRPC header or a field header split across chunks.
    partial: Vec<u8>,
}

#[derive(Debug, Default)]
enum DecodeState {
    /// Between messages: the next bytes are a gRPC message header.
    #[default]
    GrpcHeader,
    /// Inside a message of which `left` bytes remain, at a field header.
    FieldHeader { left: usize },
    /// Inside a field's value: `len` bytes of it remain, then `left` bytes of the message.
    Value { data: bool, len: usize, left: usize },
}

/// The most bytes a protobuf field header (key and length varints) takes.
const MAX_FIELD_HEADER: usize = 20;

impl ReadResponseDecoder {
    /// A decoder at the start of a response body.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes `chunk`, calling `data` with each slice of `ReadResponse.data` it holds.
    pub fn push(&mut self, chunk: &Bytes, mut data: impl FnMut(Bytes)) -> Result<(), String> {
        let mut at = 0;
        while at < chunk.len() {
            match self.state {
                DecodeState::GrpcHeader => {
                    let take = (GRPC_HEADER - self.partial.len()).min(chunk.len() - at);
                    self.partial.extend_from_slice(&chunk[at..at + take]);
                    at += take;
                    if self.partial.len() == GRPC_HEADER {
                        if self.partial[0] != 0 {
                            return Err("a compressed gRPC message".into());
                        }
                        let left = u32::from_be_bytes(self.partial[1..5].try_into().expect("4"));
                        self.partial.clear();
                        if left > 0 {
                            self.state = DecodeState::FieldHeader {
                                left: left as usize,
                            };
                        }
                    }
                }
                DecodeState::FieldHeader { left } => {
                    self.partial.push(chunk[at]);
                    at += 1;
                    if let Some(state) = self.field_header(left)? {
                        self.partial.clear();
                        self.state = state;
                    }
                }
                DecodeState::Value {
                    data: is_data,
                    len,
                    left,
                } => {
                    let take = len.min(chunk.len() - at);
                    if is_data {
                        data(chunk.slice(at..at + take));
                    }
                    at += take;
                    self.state = if take < len {
                        DecodeState::Value {
                            data: is_data,
                            len: len - take,
                            left,
                        }
                    } else if left > 0 {
                        DecodeState::FieldHeader { left }
                    } else {
                        DecodeState::GrpcHeader
                    };
                }
            }
        }
        Ok(())
    }

    /// The state after the field header collected so far in `partial`, once it is whole.
    fn field_header(&self, left: usize) -> Result<Option<DecodeState>, String> {
        let header = &self.partial[..];
        let incomplete = |what: &str| {
            if header.len() >= MAX_FIELD_HEADER.min(left) {
                Err(format!("a malformed {what} in a ReadResponse"))
            } else {
                Ok(None)
            }
        };
        let mut rest = header;
        let Ok(key) = prost::encoding::decode_varint(&mut rest) else {
            return incomplete("field key");
        };
        let len = match key & 7 {
            0 => match prost::encoding::decode_varint(&mut rest) {
                Ok(_) => 0,
                Err(_) => return incomplete("varint field"),
            },
            1 => 8,
            5 => 4,
            2 => match prost::encoding::decode_varint(&mut rest) {
                Ok(len) => len,
                Err(_) => return incomplete("field length"),
            },
            wire_type => return Err(format!("wire type {wire_type} in a ReadResponse")),
        };
        let header_len = header.len() - rest.len();
        let left = left - header_len;
        if len > left as u64 {
            return Err(format!(
                "a {len}-byte field in the {left} bytes left of a ReadResponse"
            ));
        }
        let len = len as usize;
        Ok(Some(match (len, left - len) {
            (0, 0) => DecodeState::GrpcHeader,
            (0, left) => DecodeState::FieldHeader { left },
            (len, left) => DecodeState::Value {
                data: key == u64::from(DATA_FIELD_KEY),
                len,
                left,
            },
        }))
    }

    /// Whether the body may end here (not inside a message).
    pub fn finish(&self) -> Result<(), String> {
        match (&self.state, self.partial.is_empty()) {
            (DecodeState::GrpcHeader, true) => Ok(()),
            _ => Err("the response ended inside a message".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rba_proto::bytestream::ReadResponse;

    fn body_of((header, data): (Bytes, Bytes)) -> Vec<u8> {
        [header, data].concat()
    }

    #[test]
    fn frames_are_what_tonic_would_encode() {
        for size in [0usize, 1, 127, 128, 16_383, 16_384, 1 << 20] {
            let message = ReadResponse {
                data: (0..size).map(|i| i as u8).collect(),
            };
            let expected = grpc_message(&message.encode_to_vec());
            let frames = message_frames(&[], Bytes::from(message.data));
            assert_eq!(body_of(frames), expected, "{size} bytes");
        }
    }

    #[test]
    fn write_requests_framed_with_other_fields_are_what_tonic_would_encode() {
        for (size, offset, finish) in [
            (0usize, 0i64, true),
            (1, 5, false),
            (1 << 20, 1 << 30, true),
        ] {
            let message = rba_proto::bytestream::WriteRequest {
                resource_name: if offset == 0 {
                    "up/1/blobs/x/1".into()
                } else {
                    String::new()
                },
                write_offset: offset,
                finish_write: finish,
                data: (0..size).map(|i| (i * 3) as u8).collect(),
            };
            let fields = rba_proto::bytestream::WriteRequest {
                data: Vec::new(),
                ..message.clone()
            }
            .encode_to_vec();
            let frames = message_frames(&fields, Bytes::from(message.data.clone()));
            let body = body_of(frames);
            let decoded =
                rba_proto::bytestream::WriteRequest::decode(&body[GRPC_HEADER..]).unwrap();
            assert_eq!(decoded, message, "{size} bytes");
            assert_eq!(
                &body[..GRPC_HEADER],
                &grpc_message(&message.encode_to_vec())[..GRPC_HEADER]
            );
        }
    }

    #[test]
    fn malformed_requests_are_named() {
        let good = ReadRequest {
            resource_name: "blobs/x/1".into(),
            read_offset: 3,
            read_limit: 0,
        };
        assert_eq!(
            read_request(&grpc_message(&good.encode_to_vec())).unwrap(),
            good
        );

        let cases: [(&[u8], &str); 5] = [
            (&[0, 0, 0], "shorter than a gRPC message header"),
            (&[1, 0, 0, 0, 0], "compressed"),
            (&[0, 0, 0, 0, 9, 1], "says 9 bytes and the body holds 1"),
            (&[0, 0, 0, 0, 1, 0xff], "not a ReadRequest"),
            (
                &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                "says 0 bytes and the body holds 5",
            ),
        ];
        for (body, expected) in cases {
            let error = read_request(body).unwrap_err();
            assert_eq!(error.code(), tonic::Code::InvalidArgument, "{body:?}");
            assert!(error.message().contains(expected), "{body:?}: {error:?}");
        }
    }
    #[test]
    fn the_decoder_hands_on_the_data_of_any_split_and_skips_other_fields() {
        let messages: Vec<ReadResponse> = [0usize, 1, 200, 70_000]
            .iter()
            .map(|&size| ReadResponse {
                data: (0..size).map(|i| (i * 7) as u8).collect(),
            })
            .collect();
        let mut body: Vec<u8> = messages
            .iter()
            .flat_map(|m| body_of(message_frames(&[], Bytes::from(m.data.clone()))))
            .collect();
        // A message with fields a ReadResponse does not have, around its data: skipped.
        let odd = [
            0x08, 0x96, 0x01, // field 1, varint 150
            0x11, 1, 2, 3, 4, 5, 6, 7, 8, // field 2, 64-bit
            0x52, 3, b'a', b'b', b'c', // data "abc"
            0x1a, 2, 9, 9, // field 3, 2 bytes
            0x25, 1, 2, 3, 4, // field 4, 32-bit
        ];
        body.push(0);
        body.extend((odd.len() as u32).to_be_bytes());
        body.extend(odd);
        let mut expected: Vec<u8> = messages.iter().flat_map(|m| m.data.clone()).collect();
        expected.extend(b"abc");
        let body = Bytes::from(body);
        for split in [1, 2, 3, 5, 6, 7, 1000, 65_536, body.len()] {
            let mut decoder = ReadResponseDecoder::new();
            let mut received = Vec::new();
            for start in (0..body.len()).step_by(split) {
                let chunk = body.slice(start..(start + split).min(body.len()));
                decoder
                    .push(&chunk, |data| received.extend_from_slice(&data))
                    .unwrap();
            }
            decoder.finish().unwrap();
            assert_eq!(received, expected, "split every {split} bytes");
        }
    }

    #[test]
    fn the_decoder_names_malformed_bodies() {
        let cases: [(&[u8], &str); 6] = [
            (&[1, 0, 0, 0, 1, 0], "compressed"),
            (
                &[0, 0, 0, 0, 2, 0x52, 5],
                "5-byte field in the 0 bytes left",
            ),
            (&[0, 0, 0, 0, 1, 0x53], "wire type 3"),
            (&[0, 0, 0, 0, 2, 0x52, 0x80], "malformed field length"),
            (
                &[
                    0, 0, 0, 0, 11, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80,
                    0x80,
                ],
                "malformed field key",
            ),
            (&[0, 0, 0, 0, 3, 0x52, 1], "ended inside a message"),
        ];
        for (body, named) in cases {
            let mut decoder = ReadResponseDecoder::new();
            let error = decoder
                .push(&Bytes::copy_from_slice(body), |_| {})
                .and_then(|()| decoder.finish())
                .unwrap_err();
            assert!(error.contains(named), "{body:?}: {error}");
        }
    }
}
