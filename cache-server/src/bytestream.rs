//! `google.bytestream.ByteStream` over the CAS.
//!
//! Thin over the [`rba_cas::Stores`] the server was given (the `Store` and `Grants` seams).
//!
//! **Read** `{instance}/blobs/...` or `.../compressed-blobs/zstd/...` with `read_offset` and
//! `read_limit` (for compressed reads both count compressed bytes). The store's chunk stream
//! (`Store::read`, read ahead through a bounded channel) is sent in 1 MiB messages
//! ([`READ_CHUNK`]), each the store's own buffer, so memory stays flat whatever the blob's size
//! and a slow client slows the reads down rather than buffering; compressed reads run the zstd
//! encoder on a blocking task fed by that stream.
//! Resource names that are not blobs go to an optional [`ReadSource`] (the executor's live
//! stdout/stderr streams will plug in there). A blob the caller may not read
//! ([`crate::auth::read_scope`]) is `NOT_FOUND`, like a missing one; `QueryWriteStatus` does
//! not call it complete.
//!
//! **Write** `{instance}/uploads/{uuid}/blobs/...` or `.../compressed-blobs/zstd/...`:
//! - each message's data ([`WriteMessage`], a slice of the buffer it arrived in) goes through a
//!   bounded channel to a blocking task that decompresses (zstd, with a bounded window),
//!   hashes and writes it to a temporary file; more bytes than the digest's
//!   size fail at once, a wrong hash fails at `finish_write` (`INVALID_ARGUMENT`), and nothing
//!   unverified ever becomes visible;
//! - a blob already present, and readable by the caller, ends the call at once with
//!   `committed_size` = its size (`-1` for compressed uploads), as REAPI specifies; one present
//!   but not the caller's to read is received and hashed like a new one, and only a verified
//!   upload grants the caller the blob (proof of possession);
//! - uploads are written into the store's local filesystem tier (`Store::local`), then, once
//!   committed, published to every tier (`Store::publish_local`); a stream that breaks before
//!   `finish_write` leaves a resumable upload there: `QueryWriteStatus` reports its
//!   `committed_size`, and a new `Write` with that `write_offset` continues it. Idle uploads
//!   are dropped (and their temporary files deleted) after `upload_idle_timeout_secs`;
//! - a store without a local tier takes the upload through `Store::write` (verified by the
//!   store; the bytes are hashed here too, so a blob already present proves possession just
//!   the same), and such an upload is not resumable: a broken stream stores nothing and a
//!   resumed `Write` is told to start again from offset 0.

use std::collections::HashMap;
use std::io::Read;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use rba_cas::{BlobWriter, CasError, ChunkStream, Digest, Store};
use rba_executor::tenant::Tenant;
use rba_proto::bytestream::byte_stream_server::ByteStream;
use rba_proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
    WriteResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth;
use crate::resource_name::{self, BlobResource, Compressor, ResourceError, UploadResource};
use crate::server::ServerState;
use crate::status;

/// Bytes per ReadResponse.
pub const READ_CHUNK: usize = 1 << 20;
/// Read messages buffered between the zstd encoder's task and the network.
const READ_QUEUE: usize = 4;
/// Write messages buffered between the network and the disk task. Each one's data is a slice
/// of the receive buffer it arrived in and keeps that buffer alive, so few: the HTTP/2 stream
/// window buffers more upstream. (8 raised the server's peak RSS while streaming a 4 GiB blob
/// from 81 to 96 MiB, for no throughput.)
const WRITE_QUEUE: usize = 2;
/// zstd windows above 2^24 bytes (16 MiB) are refused, bounding decoder memory per upload.
const ZSTD_WINDOW_LOG_MAX: u32 = 24;

/// A `google.bytestream.WriteRequest` whose `data` prost decodes as a slice of the buffer the
/// request arrived in: the generated type's `Vec<u8>` is one more copy of every uploaded byte.
/// Same fields, same tags, so the same bytes on the wire.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WriteMessage {
    /// The upload's resource name (first message; later ones may repeat it).
    #[prost(string, tag = "1")]
    pub resource_name: String,
    /// Offset of `data` in the upload.
    #[prost(int64, tag = "2")]
    pub write_offset: i64,
    /// The last message of the upload.
    #[prost(bool, tag = "3")]
    pub finish_write: bool,
    /// The bytes.
    #[prost(bytes = "bytes", tag = "10")]
    pub data: Bytes,
}

