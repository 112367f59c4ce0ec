//! `build.bazel.remote.execution.v2.ContentAddressableStorage`.
//!
//! Thin over the [`rba_cas::Stores`] the server was given: every call goes through the
//! `Store` and `Grants` seams, whatever the backend.
//!
//! - FindMissingBlobs: answered by the store's index alone (`Store::find_missing_and_touch`),
//!   and refreshes the LRU position of the blobs that are present, as the spec asks.
//! - BatchUpdateBlobs: zstd entries decompressed with a bound (never past their digest's size,
//!   and at most [`DECODED_BATCH_FACTOR`] times the batch limit in all, so a few bytes cannot
//!   claim gigabytes of memory), then the batch handed to `Store::write_batch` (group commit:
//!   one sync for the batch, not one per blob), which verifies each blob (size and hash) before
//!   it becomes visible, also when it is already present (a lying client is told so and earns
//!   no grant, whoever stored the blob meanwhile); per-blob statuses; a request whose payload
//!   exceeds the advertised `max_batch_total_size_bytes` is `INVALID_ARGUMENT`.
//! - BatchReadBlobs: per-blob statuses, zstd when the client accepts it, the same limit.
//! - GetTree: breadth-first over `Directory` blobs, each distinct directory once, missing
//!   subtrees omitted, pages bounded by `page_size` and by the message limit; `page_token` is the
//!   number of directories already returned, so a retry resumes where the stream broke.
//! - Reads are per tenant ([`crate::auth::read_scope`]): BatchReadBlobs, GetTree (its root and
//!   each subdirectory) refuse or omit what the caller may not read exactly as if it were
//!   absent, and FindMissingBlobs lists such blobs as missing, so a client that holds the bytes
//!   uploads them and is granted them (proof of possession; one grants lookup per request).
//!   BatchUpdateBlobs grants the caller every blob it stored, once verified.
//! - Chunking RPCs (v2.12+): `UNIMPLEMENTED`, and Capabilities says so.

use std::collections::{HashSet, VecDeque};
use std::io::Read;
use std::pin::Pin;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use rayon::prelude::*;
use rba_cas::{CasError, Digest, DigestFunction, Store, Stores};
use rba_proto::Message;
use rba_proto::reapi::content_addressable_storage_server::ContentAddressableStorage;
use rba_proto::reapi::{
    BatchReadBlobsRequest, BatchReadBlobsResponse, BatchUpdateBlobsRequest,
    BatchUpdateBlobsResponse, Directory, FindMissingBlobsRequest, FindMissingBlobsResponse,
    GetChunkMappingRequest, GetChunkMappingResponse, GetTreeRequest, GetTreeResponse,
    RegisterChunkMappingRequest, RegisterChunkMappingResponse, SpliceBlobRequest,
    SpliceBlobResponse, SplitBlobRequest, SplitBlobResponse, batch_read_blobs_response,
    batch_update_blobs_request, batch_update_blobs_response, compressor,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::cas_route::FindMissingQuery;
use crate::resource_name::Compressor;
use crate::server::ServerState;
use crate::status::{self, blocking};
use crate::{auth, resource_name};

/// BatchUpdateBlobs decompresses at most this many times `max_batch_total_size_bytes` per
/// request (claimed sizes, counted before decoding); compressed entries past it fail alone
/// (send them through ByteStream).
pub const DECODED_BATCH_FACTOR: u64 = 16;
/// BatchReadBlobs reads this many blobs concurrently.
const READ_CONCURRENCY: usize = 16;
/// Framing bytes a BatchReadBlobs response adds per blob (digest, status, tags), an upper bound.
const READ_ENTRY_OVERHEAD: usize = 128;
/// Default and largest GetTree page, in directories.
const DEFAULT_TREE_PAGE: usize = 1_000;
const MAX_TREE_PAGE: usize = 10_000;
/// Largest `Directory` blob GetTree decodes.
const MAX_DIRECTORY_BYTES: u64 = 16 << 20;

/// Threads for the batch calls' codec work (zstd, hashing of blobs already present); the store
/// does its own I/O behind the seam.
fn io_pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        rayon::ThreadPoolBuilder::new()
            .num_threads((cores * 2).clamp(4, 32))
            .thread_name(|i| format!("cas-batch-codec-{i}"))
            .build()
            .expect("batch codec thread pool")
    })
}

/// The ContentAddressableStorage service.
#[derive(Clone, Debug)]
pub struct CasService {
    state: ServerState,
}

impl CasService {
    /// Over the shared server state.
    pub fn new(state: ServerState) -> Self {
        CasService { state }
    }

