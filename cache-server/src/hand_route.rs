//! A gRPC service whose hottest calls are served by hand, in front of tonic's generated server
//! for the rest: the one way the server takes a call away from generated code.
//!
//! Why: tonic's generated servers fix each call's codec to prost's decoding of the generated
//! message types, which copies every `bytes` field and allocates every `string`. For the calls
//! where that is most of the server's work (ByteStream's data, FindMissingBlobs' thousands of
//! digests; see [`crate::bytestream_route`] and [`crate::cas_route`]) a [`HandCalls`] serves
//! them, with the generated server behind it for every other path. The hand-served calls
//! authenticate through the same [`crate::auth::Authenticator`] the generated servers sit
//! behind, and are answered by the same service methods.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tonic::service::Interceptor;

use crate::auth::Authenticator;

/// The answer of a call served by hand (errors are in its gRPC status).
pub type HandAnswer = Pin<Box<dyn Future<Output = http::Response<Body>> + Send>>;

/// The calls of one service that are served by hand.
pub trait HandCalls: Clone + Send + 'static {
    /// True when `path` names one of these calls.
    fn serves(&self, path: &str) -> bool;

    /// The answer to `request`, whose path [`HandCalls::serves`].
    fn serve(&self, request: http::Request<Body>) -> HandAnswer;
}

/// A service's calls: those `hand` serves, then every other by `others` (tonic's generated
/// server behind the interceptor).
#[derive(Clone)]
pub struct HandRoute<H, S> {
    hand: H,
    others: S,
}

impl<H, S> HandRoute<H, S> {
    /// The calls `hand` serves, the rest by `others`.
    pub fn new(hand: H, others: S) -> Self {
        HandRoute { hand, others }
    }
}

impl<H, S: NamedService> NamedService for HandRoute<H, S> {
    const NAME: &'static str = S::NAME;
}

impl<H, S, B> Service<http::Request<Body>> for HandRoute<H, S>
where
    H: HandCalls,
    S: Service<http::Request<Body>, Response = http::Response<B>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.others.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if self.hand.serves(request.uri().path()) {
            let answer = self.hand.serve(request);
            Box::pin(async move { Ok(answer.await) })
        } else {
            let answer = self.others.call(request);
            Box::pin(async move { Ok(answer.await?.map(Body::new)) })
        }
    }
}

/// tonic's own server-side handling of a call (framing, the message limits, compression the
/// service does not accept refused, status) with prost decoding requests as `Req`: what a
/// hand-served call runs when only its message type differs from the generated one.
pub fn grpc<Resp, Req>(
    max_decoding_bytes: usize,
    max_encoding_bytes: usize,
) -> tonic::server::Grpc<tonic_prost::ProstCodec<Resp, Req>>
where
    Resp: prost::Message + Send + 'static,
    Req: prost::Message + Default + Send + 'static,
{
    tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
        .apply_max_message_size_config(Some(max_decoding_bytes), Some(max_encoding_bytes))
}

/// `request` once `auth` accepted its metadata (what the interceptor in front of the generated
/// servers does), with the extensions `auth` adds (the caller's scope).
pub fn authenticated<T>(
    auth: &mut Authenticator,
    request: tonic::Request<T>,
) -> Result<tonic::Request<T>, tonic::Status> {
    let (metadata, extensions, message) = request.into_parts();
    let checked = auth.call(tonic::Request::from_parts(metadata, extensions, ()))?;
    let (metadata, extensions, ()) = checked.into_parts();
    Ok(tonic::Request::from_parts(metadata, extensions, message))
}