impl From<WriteRequest> for WriteMessage {
    fn from(request: WriteRequest) -> Self {
        WriteMessage {
            resource_name: request.resource_name,
            write_offset: request.write_offset,
            finish_write: request.finish_write,
            data: request.data.into(),
        }
    }
}

/// A read's data: each item the `data` of one ReadResponse, as the buffer it was read into
/// (so [`crate::bytestream_route`] sends it without a copy).
pub type ReadChunks = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

/// Serves ByteStream reads of resource names that are not blobs (e.g. the executor's live
/// action output). Returns `None` for names it does not know.
pub trait ReadSource: Send + Sync + 'static {
    /// Starts a read of `resource_name` from `offset`, at most `limit` bytes (0: no limit),
    /// for `caller` (who may only read what its tenant may see).
    fn read(
        &self,
        caller: &auth::Caller,
        resource_name: &str,
        offset: u64,
        limit: u64,
    ) -> Option<Result<ReadChunks, Status>>;
}

/// The ByteStream service.
#[derive(Clone)]
pub struct ByteStreamService {
    state: ServerState,
    extra: Option<Arc<dyn ReadSource>>,
}

impl std::fmt::Debug for ByteStreamService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByteStreamService")
            .field("extra", &self.extra.is_some())
            .finish()
    }
}

impl ByteStreamService {
    /// Over the shared server state.
    pub fn new(state: ServerState) -> Self {
        ByteStreamService { state, extra: None }
    }

    /// Adds a reader for non-blob resource names.
    pub fn with_read_source(mut self, source: Arc<dyn ReadSource>) -> Self {
        self.extra = Some(source);
        self
    }

    /// Opens a read, counted in the request metrics: the one way a ByteStream read starts,
    /// whether tonic's generated server or [`crate::bytestream_route`] sends its messages.
    pub async fn open_read(&self, request: Request<ReadRequest>) -> Result<ReadChunks, Status> {
        self.state
            .metrics
            .counted("Read", self.start_read(request).await)
    }

    async fn start_read(&self, request: Request<ReadRequest>) -> Result<ReadChunks, Status> {
        auth::require_read(&request)?;
        let caller = auth::caller(&request);
        let scope = auth::read_scope(&request);
        let request = request.into_inner();
        if request.read_offset < 0 {
            return Err(Status::out_of_range(format!(
                "negative read_offset {}",
                request.read_offset
            )));
        }
        if request.read_limit < 0 {
            return Err(Status::invalid_argument(format!(
                "negative read_limit {}",
                request.read_limit
            )));
        }
        let (offset, limit) = (request.read_offset as u64, request.read_limit as u64);
        let resource = match resource_name::parse_read(&request.resource_name) {
            Ok(resource) => resource,
            Err(ResourceError::NotABlob(name)) => {
                if let Some(stream) = self
                    .extra
                    .as_ref()
                    .and_then(|s| s.read(&caller, &request.resource_name, offset, limit))
                {
                    return stream;
                }
                return Err(Status::invalid_argument(format!(
                    "resource name {name:?} does not name a blob"
                )));
            }
            Err(e) => return Err(e.into()),
        };
        let BlobResource {
            digest, compressor, ..
        } = resource;
        let stores = &self.state.stores;
        // A blob the caller may not read is answered as one that is not stored.
        if !scope
            .not_readable(stores.grants().as_ref(), &[digest])
            .await?
            .is_empty()
        {
            return Err(status::from_cas_read(CasError::NotFound(digest)));
        }
        let metrics = self.state.metrics.clone();
        // Opened first, so NOT_FOUND / OUT_OF_RANGE are the call's status rather than a stream
        // error.
        match compressor {
            Compressor::Identity => {
                let chunks = stores
                    .blobs()
                    .read(&digest, offset, limit)
                    .await
                    .map_err(status::from_cas_read)?;
                Ok(messages(chunks, metrics))
            }
            Compressor::Zstd => {
                let chunks = stores
                    .blobs()
                    .read(&digest, 0, 0)
                    .await
                    .map_err(status::from_cas_read)?;
                let level = self.state.config.zstd_level;
                // The encoder is CPU work: a blocking task, fed by the store's stream.
                let source = status::blocking(move || -> Result<Box<dyn Read + Send>, Status> {
                    let reader = ChunkReader::new(chunks);
                    let mut encoder = zstd::stream::read::Encoder::new(reader, level)
                        .map_err(|e| Status::internal(format!("zstd: {e}")))?;
                    let skipped =
                        std::io::copy(&mut (&mut encoder).take(offset), &mut std::io::sink())
                            .map_err(|e| status::from_read_io(&digest, e))?;
                    if skipped < offset {
                        return Err(Status::out_of_range(format!(
                            "read_offset {offset} is past the end of the {skipped}-byte compressed stream"
                        )));
                    }
                    Ok(if limit == 0 {
                        Box::new(encoder)
                    } else {
                        Box::new(encoder.take(limit))
                    })
                })
                .await?;
                let (tx, rx) = mpsc::channel(READ_QUEUE);
                tokio::task::spawn_blocking(move || pump(source, digest, tx, &metrics));
                Ok(Box::pin(ReceiverStream::new(rx)))
            }
        }
    }