    /// FindMissingBlobs, counted: what the generated trait's method answers and what
    /// [`crate::cas_route::CasCalls`] answers over the network.
    pub async fn answer_find_missing(
        &self,
        request: Request<FindMissingQuery>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        self.state
            .metrics
            .answer("FindMissingBlobs", self.find_missing(request).await)
    }

    async fn find_missing(
        &self,
        request: Request<FindMissingQuery>,
    ) -> Result<FindMissingBlobsResponse, Status> {
        auth::require_read(&request)?;
        let scope = auth::read_scope(&request);
        let request = request.into_inner();
        resource_name::validate_instance_name(&request.instance_name)?;
        let function = status::digest_function(request.digest_function)?;
        let digests = request
            .blob_digests
            .iter()
            .map(|d| d.digest(function))
            .collect::<Result<Vec<_>, _>>()?;
        let stores = &self.state.stores;
        // Present blobs were just asked about: a build is about to use them (touched).
        let mut missing = stores
            .blobs()
            .find_missing_and_touch(&digests)
            .await
            .map_err(status::from_cas)?;
        // Present but not the caller's to read: missing to it, so a client that really holds
        // the bytes uploads them and earns the grant (proof of possession).
        if scope != auth::ReadScope::Everything {
            // A seeded hasher: the digests are the client's, and SipHash over a thousand of
            // them cost more than the rest of a cached answer.
            let mut hidden: HashSet<Digest, foldhash::fast::RandomState> =
                missing.iter().copied().collect();
            let present: Vec<Digest> = digests
                .iter()
                .filter(|d| !hidden.contains(d))
                .copied()
                .collect();
            hidden.extend(
                scope
                    .not_readable(stores.grants().as_ref(), &present)
                    .await?,
            );
            // In the order asked, so the answer does not tell the two kinds apart.
            missing = digests
                .iter()
                .filter(|d| hidden.remove(d))
                .copied()
                .collect();
        }
        let asked = request.blob_digests.len() as u64;
        self.state.metrics.lookups(
            asked.saturating_sub(missing.len() as u64),
            missing.len() as u64,
        );
        Ok(FindMissingBlobsResponse {
            missing_blob_digests: missing.iter().map(Digest::to_reapi).collect(),
        })
    }