    /// Takes an upload, counted in the request metrics: the one way a ByteStream write runs,
    /// whether its messages come from tonic's generated server or, decoded without a copy of
    /// their data, from [`crate::bytestream_route`].
    pub async fn open_write<S>(&self, request: Request<S>) -> Result<WriteResponse, Status>
    where
        S: Stream<Item = Result<WriteMessage, Status>> + Unpin + Send,
    {
        self.state
            .metrics
            .counted("Write", self.write_blob(request).await)
    }

    async fn write_blob<S>(&self, request: Request<S>) -> Result<WriteResponse, Status>
    where
        S: Stream<Item = Result<WriteMessage, Status>> + Unpin + Send,
    {
        auth::require_cas_write(&request)?;
        let grantee = auth::grantee(&request);
        let scope = auth::read_scope(&request);
        let mut stream = request.into_inner();
        let first = stream
            .next()
            .await
            .transpose()?
            .ok_or_else(|| Status::invalid_argument("empty write stream"))?;
        let upload = resource_name::parse_write(&first.resource_name)?;
        let key = upload_key(grantee.as_ref(), &upload);
        let digest = upload.blob.digest;
        let compressed = upload.blob.compressor == Compressor::Zstd;
        let already = || WriteResponse {
            committed_size: if compressed { -1 } else { digest.size as i64 },
        };
        if first.write_offset < 0 {
            return Err(Status::out_of_range(format!(
                "negative write_offset {}",
                first.write_offset
            )));
        }
        let stores = self.state.stores.clone();
        let blobs = stores.blobs().clone();
        // Present and readable: nothing to prove. Present but another tenant's: the bytes must
        // come in and be verified (the sink hashes them) before the caller is granted the blob.
        if blobs.contains(&digest).await.map_err(status::from_cas)?
            && scope
                .not_readable(stores.grants().as_ref(), &[digest])
                .await?
                .is_empty()
        {
            self.state.uploads.forget(&key);
            return Ok(already());
        }
        let sink = self
            .state
            .uploads
            .begin(&key, &upload, first.write_offset as u64, &blobs)?;
        let mut expected_offset = sink.wire_received;
        let (tx, rx) = mpsc::channel::<Chunk>(WRITE_QUEUE);
        let worker = tokio::task::spawn_blocking(move || sink.run(rx));

        let mut message = Some(first);
        let mut protocol_error = None;
        loop {
            let request = match message.take() {
                Some(request) => request,
                None => match stream.next().await {
                    Some(Ok(request)) => request,
                    None => break,
                    Some(Err(status)) => {
                        tracing::debug!(key = %upload.key, %status, "upload stream broke; resumable");
                        break;
                    }
                },
            };
            if !request.resource_name.is_empty() && !same_upload(&upload, &request.resource_name) {
                protocol_error = Some(Status::invalid_argument(
                    "resource_name changed within one write stream",
                ));
                break;
            }
            if request.write_offset as u64 != expected_offset || request.write_offset < 0 {
                protocol_error = Some(Status::invalid_argument(format!(
                    "write_offset {} but {expected_offset} bytes were sent",
                    request.write_offset
                )));
                break;
            }
            expected_offset += request.data.len() as u64;
            self.state.metrics.received(request.data.len() as u64);
            if !request.data.is_empty() && tx.send(Chunk::Data(request.data)).await.is_err() {
                break; // the worker failed; its error is reported below
            }
            if request.finish_write {
                let _ = tx.send(Chunk::Finish).await;
                break;
            }
        }
        drop(tx);
        let outcome = worker
            .await
            .map_err(|e| Status::internal(format!("upload task failed: {e}")))?;
        if let Some(error) = protocol_error {
            // A confused client: drop its partial data rather than resume from something odd.
            drop(outcome);
            self.state.uploads.forget(&key);
            return Err(error);
        }
        match outcome {
            WriteOutcome::Committed { wire_received } => {
                self.state.uploads.forget(&key);
                // Written into the local tier: now into every tier, so other processes see it.
                blobs
                    .publish_local(&[digest])
                    .await
                    .map_err(status::from_cas)?;
                // Verified against the digest: the caller holds these bytes.
                if let Some(tenant) = &grantee {
                    stores
                        .grants()
                        .grant(tenant.as_str(), &[digest])
                        .await
                        .map_err(status::from_cas)?;
                }
                Ok(WriteResponse {
                    committed_size: wire_received as i64,
                })
            }
            WriteOutcome::Failed(error) => {
                self.state.uploads.forget(&key);
                if blobs.contains(&digest).await.unwrap_or(false)
                    && error.code() != tonic::Code::InvalidArgument
                {
                    return Ok(already());
                }
                Err(error)
            }
            WriteOutcome::Interrupted(sink) if !sink.resumable() => {
                self.state.uploads.forget(&key);
                drop(sink); // the store's write is told the stream broke: nothing is stored
                Err(Status::invalid_argument(format!(
                    "write stream ended before finish_write; the {} store takes no resumable \
                     uploads: write again from offset 0",
                    blobs.backend()
                )))
            }
            WriteOutcome::Interrupted(sink) => {
                let committed = sink.wire_received;
                self.state.uploads.park(&key, sink);
                Err(Status::invalid_argument(format!(
                    "write stream ended before finish_write; {committed} bytes committed, resume with that write_offset"
                )))
            }
        }
    }

    async fn query(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<QueryWriteStatusResponse, Status> {
        auth::require_read(&request)?;
        let scope = auth::read_scope(&request);
        let upload = resource_name::parse_write(&request.get_ref().resource_name)?;
        let key = upload_key(auth::grantee(&request).as_ref(), &upload);
        let digest = upload.blob.digest;
        let stores = &self.state.stores;
        // A blob the caller may not read is not "complete" to it (no existence leak).
        if stores
            .blobs()
            .contains(&digest)
            .await
            .map_err(status::from_cas)?
            && scope
                .not_readable(stores.grants().as_ref(), &[digest])
                .await?
                .is_empty()
        {
            return Ok(QueryWriteStatusResponse {
                committed_size: digest.size as i64,
                complete: true,
            });
        }
        let committed = self.state.uploads.committed(&key).unwrap_or(0);
        Ok(QueryWriteStatusResponse {
            committed_size: committed as i64,
            complete: false,
        })
    }
}

/// An upload's key in [`Uploads`]: its resource name's key, and the caller's tenant when
/// tenants are kept apart. Another tenant naming the same upload (`uploads/{uuid}` is the
/// client's choice, and may be seen) reaches another slot: it can neither resume this upload
/// with only its tail, nor restart it, nor read its progress. NUL never occurs in a resource
/// name, so the two parts cannot run into each other.
fn upload_key(tenant: Option<&Tenant>, upload: &UploadResource) -> String {
    match tenant {
        Some(tenant) => format!("{}\0{}", tenant.as_str(), upload.key),
        None => upload.key.clone(),
    }
}

/// Later messages may repeat the resource name (possibly with other optional metadata); it
/// must name the same upload.
fn same_upload(upload: &UploadResource, name: &str) -> bool {
    resource_name::parse_write(name).is_ok_and(|other| other.key == upload.key)
}

/// A store's chunk stream as messages of [`READ_CHUNK`] bytes (the last one shorter), each a
/// slice of the store's own buffer when its chunks are that size (no copy); a store error
/// ends the stream.
fn messages(mut chunks: ChunkStream, metrics: Arc<crate::metrics::Metrics>) -> ReadChunks {
    Box::pin(async_stream::stream! {
        let mut pending = BytesMut::new();
        while let Some(chunk) = chunks.next().await {
            let mut chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => {
                    yield Err(status::from_cas_read(e));
                    return;
                }
            };
            while !chunk.is_empty() {
                let data = if pending.is_empty() && chunk.len() >= READ_CHUNK {
                    chunk.split_to(READ_CHUNK)
                } else {
                    let take = (READ_CHUNK - pending.len()).min(chunk.len());
                    pending.extend_from_slice(&chunk.split_to(take));
                    if pending.len() < READ_CHUNK {
                        continue;
                    }
                    pending.split().freeze()
                };
                metrics.sent(data.len() as u64);
                yield Ok(data);
            }
        }
        if !pending.is_empty() {
            metrics.sent(pending.len() as u64);
            yield Ok(pending.freeze());
        }
    })
}