    async fn batch_update(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<BatchUpdateBlobsResponse, Status> {
        auth::require_cas_write(&request)?;
        let grantee = auth::grantee(&request);
        let request = request.into_inner();
        resource_name::validate_instance_name(&request.instance_name)?;
        let function = status::digest_function(request.digest_function)?;
        let payload: usize = request.requests.iter().map(|r| r.data.len()).sum();
        let limit = self.state.max_batch_total_size_bytes();
        if payload > limit {
            return Err(Status::invalid_argument(format!(
                "batch of {payload} bytes exceeds max_batch_total_size_bytes {limit}; use ByteStream or smaller batches"
            )));
        }
        self.state.metrics.received(payload as u64);
        let stores = self.state.stores.clone();
        let wires: Vec<Option<rba_proto::reapi::Digest>> =
            request.requests.iter().map(|e| e.digest.clone()).collect();
        // Decompression, bounded in all (claimed sizes, before decoding anything).
        let mut budget = (limit as u64).saturating_mul(DECODED_BATCH_FACTOR);
        let within: Vec<bool> = request
            .requests
            .iter()
            .map(|entry| {
                if entry.compressor == rba_proto::reapi::compressor::Value::Identity as i32 {
                    return true;
                }
                let size = entry
                    .digest
                    .as_ref()
                    .map_or(0, |d| d.size_bytes.max(0) as u64);
                let fits = size <= budget;
                if fits {
                    budget -= size;
                }
                fits
            })
            .collect();
        let decoded: Vec<Result<(Digest, Bytes), Status>> = blocking(move || {
            Ok(io_pool().install(|| {
                request
                    .requests
                    .into_par_iter()
                    .zip(within)
                    .map(|(entry, within)| decode_entry(function, entry, within))
                    .collect()
            }))
        })
        .await?;
        let mut to_write = Vec::new();
        let mut outcomes: Vec<Option<Result<(), Status>>> = decoded
            .into_iter()
            .map(|entry| match entry {
                Ok(blob) => {
                    to_write.push(blob);
                    None
                }
                Err(status) => Some(Err(status)),
            })
            .collect();
        // Group commit: the batch is made durable and visible at once.
        let mut written = stores.blobs().write_batch(to_write).await.into_iter();
        for outcome in outcomes.iter_mut().filter(|o| o.is_none()) {
            let result = written.next().expect("one result per blob written");
            *outcome = Some(result.map_err(status::from_cas));
        }
        let responses: Vec<_> = wires
            .into_iter()
            .zip(outcomes)
            .map(|(digest, outcome)| {
                let result = outcome.expect("every entry has an outcome");
                if let Err(status) = &result {
                    tracing::debug!(code = ?status.code(), message = status.message(), "batch update entry refused");
                }
                batch_update_blobs_response::Response {
                    digest,
                    status: Some(match result {
                        Ok(()) => status::rpc_ok(),
                        Err(status) => status::to_rpc(&status),
                    }),
                }
            })
            .collect();
        // The caller proved it holds the bytes of every blob stored (verified against its
        // digest, also when already present): one grant for the request.
        if let Some(tenant) = grantee {
            let stored: Vec<Digest> = responses
                .iter()
                .filter(|r| r.status.as_ref().is_some_and(|s| s.code == 0))
                .filter_map(|r| r.digest.as_ref())
                .filter_map(|d| status::digest(function, d).ok())
                .collect();
            stores
                .grants()
                .grant(tenant.as_str(), &stored)
                .await
                .map_err(status::from_cas)?;
        }
        Ok(BatchUpdateBlobsResponse { responses })
    }

    async fn batch_read(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<BatchReadBlobsResponse, Status> {
        auth::require_read(&request)?;
        let scope = auth::read_scope(&request);
        let request = request.into_inner();
        resource_name::validate_instance_name(&request.instance_name)?;
        let function = status::digest_function(request.digest_function)?;
        let zstd_ok = request
            .acceptable_compressors
            .contains(&(compressor::Value::Zstd as i32));
        let total: u64 = request
            .digests
            .iter()
            .map(|d| d.size_bytes.max(0) as u64)
            .fold(0u64, u64::saturating_add);
        let limit = self.state.max_batch_total_size_bytes() as u64;
        if total > limit {
            return Err(Status::invalid_argument(format!(
                "batch of {total} bytes exceeds max_batch_total_size_bytes {limit}; use ByteStream or smaller batches"
            )));
        }
        let framing = total as usize + request.digests.len() * READ_ENTRY_OVERHEAD;
        if framing > self.state.config.max_message_bytes {
            return Err(Status::invalid_argument(format!(
                "{} blobs would not fit one {}-byte response; split the request",
                request.digests.len(),
                self.state.config.max_message_bytes
            )));
        }
        let stores = &self.state.stores;
        let level = self.state.config.zstd_level;
        let wanted: Vec<Digest> = request
            .digests
            .iter()
            .filter_map(|d| status::digest(function, d).ok())
            .collect();
        let refused: HashSet<Digest> = scope
            .not_readable(stores.grants().as_ref(), &wanted)
            .await?
            .into_iter()
            .collect();
        let (refused, blobs) = (&refused, stores.blobs().as_ref());
        let reads: Vec<(rba_proto::reapi::Digest, Result<Vec<u8>, Status>)> =
            futures::stream::iter(request.digests.into_iter().map(|wire| async move {
                let read = match status::digest(function, &wire) {
                    // The same answer as for a blob that is not stored.
                    Ok(digest) if refused.contains(&digest) => {
                        Err(status::from_cas_read(CasError::NotFound(digest)))
                    }
                    Ok(digest) => blobs
                        .read_to_vec(&digest, limit)
                        .await
                        .map_err(status::from_cas_read),
                    Err(status) => Err(status),
                };
                (wire, read)
            }))
            .buffered(READ_CONCURRENCY)
            .collect()
            .await;
        let respond =
            move |(wire, read): (rba_proto::reapi::Digest, Result<Vec<u8>, Status>)| match read {
                Ok(data) if zstd_ok && data.len() > 64 => {
                    match zstd::bulk::compress(&data, level) {
                        Ok(compressed) => batch_read_blobs_response::Response {
                            digest: Some(wire),
                            data: compressed,
                            compressor: Compressor::Zstd.to_reapi(),
                            status: Some(status::rpc_ok()),
                        },
                        Err(e) => read_failure(wire, Status::internal(format!("zstd: {e}"))),
                    }
                }
                Ok(data) => batch_read_blobs_response::Response {
                    digest: Some(wire),
                    data,
                    compressor: Compressor::Identity.to_reapi(),
                    status: Some(status::rpc_ok()),
                },
                Err(status) => read_failure(wire, status),
            };
        // Compression is CPU work: on the codec pool, in parallel.
        let responses = if zstd_ok {
            blocking(move || Ok(io_pool().install(|| reads.into_par_iter().map(respond).collect())))
                .await?
        } else {
            reads.into_iter().map(respond).collect::<Vec<_>>()
        };
        self.state
            .metrics
            .sent(responses.iter().map(|r| r.data.len() as u64).sum());
        Ok(BatchReadBlobsResponse { responses })
    }

    async fn get_tree_stream(
        &self,
        request: Request<GetTreeRequest>,
    ) -> Result<TreeStream, Status> {
        auth::require_read(&request)?;
        let scope = auth::read_scope(&request);
        let request = request.into_inner();
        resource_name::validate_instance_name(&request.instance_name)?;
        let function = status::digest_function(request.digest_function)?;
        let root = status::required_digest(function, request.root_digest.as_ref(), "root_digest")?;
        if request.page_size < 0 {
            return Err(Status::invalid_argument("page_size must not be negative"));
        }
        let page_size = match request.page_size as usize {
            0 => DEFAULT_TREE_PAGE,
            n => n.min(MAX_TREE_PAGE),
        };
        let skip: usize = if request.page_token.is_empty() {
            0
        } else {
            request.page_token.parse().map_err(|_| {
                Status::invalid_argument(format!("malformed page_token {:?}", request.page_token))
            })?
        };
        // Room for the page token and framing.
        let page_bytes = self.state.config.max_message_bytes - (16 << 10);
        let stores = self.state.stores.clone();
        // Root first, so a missing root is NOT_FOUND on the call itself. A root the caller may
        // not read is missing to it.
        let not_found = || Status::not_found(format!("tree root {root:?} is not in the CAS"));
        if !scope
            .not_readable(stores.grants().as_ref(), &[root])
            .await?
            .is_empty()
        {
            return Err(not_found());
        }
        let root_directory = read_directory(stores.blobs().as_ref(), &root)
            .await?
            .ok_or_else(not_found)?;
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let walker = TreeWalker {
                stores,
                scope,
                function,
                page_size,
                page_bytes,
                skip,
            };
            if let Err(status) = walker.walk(root, root_directory, &tx).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

fn read_failure(
    digest: rba_proto::reapi::Digest,
    status: Status,
) -> batch_read_blobs_response::Response {
    batch_read_blobs_response::Response {
        digest: Some(digest),
        data: vec![],
        compressor: Compressor::Identity.to_reapi(),
        status: Some(status::to_rpc(&status)),
    }
}

/// Decodes one BatchUpdateBlobs entry (zstd never past its digest's size, and only `within`
/// the request's decoding budget) and, for a blob already present (`absent` lacks it),
/// verifies the bytes against the digest here: the store would only count them.
fn decode_entry(
    function: DigestFunction,
    entry: batch_update_blobs_request::Request,
    within: bool,
) -> Result<(Digest, Bytes), Status> {
    let digest = status::required_digest(function, entry.digest.as_ref(), "digest")?;
    let data = match Compressor::from_reapi(entry.compressor)? {
        Compressor::Identity => {
            if entry.data.len() as u64 != digest.size {
                return Err(Status::invalid_argument(format!(
                    "digest {digest:?} says {} bytes but {} were sent",
                    digest.size,
                    entry.data.len()
                )));
            }
            entry.data
        }
        Compressor::Zstd => {
            if !within {
                return Err(Status::invalid_argument(format!(
                    "compressed entries of this batch decompress to more than {DECODED_BATCH_FACTOR} \
                     times max_batch_total_size_bytes; send {digest:?} through ByteStream"
                )));
            }
            let decoder = zstd::stream::read::Decoder::with_buffer(entry.data.as_slice())
                .map_err(|e| Status::internal(format!("zstd: {e}")))?;
            let mut data = Vec::with_capacity(digest.size.min(1 << 20) as usize);
            decoder
                .take(digest.size + 1)
                .read_to_end(&mut data)
                .map_err(|e| {
                    Status::invalid_argument(format!("undecodable data for {digest:?}: {e}"))
                })?;
            if data.len() as u64 != digest.size {
                return Err(status::from_cas(CasError::SizeMismatch {
                    expected: digest,
                    actual: data.len() as u64,
                }));
            }
            data
        }
    };
    Ok((digest, Bytes::from(data)))
}

/// A `Directory` blob, `None` when absent.
async fn read_directory(blobs: &dyn Store, digest: &Digest) -> Result<Option<Directory>, Status> {
    let bytes = match blobs.read_to_vec(digest, MAX_DIRECTORY_BYTES).await {
        Ok(bytes) => bytes,
        Err(CasError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(status::from_cas_read(e)),
    };
    Directory::decode(bytes.as_slice())
        .map(Some)
        .map_err(|e| Status::invalid_argument(format!("blob {digest:?} is not a Directory: {e}")))
}

type TreeStream = Pin<Box<dyn Stream<Item = Result<GetTreeResponse, Status>> + Send>>;

struct TreeWalker {
    /// The blobs, and the grants for the read check of each directory (those the caller may
    /// not read are omitted, like missing ones).
    stores: Stores,
    scope: auth::ReadScope,
    function: DigestFunction,
    page_size: usize,
    page_bytes: usize,
    skip: usize,
}

impl TreeWalker {
    /// Breadth-first, each distinct directory once, in a stable order (children in listing
    /// order), so that page tokens (positions in this order) stay valid across calls.
    async fn walk(
        &self,
        root: Digest,
        root_directory: Directory,
        tx: &mpsc::Sender<Result<GetTreeResponse, Status>>,
    ) -> Result<(), Status> {
        let mut seen = HashSet::from([root]);
        let mut queue = VecDeque::from([(root_directory)]);
        let mut position = 0usize;
        let mut page = Vec::new();
        let mut page_bytes = 0usize;
        let mut sent_any = false;
        while let Some(directory) = queue.pop_front() {
            for child in &directory.directories {
                let digest = status::required_digest(
                    self.function,
                    child.digest.as_ref(),
                    "DirectoryNode.digest",
                )?;
                if seen.insert(digest)
                    && self
                        .scope
                        .not_readable(self.stores.grants().as_ref(), &[digest])
                        .await?
                        .is_empty()
                    && let Some(child) =
                        read_directory(self.stores.blobs().as_ref(), &digest).await?
                {
                    queue.push_back(child);
                }
            }
            position += 1;
            if position <= self.skip {
                continue;
            }
            let size = directory.encoded_len() + 8;
            if !page.is_empty()
                && (page.len() >= self.page_size || page_bytes + size > self.page_bytes)
            {
                let response = GetTreeResponse {
                    directories: std::mem::take(&mut page),
                    next_page_token: (position - 1).to_string(),
                };
                if tx.send(Ok(response)).await.is_err() {
                    return Ok(()); // the client went away
                }
                sent_any = true;
                page_bytes = 0;
            }
            page_bytes += size;
            page.push(directory);
        }
        if !page.is_empty() || !sent_any {
            let _ = tx
                .send(Ok(GetTreeResponse {
                    directories: page,
                    next_page_token: String::new(),
                }))
                .await;
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    /// Not reached over the network: [`crate::cas_route::CasCalls`] decodes the request into
    /// a [`FindMissingQuery`] itself. Kept for the trait, and it answers the same.
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        self.answer_find_missing(request.map(FindMissingQuery::from))
            .await
    }

    async fn batch_update_blobs(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        self.state
            .metrics
            .answer("BatchUpdateBlobs", self.batch_update(request).await)
    }

    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<Response<BatchReadBlobsResponse>, Status> {
        self.state
            .metrics
            .answer("BatchReadBlobs", self.batch_read(request).await)
    }

    type GetTreeStream = TreeStream;

    async fn get_tree(
        &self,
        request: Request<GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        self.state
            .metrics
            .answer("GetTree", self.get_tree_stream(request).await)
    }

    async fn split_blob(
        &self,
        _: Request<SplitBlobRequest>,
    ) -> Result<Response<SplitBlobResponse>, Status> {
        Err(Status::unimplemented(
            "blob splitting is not supported (split_blob_support = false)",
        ))
    }

    type GetChunkMappingStream =
        Pin<Box<dyn Stream<Item = Result<GetChunkMappingResponse, Status>> + Send>>;

    async fn get_chunk_mapping(
        &self,
        _: Request<GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        Err(Status::unimplemented(
            "blob splitting is not supported (split_blob_support = false)",
        ))
    }

    async fn splice_blob(
        &self,
        _: Request<SpliceBlobRequest>,
    ) -> Result<Response<SpliceBlobResponse>, Status> {
        Err(Status::unimplemented(
            "blob splicing is not supported (splice_blob_support = false)",
        ))
    }

    async fn register_chunk_mapping(
        &self,
        _: Request<tonic::Streaming<RegisterChunkMappingRequest>>,
    ) -> Result<Response<RegisterChunkMappingResponse>, Status> {
        Err(Status::unimplemented(
            "blob splicing is not supported (splice_blob_support = false)",
        ))
    }
}