/// A store's chunk stream as a blocking `Read`, for the zstd encoder's blocking task (the
/// stream is polled on that thread; its chunks come from the store's own tasks).
struct ChunkReader {
    chunks: ChunkStream,
    current: Bytes,
}

impl ChunkReader {
    fn new(chunks: ChunkStream) -> Self {
        ChunkReader {
            chunks,
            current: Bytes::new(),
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match futures::executor::block_on(self.chunks.next()) {
                Some(Ok(chunk)) => self.current = chunk,
                // A stored blob shorter than its digest reads as one (DATA_LOSS, not INTERNAL).
                Some(Err(e @ CasError::SizeMismatch { .. })) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        e.to_string(),
                    ));
                }
                Some(Err(e)) => return Err(std::io::Error::other(e.to_string())),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Streams `source` as messages until it ends, the client leaves, or reading fails.
fn pump(
    mut source: Box<dyn Read + Send>,
    digest: Digest,
    tx: mpsc::Sender<Result<Bytes, Status>>,
    metrics: &crate::metrics::Metrics,
) {
    loop {
        let mut data = vec![0u8; READ_CHUNK];
        let mut filled = 0;
        while filled < READ_CHUNK {
            match source.read(&mut data[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = tx.blocking_send(Err(status::from_read_io(&digest, e)));
                    return;
                }
            }
        }
        if filled == 0 {
            return;
        }
        data.truncate(filled);
        metrics.sent(filled as u64);
        if tx.blocking_send(Ok(Bytes::from(data))).is_err() {
            return; // client went away
        }
        if filled < READ_CHUNK {
            return;
        }
    }
}

enum Chunk {
    Data(Bytes),
    Finish,
}

enum WriteOutcome {
    Committed { wire_received: u64 },
    Failed(Status),
    Interrupted(Box<UploadSink>),
}

/// Where an upload's bytes go.
enum Target {
    /// The store's local tier: a temp file + hasher, kept across interruptions (resumable).
    Local(BlobWriter),
    /// A store without a local tier: a `Store::write` fed chunk by chunk (not resumable).
    Through(Through),
}

/// A `Store::write` running on its own task, fed through a channel.
struct Through {
    digest: Digest,
    received: u64,
    tx: Option<mpsc::Sender<rba_cas::Result<Bytes>>>,
    /// Set by `commit` only: a channel closed without it is an abandoned upload, and the
    /// store is told so (an error ends its stream) rather than shown a clean end.
    finished: Arc<std::sync::atomic::AtomicBool>,
    task: Option<tokio::task::JoinHandle<rba_cas::Result<()>>>,
}

impl Through {
    /// Starts the store's write (on the current runtime).
    fn start(store: Arc<dyn Store>, digest: Digest) -> Self {
        let (tx, mut rx) = mpsc::channel::<rba_cas::Result<Bytes>>(WRITE_QUEUE);
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (done, mut ended) = (finished.clone(), false);
        let chunks: ChunkStream = futures::stream::poll_fn(move |cx| match rx.poll_recv(cx) {
            std::task::Poll::Ready(None) if !ended && !done.load(Ordering::Acquire) => {
                ended = true;
                std::task::Poll::Ready(Some(Err(CasError::Unavailable(format!(
                    "upload of {digest:?} abandoned before finish_write"
                )))))
            }
            other => other,
        })
        .boxed();
        let task = tokio::spawn(async move { store.write(digest, chunks).await });
        Through {
            digest,
            received: 0,
            tx: Some(tx),
            finished,
            task: Some(task),
        }
    }

    /// The store's verdict once its write ended.
    fn outcome(&mut self) -> Result<(), Status> {
        let task = self.task.take().expect("a write's outcome is taken once");
        match futures::executor::block_on(task) {
            Ok(result) => result.map_err(status::from_cas),
            Err(e) => Err(Status::internal(format!("store write task failed: {e}"))),
        }
    }

    fn write_chunk(&mut self, bytes: &[u8]) -> Result<(), Status> {
        let after = self.received + bytes.len() as u64;
        if after > self.digest.size {
            return Err(status::from_cas(CasError::SizeMismatch {
                expected: self.digest,
                actual: after,
            }));
        }
        self.received = after;
        let tx = self.tx.as_ref().expect("written before commit");
        if tx.blocking_send(Ok(Bytes::copy_from_slice(bytes))).is_err() {
            // The store's write ended early: its error is the one to report.
            self.tx = None;
            return self.outcome().and(Err(Status::internal(format!(
                "the store stopped reading {:?} early",
                self.digest
            ))));
        }
        Ok(())
    }

    fn commit(mut self) -> Result<(), Status> {
        // The end of the stream: the store verifies and publishes.
        self.finished.store(true, Ordering::Release);
        self.tx = None;
        self.outcome()
    }
}

impl Target {
    fn write_chunk(&mut self, bytes: &[u8]) -> Result<(), Status> {
        match self {
            Target::Local(writer) => writer.write_chunk(bytes).map_err(status::from_cas),
            Target::Through(through) => through.write_chunk(bytes),
        }
    }

    fn commit(self) -> Result<(), Status> {
        match self {
            Target::Local(writer) => writer.commit().map(|_| ()).map_err(status::from_cas),
            Target::Through(through) => through.commit(),
        }
    }
}

/// An upload in progress: where its bytes go (the local tier's writer, or the store's own
/// write), the zstd decoder for compressed uploads, and how many wire bytes were accepted.
pub struct UploadSink {
    target: Target,
    decoder: Option<zstd::stream::raw::Decoder<'static>>,
    out: Vec<u8>,
    /// Wire (possibly compressed) bytes accepted so far: the resumable `committed_size`.
    wire_received: u64,
    /// The same number, readable by QueryWriteStatus while the upload runs.
    progress: Arc<AtomicU64>,
    /// zstd said the last frame was complete (its hint was 0).
    frame_complete: bool,
    digest: Digest,
    /// Hashes what comes in when the blob is already stored (the store then keeps nothing of
    /// it, so only this proves the uploader holds the bytes).
    verify: Option<rba_cas::digest::Hasher>,
}

impl UploadSink {
    fn new(store: &Arc<dyn Store>, resource: &BlobResource) -> Result<Self, Status> {
        let (target, hash_here) = match store.local() {
            Some(local) => {
                let writer = local.writer(resource.digest).map_err(status::from_cas)?;
                let present = writer.already_present();
                (Target::Local(writer), present)
            }
            // The store verifies what it stores; hashing here too covers a blob it already
            // holds (proof of possession whatever the backend).
            None => (
                Target::Through(Through::start(store.clone(), resource.digest)),
                true,
            ),
        };
        let verify = hash_here.then(|| resource.digest.function.hasher());
        let decoder = match resource.compressor {
            Compressor::Identity => None,
            Compressor::Zstd => {
                let mut decoder = zstd::stream::raw::Decoder::new()
                    .map_err(|e| Status::internal(format!("zstd: {e}")))?;
                decoder
                    .set_parameter(zstd::stream::raw::DParameter::WindowLogMax(
                        ZSTD_WINDOW_LOG_MAX,
                    ))
                    .map_err(|e| Status::internal(format!("zstd: {e}")))?;
                Some(decoder)
            }
        };
        Ok(UploadSink {
            target,
            decoder,
            out: if resource.compressor == Compressor::Zstd {
                vec![0u8; 256 << 10]
            } else {
                Vec::new()
            },
            wire_received: 0,
            progress: Arc::new(AtomicU64::new(0)),
            frame_complete: true,
            digest: resource.digest,
            verify,
        })
    }

    /// Consumes chunks until the stream ends (resumable), `Finish` (commit), or an error.
    fn run(mut self, mut rx: mpsc::Receiver<Chunk>) -> WriteOutcome {
        while let Some(chunk) = rx.blocking_recv() {
            match chunk {
                Chunk::Data(data) => {
                    if let Err(error) = self.write(&data) {
                        return WriteOutcome::Failed(error);
                    }
                }
                Chunk::Finish => {
                    let wire_received = self.wire_received;
                    return match self.finish() {
                        Ok(()) => WriteOutcome::Committed { wire_received },
                        Err(error) => WriteOutcome::Failed(error),
                    };
                }
            }
        }
        WriteOutcome::Interrupted(Box::new(self))
    }

    fn write(&mut self, data: &[u8]) -> Result<(), Status> {
        match &mut self.decoder {
            None => {
                self.target.write_chunk(data)?;
                if let Some(hasher) = &mut self.verify {
                    hasher.update(data);
                }
            }
            Some(decoder) => {
                use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
                let mut input = InBuffer::around(data);
                loop {
                    let mut output = OutBuffer::around(&mut self.out[..]);
                    let hint = decoder.run(&mut input, &mut output).map_err(|e| {
                        Status::invalid_argument(format!(
                            "corrupt zstd stream for {:?}: {e}",
                            self.digest
                        ))
                    })?;
                    let produced = output.pos();
                    self.frame_complete = hint == 0;
                    self.target.write_chunk(&self.out[..produced])?;
                    if let Some(hasher) = &mut self.verify {
                        hasher.update(&self.out[..produced]);
                    }
                    if input.pos() == data.len() && produced < self.out.len() {
                        break;
                    }
                }
            }
        }
        self.wire_received += data.len() as u64;
        self.progress.store(self.wire_received, Ordering::Relaxed);
        Ok(())
    }

    fn finish(self) -> Result<(), Status> {
        if self.decoder.is_some() && !self.frame_complete {
            return Err(Status::invalid_argument(format!(
                "zstd stream for {:?} is truncated",
                self.digest
            )));
        }
        if let Some(hasher) = self.verify {
            let actual = hasher.finish();
            if actual != self.digest {
                return Err(Status::invalid_argument(format!(
                    "uploaded bytes hash to {actual:?}, not {:?}",
                    self.digest
                )));
            }
        }
        self.target.commit()
    }

    /// Whether an interrupted upload can be parked and resumed (only in a local tier).
    fn resumable(&self) -> bool {
        matches!(self.target, Target::Local(_))
    }
}

enum Slot {
    /// A stream is writing it right now.
    Active(Arc<AtomicU64>),
    /// Interrupted, waiting to be resumed.
    Idle(Box<UploadSink>, Instant),
}

/// Resumable uploads by resource name (without optional metadata).
pub struct Uploads {
    slots: Mutex<HashMap<String, Slot>>,
    idle_timeout: Duration,
    count: Arc<AtomicU64>,
}

impl std::fmt::Debug for Uploads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uploads")
            .field("sessions", &self.slots.lock().len())
            .finish()
    }
}

impl Uploads {
    /// An empty registry; idle uploads expire after `idle_timeout`.
    pub fn new(idle_timeout: Duration) -> Self {
        Uploads {
            slots: Mutex::new(HashMap::new()),
            idle_timeout,
            count: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The number of uploads in progress, for metrics.
    pub fn session_counter(&self) -> Arc<AtomicU64> {
        self.count.clone()
    }

    fn update_count(&self, slots: &HashMap<String, Slot>) {
        self.count.store(slots.len() as u64, Ordering::Relaxed);
    }

    /// Starts (offset 0) or resumes (offset = committed size) an upload.
    fn begin(
        &self,
        key: &str,
        upload: &UploadResource,
        offset: u64,
        blobs: &Arc<dyn Store>,
    ) -> Result<UploadSink, Status> {
        let mut slots = self.slots.lock();
        let sink = match slots.remove(key) {
            Some(Slot::Active(progress)) => {
                slots.insert(key.to_string(), Slot::Active(progress));
                return Err(Status::aborted(
                    "another stream is writing this upload right now",
                ));
            }
            Some(Slot::Idle(sink, _)) if sink.wire_received == offset => *sink,
            Some(Slot::Idle(sink, since)) if offset != 0 => {
                let committed = sink.wire_received;
                slots.insert(key.to_string(), Slot::Idle(sink, since));
                return Err(Status::invalid_argument(format!(
                    "write_offset {offset} does not match the {committed} bytes committed"
                )));
            }
            // Offset 0: a fresh start, whatever was there.
            Some(Slot::Idle(..)) | None if offset == 0 => UploadSink::new(blobs, &upload.blob)?,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "write_offset {offset} but there is no upload to resume (committed size 0)"
                )));
            }
        };
        slots.insert(key.to_string(), Slot::Active(sink.progress.clone()));
        self.update_count(&slots);
        Ok(sink)
    }

    /// Keeps an interrupted upload for resumption.
    fn park(&self, key: &str, sink: Box<UploadSink>) {
        let mut slots = self.slots.lock();
        slots.insert(key.to_string(), Slot::Idle(sink, Instant::now()));
        self.update_count(&slots);
    }

    /// Drops an upload (its temp file goes with it).
    fn forget(&self, key: &str) {
        let removed = {
            let mut slots = self.slots.lock();
            let removed = slots.remove(key);
            self.update_count(&slots);
            removed
        };
        drop(removed);
    }

    /// Bytes committed so far by an upload in progress.
    fn committed(&self, key: &str) -> Option<u64> {
        match self.slots.lock().get(key)? {
            Slot::Active(progress) => Some(progress.load(Ordering::Relaxed)),
            Slot::Idle(sink, _) => Some(sink.wire_received),
        }
    }

    /// Drops uploads idle for longer than the timeout.
    pub fn reap(&self) -> usize {
        let expired: Vec<Slot> = {
            let mut slots = self.slots.lock();
            let keys: Vec<String> = slots
                .iter()
                .filter(|(_, slot)| matches!(slot, Slot::Idle(_, since) if since.elapsed() >= self.idle_timeout))
                .map(|(key, _)| key.clone())
                .collect();
            let expired = keys.iter().filter_map(|key| slots.remove(key)).collect();
            self.update_count(&slots);
            expired
        };
        if !expired.is_empty() {
            tracing::info!(count = expired.len(), "dropped idle uploads");
        }
        expired.len()
    }

    /// Reaps forever, a few times per timeout.
    pub async fn reap_forever(self: Arc<Self>) {
        let period =
            (self.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
        loop {
            tokio::time::sleep(period).await;
            let this = self.clone();
            let _ = tokio::task::spawn_blocking(move || this.reap()).await;
        }
    }
}

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send>>;

    /// Not reached over the network: [`crate::bytestream_route::ByteStreamCalls`] serves `Read`
    /// without tonic's encoder. Kept for the trait, and it answers the same (its `Vec` copies
    /// the data).
    async fn read(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let chunks = self.open_read(request).await?;
        Ok(Response::new(Box::pin(chunks.map(|data| {
            data.map(|data| ReadResponse { data: data.into() })
        }))))
    }

    /// Not reached over the network either: [`crate::bytestream_route::ByteStreamCalls`]
    /// decodes `Write` requests into [`WriteMessage`]s itself. Kept for the trait.
    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        let messages = request.map(|stream| stream.map(|m| m.map(WriteMessage::from)));
        self.open_write(messages).await.map(Response::new)
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        self.state
            .metrics
            .answer("QueryWriteStatus", self.query(request).await)
    }
}
